"""Flux under every gang layout equals the single process (see helpers.ParallelEquivalence)."""

from __future__ import annotations

import pytest

from .helpers import ParallelEquivalence, flux_jobs

pytestmark = pytest.mark.slow  # gloo gangs of 2 and 4 processes


class TestFluxParallel(ParallelEquivalence):
    family = "flux"

    @classmethod
    def make_jobs(cls, model_dir):
        return flux_jobs(model_dir)
