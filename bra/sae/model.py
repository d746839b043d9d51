"""TopK sparse autoencoder with the seed checkpoint's parameter layout.

The seed (`sae_weights.pt`) stores W_enc [d_model, d_sae], b_enc [d_sae], W_dec [d_sae, d_model] and
b_dec [d_model], and encodes x directly: z = scatter(topk(relu(x @ W_enc + b_enc), k)). Unlike SAELens's
default (`apply_b_dec_to_input=True`) it does not subtract b_dec before encoding; we keep the seed's
semantics so its checkpoint loads unchanged.

Shape suffixes (dictionary_learning style): B batch (any leading dims), D d_model, S d_sae, K k.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""Parameter dtypes a config may name (the strings SAELens writes in `cfg.json`)."""

PARAM_NAMES: tuple[str, ...] = ("W_enc", "b_enc", "W_dec", "b_dec")
"""The seed checkpoint's parameter names, in the order we save them."""

SEED_K = 32
"""k of the seed checkpoint (model card); its `.pt` file does not record it."""

ARCHITECTURE = "topk"
"""Name of this architecture in `bra.sae.registry.ARCHITECTURES` (and SAELens's `architecture`)."""


@dataclass(frozen=True)
class SAEConfig:
    """Architecture and provenance of one TopK SAE (training settings live elsewhere)."""

    d_model: int
    """Width of the residual stream the SAE reads (SAELens calls it `d_in`)."""

    d_sae: int
    """Number of latents."""

    k: int
    """Number of latents kept per row by the TopK activation."""

    model_name: str = ""
    """Model whose activations the SAE was trained on, e.g. `google/gemma-2-2b-it`."""

    hook_name: str = ""
    """TransformerLens-style hook, e.g. `blocks.12.hook_resid_post`."""

    layer: int = -1
    """Decoder block index of the hook; -1 when unknown."""

    dtype: str = "float32"
    """Parameter dtype, one of `DTYPES`."""

    input_scale: float = 1.0
    """Activations are multiplied by this before encoding and reconstructions divided by it after
    decoding, so training sees inputs of mean squared norm d_model. Exports fold it into the weights."""

    store_fingerprint: str = ""
    """Fingerprint of the activation store the SAE was trained on; empty when unknown."""

    def __post_init__(self) -> None:
        for name in ("d_model", "d_sae", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.k > self.d_sae:
            raise ValueError(f"k ({self.k}) must be <= d_sae ({self.d_sae})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not (math.isfinite(self.input_scale) and self.input_scale > 0):
            raise ValueError(f"input_scale must be finite and > 0, got {self.input_scale!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """`dtype` as a torch dtype."""
        return DTYPES[self.dtype]

    @property
    def architecture(self) -> str:
        """Registry name of the architecture (`bra.sae.registry`); a property, so `to_dict` is unchanged."""
        return ARCHITECTURE

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Inverse of `to_dict`; unknown keys are refused so a mismatched file is not half-read."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SAEConfig keys: {unknown}")
        return cls(**data)


class ForwardOutput(NamedTuple):
    """What `TopKSAE.forward` returns."""

    x_hat: torch.Tensor
    """Reconstruction in the caller's (unscaled) space, [B, d_model]."""

    z: torch.Tensor | None
    """Dense latents with only the top-k entries of each row kept, [B, d_sae]; None from
    ``forward(x, sparse=True)``, which never builds them."""

    top_values: torch.Tensor
    """Values of the kept latents, [B, k] (non-negative; zero where fewer than k were positive)."""

    top_indices: torch.Tensor
    """Latent indices of `top_values`, [B, k]."""

    pre_acts: torch.Tensor
    """relu(x * input_scale @ W_enc + b_enc) before the top-k selection, [B, d_sae]; AuxK reads it."""


class TopKSAE(nn.Module):
    """TopK SAE: z = scatter(topk(relu(x*s @ W_enc + b_enc), k)); x_hat = (z @ W_dec + b_dec) / s."""

    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg
        kw: dict[str, Any] = {"dtype": cfg.torch_dtype, "device": device}
        # Zeros rather than torch.empty so an un-initialised model is deterministic, not garbage.
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_model, cfg.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_model, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_model, **kw))

    # ----------------------------------------------------------------------------------- construction

    @classmethod
    def init_random(cls, cfg: SAEConfig, seed: int, data_mean: torch.Tensor | None = None) -> TopKSAE:
        """TopK-paper init (Gao et al. 2024, Sec. 2.3): unit-norm random decoder rows, W_enc = W_decᵀ,
        b_enc = 0, b_dec = data_mean * input_scale (b_dec lives in the scaled space) or 0.

        Draws in float32 on CPU from a private generator, so the result depends only on (cfg, seed).
        """
        gen = torch.Generator().manual_seed(seed)
        W_dec_SD = torch.randn(cfg.d_sae, cfg.d_model, generator=gen, dtype=torch.float32)
        W_dec_SD = W_dec_SD / W_dec_SD.norm(dim=-1, keepdim=True)
        sae = cls(cfg)
        with torch.no_grad():
            sae.W_dec.copy_(W_dec_SD)
            sae.W_enc.copy_(W_dec_SD.T)
            if data_mean is not None:
                if data_mean.shape != (cfg.d_model,):
                    raise ValueError(
                        f"data_mean must have shape ({cfg.d_model},), got {tuple(data_mean.shape)}"
                    )
                sae.b_dec.copy_(data_mean.detach().to(torch.float32).cpu() * cfg.input_scale)
        return sae

    @torch.no_grad()
    def fit_encoder_scale_(self, x_BD: torch.Tensor) -> float:
        """Multiply W_enc by the factor a minimising sum ||x*s - b_dec - a * y||² over the sample rows x
        (unscaled, as the SAE reads them), where y = z @ W_dec is the reconstruction of the kept latents
        without the bias, and return a. Exact in one step: with b_enc = 0 the top-k choice does not depend
        on a > 0 and the kept values scale by it, so y does too.

        Why: at the TopK-paper init (unit decoder rows, W_enc = W_decᵀ) the k kept projections add up to
        several times the input when k is a sizeable fraction of d_model (first-batch FVU 13 at d_model 64,
        k 32; 1.4 at d_model 576, SmolLM2's block 15), and the first steps go into undoing that. Leaves W_enc
        alone (returns 1.0) when a is not a positive finite number (a degenerate sample)."""
        if bool((self.b_enc != 0).any()):
            raise ValueError("fit_encoder_scale_ needs b_enc = 0 (a freshly initialised SAE)")
        s = self.cfg.input_scale
        top_values_BK, top_indices_BK, _ = self.encode_topk(x_BD)
        y = (self.decode_sparse(top_values_BK, top_indices_BK) * s - self.b_dec).double()
        target = (x_BD.to(y.device, torch.float64) * s - self.b_dec.double())
        scale = float((target * y).sum() / (y * y).sum())
        if not math.isfinite(scale) or scale <= 0:
            logger.warning("encoder scale %s from %d sample rows is not positive; W_enc left as it is", scale,
                           x_BD.shape[0])
            return 1.0
        self.W_enc.mul_(scale)
        return scale

    @classmethod
    def from_state_dict(cls, cfg: SAEConfig, state_dict: dict[str, torch.Tensor]) -> TopKSAE:
        """Build from a state dict holding exactly `PARAM_NAMES` with shapes matching `cfg`.

        Tensors are cast to `cfg.dtype`; raises ValueError on missing, extra or mis-shaped entries.
        """
        expected = {
            "W_enc": (cfg.d_model, cfg.d_sae),
            "b_enc": (cfg.d_sae,),
            "W_dec": (cfg.d_sae, cfg.d_model),
            "b_dec": (cfg.d_model,),
        }
        missing = sorted(set(expected) - set(state_dict))
        extra = sorted(set(state_dict) - set(expected))
        if missing or extra:
            raise ValueError(
                f"state dict keys differ from {list(PARAM_NAMES)}: missing {missing}, extra {extra}"
            )
        for name, shape in expected.items():
            if tuple(state_dict[name].shape) != shape:
                raise ValueError(f"{name} has shape {tuple(state_dict[name].shape)}, config expects {shape}")
        sae = cls(cfg)
        with torch.no_grad():
            for name in PARAM_NAMES:
                getattr(sae, name).copy_(state_dict[name].to(cfg.torch_dtype))
        return sae

    # ------------------------------------------------------------------------------------------- math

    def encode_topk(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k of relu(x*s @ W_enc + b_enc) -> (values [B, k], indices [B, k], pre_acts [B, d_sae])."""
        x_BD = x_BD.to(self.W_enc.dtype) * self.cfg.input_scale
        pre_acts_BS = torch.relu(x_BD @ self.W_enc + self.b_enc)
        # sorted=False: order is irrelevant once scattered, and unsorted topk is cheaper.
        top_values_BK, top_indices_BK = pre_acts_BS.topk(self.cfg.k, dim=-1, sorted=False)
        return top_values_BK, top_indices_BK, pre_acts_BS

    def encode_sparse(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [B, k], indices [B, k]) of `encode_topk`: the sparse codes scoring pools
        (`bra.sae.base.SparseAutoencoder`)."""
        top_values_BK, top_indices_BK, _ = self.encode_topk(x_BD)
        return top_values_BK, top_indices_BK

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Dense latents [B, d_sae] with only the top-k entries of each row kept."""
        top_values_BK, top_indices_BK, pre_acts_BS = self.encode_topk(x_BD)
        return torch.zeros_like(pre_acts_BS).scatter_(-1, top_indices_BK, top_values_BK)

    def decode(self, z_BS: torch.Tensor) -> torch.Tensor:
        """Reconstruction (z @ W_dec + b_dec) / input_scale, [B, d_model], in the caller's space."""
        return (z_BS.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.cfg.input_scale

    def decode_sparse(self, top_values_BK: torch.Tensor, top_indices_BK: torch.Tensor) -> torch.Tensor:
        """`decode` of the latents `encode_topk` kept, from the k of them only: sum_k v_bk W_dec[i_bk] (one
        `embedding_bag`: neither a dense [B, d_sae] z nor a [B, k, d_model] gather is built), then
        (+ b_dec) / input_scale. The same sum as ``decode(z)`` over z's nonzero entries, in another order,
        so it agrees to float rounding; forward and backward cost B·k·d_model instead of B·d_sae·d_model."""
        lead = top_indices_BK.shape[:-1]
        k = top_indices_BK.shape[-1]
        weights = top_values_BK.reshape(-1, k).to(self.W_dec.dtype)
        out = F.embedding_bag(top_indices_BK.reshape(-1, k), self.W_dec,
                              per_sample_weights=weights, mode="sum")
        return (out.reshape(*lead, -1) + self.b_dec) / self.cfg.input_scale

    def forward(self, x_BD: torch.Tensor, sparse: bool = False) -> ForwardOutput:  # type: ignore[override]
        """Encode and decode x [B, d_model]; see `ForwardOutput` for the fields. ``sparse``: decode from the
        kept latents (`decode_sparse`, what training uses) and return z None."""
        top_values_BK, top_indices_BK, pre_acts_BS = self.encode_topk(x_BD)
        if sparse:
            return ForwardOutput(self.decode_sparse(top_values_BK, top_indices_BK), None, top_values_BK,
                                 top_indices_BK, pre_acts_BS)
        z_BS = torch.zeros_like(pre_acts_BS).scatter_(-1, top_indices_BK, top_values_BK)
        return ForwardOutput(self.decode(z_BS), z_BS, top_values_BK, top_indices_BK, pre_acts_BS)

    # -------------------------------------------------------------------------------- training helpers

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm_(self) -> None:
        """Rescale every decoder row to unit L2 norm (call after each optimizer step)."""
        norms_S1 = self.W_dec.norm(dim=-1, keepdim=True)
        # clamp: a zero row stays zero instead of becoming NaN.
        self.W_dec.div_(norms_S1.clamp_min(torch.finfo(self.W_dec.dtype).tiny))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions_(self) -> None:
        """Drop from W_dec.grad each row's component along that row (after backward, before step).

        With unit-norm rows this keeps the update tangent to the sphere, so renormalising after the
        step changes little (TopK paper, Sec. 2.3; dictionary_learning, sparsify).
        """
        if self.W_dec.grad is None:
            return
        tiny = torch.finfo(self.W_dec.dtype).tiny
        unit_SD = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(tiny)
        parallel_S1 = (self.W_dec.grad * unit_SD).sum(dim=-1, keepdim=True)
        self.W_dec.grad.sub_(parallel_S1 * unit_SD)

    # ----------------------------------------------------------------------------------------- export

    @torch.no_grad()
    def folded(self) -> TopKSAE:
        """Equivalent SAE with input_scale folded into the weights (input_scale = 1).

        encode(x) = topk(relu(x @ (s W_enc) + b_enc)); decode(z) = z @ (W_dec / s) + b_dec / s.
        The decoder rows are then no longer unit norm, which is fine for inference and exports.
        """
        s = self.cfg.input_scale
        out = TopKSAE(dataclasses.replace(self.cfg, input_scale=1.0), device=self.W_enc.device)
        out.W_enc.copy_(self.W_enc * s)
        out.b_enc.copy_(self.b_enc)
        out.W_dec.copy_(self.W_dec / s)
        out.b_dec.copy_(self.b_dec / s)
        return out
