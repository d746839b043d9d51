"""`bra-sae intervene`: regenerate an eval manifest's completions with a residual edit at the hooked layer,
one edited eval store per ``--edit`` (grammar: `bra.audit.edits`; math: `bra.audit.steering`).

Every edit is resolved and checked before the model is loaded or anything is generated (`prepare_edits`):
the SAE against the model's width and the edit's layer, the catalog category (unknown, empty), the latent
ids against the SAE, a direction against the model's width. Each store is then built by the ordinary
build (`bra.pipeline.build.build_store` with the edit as a `ResidualEdit`): it is an eval store of the
usual schema whose attrs record the edit (``edit``) and whose fingerprint covers it, so it resumes after
a kill, verifies, and `bra-sae score` and `bra-cache relabel` read it unchanged. The stored layer holds
the residual stream after the edit (what the blocks above received).

A random latent control (``:random=SEED``) is matched on firing rate: each edited latent gets a
non-edited one of similar firing rate on the base store (`bra.audit.steering.matched_random_latents`;
rates read by `bra.audit.reader.latent_firing_rates`), recorded as ``matched_firing`` in its edit attr.

Where the edit applies: the output of one block, at every position (prompt tokens and each generated
token). Arditi et al. (2024) ablate their direction at every layer; one layer is a weaker ablation.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bra.audit.classes import resolve_classes
from bra.audit.edits import (
    CATEGORY,
    DIRECTION,
    LATENTS,
    NAMED_DIRECTIONS,
    REFUSAL_DIRECTION,
    EditSpec,
    InterveneConfig,
    parse_edits,
)
from bra.audit.labels import AUTO, choose_labels
from bra.audit.reader import latent_firing_rates
from bra.audit.report import CATALOG_FILE
from bra.audit.splits import group_keys, split_prompts
from bra.audit.steering import (
    DirectionEdit,
    LatentEdit,
    describe_vector,
    matched_random_latents,
    random_direction,
    vector_digest,
)
from bra.cache import lifecycle, schema
from bra.cache.store import Store, open_store
from bra.errors import BraError, EditError
from bra.fsutil import atomic_file
from bra.pipeline.build import (
    BuildResult,
    LoadedModel,
    build_store,
    load_build_model,
    store_fingerprint,
    store_targets,
)
from bra.pipeline.manifest import Manifest
from bra.pipeline.model import ResidualEdit, config_int, load_config
from bra.sae.base import SparseAutoencoder
from bra.sae.evaluate import organism_base
from bra.sae.registry import LoadHints, load_sae_source
from bra.vocab import COMPLY, FEATURE_CATEGORIES, REFUSE, SEGMENT_PROMPT

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFacts:
    """What the edits are checked against, from the model's config alone (no weights loaded)."""

    model_id: str
    """The manifest's model."""
    n_layers: int
    """Decoder blocks."""
    d_model: int
    """Residual width."""


@dataclass(frozen=True)
class PreparedEdit:
    """One checked edit, ready to build."""

    spec: EditSpec
    """The parsed ``--edit``."""
    edit: ResidualEdit
    """The hook and its record."""
    store: Path
    """Where its store goes (``<out>/<slug>.zarr``)."""


def _model_facts(manifest: Manifest) -> ModelFacts:
    if manifest.kind != "eval":
        raise EditError("intervene needs an eval manifest (prompt_sets): edits change generated completions")
    config = load_config(manifest.model)
    return ModelFacts(manifest.model.id, config_int(config, "num_hidden_layers", manifest.model.id),
                      config_int(config, "hidden_size", manifest.model.id))


def _edit_layer(cfg: InterveneConfig, manifest: Manifest, sae: SparseAutoencoder | None) -> int:
    """--layer, else the SAE's, else the manifest's only layer; it must be a layer the manifest hooks."""
    layer = cfg.layer
    if layer is None and sae is not None and sae.cfg.layer >= 0:
        layer = sae.cfg.layer
    if layer is None:
        if len(manifest.layers) != 1:
            raise EditError(f"--layer: the manifest hooks layers {list(manifest.layers)}; say which to edit")
        layer = manifest.layers[0]
    if layer not in manifest.layers:
        raise EditError(f"--layer {layer}: the manifest hooks layers {list(manifest.layers)} only; the "
                        f"edited layer must be one the store records")
    return layer


