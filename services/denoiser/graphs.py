"""Replaying the transformer forward from CUDA graphs.

A DiT step is thousands of small kernel launches plus, in a gang, the
collectives between them; on a fast GPU the host cannot issue them as fast as
the GPU runs them. Capturing the whole forward (collectives included: NCCL
supports capture) once per input signature and replaying it removes that
host overhead. Requests of the same shape reuse the graph; a new shape is
captured on first use (the gang captures at the same step on every rank, since
every rank sees the same signature). Off on CPU, where there are no graphs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor


def _signature(kwargs: dict) -> tuple:
    sig = []
    for k in sorted(kwargs):
        v = kwargs[k]
        if isinstance(v, torch.Tensor):
            sig.append((k, tuple(v.shape), v.dtype, v.device))
        else:
            sig.append((k, repr(v)))
    return tuple(sig)


class GraphedForward:
    """Calls `module(**kwargs)` through a CUDA graph per signature; returns a fresh tensor.

    Only keyword tensors and plain values are supported; the module must return
    its output as the first element of a tuple (diffusers' return_dict=False).
    """

    def __init__(self, module: torch.nn.Module, *, warmup: int = 2, max_graphs: int = 8) -> None:
        self.module = module
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None

    def _capture(self, kwargs: dict) -> _Captured:
        static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.module(**static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.module(**static)[0]
        log.info("captured a CUDA graph for a new input signature (%d held)", len(self._graphs) + 1)
        return _Captured(
            graph=graph,
            inputs={k: v for k, v in static.items() if isinstance(v, torch.Tensor)},
            output=output,
        )

    def __call__(self, **kwargs) -> tuple[torch.Tensor]:
        key = _signature(kwargs)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
            entry = self._graphs[key] = self._capture(kwargs)
        for name, buf in entry.inputs.items():
            buf.copy_(kwargs[name], non_blocking=True)
        entry.graph.replay()
        # The output buffer is overwritten by the next replay (the other CFG branch).
        return (entry.output.clone(),)
