"""Prints the markdown table of one GPU session: ours.jsonl and peers.jsonl in a folder.

Rows of issue 20's speed-ups (bench/gang_gpu.py's `+fp8`, `+cacheT`, `+skip...`,
`+shapescacheT`, `+shapesfaT`) also say how many steps were skipped, whether that pattern
was forced and where it was measured, and the share of attention DiTFastAttn computed.
"""

import json
import os
import sys


def rows(path: str):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def skipped(r: dict) -> str:
    if r.get("skipped_steps") is None:
        return "-"
    text = f"{r['skipped_steps']}/{r['steps']}"
    if r.get("forced_skips") is not None:
        text += " forced"
    elif r.get("cache_threshold") is not None:
        text += f" at {r['cache_threshold']}"
    return text


def note(r: dict) -> str:
    """Where a forced pattern or a DiTFastAttn plan came from."""
    parts = []
    if r.get("skip_source"):
        lo, hi = r.get("shapes_skipped_min_max", ("?", "?"))
        parts.append(
            f"pattern of {r['skip_source']} (skipped {100 * r['shapes_skipped_mean']:.0f}% "
            f"on average, {lo}-{hi} steps a prompt)"
        )
    if r.get("fastattn_source"):
        share = r.get("fastattn_methods_share", {})
        mix = " / ".join(f"{m} {100 * v:.0f}%" for m, v in share.items())
        parts.append(f"plan of {r['fastattn_source']} ({mix})")
    return "; ".join(parts) or "-"


def main(folder: str) -> None:
    print(
        "| system | variant | GPUs | H | seconds | of which denoise / VAE decode "
        "| rel L2 vs 1 GPU eager | steps skipped | attention computed | where the pattern or plan comes from |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows(os.path.join(folder, "ours.jsonl")):
        rel = r.get("rel_l2_vs_single")
        rel = "-" if rel is None else f"{rel:.1e}"
        parts = "-"
        if r.get("decode_sec") is not None:
            parts = f"{r['denoise_sec']:.2f} / {r['decode_sec']:.2f}"
        attention = r.get("attention_computed")
        attention = "-" if attention is None else f"{attention:.3f}"
        print(
            f"| ditmesh | {r['layout']} | {r['gpus']} | {r['H']} | {r['sec']:.2f} | {parts} "
            f"| {rel} | {skipped(r)} | {attention} | {note(r)} |"
        )
    for r in rows(os.path.join(folder, "peers.jsonl")):
        print(
            f"| {r['system']} | {r['label']} | {r['gpus']} | {r['H']} | {r['sec']:.2f} "
            "| - | - | - | - | - |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
