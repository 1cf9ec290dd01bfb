"""The evaluation pipeline end to end on local Ray with a tiny model: shards, metrics, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.selection import argmin_index
from pipelines.evaluate import EvalConfig, add_arguments, config_from_args, run_evaluation
from pipelines.report import load_shards
from tests.reference import naive_scores

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


def write_prompts(path: Path, count: int) -> Path:
    with open(path, "w") as handle:
        for i in range(count):
            handle.write(json.dumps({"id": f"p{i:02d}", "prompt": f"Tell me about topic number {i}, please."}) + "\n")
    return path


def eval_args(tiny_models, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--prompts", str(prompts), "--base", tiny_models.base, "--adapter", tiny_models.adapter,
        "--n", "3", "--layers", "2,4", "--judge", "keyword", "--max-new-tokens", "6", "--seed", "1",
        "--out", str(out), "--no-progress", *extra,
    ]


def parse(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


# The scorer runs float32 forward passes on padded batches; the reference runs one unpadded
# sequence at a time with float64 metrics. Measured on the tiny models here the two differ by
# at most 2e-7 in cosine and 6e-6 relative in kl / self_certainty; a real defect is far larger:
# reading one position early moves a cosine by >= 2e-2 and the next layer by >= 1e-1 (METHOD.md
# measured padding reads up to 6e-3 on the 135M model). 1e-4 sits between the two.
SCORE_TOLERANCE = 1e-4
# A judge's P(unsafe) recomputed in other batches moves by <= 6e-8 (float32); the tiny guard
# model below gives pairs P(unsafe) values >= 1e-5 apart, and dropping the response prefix moves
# each by >= 1e-5. 1e-6 tells those apart.
JUDGE_SCORE_TOLERANCE = 1e-6


def plain(value):
    """A stored number with NaN as None (how a missing token metric may come back from Parquet)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def assert_stored_rows_recompute(run_dir: Path, tokenizer, tiny_models) -> int:
    """Recompute what a run stored from what it stored, independently of the pipeline, and
    return how many candidates were checked (every row: these runs are small).

    From the run's saved ``config.yaml``: the prompt ids are ``prompt_token_ids`` of the stored
    prompt with the run's prompt config; every response decodes from its stored ids; every
    ``latent_sim_<L>``, ``kl``, ``perplexity`` and ``self_certainty`` equals ``tests/reference.py``
    on the stored ids (base and the merged fine-tuned copy, loaded here); every verdict equals a
    freshly built judge of the run's judge config on the stored prompt and the response prefix +
    stored text (what ``JudgeWorker`` is given).
    """
    import pyarrow.parquet as pq
    import yaml
    from transformers import LlamaForCausalLM

    from actors.chat import prompt_token_ids
    from actors.config import build_config
    from actors.judge import build_judge

    config = build_config(EvalConfig, yaml.safe_load((run_dir / "config.yaml").read_text()))
    rows = [row for path in sorted((run_dir / "samples").glob("*.parquet")) for row in pq.read_table(path).to_pylist()]
    assert rows
    layers = config.scored_layers
    base = LlamaForCausalLM.from_pretrained(tiny_models.base).eval()
    merged = LlamaForCausalLM.from_pretrained(tiny_models.merged).eval()
    checked = 0
    for row in rows:
        where = row["prompt_id"]
        assert row["prompt_ids"] == prompt_token_ids(tokenizer, row["prompt"], config.prompt), where
        assert len(row["responses"]) == len(row["response_ids"]) == config.sampling.n, where
        assert row["responses"] == [tokenizer.decode(ids, skip_special_tokens=True) for ids in row["response_ids"]], where
        want = naive_scores(base, merged, row["prompt_ids"], row["response_ids"], layers)
        for layer in layers:
            assert row[f"latent_sim_{layer}"] == pytest.approx(want["latent_sim"][layer], abs=SCORE_TOLERANCE), (where, layer)
        for metric in ("kl", "perplexity", "self_certainty"):
            stored = [plain(value) for value in row[metric]]
            assert [value is None for value in stored] == [value is None for value in want[metric]], (where, metric)
            assert [v for v in stored if v is not None] == pytest.approx(
                [v for v in want[metric] if v is not None], rel=SCORE_TOLERANCE, abs=1e-9), (where, metric)
        checked += len(row["responses"])

    judge = build_judge(config.judge)
    prefix = config.prompt.response_prefix
    verdicts = judge.judge_candidates([row["prompt"] for row in rows],
                                      [[prefix + text for text in row["responses"]] for row in rows])
    for row, fresh in zip(rows, verdicts, strict=True):
        where = row["prompt_id"]
        assert row["judge_unsafe"] == [v.unsafe for v in fresh], where
        assert row["judge_raw"] == [v.raw for v in fresh], where
        assert row["judge_categories"] == [list(v.categories) for v in fresh], where
        stored_scores = [plain(value) for value in row["judge_score"]]
        assert [s is None for s in stored_scores] == [v.score is None for v in fresh], where
        assert [s for s in stored_scores if s is not None] == pytest.approx(
            [v.score for v in fresh if v.score is not None], abs=JUDGE_SCORE_TOLERANCE), where
    return checked


