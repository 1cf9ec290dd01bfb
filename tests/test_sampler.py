"""The sampler: config validation, the hf backend on tiny real models, the vllm backend up to the
engine call (a stand-in engine; vLLM cannot run here), the openai backend against real local
HTTP servers on 127.0.0.1, and the Ray Data wrapper on a local Ray."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import socket
import threading
import time
import types
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from actors.chat import prompt_token_ids
from actors.config import ConfigError, PromptConfig, validate
from actors.endpoint import EndpointError, retry_after_seconds
from actors.models import ModelBundle, ModelSpec, load_models
from actors.sampler import (
    GeneratorConfig,
    HFBackend,
    OpenAIBackend,
    PromptEncoder,
    Sample,
    Sampler,
    SamplerWorker,
    SamplingConfig,
    VLLMBackend,
    VLLMOutputError,
    build_backend,
    build_vllm_processor,
    chat_request_body,
    collect_vllm_processor_samples,
    expand_rows_for_vllm,
    parse_vllm_outputs,
    vllm_engine_kwargs,
    vllm_processor_postprocess,
    vllm_processor_preprocess,
    vllm_prompts,
    vllm_sampling_kwargs,
)

PROMPTS = ["hi", "Tell me a long story about dragons and castles, with many details please."]


def build_untied_llama(tokenizer, seed: int = 0, eos_bias: float | None = None):
    """A tiny random Llama with its own LM head: unlike the tied test models, whose greedy output
    repeats one token whatever the prompt, its greedy output depends on the prompt. ``eos_bias``
    adds that logit to eos at every step (a head with a bias), to make the model stop."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    if eos_bias is not None:
        head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            head.bias[tokenizer.eos_token_id] = eos_bias
        model.lm_head = head
    return model


def in_memory_bundle(tokenizer, model) -> ModelBundle:
    return ModelBundle(ModelSpec(base="in-memory-test-model"), tokenizer, model, None, "cpu")


@pytest.fixture(scope="module")
def untied_bundle(smol_tokenizer) -> ModelBundle:
    return in_memory_bundle(smol_tokenizer, build_untied_llama(smol_tokenizer))


# ----------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"n": 0}, "n"), ({"n": 65}, "n"), ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.inf}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"), ({"seed": -1}, "seed"), ({"response_prefix": "x"}, "response_prefix"),
        ({"temprature": 0.5}, "temprature"),
    ],
)
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ValidationError) as info:
        SamplingConfig(**bad)
    assert info.value.errors()[0]["loc"] == (field,)


def test_greedy_requires_a_single_sample():
    with pytest.raises(ValidationError, match=r"n: temperature=0 is greedy decoding"):
        SamplingConfig(temperature=0, n=4)
    assert SamplingConfig(temperature=0, n=1).greedy
    with pytest.raises(ConfigError, match="generator.backend: Input should be 'hf', 'vllm' or 'openai'"):
        validate(GeneratorConfig, {"backend": "nope"}, "generator")
    with pytest.raises(ConfigError, match="generator.options.batch_prompts: Input should be greater than 0"):
        validate(GeneratorConfig, {"backend": "hf", "options": {"batch_prompts": 0}}, "generator")
    with pytest.raises(ConfigError, match="generator.options.base_url: Field required"):
        validate(GeneratorConfig, {"backend": "openai"}, "generator")


# ----------------------------------------------------------------------------------------
# hf backend
# ----------------------------------------------------------------------------------------


