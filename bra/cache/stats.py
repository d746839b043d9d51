"""Running statistics of activations: Welford partials per shard, merged with Chan et al.'s formula.

Partials are kept per shard (not per batch) so that a resumed or multi-writer build merges exactly the
same partials in the same order as an uninterrupted one, and so the final numbers do not depend on
where a build was interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bra.cache import schema

_BLOCK = 4096  # rows converted to float64 at a time, to bound memory
STORED_BLOCK = 1024
"""Rows of a stored shard decoded at a time by `Moments.of_stored`: its temporaries (float32 rows, float64
copy: 19 MB at d_model 2304) stay below glibc's largest mmap threshold (32 MB), so they are reused from the
heap instead of being fresh pages every time; shard-sized ones were page faults that serialise threads
writing in parallel (bench study 10)."""


@dataclass(frozen=True)
class Moments:
    """Count, mean, sum of squared deviations (M2) and sum of squared norms of a set of rows."""

    count: int
    """Number of rows."""
    mean: np.ndarray
    """[d] float64 per-dimension mean."""
    m2: np.ndarray
    """[d] float64 sum of squared deviations from the mean."""
    sumsq: float
    """Sum over rows of the squared L2 norm."""

    @classmethod
    def empty(cls, d: int) -> Moments:
        """Moments of no rows."""
        return cls(0, np.zeros(d), np.zeros(d), 0.0)

    @classmethod
    def of(cls, x: np.ndarray) -> Moments:
        """Moments of rows ``x`` [n, d], computed in float64 blocks."""
        out = cls.empty(x.shape[1])
        for start in range(0, x.shape[0], _BLOCK):
            block = x[start:start + _BLOCK].astype(np.float64)
            n = block.shape[0]
            mean = block.mean(axis=0)
            # centred in place and reduced by einsum: no temporaries the size of the block (this runs on the
            # build's writer thread, beside the forward pass, so its cost shows in the build's speed)
            np.subtract(block, mean, out=block)
            m2 = np.einsum("ij,ij->j", block, block)
            out = out.merge(cls(n, mean, m2, float(m2.sum() + n * (mean @ mean))))  # Σ|x|² = Σ|x-μ|² + n|μ|²
        return out

    @classmethod
    def of_stored(cls, raw: np.ndarray, keep: np.ndarray, dtype: str,
                  scale: np.ndarray | None = None) -> Moments:
        """Moments of the rows ``keep`` selects from on-disk rows ``raw`` [n, d] of logical ``dtype`` (with
        their per-row ``scale`` for a scaled dtype), decoded ``STORED_BLOCK`` rows at a time.

        Each block's moments come from float64 sums of x and x² over its float32 rows (M2 = Σx² - n·mean²,
        then Chan's merge across blocks): 3x less CPU than centring a float64 copy (`of`), which the writer
        threads pay for every shard (bench study 10). The cancellation costs ~1e-16 x mean²/var relative in
        M2: 1e-10 for a dimension whose mean is 1,000 standard deviations, far inside verify's tolerance."""
        out = cls.empty(raw.shape[1])
        for start in range(0, raw.shape[0], STORED_BLOCK):
            block = slice(start, min(start + STORED_BLOCK, raw.shape[0]))
            sel = keep[block]
            if sel.any():
                kept_scale = None if scale is None else scale[block][sel]
                out = out.merge(cls._of_sums(schema.decode_rows(raw[block][sel], dtype, kept_scale)))
        return out

    @classmethod
    def _of_sums(cls, x: np.ndarray) -> Moments:
        """Moments of float32 rows ``x`` [n, d] (n > 0) from their float64 sums and sums of squares."""
        n = x.shape[0]
        mean = x.sum(axis=0, dtype=np.float64) / n
        sq = np.einsum("ij,ij->j", x, x, dtype=np.float64)
        return cls(n, mean, np.maximum(sq - n * mean * mean, 0.0), float(sq.sum()))

    def merge(self, other: Moments) -> Moments:
        """Combine two disjoint sets (Chan, Golub & LeVeque 1979 parallel variance)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2, self.sumsq + other.sumsq)

    def summary(self) -> dict[str, object]:
        """JSON-ready statistics: count, mean, (population) var, mean squared norm."""
        n = max(self.count, 1)
        return {
            "count": int(self.count),
            "mean": self.mean.tolist(),
            "var": (self.m2 / n).tolist(),
            "mean_sq_norm": self.sumsq / n,
        }
