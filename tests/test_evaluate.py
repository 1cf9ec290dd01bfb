"""The evaluation pipeline end to end on local Ray with a tiny model: shards, metrics, resume."""

from __future__ import annotations

import json
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


def test_pipeline_writes_shards_and_metrics_that_agree_with_them(ray_local, tiny_models, tmp_path):
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
    for column in ("responses", "response_ids", "finish_reasons", "judge_unsafe", "latent_sim_2", "latent_sim_4",
                   "kl", "perplexity", "self_certainty", "prompt_ids"):
        assert column in frame.columns, column
    rows = frame.to_dict("records")
    assert all(len(row["responses"]) == 3 and len(row["latent_sim_4"]) == 3 for row in rows)

    # metrics agree exactly with what the shards imply
    (name,) = metrics["benchmarks"]
    asr = metrics["benchmarks"][name]["asr"]
    assert asr["single"] == pytest.approx(sum(bool(r["judge_unsafe"][0]) for r in rows) / len(rows), abs=0)
    for layer in (2, 4):
        chosen = [bool(r["judge_unsafe"][argmin_index(list(r[f"latent_sim_{layer}"]))]) for r in rows]
        assert asr[f"latent_sim_{layer}"] == pytest.approx(sum(chosen) / len(rows), abs=0)
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["benchmarks"][name]["asr"]["single"] == asr["single"]
    assert (run_dir / "report.md").is_file() and (run_dir / "config.yaml").is_file()
    assert list((run_dir / "plots").rglob("*.png"))

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


def test_killed_run_resumes_with_every_prompt_once(ray_local, tiny_models, tmp_path):
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
