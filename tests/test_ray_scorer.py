"""The thin Ray wrappers of the scorer: a Ray Data actor pool and a plain actor, on local Ray."""

from __future__ import annotations

import pytest

from actors.models import ModelSpec
from actors.scorer import AttributionScorer, ScorerConfig, ScorerWorker, scorer_actor

pytestmark = pytest.mark.ray

PROMPTS = [f"Question number {i}: how do I do task {i}?" for i in range(6)]
RESPONSES = [[f"Answer {i}.", "", "I can't help with that."] for i in range(6)]


def test_map_batches_with_an_actor_pool_adds_score_columns(ray_local, tiny_models):
    import ray

    spec = ModelSpec(base=tiny_models.base, adapter=tiny_models.adapter).model_dump()
    config = ScorerConfig(layers=(2, 4), metrics=("latent_sim", "kl")).model_dump()
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

    scorer = AttributionScorer.from_spec(spec, config)
    expected = scorer.score_batch(PROMPTS, RESPONSES)
    for row, want in zip(out, expected):
        for layer in (2, 4):
            assert list(row[f"latent_sim_{layer}"]) == pytest.approx(want["latent_sim"][layer], abs=1e-6)
        assert row["kl"][1] is None
        assert [row["kl"][0], row["kl"][2]] == pytest.approx([want["kl"][0], want["kl"][2]], rel=1e-5)


def test_scorer_actor(ray_local, tiny_models):
    import ray

    actor = scorer_actor(num_cpus=1).remote(
        ModelSpec(base=tiny_models.base, adapter=tiny_models.adapter), ScorerConfig(layers=(4,)), torch_threads=1
    )
    (result,) = ray.get(actor.score_batch.remote(PROMPTS[:1], RESPONSES[:1]))
    assert len(result["latent_sim"][4]) == 3
    ray.kill(actor)
