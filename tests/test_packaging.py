"""Packaging: every package folder is in the wheel, and the base install is the client alone.

The client-only install itself (a fresh venv, no torch, an image from a real
mesh) is tests/test_client_install.py, marked slow.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_in_the_wheel():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = cfg["package-dir"]
    found = set()
    for pkg, folder in dirs.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            name = ".".join([pkg, *rel.parts]) if rel.parts else pkg
            # A sub-folder mapped elsewhere by its own entry is found from that entry.
            if not any(
                name.startswith(other + ".") or name == other
                for other in dirs
                if other != pkg and other.startswith(pkg)
            ):
                found.add(name)
    assert found - listed == set()


# What the client-only install must not need: the `server` extra's packages.
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "sentencepiece", "numpy", "tqdm")


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_base_install_is_the_client_and_the_server_is_an_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = _requirement_names(project["dependencies"])
    assert base == {"grpcio", "grpcio-health-checking", "protobuf", "pillow"}
    server = _requirement_names(project["optional-dependencies"]["server"])
    assert set(HEAVY) <= server
    assert project["scripts"]["ditmesh"] == "ditmesh.cli:main"
    makefile = (ROOT / "Makefile").read_text()
    assert "install -q -e '.[server,dev,vae,k8s,telemetry]'" in makefile


def test_the_client_and_the_cli_import_nothing_heavy():
    """A fresh interpreter: what `import ditmesh.client` and `ditmesh generate --help` load."""
    code = (
        "import sys, ditmesh, ditmesh.client, ditmesh.client.generate_cmd, ditmesh.cli\n"
        "ditmesh.cli.build_parser()\n"
        f"heavy = {HEAVY!r}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize(
    "argv",
    [["serve", "encoder", "--model", "M"], ["up", "--model", "M"], ["make-tiny", "flux", "d"]],
)
def test_server_commands_without_the_server_extra_say_so_in_one_line(monkeypatch, capsys, argv):
    import ditmesh.cli

    monkeypatch.setattr(ditmesh.cli, "SERVER_MODULES", ("torch", "no_such_module_ditmesh"))
    assert ditmesh.cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"error: `ditmesh {argv[0]}` needs the server packages "
        "(no_such_module_ditmesh not installed): pip install 'ditmesh[server]'\n"
    )
    assert captured.out == ""
