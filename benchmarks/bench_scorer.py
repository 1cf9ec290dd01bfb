"""Benchmark: our ``AttributionScorer`` vs the paper's way of computing latent similarity.

Run from the repository root (CPU is fine; default sizes take a few minutes on 2 cores)::

    HF_HUB_OFFLINE=1 python benchmarks/bench_scorer.py            # or: make bench
    HF_HUB_OFFLINE=1 python benchmarks/bench_scorer.py --whole-process

What it does, on SmolLM2-135M-Instruct (``smollm2-135m-instruct``):

1. builds (once, then reuses from the temp dir) a random, non-trivial LoRA adapter
   (``actors.models.write_random_adapter``: r=16, alpha=32, all attention and MLP projections,
   fixed seed), unless ``--adapter DIR`` names a real one;
2. builds the input: ``--prompts`` STAR-1 questions (chat-templated), each with ``--n``
   responses whose token lengths are uniform in [``--min-len``, ``--max-len``] (seeded), made by
   truncating the token ids of STAR-1 response texts (synthetic text when STAR-1 is absent);
   both sides score these exact token ids;
3. runs each side in a fresh spawned process (so memory is measured per side):
   - paper-style: base model + a second copy with the adapter merged, right-padded batches of
     4 full sequences, full depth with LM head and all hidden states, position -1 read out;
   - ours: one weight copy (``PeftModel``, base view = adapter disabled), latent_sim only;
   each does one warm-up call on a small slice, then ``--repeats`` (2) timed calls on the whole
   input, the best of which is reported (the CPUs of a shared host only ever add time);
4. prints candidates/s of each side and the ratio (ours / paper-style), load times, peak RSS
   (``ru_maxrss`` of the child; also its growth over the child's RSS after imports) and the
   parameter bytes each side holds (unique parameter storages), then the max |difference| of
   latent similarity between ours and paper-style with the true last token (should be ~1e-6:
   the same numbers) and with the paper's padding bug, and how many prompts' argmin changes.

``--whole-process`` instead times two whole processes on the same input written as JSONL
(responses decoded back to text, so re-tokenization may shift lengths slightly; fine for
timing): ``python -m pipelines.cli score ... --metrics latent_sim --layers L`` vs
``python benchmarks/paper_style.py ...``, and prints both wall times, their ratio, the peak RSS of
each process and whether their selections agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
for _path in (str(REPO), str(Path(__file__).resolve().parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network; children inherit it

BASE = "smollm2-135m-instruct"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------


def default_star1() -> str:
    """``$DABON_STAR1``, else ``../shared/data/STAR-1.json`` relative to the repository root."""
    from actors.settings import star1_path

    return str(star1_path() or REPO.parent / "shared" / "data" / "STAR-1.json")


def build_adapter(base: str, seed: int, directory: Path | None = None) -> Path:
    """A random LoRA adapter for ``base`` (``write_random_adapter``), saved once and reused by later runs."""
    from actors.models import write_random_adapter

    directory = directory or Path(tempfile.gettempdir()) / f"dabon-bench-random-lora-r16-seed{seed}"
    if (directory / "adapter_config.json").is_file() and (directory / "adapter_model.safetensors").is_file():
        return directory
    # write into a sibling temp dir and rename, so a crashed run never leaves a half adapter
    staging = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    write_random_adapter(base, staging, rank=16, alpha=32, seed=seed, target_modules=LORA_TARGETS)
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    os.rename(staging, directory)
    return directory


def load_texts(star1: str, seed: int) -> tuple[list[str], list[str], str]:
    """(questions, responses, source note) from STAR-1, or synthetic text when the file is absent."""
    path = Path(star1)
    if path.is_file():
        data = json.loads(path.read_text())
        questions = [row["question"] for row in data if row.get("question")]
        responses = [row["response"] for row in data if row.get("response")]
        return questions, responses, f"STAR-1 ({path}, {len(data)} rows)"
    rng = random.Random(seed)
    words = ("policy safety request answer reason careful step explain refuse help user model "
             "information harmful benign consider context provide guidance alternative").split()
    questions = [f"Question {k}: " + " ".join(rng.choices(words, k=rng.randint(8, 30))) + "?" for k in range(64)]
    responses = [" ".join(rng.choices(words, k=400)) + "." for _ in range(64)]
    return questions, responses, f"SYNTHETIC text ({path} not found)"


def build_input(
    tokenizer: Any,
    questions: Sequence[str],
    responses: Sequence[str],
    prompts: int,
    n: int,
    min_len: int,
    max_len: int,
    seed: int,
) -> tuple[list[str], list[list[int]], list[list[list[int]]]]:
    """(prompt texts, prompt ids, response ids): ``prompts`` questions, ``n`` responses each with
    token length uniform in [min_len, max_len], cut from randomly chosen response texts."""
    from paper_style import encode_prompt, encode_response

    rng = random.Random(seed)
    chosen = rng.sample(range(len(questions)), min(prompts, len(questions)))
    prompt_texts = [questions[k] for k in chosen]
    prompt_ids = [encode_prompt(tokenizer, text) for text in prompt_texts]
    cache: dict[int, list[int]] = {}

    def ids_of(k: int) -> list[int]:
        if k not in cache:
            cache[k] = encode_response(tokenizer, responses[k])
        return cache[k]

    response_ids = []
    for _ in prompt_ids:
        candidates = []
        for _ in range(n):
            length = rng.randint(min_len, max_len)
            ids = list(ids_of(rng.randrange(len(responses))))
            while len(ids) < length:  # a short response is extended by another one
                ids += ids_of(rng.randrange(len(responses)))
            candidates.append(ids[:length])
        response_ids.append(candidates)
    return prompt_texts, prompt_ids, response_ids


# ----------------------------------------------------------------------------------------
# One side per fresh process
# ----------------------------------------------------------------------------------------


def param_bytes(*models: Any) -> int:
    """Bytes of the unique parameter storages held by ``models`` (tied or shared weights once)."""
    seen: dict[int, int] = {}
    for model in models:
        for param in model.parameters():
            storage = param.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _maxrss_bytes() -> int:
    # Linux reports ru_maxrss in KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_side(side: str, job: dict[str, Any]) -> dict[str, Any]:
    """Load the models of one side, warm up, time ``repeats`` scoring calls; return timings, memory, sims."""
    import torch  # imported before the RSS baseline so the baseline covers the libraries
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from actors.models import ModelSpec, load_models
    from actors.scorer import AttributionScorer, ScorerConfig
    from paper_style import load_paper_models, paper_style_latent_sims

    layer = job["layer"]
    prompt_ids, response_ids = job["prompt_ids"], job["response_ids"]
    rss_imports = _maxrss_bytes()
    started = time.perf_counter()
    if side == "paper":
        base_model, ft_model, tokenizer = load_paper_models(job["base"], job["adapter"], "float32", "cpu")
        held = param_bytes(base_model, ft_model)
        rows = [{"prompt": p, "responses": r} for p, r in zip(prompt_ids, response_ids)]

        def score(subset: list[dict[str, Any]]) -> dict[str, Any]:
            return paper_style_latent_sims(base_model, ft_model, tokenizer, subset, [layer], batch_size=4)

        warm = [{"prompt": prompt_ids[0], "responses": response_ids[0][:2]}]
    else:
        bundle = load_models(ModelSpec(base=job["base"], adapter=job["adapter"], dtype="float32", device="cpu"))
        held = param_bytes(bundle.model)
        scorer = AttributionScorer(
            bundle, ScorerConfig(layers=(layer,), metrics=("latent_sim",), batch_tokens=job["batch_tokens"])
        )

        def score(subset: Any) -> dict[str, Any]:
            prompts, responses = subset
            return {"ours": [row["latent_sim"] for row in scorer.score_ids(prompts, responses)]}

        rows = (prompt_ids, response_ids)
        warm = ([prompt_ids[0]], [response_ids[0][:2]])
    load_s = time.perf_counter() - started
    rss_loaded = _maxrss_bytes()
    score(warm)
    times = []
    for _ in range(job["repeats"]):  # best of several: a shared host only ever adds time
        started = time.perf_counter()
        sims = score(rows)
        times.append(time.perf_counter() - started)
    return {
        "side": side,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "score_s": min(times),
        "times": times,
        "rss_imports": rss_imports,
        "rss_loaded": rss_loaded,
        "rss_peak": _maxrss_bytes(),
        "param_bytes": held,
        "sims": {mode: [values[layer] for values in per_row] for mode, per_row in sims.items()},
    }


def _side_entry(side: str, job: dict[str, Any], conn: Any) -> None:
    """Child-process entry: run one side and send its result (or the error text) back."""
    try:
        conn.send(run_side(side, job))
    except BaseException as err:  # the parent reports it; a traceback alone would be lost
        import traceback

        conn.send({"error": f"{type(err).__name__}: {err}\n{traceback.format_exc()}"})
    finally:
        conn.close()


def run_in_fresh_process(side: str, job: dict[str, Any]) -> dict[str, Any]:
    """``run_side`` in a spawned child, so its RSS covers only that side's models and work."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_side_entry, args=(side, job, sender))
    process.start()
    sender.close()
    try:
        result = receiver.recv()
    except EOFError:
        result = None
    process.join()
    if result is None:
        result = {"error": f"the {side} process died without a result (exit code {process.exitcode})"}
    if "error" in result:
        raise RuntimeError(f"{side} side failed: {result['error']}")
    return result


