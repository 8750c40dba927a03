"""Prints the markdown table of one GPU session: ours.jsonl and peers.jsonl in a folder."""

import json
import os
import sys


def rows(path: str):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(folder: str) -> None:
    print(
        "| system | variant | GPUs | H | seconds | of which denoise / VAE decode | rel L2 vs 1 GPU eager |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows(os.path.join(folder, "ours.jsonl")):
        rel = r.get("rel_l2_vs_single")
        rel = "-" if rel is None else f"{rel:.1e}"
        parts = "-"
        if r.get("decode_sec") is not None:
            parts = f"{r['denoise_sec']:.2f} / {r['decode_sec']:.2f}"
        print(
            f"| ditmesh | {r['layout']} | {r['gpus']} | {r['H']} | {r['sec']:.2f} | {parts} | {rel} |"
        )
    for r in rows(os.path.join(folder, "peers.jsonl")):
        print(f"| {r['system']} | {r['label']} | {r['gpus']} | {r['H']} | {r['sec']:.2f} | - | - |")


if __name__ == "__main__":
    main(sys.argv[1])
