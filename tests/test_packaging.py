"""Every package folder is listed in pyproject.toml, so a wheel (not only an editable install) works."""

from pathlib import Path

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
