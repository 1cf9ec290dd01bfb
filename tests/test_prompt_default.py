"""The prompt a run samples, judges and scores with: the adapter's own (``prompt.yaml`` beside it)
unless the recipe or ``--set prompt.*`` gives one, in ``dabon evaluate``, ``dabon sweep`` and
``dabon quickstart`` alike. (Before, evaluation used no system prompt and no prefix whatever the
adapter was trained with, with no warning.)"""

from __future__ import annotations

import argparse

import pytest
import yaml

from actors.chat import PROMPT_FILE, resolve_prompt
from actors.config import PromptConfig, config_yaml

TRAINED = PromptConfig(system_prompt="You are a careful assistant.", response_prefix="<think>\n")


@pytest.fixture()
def adapter(tmp_path):
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / PROMPT_FILE).write_text(config_yaml(TRAINED))
    return directory


def evaluate_config(tmp_path, recipe: dict, *flags: str):
    from pipelines.evaluate import add_arguments, config_from_args

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": {"base": "smollm2-135m-instruct"}, **recipe}))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(["--config", str(path), *flags]))


def test_evaluation_takes_the_adapters_prompt_when_the_recipe_gives_none(tmp_path, adapter):
    config = evaluate_config(tmp_path, {"model": {"base": "smollm2-135m-instruct"}}, "--adapter", str(adapter))
    assert config.prompt == TRAINED
    # without an adapter, or with one that saved no prompt: the plain default
    assert evaluate_config(tmp_path, {"model": {"base": "smollm2-135m-instruct"}}).prompt == PromptConfig()
    bare = tmp_path / "bare"
    bare.mkdir()
    assert evaluate_config(tmp_path, {}, "--adapter", str(bare)).prompt == PromptConfig()


def test_a_given_prompt_wins_and_its_difference_is_named(tmp_path, adapter):
    given = {"prompt": {"system_prompt": None, "response_prefix": ""}}
    config = evaluate_config(tmp_path, given, "--adapter", str(adapter))
    assert config.prompt == PromptConfig(system_prompt=None, response_prefix="")
    prompt, note = resolve_prompt(config.prompt, str(adapter))
    assert prompt == config.prompt and "differs" in note and "system_prompt" in note and "response_prefix" in note
    # --set prompt.* is a given prompt too; the fields it does not set keep their defaults
    config = evaluate_config(tmp_path, {}, "--adapter", str(adapter), "--set", "prompt.response_prefix=<r>")
    assert config.prompt == PromptConfig(response_prefix="<r>")
    # the same prompt as the adapter's: no difference
    same = evaluate_config(tmp_path, {"prompt": TRAINED.model_dump()}, "--adapter", str(adapter)).prompt
    assert "differs" not in resolve_prompt(same, str(adapter))[1]


def test_a_malformed_prompt_file_is_an_error_naming_it(tmp_path, adapter):
    (adapter / PROMPT_FILE).write_text("response_prefix: [not, a, string]\n")
    with pytest.raises(ValueError, match=r"prompt\.yaml.*response_prefix"):
        evaluate_config(tmp_path, {}, "--adapter", str(adapter))
