"""Save and load TopK SAEs in the seed's `.pt` format and in SAELens's directory format.

Both formats hold folded weights (input_scale = 1), so a file encodes raw activations directly.

- Seed: `sae_weights.pt`, a torch-saved dict of W_enc, b_enc, W_dec, b_dec and nothing else (the seed's
  loaders read exactly that). k and provenance go to a `bra_sae.json` sidecar beside it; without one,
  k defaults to the seed's 32.
- SAELens 6.x: a directory with `cfg.json` and `sae_weights.safetensors`, as `TopKSAE.save_model` writes
  it, with `apply_b_dec_to_input: false` because the seed encodes x, not x - b_dec. SAELens keeps unknown
  `metadata` entries through load and save (it drops unknown top-level keys), so our provenance goes in
  `metadata["bra"]`.

Writes are atomic through `bra.fsutil`: a temp file or directory beside the target, fsync, then a rename (zarr
`_atomic_write`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bra.errors import SAEError
from bra.fsutil import atomic_dir, atomic_file, write_text_atomic
from bra.sae.files import SAELENS_CFG, SAELENS_WEIGHTS, SEED_WEIGHTS  # noqa: F401 (re-exported)
from bra.sae.model import DTYPES, PARAM_NAMES, SEED_K, SAEConfig, TopKSAE

logger = logging.getLogger(__name__)

BRA_CFG = "bra_sae.json"
"""Sidecar with our config and provenance, for formats that cannot carry them (the seed `.pt`)."""

SAELENS_FORMAT_VERSION = "6.54.12"
"""SAELens release whose `cfg.json` layout we write and test against. SAELens reads
`metadata.sae_lens_version` to decide whether to convert a pre-6.0 layout, so it must be >= 6."""
BRA_FORMAT_VERSION = 1
"""Version of our provenance block (`bra_sae.json`, `metadata.bra`)."""

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_LAYER_RE = re.compile(r"\.(\d+)(?:\.|$)")


class SAEFormatError(SAEError, ValueError):
    """A file is not a well-formed SAE of a format we accept, or it is unsafe to load.

    A ValueError for callers of this module, and a BraError so the CLIs report it as a user error."""


# ------------------------------------------------------------------------------------------- helpers


def _folded_state_dict(sae: TopKSAE) -> dict[str, torch.Tensor]:
    """Folded parameters as contiguous CPU tensors, in `PARAM_NAMES` order."""
    folded = sae.folded()
    return {name: getattr(folded, name).detach().cpu().contiguous() for name in PARAM_NAMES}


def _provenance(sae: TopKSAE, weights_file: str) -> dict[str, Any]:
    """Our config (with input_scale folded to 1) plus the scale that was folded in."""
    cfg = dataclasses.replace(sae.cfg, input_scale=1.0)
    return {
        "format_version": BRA_FORMAT_VERSION,
        "weights_file": weights_file,
        "folded_input_scale": sae.cfg.input_scale,
        "config": cfg.to_dict(),
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; malformed JSON or another type is an SAEFormatError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFormatError(f"{path}: malformed JSON ({first_line(e)})") from e
    if not isinstance(data, dict):
        raise SAEFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file on the CPU; a truncated or foreign file is an SAEFormatError."""
    if not path.is_file():
        raise SAEFormatError(f"{path}: missing")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise SAEFormatError(f"{path}: not a readable safetensors file ({first_line(e)})") from e


def layer_from_hook(hook_name: str) -> int:
    """Block index in a hook name (`blocks.12.hook_resid_post`, `model.layers.15`), else -1."""
    match = _LAYER_RE.search(hook_name)
    return int(match.group(1)) if match else -1


