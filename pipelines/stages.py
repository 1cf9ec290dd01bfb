"""Stage bookkeeping of a distillation run: where each stage writes, and its ``stage.json`` stamp.

A stage's stamp records the config section its output depends on and the ``output_id`` of the
stage it read. ``prepare_stage`` decides from the stamp on disk whether a stage is skipped
(complete, same stamp), resumed (partial, same stamp) or refused (another stamp, unless
``--overwrite``); ``finish_stage`` marks it complete with a fresh ``output_id``, so that a stage
redone upstream invalidates everything after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from typing import Any, Literal

from actors import storage
from actors.config import ConfigError, changed_keys

STAGES: tuple[str, ...] = ("generate", "filter", "sft", "grpo")
Stage = Literal["generate", "filter", "sft", "grpo"]

CONFIG_FILE = "config.yaml"
STAGE_FILE = "stage.json"
TRACES_DIR = "traces"
FILTERED_DIR = "filtered"
SFT_DIR = "sft"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
GRPO_DIR = "grpo"




@dataclasses.dataclass(frozen=True)
class Output:
    """What a stage shows: progress bars, and Ray's own logs (``verbose``)."""

    progress: bool = True
    verbose: bool = False

    @property
    def train_log_level(self) -> str:
        """Ray Train's console log level."""
        return "INFO" if self.verbose else "WARNING"


@dataclasses.dataclass(frozen=True)
class StageDirs:
    """Where each stage writes in a run directory (a path or a storage URI)."""

    root: str

    def of(self, stage: str) -> str:
        """The directory holding ``stage``'s ``stage.json`` (and most of its output)."""
        return storage.join(self.root, {"generate": TRACES_DIR, "filter": FILTERED_DIR, "sft": SFT_DIR, "grpo": GRPO_DIR}[stage])

    def adapter(self, stage: str) -> str:
        """The adapter a training stage exports."""
        return storage.join(self.root, ADAPTER_DIR) if stage == "sft" else storage.join(self.of("grpo"), ADAPTER_DIR)

    def outputs(self, stage: str) -> list[str]:
        """Everything ``--overwrite`` removes for ``stage``."""
        extra = [self.adapter("sft")] if stage == "sft" else []
        return [self.of(stage), *extra]


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def read_stamp(directory: str) -> dict[str, Any] | None:
    """A stage's ``stage.json``, or ``None``."""
    location = storage.join(directory, STAGE_FILE)
    return storage.read_json(location) if storage.is_file(location) else None


def _write_stamp(directory: str, stamp: dict[str, Any]) -> None:
    storage.write_text(storage.join(directory, STAGE_FILE), json.dumps(stamp, indent=2, sort_keys=True))


def prepare_stage(section: dict[str, Any], stage: str, dirs: StageDirs, overwrite: bool) -> tuple[bool, dict[str, Any]]:
    """Decide whether ``stage`` runs: returns ``(skip, stamp)``.

    The stamp records the stage's config section (``section``: ``DistillConfig.stage_section``)
    and which output of the stage before it read (that stage's ``output_id``, new each time it
    completes). A complete stage with the same
    stamp is skipped; a partial one resumes; a different stamp is a ``ConfigError`` unless
    ``overwrite`` (which, like a plain ``overwrite``, removes the output).
    """
    index = STAGES.index(stage)
    upstream = "filter" if stage == "grpo" else (STAGES[index - 1] if index else None)
    input_digest = None
    if upstream is not None:
        previous = read_stamp(dirs.of(upstream))
        if not previous or not previous.get("complete"):
            raise ConfigError(f"stage {stage!r} reads the output of stage {upstream!r}, which {dirs.root} does not hold "
                              f"complete; run --stages {upstream} first")
        input_digest = previous["output_id"]
    if stage == "grpo":
        sft = read_stamp(dirs.of("sft"))
        if not sft or not sft.get("complete"):
            raise ConfigError(f"stage 'grpo' starts from the SFT adapter, and {dirs.root} has no complete sft stage; "
                              "run --stages sft first")
        input_digest = _digest([input_digest, sft["output_id"]])
    stamp = {"stage": stage, "config": section, "input": input_digest}
    stamp["digest"] = _digest([stamp["config"], stamp["input"]])
    existing = read_stamp(dirs.of(stage))
    if existing is not None and not overwrite:
        # Compared key by key, not by digest: a setting added to dabon since the stage ran, with
        # a null default, reads as absent and does not invalidate the stage.
        changed = changed_keys(existing.get("config"), stamp["config"])
        if changed or existing.get("input") != stamp["input"]:
            reason = f"config differs in {', '.join(changed)}" if changed else "it read another output of the stage before"
            raise ConfigError(f"stage {stage!r} in {dirs.root} was made differently ({reason}); "
                              "pass --overwrite to redo it, or use another output.dir")
        if existing.get("complete"):
            return True, existing
    if overwrite:
        for location in dirs.outputs(stage):
            storage.remove(location)
    _write_stamp(dirs.of(stage), {**stamp, "complete": False})
    return False, stamp


def finish_stage(dirs: StageDirs, stamp: dict[str, Any], summary: dict[str, Any]) -> None:
    """Mark a stage complete (its ``stage.json`` with ``complete: true``, a summary and a new
    ``output_id`` that the stages after it record as their input)."""
    _write_stamp(dirs.of(stamp["stage"]), {**stamp, "complete": True, "summary": summary, "output_id": uuid.uuid4().hex})
