"""`make demo`: start the mesh locally, generate one image through the gateway, stop.

Runs the same code as `ditmesh up` and `ditmesh generate`, in one command. The model is
ditmesh's own trained shapes model (models/shapes, docs/shapes.md): the picture shows what
the prompt says, and the yardstick (ditmesh.eval) checks it and prints its reading.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ditmesh import shapes
from ditmesh.client import Client
from ditmesh.eval import score
from ditmesh.local import LocalMesh, UpConfig

DEMO_PROMPT = (
    "a large red circle on the left, a small yellow square at the top and "
    "a large blue triangle on the right, on a white background"
)


def check(picture_path: str, prompt: str) -> None:
    """The yardstick's reading of the picture, for a prompt in the shapes vocabulary."""
    try:
        shapes.parse_caption(prompt)
    except ValueError:
        return  # another model's prompt: nothing to check it against
    picture = np.asarray(Image.open(picture_path).convert("RGB"))
    scores = score(picture, prompt)
    right = sum(r for r, _ in scores.values())
    total = sum(n for _, n in scores.values())
    wrong = [k for k, (r, n) in scores.items() if r < n]
    print(
        f"yardstick: {right} of {total} attributes as the prompt says"
        + (f" (wrong: {', '.join(wrong)})" if wrong else "")
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="models/shapes")
    ap.add_argument("--out", default="demo.png")
    ap.add_argument("--prompt", default=DEMO_PROMPT)
    ap.add_argument("--size", type=int, default=128, help="the shapes model's trained size")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    t0 = time.monotonic()
    with LocalMesh(UpConfig(model=args.model)) as mesh:
        print(
            f"gateway listening on {mesh.gateway_address} (started in {time.monotonic() - t0:.1f} s)"
        )
        with Client(mesh.gateway_address, timeout=300) as client:

            def progress(p) -> None:
                if p.kind == "step":
                    print(
                        f"  step {p.step}/{p.total}",
                        end="\r" if p.step < p.total else "\n",
                        flush=True,
                    )
                else:
                    print(f"  {p.kind}", flush=True)

            result = client.generate(
                args.prompt,
                height=args.size,
                width=args.size,
                steps=args.steps,
                seed=args.seed,
                on_progress=progress,
            )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        paths = result.save(args.out)
    print(
        f"wrote {', '.join(map(str, paths))} (seed {result.seed}, {result.timings.total:.2f} s in the mesh)"
    )
    check(str(paths[0]), args.prompt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
