"""Every recipe in recipes/ validates against its config model (unknown keys are errors)."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.config import load_config
from pipelines.distill import DistillConfig
from pipelines.evaluate import EvalConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name, model", [
    ("quickstart.yaml", DistillConfig), ("paper.yaml", DistillConfig), ("quickstart-eval.yaml", EvalConfig),
    ("example-plugin-eval.yaml", EvalConfig), ("paper-eval.yaml", EvalConfig),
])
def test_recipe_validates(name, model):
    config = load_config(model, RECIPES / name)
    assert config.name


def test_evaluation_prompt_matches_the_distillation_prompt():
    distill = load_config(DistillConfig, RECIPES / "quickstart.yaml")
    evaluation = load_config(EvalConfig, RECIPES / "quickstart-eval.yaml")
    assert evaluation.prompt == distill.prompt
    assert evaluation.model.base == distill.model.base
