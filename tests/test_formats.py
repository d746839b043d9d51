"""Tests for bra.sae.formats: seed and SAELens round trips, autodetection, guards, SAELens interop."""

import dataclasses
import json

import pytest
import torch

from bra.errors import BraError
from bra.sae.formats import (
    BRA_CFG,
    SAELENS_CFG,
    SAELENS_WEIGHTS,
    SEED_WEIGHTS,
    SAEFormatError,
    load_sae,
    load_saelens,
    load_seed,
    save_saelens,
    save_seed,
)
from bra.sae.model import PARAM_NAMES, SAEConfig, TopKSAE


def _random_sae(input_scale: float = 1.0, d_sae: int = 24, k: int = 4) -> TopKSAE:
    cfg = SAEConfig(d_model=8, d_sae=d_sae, k=k, model_name="tiny-model",
                    hook_name="blocks.3.hook_resid_post", layer=3, input_scale=input_scale,
                    store_fingerprint="sha256:abc")
    sae = TopKSAE.init_random(cfg, seed=0, data_mean=torch.linspace(-1, 1, 8))
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=torch.Generator().manual_seed(1)))
    return sae


def _assert_same_weights(a: TopKSAE, b: TopKSAE) -> None:
    for name in PARAM_NAMES:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


class _Payload:
    """A custom class: unpickling it would run code, so weights_only loading must refuse it."""


# ---------------------------------------------------------------------------------------------- seed


def test_save_seed__round_trip_exact(tmp_path):
    sae = _random_sae(input_scale=2.5)
    path = save_seed(sae, tmp_path / SEED_WEIGHTS)
    loaded = load_seed(path)
    _assert_same_weights(loaded, sae.folded())
    assert loaded.cfg == dataclasses.replace(sae.cfg, input_scale=1.0)  # k and provenance via the sidecar


def test_save_seed__file_holds_only_the_four_folded_tensors(tmp_path):
    sae = _random_sae(input_scale=2.0)
    path = save_seed(sae, tmp_path)  # a directory means <dir>/sae_weights.pt
    assert path == tmp_path / SEED_WEIGHTS
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert list(state) == list(PARAM_NAMES)
    assert torch.equal(state["W_enc"], sae.W_enc * 2.0)
    assert {p.name for p in tmp_path.iterdir()} == {SEED_WEIGHTS, BRA_CFG}  # no temp files left


def test_load_seed__without_sidecar_infers_shapes_and_defaults_k_32(tmp_path):
    sae = _random_sae(d_sae=40)
    torch.save({n: getattr(sae, n).detach() for n in PARAM_NAMES}, tmp_path / "seed.pt")  # like the seed
    loaded = load_seed(tmp_path / "seed.pt")
    assert (loaded.cfg.d_model, loaded.cfg.d_sae, loaded.cfg.k, loaded.cfg.dtype) == (8, 40, 32, "float32")
    _assert_same_weights(loaded, sae)
    assert load_seed(tmp_path / "seed.pt", {"k": 5, "layer": 3}).cfg.k == 5


def test_load_seed__refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"W_enc": torch.zeros(2, 3), "payload": _Payload()}, path)
    pattern = r"refusing checkpoint .*evil\.pt: it contains pickled code"
    with pytest.raises(SAEFormatError, match=pattern) as info:
        load_seed(path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, BraError)  # CLIs report BraError


def test_load_seed__refuses_wrong_keys_and_unfolded_scale(tmp_path):
    sae = _random_sae()
    state = {n: getattr(sae, n).detach() for n in PARAM_NAMES}
    torch.save({**state, "threshold": torch.tensor(0.0)}, tmp_path / "extra.pt")
    with pytest.raises(SAEFormatError, match="expected keys"):
        load_seed(tmp_path / "extra.pt")
    torch.save(state, tmp_path / "ok.pt")
    with pytest.raises(SAEFormatError, match="input_scale must be 1.0"):
        load_seed(tmp_path / "ok.pt", {"k": 4, "input_scale": 2.0})
    with pytest.raises(SAEFormatError, match="k \\(99\\) must be <= d_sae"):
        load_seed(tmp_path / "ok.pt", {"k": 99})


def test_save_seed__refuses_to_overwrite_unless_asked(tmp_path):
    sae = _random_sae()
    save_seed(sae, tmp_path / SEED_WEIGHTS)
    with pytest.raises(FileExistsError):
        save_seed(sae, tmp_path / SEED_WEIGHTS)
    save_seed(sae, tmp_path / SEED_WEIGHTS, overwrite=True)


# ------------------------------------------------------------------------------------------- SAELens


