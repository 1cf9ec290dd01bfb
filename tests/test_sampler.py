"""The sampler: config validation, the hf backend on tiny real models (its seeded draw checked
against softmax/top-p computed here), the vllm backend's fault handling (the real engine is in
tests/test_vllm.py), the openai backend (the ``openai`` SDK) against real local HTTP servers on
127.0.0.1, and the Ray Data wrapper on a local Ray."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import socket
import threading
import time
import types
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from actors.chat import prompt_token_ids
from actors.config import ConfigError, PromptConfig, validate
from actors.endpoint import EndpointError
from actors.models import ModelBundle, ModelSpec, load_models
from actors.sampler import (
    GeneratorConfig,
    HFBackend,
    HFOptions,
    OpenAIBackend,
    PromptEncoder,
    Sample,
    Sampler,
    SamplerWorker,
    SamplingConfig,
    SeededSampling,
    VLLMBackend,
    VLLMOptions,
    VLLMOutputError,
    chat_request,
    sample_seed,
    parse_vllm_outputs,
    vllm_cpu_build,
    vllm_engine_kwargs,
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


def test_generator_options_are_validated_once_into_the_backends_model():
    """``options`` holds the backend's options model, validated once from the mapping (issue 15:
    no dict round trips); the config round-trips through its dump; options of another backend are
    refused with the key named."""
    generator = validate(GeneratorConfig, {"backend": "vllm", "options": {"max_model_len": 512}}, "generator")
    assert type(generator.options) is VLLMOptions and generator.options.max_model_len == 512
    assert type(GeneratorConfig().options) is HFOptions and GeneratorConfig().options.batch_prompts == 8
    assert set(generator.model_dump()["options"]) == set(VLLMOptions.model_fields)
    assert GeneratorConfig.model_validate(generator.model_dump()) == generator
    # options that already are the backend's model are kept, not validated again
    assert GeneratorConfig(backend="vllm", options=generator.options).options is generator.options
    with pytest.raises(ConfigError, match=r"generator.options.max_model_len: Input should be greater than 0"):
        validate(GeneratorConfig, {"backend": "vllm", "options": {"max_model_len": 0}}, "generator")
    # switching backend with the options of the former one: the foreign keys are named
    with pytest.raises(ConfigError, match=r"generator.options.max_model_len: Extra inputs are not permitted"):
        validate(GeneratorConfig, {"backend": "hf", "options": generator.model_dump()["options"]}, "generator")
    with pytest.raises(ConfigError, match=r"generator.options: VLLMOptions given, but backend 'hf' takes HFOptions"):
        validate(GeneratorConfig, {"backend": "hf", "options": generator.options}, "generator")


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
    # every sample has its own stream: the batch composition does not change it
    assert run(seed=7, batch_prompts=1) == first


def reference_distribution(logits: list[float], temperature: float, top_p: float) -> np.ndarray:
    """softmax(logits / T) cut to the smallest set of top tokens whose mass reaches top_p, renormalised
    (a loop over the sorted tokens, independent of SeededSampling's tensor code)."""
    z = np.array(logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep, mass = [], 0.0
    for token in sorted(range(len(p)), key=lambda t: -p[t]):
        keep.append(token)
        mass += p[token]
        if mass >= top_p:
            break
    out = np.zeros_like(p)
    out[keep] = p[keep]
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_seeded_sampling_draws_from_softmax_with_top_p(temperature, top_p):
    import torch

    logits = [2.0, 1.5, 0.3, 0.0, -1.0, -3.0]
    expected = reference_distribution(logits, temperature, top_p)
    draws = 20000
    processor = SeededSampling(range(draws), temperature, top_p, "cpu")
    scores = torch.tensor([logits] * draws)
    picked = processor(None, scores).argmax(dim=-1).numpy()
    counts = np.bincount(picked, minlength=len(logits))
    assert counts[expected == 0].sum() == 0  # nothing outside the nucleus
    # chi-square goodness of fit over the kept tokens; 30 is far above the 99.9% point for <= 5 dof
    kept = expected > 0
    chi2 = float((((counts[kept] - draws * expected[kept]) ** 2) / (draws * expected[kept])).sum())
    assert chi2 < 30, (counts, draws * expected)
    # the same seeds give the same draws; another stream gives others
    again = SeededSampling(range(draws), temperature, top_p, "cpu")(None, scores).argmax(dim=-1).numpy()
    assert (again == picked).all()
    other = SeededSampling(range(draws, 2 * draws), temperature, top_p, "cpu")(None, scores).argmax(dim=-1).numpy()
    assert (other != picked).any()


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
# vllm backend: the real engine is tested in tests/test_vllm.py; a stand-in remains only for
# outputs the real engine cannot be made to give (an aborted request, a dropped output)
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class StandInCompletionOutput:
    """The attributes of ``vllm.CompletionOutput`` that ``parse_vllm_outputs`` reads."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None


@dataclasses.dataclass
class StandInRequestOutput:
    """The attributes of ``vllm.RequestOutput`` that ``parse_vllm_outputs`` reads."""

    outputs: list[StandInCompletionOutput]


class FaultyEngine:
    """Answers each request with one completion whose finish reason is ``reason``; ``drop`` leaves
    the last request without an output."""

    def __init__(self, reason: str = "stop", drop: bool = False) -> None:
        self.reason, self.drop = reason, drop

    def generate(self, prompts, sampling_params, lora_request=None, use_tqdm=False):
        outputs = [StandInRequestOutput([StandInCompletionOutput(0, "x", (7,), self.reason)]) for _ in prompts]
        return outputs[:-1] if self.drop else outputs


def test_vllm_unexpected_outputs_are_errors(smol_tokenizer):
    eos = smol_tokenizer.eos_token_id
    config = SamplingConfig(n=2, max_new_tokens=4)
    aborting = VLLMBackend(FaultyEngine("abort"), stop_ids={eos}, sampling_params_factory=dict)
    with pytest.raises(VLLMOutputError, match="finish_reason='abort'"):
        Sampler(aborting, smol_tokenizer, config).sample(PROMPTS)
    dropping = VLLMBackend(FaultyEngine(drop=True), stop_ids={eos}, sampling_params_factory=dict)
    with pytest.raises(VLLMOutputError, match="3 outputs for 4 requests"):
        Sampler(dropping, smol_tokenizer, config).sample(PROMPTS)
    outputs = [StandInRequestOutput([StandInCompletionOutput(0, "a", (1,), "stop")])]
    with pytest.raises(VLLMOutputError, match="returned 1 samples for prompt 0, expected n=3"):
        parse_vllm_outputs(outputs, n=3, stop_ids={eos})


def test_vllm_engine_kwargs(tiny_models):
    options = VLLMOptions(gpu_memory_utilization=0.8, max_model_len=512, lora="request")
    with_adapter = vllm_engine_kwargs(ModelSpec(base=tiny_models.base, adapter=tiny_models.adapter), options)
    assert with_adapter == {
        "model": tiny_models.base, "dtype": "auto", "enable_lora": True, "trust_remote_code": False,
        "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "gpu_memory_utilization": 0.8,
        "enable_prefix_caching": True, "enforce_eager": False, "max_model_len": 512,
        "max_lora_rank": 8, "max_loras": 2,
        # vllm-cpu (installed here and in CI): whole-prompt prefill, see vllm_engine_kwargs
        **({"enable_chunked_prefill": False} if vllm_cpu_build() else {}),
    }
    from importlib import metadata

    assert vllm_cpu_build() == any(d.metadata["Name"] == "vllm-cpu" for d in metadata.distributions())
    assert vllm_engine_kwargs(ModelSpec(base=tiny_models.base), VLLMOptions(
        engine_kwargs={"enable_chunked_prefill": True}))["enable_chunked_prefill"] is True  # engine_kwargs win
    plain = vllm_engine_kwargs(ModelSpec(base=tiny_models.merged, dtype="bfloat16"), VLLMOptions(engine_kwargs={"seed": 3}))
    assert plain["enable_lora"] is False and plain["dtype"] == "bfloat16" and plain["seed"] == 3
    # one request per sample, each with a seed of its own and every value of a fixed type
    assert vllm_sampling_kwargs(SamplingConfig(n=4, temperature=1, top_p=0.5, max_new_tokens=9), 17) == {
        "n": 1, "temperature": 1.0, "top_p": 0.5, "max_tokens": 9, "seed": 17, "skip_special_tokens": True,
    }


# ----------------------------------------------------------------------------------------
# openai backend against real local servers
# ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def canned_answer(n: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-canned", "object": "chat.completion", "created": 0, "model": "tiny",
        "choices": [{"index": i, "message": {"role": "assistant", "content": f"ok {i}"}, "finish_reason": "stop"} for i in range(n)],
    }


@pytest.fixture(scope="module")
def openai_server(smol_tokenizer, untied_bundle):
    """One uvicorn server on 127.0.0.1 with OpenAI-style routes: ``/real`` generates with
    HFBackend on a tiny model (and, like vLLM, returns the token ids with ``return_token_ids``,
    the stop token included); ``/flaky`` answers 429 then 503 (``Retry-After: 0``) then 200;
    ``/bad`` answers 400; ``/slow`` answers after 1 s."""
    import uvicorn
    from fastapi import FastAPI, Header
    from fastapi.responses import JSONResponse

    state: dict[str, Any] = {"real": [], "in_flight": 0, "max_in_flight": 0, "flaky": 0, "bad": 0, "slow": 0}
    backend = HFBackend(untied_bundle)
    eos = smol_tokenizer.eos_token_id
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
            with generating:
                (samples,) = backend.generate([ids], config, keys=["server"])
            state["real"].append({"authorization": authorization, "prompt_ids": ids, "body": body})
            choices = []
            for i, s in enumerate(samples):
                choice = {"index": i, "message": {"role": "assistant", "content": s.text}, "finish_reason": s.finish_reason}
                if body.get("return_token_ids"):
                    choice["token_ids"] = s.token_ids + ([eos] if s.finish_reason == "stop" else [])
                choices.append(choice)
            answer = {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"], "choices": choices}
            if body.get("return_token_ids"):
                answer["prompt_token_ids"] = ids
            return answer
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
    backend = OpenAIBackend(openai_server.url + "/real/v1/", "tiny", api_key_env="DABON_TEST_API_KEY", max_concurrency=2,
                            stop_ids=[smol_tokenizer.eos_token_id])
    prompts = PROMPTS + ["What is 2 + 2?", "Name a colour."]
    keys = [f"p{i}" for i in range(len(prompts))]
    result = Sampler(backend, smol_tokenizer, config).sample_with_ids(prompts, keys=keys)

    received = {tuple(r["prompt_ids"]): r for r in openai_server.state["real"]}
    assert sorted(received) == sorted(tuple(ids) for ids in result.prompt_ids)
    local = HFBackend(untied_bundle)
    for key, ids, row in zip(keys, result.prompt_ids, result.samples):
        body = received[tuple(ids)]["body"]
        assert body["seed"] == sample_seed(4, key, 0)  # one seed per request, from the prompt's key
        served = SamplingConfig(n=3, temperature=1.0, top_p=0.9, max_new_tokens=5, seed=body["seed"])
        (expected,) = local.generate([ids], served, keys=["server"])
        # the returned ids are the generated ones, the server's trailing stop id dropped
        assert [(s.token_ids, s.text, s.finish_reason) for s in row] == [(e.token_ids, e.text, e.finish_reason) for e in expected]
    assert {r["authorization"] for r in received.values()} == {"Bearer test-key-123"}
    assert {(r["body"]["n"], r["body"]["max_tokens"], r["body"]["return_token_ids"]) for r in received.values()} == {(3, 5, True)}
    assert 1 <= openai_server.state["max_in_flight"] <= 2

    with pytest.raises(ValueError, match="'DABON_UNSET_KEY' is not set"):
        OpenAIBackend(openai_server.url, "tiny", api_key_env="DABON_UNSET_KEY")


def test_openai_response_prefix_is_continued_by_the_server(openai_server, smol_tokenizer):
    openai_server.state["real"].clear()
    config = SamplingConfig(n=1, temperature=0, max_new_tokens=3)
    sampler = Sampler(OpenAIBackend(openai_server.url + "/real", "tiny"), smol_tokenizer, config, PromptConfig(response_prefix="<think>"))
    result = sampler.sample_with_ids(["hi"])
    (received,) = openai_server.state["real"]
    assert received["prompt_ids"] == result.prompt_ids[0] == sampler.encode(["hi"])[0]
    assert received["body"]["messages"][-1] == {"role": "assistant", "content": "<think>"}
    assert received["body"]["continue_final_message"] is True and received["body"]["add_generation_prompt"] is False
    plain = chat_request("m", [{"role": "user", "content": "x"}], SamplingConfig(), seed=1)
    assert plain["messages"] == [{"role": "user", "content": "x"}] and "continue_final_message" not in plain["extra_body"]


def test_openai_retries_429_and_5xx_and_respects_retry_after(openai_server, smol_tokenizer):
    openai_server.state["flaky"] = 0
    backend = OpenAIBackend(openai_server.url + "/flaky", "tiny", max_retries=3)
    started = time.monotonic()
    samples = Sampler(backend, None, SamplingConfig(n=2)).sample(["hi"])
    assert time.monotonic() - started < 5  # Retry-After: 0 is honoured
    assert openai_server.state["flaky"] == 3
    assert samples == [[Sample(None, "ok 0", "stop"), Sample(None, "ok 1", "stop")]]

    openai_server.state["flaky"] = 0
    once = OpenAIBackend(openai_server.url + "/flaky", "tiny", max_retries=0)
    with pytest.raises(EndpointError, match="failed after 1 attempts: HTTP 429: rate limited") as info:
        Sampler(once, None, SamplingConfig(n=2)).sample(["hi"])
    assert info.value.status == 429 and openai_server.state["flaky"] == 1


def test_openai_client_errors_are_not_retried(openai_server):
    openai_server.state["bad"] = 0
    backend = OpenAIBackend(openai_server.url + "/bad", "tiny", max_retries=3)
    with pytest.raises(EndpointError, match="answered HTTP 400: max_tokens is too large for this model") as info:
        Sampler(backend, None, SamplingConfig(n=1)).sample(["hi"])
    assert info.value.status == 400 and openai_server.state["bad"] == 1


def test_openai_timeouts_and_connection_errors_are_retried_then_raised(openai_server):
    openai_server.state["slow"] = 0
    slow = OpenAIBackend(openai_server.url + "/slow", "tiny", timeout_s=0.2, max_retries=1)
    started = time.monotonic()
    with pytest.raises(EndpointError, match="failed after 2 attempts: timed out"):
        Sampler(slow, None, SamplingConfig(n=1)).sample(["hi"])
    assert time.monotonic() - started < 3.0 and openai_server.state["slow"] == 2

    closed = OpenAIBackend(f"http://127.0.0.1:{free_port()}", "tiny", max_retries=1)
    with pytest.raises(EndpointError, match="failed after 2 attempts: connection error"):
        Sampler(closed, None, SamplingConfig(n=1)).sample(["hi"])

    with pytest.raises(ValueError, match="base_url: expected http"):
        OpenAIBackend("127.0.0.1:8000", "tiny")


def test_sampler_worker_with_the_openai_backend(openai_server, tiny_models, smol_tokenizer):
    sampling = SamplingConfig(n=2, max_new_tokens=3, temperature=1.0)
    generator = GeneratorConfig(backend="openai", options={"base_url": openai_server.url + "/real", "model": "tiny"})
    batch = {"prompt_id": np.array([0, 1]), "prompt": np.array(["a question", "another one"], dtype=object)}
    out = SamplerWorker(ModelSpec(base=tiny_models.base), sampling, generator=generator)(batch)
    assert out["prompt_id"] == [0, 1] and out["prompt"] == ["a question", "another one"]
    assert out["prompt_ids"] == [prompt_token_ids(smol_tokenizer, p) for p in out["prompt"]]
    assert [len(r) for r in out["responses"]] == [2, 2] and [len(r) for r in out["finish_reasons"]] == [2, 2]
    for ids_row, texts in zip(out["response_ids"], out["responses"]):  # the server's ids, stop id dropped
        assert [smol_tokenizer.decode(ids, skip_special_tokens=True) for ids in ids_row] == texts
        assert all(smol_tokenizer.eos_token_id not in ids for ids in ids_row)

    # a served model whose tokenizer is not available locally: the ids are the ones the server reports
    unknown = SamplerWorker(ModelSpec(base="example-org/not-cached-model"), sampling, generator=generator)(batch)
    assert unknown["prompt_ids"] == out["prompt_ids"]


# ----------------------------------------------------------------------------------------
# Ray: the map_batches wrapper, and building the ray.data.llm processor
# ----------------------------------------------------------------------------------------


@pytest.mark.ray
def test_sampler_worker_in_ray_data(ray_local, tiny_models, smol_tokenizer):
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
        assert list(row["prompt_ids"]) == ids == prompt_token_ids(smol_tokenizer, row["prompt"], prompt)
        assert len(row["responses"]) == len(row["response_ids"]) == len(row["finish_reasons"]) == 2
        for text, response_ids, reason in zip(row["responses"], row["response_ids"], row["finish_reasons"]):
            assert text == smol_tokenizer.decode(list(response_ids), skip_special_tokens=True)
            assert reason == "length" and len(response_ids) == 4 or reason == "stop" and len(response_ids) < 4
