"""The scorer's Ray Data wrapper: an actor pool of two adds score columns that equal the slow
reference (two separately loaded models, one sequence at a time), on local Ray."""

from __future__ import annotations

import pytest

from actors.chat import prompt_token_ids, response_token_ids
from actors.models import ModelSpec
from actors.scorer import ScorerConfig, ScorerWorker
from tests.reference import naive_scores

pytestmark = pytest.mark.ray

PROMPTS = [f"Question number {i}: how do I do task {i}?" for i in range(6)]
RESPONSES = [[f"Answer {i}.", "", "I can't help with that."] for i in range(6)]


def test_map_batches_with_an_actor_pool_adds_score_columns(ray_local, tiny_models, smol_tokenizer):
    import ray
    from transformers import LlamaForCausalLM

    spec = ModelSpec(base=tiny_models.base, adapter=tiny_models.adapter)
    config = ScorerConfig(layers=(2, 4), metrics=("latent_sim", "kl"))
    rows = [{"prompt_id": i, "prompt": p, "responses": r} for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))]
    dataset = ray.data.from_items(rows).repartition(3).map_batches(
        ScorerWorker,
        fn_constructor_kwargs={"spec": spec, "config": config, "torch_threads": 1},
        compute=ray.data.ActorPoolStrategy(size=2),
        batch_size=2,
        num_cpus=1,
    )
    out = sorted(dataset.take_all(), key=lambda row: row["prompt_id"])
    assert [row["prompt_id"] for row in out] == list(range(6))

    base = LlamaForCausalLM.from_pretrained(tiny_models.base).eval()
    merged = LlamaForCausalLM.from_pretrained(tiny_models.merged).eval()
    for row, prompt, responses in zip(out, PROMPTS, RESPONSES):
        want = naive_scores(base, merged, prompt_token_ids(smol_tokenizer, prompt),
                            [response_token_ids(smol_tokenizer, r) for r in responses], layers=(2, 4))
        for layer in (2, 4):
            assert list(row[f"latent_sim_{layer}"]) == pytest.approx(want["latent_sim"][layer], abs=1e-5)
        assert row["kl"][1] is None
        assert [row["kl"][0], row["kl"][2]] == pytest.approx([want["kl"][0], want["kl"][2]], rel=1e-4, abs=1e-7)
