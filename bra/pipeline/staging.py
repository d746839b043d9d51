"""A batch's forward pass and the copy of its rows to the host, overlapped with the next batch's forward.

On a CUDA device the valid rows are gathered on the device (an index computed on the host, so no
synchronisation), copied into pinned host memory on a side stream (``non_blocking``), and an event marks the
copy's end. The build launches batch i+1's forward before it waits for batch i's rows, so the GPU computes
i+1 while i's rows cross PCIe and the host encodes and writes them. On a CPU the rows are simply there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bra.pipeline.model import capture_residuals
from bra.pipeline.plan import Window


@dataclass
class StagedRows:
    """One batch's valid rows per layer, on the host or on their way there."""

    host: dict[int, torch.Tensor]
    """[sum T_i, d] float32 per layer (pinned memory while a copy may be running)."""
    done: Any = None
    """CUDA event recorded after the copies (None: the rows are already on the host)."""

    def numpy(self) -> dict[int, np.ndarray]:
        """The rows as numpy arrays, once the copy has finished."""
        if self.done is not None:
            self.done.synchronize()
            self.done = None
        return {layer: t.numpy() for layer, t in self.host.items()}


class RowStager:
    """Starts forward passes and the copies of their rows to the host (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def forward(self, model: Any, windows: list[Window], layers: list[int], pad_id: int) -> StagedRows:
        """Right-padded forward of ``windows``; the valid rows of each layer in window order, staged."""
        t_max = max(len(w.ids) for w in windows)
        ids = torch.full((len(windows), t_max), pad_id, dtype=torch.long)
        att = torch.zeros((len(windows), t_max), dtype=torch.long)
        for i, w in enumerate(windows):
            ids[i, :len(w.ids)] = torch.from_numpy(w.ids.astype(np.int64))
            att[i, :len(w.ids)] = 1
        hidden = capture_residuals(model, ids.to(self.device), att.to(self.device), layers)
        if not self.cuda:
            valid = att.bool().to(self.device)
            return StagedRows({layer: hidden[layer][valid].cpu() for layer in layers})
        # a boolean mask on the device would synchronise (its row count); an index made here does not
        index = torch.nonzero(att.reshape(-1)).squeeze(1).to(self.device, non_blocking=True)
        rows = {layer: hidden[layer].reshape(-1, hidden[layer].shape[-1]).index_select(0, index)
                for layer in layers}
        assert self.stream is not None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        host = {}
        with torch.cuda.stream(self.stream):
            for layer, r in rows.items():
                buf = torch.empty(r.shape, dtype=r.dtype, pin_memory=True)
                buf.copy_(r, non_blocking=True)
                r.record_stream(self.stream)  # the forward's allocator must not reuse r before the copy ends
                host[layer] = buf
            done = torch.cuda.Event()
            done.record(self.stream)
        return StagedRows(host, done)


def forward_batch(model: Any, windows: list[Window], layers: list[int], device: torch.device,
                  pad_id: int) -> dict[int, np.ndarray]:
    """Right-padded forward; returns per layer the valid rows [sum T_i, d] in window order (float32)."""
    return RowStager(device).forward(model, windows, layers, pad_id).numpy()