def _load_sae(cfg: InterveneConfig, model: ModelFacts) -> SparseAutoencoder:
    if cfg.sae is None:
        raise EditError("latent edits need --sae (the SAE whose latents they change)")
    sae = load_sae_source(cfg.sae, LoadHints(d_model=model.d_model, layer=cfg.layer)).eval()
    if sae.cfg.d_model != model.d_model:
        raise EditError(f"--sae {cfg.sae}: it reads d_model {sae.cfg.d_model}, but {model.model_id} has a "
                        f"residual width of {model.d_model}")
    if sae.cfg.model_name and sae.cfg.model_name != model.model_id and \
            organism_base(model.model_id) != sae.cfg.model_name:  # a base model's SAE reads its organisms
        raise EditError(f"--sae {cfg.sae}: it was trained on {sae.cfg.model_name}, the manifest runs "
                        f"{model.model_id}")
    return sae


def _check_sae_layer(sae: SparseAutoencoder, layer: int, source: str | None) -> None:
    if sae.cfg.layer >= 0 and sae.cfg.layer != layer:
        raise EditError(f"--sae {source}: it reads layer {sae.cfg.layer}, but the edit is at layer {layer}")


def load_catalog(source: str | os.PathLike[str], layer: int) -> dict[str, dict[str, Any]]:
    """The categories of a score run's catalog.json (or of the report folder holding it), checked to be of
    ``layer``: category -> its entry (latents, reason, ...)."""
    path = Path(source)
    if path.is_dir():
        path = path / CATALOG_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        categories = doc["categories"]
        settings = doc.get("settings") or {}
    except FileNotFoundError:
        raise EditError(f"--catalog {source}: no {CATALOG_FILE} there (run `bra-sae score` first)") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise EditError(f"--catalog {path}: not a catalog.json of `bra-sae score` (no categories)") from None
    if not isinstance(categories, dict):
        raise EditError(f"--catalog {path}: its categories are not a mapping")
    if settings.get("layer") is not None and int(settings["layer"]) != layer:
        raise EditError(f"--catalog {path}: it was built at layer {settings['layer']}, but the edit is at "
                        f"layer {layer}")
    return categories


def _category_latents(spec: EditSpec, catalog: dict[str, dict[str, Any]] | None) -> tuple[int, ...]:
    if catalog is None:
        raise EditError(f"--edit {spec.text!r}: category edits need --catalog (a `bra-sae score` run's "
                        f"catalog.json)")
    if spec.name not in catalog:
        known = [c for c in FEATURE_CATEGORIES if c in catalog]
        known += sorted(set(catalog) - set(FEATURE_CATEGORIES))
        raise EditError(f"--edit {spec.text!r}: unknown category {spec.name!r} (the catalog has "
                        f"{', '.join(known)})")
    entry = catalog[spec.name] or {}
    latents = [int(i) for i in entry.get("latents") or []]
    if not latents:
        reason = entry.get("reason") or "no latents"
        raise EditError(f"--edit {spec.text!r}: category {spec.name!r} is empty in the catalog ({reason})")
    return tuple(latents)


