"""Pretrained SAE architectures (bra.sae.archs, bra.sae.pretrained, bra.sae.registry) and the audit on them:
SAELens's own saves load and encode/decode like SAELens, a Gemma Scope params.npz matches a hand-computed
JumpReLU, sparse codes pool exactly, every architecture is refused on a mismatched store, and `score` /
`eval` run end to end with JumpReLU, standard and `--sae none`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import linear_sae_weights, write_gemma_scope_npz, write_saelens_dir

from bra.audit.bundle import SparseCodes, TokenColumns
from bra.audit.pooling import pool_codes
from bra.errors import SAEError
from bra.sae.archs import JumpReLUSAE, NullSAE, NullSAEConfig, StandardSAE
from bra.sae.base import PAD_INDEX, dense_to_sparse
from bra.sae.formats import SAEFormatError, save_saelens
from bra.sae.model import SAEConfig, TopKSAE
from bra.sae.pretrained import load_gemma_scope, load_saelens_linear
from bra.sae.registry import LoadHints, load_sae_source
from bra.vocab import NULL_SAE, SEGMENT_COMPLETION, SEGMENT_PROMPT

pytestmark = pytest.mark.usefixtures("one_thread")

D_MODEL, D_SAE = 64, 48


def _dense(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    """Sparse codes back to dense latents (padding adds 0 at index 0)."""
    listed = indices != PAD_INDEX
    out = torch.zeros(values.shape[0], d_sae, dtype=values.dtype)
    return out.scatter_add_(-1, indices.clamp_min(0), torch.where(listed, values, 0))


# -------------------------------------------------------------------------------------- sparse codes


def test_dense_to_sparse__lists_every_nonzero_and_pads() -> None:
    z = torch.tensor([[0.0, 2.0, 0.0, -3.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    values, indices = dense_to_sparse(z)
    assert values.shape == indices.shape == (3, 2)  # the widest row has 2 non-zeros
    torch.testing.assert_close(_dense(values, indices, 4), z)
    assert (indices[1] == PAD_INDEX).all() and (values[1] == 0).all()
    assert sorted(indices[2].tolist()) == [PAD_INDEX, 0]
    empty_values, empty_indices = dense_to_sparse(torch.zeros(2, 4))
    assert empty_values.shape == empty_indices.shape == (2, 0)


@pytest.mark.parametrize("pool", ["mean", "max"])
@pytest.mark.parametrize("signed", [False, True])
def test_pool_codes__padded_codes_pool_like_the_dense_latents(pool: str, signed: bool) -> None:
    rng = np.random.default_rng(0)
    n_docs, rows, d_sae = 3, 40, 6
    z = rng.normal(size=(rows, d_sae)) * (rng.random((rows, d_sae)) < 0.4)
    z = z if signed else np.abs(z)
    tokens = TokenColumns(doc_index=np.repeat(np.arange(n_docs), rows // n_docs + 1)[:rows],
                          segment=np.where(np.arange(rows) % 3 == 0, SEGMENT_PROMPT, SEGMENT_COMPLETION),
                          mask=np.arange(rows) % 7 == 0, token_id=np.zeros(rows, np.int64))
    values, indices = dense_to_sparse(torch.from_numpy(z).float())
    codes = SparseCodes(indices.numpy().astype(np.int32), values.numpy(), d_sae)
    pooled = pool_codes(codes, tokens, n_docs, pool)
    groups = tokens.groups()
    for i, segment in enumerate(("prompt", "completion")):
        for doc in range(n_docs):
            rows_g = z[groups == doc * 2 + i].astype(np.float32).astype(np.float64)
            want = rows_g.mean(0) if pool == "mean" else rows_g.max(0)
            np.testing.assert_allclose(pooled[segment][doc], want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ SAELens interop


def _sae_lens_model(architecture: str, apply_b_dec_to_input: bool, seed: int):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(hook_name="blocks.1.hook_resid_post", model_name="tiny")
    kw = {"d_in": D_MODEL, "d_sae": D_SAE, "apply_b_dec_to_input": apply_b_dec_to_input, "metadata": metadata}
    model = {"jumprelu": lambda: sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(**kw)),
             "standard": lambda: sae_lens.StandardSAE(sae_lens.StandardSAEConfig(**kw)),
             "topk": lambda: sae_lens.TopKSAE(sae_lens.TopKSAEConfig(k=6, **kw))}[architecture]()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if name == "threshold" else 0.3))
            if name == "threshold":
                p.abs_()
    return model


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("architecture", ["jumprelu", "standard", "topk"])
def test_load_sae_source__sae_lens_saves_encode_and_decode_like_sae_lens(
        tmp_path: Path, architecture: str, apply_b_dec_to_input: bool) -> None:
    theirs = _sae_lens_model(architecture, apply_b_dec_to_input, seed=1)
    theirs.save_model(tmp_path / "sae")
    ours = load_sae_source(tmp_path / "sae")
    assert ours.cfg.architecture == architecture
    assert (ours.cfg.d_model, ours.cfg.d_sae, ours.cfg.layer) == (D_MODEL, D_SAE, 1)
    assert ours.cfg.hook_name == "blocks.1.hook_resid_post" and ours.cfg.model_name == "tiny"
    x = torch.randn(200, D_MODEL, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad():
        z_theirs = theirs.encode(x)
        z_ours = ours.encode(x)
        assert (z_theirs > 0).any(1).all() and (z_theirs == 0).any()  # the comparison is not vacuous
        torch.testing.assert_close(z_ours, z_theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(z_theirs), theirs.decode(z_theirs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x).x_hat, theirs(x), atol=1e-5, rtol=1e-5)
        values, indices = ours.encode_sparse(x)
        torch.testing.assert_close(_dense(values, indices, D_SAE), z_ours)


@pytest.mark.parametrize("architecture", ["jumprelu", "standard"])
def test_write_saelens_dir__is_a_folder_sae_lens_loads(tmp_path: Path, architecture: str) -> None:
    """The test helper that writes SAELens folders without sae_lens writes what SAELens reads."""
    sae_lens = pytest.importorskip("sae_lens")
    weights = linear_sae_weights(D_MODEL, D_SAE, seed=3, architecture=architecture)
    folder = write_saelens_dir(tmp_path / "sae", architecture, weights, hook_name="blocks.1.hook_resid_post",
                               apply_b_dec_to_input=True)
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    ours = load_saelens_linear(folder)
    assert type(ours) is {"jumprelu": JumpReLUSAE, "standard": StandardSAE}[architecture]
    x = torch.randn(50, D_MODEL, generator=torch.Generator().manual_seed(4)) * 3
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------- Gemma Scope


def test_load_gemma_scope__published_keys_match_a_hand_computed_jumprelu(tmp_path: Path) -> None:
    weights = linear_sae_weights(D_MODEL, D_SAE, seed=5)
    npz = write_gemma_scope_npz(tmp_path / "layer_12" / "width_16k" / "average_l0_82" / "params.npz", weights)
    x = np.random.default_rng(6).normal(size=(80, D_MODEL)).astype(np.float32) * 3
    W = {k: v.numpy().astype(np.float64) for k, v in weights.items()}
    pre = x @ W["W_enc"] + W["b_enc"]  # Gemma Scope: no b_dec subtraction
    z_hand = pre * (pre > W["threshold"])
    for source in (npz, npz.parent):  # the file, or the folder holding it
        sae = load_sae_source(source)
        assert isinstance(sae, JumpReLUSAE)
        assert (sae.cfg.layer, sae.cfg.hook_name) == (12, "blocks.12.hook_resid_post")
        assert sae.cfg.weights_format == "gemma_scope" and not sae.cfg.apply_b_dec_to_input
        with torch.no_grad():
            z = sae.encode(torch.from_numpy(x)).double().numpy()
            x_hat = sae.decode(torch.from_numpy(z_hand).float()).double().numpy()
        assert (z_hand > 0).any() and (z_hand == 0).any()
        np.testing.assert_allclose(z, z_hand, atol=1e-4)
        np.testing.assert_allclose(x_hat, z_hand @ W["W_dec"] + W["b_dec"], atol=1e-4)


def test_load_gemma_scope__layer_from_the_caller_when_the_path_names_none(tmp_path: Path) -> None:
    npz = write_gemma_scope_npz(tmp_path / "my-sae" / "params.npz", linear_sae_weights(D_MODEL, D_SAE, 5))
    assert load_sae_source(npz).cfg.layer == -1
    sae = load_sae_source(npz, LoadHints(d_model=D_MODEL, layer=3))
    assert (sae.cfg.layer, sae.cfg.hook_name) == (3, "blocks.3.hook_resid_post")


def test_load_gemma_scope__refuses_bad_files(tmp_path: Path) -> None:
    weights = linear_sae_weights(D_MODEL, D_SAE, 5)
    with pytest.raises(SAEFormatError, match=r"lacks \['threshold'\]"):
        load_gemma_scope(write_gemma_scope_npz(tmp_path / "a" / "params.npz", weights, drop=("threshold",)))
    np.savez(tmp_path / "objects.npz", W_enc=np.array([object()], dtype=object))
    with pytest.raises(SAEFormatError, match="not a readable .npz"):  # allow_pickle=False
        load_gemma_scope(tmp_path / "objects.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SAEFormatError, match="not a readable .npz"):
        load_gemma_scope(tmp_path / "junk.npz")
    negative = {**weights, "threshold": -weights["threshold"]}
    with pytest.raises(SAEFormatError, match="JumpReLU thresholds must be >= 0"):
        load_gemma_scope(write_gemma_scope_npz(tmp_path / "b" / "params.npz", negative))
    mlp = write_gemma_scope_npz(tmp_path / "gemma-scope-2b-pt-mlp" / "layer_3" / "params.npz", weights)
    with pytest.raises(SAEFormatError, match="MLP or attention SAE"):
        load_gemma_scope(mlp)


def test_load_saelens_linear__refuses_options_it_cannot_honour(tmp_path: Path) -> None:
    weights = linear_sae_weights(D_MODEL, D_SAE, 5)
    negative = {**weights, "threshold": -weights["threshold"]}
    with pytest.raises(SAEFormatError, match="negative entries.*thresholds must be >= 0"):
        load_sae_source(write_saelens_dir(tmp_path / "neg", "jumprelu", negative))
    for norm, expect in (("expected_average_only_in", "scaling factor the folder does not hold"),
                         ("layer_norm", "normalize_activations='layer_norm' is not supported")):
        folder = write_saelens_dir(tmp_path / norm, "jumprelu", weights, normalize_activations=norm)
        with pytest.raises(SAEFormatError, match=expect):
            load_sae_source(folder)
    with pytest.raises(SAEFormatError, match="architecture 'gated' is not supported"):
        load_sae_source(write_saelens_dir(tmp_path / "gated", "gated", weights))
    no_threshold = {k: v for k, v in weights.items() if k != "threshold"}
    with pytest.raises(SAEFormatError, match=r"missing \['threshold'\]"):
        load_sae_source(write_saelens_dir(tmp_path / "nothr", "jumprelu", no_threshold))


# --------------------------------------------------------------------------- identity, random baselines


def test_null_sae__is_the_identity_with_dense_signed_codes() -> None:
    sae = NullSAE(NullSAEConfig(d_model=8, layer=1))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sae.encode(x), x) and torch.equal(sae(x).x_hat, x)
    values, indices = sae.encode_sparse(x)
    assert torch.equal(values, x) and torch.equal(indices[3], torch.arange(8))
    assert sae.cfg.to_dict()["architecture"] == NULL_SAE and sae.cfg.d_sae == 8


def test_random_like__same_architecture_and_size_new_directions(tmp_path: Path) -> None:
    weights = linear_sae_weights(D_MODEL, D_SAE, seed=7)
    weights["W_enc"] = weights["W_enc"] * torch.linspace(0.5, 2.0, D_SAE)
    sae = load_sae_source(write_saelens_dir(tmp_path / "sae", "jumprelu", weights))
    a, b = sae.random_like(3), sae.random_like(3)
    assert type(a) is JumpReLUSAE and a.cfg == sae.cfg
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name  # seeded
    torch.testing.assert_close(a.W_enc.norm(dim=0), sae.W_enc.norm(dim=0))
    torch.testing.assert_close(a.W_dec.norm(dim=1), sae.W_dec.norm(dim=1))
    assert torch.equal(a.threshold, sae.threshold) and torch.equal(a.b_enc, sae.b_enc)
    cos = torch.nn.functional.cosine_similarity(a.W_enc, sae.W_enc, dim=0)
    assert cos.abs().max() < 0.9  # new directions
    rotated = NullSAE(NullSAEConfig(d_model=16)).random_like(1)
    assert rotated.basis is not None and rotated.cfg.rotation_seed == 1
    torch.testing.assert_close(rotated.basis @ rotated.basis.T, torch.eye(16), atol=1e-5, rtol=0)
    x = torch.randn(4, 16)
    torch.testing.assert_close(rotated(x).x_hat, x, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------- with the eval store


@pytest.fixture(scope="module")
def arch_env(labelled_eval_store: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """The tiny eval store and one SAE of each architecture for it (JumpReLU thresholds set from the
    store's rows so that latents fire on about a fifth of them)."""
    tmp = tmp_path_factory.mktemp("arch")
    store, model_dir = labelled_eval_store
    acts = zarr.open_group(str(store), mode="r")["acts/layer_1"][:]
    hook = "blocks.1.hook_resid_post"
    saes = {
        "jumprelu": write_saelens_dir(tmp / "jumprelu", "jumprelu",
                                      linear_sae_weights(D_MODEL, D_SAE, 11, data=acts), hook_name=hook,
                                      model_name=str(model_dir)),
        "standard": write_saelens_dir(tmp / "standard", "standard",
                                      linear_sae_weights(D_MODEL, D_SAE, 12, "standard"), hook_name=hook,
                                      apply_b_dec_to_input=True),
        "gemma_scope": write_gemma_scope_npz(tmp / "layer_1" / "width_48" / "params.npz",
                                             linear_sae_weights(D_MODEL, D_SAE, 13, data=acts)),
        "topk": save_saelens(TopKSAE.init_random(SAEConfig(d_model=D_MODEL, d_sae=D_SAE, k=4, layer=1,
                                                           hook_name=hook), seed=5), tmp / "topk"),
        "none": NULL_SAE,
    }
    return tmp, store, model_dir, acts, saes


def _mismatched(tmp: Path, architecture: str, d_model: int = D_MODEL, layer: int = 1,
                model: str = "") -> Path:
    """An SAE of ``architecture`` for another d_model, layer or model than the store."""
    name = f"{architecture}-{d_model}-{layer}-{bool(model)}"
    if architecture == "topk":
        cfg = SAEConfig(d_model=d_model, d_sae=D_SAE, k=4, layer=layer, model_name=model)
        return save_saelens(TopKSAE.init_random(cfg, seed=1), tmp / name, overwrite=True)
    weights = linear_sae_weights(d_model, D_SAE, 1, "standard" if architecture == "standard" else "jumprelu")
    if architecture == "gemma_scope":
        return write_gemma_scope_npz(tmp / name / f"layer_{layer}" / "params.npz", weights)
    return write_saelens_dir(tmp / name, architecture, weights, hook_name=f"blocks.{layer}.hook_resid_post",
                             model_name=model)


@pytest.mark.parametrize("architecture", ["topk", "jumprelu", "standard", "gemma_scope"])
def test_load_checked__refuses_another_d_model_layer_or_model_for_every_architecture(
        arch_env, architecture: str) -> None:
    from bra.cache.store import open_store
    from bra.sae.workflows import load_checked

    tmp, store_path, *_ = arch_env
    store = open_store(store_path)
    with pytest.raises(SAEError, match="SAE d_model 32 does not match"):
        load_checked(_mismatched(tmp, architecture, d_model=32), store, None)
    with pytest.raises(SAEError, match="layer 2 is not in store"):
        load_checked(_mismatched(tmp, architecture, layer=2), store, None)
    with pytest.raises(SAEError, match=r"SAE reads layer 2 .*but layer 1 was requested"):
        load_checked(_mismatched(tmp, architecture, layer=2), store, 1)
    if architecture != "gemma_scope":  # Gemma Scope files name no model
        with pytest.raises(SAEError, match="SAE was trained on other/model"):
            load_checked(_mismatched(tmp, architecture, model="other/model"), store, None)


def test_load_checked__none_takes_the_store_width_and_refuses_a_missing_layer(arch_env) -> None:
    from bra.cache.store import open_store
    from bra.sae.workflows import load_checked

    _, store_path, *_ = arch_env
    store = open_store(store_path)
    sae, layer = load_checked(NULL_SAE, store, None)
    assert isinstance(sae, NullSAE) and (sae.cfg.d_model, sae.cfg.layer, layer) == (D_MODEL, 1, 1)
    with pytest.raises(SAEError, match="layer 3 is not in store"):
        load_checked(NULL_SAE, store, 3)
    with pytest.raises(SAEError, match="takes its width from a store"):
        load_sae_source(NULL_SAE)
    with pytest.raises(SAEError, match="no SAE at none"):
        load_sae_source(Path(NULL_SAE))  # a Path is a path, only the string means no SAE


@pytest.mark.parametrize("architecture", ["jumprelu", "standard", "gemma_scope", "none"])
def test_read_eval_bundle__pooled_latents_are_exact(arch_env, architecture: str) -> None:
    """Every active latent of every row is kept: pooled codes equal the dense latents pooled by hand."""
    from bra.audit.reader import read_eval_bundle

    _, store, _, acts, saes = arch_env
    bundle = read_eval_bundle(store, {"sae": saes[architecture]}, None, "mean", seed=0)
    sae = load_sae_source(saes[architecture], LoadHints(d_model=D_MODEL, layer=1))
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(acts)).double().numpy()
    groups = bundle.tokens.groups()
    assert bundle.codes.indices.shape[1] == int((z[groups >= 0] != 0).sum(1).max())
    for i, segment in enumerate(("prompt", "completion")):
        want = np.stack([z[groups == 2 * doc + i].mean(0) for doc in range(bundle.n_docs)])
        np.testing.assert_allclose(bundle.pooled["sae"][segment], want, rtol=1e-6, atol=1e-9)
    random_cfg = bundle.sae_configs["random_sae"]
    assert random_cfg["architecture"] == bundle.sae_configs["sae"]["architecture"]
    assert random_cfg["d_sae"] == bundle.sae_configs["sae"]["d_sae"]


