"""CUDA-graph bookkeeping that can be checked without a GPU: what makes a signature."""

import torch

from ditmesh.denoiser.graphs import _get, _signature, _tensors


def test_dict_tensors_are_inputs_and_their_shapes_are_the_signature():
    a = {
        "x": torch.zeros(2, 3),
        "cond": {"resolution": torch.zeros(2, 2), "aspect_ratio": torch.zeros(2, 1)},
        "flag": False,
    }
    b = {
        "x": torch.ones(2, 3),
        "cond": {"resolution": torch.ones(2, 2), "aspect_ratio": torch.ones(2, 1)},
        "flag": False,
    }
    assert _signature(a) == _signature(b)  # values differ, shapes do not: one graph
    paths = [p for k in sorted(a) for p, _ in _tensors(a[k], (k,))]
    assert ("cond", "resolution") in paths and ("x",) in paths
    assert torch.equal(_get(b, ("cond", "resolution")), torch.ones(2, 2))
    c = dict(b, x=torch.ones(4, 3))
    assert _signature(c) != _signature(a)  # a new shape is a new graph
    d = dict(b, flag=True)
    assert _signature(d) != _signature(b)  # plain values are part of the signature


def test_none_entries_are_part_of_the_signature():
    a = {"cond": {"resolution": None}}
    b = {"cond": {"resolution": torch.zeros(1)}}
    assert _signature(a) != _signature(b)