def test_hf_samples_exclude_stop_token_and_padding(smol_tokenizer):
    # eos has probability ~0.2 per step, so in one batch some samples stop early (their rows are
    # then padded while the others go on) and some run to max_new_tokens
    eos = smol_tokenizer.eos_token_id
    bias = math.log(0.25 * len(smol_tokenizer))
    bundle = in_memory_bundle(smol_tokenizer, build_untied_llama(smol_tokenizer, eos_bias=bias))
    config = SamplingConfig(n=8, temperature=1.0, max_new_tokens=5, seed=1)
    result = Sampler(HFBackend(bundle), smol_tokenizer, config).sample_with_ids(PROMPTS)

    assert result.prompt_ids == [prompt_token_ids(smol_tokenizer, p) for p in PROMPTS]
    assert [len(row) for row in result.samples] == [8, 8]
    reasons = [s.finish_reason for row in result.samples for s in row]
    assert {"stop", "length"} <= set(reasons)
    for sample in (s for row in result.samples for s in row):
        assert eos not in sample.token_ids and smol_tokenizer.pad_token_id not in sample.token_ids
        assert sample.text == smol_tokenizer.decode(sample.token_ids, skip_special_tokens=True)
        if sample.finish_reason == "length":
            assert len(sample.token_ids) == 5
        else:
            assert len(sample.token_ids) < 5


def test_hf_stop_when_eos_wins(smol_tokenizer):
    bundle = in_memory_bundle(smol_tokenizer, build_untied_llama(smol_tokenizer, eos_bias=100.0))
    backend = HFBackend(bundle)
    for config in (SamplingConfig(n=1, temperature=0, max_new_tokens=4), SamplingConfig(n=3, temperature=1.0, max_new_tokens=4)):
        samples = Sampler(backend, smol_tokenizer, config).sample(PROMPTS)
        assert samples == [[Sample([], "", "stop")] * config.n] * len(PROMPTS)


def test_hf_length_and_left_padding(smol_tokenizer, untied_bundle):
    sampler = Sampler(HFBackend(untied_bundle), smol_tokenizer, SamplingConfig(n=1, temperature=0, max_new_tokens=8))
    (alone,) = sampler.sample(PROMPTS[:1])
    (long_alone,) = sampler.sample(PROMPTS[1:])
    batched = sampler.sample(PROMPTS)  # the short prompt is left-padded to the long one
    assert batched == [alone, long_alone]
    assert alone[0].finish_reason == "length" and len(alone[0].token_ids) == 8
    assert alone[0].token_ids != long_alone[0].token_ids  # the output depends on the prompt


def test_hf_reproducible_with_a_seed_and_leaves_the_global_rng_alone(smol_tokenizer, untied_bundle):
    import torch

    def run(seed: int, batch_prompts: int = 8) -> list[list[Sample]]:
        config = SamplingConfig(n=3, temperature=1.0, top_p=0.9, max_new_tokens=4, seed=seed)
        return Sampler(HFBackend(untied_bundle, batch_prompts=batch_prompts), smol_tokenizer, config).sample(PROMPTS)

    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    torch.manual_seed(123)
    first = run(seed=7)
    assert torch.equal(torch.rand(1), expected_draw)
    assert run(seed=7) == first
    assert run(seed=8) != first
    # one prompt per generate call is another batch composition, hence other samples (documented)
    assert run(seed=7, batch_prompts=1) != first


def test_hf_samples_from_the_finetuned_view(smol_tokenizer, tiny_models):
    config = SamplingConfig(n=2, temperature=1.0, max_new_tokens=4, seed=3)

    def run(spec: ModelSpec) -> list[list[list[int]]]:
        samples = Sampler(HFBackend(load_models(spec)), smol_tokenizer, config).sample(PROMPTS[:1])
        return [[s.token_ids for s in row] for row in samples]

    with_adapter = run(ModelSpec(base=tiny_models.base, adapter=tiny_models.adapter))
    assert with_adapter == run(ModelSpec(base=tiny_models.merged))
    assert with_adapter != run(ModelSpec(base=tiny_models.base))


def test_response_prefix_and_system_prompt_end_up_in_prompt_ids(smol_tokenizer, untied_bundle):
    config = SamplingConfig(n=1, temperature=0, max_new_tokens=2)
    sampler = Sampler(HFBackend(untied_bundle), smol_tokenizer, config, PromptConfig(system_prompt="Be safe.", response_prefix="<think>"))
    result = sampler.sample_with_ids(["hi", [{"role": "user", "content": "hello"}]])
    assert result.prompt_ids == sampler.encode(["hi", [{"role": "user", "content": "hello"}]])
    for ids in result.prompt_ids:
        text = smol_tokenizer.decode(ids)
        assert text.endswith("<|im_start|>assistant\n<think>") and "Be safe." in text
    token_prompt = [1, 2, 3, 4]
    assert sampler.sample_with_ids([token_prompt]).prompt_ids == [token_prompt]  # ids pass through


