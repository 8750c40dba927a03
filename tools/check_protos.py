"""Fails when the checked-in stubs differ from what `make protos` would generate."""

from __future__ import annotations

import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path) -> None:
    protos = sorted(
        str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "ditmesh" / "v1").glob("*.proto")
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *protos,
        ],
        check=True,
    )


def drift() -> list[str]:
    """Names of generated files that are missing, extra or different."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        fresh = {
            p.name
            for p in (out / "ditmesh" / "v1").iterdir()
            if p.name.endswith(GENERATED_SUFFIXES)
        }
        checked = {
            p.name
            for p in (PROTO_DIR / "ditmesh" / "v1").iterdir()
            if p.name.endswith(GENERATED_SUFFIXES)
        }
        bad = sorted(fresh ^ checked)
        for name in sorted(fresh & checked):
            if not filecmp.cmp(
                out / "ditmesh" / "v1" / name, PROTO_DIR / "ditmesh" / "v1" / name, shallow=False
            ):
                bad.append(name)
        return bad


def main() -> int:
    bad = drift()
    if bad:
        print(
            "generated stubs are out of date (run `make protos`): " + ", ".join(bad),
            file=sys.stderr,
        )
        return 1
    print("generated stubs match the protos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