def test_save_saelens__round_trip_exact(tmp_path):
    sae = _random_sae(input_scale=2.5)
    directory = save_saelens(sae, tmp_path / "export")
    assert {p.name for p in directory.iterdir()} == {SAELENS_CFG, SAELENS_WEIGHTS}
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # temp directory renamed away
    loaded = load_saelens(directory)
    _assert_same_weights(loaded, sae.folded())
    assert loaded.cfg == dataclasses.replace(sae.cfg, input_scale=1.0)


def test_save_saelens__cfg_records_seed_semantics_and_provenance(tmp_path):
    directory = save_saelens(_random_sae(input_scale=2.5), tmp_path / "export")
    cfg = json.loads((directory / SAELENS_CFG).read_text())
    assert cfg["architecture"] == "topk"
    assert (cfg["d_in"], cfg["d_sae"], cfg["k"], cfg["dtype"]) == (8, 24, 4, "float32")
    assert cfg["apply_b_dec_to_input"] is False
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["bra"]["folded_input_scale"] == 2.5
    assert cfg["metadata"]["bra"]["config"]["store_fingerprint"] == "sha256:abc"


def test_save_saelens__refuses_nonempty_directory_unless_overwrite(tmp_path):
    sae = _random_sae()
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        save_saelens(sae, tmp_path / "export")
    save_saelens(sae, tmp_path / "export", overwrite=True)
    assert {p.name for p in (tmp_path / "export").iterdir()} == {SAELENS_CFG, SAELENS_WEIGHTS}
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_load_saelens__refuses_unsupported_options(tmp_path):
    directory = save_saelens(_random_sae(), tmp_path / "export")
    cfg = json.loads((directory / SAELENS_CFG).read_text())
    (directory / SAELENS_CFG).write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(SAEFormatError, match="normalize_activations"):
        load_saelens(directory)
    (directory / SAELENS_CFG).write_text(json.dumps({**cfg, "k": 5}))
    with pytest.raises(SAEFormatError, match="disagrees"):
        load_saelens(directory)


# ----------------------------------------------------------------------------------------- dispatch


def test_load_sae__autodetects_format(tmp_path):
    sae = _random_sae()
    saelens_dir = save_saelens(sae, tmp_path / "saelens")
    seed_path = save_seed(sae, tmp_path / "seed" / SEED_WEIGHTS)
    for path in (saelens_dir, saelens_dir / SAELENS_CFG, seed_path, seed_path.parent):
        _assert_same_weights(load_sae(path), sae)
    with pytest.raises(SAEFormatError):
        load_sae(tmp_path)  # neither format at the top level
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "missing.pt")


# -------------------------------------------------------------------------------------- interop


def test_save_saelens__sae_lens_loads_and_matches_our_encode_decode(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = _random_sae(input_scale=2.5)
    directory = save_saelens(sae, tmp_path / "export")
    theirs = sae_lens.SAE.load_from_disk(str(directory), device="cpu")
    assert type(theirs).__name__ == "TopKSAE" and theirs.cfg.k == 4
    assert theirs.cfg.metadata["bra"]["config"]["layer"] == 3  # provenance survives SAELens loading
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad():
        z_theirs = theirs.encode(x)
        torch.testing.assert_close(z_theirs, sae.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.decode(z_theirs), sae.decode(z_theirs), atol=1e-5, rtol=1e-5)


def test_save_saelens__cfg_keys_match_sae_lens_save_model(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(hook_name="h", model_name="m")
    ref_cfg = sae_lens.TopKSAEConfig(d_in=8, d_sae=24, k=4, metadata=metadata)
    sae_lens.TopKSAE(ref_cfg).save_model(tmp_path / "ref")
    ref = json.loads((tmp_path / "ref" / SAELENS_CFG).read_text())
    ours = json.loads((save_saelens(_random_sae(), tmp_path / "ours") / SAELENS_CFG).read_text())
    assert set(ours) == set(ref)
    assert set(ref["metadata"]) <= set(ours["metadata"])


def test_load_saelens__reads_sae_lens_save_with_b_dec_applied_to_input(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=8, d_sae=24, k=4))  # apply_b_dec_to_input=True
    assert theirs.cfg.apply_b_dec_to_input
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        theirs.b_dec.copy_(torch.randn(8, generator=gen))
        theirs.b_enc.copy_(0.1 * torch.randn(24, generator=gen))
    theirs.save_model(tmp_path / "theirs")
    ours = load_sae(tmp_path / "theirs")
    x = torch.randn(32, 8, generator=gen) * 3
    with torch.no_grad():
        z_theirs = theirs.encode(x)
        torch.testing.assert_close(ours.encode(x), z_theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(z_theirs), theirs.decode(z_theirs), atol=1e-5, rtol=1e-5)
