"""The container images (docker/): what the Dockerfiles pin and run as, and `make images`.

No container engine runs here, so the images are checked as files: pinned bases and
packages, a final stage that only copies the built venv and runs as a non-root user.
Building them is `make images` where docker or podman answers.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cpu.Dockerfile", "cuda.Dockerfile"])
def test_dockerfiles_pin_what_they_install_and_run_non_root(name):
    text = (ROOT / "docker" / name).read_text()
    stages = text.split("\nFROM ")
    final = stages[-1]
    assert "ARG PYTHON_IMAGE=python:3.11." in text and ":latest" not in text
    assert "ARG TORCH_VERSION=2." in text and '"torch==${TORCH_VERSION}"' in text
    assert "-c docker/constraints.txt" in text
    # The final stage copies the built venv; it installs no Python package itself.
    assert "COPY --from=build /opt/ditmesh /opt/ditmesh" in final
    assert "pip install" not in final
    assert "USER 10001:10001" in final
    # The chart runs `ditmesh ...` and, for multi-node gangs, torchrun (part of torch).
    assert 'ENTRYPOINT ["ditmesh"]' in final
    assert (ROOT / "docker" / f"{name}.dockerignore").exists()


def test_image_constraints_pin_every_dependency_of_the_extras():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            pkg, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned"
            pins[pkg.lower().replace("_", "-")] = version
    wanted = list(project["dependencies"])
    for extra in ("server", "vae", "k8s", "telemetry"):
        wanted += project["optional-dependencies"][extra]
    for req in wanted:
        name = req.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower()
        if name != "torch":  # pinned by the Dockerfiles' TORCH_VERSION (CPU or CUDA build)
            assert name.replace("_", "-") in pins, f"docker/constraints.txt does not pin {name}"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_images_says_so_where_no_container_engine_answers():
    def run(engine):
        return subprocess.run(
            ["make", "-s", "images", f"CONTAINER_ENGINE={engine}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    out = run("")
    assert out.returncode != 0 and "no container engine here" in out.stderr, out.stderr
    out = run("false")  # installed, but its engine does not answer
    assert out.returncode != 0 and "no engine answers" in out.stderr, out.stderr
    assert "build" not in out.stdout
