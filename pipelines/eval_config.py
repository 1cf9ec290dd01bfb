"""The typed config of one evaluation run (``EvalConfig``), apart from the driver that runs it, so
that ``pipelines.report`` validates a run's saved ``config.yaml`` as the very type that wrote it.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from actors.config import LightPoolConfig, PoolConfig, PromptConfig, RayConfig, ReportConfig, Strict
from actors.judge import JudgeConfig, RefusalJudgeConfig
from actors.models import EMBEDDED_ALIAS, ModelSpec
from actors.sampler import GeneratorConfig, SamplingConfig
from actors.scorer import ScorerConfig
from pipelines.data import BenchmarkSpec

CONFIG_FILE = "config.yaml"
SAMPLES_DIR = "samples"


class EvalScoringConfig(ScorerConfig):
    """Scoring in an evaluation: every metric and a few layers by default (the report compares them)."""

    layers: tuple[int, ...] = (6, 12)
    metrics: tuple[str, ...] = ("latent_sim", "kl", "perplexity", "self_certainty")


class Resources(Strict):
    """Actor pools of the three stages."""

    sampler: PoolConfig = PoolConfig()
    judge: LightPoolConfig = LightPoolConfig()
    scorer: PoolConfig = PoolConfig()


class OutputConfig(Strict):
    """Run directory (a path or a storage URI) and prompts per shard."""

    dir: str = "runs/eval"
    shard_size: int = Field(default=16, ge=1)


class EvalConfig(Strict):
    """One evaluation run (see ``recipes/quickstart-eval.yaml``).

    ``model``: the fine-tuned student (base + adapter, or a full copy) or a base model alone.
    ``prompt``: how it sees each prompt; sampler, judge and scorer share it. ``dabon evaluate``
    takes the adapter's own (``prompt.yaml`` beside it, saved by ``dabon distill``) when the
    recipe and the flags give none; the report says which prompt was used and where it differs
    from the adapter's. ``refusal_judge``: how benign prompts are judged for refusal (``keyword``
    or a ``model`` judge of XSTest's classes, ``actors.judge.RefusalWorker``, in the judge pool
    ``resources.judge``); ``null`` (default): the report applies the keyword rule to the final answer.
    """

    name: str = "eval"
    model: ModelSpec = ModelSpec(base=EMBEDDED_ALIAS)
    prompt: PromptConfig = PromptConfig()
    benchmarks: list[BenchmarkSpec] = Field(default=[BenchmarkSpec(name="star1", star1_split="dev")], min_length=1)
    sampling: SamplingConfig = SamplingConfig()
    generator: GeneratorConfig = GeneratorConfig()
    judge: JudgeConfig = JudgeConfig()
    refusal_judge: RefusalJudgeConfig | None = None
    scoring: EvalScoringConfig = EvalScoringConfig()
    resources: Resources = Resources()
    ray: RayConfig = RayConfig()
    output: OutputConfig = OutputConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _benchmarks_distinct(self) -> "EvalConfig":
        names = [spec.name if spec.name != "file" else str(spec.path) for spec in self.benchmarks]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"benchmarks: {', '.join(repeated)} listed twice")
        return self

    @property
    def scored_layers(self) -> list[int]:
        """The layers whose per-layer scores (latent similarity, a plugin's) the run stores: none
        for a base model alone, and none when no computed score is per layer (``scoring.metrics:
        [kl]`` stores no ``latent_sim_<L>`` column, so the report must not ask for one)."""
        return list(self.scoring.layers) if self.model.has_finetuned and self.scoring.per_layer else []
