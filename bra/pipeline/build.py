"""Stage one: manifest → token plan → forward passes → shards in a Zarr store (resumable, multi-process).

The token plan fixes every row's place before any forward pass, so several processes (``torchrun``) can
build one store without talking while they work: rank 0 creates (or checks) the store, the not-done shards
are split into contiguous runs, one per rank, each rank runs only the batches that touch its run and writes
only those whole shards, and rank 0 finalizes once every rank is done. Per-shard statistics partials make
the merged statistics independent of who wrote what.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from bra import __version__
from bra.cache import schema
from bra.cache.location import StoreLocation
from bra.cache.store import store_exists
from bra.cache.writer import StoreWriter, remove_store
from bra.dist import SINGLE, Dist
from bra.errors import CorpusError, StoreError, StoreMismatchError
from bra.pipeline.manifest import Manifest, file_digest, manifest_hash
from bra.pipeline.model import (
    capture_residuals,
    check_layers,
    config_int,
    load_config,
    load_model,
    resolve_compute_dtype,
    resolve_device,
    tokenizer_fingerprint,
)
from bra.pipeline.plan import TokenPlan, Window, plan_corpora

logger = logging.getLogger(__name__)

ATTR_TOKENS_DIGEST = "tokens_digest"
_MAX_PENDING_SHARDS = 2  # shards queued for the writer thread before the forward loop waits


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


def default_store_path(manifest: Manifest) -> Path:
    """cache/<manifest name>.zarr"""
    return Path("cache") / f"{manifest.name}.zarr"


def _tokens_digest(plan: TokenPlan) -> str:
    crc = 0
    for w in plan.windows:
        crc = zlib.crc32(w.ids.tobytes(), crc)
    return f"{crc:08x}:{plan.n_tokens}"


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


def _mismatch(stored: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(stored) | set(new))
    out: list[str] = []
    for k in keys:
        a, b = stored.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _mismatch(a, b, f"{prefix}{k}.")
        elif a != b and not (isinstance(a, list) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            out.append(f"{prefix}{k}")
    return out


def check_existing(path: Path | str | StoreLocation, attrs_new: dict[str, Any]) -> str:
    """Decide what to do with an existing store: ``resume``, ``complete`` or ``create`` (a remote store
    whose creation was interrupted); raise if it is someone else's."""
    attrs = _read_attrs(path)
    if schema.ATTR_SCHEMA not in attrs:
        raise StoreError(f"{path} exists and is not a bra store; choose another --store or pass --overwrite")
    if attrs.get(schema.ATTR_MANIFEST_HASH) != attrs_new[schema.ATTR_MANIFEST_HASH]:
        diff = (_mismatch(attrs.get(schema.ATTR_MANIFEST, {}), attrs_new[schema.ATTR_MANIFEST])
                or ["input files"])
        raise StoreMismatchError(
            f"store {path} was built from a different manifest (differs in: {', '.join(diff[:6])}); "
            f"pass --overwrite to rebuild it or choose another --store"
        )
    for key in (schema.ATTR_TOKENIZER_FP, ATTR_TOKENS_DIGEST):
        if attrs.get(key) != attrs_new.get(key):
            raise StoreMismatchError(f"store {path} was built from different {key.replace('_', ' ')} "
                                     f"(the model or the corpus changed); pass --overwrite to rebuild it")
    if attrs.get(schema.ATTR_STATUS) == schema.STATUS_CREATING:
        return "create"
    return "complete" if attrs.get(schema.ATTR_STATUS) == schema.STATUS_COMPLETE else "resume"


def _read_attrs(path: Path | str | StoreLocation) -> dict[str, Any]:
    try:
        return dict(StoreLocation.parse(path).open_group(mode="r").attrs)
    except Exception:  # unreadable metadata: not ours to touch
        raise StoreError(f"{path} exists but is not a readable store; "
                         f"pass --overwrite to replace it") from None


def _already_complete(path: Path | str | StoreLocation, m_hash: str) -> bool:
    """Cheap check, before loading any model: a finished store of the same manifest needs no work."""
    if not store_exists(path):
        return False
    attrs = _read_attrs(path)
    return (attrs.get(schema.ATTR_MANIFEST_HASH) == m_hash
            and attrs.get(schema.ATTR_STATUS) == schema.STATUS_COMPLETE)


