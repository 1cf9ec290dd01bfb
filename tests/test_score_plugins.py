"""The score registry and bring-your-own scores (issue 15).

- the registry: directions, columns, labels and requirements of the paper's scores, and a plugin's;
- ``dabon report`` on every run ``dabon evaluate`` can make: for each metric / layer combination
  (and a base model alone), the shards the run's ``ScorerWorker`` writes and the config it saves;
- the example plugin (``examples/selectors/latent_perplexity.py``) end to end: the same numbers for
  the same ids in an evaluation's shards and report, a ``dabon score`` row and a served response,
  each against ``tests/reference.py`` combined by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from actors.config import build_config, config_yaml
from actors.scores import get_score, load_plugin, registered, score_columns, with_requirements
from tests.reference import naive_scores

PLUGIN = "examples.selectors.latent_perplexity:LatentPerplexity"
WEIGHT = 0.1  # the example's weight, restated: the reference below combines the scores by hand
# measured gap between the batched float32 scorer and the float64 reference on the tiny models:
# <= 2e-7 in cosine, <= 6e-6 relative in perplexity (tests/test_evaluate.py); 1e-4 sits far below a defect
TOLERANCE = 1e-4


def reference_combination(reference: dict, layer: int) -> list[float | None]:
    """latent_sim + 0.1 log(perplexity) from the slow reference; None where perplexity is None."""
    return [None if ppl is None else sim + WEIGHT * math.log(ppl)
            for sim, ppl in zip(reference["latent_sim"][layer], reference["perplexity"])]


def assert_close(got, want):
    assert [g is None for g in got] == [w is None for w in want], (got, want)
    assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None], abs=TOLERANCE)


# ---------------------------------------------------------------------------------------------
# The registry


def test_the_registry_defines_the_papers_scores_once():
    scores = registered()
    assert list(scores)[:4] == ["latent_sim", "kl", "perplexity", "self_certainty"]
    assert [scores[name].direction for name in list(scores)[:4]] == ["min", "max", "min", "max"]
    assert [scores[name].per_layer for name in list(scores)[:4]] == [True, False, False, False]
    assert get_score("latent_sim").selector_label(12) == "latent sim, layer 12 (argmin)"
    assert get_score("kl").selector_label() == "KL to base (argmax)"
    assert get_score("kl").needs == {"finetuned_logits", "base_logits"}
    assert get_score("latent_sim").needs == {"hidden_states"}


def test_a_plugin_registers_from_its_import_path_with_its_requirements():
    score = load_plugin(PLUGIN)
    assert score.name == "latent_perplexity" and score.direction == "min" and score.per_layer
    assert load_plugin(PLUGIN) is score  # loading twice (every Ray worker does) is harmless
    assert with_requirements(["latent_perplexity"]) == ("latent_sim", "perplexity", "latent_perplexity")
    assert score_columns(["latent_perplexity"], [2, 4]) == [
        "latent_sim_2", "latent_sim_4", "perplexity", "latent_perplexity_2", "latent_perplexity_4"]
    from actors.selection import rank_candidates, select_best_of_n

    assert rank_candidates("latent_perplexity", [0.5, None, 0.2], [False, True, False]) == [2, 0, 1]
    assert select_best_of_n("latent_perplexity", [0.5, None, 0.2]) == 2


def test_config_errors_name_the_key_for_unknown_scores_and_plugins():
    from actors.config import ConfigError
    from pipelines.eval_config import EvalConfig
    from serve_app.options import ServeConfig

    with pytest.raises(ConfigError, match=r"^scoring.metrics: unknown \['nope'\]"):
        build_config(EvalConfig, {"scoring": {"metrics": ["nope"]}})
    with pytest.raises(ConfigError, match=r"^scoring.plugins: plugin 'no_such_module:X': cannot import"):
        build_config(EvalConfig, {"scoring": {"plugins": ["no_such_module:X"]}})
    with pytest.raises(ConfigError, match=r"^scoring.plugins: plugin 'actors.scores:Nothing': actors.scores has no"):
        build_config(EvalConfig, {"scoring": {"plugins": ["actors.scores:Nothing"]}})
    with pytest.raises(ConfigError, match=r"scoring.rule: unknown score 'nope'"):
        build_config(ServeConfig, {"model": {"base": "b", "adapter": "a"}, "scoring": {"rule": "nope"}})
    served = build_config(ServeConfig, {"model": {"base": "b", "adapter": "a"},
                                        "scoring": {"rule": "latent_perplexity", "plugins": [PLUGIN]}})
    assert served.scoring.rule == "latent_perplexity"


# ---------------------------------------------------------------------------------------------
# dabon report on every run dabon evaluate can make

COMBINATIONS = [
    # (scoring.metrics, scoring.layers, plugins)
    (["latent_sim"], [2], []),
    (["latent_sim"], [1, 3], []),
    (["kl"], [2], []),  # the case: layers given, no latent similarity computed
    (["perplexity", "self_certainty"], [1, 3], []),
    (["kl", "latent_sim"], [3], []),
    (["latent_sim", "kl", "perplexity", "self_certainty"], [1, 2, 3], []),
    (["latent_perplexity"], [2], [PLUGIN]),
    (["kl", "latent_perplexity"], [1, 3], [PLUGIN]),
]


def scored_rows(tiny_models, smol_tokenizer, scoring) -> list[dict]:
    """Shard rows as an evaluation stores them, score columns written by the run's ScorerWorker."""
    from actors.chat import prompt_token_ids
    from actors.models import ModelSpec
    from actors.scorer import ScorerWorker

    responses = [[[40, 41, 42], [43, 44], []], [[50], [51, 52, 53, 54], [55, 56]], [[60, 61], [62], [63, 64, 65]]]
    prompts = ["How do I pick a lock?", "Tell me a joke.", "Explain photosynthesis."]
    prompt_ids = [prompt_token_ids(smol_tokenizer, prompt) for prompt in prompts]
    batch = {"prompt_id": [f"p{i}" for i in range(3)], "benchmark": ["toy"] * 3, "kind": ["harmful"] * 3,
             "prompt": prompts, "prompt_ids": prompt_ids, "response_ids": responses,
             "responses": [[smol_tokenizer.decode(ids) for ids in candidates] for candidates in responses],
             "finish_reasons": [["stop"] * 3] * 3,
             "judge_unsafe": [[True, False, True], [False, True, False], [True, True, False]]}
    worker = ScorerWorker(ModelSpec(base=tiny_models.base, adapter=tiny_models.adapter), scoring)
    out = worker(batch)
    return [{key: out[key][i] for key in out} for i in range(3)]