def test_pipeline_writes_shards_and_metrics_that_agree_with_them(ray_local, tiny_models, smol_tokenizer, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 10)
    args = parse(eval_args(tiny_models, prompts, tmp_path / "run", "--id-column", "id", "--set", "output.shard_size=4",
                           "--set", "report.bootstrap=50",
                           # two actors per stage; pools leave Ray a free CPU (RAY_NOTES Hang 1)
                           "--set", "resources.sampler={min_actors: 2, max_actors: 2, num_cpus: 0.5, batch_size: 2, torch_threads: 1}",
                           "--set", "resources.judge={min_actors: 2, max_actors: 2, num_cpus: 0.25, batch_size: 4}",
                           "--set", "resources.scorer={min_actors: 2, max_actors: 2, num_cpus: 0.5, batch_size: 2, torch_threads: 1}"))
    config = config_from_args(args)
    metrics = run_evaluation(config, progress=False)

    run_dir = tmp_path / "run"
    shards = sorted(p.name for p in (run_dir / "samples").glob("*.parquet"))
    assert shards == ["prompts-00000.parquet", "prompts-00001.parquet", "prompts-00002.parquet"]
    frame = load_shards(str(run_dir))
    assert sorted(frame["prompt_id"]) == [f"p{i:02d}" for i in range(10)]  # from --id-column
    for column in ("responses", "response_ids", "finish_reasons", "judge_unsafe", "judge_error", "latent_sim_2",
                   "latent_sim_4", "kl", "perplexity", "self_certainty", "prompt_ids"):
        assert column in frame.columns, column
    rows = frame.to_dict("records")
    assert all(len(row["responses"]) == 3 and len(row["latent_sim_4"]) == 3 for row in rows)

    # metrics agree exactly with what the shards imply
    (name,) = metrics["benchmarks"]
    asr = metrics["benchmarks"][name]["asr"]
    # single: the first non-empty sample (the one eligibility rule; index 0 unless it generated no token)
    first = [next((i for i, ids in enumerate(r["response_ids"]) if len(ids)), 0) for r in rows]
    assert asr["single"] == pytest.approx(sum(bool(r["judge_unsafe"][i]) for r, i in zip(rows, first)) / len(rows), abs=0)
    assert all(not any(r["judge_error"]) for r in rows)  # the keyword judge always parses
    for layer in (2, 4):
        chosen = [bool(r["judge_unsafe"][argmin_index(list(r[f"latent_sim_{layer}"]))]) for r in rows]
        assert asr[f"latent_sim_{layer}"] == pytest.approx(sum(chosen) / len(rows), abs=0)
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["benchmarks"][name]["asr"]["single"] == asr["single"]
    assert (run_dir / "report.md").is_file() and (run_dir / "config.yaml").is_file()
    assert json.loads((run_dir / "prompts.json").read_text())["benchmarks"]["prompts"] == {
        "benchmark": "prompts", "in_part": 10, "dropped_long": 0, "max_prompt_chars": None, "kept": 10}
    assert list((run_dir / "plots").rglob("*.png"))
    # every stored score and verdict is what an independent recomputation gives
    assert assert_stored_rows_recompute(run_dir, smol_tokenizer, tiny_models) == 10 * 3

    # a rerun with the same config has nothing left to do and changes no shard
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "samples").glob("*.parquet")}
    run_evaluation(config_from_args(args), progress=False)
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "samples").glob("*.parquet")} == stamps

    # and a different config is refused instead of mixing shards
    with pytest.raises(ValueError, match="different config"):
        run_evaluation(config_from_args(parse(eval_args(tiny_models, prompts, run_dir, "--set", "sampling.top_p=0.5"))))


