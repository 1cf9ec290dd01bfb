"""Latent-attribution scoring of Best-of-N candidates (METHOD.md section 3).

For a prompt ``p`` and candidate responses ``r_1..r_N``, per candidate:

- ``latent_sim[L]``: cosine between the fine-tuned and the base model's ``hidden_states[L]``
  (transformers' convention: 0 = the embeddings fed to the first layer, ``n_layers`` = after the
  final norm) at the last real token of ``p + r_i``, both computed on the same token ids;
- ``kl``: mean over response tokens of KL(fine-tuned || base) of the next-token distributions
  that predict them (positions ``len(p)-1 .. len(p)+len(r_i)-2``);
- ``perplexity``: exp of the mean negative log-likelihood of the response tokens under the
  fine-tuned model (same positions);
- ``self_certainty``: mean over the same positions of KL(uniform || p_fine-tuned);
- token metrics are ``None`` for an empty response;
- any other score registered in ``actors.scores`` (a plugin named in ``scoring.plugins``): from
  the same hidden states, the same next-token distributions, or other scores of the candidates.
  What a run computes is its ``metrics`` and every score they require; each score's definition
  (direction, per layer or not, what it needs, its function) lives in ``actors.scores`` only.

How it is computed (and why it is fast):

- each prompt is run once per view (fine-tuned, base); its KV cache is kept, unpadded, and
  shared by its N candidates, so only response tokens are computed per candidate;
- a view runs only as deep as needed: with latent similarity alone the forward pass stops
  (by a hook) right after the deepest requested layer, and the LM head is never run; token
  metrics apply the LM head only to the real positions that predict response tokens;
- candidates of all prompts are sorted by length and batched under a token budget; prompt
  caches are re-padded on the left per batch and responses padded on the right, and the last
  *real* token of every row is gathered from the attention mask, never a padding position;
- sliding-window models (Gemma-3, Mistral-style ``sliding_window``, any ``layer_types`` mixing
  ``sliding_attention`` and ``full_attention``) are scored exactly: the prompt cache keeps every
  layer's full keys and the model's own window mask applies on top (``_new_cache``); models whose
  layers keep no per-token keys (linear attention, shared KV, ...) or attend bidirectionally are
  refused before any weights load (``actors.models.check_scorable``);
- ``torch.inference_mode``, the model's dtype; no Python loops over tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.chat import Prompt, Response, prompt_token_ids, response_token_ids
from actors.config import PromptConfig
from actors.errors import UserError
from actors.models import ModelBundle, ModelSpec, UnsupportedModelError, check_scorable, load_models, scoring_problem
from actors.rows import to_plain
from actors.scores import (
    BUILTIN_SCORES,
    DerivedScore,
    HiddenStateScore,
    Score,
    ScoreError,
    TokenScore,
    get_score,
    load_plugins,
    registered,
    with_requirements,
)
from actors.selection import budgeted_choice, empty_flags, is_score_rule, select_best_of_n

METRICS = tuple(score.name for score in BUILTIN_SCORES)  # the paper's scores; plugins add more


class ScorerConfig(BaseModel):
    """What to score and how.

    ``layers``: hidden-state indices of the per-layer scores, latent similarity (0..n_layers).
    ``metrics``: registered scores (``actors.scores``): latent_sim, kl, perplexity,
    self_certainty, or a plugin's; the scores they require are computed (and stored) too.
    ``plugins``: ``"module:Class"`` import paths of scores of your own, registered before
    ``metrics`` is checked (and again wherever the config is rebuilt, e.g. in a Ray actor).
    ``batch_tokens``: budget of new tokens per forward batch (rows x padded length).
    ``max_batch_rows``: most rows in one forward batch.
    ``max_padding``: most share of a batch's cells that may be padding (padding is wasted compute;
    candidates are sorted by length, so this only splits batches of very different lengths).
    ``lm_head_chunk``: positions per LM-head chunk (bounds the memory of the logits).
    The prompt itself (system prompt, response prefix) is the run's ``PromptConfig``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: tuple[int, ...] = (12,)
    plugins: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ("latent_sim",)
    batch_tokens: int = Field(default=4096, gt=0)
    max_batch_rows: int = Field(default=64, gt=0)
    max_padding: float = Field(default=0.25, ge=0.0, lt=1.0)
    lm_head_chunk: int = Field(default=512, gt=0)

    @field_validator("plugins")
    @classmethod
    def _load_plugins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        try:
            load_plugins(value)
        except ScoreError as err:
            raise ValueError(str(err)) from None
        return tuple(dict.fromkeys(value))

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = ", ".join(registered())
        if not value:
            raise ValueError(f"expected at least one of {known}")
        unknown = [m for m in value if not is_score_rule(m)]
        if unknown:
            raise ValueError(f"unknown {unknown}: expected any of {known}, or a score of scoring.plugins")
        return tuple(dict.fromkeys(value))

    @property
    def computed(self) -> tuple[str, ...]:
        """The scores a scorer with this config computes: ``metrics`` and what they require, in
        registry order."""
        load_plugins(self.plugins)  # a config unpickled in another process skipped the validators
        return with_requirements(self.metrics)

    @property
    def per_layer(self) -> bool:
        """Whether any computed score is per layer (so that ``layers`` are scored)."""
        return any(get_score(name).per_layer for name in self.computed)

    @field_validator("layers")
    @classmethod
    def _layers_sorted(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(layer < 0 for layer in value):
            raise ValueError(f"layers: expected hidden-state indices >= 0, got {list(value)}")
        return tuple(sorted(set(value)))


class ScoringInputError(UserError, ValueError):
    """Layers, models or token ids the scorer cannot score; the message names which."""


class _EarlyExit(Exception):
    """Raised by a hook once everything a pass needs has been captured."""


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one view's forward pass must capture: hidden-state indices and the final norm."""

    capture: tuple[int, ...]
    need_final: bool
    num_layers: int

    @property
    def depth(self) -> int:
        """Decoder layers that must run (also the depth of the KV cache kept)."""
        if self.need_final or self.num_layers in self.capture:
            return self.num_layers
        return max(self.capture, default=0)

    @property
    def empty(self) -> bool:
        return not self.capture and not self.need_final


@dataclasses.dataclass
class _PromptState:
    """One prompt's state in one view: KV cache (depth, 2, heads, len, dim), last-token states."""

    kv: Any | None
    last_hidden: dict[int, Any]
    last_final: Any | None


def decoder_parts(model: Any) -> tuple[Any, Any, Any]:
    """(decoder layers, final norm, LM head) of a causal LM, a ``PeftModel`` unwrapped."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else getattr(inner, "model", None)
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    if layers is None or norm is None:
        raise UnsupportedModelError(
            f"{type(inner).__name__}: scoring needs a decoder with `layers` and a final `norm` "
            "(Llama, Qwen2/3, Mistral, Gemma, Phi-3 and similar architectures)"
        )
    return layers, norm, model.get_output_embeddings()


def last_real_index(attention_mask: Any) -> Any:
    """Index of the last position whose mask is 1, per row, for any padding side."""
    width = attention_mask.shape[-1]
    return width - 1 - attention_mask.flip(-1).int().argmax(-1)


def _output_tensor(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) else output


class AttributionScorer:
    """Scores Best-of-N candidates of a fine-tuned model against its base (see module doc).

    ``models``: a ``ModelBundle`` with a fine-tuned model (adapter or full copy).
    ``config``: a ``ScorerConfig``. ``prompt``: the ``PromptConfig`` that text prompts are
    encoded with (``score`` / ``score_batch``; ``score_ids`` takes ids). ``score*`` methods return,
    per prompt, a dict with one entry per computed score (``config.computed``): ``{layer: [N
    floats]}`` for a per-layer score such as ``latent_sim``, ``[N float|None]`` otherwise (token
    scores are ``None`` for an empty response).
    """

    def __init__(self, models: ModelBundle, config: ScorerConfig | None = None, prompt: PromptConfig | None = None) -> None:
        import torch

        if not models.has_finetuned:
            raise ScoringInputError("scoring needs a fine-tuned model: give an adapter or a finetuned model with the base")
        # the same refusal as from_spec, for bundles built elsewhere (before any forward pass)
        named = [(models.spec.finetuned or models.spec.base, models.model), (models.spec.base, models.base_model)]
        for name, module in named:
            problem = None if module is None else scoring_problem(module.config)
            if problem:
                inner = module.get_base_model() if hasattr(module, "get_base_model") else module
                raise UnsupportedModelError(f"{name!r} ({type(inner).__name__}) cannot be scored: {problem}")
        self.models = models
        self.config = config or ScorerConfig()
        self.prompt = prompt or PromptConfig()
        self.tokenizer = models.tokenizer
        self.num_layers = models.num_layers
        too_deep = [layer for layer in self.config.layers if layer > self.num_layers]
        if too_deep:
            raise ScoringInputError(
                f"layers: {too_deep} out of range; this model has hidden states 0..{self.num_layers}"
            )
        self.scores: list[Score] = [get_score(name) for name in self.config.computed]
        per_layer = [score.name for score in self.scores if score.per_layer]
        if per_layer and not self.config.layers:
            raise ScoringInputError(f"layers: {', '.join(per_layer)} needs at least one layer")
        hidden = self.config.layers if any(isinstance(score, HiddenStateScore) for score in self.scores) else ()
        token_scores = [score for score in self.scores if isinstance(score, TokenScore)]
        self.plans = {
            "finetuned": _Plan(hidden, bool(token_scores), self.num_layers),
            "base": _Plan(hidden, any(score.needs_base_logits for score in token_scores), self.num_layers),
        }
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.device = torch.device(models.device)
        text_config = models.model.config.get_text_config()
        self.max_positions = getattr(text_config, "max_position_embeddings", None)
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self._head_checked = False

    @classmethod
    def from_spec(cls, spec: ModelSpec, config: ScorerConfig | None = None, prompt: PromptConfig | None = None) -> "AttributionScorer":
        """Load the models of ``spec`` and build a scorer; a model it cannot score exactly is refused
        from its config, before any weights load (``actors.models.check_scorable``)."""
        check_scorable(spec)
        return cls(load_models(spec), config, prompt)

    # ------------------------------------------------------------------ encoding

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Prompt token ids (``actors.chat.prompt_token_ids`` with this scorer's prompt config)."""
        return prompt_token_ids(self.tokenizer, prompt, self.prompt)

    def encode_response(self, response: Response) -> list[int]:
        """Response token ids (``actors.chat.response_token_ids``)."""
        return response_token_ids(self.tokenizer, response)

    # ------------------------------------------------------------------ public API

    def score(self, prompt: Prompt, responses: Sequence[Response]) -> dict[str, Any]:
        """Scores of the N ``responses`` to one ``prompt``."""
        return self.score_batch([prompt], [responses])[0]

    def score_batch(self, prompts: Sequence[Prompt], responses: Sequence[Sequence[Response]]) -> list[dict[str, Any]]:
        """Scores for several prompts, each with its own list of candidate responses."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} response lists")
        prompt_ids = [self.encode_prompt(prompt) for prompt in prompts]
        response_ids = [[self.encode_response(r) for r in candidates] for candidates in responses]
        return self.score_ids(prompt_ids, response_ids)

    def score_ids(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[Sequence[int]]]) -> list[dict[str, Any]]:
        """Scores on exact token ids: ``prompt_ids[j]`` and its candidates ``response_ids[j][i]``."""
        import torch

        for j, (prompt, candidates) in enumerate(zip(prompt_ids, response_ids)):
            if not prompt:
                raise ScoringInputError(f"prompt {j}: empty prompt token ids")
            for i, candidate in enumerate(candidates):
                total = len(prompt) + len(candidate)
                if self.max_positions and total > self.max_positions:
                    raise ScoringInputError(
                        f"prompt {j}, response {i}: {total} tokens exceed the model's {self.max_positions} positions"
                    )
        with torch.inference_mode():
            states: dict[str, list[_PromptState]] = {}
            rows: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
            for view, plan in self.plans.items():
                if plan.empty:
                    continue
                with self._view(view) as module:
                    states[view] = self._prompt_pass(module, plan, prompt_ids)
                    rows[view] = self._candidate_pass(module, plan, prompt_ids, response_ids, states[view])
            token_metrics = self._token_metrics(prompt_ids, response_ids, states, rows)
        return self._assemble(prompt_ids, response_ids, states, rows, token_metrics)

    # ------------------------------------------------------------------ forward passes

    @contextlib.contextmanager
    def _view(self, view: str):
        context = self.models.finetuned_view() if view == "finetuned" else self.models.base_view()
        with context as module:
            yield module

    def _forward(self, module: Any, plan: _Plan, **inputs: Any) -> tuple[dict[int, Any], Any | None]:
        """Run ``module`` with hooks that record the plan's hidden states, stopping early."""
        layers, norm, _ = decoder_parts(module)
        captured: dict[int, Any] = {}
        final: list[Any] = []
        handles = []

        def record(index: int, stop: bool):
            def hook(_module, _args, output):
                captured[index] = _output_tensor(output)
                if stop:
                    raise _EarlyExit
            return hook

        def record_input(index: int, stop: bool):
            def hook(_module, args, kwargs):
                captured[index] = args[0] if args else kwargs["hidden_states"]
                if stop:
                    raise _EarlyExit
            return hook

        depth = plan.depth
        try:
            for index in plan.capture:
                if index == 0:
                    handles.append(layers[0].register_forward_pre_hook(record_input(0, depth == 0), with_kwargs=True))
                elif index < self.num_layers:
                    handles.append(layers[index - 1].register_forward_hook(record(index, index == depth and not plan.need_final)))

            def on_norm(_module, _args, output):
                tensor = _output_tensor(output)
                if self.num_layers in plan.capture:
                    captured[self.num_layers] = tensor
                if plan.need_final:
                    final.append(tensor)
                raise _EarlyExit

            if depth == self.num_layers:
                handles.append(norm.register_forward_hook(on_norm))
            try:
                module(**inputs, use_cache=True)
            except _EarlyExit:
                pass
            else:  # pragma: no cover - a hook always stops the pass
                raise RuntimeError("the scoring pass ran to the end without reaching its stop hook")
        finally:
            for handle in handles:
                handle.remove()
        return captured, (final[0] if final else None)

    def _new_cache(self, module: Any) -> Any:
        """A cache whose every layer keeps all its keys, sliding-window layers included.

        ``DynamicCache(config=...)`` gives sliding layers a ``DynamicSlidingWindowLayer`` that keeps
        only the last ``sliding_window - 1`` positions of the padded batch; a shared prompt cache cut
        that way can neither be split per prompt nor re-padded. With full layers the model still
        applies its sliding window: its sliding mask is built from absolute cache positions, and
        the scorer's padding keeps the distance between any two real tokens what it is in the
        unpadded sequence."""
        from transformers import DynamicCache

        return DynamicCache()

    def _prompt_pass(self, module: Any, plan: _Plan, prompt_ids: Sequence[Sequence[int]]) -> list[_PromptState]:
        """Run every prompt once (left-padded batches); keep its unpadded KV cache and last-token states."""
        import torch

        order = sorted(range(len(prompt_ids)), key=lambda j: len(prompt_ids[j]), reverse=True)
        states: list[_PromptState | None] = [None] * len(prompt_ids)
        for batch in self._batches(order, [len(prompt_ids[j]) for j in order]):
            width = max(len(prompt_ids[j]) for j in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, j in enumerate(batch):
                length = len(prompt_ids[j])
                input_ids[row, width - length:] = torch.tensor(prompt_ids[j], dtype=torch.long)
                mask[row, width - length:] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = self._new_cache(module)
            captured, final = self._forward(
                module, plan,
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device), past_key_values=cache,
            )
            last = last_real_index(mask.to(self.device))
            rows = torch.arange(len(batch), device=self.device)
            kv_all = None
            if plan.depth > 0:
                kv_all = torch.stack([
                    torch.stack([cache.layers[layer].keys, cache.layers[layer].values]) for layer in range(plan.depth)
                ])  # (depth, 2, batch, heads, width, head_dim)
            for row, j in enumerate(batch):
                length = len(prompt_ids[j])
                states[j] = _PromptState(
                    kv=None if kv_all is None else kv_all[:, :, row, :, width - length:].clone(),
                    last_hidden={index: captured[index][rows[row], last[row]].clone() for index in plan.capture},
                    last_final=None if final is None else final[rows[row], last[row]].clone(),
                )
        return states  # type: ignore[return-value]

    def _candidate_pass(
        self,
        module: Any,
        plan: _Plan,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[Sequence[int]]],
        states: list[_PromptState],
    ) -> dict[tuple[int, int], dict[str, Any]]:
        """Run every non-empty response on its prompt's shared cache; return per (prompt, candidate)
        the last-token hidden states and, when needed, the final-norm states that predict tokens 1.."""
        import torch

        items = [(j, i) for j, candidates in enumerate(response_ids) for i, ids in enumerate(candidates) if ids]
        items.sort(key=lambda item: len(response_ids[item[0]][item[1]]), reverse=True)
        lengths = {item: len(response_ids[item[0]][item[1]]) for item in items}
        results: dict[tuple[int, int], dict[str, Any]] = {}
        for batch in self._batches(items, [lengths[item] for item in items]):
            width = max(lengths[item] for item in batch)
            prompt_width = max(len(prompt_ids[j]) for j, _ in batch) if plan.depth > 0 else 0
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            response_mask = torch.zeros((len(batch), width), dtype=torch.long)
            prompt_mask = torch.zeros((len(batch), prompt_width), dtype=torch.long)
            positions = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (j, i) in enumerate(batch):
                ids = response_ids[j][i]
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                response_mask[row, : len(ids)] = 1
                positions[row] = len(prompt_ids[j]) + torch.arange(width)
                if prompt_width:
                    prompt_mask[row, prompt_width - len(prompt_ids[j]):] = 1
            inputs: dict[str, Any] = {"input_ids": input_ids.to(self.device), "position_ids": positions.to(self.device)}
            if plan.depth > 0:
                first = states[batch[0][0]].kv
                depth, _, heads, _, head_dim = first.shape
                buffer = first.new_zeros((depth, 2, len(batch), heads, prompt_width, head_dim))
                for row, (j, _) in enumerate(batch):
                    buffer[:, :, row, :, prompt_width - len(prompt_ids[j]):] = states[j].kv
                cache = self._new_cache(module)
                for layer in range(depth):
                    cache.update(buffer[layer, 0], buffer[layer, 1], layer)
                inputs["past_key_values"] = cache
                inputs["attention_mask"] = torch.cat([prompt_mask, response_mask], dim=1).to(self.device)
            else:
                inputs["attention_mask"] = response_mask.to(self.device)
            captured, final = self._forward(module, plan, **inputs)
            response_mask = response_mask.to(self.device)
            last = last_real_index(response_mask)
            rows = torch.arange(len(batch), device=self.device)
            gathered = {index: captured[index][rows, last] for index in plan.capture}
            predicting = None
            if final is not None:
                # positions 0..len-2 of the response predict its tokens 1..len-1
                predicting = response_mask.clone()
                predicting[rows, last] = 0
            for row, item in enumerate(batch):
                entry: dict[str, Any] = {"last_hidden": {index: gathered[index][row].clone() for index in plan.capture}}
                if final is not None:
                    entry["final"] = final[row][predicting[row].bool()].clone()
                results[item] = entry
        return results

    def _batches(self, order: Sequence[Any], lengths: Sequence[int]) -> Iterable[list[Any]]:
        """Greedy batches of ``order`` (sorted longest first): rows x longest <= batch_tokens,
        at most max_batch_rows rows, and at most a max_padding share of padded cells."""
        batch: list[Any] = []
        width = real = 0
        for item, length in zip(order, lengths):
            new_width, new_real = max(width, length), real + length
            cells = new_width * (len(batch) + 1)
            if batch and (
                cells > self.config.batch_tokens
                or len(batch) >= self.config.max_batch_rows
                or cells - new_real > self.config.max_padding * cells
            ):
                yield batch
                batch, new_width, new_real = [], length, length
            batch.append(item)
            width, real = new_width, new_real
        if batch:
            yield batch

    # ------------------------------------------------------------------ token metrics

    def _head(self, view: str, hidden: Any) -> Any:
        """Log-probabilities (float32) of the LM head of ``view`` on final-norm states."""
        import torch

        with self._view(view) as module:
            logits = decoder_parts(module)[2](hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return torch.log_softmax(logits, dim=-1)

    def _check_head(self) -> None:
        """Once: our LM-head path must reproduce the model's own logits (catches scaled heads)."""
        import torch

        if self._head_checked:
            return
        probe = torch.tensor([[self.pad_id] * 3], device=self.device)
        with self._view("finetuned") as module:
            reference = torch.log_softmax(module(input_ids=probe).logits[0, -1].float(), dim=-1)
            _, final = self._forward(module, _Plan((), True, self.num_layers), input_ids=probe)
        ours = self._head("finetuned", final[0, -1])
        if not torch.allclose(ours, reference, atol=1e-3, rtol=1e-3):
            raise UnsupportedModelError(
                f"{type(self.models.model).__name__}: its logits are not lm_head(final norm); token metrics unsupported"
            )
        self._head_checked = True

    def _token_metrics(self, prompt_ids, response_ids, states, rows) -> dict[tuple[int, int], dict[str, float]]:
        """Every ``TokenScore`` of the run per non-empty (prompt, candidate): the mean of its
        per-token values over the response, through its ``finish``."""
        import torch

        token_scores = [score for score in self.scores if isinstance(score, TokenScore)]
        if not token_scores:
            return {}
        self._check_head()
        items = [(j, i) for j, candidates in enumerate(response_ids) for i, ids in enumerate(candidates) if ids]
        if not items:
            return {}

        def stacked(view: str) -> Any:
            parts = []
            for j, i in items:
                parts.append(states[view][j].last_final.unsqueeze(0))
                parts.append(rows[view][(j, i)]["final"])
            return torch.cat(parts)

        finetuned = stacked("finetuned")
        base = stacked("base") if any(score.needs_base_logits for score in token_scores) else None
        targets = torch.tensor([t for j, i in items for t in response_ids[j][i]], device=self.device)
        segment = torch.repeat_interleave(
            torch.arange(len(items), device=self.device),
            torch.tensor([len(response_ids[j][i]) for j, i in items], device=self.device),
        )
        sums = {score.name: torch.zeros(len(items), dtype=torch.float64, device=self.device) for score in token_scores}
        chunk = self.config.lm_head_chunk
        for start in range(0, targets.shape[0], chunk):
            stop = start + chunk
            logp = self._head("finetuned", finetuned[start:stop])
            logq = self._head("base", base[start:stop]) if base is not None else None
            for score in token_scores:
                values = score.token_values(logp, logq if score.needs_base_logits else None, targets[start:stop])
                sums[score.name].index_add_(0, segment[start:stop], values.double())
        counts = torch.tensor([len(response_ids[j][i]) for j, i in items], dtype=torch.float64, device=self.device)
        out: dict[tuple[int, int], dict[str, float]] = {item: {} for item in items}
        for score in token_scores:
            means = (sums[score.name] / counts).tolist()
            for item, value in zip(items, means):
                out[item][score.name] = score.finish(value)
        return out

    # ------------------------------------------------------------------ output

    def _assemble(self, prompt_ids, response_ids, states, rows, token_metrics) -> list[dict[str, Any]]:
        """Per prompt, every computed score in registry order (a score after those it requires)."""
        results = []
        for j, candidates in enumerate(response_ids):
            result: dict[str, Any] = {}
            empty = empty_flags(candidates)
            for score in self.scores:
                if isinstance(score, HiddenStateScore):
                    result[score.name] = {}
                    for layer in self.config.layers:
                        values = []
                        for i, ids in enumerate(candidates):
                            if ids:
                                a = rows["finetuned"][(j, i)]["last_hidden"][layer]
                                b = rows["base"][(j, i)]["last_hidden"][layer]
                            else:  # an empty response ends at the prompt's last token
                                a = states["finetuned"][j].last_hidden[layer]
                                b = states["base"][j].last_hidden[layer]
                            values.append(score.from_hidden(a, b))
                        result[score.name][layer] = values
                elif isinstance(score, TokenScore):
                    result[score.name] = [token_metrics[(j, i)][score.name] if ids else None
                                          for i, ids in enumerate(candidates)]
                elif isinstance(score, DerivedScore):
                    inputs = {name: result[name] for name in score.requires}
                    if score.per_layer:
                        result[score.name] = {layer: self._derived(score, inputs, empty, layer)
                                              for layer in self.config.layers}
                    else:
                        result[score.name] = self._derived(score, inputs, empty, None)
            results.append(result)
        return results

    @staticmethod
    def _derived(score: DerivedScore, inputs: dict[str, Any], empty: list[bool], layer: int | None) -> list[float | None]:
        values = list(score.combine(inputs, empty, layer))
        if len(values) != len(empty):
            raise ScoreError(f"score {score.name}: combine returned {len(values)} values for {len(empty)} candidates")
        return [None if value is None else float(value) for value in values]


def latent_column(layer: int) -> str:
    """Name of the per-sample latent-similarity column of ``layer`` in evaluation shards."""
    return get_score("latent_sim").column(layer)


def _json_number(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def scores_row(row_id: Any, scores: dict[str, Any], layers: Sequence[int], empty: Sequence[bool] | None = None,
               rule: str = "latent_sim", threshold: float | None = None) -> dict[str, Any]:
    """One ``dabon score`` output row from a scorer result: every score in registry order (a
    per-layer score as ``{"<L>": [N]}``, others as ``[N]``; ``None`` for a missing value, e.g. a
    token metric of an empty response), then the choice of ``rule`` (per layer for a per-layer
    score: ``{"<L>": index}``; an empty response, ``empty[i]``, only when all are) when its scores
    are there. With a ``threshold`` the choice is the budgeted rule's (``actors.selection.
    budgeted_choice``) and the row also has ``threshold`` and ``decided_by`` (``"score"`` or
    ``"plain"``, per layer like ``selected``). The Serve app's scoring route answers with the same row."""
    out: dict[str, Any] = {"id": row_id}
    for name in registered():
        if name not in scores:
            continue
        if get_score(name).per_layer:
            out[name] = {str(layer): [_json_number(v) for v in scores[name][layer]] for layer in layers}
        else:
            out[name] = [_json_number(v) for v in scores[name]]
    if rule in scores:
        per_layer = get_score(rule).per_layer
        values = {str(layer): scores[rule][layer] for layer in layers} if per_layer else {"": scores[rule]}
        if threshold is None:
            selected = {key: select_best_of_n(rule, v, empty=empty) for key, v in values.items()}
        else:
            choices = {key: budgeted_choice(rule, v, empty, threshold) for key, v in values.items()}
            selected = {key: choice.index for key, choice in choices.items()}
            decided = {key: choice.decided_by for key, choice in choices.items()}
        out["selected"] = selected if per_layer else selected[""]
        if threshold is not None:
            out["threshold"] = threshold
            out["decided_by"] = decided if per_layer else decided[""]
    return out


class ScorerWorker:
    """Loads a scorer from config; a ``map_batches`` callable class.

    ``__call__`` takes a batch with a prompt column and a responses column (lists of strings or
    token-id lists; ``prompt_ids`` / ``response_ids`` columns, when present, are used instead) and
    adds one column per computed score (``<name>_<L>`` per layer for a per-layer score such as
    ``latent_sim``), each a list of N values per row.
    """

    def __init__(
        self,
        spec: ModelSpec,
        config: ScorerConfig | None = None,
        prompt: PromptConfig | None = None,
        prompt_column: str = "prompt",
        responses_column: str = "responses",
        torch_threads: int | None = None,
    ) -> None:
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.scorer = AttributionScorer.from_spec(spec, config, prompt)
        self.prompt_column = prompt_column
        self.responses_column = responses_column

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        # exact token ids (e.g. from the sampler) take precedence over text
        if "prompt_ids" in batch:
            prompts = [to_plain(p) for p in batch["prompt_ids"]]
        else:
            prompts = [to_plain(p) for p in batch[self.prompt_column]]
        column = "response_ids" if "response_ids" in batch else self.responses_column
        responses = [[to_plain(r) for r in candidates] for candidates in batch[column]]
        scores = self.scorer.score_batch(prompts, responses)
        out = {key: list(values) for key, values in batch.items()}
        for score in self.scorer.scores:
            if score.per_layer:
                for layer in self.scorer.config.layers:
                    out[score.column(layer)] = [row[score.name][layer] for row in scores]
            else:
                out[score.name] = [row[score.name] for row in scores]
        return out