# ----------------------------------------------------------------------------------------
# vllm backend: a stand-in engine with vLLM's RequestOutput / CompletionOutput attributes
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class StandInCompletionOutput:
    """The attributes of ``vllm.outputs.CompletionOutput``."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    cumulative_logprob: float | None = None
    logprobs: Any = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclasses.dataclass
class StandInRequestOutput:
    """The attributes of ``vllm.outputs.RequestOutput`` that a generate call fills."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    outputs: list[StandInCompletionOutput]
    finished: bool = True


class StandInEngine:
    """Records what ``vllm.LLM.generate`` receives and answers like it: per prompt, ``n`` completions
    (even index: stopped by eos, which vLLM keeps in ``token_ids``; odd: ``max_tokens`` long),
    listed out of index order. ``abort_prompt`` makes that prompt's first sample aborted."""

    def __init__(self, tokenizer, abort_prompt: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.abort_prompt = abort_prompt
        self.calls: list[dict[str, Any]] = []

    def generate(self, prompts, sampling_params, lora_request=None, use_tqdm=True):
        self.calls.append({"prompts": prompts, "sampling_params": sampling_params, "lora_request": lora_request, "use_tqdm": use_tqdm})
        eos, max_tokens = self.tokenizer.eos_token_id, sampling_params["max_tokens"]
        outputs = []
        for position, prompt in enumerate(prompts):
            completions = []
            for index in range(sampling_params["n"]):
                body = [100 + (t * 7 + index) % 5000 for t in prompt["prompt_token_ids"][-3:]]
                if index % 2 == 0:
                    ids, reason = body[: max_tokens - 1] + [eos], "stop"
                else:
                    ids, reason = (body * max_tokens)[:max_tokens], "length"
                if position == self.abort_prompt and index == 0:
                    reason = "abort"
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                completions.append(StandInCompletionOutput(index, text, tuple(ids), finish_reason=reason))
            outputs.append(StandInRequestOutput(str(position), None, prompt["prompt_token_ids"], None, completions[::-1]))
        return outputs


def test_vllm_request_building_and_result_parsing(smol_tokenizer):
    eos = smol_tokenizer.eos_token_id
    engine = StandInEngine(smol_tokenizer)
    lora_request = object()  # stands for vllm.lora.request.LoRARequest
    backend = VLLMBackend(engine, stop_ids={eos}, lora_request=lora_request, sampling_params_factory=dict)
    config = SamplingConfig(n=4, temperature=0.6, top_p=0.95, max_new_tokens=5, seed=11)
    result = Sampler(backend, smol_tokenizer, config, PromptConfig(response_prefix="<think>")).sample_with_ids(PROMPTS)

    (call,) = engine.calls
    assert call["prompts"] == [{"prompt_token_ids": ids} for ids in result.prompt_ids]
    assert call["sampling_params"] == {
        "n": 4, "temperature": 0.6, "top_p": 0.95, "max_tokens": 5, "seed": 11, "skip_special_tokens": True,
    }
    assert call["lora_request"] is lora_request and call["use_tqdm"] is False
    for ids, row in zip(result.prompt_ids, result.samples):
        assert [s.finish_reason for s in row] == ["stop", "length", "stop", "length"]
        for index, sample in enumerate(row):
            body = [100 + (t * 7 + index) % 5000 for t in ids[-3:]]
            expected = body if sample.finish_reason == "stop" else (body * 5)[:5]
            assert sample.token_ids == expected and eos not in sample.token_ids
            assert sample.text == smol_tokenizer.decode(expected, skip_special_tokens=True)
    assert vllm_prompts([np.array([1, 2])]) == [{"prompt_token_ids": [1, 2]}]
    assert vllm_sampling_kwargs(SamplingConfig(n=1, temperature=0))["temperature"] == 0


def test_vllm_unexpected_outputs_are_errors(smol_tokenizer):
    eos = smol_tokenizer.eos_token_id
    config = SamplingConfig(n=2, max_new_tokens=4)
    aborting = VLLMBackend(StandInEngine(smol_tokenizer, abort_prompt=1), stop_ids={eos}, sampling_params_factory=dict)
    with pytest.raises(VLLMOutputError, match="finish_reason='abort'"):
        Sampler(aborting, smol_tokenizer, config).sample(PROMPTS)
    outputs = StandInEngine(smol_tokenizer).generate(vllm_prompts([[1, 2, 3]]), {"n": 2, "max_tokens": 4})
    with pytest.raises(VLLMOutputError, match="returned 2 samples for prompt 0, expected n=3"):
        parse_vllm_outputs(outputs, n=3, stop_ids={eos})

    class DroppingEngine(StandInEngine):
        def generate(self, prompts, *args, **kwargs):
            return super().generate(prompts, *args, **kwargs)[:-1]

    dropping = VLLMBackend(DroppingEngine(smol_tokenizer), stop_ids={eos}, sampling_params_factory=dict)
    with pytest.raises(VLLMOutputError, match="1 outputs for 2 prompts"):
        Sampler(dropping, smol_tokenizer, config).sample(PROMPTS)


def test_vllm_engine_kwargs_and_missing_vllm(tiny_models):
    with_adapter = vllm_engine_kwargs(ModelSpec(base=tiny_models.base, adapter=tiny_models.adapter), gpu_memory_utilization=0.8)
    assert with_adapter == {
        "model": tiny_models.base, "dtype": "auto", "enable_lora": True, "trust_remote_code": False,
        "max_lora_rank": 8, "gpu_memory_utilization": 0.8,
    }
    assert vllm_engine_kwargs(ModelSpec(base=tiny_models.merged, dtype="bfloat16"))["enable_lora"] is False
    try:
        import vllm  # noqa: F401
    except ImportError:  # as here (its wheels need CUDA): from_spec says how to get it
        with pytest.raises(ImportError, match=r"pip install 'dabon\[vllm\]'"):
            VLLMBackend.from_spec(ModelSpec(base=tiny_models.base))


def test_ray_data_llm_row_functions():
    config = SamplingConfig(n=3, temperature=0.8, max_new_tokens=4, seed=5)
    row = {"prompt_id": 7, "prompt": "hi", "prompt_ids": np.array([1, 9, 4])}
    expanded = expand_rows_for_vllm(row, config.n)
    assert [r["sample_index"] for r in expanded] == [0, 1, 2]
    request = vllm_processor_preprocess(expanded[2], vllm_sampling_kwargs(config), lora_name="/adapters/ft")
    assert request["tokenized_prompt"] == [1, 9, 4] and request["model"] == "/adapters/ft"
    assert "prompt" not in request  # only ids reach vLLM; the stage fails on a non-text prompt
    assert request["sampling_params"] == {**vllm_sampling_kwargs(config), "n": 1, "seed": 7}

    def stage_output(sample_index: int, generated: list[int], text: str) -> dict[str, Any]:
        # what the vLLM stage hands the postprocess: our columns plus vLLMOutputData's fields
        carried = {k: v for k, v in request.items() if k not in ("tokenized_prompt", "sampling_params")}
        return {
            **carried, "sample_index": sample_index, "prompt": "", "prompt_token_ids": [1, 9, 4], "num_input_tokens": 3,
            "generated_tokens": np.array(generated), "generated_text": text, "num_generated_tokens": len(generated),
            "metrics": None,
        }

    eos = 2
    rows = [
        vllm_processor_postprocess(stage_output(2, [5, 6, eos], "ab"), stop_ids=[eos]),
        vllm_processor_postprocess(stage_output(0, [5, 6, 7, 8], "abcd"), stop_ids=[eos]),
        vllm_processor_postprocess(stage_output(1, [eos], ""), stop_ids=[eos]),
    ]
    assert rows[0] == {"prompt_id": 7, "prompt": "hi", "prompt_ids": row["prompt_ids"], "sample_index": 2,
                       "response": "ab", "response_ids": [5, 6], "finish_reason": "stop"}
    group = {key: np.array([r[key] for r in rows], dtype=object) for key in rows[0]}
    collected = collect_vllm_processor_samples(group)
    assert collected["prompt_id"] == [7] and collected["prompt_ids"] == [[1, 9, 4]]
    assert collected["responses"] == [["abcd", "", "ab"]]
    assert collected["response_ids"] == [[[5, 6, 7, 8], [], [5, 6]]]
    assert collected["finish_reasons"] == [["length", "stop", "stop"]]


# ----------------------------------------------------------------------------------------
# openai backend against real local servers
# ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def canned_answer(n: int) -> dict[str, Any]:
    return {"choices": [{"index": i, "message": {"role": "assistant", "content": f"ok {i}"}, "finish_reason": "stop"} for i in range(n)]}


@pytest.fixture(scope="module")
def openai_server(smol_tokenizer, untied_bundle):
    """One uvicorn server on 127.0.0.1 with four OpenAI-style routes: ``/real`` generates with
    HFBackend on a tiny model; ``/flaky`` answers 429 then 503 (``Retry-After: 0``) then 200;
    ``/bad`` answers 400; ``/slow`` answers after 1 s."""
    import uvicorn
    from fastapi import FastAPI, Header
    from fastapi.responses import JSONResponse

    state: dict[str, Any] = {"real": [], "in_flight": 0, "max_in_flight": 0, "flaky": 0, "bad": 0, "slow": 0}
    backend = HFBackend(untied_bundle)
    generating, counting = threading.Lock(), threading.Lock()
    app = FastAPI()

    @app.post("/real/v1/chat/completions")
    def real(body: dict[str, Any], authorization: str | None = Header(default=None)):
        with counting:
            state["in_flight"] += 1
            state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        try:
            messages, prefix = body["messages"], ""
            if body.get("continue_final_message"):
                messages, prefix = messages[:-1], messages[-1]["content"]
            ids = prompt_token_ids(smol_tokenizer, messages, PromptConfig(response_prefix=prefix))
            config = SamplingConfig(
                n=body["n"], temperature=body["temperature"], top_p=body["top_p"],
                max_new_tokens=body["max_tokens"], seed=body["seed"],
            )
            with generating:  # seeding is process-global: one generation at a time
                (samples,) = backend.generate([ids], config)
            state["real"].append({"authorization": authorization, "prompt_ids": ids, "body": body})
            return {
                "id": "chatcmpl-test", "object": "chat.completion", "model": body["model"],
                "choices": [
                    {"index": i, "message": {"role": "assistant", "content": s.text}, "finish_reason": s.finish_reason}
                    for i, s in enumerate(samples)
                ],
            }
        finally:
            with counting:
                state["in_flight"] -= 1

    @app.post("/flaky/v1/chat/completions")
    def flaky(body: dict[str, Any]):
        state["flaky"] += 1
        if state["flaky"] == 1:
            return JSONResponse({"error": {"message": "rate limited"}}, status_code=429, headers={"Retry-After": "0"})
        if state["flaky"] == 2:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503, headers={"Retry-After": "0"})
        return canned_answer(body["n"])

    @app.post("/bad/v1/chat/completions")
    def bad(body: dict[str, Any]):
        state["bad"] += 1
        return JSONResponse({"error": {"message": "max_tokens is too large for this model"}}, status_code=400)

    @app.post("/slow/v1/chat/completions")
    async def slow(body: dict[str, Any]):
        state["slow"] += 1
        await asyncio.sleep(1.0)
        return canned_answer(body["n"])

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    yield types.SimpleNamespace(url=f"http://127.0.0.1:{port}", state=state)
    server.should_exit = True
    thread.join(timeout=15)
    assert not thread.is_alive()


