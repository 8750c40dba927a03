"""`make demo`: start the mesh locally, generate one image through the gateway, stop.

Runs the same code as `ditmesh up` and `ditmesh generate`, in one command.
"""

from __future__ import annotations

import argparse
import sys
import time

from ditmesh.client import Client
from ditmesh.local import LocalMesh, UpConfig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default="demo.png")
    ap.add_argument("--prompt", default="a lighthouse on a cliff at sunset, oil painting")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
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
        paths = result.save(args.out)
    print(
        f"wrote {', '.join(map(str, paths))} (seed {result.seed}, {result.timings.total:.2f} s in the mesh)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