def _build(source: Path, base: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> TopKSAE:
    """Config from `base`, then the SAE; any inconsistency becomes an SAEFormatError naming `source`."""
    try:
        if float(base.get("input_scale", 1.0)) != 1.0:
            raise SAEFormatError(f"{source}: stored weights are folded, so input_scale must be 1.0")
        cfg = SAEConfig.from_dict(base)
        return TopKSAE.from_state_dict(cfg, state_dict)
    except (ValueError, TypeError) as e:  # TypeError: a wrongly typed field (k: "eight") reached a comparison
        raise SAEFormatError(f"{source}: {e}") from e


# ---------------------------------------------------------------------------------------------- seed


def save_seed(sae: TopKSAE, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the folded W_enc, b_enc, W_dec, b_dec to `path` (a `.pt` file or a directory) via torch.save.

    Also writes `bra_sae.json` beside it with k and provenance. Returns the weights path.
    """
    path = Path(path)
    if path.is_dir():
        path = path / SEED_WEIGHTS
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = _folded_state_dict(sae)
    with atomic_file(path) as tmp:
        torch.save(state_dict, tmp)
    # Sidecar last: a reader that finds it can trust the weights it names are complete.
    _write_json(path.parent / BRA_CFG, _provenance(sae, path.name))
    logger.info("saved seed-format SAE to %s", path)
    return path


def _read_sidecar(weights: Path) -> dict[str, Any]:
    """Config from a `bra_sae.json` beside `weights` that names it; {} when there is none."""
    sidecar = weights.parent / BRA_CFG
    if not sidecar.is_file():
        return {}
    data = read_json(sidecar)
    if data.get("weights_file") != weights.name:
        logger.warning("%s describes %s, not %s; ignoring it", sidecar, data.get("weights_file"),
                       weights.name)
        return {}
    return dict(data["config"])


def load_seed(path: str | os.PathLike[str], cfg_overrides: dict[str, Any] | None = None) -> TopKSAE:
    """Load a seed-format checkpoint (a `.pt` file, or a directory holding `sae_weights.pt`).

    d_model, d_sae and dtype come from the tensors, k and provenance from a `bra_sae.json` sidecar if
    present (else k = 32, the seed's); `cfg_overrides` wins over both. Only plain tensors are accepted:
    `torch.load(weights_only=True)` refuses pickled code, and we report that as SAEFormatError.
    """
    path = Path(path)
    if path.is_dir():
        path = path / SEED_WEIGHTS
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SAEFormatError(
            f"refusing checkpoint {path}: it contains pickled code (weights_only=True)"
        ) from e
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:  # truncated zip, not a torch file
        raise SAEFormatError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                             f"{first_line(e)})") from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SAEFormatError(f"{path}: expected a dict of tensors {list(PARAM_NAMES)}, "
                             f"got {type(obj).__name__}")
    if set(obj) != set(PARAM_NAMES):
        raise SAEFormatError(f"{path}: expected keys {list(PARAM_NAMES)}, got {sorted(obj)}")
    W_enc = obj["W_enc"]
    if W_enc.ndim != 2 or W_enc.dtype not in _DTYPE_NAMES:
        raise SAEFormatError(f"{path}: W_enc must be a 2-D float tensor, "
                             f"got {tuple(W_enc.shape)} {W_enc.dtype}")
    base: dict[str, Any] = {
        "d_model": W_enc.shape[0],
        "d_sae": W_enc.shape[1],
        "k": SEED_K,
        "dtype": _DTYPE_NAMES[W_enc.dtype],
    }
    sidecar = _read_sidecar(path)
    if not sidecar and not (cfg_overrides and "k" in cfg_overrides):
        logger.info("%s records no k; assuming the seed's k=%d", path, SEED_K)
    base.update(sidecar)
    base.update(cfg_overrides or {})
    return _build(path, base, obj)


# ------------------------------------------------------------------------------------------- SAELens


def saelens_config(sae: TopKSAE) -> dict[str, Any]:
    """`cfg.json` contents for the folded `sae`, in SAELens 6.54 `TopKSAE.save_model` layout."""
    cfg = sae.cfg
    return {
        "d_in": cfg.d_model,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        # The seed encodes x, not x - b_dec; SAELens's default (true) would shift every pre-activation.
        "apply_b_dec_to_input": False,
        # input_scale is folded into the weights, so SAELens must not rescale inputs itself.
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            # SAELens's own converters write None for SAEs it did not train.
            "sae_lens_training_version": None,
            "hook_name": cfg.hook_name or None,
            "model_name": cfg.model_name or None,
            "bra": _provenance(sae, SAELENS_WEIGHTS),
        },
        "k": cfg.k,
        "rescale_acts_by_decoder_norm": False,
        "architecture": "topk",
    }


def save_saelens(sae: TopKSAE, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Export to a SAELens-loadable directory (`cfg.json`, `sae_weights.safetensors`), atomically.

    Refuses a non-empty `directory` unless `overwrite`. Returns the directory.
    """
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} is not empty; pass overwrite=True to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(directory) as tmp:
        save_file(_folded_state_dict(sae), str(tmp / SAELENS_WEIGHTS))
        _write_json(tmp / SAELENS_CFG, saelens_config(sae))
    logger.info("saved SAELens-format SAE to %s", directory)
    return directory


def load_saelens(directory: str | os.PathLike[str], cfg_overrides: dict[str, Any] | None = None) -> TopKSAE:
    """Load a SAELens 6.x TopK directory (ours or SAELens's own).

    `apply_b_dec_to_input: true` (SAELens's default) is converted exactly in real arithmetic by folding
    b_dec into b_enc: (x - b_dec) @ W_enc + b_enc = x @ W_enc + (b_enc - b_dec @ W_enc). Options with no
    seed equivalent (input normalisation, decoder-norm rescaling, reshaping) are refused.
    """
    directory = Path(directory)
    raw = read_json(directory / SAELENS_CFG)
    if raw.get("architecture") != "topk":
        raise SAEFormatError(f"{directory}: architecture {raw.get('architecture')!r} is not 'topk'")
    for key, allowed in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if raw.get(key, "none") != allowed:
            raise SAEFormatError(f"{directory}: {key}={raw[key]!r} is not supported (only {allowed!r})")
    if raw.get("rescale_acts_by_decoder_norm", False):
        raise SAEFormatError(f"{directory}: rescale_acts_by_decoder_norm=true is not supported")
    missing_keys = sorted({"d_in", "d_sae", "k"} - set(raw))
    if missing_keys:
        raise SAEFormatError(f"{directory}: {SAELENS_CFG} lacks {missing_keys}")
    state_dict = load_safetensors(directory / SAELENS_WEIGHTS)
    drop_unit_scaling_factor(directory, state_dict)
    if not set(PARAM_NAMES) <= set(state_dict):
        raise SAEFormatError(f"{directory}: weights lack {sorted(set(PARAM_NAMES) - set(state_dict))}")
    if raw.get("apply_b_dec_to_input", True):
        logger.info("%s: folding b_dec into b_enc (apply_b_dec_to_input=true)", directory)
        b_enc = state_dict["b_enc"].double() - state_dict["b_dec"].double() @ state_dict["W_enc"].double()
        state_dict["b_enc"] = b_enc.to(state_dict["b_enc"].dtype)
    metadata = raw.get("metadata") or {}
    hook_name = metadata.get("hook_name") or ""
    base: dict[str, Any] = {
        "d_model": raw["d_in"],
        "d_sae": raw["d_sae"],
        "k": raw["k"],
        "dtype": raw.get("dtype", "float32"),
        "model_name": metadata.get("model_name") or "",
        "hook_name": hook_name,
        "layer": layer_from_hook(hook_name),
    }
    bra = metadata.get("bra") or {}
    if bra:
        ours = bra["config"]
        clash = {k: (ours[k], base[k]) for k in ("d_model", "d_sae", "k", "dtype") if ours.get(k) != base[k]}
        if clash:
            raise SAEFormatError(f"{directory}: metadata.bra disagrees with cfg.json (bra, cfg): {clash}")
        base = dict(ours)
    base.update(cfg_overrides or {})
    return _build(directory, base, state_dict)


def drop_unit_scaling_factor(directory: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Older SAELens files carry an all-ones `scaling_factor`; SAELens drops it, so do we."""
    scale = state_dict.get("scaling_factor")
    if scale is None:
        return
    if not torch.all(scale == 1):
        raise SAEFormatError(f"{directory}: a non-unit finetuning scaling_factor is not supported")
    del state_dict["scaling_factor"]


# ---------------------------------------------------------------------------------------- dispatch


def load_sae(path: str | os.PathLike[str], cfg_overrides: dict[str, Any] | None = None) -> TopKSAE:
    """Load either format: a directory with `cfg.json` (SAELens), or a `.pt` file or a directory with
    `sae_weights.pt` (seed). A path to `cfg.json` or `sae_weights.safetensors` means its directory."""
    path = Path(path)
    if path.is_dir():
        if (path / SAELENS_CFG).is_file():
            return load_saelens(path, cfg_overrides)
        if (path / SEED_WEIGHTS).is_file():
            return load_seed(path, cfg_overrides)
        raise SAEFormatError(f"{path}: holds neither {SAELENS_CFG} nor {SEED_WEIGHTS}")
    if not path.exists():
        raise FileNotFoundError(path)
    if path.suffix in (".pt", ".pth"):
        return load_seed(path, cfg_overrides)
    if path.name in (SAELENS_CFG, SAELENS_WEIGHTS):
        return load_saelens(path.parent, cfg_overrides)
    raise SAEFormatError(f"{path}: not a .pt file or a SAELens directory")