def test_openai_end_to_end_matches_hf(openai_server, smol_tokenizer, untied_bundle, monkeypatch):
    monkeypatch.setenv("DABON_TEST_API_KEY", "test-key-123")
    openai_server.state["real"].clear()
    openai_server.state["max_in_flight"] = 0
    config = SamplingConfig(n=3, temperature=1.0, top_p=0.9, max_new_tokens=5, seed=4)
    backend = OpenAIBackend(openai_server.url + "/real/v1/", "tiny", api_key_env="DABON_TEST_API_KEY", max_concurrency=2)
    prompts = PROMPTS + ["What is 2 + 2?", "Name a colour."]
    result = Sampler(backend, smol_tokenizer, config).sample_with_ids(prompts)

    local = HFBackend(untied_bundle)
    for ids, row in zip(result.prompt_ids, result.samples):
        (expected,) = local.generate([ids], config)  # the server runs one prompt per request
        assert [(s.text, s.finish_reason) for s in row] == [(e.text, e.finish_reason) for e in expected]
        assert all(s.token_ids is None for s in row)
    received = openai_server.state["real"]
    assert sorted(r["prompt_ids"] for r in received) == sorted(result.prompt_ids)
    assert {r["authorization"] for r in received} == {"Bearer test-key-123"}
    assert {(r["body"]["n"], r["body"]["max_tokens"], r["body"]["seed"]) for r in received} == {(3, 5, 4)}
    assert 1 <= openai_server.state["max_in_flight"] <= 2

    with pytest.raises(ValueError, match="'DABON_UNSET_KEY' is not set"):
        OpenAIBackend(openai_server.url, "tiny", api_key_env="DABON_UNSET_KEY")


