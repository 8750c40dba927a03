"""The client-only install: `pip install ditmesh` (no extras) in a fresh venv, against a real mesh.

The venv gets the checkout installed as a wheel, without extras, from the package
registry (pip's cache may serve it): it must hold no torch, yet make an image
through the SDK and through `ditmesh generate` from the mesh that the main venv
runs (`ditmesh up`, the `up_mesh` fixture), and its server commands must say in
one line that they need `ditmesh[server]`. The venv's size is printed (`-s`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# What the wheel is built from (pyproject's readme and package-dir).
SOURCES = ("pyproject.toml", "README.md", "services", "gateway", "client", "protos")
SERVER_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "sentencepiece", "tqdm")


def _env() -> dict[str, str]:
    """The environment minus what would point the venv's Python at the main venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(args: list[str | Path], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _build_venv(root: Path) -> Path:
    src = root / "src"
    src.mkdir()
    # Built from a copy: building in the checkout would leave build/ and egg-info there.
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=junk)
        else:
            shutil.copy2(ROOT / name, src / name)
    venv = root / "venv"
    made = _run([sys.executable, "-m", "venv", venv], cwd=root)
    assert made.returncode == 0, made.stderr
    pip = _run([venv / "bin" / "python", "-m", "pip", "install", "-q", src], cwd=root, timeout=300)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory, request) -> Path:
    root = tmp_path_factory.mktemp("client-install")
    # pip works while the mesh starts: the two together take about as long as the longer.
    with ThreadPoolExecutor(max_workers=1) as pool:
        building = pool.submit(_build_venv, root)
        request.getfixturevalue("up_mesh")
        venv = building.result()
    size = subprocess.run(["du", "-sh", venv], capture_output=True, text=True, check=True)
    print(f"client-only venv: {size.stdout.split()[0]}")
    return venv


def test_the_client_install_has_no_server_packages(client_venv, tmp_path):
    listed = _run([client_venv / "bin" / "python", "-m", "pip", "list"], cwd=tmp_path)
    names = {line.split()[0].lower() for line in listed.stdout.splitlines()[2:]}
    assert "ditmesh" in names and "grpcio" in names and "pillow" in names
    assert names.isdisjoint(SERVER_PACKAGES), sorted(names & set(SERVER_PACKAGES))
    found = _run(
        [
            client_venv / "bin" / "python",
            "-c",
            "import importlib.util as u; print(u.find_spec('torch'))",
        ],
        cwd=tmp_path,
    )
    assert found.stdout.strip() == "None"


def test_the_sdk_makes_an_image_from_a_client_only_install(client_venv, up_mesh, tmp_path):
    out = tmp_path / "sdk.png"
    script = (
        "import sys\n"
        "from ditmesh.client import Client\n"
        "with Client(sys.argv[1], timeout=120) as c:\n"
        "    c.wait_ready(timeout=60)\n"
        "    r = c.generate('a red fox', height=64, width=96, steps=2, seed=3)\n"
        "r.save(sys.argv[2])\n"
        "print(r.seed, sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    proc = _run([client_venv / "bin" / "python", "-c", script, up_mesh.address, out], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3", "[]"]
    with Image.open(out) as image:
        assert image.size == (96, 64)


def test_the_cli_makes_an_image_from_a_client_only_install(client_venv, up_mesh, tmp_path):
    out = tmp_path / "cli.png"
    proc = _run(
        [
            client_venv / "bin" / "ditmesh",
            *("generate", "a prompt", "--gateway", up_mesh.address),
            *("--height", "64", "--width", "64", "--steps", "2", "--seed", "1", "-o", out),
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and "seed: 1" in proc.stdout
    with Image.open(out) as image:
        assert image.size == (64, 64)


@pytest.mark.parametrize(
    "argv",
    [["serve", "encoder", "--model", "m"], ["up", "--model", "m"], ["make-tiny", "flux", "d"]],
)
def test_server_commands_of_a_client_only_install_name_the_extra(client_venv, tmp_path, argv):
    proc = _run([client_venv / "bin" / "ditmesh", *argv], cwd=tmp_path)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: `ditmesh {argv[0]}` needs the server packages (torch")
    assert line.endswith("pip install 'ditmesh[server]'")
    assert "Traceback" not in proc.stderr and proc.stdout == ""
