"""Step caching's bench-only forced skips (step_cache.FORCE_ENV): forcing steps k skips
exactly those whatever the probe says, through the same probe/replay path as a real
decision (a forced copy of a real pattern gives the real latents bit for bit); patterns
the cache cannot follow are refused; the service refuses every cached request while the
variable is set."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ditmesh.common.models import resolve_model
from ditmesh.denoiser import step_cache
from ditmesh.denoiser.parallel.mesh import single_process_mesh
from ditmesh.denoiser.runner import load_adapter
from ditmesh.denoiser.sampler import sample

from .helpers import flux_jobs

STEPS = 8
NEVER = 1e-9  # on the tiny random Flux the probe's rel is 0.33-0.5: never below this
ALWAYS = 1.0  # ... and always below this (test_step_cache.py)
THRESHOLD = 0.4  # skips some steps, computes others (test_step_cache.py)


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory) -> str:
    from ditmesh.tiny import make_tiny

    return str(make_tiny("flux", tmp_path_factory.mktemp("flux") / "model"))


@pytest.fixture(scope="module")
def adapter(tiny_flux_dir):
    return load_adapter(resolve_model(tiny_flux_dir), torch.device("cpu"), "float32")


def one_job(model_dir: str, threshold: float):
    # The second job of flux_jobs: one image, no CFG.
    return dataclasses.replace(flux_jobs(model_dir)[1], steps=STEPS, cache_threshold=threshold)


class Recorder:
    """Keeps each request's StepCache for the assertions."""

    def __init__(self, monkeypatch) -> None:
        self.caches: list[step_cache.StepCache] = []
        original = step_cache.StepCache.__init__
        recorder = self

        def init(self, *args, **kwargs):
            original(self, *args, **kwargs)
            recorder.caches.append(self)

        monkeypatch.setattr(step_cache.StepCache, "__init__", init)


def force(monkeypatch, steps) -> None:
    monkeypatch.setenv(step_cache.FORCE_ENV, ",".join(str(s) for s in steps))


@pytest.mark.parametrize("threshold", [NEVER, ALWAYS])
def test_forcing_steps_skips_exactly_those(tiny_flux_dir, adapter, monkeypatch, threshold):
    rec = Recorder(monkeypatch)
    forced = {2, 3, 5, 7}
    force(monkeypatch, sorted(forced))
    job = one_job(tiny_flux_dir, threshold)
    out = sample(adapter, job, single_process_mesh())
    (cache,) = rec.caches
    assert cache.pattern == [s in forced for s in range(STEPS)]
    assert job.cached_steps == cache.skipped == len(forced)
    # Every step after the first still ran the probe and its decision (the cost is kept).
    assert len(cache.rels) == STEPS - 1
    assert torch.isfinite(out).all()


def test_a_forced_copy_of_a_real_pattern_is_the_real_run_bit_for_bit(
    tiny_flux_dir, adapter, monkeypatch
):
    rec = Recorder(monkeypatch)
    monkeypatch.delenv(step_cache.FORCE_ENV, raising=False)
    real = sample(adapter, one_job(tiny_flux_dir, THRESHOLD), single_process_mesh())
    pattern = rec.caches[-1].pattern
    assert any(pattern) and not all(pattern[1:]), pattern  # a pattern worth copying
    force(monkeypatch, [s for s, skipped in enumerate(pattern) if skipped])
    forced = sample(adapter, one_job(tiny_flux_dir, NEVER), single_process_mesh())
    assert rec.caches[-1].pattern == pattern
    assert rec.caches[-1].rels == pytest.approx(rec.caches[-2].rels, rel=0, abs=0)
    assert torch.equal(forced, real)


def test_unset_or_empty_leaves_the_probe_to_decide(monkeypatch):
    monkeypatch.delenv(step_cache.FORCE_ENV, raising=False)
    assert step_cache.forced_skips() is None
    monkeypatch.setenv(step_cache.FORCE_ENV, " ")
    assert step_cache.forced_skips() is None
    monkeypatch.setenv(step_cache.FORCE_ENV, "5,1,3,3")
    assert step_cache.forced_skips() == frozenset({1, 3, 5})


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("0,2", "step 0 is always computed"),
        ("1,2,3,4", "4 in a row"),
        ("two", "comma-separated step numbers"),
        ("-1", "cannot be skipped"),
    ],
)
def test_patterns_the_cache_cannot_follow_are_refused(monkeypatch, text, why):
    monkeypatch.setenv(step_cache.FORCE_ENV, text)
    with pytest.raises(ValueError, match=why):
        step_cache.forced_skips()


def test_three_in_a_row_is_the_most_that_can_be_forced(monkeypatch):
    monkeypatch.setenv(step_cache.FORCE_ENV, "1,2,3,5,6,7")
    assert step_cache.forced_skips() == frozenset({1, 2, 3, 5, 6, 7})


def test_the_service_refuses_cached_requests_while_it_is_set(adapter, monkeypatch):
    from ditmesh.common.errors import InvalidArgument
    from ditmesh.denoiser.service import check_cache_threshold

    class Runner:
        pass

    Runner.adapter = adapter
    monkeypatch.delenv(step_cache.FORCE_ENV, raising=False)
    check_cache_threshold(0.5, Runner())  # a Flux denoiser caches
    monkeypatch.setenv(step_cache.FORCE_ENV, "2")
    assert "benchmarks only" in step_cache.refusal(adapter, pipefusion=1)
    with pytest.raises(InvalidArgument, match=step_cache.FORCE_ENV):
        check_cache_threshold(0.5, Runner())
    check_cache_threshold(0.0, Runner())  # off: no cache is built, nothing to refuse
