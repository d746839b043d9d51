"""Stage one: manifest → token plan → forward passes → shards in a Zarr store (resumable, multi-process).

The token plan fixes every row's place before any forward pass, so several processes (``torchrun``) can
build one store without talking while they work: rank 0 creates (or checks) the store, the not-done shards
are split into contiguous runs, one per rank, each rank runs only the batches that touch its run and writes
only those whole shards, and rank 0 finalizes once every rank is done. Per-shard statistics partials make
the merged statistics independent of who wrote what. Creating, resuming or refusing the store is
``bra.cache.lifecycle``'s; this module owns the plan and the forward loop.

An eval manifest with generation variants builds one store per variant (``build_stores``), each an ordinary
eval store with its own fingerprint, resumed, left alone or refused on its own; the model is loaded once.

A build under a residual edit (``edit``, `bra.pipeline.model.ResidualEdit`; `bra-sae intervene`) runs the
same loop with the edit hooked in, for the generation and the forward alike: its store is an ordinary
store whose attrs record the edit and whose fingerprint covers it (``store_fingerprint``), so it resumes,
is left alone or is refused exactly as any other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bra import __version__
from bra.cache import lifecycle, schema
from bra.cache.location import StoreLocation
from bra.cache.parallel import default_writer_threads
from bra.cache.writer import StoreWriter
from bra.dist import SINGLE, Dist
from bra.errors import CorpusError, ManifestError, StoreError
from bra.pipeline.manifest import Manifest, file_digest, manifest_hash
from bra.pipeline.model import (
    ResidualEdit,
    check_layers,
    config_int,
    editing_residual,
    load_config,
    load_model,
    resolve_compute_dtype,
    resolve_device,
    tokenizer_fingerprint,
)
from bra.pipeline.plan import TokenPlan, Window, plan_corpora
from bra.pipeline.sink import ShardSink
from bra.pipeline.staging import RowStager, StagedRows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildResult:
    """What a build did."""

    path: Path | str
    """The store (a Path, or the URL of a remote store)."""
    n_tokens: int
    """Rows in the store."""
    computed_tokens: int
    """Rows run through the model in this invocation, all ranks together (0 when it was already complete)."""
    seconds: float
    """Wall time of the forward/write loop."""
    status: str
    """built, resumed or already-complete."""


@dataclass(frozen=True)
class LoadedModel:
    """The model a build runs, loaded once and shared by the stores of a manifest's variants."""

    model: Any
    """The causal LM, on ``device``, in eval mode."""
    tokenizer: Any
    """Its tokenizer."""
    config: Any
    """Its config (layer count, hidden size)."""
    device: torch.device
    """Where it runs."""
    dtype: torch.dtype
    """The compute dtype."""


def default_store_path(manifest: Manifest) -> Path:
    """cache/<manifest name>.zarr, or cache/<manifest name>.<variant>.zarr for one variant's manifest."""
    base = Path("cache") / f"{manifest.name}.zarr"
    return variant_store_path(base, manifest.variant.name) if manifest.variant is not None else base


def variant_store_path(store: Path | str, variant: str) -> Path | str:
    """The store of one variant beside ``store`` (a path or URL, used as a prefix): its ``.zarr`` suffix, if
    any, becomes ``.<variant>.zarr`` (``cache/x.zarr`` and ``cache/x`` -> ``cache/x.<variant>.zarr``)."""
    if isinstance(store, Path):
        if not store.name:
            raise StoreError(f"--store {store}: a manifest with generation variants needs a store name to "
                             f"prefix (e.g. cache/x.zarr -> cache/x.<variant>.zarr)")
        return store.with_name(f"{store.name.removesuffix('.zarr')}.{variant}.zarr")
    return f"{str(store).rstrip('/').removesuffix('.zarr')}.{variant}.zarr"


def store_targets(manifest: Manifest, store: str | Path | None = None) -> list[tuple[Manifest, Path | str]]:
    """(manifest, store) of every store ``manifest`` builds: itself at ``store`` (default
    ``default_store_path``) without variants, else each variant's manifest at ``variant_store_path``."""
    base: Path | str = store if store is not None else Path("cache") / f"{manifest.name}.zarr"
    if not manifest.generation.variants:
        return [(manifest, base)]
    return [(m, variant_store_path(base, m.variant.name)) for m in manifest.variant_manifests()
            if m.variant is not None]


def _tokens_digest(plan: TokenPlan) -> str:
    return schema.tokens_digest((w.ids for w in plan.windows), plan.n_tokens)


