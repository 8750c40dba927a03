"""PixArt-Sigma and PixArt-alpha under every gang layout equal the single process.

See helpers.ParallelEquivalence; the jobs are helpers.pixart_jobs. The text masks have
padding, as the encoder's do, so the cross-attention's mask is exercised on split image
tokens. PixArt under PipeFusion: test_pipefusion.py.
"""

from __future__ import annotations

import pytest

from .helpers import ParallelEquivalence, pixart_alpha_with_micro_conditions, pixart_jobs

pytestmark = pytest.mark.slow  # gloo gangs of 2 and 4 processes


class TestPixArtSigmaParallel(ParallelEquivalence):
    family = "pixart-sigma"

    @classmethod
    def make_jobs(cls, model_dir):
        return pixart_jobs(model_dir)


class TestPixArtAlphaParallel(ParallelEquivalence):
    """Alpha as its 1024-px checkpoint is: with size and aspect-ratio micro-conditions,
    which are per-image inputs and so must follow the images under dp and cfg."""

    family = "pixart-alpha"

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tmp_path_factory) -> str:
        from ditmesh.tiny import make_tiny

        folder = make_tiny(cls.family, tmp_path_factory.mktemp(cls.family) / "model")
        return str(pixart_alpha_with_micro_conditions(folder))

    @classmethod
    def make_jobs(cls, model_dir):
        return pixart_jobs(model_dir)