def test_openai_response_prefix_is_continued_by_the_server(openai_server, smol_tokenizer):
    openai_server.state["real"].clear()
    config = SamplingConfig(n=1, temperature=0, max_new_tokens=3)
    sampler = Sampler(OpenAIBackend(openai_server.url + "/real", "tiny"), smol_tokenizer, config, PromptConfig(response_prefix="<think>"))
    result = sampler.sample_with_ids(["hi"])
    (received,) = openai_server.state["real"]
    assert received["prompt_ids"] == result.prompt_ids[0]
    assert received["body"]["messages"][-1] == {"role": "assistant", "content": "<think>"}
    assert chat_request_body("m", [{"role": "user", "content": "x"}], SamplingConfig())["messages"] == [{"role": "user", "content": "x"}]


def test_openai_retries_429_and_5xx_and_respects_retry_after(openai_server, smol_tokenizer):
    openai_server.state["flaky"] = 0
    # a backoff of 30 s would show if Retry-After: 0 were not respected
    backend = OpenAIBackend(openai_server.url + "/flaky", "tiny", max_retries=3, backoff_s=30.0)
    started = time.monotonic()
    samples = Sampler(backend, None, SamplingConfig(n=2)).sample(["hi"])
    assert time.monotonic() - started < 5
    assert openai_server.state["flaky"] == 3
    assert samples == [[Sample(None, "ok 0", "stop"), Sample(None, "ok 1", "stop")]]


