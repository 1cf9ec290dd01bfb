"""AttributionScorer against the naive reference, and its invariances and performance design."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaForCausalLM

from actors.models import ModelSpec, load_models
from actors.scorer import METRICS, AttributionScorer, ScorerConfig, decoder_parts, last_real_index
from tests.reference import naive_scores

ALL_LAYERS = (0, 1, 2, 3, 4)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: one thread is fastest, and on a shared machine two threads that
    wait on each other made these tests ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference_models(tiny_models):
    base = LlamaForCausalLM.from_pretrained(tiny_models.base).eval()
    merged = LlamaForCausalLM.from_pretrained(tiny_models.merged).eval()
    return base, merged


@pytest.fixture(scope="module")
def adapter_bundle(tiny_models):
    return load_models(ModelSpec(base=tiny_models.base, adapter=tiny_models.adapter))


def make_cases(tokenizer, scorer, seed: int = 0):
    """Prompts with responses from empty to 300 tokens: text and raw random token ids."""
    rng = random.Random(seed)
    prompts = ["How do I bake bread?", "Tell me a long story about a lighthouse keeper and the sea, please.", "Hi"]
    texts = [
        ["Mix flour, water, yeast and salt.", "", "No.", "word " * 60],
        ["Once upon a time there was a keeper.", "I refuse to do that."],
        [""],
    ]
    prompt_ids = [scorer.encode_prompt(p) for p in prompts]
    response_ids = [[scorer.encode_response(t) for t in group] for group in texts]
    # exact ids that a tokenizer would never produce from text (random tokens), incl. a long one
    prompt_ids.append(scorer.encode_prompt("Random tokens follow."))
    response_ids.append([[rng.randrange(len(tokenizer)) for _ in range(n)] for n in (300, 1, 17, 2)])
    return prompt_ids, response_ids


def assert_close_scores(ours, theirs, latent_atol=1e-5, token_rtol=1e-5):
    for layer, values in theirs["latent_sim"].items():
        assert ours["latent_sim"][layer] == pytest.approx(values, abs=latent_atol), f"layer {layer}"
    for metric in ("kl", "perplexity", "self_certainty"):
        if metric not in ours:
            continue
        for a, b in zip(ours[metric], theirs[metric]):
            if b is None:
                assert a is None
            else:
                assert a == pytest.approx(b, rel=token_rtol, abs=1e-6), metric


def test_every_metric_matches_naive_reference(adapter_bundle, reference_models, smol_tokenizer):
    base, merged = reference_models
    scorer = AttributionScorer(adapter_bundle, ScorerConfig(layers=ALL_LAYERS, metrics=METRICS, batch_tokens=256))
    prompt_ids, response_ids = make_cases(smol_tokenizer, scorer)
    ours = scorer.score_ids(prompt_ids, response_ids)
    assert len(ours) == len(prompt_ids)
    for result, prompt, responses in zip(ours, prompt_ids, response_ids):
        assert_close_scores(result, naive_scores(base, merged, prompt, responses, ALL_LAYERS))
    # the adapter really changes the model, so these comparisons are not trivially 1.0 / 0.0
    assert min(ours[0]["latent_sim"][4]) < 0.999
    assert min(v for v in ours[0]["kl"] if v is not None) > 1e-4


def test_invariant_to_batch_size_order_and_padding_side(adapter_bundle, smol_tokenizer):
    config = dict(layers=(1, 3, 4), metrics=METRICS)
    wide = AttributionScorer(adapter_bundle, ScorerConfig(**config, batch_tokens=100_000))
    prompt_ids, response_ids = make_cases(smol_tokenizer, wide)
    reference = wide.score_ids(prompt_ids, response_ids)

    narrow = AttributionScorer(adapter_bundle, ScorerConfig(**config, batch_tokens=8, max_batch_rows=1))
    for ours, theirs in zip(narrow.score_ids(prompt_ids, response_ids), reference):
        assert_close_scores(ours, theirs, latent_atol=1e-6, token_rtol=1e-6)

    # candidate order: results permute with the candidates
    permutations = [list(reversed(range(len(r)))) for r in response_ids]
    shuffled = [[r[i] for i in perm] for r, perm in zip(response_ids, permutations)]
    for ours, theirs, perm in zip(wide.score_ids(prompt_ids, shuffled), reference, permutations):
        for layer in config["layers"]:
            assert ours["latent_sim"][layer] == pytest.approx([theirs["latent_sim"][layer][i] for i in perm], abs=1e-6)
        assert [v is None for v in ours["kl"]] == [theirs["kl"][i] is None for i in perm]

    # the tokenizer's padding side must not matter: the scorer pads on its own and gathers by mask
    original = smol_tokenizer.padding_side
    try:
        for side in ("left", "right"):
            smol_tokenizer.padding_side = side
            for ours, theirs in zip(wide.score_ids(prompt_ids, response_ids), reference):
                assert_close_scores(ours, theirs, latent_atol=1e-6, token_rtol=1e-6)
    finally:
        smol_tokenizer.padding_side = original

    # and one prompt scored alone equals the same prompt scored among others
    alone = wide.score_ids(prompt_ids[3:], response_ids[3:])[0]
    assert_close_scores(alone, reference[3], latent_atol=1e-6, token_rtol=1e-6)


def test_last_real_index_for_both_padding_sides():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    both = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]])
    assert last_real_index(right).tolist() == [2, 4, 0]
    assert last_real_index(left).tolist() == [4, 4, 4]
    assert last_real_index(both).tolist() == [2, 3]


def test_adapter_and_merged_finetuned_give_the_same_scores(adapter_bundle, tiny_models, smol_tokenizer):
    config = ScorerConfig(layers=(2, 4), metrics=METRICS)
    with_adapter = AttributionScorer(adapter_bundle, config)
    merged = AttributionScorer(load_models(ModelSpec(base=tiny_models.base, finetuned=tiny_models.merged)), config)
    prompt_ids, response_ids = make_cases(smol_tokenizer, with_adapter, seed=1)
    for a, b in zip(with_adapter.score_ids(prompt_ids, response_ids), merged.score_ids(prompt_ids, response_ids)):
        assert_close_scores(a, b, latent_atol=1e-5, token_rtol=1e-4)


def test_a_model_against_itself_has_zero_kl_and_unit_similarity(tiny_models, smol_tokenizer):
    bundle = load_models(ModelSpec(base=tiny_models.base, finetuned=tiny_models.base))
    scorer = AttributionScorer(bundle, ScorerConfig(layers=(1, 4), metrics=("latent_sim", "kl")))
    prompt_ids, response_ids = make_cases(smol_tokenizer, scorer)
    for result in scorer.score_ids(prompt_ids, response_ids):
        for layer in (1, 4):
            assert result["latent_sim"][layer] == pytest.approx([1.0] * len(result["kl"]), abs=1e-6)
        for value in result["kl"]:
            assert value is None or abs(value) < 1e-7


def test_latent_only_stops_at_the_deepest_layer_and_runs_each_prompt_once(adapter_bundle, smol_tokenizer):
    scorer = AttributionScorer(adapter_bundle, ScorerConfig(layers=(2,), metrics=("latent_sim",)))
    layers, norm, head = decoder_parts(adapter_bundle.model)
    calls = {"layer1": 0, "layer2": 0, "norm": 0, "head": 0}
    tokens_into_first_layer = []
    hooks = [
        layers[0].register_forward_pre_hook(lambda m, args: tokens_into_first_layer.append(args[0].shape[:2])),
        layers[1].register_forward_hook(lambda *a: calls.__setitem__("layer1", calls["layer1"] + 1)),
        layers[2].register_forward_hook(lambda *a: calls.__setitem__("layer2", calls["layer2"] + 1)),
        norm.register_forward_hook(lambda *a: calls.__setitem__("norm", calls["norm"] + 1)),
        head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1)),
    ]
    try:
        prompt = scorer.encode_prompt("How do I bake bread?")
        responses = [scorer.encode_response(t) for t in ("Mix flour.", "Knead the dough well.", "No.")]
        scorer.score_ids([prompt], [responses])
    finally:
        for hook in hooks:
            hook.remove()
    assert calls["layer1"] > 0
    assert calls == {"layer1": calls["layer1"], "layer2": 0, "norm": 0, "head": 0}
    # per view: the prompt runs once; then each candidate once, carrying only its response tokens
    shapes = [tuple(s) for s in tokens_into_first_layer]
    longest = max(len(r) for r in responses)
    assert longest < len(prompt)
    assert shapes.count((1, len(prompt))) == 2
    candidate_passes = [s for s in shapes if s != (1, len(prompt))]
    assert all(width <= longest for _, width in candidate_passes)
    assert sum(rows for rows, _ in candidate_passes) == 2 * len(responses)


def test_token_metrics_use_the_head_only_on_predicting_positions(adapter_bundle):
    scorer = AttributionScorer(adapter_bundle, ScorerConfig(layers=(1,), metrics=("perplexity",)))
    _, _, head = decoder_parts(adapter_bundle.model)
    rows_through_head = []
    hook = head.register_forward_hook(lambda m, args, out: rows_through_head.append(args[0].shape[0]))
    try:
        prompt = scorer.encode_prompt("Hello there")
        responses = [scorer.encode_response(t) for t in ("A short one.", "A somewhat longer response here.")]
        scorer._head_checked = True  # the one-off head self-check runs a probe through the head
        result = scorer.score_ids([prompt], [responses])[0]
    finally:
        hook.remove()
    assert sum(rows_through_head) == sum(len(r) for r in responses)
    assert "kl" not in result and "latent_sim" not in result and len(result["perplexity"]) == 2


def test_bad_configuration_is_refused(adapter_bundle, tiny_models):
    with pytest.raises(ValueError, match="layers"):
        AttributionScorer(adapter_bundle, ScorerConfig(layers=(5,)))
    with pytest.raises(ValueError, match="metrics"):
        ScorerConfig(metrics=("latent_sim", "entropy"))
    with pytest.raises(ValueError, match="fine-tuned"):
        AttributionScorer(load_models(ModelSpec(base=tiny_models.base)))
    scorer = AttributionScorer(adapter_bundle, ScorerConfig(layers=(1,)))
    with pytest.raises(ValueError, match="exceed"):
        scorer.score_ids([[1, 2, 3]], [[[5] * 1100]])
    with pytest.raises(ValueError, match="empty prompt"):
        scorer.score_ids([[]], [[[5]]])


# ---------------------------------------------------------------------------- sliding windows

WINDOW = 5
# mixed sliding/full starting with a sliding layer (Gemma-3), all sliding with no layer_types in
# the config (Mistral), mixed starting with a full layer (Qwen2's max_window_layers)
SLIDING_FAMILIES = ("gemma3", "mistral", "qwen2")


def build_sliding_model(family: str, tokenizer, window: int = WINDOW, seed: int = 0, **overrides):
    """A tiny randomly initialised causal LM of ``family`` with a ``window``-token sliding window."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    common.update(overrides)
    if family == "gemma3":
        config = Gemma3TextConfig(
            **common, head_dim=16, query_pre_attn_scalar=16, sliding_window=window,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        )
        return Gemma3ForCausalLM(config).eval()
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=window)).eval()
    if family == "qwen2":
        config = Qwen2Config(**common, use_sliding_window=True, sliding_window=window, max_window_layers=1)
        return Qwen2ForCausalLM(config).eval()
    raise ValueError(f"family: unknown {family!r}")


