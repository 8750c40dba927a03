"""Replaying the transformer forward from CUDA graphs.

A DiT step is thousands of small kernel launches; on a fast GPU the host cannot
issue them as fast as the GPU runs them. Capturing the forward once per input
signature and replaying it removes that host overhead. Requests of the same
shape reuse the graph; a new shape is captured on first use. GPU only. In a gang the
graph holds the NCCL collectives too; every rank captures the same forward at
the same point, so replays meet. Release the graphs before destroying the process
group: NCCL's teardown blocks while captured collectives are alive.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


def _tensors(value, path: tuple = ()):
    """(path, tensor) for every tensor in a value: a tensor, or dicts of them (PixArt's
    added_cond_kwargs), so none is replayed from stale memory."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for k in sorted(value):
            yield from _tensors(value[k], (*path, k))


def _get(kwargs: dict, path: tuple) -> torch.Tensor:
    v = kwargs
    for k in path:
        v = v[k]
    return v


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _signature(kwargs: dict) -> tuple:
    sig = []
    for k in sorted(kwargs):
        v = kwargs[k]
        tensors = list(_tensors(v, (k,)))
        if tensors:
            sig.extend((p, tuple(t.shape), t.dtype, t.device) for p, t in tensors)
        else:
            sig.append((k, repr(v)))
    return tuple(sig)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[tuple[tuple, torch.Tensor]]
    output: torch.Tensor


class GraphedForward:
    """Calls `module(**kwargs)` (a module or any callable) through a CUDA graph per
    signature; returns a fresh tensor.

    Keyword values may be tensors, dicts of tensors, or plain values (which are part
    of the signature); the module must return its output first in a tuple
    (diffusers' return_dict=False).
    """

    def __init__(self, module, *, warmup: int = 2, max_graphs: int = 8) -> None:
        self.module = module
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None

    def _capture(self, kwargs: dict) -> _Captured:
        static = {k: _clone(v) for k, v in kwargs.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.module(**static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = self.module(**static)[0]
        inputs = [(p, t) for k in sorted(static) for p, t in _tensors(static[k], (k,))]
        log.info("captured a CUDA graph for a new input signature (%d held)", len(self._graphs) + 1)
        return _Captured(graph=graph, inputs=inputs, output=output)

    def release(self) -> None:
        """Drops every captured graph (and its memory pool). Graphs that hold NCCL
        kernels must be gone before the process group is destroyed."""
        self._graphs.clear()
        self._pool = None
        gc.collect()
        torch.cuda.synchronize()

    def __call__(self, **kwargs) -> tuple[torch.Tensor]:
        key = _signature(kwargs)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
            entry = self._graphs[key] = self._capture(kwargs)
        for path, buf in entry.inputs:
            buf.copy_(_get(kwargs, path), non_blocking=True)
        entry.graph.replay()
        # The output buffer is overwritten by the next replay (the other CFG branch).
        return (entry.output.clone(),)