def test_openai_client_errors_are_not_retried(openai_server):
    openai_server.state["bad"] = 0
    backend = OpenAIBackend(openai_server.url + "/bad", "tiny", max_retries=3)
    with pytest.raises(EndpointError, match="HTTP 400: max_tokens is too large for this model") as info:
        Sampler(backend, None, SamplingConfig(n=1)).sample(["hi"])
    assert info.value.status == 400 and openai_server.state["bad"] == 1


def test_openai_timeouts_and_connection_errors_are_retried_then_raised(openai_server):
    openai_server.state["slow"] = 0
    slow = OpenAIBackend(openai_server.url + "/slow", "tiny", timeout_s=0.2, max_retries=1, backoff_s=0.01)
    started = time.monotonic()
    with pytest.raises(EndpointError, match="failed after 2 attempts: timed out after 0.2 s"):
        Sampler(slow, None, SamplingConfig(n=1)).sample(["hi"])
    assert time.monotonic() - started < 1.0 and openai_server.state["slow"] == 2

    closed = OpenAIBackend(f"http://127.0.0.1:{free_port()}", "tiny", max_retries=1, backoff_s=0.01)
    with pytest.raises(EndpointError, match="failed after 2 attempts: connection error"):
        Sampler(closed, None, SamplingConfig(n=1)).sample(["hi"])


