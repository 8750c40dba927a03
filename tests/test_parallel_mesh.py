"""The mesh's rank layout and the errors for layouts that cannot run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ditmesh.denoiser.parallel.mesh import ParallelConfig, ParallelConfigError, split_counts


def test_documented_example_layout():
    c = ParallelConfig(cfg=2, ulysses=2, ring=2)
    assert c.world_size == 8
    assert c.coords(5) == {"dp": 0, "cfg": 1, "pipefusion": 0, "ulysses": 0, "ring": 1}
    assert c.groups_along("ulysses") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert c.groups_along("ring") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert c.groups_along("ulysses", "ring") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert c.groups_along("cfg") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    for r in range(8):
        assert c.rank_of(**c.coords(r)) == r


def test_every_rank_is_in_exactly_one_group_of_each_kind():
    c = ParallelConfig(dp=2, cfg=2, ulysses=2, ring=1)
    for dims in (("dp",), ("cfg",), ("ulysses",), ("ulysses", "ring")):
        members = sorted(r for g in c.groups_along(*dims) for r in g)
        assert members == list(range(c.world_size))


@pytest.mark.parametrize(
    "degrees, world, heads, message",
    [
        (dict(ulysses=2, ring=2), 8, 4, r"= 4, but the gang has 8 processes"),
        (dict(ulysses=3), 3, 4, r"--ulysses 3 does not divide the model's 4 attention heads"),
        (dict(cfg=3), 3, 4, r"--cfg must be 1 or 2"),
        (dict(pipefusion=2, ring=2), 4, 4, r"--pipefusion does not combine with --ring"),
        (dict(pipefusion=2, pipefusion_warmup=-1), 2, 4, r"--pipefusion-warmup must be 0 or more"),
        (dict(pipefusion=2, patches=-1), 2, 4, r"--patches must be 0"),
        (dict(ring=0), 1, 4, r"--ring must be a positive integer"),
    ],
)
def test_bad_layouts_name_the_degree(degrees, world, heads, message):
    with pytest.raises(ParallelConfigError, match=message):
        c = ParallelConfig(**degrees)
        c.check_world(world)
        c.check_model(heads=heads)


def test_split_counts():
    assert split_counts(3, 2) == [2, 1]
    assert split_counts(1, 4) == [1, 0, 0, 0]
    assert sum(split_counts(7, 3)) == 7


@pytest.mark.slow
def test_cli_refuses_a_bad_layout_before_starting(tiny_flux):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ditmesh.cli",
            "serve",
            "denoiser",
            "--model",
            tiny_flux,
            "--ulysses",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "--ulysses 3 does not divide the model's 4 attention heads" in out.stderr
    assert "Traceback" not in out.stderr
