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