def _latent_edit(spec: EditSpec, sae: SparseAutoencoder, sae_source: str | None,
                 catalog: dict[str, dict[str, Any]] | None,
                 rates: Callable[[], tuple[np.ndarray, dict[str, Any]]]) -> tuple[LatentEdit, dict[str, Any]]:
    """The hook and record of a latent edit; a control (``:random=SEED``) draws, for each edited latent, a
    non-edited one of similar firing rate on the base store (``rates``: the rates and where they come
    from, computed on first use)."""
    ids = spec.ids if spec.target == LATENTS else _category_latents(spec, catalog)
    bad = [i for i in ids if not 0 <= i < sae.cfg.d_sae]
    if bad:
        raise EditError(f"--edit {spec.text!r}: latent {bad[0]} is out of range: the SAE has "
                        f"{sae.cfg.d_sae} latents (0..{sae.cfg.d_sae - 1})")
    matched = None
    if spec.random_seed is None:
        edited = ids
    else:
        rate_S, source = rates()
        edited, matched = matched_random_latents(rate_S, ids, spec.random_seed)
        matched = {**source, **matched}
    fn = LatentEdit(sae, edited, spec.op, spec.value)
    record = {"latents": list(edited), "n_latents": len(edited),
              "sae": {"path": str(sae_source), "architecture": sae.cfg.architecture, "d_sae": sae.cfg.d_sae,
                      "layer": sae.cfg.layer, "decoder_digest": vector_digest(fn.rows_ND.cpu().numpy())}}
    if matched is not None:
        record["control_of_latents"] = list(ids)
        record["matched_firing"] = matched
    return fn, record


def read_direction_file(path: str | os.PathLike[str], d_model: int) -> np.ndarray:
    """A saved direction: a .npy array, or a .safetensors file holding one tensor (or one named
    ``direction``); it must be [d_model] (or [1, d_model]), finite and non-zero."""
    where = f"direction file {path}"
    p = Path(path)
    if not p.is_file():
        raise EditError(f"{where}: not found")
    try:
        if p.suffix == ".npy":
            v = np.load(p, allow_pickle=False)
        else:
            from safetensors.numpy import load_file

            tensors = load_file(str(p))
            if "direction" in tensors:
                v = tensors["direction"]
            elif len(tensors) == 1:
                v = next(iter(tensors.values()))
            else:
                raise EditError(f"{where}: holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); name "
                                f"the direction 'direction'")
    except BraError:
        raise
    except Exception as exc:  # a truncated or foreign file: numpy's and safetensors' errors vary
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise EditError(f"{where}: unreadable ({first})") from None
    v = np.asarray(v, dtype=np.float32)
    if v.ndim == 2 and v.shape[0] == 1:
        v = v[0]
    if v.shape != (d_model,):
        raise EditError(f"{where}: shape {tuple(v.shape)}, but the model's residual width is {d_model} "
                        f"(need a [{d_model}] vector)")
    if not np.isfinite(v).all():
        raise EditError(f"{where}: holds NaN/inf")
    if not np.any(v):
        raise EditError(f"{where}: the direction is zero")
    return v


def _last_prompt_rows(store: Store) -> np.ndarray:
    """[n_docs] the store row of each document's last prompt token (the position before the first
    completion token: where Arditi et al. read their direction)."""
    doc = store.read_rows("doc_index", 0, store.n_tokens)
    prompt_rows = np.flatnonzero(store.read_rows("segment", 0, store.n_tokens) == SEGMENT_PROMPT)
    last = np.full(len(store.docs()), -1, np.int64)
    np.maximum.at(last, doc[prompt_rows], prompt_rows)
    if (last < 0).any():
        raise EditError(f"{store.path}: document {int(np.flatnonzero(last < 0)[0])} has no prompt tokens")
    return last


def _base_store(base: str | os.PathLike[str], layer: int, model: ModelFacts) -> Store:
    """The unedited eval store of the manifest's model, with the edited layer, that directions and the
    firing rates of latent controls are read from."""
    store = open_store(base)
    meta = store.meta
    if meta.kind != "eval" or not store.location.has_file(schema.PROMPTS_TABLE):
        raise EditError(f"--base-store {store.path}: not an eval store")
    if meta.edit is not None:
        raise EditError(f"--base-store {store.path}: it was generated under an edit "
                        f"({meta.edit.get('spec')}); directions come from an unedited store")
    if meta.model_id != model.model_id or store.d_model != model.d_model:
        raise EditError(f"--base-store {store.path}: it holds {meta.model_id} (d_model {store.d_model}), the "
                        f"manifest runs {model.model_id} (d_model {model.d_model})")
    if layer not in store.layers:
        raise EditError(f"--base-store {store.path}: it has layers {store.layers}, not the edited layer "
                        f"{layer}")
    return store