# ----------------------------------------------------------------------------------------
# Whole-process mode
# ----------------------------------------------------------------------------------------


def timed_process(command: list[str], log: Path) -> tuple[float, int, int]:
    """(wall seconds, exit code, peak RSS bytes) of one child process, output sent to ``log``."""
    with open(log, "w") as handle:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
        # os.wait4 gives this child's own rusage (RUSAGE_CHILDREN would mix all children)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return wall, process.returncode, usage.ru_maxrss * 1024


def selections(path: Path, layer: int) -> dict[Any, Any]:
    """``id -> selected index`` at ``layer`` from a score output JSONL."""
    out = {}
    with open(path) as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                out[row.get("id")] = (row.get("selected") or {}).get(str(layer))
    return out


def whole_process(args: argparse.Namespace, adapter: Path, tokenizer: Any, prompt_texts, response_ids, work: Path) -> None:
    """Time ``dabon score`` and ``benchmarks/paper_style.py`` as whole processes (see module doc)."""
    input_path = work / "input.jsonl"
    with open(input_path, "w") as handle:
        for j, (prompt, candidates) in enumerate(zip(prompt_texts, response_ids)):
            responses = [tokenizer.decode(ids) for ids in candidates]
            handle.write(json.dumps({"id": j, "prompt": prompt, "responses": responses}) + "\n")
    layer = str(args.layer)
    commands = {
        "ours (dabon score)": [
            sys.executable, "-m", "pipelines.cli", "score", "--base", BASE, "--adapter", str(adapter),
            "--input", str(input_path), "--output", str(work / "ours.jsonl"), "--metrics", "latent_sim", "--layers", layer,
            "--batch-tokens", str(args.batch_tokens),
        ],
        "paper-style": [
            sys.executable, str(REPO / "benchmarks" / "paper_style.py"), "--base", BASE, "--adapter", str(adapter),
            "--input", str(input_path), "--output", str(work / "paper.jsonl"), "--layers", layer,
        ],
    }
    outputs = {"ours (dabon score)": work / "ours.jsonl", "paper-style": work / "paper.jsonl"}
    have_cli = importlib.util.find_spec("pipelines.cli") is not None
    print(f"whole-process input: {input_path} ({len(prompt_texts)} prompts x {args.n} responses, decoded text)")
    print("timing: wall time of each whole process (imports, model loading, scoring, writing); logs beside the input")
    walls: dict[str, float] = {}
    for name, command in commands.items():
        if name.startswith("ours") and not have_cli:
            print(f"{name:>20}: SKIPPED, pipelines/cli.py not found (command would be: {' '.join(command[1:])})")
            continue
        log = work / (outputs[name].stem + ".log")
        wall, code, rss = timed_process(command, log)
        if code != 0:
            print(f"{name:>20}: FAILED with exit code {code} after {wall:.1f} s; see {log}")
            continue
        walls[name] = wall
        print(f"{name:>20}: wall {wall:7.1f} s, peak RSS {rss / 2**20:7.0f} MiB")
    if len(walls) == 2:
        ours, paper = walls["ours (dabon score)"], walls["paper-style"]
        print(f"{'speed ratio':>20}: {paper / ours:.2f}x (paper-style wall / ours wall)")
        a, b = selections(outputs["ours (dabon score)"], args.layer), selections(outputs["paper-style"], args.layer)
        same = sum(a.get(key) == b.get(key) for key in b)
        print(f"{'selections agree':>20}: {same}/{len(b)} prompts (paper-style keeps its padding bug)")


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def _max_abs_diff(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8, help="prompts (default 8)")
    parser.add_argument("--n", type=int, default=8, help="responses per prompt (default 8)")
    parser.add_argument("--layer", type=int, default=12, help="hidden-state index (default 12)")
    parser.add_argument("--min-len", type=int, default=120, help="shortest response, tokens (default 120)")
    parser.add_argument("--max-len", type=int, default=260, help="longest response, tokens (default 260)")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="ScorerConfig.batch_tokens (default 4096)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the adapter and the input (default 0)")
    parser.add_argument("--star1", default=default_star1(), help="STAR-1 JSON (default $DABON_STAR1 or ../shared/data/STAR-1.json)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per side, best reported (default 2)")
    parser.add_argument("--adapter", default=None, help="use this LoRA adapter instead of building a random one")
    parser.add_argument("--whole-process", action="store_true", help="time `dabon score` vs paper_style.py as processes instead")
    args = parser.parse_args(argv)
    if not 0 < args.min_len <= args.max_len:
        parser.error("--min-len must be > 0 and <= --max-len")
    if args.prompts < 1 or args.n < 1 or args.repeats < 1:
        parser.error("--prompts, --n and --repeats must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Build adapter and input, run both sides, print the report (see module doc)."""
    args = parse_args(argv)
    from actors.models import load_tokenizer
    from actors.selection import argmin_index

    if args.adapter:
        adapter, adapter_note = Path(args.adapter), f"given adapter {args.adapter}"
    else:
        adapter = build_adapter(BASE, args.seed)
        adapter_note = (f"RANDOM LoRA (write_random_adapter: r=16, alpha=32, 7 projections, seed {args.seed}) "
                        f"at {adapter}: speed is real, similarity values are not meaningful")
    tokenizer = load_tokenizer(BASE)
    questions, responses, source = load_texts(args.star1, args.seed)
    prompt_texts, prompt_ids, response_ids = build_input(
        tokenizer, questions, responses, args.prompts, args.n, args.min_len, args.max_len, args.seed
    )
    candidates = sum(len(c) for c in response_ids)
    response_tokens = sum(len(ids) for c in response_ids for ids in c)
    prompt_tokens = [len(p) for p in prompt_ids]
    print(f"model: {BASE} (float32, cpu)")
    print(f"adapter: {adapter_note}")
    print(f"data: {source}")
    print(f"input: {len(prompt_ids)} prompts x {args.n} responses = {candidates} candidates; "
          f"prompt tokens {min(prompt_tokens)}..{max(prompt_tokens)}, response tokens uniform in "
          f"[{args.min_len}, {args.max_len}] (total {response_tokens}); layer {args.layer}")
    if args.whole_process:
        work = Path(tempfile.mkdtemp(prefix="dabon-bench-"))
        whole_process(args, adapter, tokenizer, prompt_texts, response_ids, work)
        return 0

    job = {
        "base": BASE, "adapter": str(adapter), "layer": args.layer, "batch_tokens": args.batch_tokens,
        "prompt_ids": prompt_ids, "response_ids": response_ids, "repeats": args.repeats,
    }
    paper = run_in_fresh_process("paper", job)
    ours = run_in_fresh_process("ours", job)
    print(f"torch threads: {ours['threads']} (default); each side ran in its own spawned process: "
          f"one warm-up call on 1 prompt x 2 responses, then {args.repeats} timed call(s), best reported")
    print()
    header = f"{'':>12} {'cand/s':>8} {'score s':>8} {'load s':>7} {'peak RSS':>9} {'RSS growth':>11} {'params held':>12}"
    print(header)
    for name, result in (("paper-style", paper), ("ours", ours)):
        growth = result["rss_peak"] - result["rss_imports"]
        print(f"{name:>12} {candidates / result['score_s']:8.2f} {result['score_s']:8.2f} {result['load_s']:7.2f} "
              f"{result['rss_peak'] / 2**20:6.0f} MiB {growth / 2**20:7.0f} MiB {result['param_bytes'] / 2**20:8.0f} MiB")
    for name, result in (("paper-style", paper), ("ours", ours)):
        spread = max(result["times"]) / min(result["times"])
        note = "  <- noisy: the host's CPUs are shared, compare best times" if spread > 1.2 else ""
        print(f"{name:>12} timed calls: {', '.join(f'{t:.2f}' for t in result['times'])} s{note}")
    print(f"(RSS growth = peak RSS minus the child's RSS after importing torch/transformers/peft: "
          f"paper {paper['rss_imports'] / 2**20:.0f} MiB, ours {ours['rss_imports'] / 2**20:.0f} MiB; "
          f"peak RSS after loading: paper {paper['rss_loaded'] / 2**20:.0f} MiB, ours {ours['rss_loaded'] / 2**20:.0f} MiB)")
    print()
    print(f"speed ratio (ours / paper-style, candidates/s): {paper['score_s'] / ours['score_s']:.2f}x")
    print(f"memory ratio (paper-style / ours): peak RSS {paper['rss_peak'] / ours['rss_peak']:.2f}x, "
          f"params held {paper['param_bytes'] / ours['param_bytes']:.2f}x")
    print()
    mine, fixed, buggy = ours["sims"]["ours"], paper["sims"]["fixed"], paper["sims"]["paper"]
    flat = [value for row in mine for value in row]
    print(f"latent_sim[{args.layer}] of ours: min {min(flat):.6f}, max {max(flat):.6f}")
    print(f"max |ours - paper-style, true last token| = {_max_abs_diff(mine, fixed):.3e}  (same numbers)")
    print(f"max |ours - paper-style, position -1 (bug)| = {_max_abs_diff(mine, buggy):.3e}  (the padding bug's error)")
    spread = max(max(row) - min(row) for row in mine)
    print(f"largest spread of latent_sim among one prompt's candidates (ours): {spread:.3e}")
    changed_fixed = sum(argmin_index(a) != argmin_index(b) for a, b in zip(mine, fixed))
    changed_buggy = sum(argmin_index(a) != argmin_index(b) for a, b in zip(mine, buggy))
    print(f"argmin changed: {changed_buggy}/{len(mine)} prompts under the bug; "
          f"{changed_fixed}/{len(mine)} with the true last token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
