"""bench/gang_gpu.py's options for issue 20's speed table (parsing and refusals, the pick of
a skip pattern, a shapes DiTFastAttn plan mapped onto a deeper Flux) and
bench/session_table.py rendering the rows they write; a CPU run of the options on a tiny
Flux (the forced pattern skips exactly its steps, a mapped plan installs)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gang():
    return _load("gang_gpu")


def test_the_speed_options_parse(gang):
    lay = gang.parse_layout("single+compile+graphs+fp8")
    assert lay.speed == dict(compile=True, cuda_graphs=True, fp8=True)
    assert lay.cache_threshold == 0 and lay.skip is None
    lay = gang.parse_layout("single+compile+cache0.05")
    assert lay.cache_threshold == 0.05 and lay.skip is None
    lay = gang.parse_layout("single+compile+skip9_3_5")
    assert lay.skip == (3, 5, 9) and lay.cache_threshold == gang.FORCED_THRESHOLD
    lay = gang.parse_layout("single+compile+fp8+shapescache0.1")
    assert lay.shapes_cache == 0.1 and lay.speed == dict(compile=True, fp8=True)
    lay = gang.parse_layout("single+compile+shapesfa0.2")
    assert lay.shapes_fastattn == 0.2
    assert gang.parse_layout("single+compile+fastattn").fastattn_file
    assert gang.parse_layout("u2+compile+graphs").parallel.ulysses == 2


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("single+compile+graphs+cache0.1", "refused with \\+graphs"),
        ("single+graphs+shapescache0.1", "refused with \\+graphs"),
        ("single+compile+graphs+shapesfa0.1", "DiTFastAttn is refused with \\+graphs"),
        ("single+compile+shapesfa0.1+cache0.1", "do not compose"),
        ("single+cache0.1+skip3", "one of"),
        ("pf2+cache0.1", "PipeFusion"),
        ("single+turbo", "unknown option"),
        ("double+compile", "unknown base"),
        ("single+shapesfa0.1+fastattn", "not both"),
    ],
)
def test_what_cannot_run_is_refused_before_any_model_loads(gang, name, why):
    with pytest.raises(SystemExit, match=why):
        gang.parse_layout(name)


def test_the_pattern_forced_has_the_median_count_and_is_the_most_common(gang):
    a = [False, True, False, True]  # 2 skipped
    b = [False, False, True, True]  # 2
    c = [False, True, True, True]  # 3
    d = [False, False, False, False]  # 0
    assert gang.pick_pattern([a, b, b, c, d]) == b
    assert gang.pick_pattern([d, c, c]) == c  # the upper median


def test_a_shapes_plan_maps_by_depth_within_each_block_list(gang):
    from ditmesh.denoiser.fastattn_plan import FastAttnPlan

    layers = ["transformer_blocks.0.attn", "transformer_blocks.1.attn"] + [
        f"single_transformer_blocks.{i}.attn" for i in range(3)
    ]
    methods = [["full"] * 5, ["step", "window", "window", "full", "step"]]
    plan = FastAttnPlan(steps=2, layers=layers, window=0.125, methods=methods, threshold=0.1)
    big = gang.map_plan(plan, {"num_layers": 19, "num_single_layers": 38})
    assert big.steps == 2 and big.window == 0.125 and big.threshold == 0.1
    assert len(big.layers) == 57
    assert big.layers[0] == "transformer_blocks.0.attn"
    assert big.layers[19] == "single_transformer_blocks.0.attn"
    row = big.methods[1]
    # Double blocks 0-9 take shapes double block 0, 10-18 block 1.
    assert row[:10] == ("step",) * 10 and row[10:19] == ("window",) * 9
    # Single blocks: thirds of 38 (13, 13, 12) take shapes single blocks 0, 1, 2.
    assert row[19:32] == ("window",) * 13
    assert row[32:45] == ("full",) * 13
    assert row[45:] == ("step",) * 12
    assert big.methods[0] == ("full",) * 57


def test_the_table_renders_the_new_rows(tmp_path):
    table = _load("session_table")
    base = dict(system="ditmesh", gpus=1, H=1024, steps=28, decode_sec=0.1, denoise_sec=2.0)
    ours = [
        dict(base, layout="single", sec=4.9),
        dict(base, layout="single+compile+graphs+fp8", sec=2.6, rel_l2_vs_single=0.02),
        dict(
            base,
            layout="single+compile+fp8+shapescache0.1",
            sec=1.7,
            rel_l2_vs_single=0.05,
            cache_threshold=None,
            forced_skips=[2, 4, 6, 8, 10, 12, 14, 16, 18],
            skipped_steps=9,
            skip_source="models/shapes at threshold 0.1, 50 held-out prompts (cuda, float32)",
            shapes_skipped_mean=0.32,
            shapes_skipped_min_max=[7, 11],
        ),
        dict(base, layout="single+compile+cache0.1", sec=3.9, cache_threshold=0.1, skipped_steps=0),
        dict(
            base,
            layout="single+compile+shapesfa0.1",
            sec=3.0,
            attention_computed=0.61,
            fastattn_source="models/shapes calibrated at threshold 0.1 (cuda, float32), mapped by depth",
            fastattn_methods_share=dict(step=0.2, window=0.3, cfg=0.0, full=0.5),
        ),
    ]
    (tmp_path / "ours.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ours))
    peer = dict(system="xfuser-0.7.0", label="xfuser-u1-compile-fbcache", gpus=1, H=1024, sec=3.8)
    (tmp_path / "peers.jsonl").write_text(json.dumps(peer) + "\n")
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "session_table.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.splitlines()
    assert len(lines) == 2 + len(ours) + 1
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| 9/28 forced |" in out
    assert "skipped 32% on average, 7-11 steps a prompt" in out
    assert "| 0/28 at 0.1 |" in out
    assert "| 0.610 |" in out and "window 30%" in out
    assert "| xfuser-0.7.0 | xfuser-u1-compile-fbcache | 1 | 1024 | 3.80 |" in out
    del table


@pytest.mark.slow
def test_the_options_run_on_a_tiny_flux_on_cpu(tiny_flux, tmp_path):
    """gang_gpu.py itself, on CPU: a forced pattern skips exactly its steps, real caching
    reports its threshold, the shapes model's pattern (2 prompts) is the one forced."""
    import os

    cmd = [
        sys.executable,
        str(ROOT / "bench" / "gang_gpu.py"),
        "--model",
        str(tiny_flux),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--height",
        "64",
        "--steps",
        "8",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
        "--layouts",
        "single,single+skip2_4_5,single+cache1.0,single+shapescache0.1",
        "--shapes",
        str(ROOT / "models" / "shapes"),
        "--shapes-prompts",
        "2",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # a shared CPU: threads only wait on each other
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900, env=env)
    rows = [json.loads(x) for x in (tmp_path / "ours.jsonl").read_text().splitlines()]
    assert [r["layout"] for r in rows] == [
        "single",
        "single+skip2_4_5",
        "single+cache1.0",
        "single+shapescache0.1",
    ]
    assert rows[1]["forced_skips"] == [2, 4, 5] and rows[1]["skipped_steps"] == 3
    assert rows[2]["cache_threshold"] == 1.0 and rows[2]["skipped_steps"] > 0
    assert 0 < rows[1]["rel_l2_vs_single"] < 0.05
    measured = json.loads((tmp_path / "shapes-skips-0.1-8.json").read_text())
    assert len(measured["patterns"]) == 2 and all(len(p) == 8 for p in measured["patterns"])
    patterns = measured["patterns"]
    assert not any(p[0] for p in patterns)  # the first step is always computed
    counts = [sum(p) for p in patterns]
    shapes = rows[3]
    picked = [i for i, s in enumerate(gang_pick(patterns)) if s]
    assert shapes["forced_skips"] == picked
    assert shapes["skipped_steps"] == len(picked) > 0
    assert shapes["shapes_skipped_min_max"] == [min(counts), max(counts)]


def gang_pick(patterns):
    return _load("gang_gpu").pick_pattern(patterns)


def test_a_mapped_plan_names_the_layers_a_flux_transformer_has(gang):
    from diffusers import FluxTransformer2DModel

    from ditmesh.denoiser.fastattn_plan import FastAttnPlan, attention_layers

    config = dict(
        num_layers=3,
        num_single_layers=5,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    )
    model = FluxTransformer2DModel(**config)
    layers = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    plan = FastAttnPlan(steps=1, layers=layers, window=0.5, methods=[["full", "full"]])
    mapped = gang.map_plan(plan, config)
    mapped.check_layers(attention_layers(model))  # raises where the names differ