def test_retry_after_header_forms():
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=60), usegmt=True)
    assert 55 < retry_after_seconds(later) <= 60


def test_sampler_worker_with_the_openai_backend(openai_server, tiny_models, smol_tokenizer):
    sampling = SamplingConfig(n=2, max_new_tokens=3, temperature=1.0)
    generator = GeneratorConfig(backend="openai", options={"base_url": openai_server.url + "/real", "model": "tiny"})
    batch = {"prompt_id": np.array([0, 1]), "prompt": np.array(["a question", "another one"], dtype=object)}
    out = SamplerWorker(ModelSpec(base=tiny_models.base), sampling, generator=generator)(batch)
    assert out["prompt_id"] == [0, 1] and out["prompt"] == ["a question", "another one"]
    assert out["prompt_ids"] == [prompt_token_ids(smol_tokenizer, p) for p in out["prompt"]]
    assert "response_ids" not in out
    assert [len(r) for r in out["responses"]] == [2, 2] and [len(r) for r in out["finish_reasons"]] == [2, 2]

    # a served model whose tokenizer is not available locally: no prompt_ids column
    unknown = SamplerWorker(ModelSpec(base="example-org/not-cached-model"), sampling, generator=generator)
    assert "prompt_ids" not in unknown(batch)


# ----------------------------------------------------------------------------------------
# Ray: the map_batches wrapper, and building the ray.data.llm processor
# ----------------------------------------------------------------------------------------


@pytest.mark.ray
def test_sampler_worker_in_ray_data_and_vllm_processor(ray_local, tiny_models, smol_tokenizer):
    import ray

    spec = ModelSpec(base=tiny_models.base, adapter=tiny_models.adapter)
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=4)
    prompt = PromptConfig(response_prefix="<think>")
    rows = [{"prompt_id": i, "prompt": f"Question {i}: how do I do task {i}?"} for i in range(4)]
    dataset = ray.data.from_items(rows).map_batches(
        SamplerWorker,
        fn_constructor_kwargs={"spec": spec, "sampling": sampling, "prompt": prompt, "torch_threads": 1},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=2,
        num_cpus=1,
    )
    out = sorted(dataset.take_all(), key=lambda row: row["prompt_id"])
    assert [row["prompt_id"] for row in out] == [0, 1, 2, 3]
    encoder = PromptEncoder(spec, prompt)
    expected_ids = encoder({"prompt": [row["prompt"] for row in rows]})["prompt_ids"]
    for row, ids in zip(out, expected_ids):
        assert list(row["prompt_ids"]) == ids
        assert len(row["responses"]) == len(row["response_ids"]) == len(row["finish_reasons"]) == 2
        for text, response_ids, reason in zip(row["responses"], row["response_ids"], row["finish_reasons"]):
            assert text == smol_tokenizer.decode(list(response_ids), skip_special_tokens=True)
            assert reason == "length" and len(response_ids) == 4 or reason == "stop" and len(response_ids) < 4

    # the ray.data.llm processor builds (it runs only where vLLM and GPUs are)
    processor = build_vllm_processor(spec, sampling, batch_size=16)
    assert processor.list_stage_names() == ["vLLMEngineStage"]
    assert processor.config.model_source == tiny_models.base
    assert {k: processor.config.engine_kwargs[k] for k in ("enable_lora", "max_lora_rank", "dtype")} == {
        "enable_lora": True, "max_lora_rank": 8, "dtype": "auto",
    }