def _n_tokens(path: Path | str | StoreLocation) -> int:
    return int(_read_attrs(path)[schema.ATTR_N_TOKENS])


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


class ShardAssembler:
    """Collects rows arriving in store order into whole shards; drops rows of shards already done."""

    def __init__(self, layout: schema.StoreLayout, layers: list[int], disk_dtype: str, todo: set[int]):
        self.layout, self.layers, self.disk_dtype, self.todo = layout, layers, disk_dtype, todo
        self._buf: dict[int, tuple[dict[str, np.ndarray], dict[int, np.ndarray], list[int]]] = {}

    def add(self, start: int, cols: dict[str, np.ndarray], acts: dict[int, np.ndarray]):
        """Place rows [start, start+n) and return the shards this completed."""
        n = len(cols["token_id"])
        out = []
        pos = start
        while pos < start + n:
            shard = pos // self.layout.shard_tokens
            s0, s1 = self.layout.shard_bounds(shard)
            take = min(s1, start + n) - pos
            if shard in self.todo:
                c, a, filled = self._buf.setdefault(shard, self._alloc(s1 - s0))
                lo, hi = pos - s0, pos - s0 + take
                for k, v in cols.items():
                    c[k][lo:hi] = v[pos - start:pos - start + take]
                for layer in self.layers:
                    a[layer][lo:hi] = acts[layer][pos - start:pos - start + take]
                filled[0] += take
                if filled[0] == s1 - s0:
                    out.append((shard, c, a))
                    del self._buf[shard]
            pos += take
        return out

    def _alloc(self, n: int):
        cols = {k: np.zeros(n, dtype=dt) for k, dt in schema.TOKEN_COLUMNS.items()}
        acts = {layer: np.zeros((n, self.layout.d_model), dtype=self.disk_dtype) for layer in self.layers}
        return cols, acts, [0]


def _batches(plan: TokenPlan, batch_size: int, offsets: np.ndarray):
    for b in range(0, len(plan.windows), batch_size):
        yield (b, plan.windows[b:b + batch_size], int(offsets[b]),
               int(offsets[min(b + batch_size, len(plan.windows))]))


def forward_batch(model: Any, windows: list[Window], layers: list[int], device: torch.device,
                   pad_id: int) -> dict[int, np.ndarray]:
    """Right-padded forward; returns per layer the valid rows [sum T_i, d] in window order (float32)."""
    t_max = max(len(w.ids) for w in windows)
    ids = torch.full((len(windows), t_max), pad_id, dtype=torch.long)
    att = torch.zeros((len(windows), t_max), dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, :len(w.ids)] = torch.from_numpy(w.ids.astype(np.int64))
        att[i, :len(w.ids)] = 1
    hidden = capture_residuals(model, ids.to(device), att.to(device), layers)
    valid = att.bool().to(device)
    return {layer: hidden[layer][valid].cpu().numpy() for layer in layers}


