"""Stage bookkeeping of a distillation run (``pipelines.stages``): skip, resume, refuse, chain.

Pure logic on a local directory: no Ray, no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.config import ConfigError
from pipelines.stages import StageDirs, finish_stage, prepare_stage

GENERATE = {"data": {"name": "star1", "max_prompts": 8}}
FILTER = {"judge": {"name": "keyword"}}


def stamp_on_disk(dirs: StageDirs, stage: str) -> dict:
    return json.loads((Path(dirs.of(stage)) / "stage.json").read_text())


def test_first_stage_runs_then_is_skipped_once_complete(tmp_path):
    dirs = StageDirs(str(tmp_path))
    skip, stamp = prepare_stage(GENERATE, "generate", dirs, overwrite=False)
    assert not skip and stamp["input"] is None
    # a partial stage (crashed before finish_stage) resumes: same stamp, not skipped
    skip, again = prepare_stage(GENERATE, "generate", dirs, overwrite=False)
    assert not skip and again["digest"] == stamp["digest"]
    assert stamp_on_disk(dirs, "generate")["complete"] is False
    finish_stage(dirs, stamp, {"prompts": 8})
    skip, done = prepare_stage(GENERATE, "generate", dirs, overwrite=False)
    assert skip and done["summary"] == {"prompts": 8} and done["complete"] is True


def test_a_changed_section_is_refused_until_overwrite(tmp_path):
    dirs = StageDirs(str(tmp_path))
    _, stamp = prepare_stage(GENERATE, "generate", dirs, overwrite=False)
    finish_stage(dirs, stamp, {})
    (tmp_path / "traces" / "shard.parquet").write_text("old output")
    changed = {"data": {"name": "star1", "max_prompts": 16}}
    with pytest.raises(ConfigError, match=r"stage 'generate' .*config differs in data\.max_prompts.*--overwrite"):
        prepare_stage(changed, "generate", dirs, overwrite=False)
    skip, _ = prepare_stage(changed, "generate", dirs, overwrite=True)
    assert not skip and not (tmp_path / "traces" / "shard.parquet").exists()


def test_a_null_setting_added_later_is_the_same_stage(tmp_path):
    dirs = StageDirs(str(tmp_path))
    _, stamp = prepare_stage(GENERATE, "generate", dirs, overwrite=False)
    finish_stage(dirs, stamp, {})
    newer = {"data": {**GENERATE["data"], "max_prompt_chars": None}}
    assert prepare_stage(newer, "generate", dirs, overwrite=False)[0]


def test_a_stage_needs_its_upstream_complete_and_records_which_output_it_read(tmp_path):
    dirs = StageDirs(str(tmp_path))
    with pytest.raises(ConfigError, match="stage 'filter' reads the output of stage 'generate'.*--stages generate"):
        prepare_stage(FILTER, "filter", dirs, overwrite=False)
    _, generate = prepare_stage(GENERATE, "generate", dirs, overwrite=False)
    finish_stage(dirs, generate, {})
    first_output = stamp_on_disk(dirs, "generate")["output_id"]
    _, filtered = prepare_stage(FILTER, "filter", dirs, overwrite=False)
    assert filtered["input"] == first_output
    finish_stage(dirs, filtered, {})
    # generate redone: filter read another output, so it is refused until --overwrite
    _, redo = prepare_stage(GENERATE, "generate", dirs, overwrite=True)
    finish_stage(dirs, redo, {})
    assert stamp_on_disk(dirs, "generate")["output_id"] != first_output
    with pytest.raises(ConfigError, match="it read another output of the stage before"):
        prepare_stage(FILTER, "filter", dirs, overwrite=False)


def test_grpo_needs_filter_and_sft(tmp_path):
    dirs = StageDirs(str(tmp_path))
    for stage, section in (("generate", GENERATE), ("filter", FILTER)):
        _, stamp = prepare_stage(section, stage, dirs, overwrite=False)
        finish_stage(dirs, stamp, {})
    with pytest.raises(ConfigError, match="stage 'grpo' starts from the SFT adapter.*--stages sft"):
        prepare_stage({"grpo": {}}, "grpo", dirs, overwrite=False)
    _, sft = prepare_stage({"sft": {}}, "sft", dirs, overwrite=False)
    finish_stage(dirs, sft, {})
    skip, grpo = prepare_stage({"grpo": {}}, "grpo", dirs, overwrite=False)
    assert not skip and grpo["input"] not in (None, stamp_on_disk(dirs, "sft")["output_id"])


def test_stage_directories():
    dirs = StageDirs("runs/x")
    assert [dirs.of(stage) for stage in ("generate", "filter", "sft", "grpo")] == [
        "runs/x/traces", "runs/x/filtered", "runs/x/sft", "runs/x/grpo"]
    assert dirs.adapter("sft") == "runs/x/adapter" and dirs.adapter("grpo") == "runs/x/grpo/adapter"
    assert dirs.outputs("sft") == ["runs/x/sft", "runs/x/adapter"]
