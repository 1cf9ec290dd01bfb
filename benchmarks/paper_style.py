"""The paper's way of computing latent similarity, kept as a baseline (METHOD.md sections 3 and 5).

What it does, on purpose the way the paper's code did:

- two full model copies: the base model and the fine-tuned model (base + LoRA adapter merged
  with peft ``merge_and_unload()``), so the weights are held twice;
- every candidate is a full sequence ``chat-templated prompt + response`` (the prompt is
  re-encoded for every candidate, nothing is shared between candidates of one prompt);
- right-padded batches of ``batch_size`` (4) sequences, in input order;
- each model runs a normal forward to full depth, through the LM head, with
  ``output_hidden_states=True``, and ``hidden_states[L][:, -1]`` is read: for every row
  shorter than the longest in its batch that is a *padding* position (the paper's bug).
  ``fix_last_token=True`` gathers the true last token instead, so a benchmark can separate the
  bug's numerical error from the speed cost.

Token ids are built exactly as ``actors.scorer.AttributionScorer`` builds them with its default
config: ``prompt_ids = tokenizer(apply_chat_template(...), add_special_tokens=False)``,
``response_ids = tokenizer(response, add_special_tokens=False)``, sequence = prompt + response.

CLI (same JSONL formats as ``dabon score``, for a whole-process timing comparison)::

    python benchmarks/paper_style.py --base smollm2-135m-instruct --adapter DIR \\
        --input IN.jsonl --output OUT.jsonl --layers 12

input rows ``{"id": ..., "prompt": str, "responses": [str, ...]}``; output rows
``{"id": ..., "latent_sim": {"12": [...]}, "selected": {"12": argmin index}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.models import ModelLoadError, load_causal_lm, load_tokenizer, resolve_device, resolve_dtype


def load_paper_models(base: str, adapter: str, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any, Any]:
    """(base model, merged fine-tuned model, tokenizer): two separate full copies of the weights.

    The fine-tuned copy is a second load of ``base`` with the LoRA ``adapter`` attached and then
    merged into its weights (``merge_and_unload``), as the paper evaluated a merged checkpoint.
    """
    from peft import PeftModel

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    adapter_dir = Path(adapter).expanduser()
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelLoadError(f"adapter {adapter!r}: missing adapter_config.json (not a peft adapter directory)")
    # an adapter that added tokens ships its own tokenizer; same rule as actors.models.load_models
    tokenizer_source = str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else base
    tokenizer = load_tokenizer(tokenizer_source)
    base_model = load_causal_lm(base, torch_dtype, device)
    ft_model = load_causal_lm(base, torch_dtype, device)
    for model in (base_model, ft_model):
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    ft_model = PeftModel.from_pretrained(ft_model, str(adapter_dir), is_trainable=False).merge_and_unload()
    return base_model, ft_model.to(device).eval(), tokenizer


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int]) -> list[int]:
    """Prompt ids: one user turn through the chat template with the generation prompt; ids pass through."""
    if not isinstance(prompt, str):
        return list(prompt)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def encode_response(tokenizer: Any, response: str | Sequence[int]) -> list[int]:
    """Response ids: the text tokenized with ``add_special_tokens=False``; ids pass through."""
    if not isinstance(response, str):
        return list(response)
    return list(tokenizer(response, add_special_tokens=False).input_ids) if response else []


def paper_style_latent_sim(
    base_model: Any,
    ft_model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    layers: Sequence[int],
    batch_size: int = 4,
    fix_last_token: bool = False,
) -> list[dict[int, list[float]]]:
    """Latent similarity per row, computed the paper's way (see module doc).

    ``rows``: dicts with ``prompt`` (text or token ids) and ``responses`` (texts or token ids).
    Returns per row ``{layer: [N cosines]}``. ``fix_last_token=False`` reads position -1 of the
    right-padded batch (padding for shorter rows); ``True`` reads each row's last real token.
    """
    mode = "fixed" if fix_last_token else "paper"
    return paper_style_latent_sims(base_model, ft_model, tokenizer, rows, layers, batch_size, (mode,))[mode]


def paper_style_latent_sims(
    base_model: Any,
    ft_model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    layers: Sequence[int],
    batch_size: int = 4,
    modes: Sequence[str] = ("paper", "fixed"),
) -> dict[str, list[dict[int, list[float]]]]:
    """Like ``paper_style_latent_sim`` for several read-out positions from the same forward passes.

    ``modes``: ``paper`` (position -1 of the padded batch) and/or ``fixed`` (true last token).
    Reading both costs no extra forward, so a benchmark can time the paper's computation once
    and still report the padding bug's error. Returns ``{mode: [per row {layer: [N floats]}]}``.
    """
    import torch

    unknown = [mode for mode in modes if mode not in ("paper", "fixed")]
    if unknown:
        raise ValueError(f"modes: unknown {unknown}; expected paper and/or fixed")
    num_layers = int(base_model.config.get_text_config().num_hidden_layers)
    bad = [layer for layer in layers if not 0 <= layer <= num_layers]
    if bad:
        raise ValueError(f"layers: {bad} out of range; this model has hidden states 0..{num_layers}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(base_model.parameters()).device
    # every candidate becomes its own full sequence, in input order (the paper did not sort)
    sequences: list[list[int]] = []
    owners: list[int] = []
    for j, row in enumerate(rows):
        prompt_ids = encode_prompt(tokenizer, row["prompt"])
        for response in row["responses"]:
            sequences.append(prompt_ids + encode_response(tokenizer, response))
            owners.append(j)
    sims = {mode: [{layer: [] for layer in layers} for _ in rows] for mode in modes}
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start:start + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, ids in enumerate(batch):  # right padding, as the paper's tokenizer call did
                input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[r, : len(ids)] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            # a normal full forward (all layers, LM head, every hidden state) per model
            base_out = base_model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
            ft_out = ft_model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
            rows_index = torch.arange(len(batch), device=device)
            positions = {"paper": torch.full_like(rows_index, width - 1), "fixed": mask.sum(-1) - 1}
            for mode in modes:
                for layer in layers:
                    a = ft_out.hidden_states[layer][rows_index, positions[mode]].float()
                    b = base_out.hidden_states[layer][rows_index, positions[mode]].float()
                    cosines = torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()
                    for r, value in enumerate(cosines):
                        sims[mode][owners[start + r]][layer].append(float(value))
            del base_out, ft_out
    return sims


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (blank lines skipped)."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Paper-style latent similarity (two merged model copies, right padding).")
    parser.add_argument("--base", required=True, help="base model: alias, local dir, .gguf or Hub id")
    parser.add_argument("--adapter", required=True, help="peft LoRA adapter directory (merged into a second copy)")
    parser.add_argument("--input", required=True, help='JSONL rows {"id", "prompt", "responses"}')
    parser.add_argument("--output", required=True, help='JSONL rows {"id", "latent_sim", "selected"}')
    parser.add_argument("--layers", default="12", help="comma-separated hidden-state indices (default 12)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per right-padded batch (paper: 4)")
    parser.add_argument("--fix-last-token", action="store_true", help="read the true last token, not position -1")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: score ``--input`` and write ``--output`` (see module doc)."""
    args = parse_args(argv)
    layers = [int(part) for part in args.layers.split(",") if part.strip()]
    rows = read_jsonl(args.input)
    base_model, ft_model, tokenizer = load_paper_models(args.base, args.adapter, args.dtype, args.device)
    sims = paper_style_latent_sim(base_model, ft_model, tokenizer, rows, layers, args.batch_size, args.fix_last_token)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as handle:
        for row, row_sims in zip(rows, sims):
            record = {
                "id": row.get("id"),
                "latent_sim": {str(layer): values for layer, values in row_sims.items()},
                "selected": {
                    str(layer): (min(range(len(values)), key=values.__getitem__) if values else None)
                    for layer, values in row_sims.items()
                },
            }
            handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
