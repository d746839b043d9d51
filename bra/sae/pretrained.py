"""Read pretrained JumpReLU and standard SAEs: SAELens 6.x folders and Gemma Scope `params.npz` files.

- SAELens (`SAE.save_model`): `cfg.json` (`architecture`, `d_in`, `d_sae`, `dtype`,
  `apply_b_dec_to_input`, `normalize_activations`, `metadata.hook_name` / `model_name`) and
  `sae_weights.safetensors` (W_enc, b_enc, W_dec, b_dec, and threshold for jumprelu). Only
  `normalize_activations: none` loads: SAELens applies `layer_norm` and `constant_norm_rescale` per row at
  run time, and `expected_average_only_in` needs a scaling factor the folder does not hold.
- Gemma Scope (Lieberum et al. 2024): `params.npz` with W_enc [d_model, d_sae], W_dec [d_sae, d_model],
  b_enc, b_dec, threshold; JumpReLU on x directly (no b_dec subtraction, as SAELens's Gemma Scope loader
  sets). The layer comes from a `layer_<N>` folder in the path (`layer_12/width_16k/average_l0_82/`),
  else from the caller (the store); the hook is that layer's `blocks.<N>.hook_resid_post`. The file is
  read with `allow_pickle=False`, so it cannot run code.

TopK folders are read by `bra.sae.formats.load_saelens` (the architecture we train and export).
"""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bra.sae.archs import JUMPRELU, LinearSAE, LinearSAEConfig, build_linear
from bra.sae.formats import (
    SAELENS_CFG,
    SAELENS_WEIGHTS,
    SAEFormatError,
    drop_unit_scaling_factor,
    first_line,
    layer_from_hook,
    load_safetensors,
    read_json,
)

logger = logging.getLogger(__name__)

GEMMA_SCOPE_PARAMS = "params.npz"
"""Gemma Scope's weights file name."""
GEMMA_SCOPE_KEYS: tuple[str, ...] = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
"""Arrays a Gemma Scope `params.npz` holds (SAELens also accepts a lower-case `w_` prefix)."""

_LAYER_DIR_RE = re.compile(r"^layer_(\d+)$")
_NOT_RESIDUAL_RE = re.compile(r"gemma-scope-.*-(mlp|att)\b")
_NO_NORMALISATION = ("none", None)
"""`normalize_activations` values that mean none (SAELens's Gemma Scope config writes None)."""


def _check_saelens_options(directory: Path, raw: dict[str, Any]) -> None:
    """Refuse SAELens options with no exact equivalent here (one line each, naming the option)."""
    norm = raw.get("normalize_activations", "none")
    if norm == "expected_average_only_in":
        raise SAEFormatError(f"{directory}: normalize_activations='expected_average_only_in' needs a norm "
                             f"scaling factor the folder does not hold; fold it into the weights (SAELens "
                             f"fold_activation_norm_scaling_factor) and save again")
    if norm not in _NO_NORMALISATION:
        raise SAEFormatError(f"{directory}: normalize_activations={norm!r} is not supported (only 'none')")
    if raw.get("reshape_activations", "none") != "none":
        raise SAEFormatError(f"{directory}: reshape_activations={raw['reshape_activations']!r} is not "
                             f"supported (residual-stream SAEs only)")
    missing = sorted({"d_in", "d_sae"} - set(raw))
    if missing:
        raise SAEFormatError(f"{directory}: {SAELENS_CFG} lacks {missing}")


