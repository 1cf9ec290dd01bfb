"""The packaged SmolLM2-135M-Instruct: GGUF materialisation and ``dabon score`` against the naive reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.models import EMBEDDED_ALIAS, embedded_gguf_path, local_model_dir, write_random_adapter
from pipelines.cli import main
from tests.reference import naive_scores

pytestmark = pytest.mark.embedded
REPO = Path(__file__).resolve().parents[1]


def test_concurrent_first_use_materialises_one_trainable_copy(tmp_path):
    """Two processes materialise the GGUF into an empty cache at once; both get the same, complete copy."""
    env = {**os.environ, "DABON_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    code = "from actors.models import local_model_dir; print(local_model_dir('smollm2-135m-instruct'))"
    workers = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=300)[0].strip() for worker in workers]
    assert all(worker.returncode == 0 for worker in workers)
    assert outputs[0] == outputs[1]
    target = Path(outputs[0])
    assert (target / ".complete").is_file()
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir() if p.name.startswith("gguf-") and p.is_dir()] == [target.name]

    model = AutoModelForCausalLM.from_pretrained(target)
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576

    gguf = embedded_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1012, 30]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, atol=1e-4, rtol=1e-4)


def test_dabon_score_matches_the_naive_computation(tmp_path, smol_tokenizer):
    """Acceptance: latent similarity at layers 6, 12, 30 (1e-4) and token metrics (1e-3 relative),
    SmolLM2 with a LoRA adapter, responses from empty to ~300 tokens in one batch."""
    adapter = write_random_adapter(EMBEDDED_ALIAS, tmp_path / "adapter", seed=3)
    star = "I cannot help with that request, because it could hurt people. " * 25
    responses = [
        "",
        "No.",
        "Sure. Preheat the oven to 220 C, knead the dough for ten minutes and let it rise for an hour.",
        smol_tokenizer.decode(smol_tokenizer(star, add_special_tokens=False)["input_ids"][:300]),
    ]
    rows = [{"id": 1, "prompt": "How do I bake bread at home?", "responses": responses}]
    (tmp_path / "in.jsonl").write_text(json.dumps(rows[0]) + "\n")
    code = main([
        "score", "--base", EMBEDDED_ALIAS, "--adapter", str(adapter), "--input", str(tmp_path / "in.jsonl"),
        "--output", str(tmp_path / "out.jsonl"), "--layers", "6,12,30",
        "--metrics", "latent_sim,kl,perplexity,self_certainty", "--no-progress",
    ])
    assert code == 0
    (produced,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]

    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(local_model_dir(EMBEDDED_ALIAS)).eval()
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(local_model_dir(EMBEDDED_ALIAS)), str(adapter)
    ).merge_and_unload().eval()
    prompt = smol_tokenizer.apply_chat_template(
        [{"role": "user", "content": rows[0]["prompt"]}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = smol_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = [smol_tokenizer(r, add_special_tokens=False)["input_ids"] if r else [] for r in responses]
    assert max(len(r) for r in response_ids) >= 290
    expected = naive_scores(base, merged, prompt_ids, response_ids, (6, 12, 30))

    for layer in (6, 12, 30):
        assert produced["latent_sim"][str(layer)] == pytest.approx(expected["latent_sim"][layer], abs=1e-4)
    for metric in ("kl", "perplexity", "self_certainty"):
        assert produced[metric][0] is None
        assert produced[metric][1:] == pytest.approx(expected[metric][1:], rel=1e-3)
    # the random adapter moves the model, so the comparison is not of constants
    assert min(produced["latent_sim"]["12"]) < 0.99999
