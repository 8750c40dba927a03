import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_checked_in_stubs_match_the_protos():
    spec = importlib.util.spec_from_file_location(
        "check_protos", ROOT / "tools" / "check_protos.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.drift() == []
