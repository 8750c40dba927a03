"""SD3 and SD3.5-style models under every gang layout equal the single process.

See helpers.ParallelEquivalence. SD3.5 adds q/k norms and an image-only second attention.
"""

from __future__ import annotations

import pytest

from .helpers import ParallelEquivalence, sd3_jobs, sd35_medium_style

pytestmark = pytest.mark.slow  # gloo gangs of 2 and 4 processes


class TestSD3Parallel(ParallelEquivalence):
    family = "sd3"

    @classmethod
    def make_jobs(cls, model_dir):
        return sd3_jobs(model_dir)


class TestSD35Parallel(ParallelEquivalence):
    """SD3.5-medium layout: the plan also swaps the processor of each block's `attn2`.

    Only what SD3.5 adds is checked here, to keep the file short: the 4-process
    layouts (Ulysses, Ring, both, and CFG with Ulysses) on one job with CFG,
    3 images and 15 image tokens. Data parallel is family code SD3 covers above.
    """

    family = "sd3"

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tmp_path_factory) -> str:
        from ditmesh.tiny import make_tiny

        folder = make_tiny(cls.family, tmp_path_factory.mktemp("sd35") / "model")
        return str(sd35_medium_style(folder))

    @classmethod
    def make_jobs(cls, model_dir):
        return [job for job in sd3_jobs(model_dir) if job.request_id == "b"]

    @pytest.mark.parametrize("world", [4])
    def test_layouts_match_single_process(self, model_dir, jobs, reference, world, tmp_path):
        super().test_layouts_match_single_process(model_dir, jobs, reference, world, tmp_path)