FAST = ["--n-boot", "20", "--n-perm", "20", "--top-n", "4", "--repeats", "1", "--n-d-null", "20"]


@pytest.mark.parametrize("architecture", ["jumprelu", "standard", "none"])
def test_score__end_to_end_with_each_architecture(arch_env, architecture: str) -> None:
    from bra.cli.sae import main

    tmp, store, _, _, saes = arch_env
    out = tmp / f"report-{architecture}"
    argv = ["score", "--store", str(store), "--sae", str(saes[architecture]), "--out", str(out), *FAST,
            "--baseline", f"raw={NULL_SAE}"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    report = json.loads((out / "report.json").read_text())
    arch = "none" if architecture == "none" else architecture
    assert report["settings"]["sae_config"]["architecture"] == arch
    assert report["settings"]["random_sae_config"]["architecture"] == arch
    methods = {r["method"]: r for r in report["auroc"]}
    assert set(methods) == {"sae", "raw", "random_sae", "tfidf_logreg", "raw_logreg", "raw_diff_of_means"}
    assert methods["sae"]["auroc"] is not None
    if architecture == "none":  # the identity probe and the raw-activation probe see the same features
        assert methods["sae"]["auroc"] == pytest.approx(methods["raw_logreg"]["auroc"])
    catalog = json.loads((out / "catalog.json").read_text())
    assert catalog and (out / "report.html").stat().st_size > 0


@pytest.mark.parametrize("architecture", ["jumprelu", "standard", "gemma_scope", "none"])
def test_evaluate__each_architecture(arch_env, architecture: str) -> None:
    from bra.sae.workflows import evaluate

    _, store, _, _, saes = arch_env
    result = evaluate(saes[architecture], store, split="all")
    assert result["rows"] > 0 and result["layer"] == 1
    if architecture == "none":
        assert result["fvu"] == 0.0 and result["l0"] == pytest.approx(D_MODEL, abs=1)
        assert "by construction" in result["note"]
    else:
        assert np.isfinite(result["fvu"]) and 0 < result["l0"] < D_SAE and "note" not in result
    if architecture in ("jumprelu", "gemma_scope"):  # thresholds at the 80th percentile of each latent
        assert result["l0"] == pytest.approx(0.2 * D_SAE, rel=0.25)


def test_sample_windows__spread_over_tiers_and_seeded() -> None:
    from bra.sae.evaluate import sample_windows

    tiers = np.array([0] * 100 + [1] * 100 + [2] * 5)  # store order: tier-contiguous, one tier tiny
    picked = sample_windows(tiers, 64, seed=0)
    assert np.bincount(tiers[picked]).tolist() == [29, 30, 5]  # tier 2 gives the rest of its share away
    assert len(set(picked.tolist())) == 64 and (np.diff(picked) > 0).all()  # distinct, in store order
    assert np.array_equal(sample_windows(tiers, 64, seed=0), picked)
    assert not np.array_equal(sample_windows(tiers, 64, seed=1), picked)
    assert sample_windows(tiers[:10], 64, seed=0).tolist() == list(range(10))  # fewer than asked: all


def test_ce_loss_score__splices_only_unmasked_positions(arch_env, tiny_gemma_dir: Path) -> None:
    """An SAE that reconstructs 0 sees only the windows' unmasked rows, and then the spliced loss is the
    zero-ablated one (both replace the same positions); the windows come from every tier."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from bra.cache.store import open_store
    from bra.sae.evaluate import _ce_windows, ce_loss_score, heldout_docs

    class ZeroSAE(torch.nn.Module):
        rows = 0

        def forward(self, x: torch.Tensor) -> SimpleNamespace:
            ZeroSAE.rows += x.shape[0]
            return SimpleNamespace(x_hat=torch.zeros_like(x))

    _, store_path, _, _, _ = arch_env
    store = open_store(store_path)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gemma_dir), attn_implementation="eager").eval()
    every = heldout_docs(store, None, 0.0, 0) | True
    result = ce_loss_score(ZeroSAE(), store, 1, model, every, max_windows=6, seed=0)
    _, mask, _, windows = _ce_windows(store, every, 6, 0)
    unmasked = sum(int((~mask[s:e]).sum()) for s, e in windows)
    assert ZeroSAE.rows == result["positions_spliced"] == unmasked
    assert unmasked <= sum(e - s - 1 for s, e in windows)  # position 0 (masked) of every window is left out
    assert result["ce_spliced"] == pytest.approx(result["ce_zero"], abs=1e-6)
    tiers_present = set(np.unique(store.read_rows("tier", 0, store.n_tokens)).tolist())
    assert len(result["windows_per_tier"]) == min(len(tiers_present), 6)
    assert sum(result["windows_per_tier"].values()) == result["windows"] == 6


@pytest.mark.parametrize("architecture", ["jumprelu", "standard", "none"])
def test_ce_loss_score__splices_each_architecture(arch_env, tiny_gemma_dir: Path, architecture: str) -> None:
    """The eval store was built from a copy of the tiny Gemma2, so that model splices its rows back in."""
    from transformers import AutoModelForCausalLM

    from bra.cache.store import open_store
    from bra.sae.evaluate import ce_loss_score, heldout_docs
    from bra.sae.workflows import load_checked

    _, store_path, _, _, saes = arch_env
    store = open_store(store_path)
    sae, layer = load_checked(saes[architecture], store, None)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gemma_dir), attn_implementation="eager").eval()
    result = ce_loss_score(sae, store, layer, model, heldout_docs(store, None, 0.0, 0) | True, max_windows=4)
    assert result["windows"] == 4 and result["ce_zero"] != result["ce_clean"]
    if architecture == "none":  # the identity splices the residual back unchanged
        assert result["ce_spliced"] == pytest.approx(result["ce_clean"], abs=1e-6)
        assert result["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    else:
        assert np.isfinite(result["ce_loss_score"]) and result["ce_spliced"] != result["ce_clean"]
