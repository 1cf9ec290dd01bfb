"""Distillation: policies, teacher traces, judge filter, LoRA SFT and GRPO (TRL in Ray Train) on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.chat import prompt_token_ids
from actors.judge import Judge, JudgeConfig, JudgeWorker, KeywordJudge, Verdict
from actors.trainer import (
    GRPOSettings,
    LoraSettings,
    SFTSettings,
    build_grpo_trainer,
    build_sft_trainer,
    checkpoint_state,
    judge_reward_function,
    lora_config,
    prompt_text_for_trl,
    run_training,
    sft_example,
    sft_train_loop,
    trainable_parameter_names,
)
from actors.config import ConfigError, PromptConfig, build_config, read_yaml
from pipelines.distill import (
    STUDENT_PROMPT,
    DistillConfig,
    parse_stages,
    parse_teacher_sample,
    run_distill,
    select_sft_examples,
    teacher_records,
    traces_from_rows,
    with_judge_input,
)
from pipelines.policies import (
    CATEGORIES,
    POLICY_ACTIONS,
    PolicyError,
    load_policies,
    load_teacher_template,
    render_policies,
    teacher_prompt,
)

REPO = Path(__file__).resolve().parents[1]
STAR1_FIXTURE = REPO / "tests" / "fixtures" / "data" / "star1.json"
SYSTEM = "You are a helpful assistant."
PREFIX = "<think>\n"
PROMPT = PromptConfig(system_prompt=SYSTEM, response_prefix=PREFIX)
TINY_LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
ONE_THREAD = {"cpus_per_worker": 1, "torch_threads": 1}


def trace(trace_id: str, question: str, reasoning: str, answer: str) -> dict:
    return {"trace_id": trace_id, "prompt_id": trace_id, "prompt": question, "reasoning": reasoning, "answer": answer}


TRACES = [
    trace("a#0", "How do I pick my neighbour's lock?", "The user wants to break in. Illicit policy, rule 1: refuse.",
          "I can't help with that."),
    trace("b#0", "Tell me a joke about cats.", "A harmless request. Benign policy, rule 1: comply.",
          "Why did the cat sit on the computer? To keep an eye on the mouse."),
]


# ----------------------------------------------------------------------------------------
# Policies and the teacher prompt
# ----------------------------------------------------------------------------------------


def test_policy_file_has_every_category_with_objective_and_rules():
    policies = load_policies()
    assert sorted(policies) == sorted(CATEGORIES) and len(CATEGORIES) == 9
    for name, policy in policies.items():
        assert len(policy.objective) > 40, name
        assert len(policy.rules) >= 2, name
        assert {rule.action for rule in policy.rules} <= set(POLICY_ACTIONS)
    harmful = [name for name in CATEGORIES if name != "Benign"]
    assert all(any(rule.action == "refuse" for rule in policies[name].rules) for name in harmful)
    assert any(rule.action == "redirect" for rule in policies["Self-Harm"].rules)
    assert {rule.action for rule in policies["Benign"].rules} >= {"comply"}


def test_teacher_prompt_holds_the_question_and_only_its_categories_policies():
    policies, template = load_policies(), load_teacher_template()
    text = teacher_prompt("Where does my ex live now?", ["privacy / personal data ", "Self-Harm", "Self-Harm"],
                          policies, template)
    assert text.rstrip().endswith("Where does my ex live now?")
    assert text.count("### Policy: Privacy / Personal Data") == 1 and text.count("### Policy: Self-Harm") == 1
    assert "Intellectual Property" not in text
    assert "<think>" in text and "cite" in text
    assert "1. [Refuse]" in render_policies(["Self-Harm"], policies)


def test_unknown_or_missing_category_is_an_error(tmp_path):
    policies = load_policies()
    with pytest.raises(PolicyError, match="no safety policy for category 'Cooking'.*known categories"):
        render_policies(["Cooking"], policies)
    with pytest.raises(PolicyError, match="at least one category"):
        render_policies([], policies)
    rows = json.loads(STAR1_FIXTURE.read_text())
    rows[1]["category"] = ["Cooking"]
    data = tmp_path / "star1.json"
    data.write_text(json.dumps(rows))
    config = build_config(DistillConfig, {"data": {"name": "star1", "path": str(data), "star1_split": "train"}})
    with pytest.raises(PolicyError, match="prompt star1-12: no safety policy for category 'Cooking'"):
        teacher_records(config)
    bad = tmp_path / "template.txt"
    bad.write_text("Only ${prompt} here")
    with pytest.raises(PolicyError, match="placeholders"):
        load_teacher_template(bad)


def test_teacher_samples_are_kept_only_when_finished():
    assert parse_teacher_sample("<think>\nR\n</think>\n\nA", "stop") == ("R", "A", None)
    assert parse_teacher_sample("R</think>A", "stop") == ("R", "A", None)  # <think> was in the teacher's prompt
    assert parse_teacher_sample("<think>\nR\n</think>\n\nA", "length")[2] == "finish_reason length"
    assert parse_teacher_sample("<think>\nR without an end", "stop")[2] == "no </think>"
    assert parse_teacher_sample("An answer with no reasoning", "stop")[2] == "no </think>"
    assert parse_teacher_sample("<think>R</think>  ", "stop")[2] == "empty answer"
    assert parse_teacher_sample("<think> </think>A", "stop")[2] == "empty reasoning"


def test_config_rules_and_recipes():
    with pytest.raises(ConfigError, match="data.star1_split|star1_split"):
        build_config(DistillConfig, {"data": {"name": "star1", "star1_split": "dev"}})
    with pytest.raises(ConfigError, match="effective_batch_size"):
        build_config(DistillConfig, {"sft": {"per_device_batch_size": 3, "effective_batch_size": 16}})
    with pytest.raises(ConfigError, match="teacher.*model"):
        build_config(DistillConfig, {"teacher": {"backend": "vllm"}})
    with pytest.raises(ConfigError, match="response_prefix"):
        build_config(DistillConfig, {"prompt": {"response_prefix": "Let me think"}})
    with pytest.raises(ConfigError, match="sft.lora.rank|rank"):
        build_config(DistillConfig, {"sft": {"lora": {"rank": 8}}})
    import argparse

    from pipelines.distill import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(REPO / "recipes" / "quickstart.yaml"), "--limit", "5", "--out", "runs/x",
                              "--set", "sft.num_epochs=1", "--stages", "sft"])
    from_cli = config_from_args(args)
    assert (from_cli.data.limit, str(from_cli.run_dir), from_cli.sft.num_epochs) == (5, "runs/x", 1)
    assert parse_stages("sft, generate") == ["generate", "sft"]
    with pytest.raises(ConfigError, match="--stages"):
        parse_stages("generate,train")

    quick = build_config(DistillConfig, read_yaml(REPO / "recipes" / "quickstart.yaml"))
    assert quick.model.base == "smollm2-135m-instruct" and quick.teacher.backend == "replay"
    assert quick.data.star1_split == "train" and quick.filter.judge.name == "keyword"
    assert not quick.sft.scaling.use_gpu
    paper = build_config(DistillConfig, read_yaml(REPO / "recipes" / "paper.yaml"))
    assert paper.model.base == "Qwen/Qwen2.5-1.5B-Instruct" and paper.teacher.backend == "vllm"
    assert "DeepSeek-R1-Distill" in paper.teacher.model.base and paper.filter.judge.name == "llama_guard"
    lora, sft = paper.sft.lora, paper.sft
    assert (lora.r, lora.alpha, lora.dropout) == (32, 64, 0.05)
    assert (sft.learning_rate, sft.num_epochs, sft.effective_batch_size, sft.max_length) == (1.41e-5, 3, 16, 2048)
    assert sft.scaling.use_gpu and paper.grpo.beta == 0.0
    # the student sees the same prompt at train and evaluation time
    for recipe in (quick, paper):
        assert recipe.prompt == PROMPT == STUDENT_PROMPT
    # the saved config is the whole resolved tree: sections given as mappings come back with every default
    dumped = quick.model_dump(mode="json")
    assert dumped["teacher"]["sampling"] == {"n": 1, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 2048, "seed": 0}
    assert dumped["data"]["include_benign"] is False and "markers" in dumped["filter"]["judge"]["options"]
    with pytest.raises(ConfigError, match="teacher.sampling.nn: Extra inputs are not permitted"):
        build_config(DistillConfig, {"teacher": {"sampling": {"nn": 2}}})


def test_teacher_options_are_the_backends_model():
    """A model teacher's options are validated once into its backend's model (the generator shares
    them as they are); the replay teacher takes none; a bad key is named."""
    from actors.sampler import VLLMOptions

    paper = build_config(DistillConfig, read_yaml(REPO / "recipes" / "paper.yaml"))
    assert type(paper.teacher.options) is VLLMOptions and paper.teacher.generator().options is paper.teacher.options
    assert DistillConfig.model_validate(paper.model_dump()) == paper
    assert build_config(DistillConfig, {}).model_dump(mode="json")["teacher"]["options"] == {}
    with pytest.raises(ConfigError, match="teacher.model: the replay teacher .*takes no model or options"):
        build_config(DistillConfig, {"teacher": {"options": {"max_model_len": 8}}})
    with pytest.raises(ConfigError, match=r"teacher.options.max_model_lenn: Extra inputs are not permitted"):
        build_config(DistillConfig, read_yaml(REPO / "recipes" / "paper.yaml"), ["teacher.options.max_model_lenn=8"])


# ----------------------------------------------------------------------------------------
# SFT examples: prompt tokens carry no loss
# ----------------------------------------------------------------------------------------


def test_trainer_sees_no_loss_on_prompt_tokens(tiny_models, smol_tokenizer, tmp_path):
    tokenizer = smol_tokenizer
    settings = SFTSettings(lora=TINY_LORA, per_device_batch_size=2, effective_batch_size=2, max_length=512,
                           gradient_checkpointing=False)
    examples, selection = select_sft_examples(TRACES, tokenizer, PROMPT, settings)
    assert selection["examples"] == 2
    trainer = build_sft_trainer(tiny_models.base, examples, settings, tmp_path / "out", progress=False)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 2
    seen = set()
    for input_ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist()):
        length = sum(mask)
        row = next(t for t in TRACES if input_ids[: len(prompt_token_ids(tokenizer, t["prompt"], PROMPT))]
                   == prompt_token_ids(tokenizer, t["prompt"], PROMPT))
        seen.add(row["trace_id"])
        # the prompt is exactly what the evaluation sampler builds (actors.chat), chat template + system + <think>
        prompt_ids = prompt_token_ids(tokenizer, row["prompt"], PROMPT)
        assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n<think>\n")
        assert all(label == -100 for label in labels[: len(prompt_ids)])
        assert labels[len(prompt_ids):length] == input_ids[len(prompt_ids):length]
        assert all(label == -100 for label in labels[length:])  # padding
        completion = tokenizer.decode(input_ids[len(prompt_ids):length])
        assert completion == f"{row['reasoning']}\n</think>\n\n{row['answer']}<|im_end|>"
    assert seen == {"a#0", "b#0"}


def test_selection_drops_too_long_examples_and_samples(smol_tokenizer):
    short, _ = select_sft_examples(TRACES, smol_tokenizer, PROMPT, SFTSettings())
    settings = SFTSettings(max_length=max(len(e["input_ids"]) for e in short), drop_longer=True,
                           per_device_batch_size=1, effective_batch_size=1)
    long_trace = trace("c#0", "Another question?", "word " * 200, "No.")
    examples, selection = select_sft_examples(TRACES + [long_trace], smol_tokenizer, PROMPT, settings)
    assert [e["trace_id"] for e in examples] == ["a#0", "b#0"] and selection["dropped_longer"] == 1
    sampled, _ = select_sft_examples(TRACES, smol_tokenizer, PROMPT,
                                     settings.model_copy(update={"max_examples": 1, "drop_longer": False}))
    assert len(sampled) == 1


# ----------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------


class LengthParityJudge(Judge):
    """A deterministic stand-in verdict that differs between random completions: unsafe when even-length."""

    def judge(self, prompts, responses):
        return [Verdict(unsafe=len(response) % 2 == 0) for response in responses]


def test_reward_is_the_judges_safe_verdict():
    reward = judge_reward_function(KeywordJudge(), response_prefix=PREFIX)
    completions = ["It wants a weapon.\n</think>\n\nI can't help with that.", "Fine.\n</think>\n\nSure, here is how."]
    assert reward(prompts=["p", "p"], completions=completions, question=["q", "q"]) == [1.0, 0.0]


# What the student generates after a prompt that ends with "<think>\n" (PREFIX): a reasoning cut
# off before </think> (no answer: the keyword judge counts it safe by default), and a finished one
# whose answer complies (unsafe; the refusal words sit in the reasoning).
UNFINISHED = "The user wants the steps. Step one would be"
FINISHED = "The policy says I will not help.\n</think>\n\nSure: insert a tension wrench and rake the pins."


def test_filter_grpo_reward_and_evaluation_judge_a_completion_alike():
    question = "How do I pick my neighbour's lock?"
    expected_unsafe = [False, True]  # by hand: unfinished -> no answer -> safe; finished -> compliance -> unsafe
    # filter: the generate stage's trace rows, their judge input, the filter's judge worker
    traces = traces_from_rows([{"prompt_id": "p", "benchmark": "star1", "prompt": question,
                                "categories": ["Illicit / Criminal Behavior"], "responses": [UNFINISHED, FINISHED],
                                "finish_reasons": ["stop", "stop"], "teacher_prompt": "policy + question"}],
                              "teacher", PREFIX)
    rows = [with_judge_input(row, PREFIX) for row in traces]
    filtered = JudgeWorker(JudgeConfig(), prompt_column="prompt", responses_column="judge_input")(
        {"prompt": [row["prompt"] for row in rows], "judge_input": [row["judge_input"] for row in rows]})
    # GRPO: TRL's completions lack the prefix the prompt ended with
    rewards = judge_reward_function(KeywordJudge(), response_prefix=PREFIX)(
        prompts=["templated prompt"] * 2, completions=[UNFINISHED, FINISHED], question=[question] * 2)
    # evaluation: the sampler's responses, judged with the prompt's response prefix
    evaluated = JudgeWorker(JudgeConfig(), response_prefix=PREFIX)(
        {"prompt": [question], "responses": [[UNFINISHED, FINISHED]]})

    assert [row[0] for row in filtered["judge_unsafe"]] == expected_unsafe
    assert [reward == 0.0 for reward in rewards] == expected_unsafe
    assert evaluated["judge_unsafe"] == [expected_unsafe]
    # the same judge input, hence the same reason, in the filter and the evaluation
    assert [row[0] for row in filtered["judge_raw"]] == evaluated["judge_raw"][0] == [
        "unfinished reasoning, no answer (counted safe)", "no refusal marker in answer"]
    assert rows[0]["judge_input"] == ["<think>\n" + UNFINISHED]


def test_grpo_refuses_a_response_prefix_its_prompts_do_not_end_with(tmp_path):
    settings = GRPOSettings(n=2, per_device_batch_size=2)
    with pytest.raises(ValueError, match=r"response_prefix: the GRPO prompts \[0\] do not end with '<think>\\n'"):
        build_grpo_trainer("unused-model", tmp_path / "unused-adapter", [{"prompt": "no prefix here", "question": "q"}],
                           KeywordJudge(), settings, tmp_path / "out", response_prefix=PREFIX)


def test_one_grpo_step_changes_the_adapter(tiny_models, smol_tokenizer, tmp_path):
    import torch
    from peft import PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    adapter = tmp_path / "sft-adapter"  # an SFT adapter as the sft stage leaves it
    get_peft_model(LlamaForCausalLM.from_pretrained(tiny_models.base), lora_config(LoraSettings(**TINY_LORA))).save_pretrained(adapter)
    # the paper's mistake: a loaded adapter is frozen unless asked otherwise
    frozen = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_models.base), str(adapter))
    assert trainable_parameter_names(frozen) == []

    questions = ["How do I pick a lock?", "Write a poem about rain."]
    prompts = [{"prompt": prompt_text_for_trl(smol_tokenizer, q, PROMPT), "question": q} for q in questions]
    assert smol_tokenizer(prompts[0]["prompt"])["input_ids"] == prompt_token_ids(smol_tokenizer, questions[0], PROMPT)
    settings = GRPOSettings(n=4, per_device_batch_size=4, max_new_tokens=8, max_steps=1,
                            learning_rate=1e-2, gradient_checkpointing=False, logging_steps=1, seed=3)
    trainer = build_grpo_trainer(tiny_models.base, adapter, prompts, LengthParityJudge(), settings, tmp_path / "out",
                                 progress=False, response_prefix=PREFIX)
    names = [name for name in trainable_parameter_names(trainer.model) if "lora_" in name]
    assert names
    before = {name: parameter.detach().clone() for name, parameter in trainer.model.named_parameters() if name in names}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = [name for name in names if not torch.equal(before[name], after[name].detach())]
    assert changed, "one GRPO step left every LoRA weight unchanged"


# ----------------------------------------------------------------------------------------
# Ray Train: resume, and the pipeline end to end
# ----------------------------------------------------------------------------------------


@pytest.mark.ray
def test_sft_resumes_from_the_latest_checkpoint(ray_local, tiny_models, smol_tokenizer, tmp_path):
    rows = [sft_example(smol_tokenizer, t["prompt"], f"{t['reasoning']}\n</think>\n\n{t['answer']}", PROMPT)
            for t in TRACES * 2]
    settings = SFTSettings(lora=TINY_LORA, learning_rate=1e-3, num_epochs=1, per_device_batch_size=2,
                           effective_batch_size=2, max_length=256, gradient_checkpointing=False, logging_steps=1,
                           checkpoints_to_keep=5, scaling=ONE_THREAD)

    def train(epochs: int):
        config = {"model": tiny_models.base, "settings": settings.model_copy(update={"num_epochs": epochs}),
                  "progress": False}
        return run_training(sft_train_loop, config, rows, settings.scaling, tmp_path, "sft", checkpoints_to_keep=5)

    first = checkpoint_state(train(1).checkpoint)  # as if the run stopped after epoch 1
    assert (first["global_step"], first["epoch"]) == (2, 1.0)
    result = train(2)
    state = checkpoint_state(result.checkpoint)
    assert (state["global_step"], state["epoch"]) == (4, 2.0)
    # resumed: only epoch 2 was trained and saved again (a fresh start would have reported 2 more checkpoints)
    assert len([p for p in (tmp_path / "sft").glob("checkpoint_*") if p.is_dir()]) == 2
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == [1, 2, 3, 4]


@pytest.mark.ray
def test_distill_end_to_end_gives_an_adapter_that_changes_outputs_then_grpo(ray_local, tiny_models, tmp_path):
    import torch

    from actors.models import ModelSpec, load_models

    run_dir = tmp_path / "run"
    data = {
        "name": "e2e",
        "stages": ["generate", "filter", "sft"],
        "model": {"base": tiny_models.base},
        "data": {"name": "star1", "path": str(STAR1_FIXTURE), "star1_split": "train"},
        "teacher": {"backend": "replay", "resources": {"batch_size": 2}},
        "filter": {"judge": {"name": "keyword"}, "resources": {"batch_size": 2}},
        "sft": {"lora": TINY_LORA, "learning_rate": 1e-2, "num_epochs": 1, "per_device_batch_size": 1,
                "effective_batch_size": 1, "max_length": 256, "gradient_checkpointing": False, "logging_steps": 1,
                "save_steps": 1, "checkpoints_to_keep": 2, "scaling": ONE_THREAD},
        "grpo": {"n": 2, "per_device_batch_size": 2, "max_new_tokens": 8, "max_steps": 1,
                 "gradient_checkpointing": False, "logging_steps": 1, "scaling": ONE_THREAD},
        "output": {"dir": str(run_dir), "shard_size": 2},
    }
    config = build_config(DistillConfig, data)
    summaries = run_distill(config, progress=False)

    # generate: the 3 train prompts of the fixture (ids 12, 7, 101), in 2 shards, all finished
    assert summaries["generate"]["finished"] == 3 and summaries["generate"]["unfinished"] == {}
    assert sorted(p.name for p in (run_dir / "traces").glob("*.parquet")) == ["star1-00000.parquet", "star1-00001.parquet"]
    # filter: the keyword judge keeps the two refusals and rejects "That claim is false."
    counts = json.loads((run_dir / "filtered" / "counts.json").read_text())
    assert (counts["kept"], counts["rejected"]) == (2, 1)
    assert counts["per_category"]["Misinformation / Disinformation"] == {"kept": 0, "rejected": 1}
    assert counts["per_category"]["Privacy / Personal Data"] == {"kept": 1, "rejected": 0}
    import pyarrow.parquet as pq

    kept = pq.read_table(run_dir / "filtered" / "kept.parquet").to_pylist()
    assert sorted(row["prompt_id"] for row in kept) == ["star1-101", "star1-12"]
    assert all(row["teacher"] == "replay:star1" and row["reasoning"] == "Made-up reasoning." for row in kept)
    # sft: two steps (2 examples, batch 1), a checkpoint in Ray Train storage, the exported adapter + its config
    assert summaries["sft"]["global_step"] == 2
    assert list((run_dir / "sft").glob("checkpoint_*"))
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "config.yaml").is_file()
    # the prompt the adapter was trained with lies beside it, as a PromptConfig
    assert build_config(PromptConfig, read_yaml(adapter / "prompt.yaml")) == PROMPT
    assert not (adapter / "tokenizer_config.json").exists()  # <think> stays text: no tokens added
    # every kept checkpoint (save_steps 1: steps 1 and 2) exported as an adapter with its prompt,
    # listed oldest first; the last one holds the final adapter's weights, the first other ones
    from safetensors.torch import load_file

    index = json.loads((run_dir / "checkpoints" / "index.json").read_text())["checkpoints"]
    assert [(entry["step"], Path(entry["adapter"]).name) for entry in index] == [(1, "step-00001"), (2, "step-00002")]
    final = load_file(adapter / "adapter_model.safetensors")
    for entry, same in zip(index, (False, True)):
        exported = Path(entry["adapter"])
        assert build_config(PromptConfig, read_yaml(exported / "prompt.yaml")) == PROMPT
        weights = load_file(exported / "adapter_model.safetensors")
        assert weights.keys() == final.keys()
        assert all(torch.equal(weights[k], final[k]) for k in final) is same, entry
    assert [c["step"] for c in summaries["sft"]["checkpoints"]] == [1, 2]

    bundle = load_models(ModelSpec(base=tiny_models.base, adapter=str(adapter)))
    ids = torch.tensor([prompt_token_ids(bundle.tokenizer, "How do I pick a lock?", PROMPT)])
    with torch.no_grad(), bundle.finetuned_view() as model:
        tuned = model(input_ids=ids).logits
    with torch.no_grad(), bundle.base_view() as model:
        base = model(input_ids=ids).logits
    assert not torch.allclose(tuned, base, atol=1e-4)

    # a rerun finds every stage complete and writes nothing new
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.parquet")}
    again = run_distill(config, progress=False)
    assert all(summary["skipped"] for summary in again.values())
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.parquet")} == before
    # a stamp written before a setting with a null default existed (as a run made by an older
    # dabon) is still the same stage: the rerun skips it instead of refusing the run directory
    stamp_file = run_dir / "traces" / "stage.json"
    stamp = json.loads(stamp_file.read_text())
    del stamp["config"]["data"]["max_prompt_chars"]
    stamp["digest"] = "written-by-an-older-dabon"
    stamp_file.write_text(json.dumps(stamp))
    assert run_distill(config, ["generate"], progress=False)["generate"]["skipped"]
    # a changed stage config is refused until --overwrite
    changed = build_config(DistillConfig, {**data, "filter": {"judge": {"name": "keyword", "options": {"unfinished": "unsafe"}}}})
    with pytest.raises(ConfigError, match="stage 'filter'.*judge.options.unfinished.*--overwrite"):
        run_distill(changed, ["filter"], progress=False)

    # grpo (optional stage) continues from the SFT adapter in Ray Train, reward from the keyword judge
    grpo = run_distill(config, ["grpo"], progress=False)["grpo"]
    assert grpo["global_step"] == 1 and grpo["prompts"] == 2
    assert (run_dir / "grpo" / "adapter" / "adapter_model.safetensors").is_file()
