"""Prints the markdown table of bench/family_gpu.sh's RESULT lines (read from stdin)."""

import json
import sys


def main() -> None:
    print("| system | seconds | denoise / decode | peak GiB | first call (load, warm-up) |")
    print("|---|---|---|---|---|")
    for line in sys.stdin:
        if not line.startswith("RESULT "):
            continue
        r = json.loads(line[len("RESULT ") :])
        name = r["system"] + (f" {r['layout']}" if "layout" in r else "")
        parts = "-"
        if r.get("decode_sec") is not None:
            parts = f"{r['denoise_sec']:.2f} / {r['decode_sec']:.2f}"
        first = f"{r.get('load_s', '-')} s, {r.get('warmup_s', '-')} s"
        print(f"| {name} | {r['sec']:.2f} | {parts} | {r['peak_gib']} | {first} |")


if __name__ == "__main__":
    main()