def firing_rates(cfg: InterveneConfig, sae: SparseAutoencoder, layer: int, model: ModelFacts, spec: EditSpec
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """[d_sae] firing rate of each latent on the base store's rows at ``layer`` (`bra.audit.reader`), and
    where it comes from; a latent control without a base store is refused."""
    if cfg.base_store is None:
        raise EditError(f"--edit {spec.text!r}: a random latent control is matched on firing rate on the "
                        f"unedited store of the manifest: give --base-store")
    store = _base_store(cfg.base_store, layer, model)
    rates, n_rows = latent_firing_rates(store.path, sae, layer)
    return rates, {"base_store": str(store.path), "n_rows": n_rows, "rule": "per edited latent, one of the "
                   "nearest non-edited latents by firing rate on the base store, drawn with the seed"}


def contrast_direction(base: str | os.PathLike[str], name: str, layer: int, model: ModelFacts,
                       cfg: InterveneConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """The ``refusal`` (refused minus complied) or ``hazard`` (hazard minus benign tiers) direction:
    difference of means of the last-prompt-token residuals at ``layer`` on the train split of ``base``
    (split as `bra-sae score` splits, by ``cfg.seed`` and fractions); and what it was computed from."""
    store = _base_store(base, layer, model)
    meta = store.meta
    table = store.read_table(schema.PROMPTS_TABLE).sort_values("doc_index", kind="stable")
    table = table.reset_index(drop=True)
    table, labels_used = choose_labels(table, AUTO, str(store.path))
    # the split score uses (by group), so the direction never saw score's test prompts
    train = split_prompts(table["id"], table["tier"], cfg.seed, cfg.train_fraction, cfg.calibration_fraction,
                          group_keys(table)[0]) == "train"
    if name == REFUSAL_DIRECTION:
        values, sides = table["surface_label"].astype(str).to_numpy(), ((REFUSE,), (COMPLY,))
        words = ("refused", "complied")
    else:
        classes = resolve_classes(None, None, meta.hazard_tiers, meta.benign_tiers, set(table["tier"]))
        values, sides, words = table["tier"].astype(str).to_numpy(), (classes.positive, classes.negative), \
            ("hazard-tier", "benign-tier")
    pos, neg = train & np.isin(values, sides[0]), train & np.isin(values, sides[1])
    if not pos.any() or not neg.any():
        raise EditError(f"direction={name}: the train split of {store.path} has {int(pos.sum())} {words[0]} "
                        f"and {int(neg.sum())} {words[1]} prompts; the difference of means needs one of each")
    rows = _last_prompt_rows(store)
    acts = np.stack([store.read_acts(layer, int(r), int(r) + 1)[0] for r in rows]).astype(np.float64)
    vector = (acts[pos].mean(0) - acts[neg].mean(0)).astype(np.float32)
    record = {"source": name, "base_store": str(store.path), "base_fingerprint": meta.manifest_hash,
              "position": "last prompt token", "split": "train", "seed": cfg.seed,
              "train_fraction": cfg.train_fraction, "calibration_fraction": cfg.calibration_fraction,
              "labels": labels_used.source, "n_positive": int(pos.sum()), "n_negative": int(neg.sum()),
              "mean_residual_norm": float(np.linalg.norm(acts[pos | neg], axis=1).mean())}
    return vector, record


def _direction(spec: EditSpec, layer: int, model: ModelFacts, cfg: InterveneConfig,
               cache: dict[str, tuple[np.ndarray, dict[str, Any]]]) -> tuple[np.ndarray, dict[str, Any]]:
    """The edit's own direction (computed once per name or file), before any random control."""
    if spec.name not in cache:
        if spec.name in NAMED_DIRECTIONS:
            if cfg.base_store is None:
                raise EditError(f"--edit {spec.text!r}: direction={spec.name} is computed from an unedited "
                                f"eval store of the manifest: give --base-store")
            cache[spec.name] = contrast_direction(cfg.base_store, spec.name, layer, model, cfg)
        else:
            cache[spec.name] = (read_direction_file(spec.name, model.d_model), {"source": spec.name})
    return cache[spec.name]


def prepare_edits(manifest: Manifest, cfg: InterveneConfig,
                  out: str | os.PathLike[str]) -> list[PreparedEdit]:
    """Parse and check every edit and resolve it into a hook (latents, directions, controls); loads the SAE,
    the catalog and the base store as needed, never the model's weights. Any problem is a one-line
    `EditError` (or the SAE's, store's own error) before anything is generated."""
    specs = parse_edits(cfg.edits)
    model = _model_facts(manifest)
    sae = _load_sae(cfg, model) if any(s.edits_latents for s in specs) else None
    layer = _edit_layer(cfg, manifest, sae)
    if sae is not None:
        _check_sae_layer(sae, layer, cfg.sae)
    catalog = load_catalog(cfg.catalog, layer) if cfg.catalog and any(s.target == CATEGORY for s in specs) \
        else None
    directions: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
    rate_cache: list[tuple[np.ndarray, dict[str, Any]]] = []

    def rates(spec: EditSpec) -> tuple[np.ndarray, dict[str, Any]]:
        if not rate_cache:
            assert sae is not None
            rate_cache.append(firing_rates(cfg, sae, layer, model, spec))
        return rate_cache[0]

    prepared = []
    for spec in specs:
        record: dict[str, Any] = {**spec.to_json(), "layer": layer}
        if spec.target == DIRECTION:
            vector, source = _direction(spec, layer, model, cfg, directions)
            own = describe_vector(vector)
            if spec.random_seed is not None:
                vector = random_direction(model.d_model, own["norm"], spec.random_seed)
            fn: Any = DirectionEdit(vector, spec.op, spec.value)
            record["direction"] = {**source, **describe_vector(vector),
                                   **({"control_of": own} if spec.random_seed is not None else {})}
        else:
            assert sae is not None
            fn, extra = _latent_edit(spec, sae, cfg.sae, catalog, lambda s=spec: rates(s))
            record.update(extra)
        prepared.append(PreparedEdit(spec, ResidualEdit(layer, fn, record), Path(out) / f"{spec.slug}.zarr"))
    for name, (vector, _) in directions.items():
        if name in NAMED_DIRECTIONS:
            _save_direction(Path(out) / f"direction-{name}-layer{layer}.npy", vector)
    return prepared


def _save_direction(path: Path, vector: np.ndarray) -> None:
    """Keep a computed direction beside the stores (reusable as direction=FILE)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, vector, allow_pickle=False)


def intervene(manifest: Manifest, out: str | os.PathLike[str], cfg: InterveneConfig,
              overwrite: bool = False) -> list[tuple[PreparedEdit, BuildResult]]:
    """Build one edited eval store per edit of ``cfg`` under ``out`` (``<slug>.zarr``; a manifest with
    generation variants: ``<slug>.<variant>.zarr`` each), checking every edit first (`prepare_edits`). The
    model is loaded once, and only when some store is not complete yet."""
    prepared = prepare_edits(manifest, cfg, out)
    loaded: LoadedModel | None = None
    done: list[tuple[PreparedEdit, BuildResult]] = []
    for item in prepared:
        for m, path in store_targets(manifest, item.store):
            fingerprint = store_fingerprint(m, item.edit)
            if not overwrite and lifecycle.completed_tokens(path, fingerprint) is not None:
                done.append((item, build_store(m, path, edit=item.edit)))  # logs "already complete"
                continue
            if loaded is None:
                loaded = load_build_model(manifest)
            logger.info("edit %s -> %s", item.spec.text, path)
            result = build_store(m, path, overwrite, loaded=loaded, edit=item.edit)
            _judge(m, result)
            done.append((item, result))
    return done


def _judge(manifest: Manifest, result: BuildResult) -> None:
    """Run the manifest's judges on a store built now, as `bra-cache build` does."""
    if manifest.judges and result.status != lifecycle.ALREADY_COMPLETE:
        from bra.pipeline.relabel import relabel_store

        relabel_store(result.path)


__all__ = ["ModelFacts", "PreparedEdit", "contrast_direction", "intervene", "load_catalog",
           "prepare_edits", "read_direction_file"]