def _input_digests(manifest: Manifest) -> dict[str, str]:
    """Digest of every local input file, keyed by its path as the manifest writes it."""
    keyed = [(f"corpora[{i}].source.path", c.source.path)
             for i, c in enumerate(manifest.corpora) if c.source.path]
    keyed += [(f"prompt_sets[{i}].path", p.path) for i, p in enumerate(manifest.prompt_sets)]
    digests = {}
    for key, rel in keyed:
        local = manifest.resolve(rel)
        if not local.is_file():
            raise CorpusError(f"{key}: file not found: {local}")
        digests[rel] = file_digest(local)
    return digests


def store_fingerprint(manifest: Manifest, edit: ResidualEdit | None = None) -> str:
    """The ``manifest_hash`` a store of ``manifest`` records: the manifest's content and input files'
    (`manifest_hash`), combined with the edit's record for a store generated under one."""
    m_hash = manifest_hash(manifest, _input_digests(manifest))
    if edit is None:
        return m_hash
    payload = json.dumps({"manifest_hash": m_hash, "edit": edit.record}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def window_columns(w: Window, tier: int, bos_id: int | None) -> dict[str, np.ndarray]:
    """Per-token columns of one window."""
    n = len(w.ids)
    position = np.arange(n, dtype=np.int32)
    mask = position == 0  # attention sink: masked whether or not it is a BOS
    if bos_id is not None:
        mask |= w.ids == bos_id
    return {
        "token_id": w.ids.astype(np.int32), "doc_index": np.full(n, w.doc_index, np.int32),
        "position": position,
        "tier": np.full(n, tier, np.int8),
        "segment": w.segment.astype(np.int8) if w.segment is not None else np.zeros(n, np.int8), "mask": mask,
    }


def _batches(plan: TokenPlan, batch_size: int, offsets: np.ndarray):
    for b in range(0, len(plan.windows), batch_size):
        yield (b, plan.windows[b:b + batch_size], int(offsets[b]),
               int(offsets[min(b + batch_size, len(plan.windows))]))


def write_plan(writer: StoreWriter, plan: TokenPlan, model: Any, layers: list[int], batch_size: int,
               device: torch.device, pad_id: int, bos_id: int | None, shards: Sequence[int] | None = None,
               rank: int = 0, writer_threads: int | None = None) -> int:
    """Compute and write every not-done shard of ``plan`` (of ``shards`` only, when given: the shards this
    process owns); return the number of rows computed. ``rank`` is recorded per written shard.

    Batch i+1's forward is started before batch i's rows are taken from the device (`RowStager`), and whole
    shards are written by ``writer_threads`` threads (default `default_writer_threads`) while the forward
    loop goes on."""
    layout = writer.layout
    todo = set(np.flatnonzero(~writer.done_shards()).tolist())
    if shards is not None:
        todo &= {int(x) for x in shards}
    if not todo:
        return 0
    offsets = plan.offsets()
    needed = [(ws, s) for _, ws, s, e in _batches(plan, batch_size, offsets)
              if any(sh in todo
                     for sh in range(s // layout.shard_tokens, (e - 1) // layout.shard_tokens + 1))]
    total = sum(len(w.ids) for ws, _ in needed for w in ws)
    stager = RowStager(device)
    threads = writer_threads or default_writer_threads(accelerator=device.type != "cpu")
    with ShardSink(writer, todo, threads, rank) as sink, \
            tqdm(total=total, unit="tok", unit_scale=True,
                 desc="build" if rank == 0 else f"build[rank {rank}]", dynamic_ncols=True) as bar:

        def store(staged: StagedRows, ws: list[Window], start: int) -> None:
            cols_list = [window_columns(w, plan.tier_codes[w.doc_index], bos_id) for w in ws]
            cols = {k: np.concatenate([c[k] for c in cols_list]) for k in schema.TOKEN_COLUMNS}
            sink.add(start, cols, staged.numpy())
            bar.update(len(cols["token_id"]))

        previous = None
        for ws, start in needed:
            staged = stager.forward(model, ws, layers, pad_id)  # on a GPU: queued, not yet computed
            if previous is not None:
                store(*previous)  # batch i's rows, while the device computes batch i+1
            previous = (staged, ws, start)
        if previous is not None:
            store(*previous)
    return total


def load_build_model(manifest: Manifest, dist: Dist = SINGLE) -> LoadedModel:
    """Load the manifest's model on this rank's device, after checking its layers against the config."""
    device = resolve_device(manifest.model.device)
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    dtype = resolve_compute_dtype(manifest.model.compute_dtype, device)
    config = load_config(manifest.model)
    check_layers(manifest.layers, config_int(config, "num_hidden_layers", manifest.model.id),
                 manifest.model.id)
    model, tokenizer = load_model(manifest.model, device, dtype)
    return LoadedModel(model, tokenizer, config, device, dtype)


def build_stores(manifest: Manifest, store: str | Path | None = None, overwrite: bool = False,
                 dist: Dist = SINGLE, edit: ResidualEdit | None = None,
                 writer_threads: int | None = None) -> list[BuildResult]:
    """Build every store of ``manifest`` (``store_targets``): the one store of a manifest without variants
    (``build_store``, exactly as always), or one per generation variant, in manifest order.

    Variants whose store is complete are skipped before any model is loaded. Every other variant is checked
    against the tokenizer (template, system turn, window room) before the first store is written, so a bad
    variant leaves nothing half-written; the model is then loaded once for them all. ``edit``: every store
    is generated under it (see the module doc). ``writer_threads`` overrides the manifest's
    ``storage.writer_threads``.
    """
    targets = store_targets(manifest, store)
    if not manifest.generation.variants:
        results = [build_store(manifest, targets[0][1], overwrite, dist, edit=edit,
                               writer_threads=writer_threads)]
    else:
        from bra.pipeline.evalbuild import preflight

        pending = [(i, m) for i, (m, path) in enumerate(targets)
                   if overwrite or not _is_complete(m, path, dist, edit)]
        loaded = None
        if pending:
            loaded = load_build_model(manifest, dist)
            for i, m in pending:
                preflight(m, loaded.tokenizer, f"generation.variants[{i}]")
        results = [build_store(m, path, overwrite, dist, loaded, edit, writer_threads) for m, path in targets]
    _judge_new_stores(manifest, results, dist)
    return results


def _judge_new_stores(manifest: Manifest, results: Sequence[BuildResult], dist: Dist) -> None:
    """Run the manifest's ``judges:`` on every store this call built or resumed (rank 0; a store that was
    already complete keeps the votes it has: `bra-cache relabel` asks again)."""
    if not manifest.judges or not dist.is_main:
        return
    from bra.pipeline.relabel import relabel_store

    for result in results:
        if result.status != "already-complete":
            relabel_store(result.path)  # reads the judges recorded in the store's manifest


def _is_complete(manifest: Manifest, store: Path | str, dist: Dist, edit: ResidualEdit | None = None) -> bool:
    """Whether ``store`` is a complete store of ``manifest`` (checked on rank 0, before any model loads)."""
    m_hash = store_fingerprint(manifest, edit)
    return dist.on_main(lambda: lifecycle.completed_tokens(StoreLocation.parse(store), m_hash)) is not None


def build_store(manifest: Manifest, store: str | Path | None = None, overwrite: bool = False,
                dist: Dist = SINGLE, loaded: LoadedModel | None = None,
                edit: ResidualEdit | None = None, writer_threads: int | None = None) -> BuildResult:
    """Run stage one for ``manifest`` (one store: a manifest without variants, or one variant's manifest):
    build, resume, or report an already complete store.

    ``store`` is a folder or a URL (``memory://``, ``s3://``, ``file://``). Under torchrun every rank calls
    this with its ``dist`` (``bra.dist.process_group``); alone, ``SINGLE``. ``loaded``: the model, when the
    caller has it already (``build_stores``); else it is loaded here, once the store is known not complete.
    ``edit``: generate and record the store under this residual edit (see the module doc).
    ``writer_threads`` (else the manifest's ``storage.writer_threads``, else `default_writer_threads`) only
    changes the speed: the store is the same for any count.
    """
    if manifest.generation.variants:
        raise ManifestError("generation.variants: a manifest with variants builds one store per variant; "
                            "call build_stores")
    loc = StoreLocation.parse(store if store is not None else default_store_path(manifest))
    path = loc.handle
    m_hash = store_fingerprint(manifest, edit)
    if not overwrite:
        done_tokens = dist.on_main(lambda: lifecycle.completed_tokens(loc, m_hash))
        if done_tokens is not None:
            logger.info("store %s is already complete; nothing to do", path)
            return BuildResult(path, done_tokens, 0, 0.0, "already-complete")
    if loaded is None:
        loaded = load_build_model(manifest, dist)
    model, tokenizer, device, dtype = loaded.model, loaded.tokenizer, loaded.device, loaded.dtype
    with editing_residual(model, edit):
        plan, extra_tables = _plan(manifest, model, tokenizer, device, dist, loc, m_hash, overwrite)
    attrs = _store_attrs(manifest, plan, m_hash, config_int(loaded.config, "hidden_size", manifest.model.id),
                         dtype, tokenizer, edit)
    layers = list(attrs.layers)
    early = {k: v for k, v in extra_tables.items() if k == schema.GENERATION_TABLE}
    opened = dist.on_main(lambda: lifecycle.open_for_build(loc, attrs, overwrite, early))
    status, todo = opened.status, opened.todo
    if status == lifecycle.ALREADY_COMPLETE:
        logger.info("store %s is already complete (%d tokens); nothing to do", path, plan.n_tokens)
        return BuildResult(path, plan.n_tokens, 0, 0.0, "already-complete")
    mine = owned_shards(todo, dist.rank, dist.world)
    if dist.active:
        logger.info("rank %d: %d of the %d shards to write", dist.rank, len(mine), len(todo))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    schema.load_codec(attrs.dtype)
    t0 = time.perf_counter()
    computed, error = 0, None
    try:
        writer = StoreWriter.reopen(loc)
        threads = (writer_threads or manifest.storage.writer_threads
                   or default_writer_threads(dist.local_world, accelerator=device.type != "cpu"))
        with editing_residual(model, edit):
            computed = write_plan(writer, plan, model, layers, manifest.batch_size, device, pad_id,
                                  tokenizer.bos_token_id, shards=mine, rank=dist.rank, writer_threads=threads)
    except Exception as exc:  # every rank must learn of it, or the others wait at the next collective
        error = exc
    dist.check(error)
    computed = sum(dist.gather(computed))
    seconds = time.perf_counter() - t0
    dist.on_main(lambda: writer.finalize(plan.doc_table(), extra_tables))
    logger.info("%s %s: %d tokens (%d computed) in %.1fs", status, path, plan.n_tokens, computed, seconds)
    return BuildResult(path, plan.n_tokens, computed, seconds, status)


def _store_attrs(manifest: Manifest, plan: TokenPlan, m_hash: str, d_model: int, dtype: torch.dtype,
                 tokenizer: Any, edit: ResidualEdit | None = None) -> schema.StoreAttrs:
    """What the store records about this build: provenance, geometry and the digests a resume checks."""
    layers = sorted(manifest.layers)
    storage = manifest.storage
    return schema.StoreAttrs(
        kind=manifest.kind, model_id=manifest.model.id, model_revision=manifest.model.revision,
        layers=tuple(layers), hook_names=tuple(schema.hook_name(layer) for layer in layers), d_model=d_model,
        dtype=storage.dtype, compute_dtype=str(dtype).removeprefix("torch."),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), manifest_hash=m_hash,
        manifest=manifest.content_dict(),
        dataset_revisions={k: v["revision"] for k, v in plan.counts.items() if "revision" in v},
        package_version=__version__, tier_names=tuple(plan.tier_names),
        hazard_tiers=tuple(manifest.positive_tiers), benign_tiers=tuple(manifest.negative_tiers),
        n_tokens=plan.n_tokens, n_docs=len(plan.docs),
        chunk_tokens=storage.chunk_tokens, shard_tokens=storage.shard_tokens,
        codec=storage.compression.to_attrs(),
        corpus_counts=plan.counts, tokens_digest=_tokens_digest(plan),
        variant=dataclasses.asdict(manifest.variant) if manifest.variant is not None else None,
        edit=dict(edit.record) if edit is not None else None,
    )


def owned_shards(todo: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s share of the shards to write: one of ``world`` contiguous, near-equal runs of ``todo``.

    Contiguous runs keep the batches that straddle two owners (computed by both, each keeping its own
    rows) to ``world - 1``; splitting what is left to do, not all shards, keeps a resumed build balanced.
    """
    return [int(x) for x in np.array_split(np.asarray(sorted(todo), dtype=np.int64), world)[rank]]


def _plan(manifest: Manifest, model: Any, tokenizer: Any, device: torch.device, dist: Dist,
          loc: StoreLocation, m_hash: str, overwrite: bool) -> tuple[TokenPlan, dict[str, Any]]:
    """The token plan. Corpora are tokenised by every rank (deterministic; checked). Eval completions are
    generated by all ranks together and gathered, or read back from an interrupted build of the same
    manifest; every rank then plans the same windows."""
    if manifest.kind == "eval":
        from bra.pipeline.evalbuild import plan_prompts

        saved = None if overwrite else dist.on_main(lambda: lifecycle.saved_generation(loc, m_hash))
        return plan_prompts(manifest, model, tokenizer, device, dist, saved)
    plan = plan_corpora(manifest, tokenizer)
    digests = dist.gather(_tokens_digest(plan))
    if len(set(digests)) > 1:
        raise StoreError(f"ranks tokenised the corpora differently ({digests}); are they reading the same "
                         f"files with the same tokenizer?")
    return plan, {}