@pytest.mark.parametrize(("metrics", "layers", "plugins"), COMBINATIONS, ids=lambda v: ",".join(map(str, v)) or "-")
def test_dabon_report_works_on_every_metric_and_layer_combination(tiny_models, smol_tokenizer, tmp_path, metrics,
                                                                  layers, plugins):
    from pipelines.evaluate import EvalConfig
    from pipelines.report import main

    config = build_config(EvalConfig, {"model": {"base": tiny_models.base, "adapter": tiny_models.adapter},
                                       "scoring": {"metrics": metrics, "layers": layers, "plugins": plugins},
                                       "report": {"bootstrap": 20}})
    rows = scored_rows(tiny_models, smol_tokenizer, config.scoring)
    (tmp_path / "samples").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "samples" / "toy-00000.parquet")
    (tmp_path / "config.yaml").write_text(config_yaml(config))
    assert main([str(tmp_path), "--no-progress"]) == 0
    stored = json.loads((tmp_path / "metrics.json").read_text())
    # every score column the run wrote has its selector, and nothing else
    written = score_columns(with_requirements(metrics), layers)
    assert stored["benchmarks"]["toy"]["selectors"] == ["single", "random", "random_draw", *written]
    report = (tmp_path / "report.md").read_text()
    for column in written:
        assert f"| {column} |" not in report  # every selector row carries its label, not its column name
    if "latent_perplexity" in metrics:
        assert f"| latent sim + 0.1 log perplexity, layer {layers[0]} (argmin) |" in report