@pytest.fixture(scope="module", params=SLIDING_FAMILIES)
def sliding_models(request, tmp_path_factory, smol_tokenizer):
    """(family, base dir, adapter dir, merged dir) of a tiny sliding-window model with a random LoRA."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import add_random_lora

    family = request.param
    root = tmp_path_factory.mktemp(f"sliding-{family}")
    build_sliding_model(family, smol_tokenizer).save_pretrained(root / "base")
    smol_tokenizer.save_pretrained(root / "base")
    peft_model = add_random_lora(AutoModelForCausalLM.from_pretrained(root / "base"))
    peft_model.save_pretrained(root / "adapter")
    peft_model.merge_and_unload().save_pretrained(root / "merged")
    return family, str(root / "base"), str(root / "adapter"), str(root / "merged")


def make_sliding_cases(tokenizer, scorer, seed: int = 0):
    """Prompts and responses shorter and much longer than the window, crossing it at many offsets."""
    rng = random.Random(seed)
    prompt_ids = [scorer.encode_prompt("Tell me a long story about a lighthouse keeper and the sea, please.")]
    prompt_ids += [[rng.randrange(len(tokenizer)) for _ in range(n)] for n in (1, 3, WINDOW, 9, 23)]
    lengths = [(0, 2, 17), (1, 4, 13, 0), (2, 7), (WINDOW - 1, WINDOW, WINDOW + 1), (0, 31), (1, 3, 12)]
    response_ids = [[[rng.randrange(len(tokenizer)) for _ in range(n)] for n in group] for group in lengths]
    return prompt_ids, response_ids


def test_sliding_window_models_match_naive_reference(sliding_models, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    family, base_dir, adapter_dir, merged_dir = sliding_models
    bundle = load_models(ModelSpec(base=base_dir, adapter=adapter_dir))
    assert bundle.model.config.get_text_config().sliding_window == WINDOW
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    # one prompt per batch, and everything in one padded batch (prompt caches re-padded per batch)
    narrow = AttributionScorer(bundle, ScorerConfig(layers=ALL_LAYERS, metrics=METRICS, batch_tokens=8, max_batch_rows=1))
    wide = AttributionScorer(bundle, ScorerConfig(layers=ALL_LAYERS, metrics=METRICS, batch_tokens=100_000, max_padding=0.99))
    prompt_ids, response_ids = make_sliding_cases(smol_tokenizer, narrow)
    assert max(len(p) + max(len(r) for r in rs) for p, rs in zip(prompt_ids, response_ids)) > 6 * WINDOW
    references = [naive_scores(base, merged, p, rs, ALL_LAYERS) for p, rs in zip(prompt_ids, response_ids)]
    for scorer in (narrow, wide):
        for ours, theirs in zip(scorer.score_ids(prompt_ids, response_ids), references):
            assert_close_scores(ours, theirs)

    # the window really shapes these numbers: the same weights without it score differently
    open_base = AutoModelForCausalLM.from_pretrained(base_dir, sliding_window=10_000).eval()
    open_merged = AutoModelForCausalLM.from_pretrained(merged_dir, sliding_window=10_000).eval()
    unwindowed = naive_scores(open_base, open_merged, prompt_ids[0], response_ids[0], ALL_LAYERS)
    assert max(abs(a - b) for a, b in zip(unwindowed["latent_sim"][4], references[0]["latent_sim"][4])) > 1e-3
    assert max(abs(a - b) for a, b in zip(unwindowed["kl"][1:], references[0]["kl"][1:])) > 1e-4


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_reference_applies_the_window_of_a_sliding_first_layer(family, smol_tokenizer):
    """An obvious check of the reference's full forward: the first layer's output at the last
    token depends on exactly the last WINDOW tokens (fed alone, at their true positions)."""
    model = build_sliding_model(family, smol_tokenizer)
    ids = torch.tensor([random.Random(3).choices(range(len(smol_tokenizer)), k=4 * WINDOW)])
    length = ids.shape[1]

    def first_layer_last_token(keep: int):
        with torch.no_grad():
            out = model(input_ids=ids[:, -keep:], position_ids=torch.arange(length - keep, length)[None],
                        output_hidden_states=True, use_cache=False)
        return out.hidden_states[1][0, -1]

    full = first_layer_last_token(length)
    assert torch.allclose(first_layer_last_token(WINDOW), full, atol=1e-6)
    assert not torch.allclose(first_layer_last_token(WINDOW - 1), full, atol=1e-3)


def _save_config_only(config, path):
    """A model directory holding only a config: loading its weights would fail."""
    config.save_pretrained(path)
    return str(path)


def test_models_that_cannot_be_scored_exactly_are_refused_before_loading(tmp_path, tiny_models, smol_tokenizer):
    from transformers import Gemma3TextConfig, Qwen3NextConfig

    from actors.models import UnsupportedModelError, check_scorable
    from actors.scorer import UnsupportedModelError as ScorerUnsupportedModelError

    assert ScorerUnsupportedModelError is UnsupportedModelError
    linear = Qwen3NextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    )
    bidirectional = Gemma3TextConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, use_bidirectional_attention=True)
    cases = {
        "linear_attention": _save_config_only(linear, tmp_path / "linear"),
        "bidirectional": _save_config_only(bidirectional, tmp_path / "bidirectional"),
    }
    for reason, directory in cases.items():
        spec = ModelSpec(base=directory, adapter=tiny_models.adapter)
        with pytest.raises(UnsupportedModelError, match=rf"model\.base: .*{directory}.*cannot be scored: .*{reason}"):
            check_scorable(spec)
        # from_spec refuses from the config alone: the directory has no weights to load
        with pytest.raises(UnsupportedModelError, match=reason):
            AttributionScorer.from_spec(spec)
        with pytest.raises(UnsupportedModelError, match=r"finetuned"):
            check_scorable(ModelSpec(base=tiny_models.base, finetuned=directory), "judge.options.model")

    # sliding-window and plain models pass
    for family in SLIDING_FAMILIES:
        check_scorable(ModelSpec(base=_save_config_only(build_sliding_model(family, smol_tokenizer).config, tmp_path / family)))
    check_scorable(ModelSpec(base=tiny_models.base, adapter=tiny_models.adapter))


def test_a_loaded_bundle_that_cannot_be_scored_exactly_is_refused(smol_tokenizer, tiny_models):
    from actors.models import ModelBundle, UnsupportedModelError

    bidirectional = build_sliding_model("gemma3", smol_tokenizer, use_bidirectional_attention=True)
    plain = LlamaForCausalLM.from_pretrained(tiny_models.base).eval()
    spec = ModelSpec(base=tiny_models.base, finetuned="bidirectional-gemma")
    with pytest.raises(UnsupportedModelError, match=r"'bidirectional-gemma' \(Gemma3ForCausalLM\) cannot be scored: .*bidirectional"):
        AttributionScorer(ModelBundle(spec, smol_tokenizer, bidirectional, plain, "cpu"), ScorerConfig(layers=(1,)))