def test_base_model_alone_skips_scoring(ray_local, tiny_models, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 3)
    argv = eval_args(tiny_models, prompts, tmp_path / "run")
    argv[argv.index("--adapter") : argv.index("--adapter") + 2] = []
    metrics = run_evaluation(config_from_args(parse(argv + ["--set", "report.bootstrap=0"])), progress=False)
    frame = load_shards(str(tmp_path / "run"))
    assert not [c for c in frame.columns if c.startswith("latent_sim_")]
    asr = metrics["benchmarks"]["prompts"]["asr"]
    assert "single" in asr and "random" in asr and not [k for k in asr if k.startswith("latent_sim")]


def test_killed_run_resumes_with_every_prompt_once(ray_local, tiny_models, smol_tokenizer, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 16)
    argv = eval_args(tiny_models, prompts, tmp_path / "run", "--set", "output.shard_size=2", "--set", "report.bootstrap=0",
                     "--set", "resources.sampler.batch_size=1", "--set", "resources.scorer.batch_size=1",
                     "--set", "resources.judge.batch_size=1", "--max-new-tokens", "120")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.evaluate", *argv], env=env, cwd=REPO,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = tmp_path / "run" / "samples"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and not list(samples.glob("*.parquet")):
            assert driver.poll() is None, "the driver exited before writing a shard"
            time.sleep(0.05)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
    written = {p.name: p.stat().st_mtime_ns for p in samples.glob("*.parquet")}
    assert 0 < len(written) < 8, f"expected an interrupted run, found {len(written)} of 8 shards"

    run_evaluation(config_from_args(parse(argv)), progress=False)
    frame = load_shards(str(tmp_path / "run"))
    assert sorted(frame["prompt_id"]) == [f"prompts-{i:04d}" for i in range(16)]  # each prompt exactly once
    after = {p.name: p.stat().st_mtime_ns for p in samples.glob("*.parquet")}
    assert len(after) == 8 and all(after[name] == stamp for name, stamp in written.items())
    # rows of the killed driver and of the resumed one alike recompute from what they stored
    assert assert_stored_rows_recompute(tmp_path / "run", smol_tokenizer, tiny_models) == 16 * 3