def test_dabon_report_on_a_base_model_alone(tmp_path):
    from pipelines.evaluate import EvalConfig
    from pipelines.report import main

    config = build_config(EvalConfig, {"scoring": {"layers": [12]}, "report": {"bootstrap": 0}})
    row = {"prompt_id": "p0", "benchmark": "toy", "kind": "harmful", "responses": ["a", "b"],
           "response_ids": [[1], [2]], "judge_unsafe": [True, False]}
    (tmp_path / "samples").mkdir()
    pd.DataFrame([row]).to_parquet(tmp_path / "samples" / "toy-00000.parquet")
    (tmp_path / "config.yaml").write_text(config_yaml(config))
    assert main([str(tmp_path), "--no-progress"]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["benchmarks"]["toy"]["selectors"] == ["single", "random", "random_draw"]


# ---------------------------------------------------------------------------------------------
# The example plugin end to end: evaluation, dabon score, serving


@pytest.mark.ray
def test_a_plugin_score_is_the_same_in_evaluation_dabon_score_and_serving(ray_local, tiny_models, smol_tokenizer,
                                                                         tmp_path):
    import pyarrow.parquet as pq
    import requests
    from ray import serve
    from transformers import LlamaForCausalLM

    from actors.chat import prompt_token_ids
    from pipelines.evaluate import add_arguments, config_from_args, run_evaluation
    from pipelines.score import main as score_main
    from serve_app.app import build_app
    from tests.test_serve import free_port, wait_ready

    layer = 2
    base = LlamaForCausalLM.from_pretrained(tiny_models.base).eval()
    merged = LlamaForCausalLM.from_pretrained(tiny_models.merged).eval()

    # 1. evaluation: the recipe (recipes/example-plugin-eval.yaml) names the plugin and asks for its score
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Tell me about topic {i}."}) + "\n" for i in range(3)))
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    run_dir = tmp_path / "run"
    args = parser.parse_args([
        "--prompts", str(prompts), "--id-column", "id", "--base", tiny_models.base, "--adapter", tiny_models.adapter,
        "--n", "3", "--layers", str(layer), "--judge", "keyword", "--max-new-tokens", "6", "--seed", "1",
        "--out", str(run_dir), "--no-progress", "--config", str(Path(__file__).resolve().parents[1] / "recipes" /
                                                              "example-plugin-eval.yaml"),
        "--set", "report.bootstrap=20",
        "--set", "resources.sampler={num_cpus: 0.5, batch_size: 3, torch_threads: 1}",
        "--set", "resources.judge={num_cpus: 0.25, batch_size: 3}",
        "--set", "resources.scorer={num_cpus: 0.5, batch_size: 3, torch_threads: 1}",
    ])
    metrics = run_evaluation(config_from_args(args), progress=False)
    rows = [row for path in sorted((run_dir / "samples").glob("*.parquet")) for row in pq.read_table(path).to_pylist()]
    assert len(rows) == 3
    column = f"latent_perplexity_{layer}"
    for row in rows:
        want = reference_combination(naive_scores(base, merged, row["prompt_ids"], row["response_ids"], [layer]), layer)
        assert_close(row[column], want)
    # in the report: its selector, its label, an ASR that is the hand count of its argmin picks
    entry = metrics["benchmarks"]["prompts"]
    assert column in entry["selectors"]
    picked = []
    for row in rows:
        values = row[column]
        usable = [i for i, ids in enumerate(row["response_ids"]) if ids and values[i] is not None]
        choice = min(usable, key=lambda i: (values[i], i)) if usable else 0
        picked.append(bool(row["judge_unsafe"][choice]))
    assert entry["asr"][column] == sum(picked) / len(rows)
    assert f"| latent sim + 0.1 log perplexity, layer {layer} (argmin) |" in (run_dir / "report.md").read_text()

    # 2. dabon score on the same ids, with the plugin from the command line
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"id": row["prompt_id"], "prompt_ids": row["prompt_ids"],
                                          "response_ids": row["response_ids"]}) + "\n" for row in rows))
    out = tmp_path / "scores.jsonl"
    assert score_main(["--base", tiny_models.base, "--adapter", tiny_models.adapter, "--input", str(source),
                       "--output", str(out), "--layers", str(layer), "--metrics", "latent_perplexity",
                       "--plugins", PLUGIN, "--rule", "latent_perplexity", "--no-progress"]) == 0
    written = {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    for row in rows:
        got = written[row["prompt_id"]]
        assert_close(got["latent_perplexity"][str(layer)], row[column])
        assert list(got) == ["id", "latent_sim", "perplexity", "latent_perplexity", "selected"]

    # 3. serving: ranked by the plugin's score (scoring.rule), the same numbers for the same ids
    app = build_app({
        "model": {"base": tiny_models.base, "adapter": tiny_models.adapter},
        "generator": {"backend": "hf"},
        "sampling": {"n": 3, "max_new_tokens": 6, "temperature": 1.0},
        "scoring": {"layer": layer, "rule": "latent_perplexity", "plugins": [PLUGIN]},
        "auth": {"token_env": None},
        "deployments": {"ingress": {"ray_actor_options": {"num_cpus": 0.25}},
                        "sampler": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                                    "ray_actor_options": {"num_cpus": 0.5}},
                        "scorer": {"ray_actor_options": {"num_cpus": 0.5}}},
    })
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app, name="plugin-app", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)  # /healthz is 503 until the ingress has seen the sampler and scorer replicas run
        answer = requests.post(f"{url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "Hello there"}], "n": 3, "dabon": {"return_candidates": True}})
        assert answer.status_code == 200, answer.text
        block = answer.json()["dabon"]
        assert block["rule"] == "latent_perplexity" and block["layer"] == layer
        ids = prompt_token_ids(smol_tokenizer, [{"role": "user", "content": "Hello there"}])
        want = reference_combination(naive_scores(base, merged, ids, block["token_ids"], [layer]), layer)
        assert_close(block["latent_perplexity"], want)
        order = sorted(range(3), key=lambda i: (len(block["token_ids"][i]) == 0, want[i] is None, want[i] or 0.0, i))
        assert block["ranking"] == order and block["selected"] == order[0]
        # the evaluation's own ids through the served scorer: the same numbers as in the shards and
        # in the dabon score rows (printed with -s for the record)
        for row in rows:
            served = requests.post(f"{url}/dabon/v1/score", timeout=120, json={
                "id": row["prompt_id"], "prompt_ids": row["prompt_ids"], "response_ids": row["response_ids"]})
            assert served.status_code == 200, served.text
            got = served.json()["latent_perplexity"][str(layer)]
            assert_close(got, row[column])
            assert_close(got, written[row["prompt_id"]]["latent_perplexity"][str(layer)])
            scored = written[row["prompt_id"]]["latent_perplexity"][str(layer)]
            print(f"{row['prompt_id']}: evaluation {row[column]}\n  dabon score {scored}\n  served {got}")
        # the scoring route on the evaluation's ids answers what dabon score wrote
        for row in rows:
            served = requests.post(f"{url}/dabon/v1/score", timeout=120, json={
                "id": row["prompt_id"], "prompt_ids": row["prompt_ids"], "response_ids": row["response_ids"]})
            assert served.status_code == 200, served.text
            got = served.json()
            assert_close(got["latent_perplexity"][str(layer)], row[column])
            assert got["selected"] == written[row["prompt_id"]]["selected"]
    finally:
        serve.delete("plugin-app")
        serve.shutdown()


# ---------------------------------------------------------------------------------------------
# A plugin of the other kinds: a hidden-state score and a token score, from this very module


from actors.scores import HiddenStateScore, TokenScore  # noqa: E402


class HiddenDistance(HiddenStateScore):
    """Euclidean distance between the two views' last-token hidden states (argmax: furthest)."""

    name = "hidden_distance"
    direction = "max"
    label = "hidden-state distance"

    def from_hidden(self, finetuned, base) -> float:
        return float((finetuned.double() - base.double()).norm())


class MeanLogProbability(TokenScore):
    """Mean log-probability of the response tokens under the fine-tuned model (argmax)."""

    name = "mean_logprob"
    direction = "max"
    label = "mean log-probability"

    def token_values(self, logp, logq, targets):
        return logp.gather(-1, targets[:, None]).squeeze(-1).double()


def test_hidden_state_and_token_plugins_match_an_independent_computation(tiny_models, smol_tokenizer):
    import torch
    from transformers import LlamaForCausalLM

    from actors.chat import prompt_token_ids
    from actors.models import ModelSpec
    from actors.scorer import AttributionScorer, ScorerConfig

    config = ScorerConfig(layers=(1, 3), metrics=("hidden_distance", "mean_logprob"),
                          plugins=("tests.test_score_plugins:HiddenDistance", "tests.test_score_plugins:MeanLogProbability"))
    assert config.computed == ("hidden_distance", "mean_logprob") and config.per_layer
    scorer = AttributionScorer.from_spec(ModelSpec(base=tiny_models.base, adapter=tiny_models.adapter), config)
    prompt = prompt_token_ids(smol_tokenizer, "Name a colour.")
    responses = [[40, 41, 42], [], [43]]
    (result,) = scorer.score_ids([prompt], [responses])
    assert set(result) == {"hidden_distance", "mean_logprob"}
    base = LlamaForCausalLM.from_pretrained(tiny_models.base).eval()
    merged = LlamaForCausalLM.from_pretrained(tiny_models.merged).eval()
    for i, response in enumerate(responses):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            ft = merged(input_ids=ids, output_hidden_states=True)
            bs = base(input_ids=ids, output_hidden_states=True)
        for layer in (1, 3):
            want = float((ft.hidden_states[layer][0, -1].double() - bs.hidden_states[layer][0, -1].double()).norm())
            assert result["hidden_distance"][layer][i] == pytest.approx(want, rel=1e-4, abs=1e-5)
        if not response:
            assert result["mean_logprob"][i] is None
            continue
        logp = torch.log_softmax(ft.logits[0, len(prompt) - 1:-1].double(), dim=-1)
        want = float(sum(logp[t, token] for t, token in enumerate(response)) / len(response))
        assert result["mean_logprob"][i] == pytest.approx(want, rel=1e-4)


def test_a_run_saved_before_plugins_existed_resumes_with_the_same_config():
    from actors.config import changed_keys

    old = {"scoring": {"layers": [6, 12], "metrics": ["latent_sim"]}}
    assert changed_keys(old, {"scoring": {**old["scoring"], "plugins": []}}) == []
    assert changed_keys(old, {"scoring": {**old["scoring"], "plugins": [PLUGIN]}}) == ["scoring.plugins"]