def load_saelens_linear(directory: str | Path) -> LinearSAE:
    """A SAELens 6.x `jumprelu` or `standard` folder as our `JumpReLUSAE` / `StandardSAE`."""
    directory = Path(directory)
    raw = read_json(directory / SAELENS_CFG)
    _check_saelens_options(directory, raw)
    state_dict = load_safetensors(directory / SAELENS_WEIGHTS)
    drop_unit_scaling_factor(directory, state_dict)
    metadata = raw.get("metadata") or {}
    hook_name = str(metadata.get("hook_name") or raw.get("hook_name") or "")
    try:
        cfg = LinearSAEConfig(
            architecture=raw.get("architecture"),  # type: ignore[arg-type]  # validated by the config
            d_model=raw["d_in"], d_sae=raw["d_sae"],
            apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
            model_name=str(metadata.get("model_name") or raw.get("model_name") or ""),
            hook_name=hook_name, layer=layer_from_hook(hook_name),
            dtype=str(raw.get("dtype", "float32")).removeprefix("torch."), weights_format="saelens")
        return build_linear(cfg, state_dict)
    except (ValueError, TypeError) as e:
        raise SAEFormatError(f"{directory}: {e}") from e


def layer_from_path(path: Path) -> int:
    """N of the nearest `layer_<N>` folder in ``path`` (Gemma Scope's layout), else -1."""
    for part in reversed(path.parts):
        match = _LAYER_DIR_RE.match(part)
        if match:
            return int(match.group(1))
    return -1


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    """The arrays of an .npz as CPU tensors, keys with `w_` renamed `W_` (as SAELens does)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key]) for key in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # pickled objects, truncated, not a zip
        raise SAEFormatError(f"{path}: not a readable .npz of arrays ({first_line(e)})") from e
    out: dict[str, torch.Tensor] = {}
    for key, array in arrays.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise SAEFormatError(f"{path}: {key} is {array.dtype}, not a float array")
        out["W_" + key[2:] if key.startswith("w_") else key] = torch.from_numpy(array)
    return out


def load_gemma_scope(path: str | Path, layer: int | None = None) -> LinearSAE:
    """A Gemma Scope `params.npz` (or a folder holding it) as our `JumpReLUSAE`.

    ``layer``: the layer to assume when the path names none (the store's). Weights are cast to float32.
    """
    path = Path(path)
    file = path / GEMMA_SCOPE_PARAMS if path.is_dir() else path
    if not file.is_file():
        raise SAEFormatError(f"{path}: holds no {GEMMA_SCOPE_PARAMS}")
    if any(_NOT_RESIDUAL_RE.search(part) for part in file.parts):
        raise SAEFormatError(f"{file}: a Gemma Scope MLP or attention SAE; the store holds the residual "
                             f"stream (use a -res release)")
    state_dict = _read_npz(file)
    drop_unit_scaling_factor(file, state_dict)
    missing = [k for k in GEMMA_SCOPE_KEYS if k not in state_dict]
    if missing:
        raise SAEFormatError(f"{file}: lacks {missing} (a Gemma Scope params.npz holds "
                             f"{', '.join(GEMMA_SCOPE_KEYS)})")
    W_enc = state_dict["W_enc"]
    if W_enc.ndim != 2:
        raise SAEFormatError(f"{file}: W_enc must be 2-D [d_model, d_sae], got {tuple(W_enc.shape)}")
    found = layer_from_path(file)
    if found < 0 and layer is not None:
        logger.info("%s: no layer_<N> folder in the path; assuming layer %d", file, layer)
    chosen = found if found >= 0 else (layer if layer is not None else -1)
    try:
        cfg = LinearSAEConfig(architecture=JUMPRELU, d_model=W_enc.shape[0], d_sae=W_enc.shape[1],
                              apply_b_dec_to_input=False, layer=chosen,
                              hook_name=f"blocks.{chosen}.hook_resid_post" if chosen >= 0 else "",
                              weights_format="gemma_scope")
        return build_linear(cfg, {k: v.to(torch.float32) for k, v in state_dict.items()})
    except ValueError as e:
        raise SAEFormatError(f"{file}: {e}") from e


__all__ = ["GEMMA_SCOPE_KEYS", "GEMMA_SCOPE_PARAMS", "layer_from_path", "load_gemma_scope",
           "load_saelens_linear"]