def write_plan(writer: StoreWriter, plan: TokenPlan, model: Any, layers: list[int], batch_size: int,
               device: torch.device, pad_id: int, bos_id: int | None, shards: Sequence[int] | None = None,
               rank: int = 0) -> int:
    """Compute and write every not-done shard of ``plan`` (of ``shards`` only, when given: the shards this
    process owns); return the number of rows computed. ``rank`` is recorded per written shard."""
    layout = writer.layout
    todo = set(np.flatnonzero(~writer.done_shards()).tolist())
    if shards is not None:
        todo &= {int(x) for x in shards}
    if not todo:
        return 0
    offsets = plan.offsets()
    assembler = ShardAssembler(layout, layers, schema.STORAGE_DTYPES[writer.dtype], todo)
    needed = [(b, ws, s, e) for b, ws, s, e in _batches(plan, batch_size, offsets)
              if any(sh in todo
                     for sh in range(s // layout.shard_tokens, (e - 1) // layout.shard_tokens + 1))]
    total = sum(e - s for _, _, s, e in needed)
    pending: deque[Future[None]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bra-writer") as pool, \
            tqdm(total=total, unit="tok", unit_scale=True,
                 desc="build" if rank == 0 else f"build[rank {rank}]", dynamic_ncols=True) as bar:
        for _, ws, start, _end in needed:
            acts32 = forward_batch(model, ws, layers, device, pad_id)
            cols_list = [window_columns(w, plan.tier_codes[w.doc_index], bos_id) for w in ws]
            cols = {k: np.concatenate([c[k] for c in cols_list]) for k in schema.TOKEN_COLUMNS}
            acts = {layer: schema.to_storage(acts32[layer], writer.dtype) for layer in layers}
            for shard, c, a in assembler.add(start, cols, acts):
                pending.append(pool.submit(writer.write_shard, shard, c, a, rank))
            while len(pending) > _MAX_PENDING_SHARDS or (pending and pending[0].done()):
                pending.popleft().result()
            bar.update(len(cols["token_id"]))
        while pending:
            pending.popleft().result()
    return total


def build_store(manifest: Manifest, store: str | Path | None = None, overwrite: bool = False,
                dist: Dist = SINGLE) -> BuildResult:
    """Run stage one for ``manifest``: build, resume, or report an already complete store.

    ``store`` is a folder or a URL (``memory://``, ``s3://``, ``file://``). Under torchrun every rank calls
    this with its ``dist`` (``bra.dist.process_group``); alone, ``SINGLE``.
    """
    loc = StoreLocation.parse(store if store is not None else default_store_path(manifest))
    path = loc.handle
    m_hash = manifest_hash(manifest, _input_digests(manifest))
    if not overwrite:
        done_tokens = dist.on_main(lambda: _n_tokens(loc) if _already_complete(loc, m_hash) else None)
        if done_tokens is not None:
            logger.info("store %s is already complete; nothing to do", path)
            return BuildResult(path, done_tokens, 0, 0.0, "already-complete")
    device = resolve_device(manifest.model.device)
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    dtype = resolve_compute_dtype(manifest.model.compute_dtype, device)
    config = load_config(manifest.model)
    check_layers(manifest.layers, config_int(config, "num_hidden_layers", manifest.model.id),
                 manifest.model.id)
    model, tokenizer = load_model(manifest.model, device, dtype)
    plan, extra_tables = _plan(manifest, model, tokenizer, device, dist, loc, m_hash, overwrite)
    layers = sorted(manifest.layers)
    attrs = {
        schema.ATTR_SCHEMA: schema.SCHEMA_VERSION, schema.ATTR_KIND: manifest.kind,
        schema.ATTR_MODEL_ID: manifest.model.id, schema.ATTR_MODEL_REVISION: manifest.model.revision,
        schema.ATTR_LAYERS: layers, schema.ATTR_HOOK_NAMES: [schema.hook_name(layer) for layer in layers],
        schema.ATTR_D_MODEL: config_int(config, "hidden_size", manifest.model.id),
        schema.ATTR_DTYPE: manifest.storage.dtype,
        schema.ATTR_COMPUTE_DTYPE: str(dtype).removeprefix("torch."),
        schema.ATTR_TOKENIZER_FP: tokenizer_fingerprint(tokenizer),
        schema.ATTR_MANIFEST_HASH: m_hash, schema.ATTR_MANIFEST: manifest.content_dict(),
        schema.ATTR_DATASET_REVISIONS: {k: v["revision"] for k, v in plan.counts.items() if "revision" in v},
        schema.ATTR_PACKAGE_VERSION: __version__, schema.ATTR_TIER_NAMES: list(plan.tier_names),
        schema.ATTR_HAZARD_TIERS: list(manifest.positive_tiers),
        schema.ATTR_BENIGN_TIERS: list(manifest.negative_tiers), schema.ATTR_N_TOKENS: plan.n_tokens,
        schema.ATTR_N_DOCS: len(plan.docs), schema.ATTR_CHUNK_TOKENS: manifest.storage.chunk_tokens,
        schema.ATTR_SHARD_TOKENS: manifest.storage.shard_tokens,
        schema.ATTR_CODEC: asdict(manifest.storage.compression),
        schema.ATTR_CORPUS_COUNTS: plan.counts, ATTR_TOKENS_DIGEST: _tokens_digest(plan),
    }
    early = {k: v for k, v in extra_tables.items() if k == schema.GENERATION_TABLE}
    status, todo = dist.on_main(lambda: _open_store(loc, attrs, manifest, layers, overwrite, early))
    if status == "already-complete":
        logger.info("store %s is already complete (%d tokens); nothing to do", path, plan.n_tokens)
        return BuildResult(path, plan.n_tokens, 0, 0.0, "already-complete")
    mine = owned_shards(todo, dist.rank, dist.world)
    if dist.active:
        logger.info("rank %d: %d of the %d shards to write", dist.rank, len(mine), len(todo))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    t0 = time.perf_counter()
    computed, error = 0, None
    try:
        writer = StoreWriter.reopen(loc)
        computed = write_plan(writer, plan, model, layers, manifest.batch_size, device, pad_id,
                              tokenizer.bos_token_id, shards=mine, rank=dist.rank)
    except Exception as exc:  # every rank must learn of it, or the others wait at the next collective
        error = exc
    dist.check(error)
    computed = sum(dist.gather(computed))
    seconds = time.perf_counter() - t0
    dist.on_main(lambda: writer.finalize(plan.doc_table(), extra_tables))
    logger.info("%s %s: %d tokens (%d computed) in %.1fs", status, path, plan.n_tokens, computed, seconds)
    return BuildResult(path, plan.n_tokens, computed, seconds, status)


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

        saved = None if overwrite else dist.on_main(lambda: _saved_generation(loc, m_hash))
        return plan_prompts(manifest, model, tokenizer, device, dist, saved)
    plan = plan_corpora(manifest, tokenizer)
    digests = dist.gather(_tokens_digest(plan))
    if len(set(digests)) > 1:
        raise StoreError(f"ranks tokenised the corpora differently ({digests}); are they reading the same "
                         f"files with the same tokenizer?")
    return plan, {}


def _saved_generation(loc: StoreLocation, m_hash: str) -> pd.DataFrame | None:
    """The completions an interrupted build of the same manifest saved in the store, if any."""
    if not store_exists(loc) or not loc.has_file(schema.GENERATION_TABLE):
        return None
    attrs = _read_attrs(loc)
    if attrs.get(schema.ATTR_MANIFEST_HASH) != m_hash \
            or attrs.get(schema.ATTR_STATUS) == schema.STATUS_CREATING:
        return None
    return loc.read_table(schema.GENERATION_TABLE)


def _open_store(loc: StoreLocation, attrs: dict[str, Any], manifest: Manifest, layers: list[int],
                overwrite: bool, early_tables: dict[str, pd.DataFrame]) -> tuple[str, list[int]]:
    """Create, resume-check or refuse the store (rank 0 only); returns (status, not-done shards).
    ``early_tables`` are written before any shard (when missing), so a resume can read them back."""
    if overwrite:
        remove_store(loc)
    status = "built"
    writer = None
    if store_exists(loc):
        state = check_existing(loc, attrs)
        if state == "complete":
            return "already-complete", []
        if state == "create":
            remove_store(loc)
        else:
            writer, status = StoreWriter.reopen(loc), "resumed"
            logger.info("resuming %s: %d of %d shards done", loc, int(writer.done_shards().sum()),
                        writer.layout.n_shards)
    elif not loc.is_empty():
        raise StoreError(f"{loc} exists and is not a store; choose another --store or pass --overwrite")
    if writer is None:
        layout = schema.StoreLayout(attrs[schema.ATTR_N_TOKENS], attrs[schema.ATTR_D_MODEL],
                                    manifest.storage.chunk_tokens, manifest.storage.shard_tokens)
        codec = manifest.storage.compression
        writer = StoreWriter.create(loc, layout, layers, manifest.storage.dtype, codec, attrs)
    for name, table in early_tables.items():
        if status == "built" or not loc.has_file(name):
            loc.write_table(name, table)
    return status, np.flatnonzero(~writer.done_shards()).tolist()
