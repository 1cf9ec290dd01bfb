"""Shared fixtures: tiny real Llama models, the packaged SmolLM2 tokenizer, a local Ray cluster."""

from __future__ import annotations

import os

# Before anything imports ray or transformers (RAY_NOTES.md, "Test settings that worked").
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses
from pathlib import Path

import pytest


def running_in_ci() -> bool:
    """True when the ``CI`` environment variable says so (``CI=true``, as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.needs_file(path, reason=...)``: a test that reads a local data file (the
    copies in ../shared/data) skips when the file is missing, except under ``CI=true``, where a
    missing file fails the test: CI must not pass by skipping the checks on real data."""
    for marker in item.iter_markers(name="needs_file"):
        if not marker.args:
            raise pytest.UsageError(f"{item.nodeid}: needs_file: expected the path of the file as its first argument")
        path = Path(marker.args[0])
        if path.is_file():
            continue
        what = marker.kwargs.get("reason") or "a data file"
        message = f"{what}: {path} is missing"
        if running_in_ci():
            pytest.fail(f"CI=true and {message} (put the file there, or point the test at it)", pytrace=False)
        pytest.skip(message)


@dataclasses.dataclass(frozen=True)
class TinyModels:
    """Paths of a tiny random Llama base, a LoRA adapter on it, and the merged fine-tuned copy."""

    base: str
    adapter: str
    merged: str
    num_layers: int


def build_tiny_llama(tokenizer, num_layers: int = 4, hidden: int = 64, seed: int = 0):
    """A randomly initialised Llama sized for tests, using the real tokenizer's vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def add_random_lora(model, seed: int = 1, targets=("q_proj", "v_proj", "up_proj", "down_proj"), std: float = 0.3):
    """Wrap ``model`` in a peft LoRA whose B matrices are random, so the adapter changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(targets)))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)
    return peft_model.eval()


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The real SmolLM2 tokenizer (with its chat template) from the packaged GGUF."""
    from actors.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smol_tokenizer) -> TinyModels:
    """A tiny base model, a random LoRA adapter and the merged model, saved to disk once."""
    root = tmp_path_factory.mktemp("tiny")
    base = build_tiny_llama(smol_tokenizer)
    base.save_pretrained(root / "base")
    smol_tokenizer.save_pretrained(root / "base")
    from transformers import LlamaForCausalLM

    peft_model = add_random_lora(LlamaForCausalLM.from_pretrained(root / "base"))
    peft_model.save_pretrained(root / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(root / "merged")
    smol_tokenizer.save_pretrained(root / "merged")
    return TinyModels(str(root / "base"), str(root / "adapter"), str(root / "merged"), base.config.num_hidden_layers)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, with more logical CPUs than actor pools take (Hang 1)."""
    import ray

    ray.init(
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=512 * 1024 * 1024,
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
            }
        },
    )
    yield ray
    ray.shutdown()