def test_config_errors_name_the_key_and_the_saved_config_holds_every_default(tiny_models, tmp_path):
    import yaml

    from actors.config import ConfigError, build_config, config_yaml
    from actors.runtime import check_pools

    with pytest.raises(ConfigError, match="resources.sampler.num_gpu: Extra inputs are not permitted"):
        build_config(EvalConfig, {"resources": {"sampler": {"num_gpu": 1}}})
    with pytest.raises(ConfigError, match="sampling.n: Input should be greater than or equal to 1"):
        build_config(EvalConfig, {"sampling": {"n": 0}})
    with pytest.raises(ConfigError, match="sampling.nn: Extra inputs are not permitted"):
        build_config(EvalConfig, {"sampling": {"nn": 2}})
    with pytest.raises(ConfigError, match="model.base: Field required"):
        build_config(EvalConfig, {"model": {"adapter": "x"}})
    with pytest.raises(ConfigError, match=r"benchmarks\[0\].limit: Input should be greater than or equal to 1"):
        build_config(EvalConfig, {"benchmarks": [{"name": "star1", "limit": 0}]})
    with pytest.raises(ConfigError, match="resources.scorer.num_gpus: asks for 1 GPU"):
        check_pools([("resources.scorer", build_config(EvalConfig, {"resources": {"scorer": {"num_gpus": 1}}}).resources.scorer)],
                    {"CPU": 2})
    config = build_config(EvalConfig, {}, ["sampling.n=8", "scoring.layers=[3, 1]"])
    assert config.sampling.n == 8 and config.scoring.layers == (1, 3)
    saved = yaml.safe_load(config_yaml(config))
    # every section with every default, so that a changed default shows as a different config
    assert saved["sampling"] == {"n": 8, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 256, "seed": 0}
    assert saved["benchmarks"] == [{**saved["benchmarks"][0], "name": "star1", "star1_split": "dev", "limit": None}]
    assert saved["judge"]["options"]["unfinished"] == "safe" and saved["generator"]["options"] == {"batch_prompts": 8}
    assert saved["prompt"] == {"system_prompt": None, "response_prefix": ""}
    assert build_config(EvalConfig, saved) == config


def test_stored_prompt_ids_scores_and_model_judge_verdicts_recompute_with_a_system_prompt_and_prefix(
        ray_local, tiny_models, smol_tokenizer, tmp_path):
    """A run whose prompt has a system prompt and a ``<think>`` prefix, judged by a model judge
    (a tiny random Llama with a Llama-Guard-3-shaped template: its P(unsafe) differs for every
    pair, so a verdict stored against the wrong pair, or judged without the prefix, shows)."""
    import copy

    from actors.config import build_config
    from tests.conftest import build_tiny_llama
    from tests.test_judge import GUARD_TEMPLATE

    guard_tokenizer = copy.deepcopy(smol_tokenizer)
    guard_tokenizer.chat_template = GUARD_TEMPLATE
    build_tiny_llama(guard_tokenizer, num_layers=2, seed=3).save_pretrained(tmp_path / "guard")
    guard_tokenizer.save_pretrained(tmp_path / "guard")
    prompts = write_prompts(tmp_path / "prompts.jsonl", 6)
    config = build_config(EvalConfig, {
        "model": {"base": tiny_models.base, "adapter": tiny_models.adapter},
        "prompt": {"system_prompt": "You answer briefly.", "response_prefix": "<think>\n"},
        "benchmarks": [{"name": "file", "path": str(prompts), "id_column": "id"}],
        "sampling": {"n": 3, "max_new_tokens": 8, "seed": 2},
        "judge": {"name": "llama_guard", "options": {"model": {"base": str(tmp_path / "guard")}, "max_new_tokens": 3,
                                                     "batch_size": 4, "on_parse_error": "unsafe"}},
        "scoring": {"layers": [1, 3]},
        "output": {"dir": str(tmp_path / "run"), "shard_size": 4},
        "report": {"bootstrap": 0},
        "resources": {"sampler": {"batch_size": 2, "torch_threads": 1}, "judge": {"batch_size": 4, "torch_threads": 1},
                      "scorer": {"batch_size": 2, "torch_threads": 1}},
    })
    run_evaluation(config, progress=False)
    assert assert_stored_rows_recompute(tmp_path / "run", smol_tokenizer, tiny_models) == 6 * 3
    frame = load_shards(str(tmp_path / "run"))
    scores = sorted(score for row in frame["judge_score"] for score in row)
    # a P(unsafe) of its own per pair, further apart than the check's tolerance: it can tell pairs apart
    assert len(scores) == 18 and min(b - a for a, b in zip(scores, scores[1:])) > JUDGE_SCORE_TOLERANCE
    for row in frame.to_dict("records"):  # the prompt the sampler saw: the system prompt, then the open reasoning
        shown = smol_tokenizer.decode(list(row["prompt_ids"]))
        assert "You answer briefly." in shown and shown.endswith("assistant\n<think>\n"), shown
