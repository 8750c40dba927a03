"""A DiTFastAttn plan (fastattn.py follows one, fastattn_calibrate.py writes one): per
sampling step and attention layer, which method the layer runs; the window it was
calibrated with, the threshold and prompts; saved as JSON next to the model
(MODEL/ditmesh_fastattn.json) and read by `--fast-attn`.

Also what refuses a plan before any weight loads or request runs: a layout other than one
process or data parallel (`check_layout`), another model's layers (`check_layers`), a
request with another step count (`check_steps`, INVALID_ARGUMENT at the denoiser).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

from ditmesh.common.errors import InvalidArgument

METHODS = ("step", "window", "cfg", "full")
"""Cheapest first: the order calibration tries them in."""
PLAN_FILE = "ditmesh_fastattn.json"
"""The plan's default name, next to the model (MODEL/ditmesh_fastattn.json)."""
FORMAT = 1
FAMILY_TRANSFORMERS = ("FluxTransformer2DModel",)


@dataclass(kw_only=True)
class FastAttnPlan:
    """Per step and attention layer, one of METHODS; with what it was calibrated on."""

    steps: int
    layers: tuple[str, ...]
    """The transformer's attention modules (their names), in the order the forward runs them."""
    window: float
    """The window's band width as a fraction of the image tokens (see the module docstring)."""
    methods: tuple[tuple[str, ...], ...]
    """methods[step][layer]."""
    threshold: float = 0.0
    """Calibration: the largest relative L1 error allowed at a layer's output."""
    prompts: tuple[str, ...] = ()
    model: str = ""
    format: int = FORMAT

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        self.methods = tuple(tuple(row) for row in self.methods)
        self.prompts = tuple(self.prompts)
        if self.format != FORMAT:
            raise ValueError(
                f"fast-attention plan format {self.format}; this ditmesh reads {FORMAT}"
            )
        if self.steps < 1 or len(self.methods) != self.steps:
            raise ValueError(f"plan has {len(self.methods)} rows of methods for {self.steps} steps")
        if not 0.0 < self.window <= 1.0:
            raise ValueError(f"plan window must be in (0, 1]; got {self.window}")
        for s, row in enumerate(self.methods):
            if len(row) != len(self.layers):
                raise ValueError(
                    f"plan step {s} has {len(row)} methods for {len(self.layers)} layers"
                )
            if bad := [m for m in row if m not in METHODS]:
                raise ValueError(f"plan step {s}: unknown method {bad[0]!r} (one of {METHODS})")
        if bad := [m for m in self.methods[0] if m not in ("full", "cfg")]:
            raise ValueError(f"plan step 0 must compute every layer (full or cfg); has {bad[0]!r}")

    @classmethod
    def all_full(cls, steps: int, layers, window: float = 0.125) -> FastAttnPlan:
        layers = tuple(layers)
        return cls(
            steps=steps, layers=layers, window=window, methods=[["full"] * len(layers)] * steps
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> FastAttnPlan:
        return cls(**json.loads(text))

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str) -> FastAttnPlan:
        """Reads a plan; a folder means the plan saved next to that model."""
        if os.path.isdir(path):
            path = os.path.join(path, PLAN_FILE)
        try:
            with open(path) as f:
                text = f.read()
        except OSError as exc:
            raise InvalidArgument(
                f"--fast-attn: cannot read the plan {path!r}: {exc.strerror}"
            ) from None
        try:
            return cls.from_json(text)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"--fast-attn: {path!r} is not a valid plan: {exc}") from None

    def check_steps(self, steps: int) -> None:
        if steps != self.steps:
            raise InvalidArgument(
                f"this denoiser's fast-attention plan was calibrated for {self.steps} steps; "
                f"the request asks for {steps} (send steps={self.steps}, or calibrate a plan "
                "for that count)"
            )

    def check_layers(self, layers: tuple[str, ...]) -> None:
        if tuple(layers) != self.layers:
            raise InvalidArgument(
                f"the fast-attention plan names {len(self.layers)} attention layers "
                f"({', '.join(self.layers[:2])}, ...); this transformer has {len(layers)} "
                f"({', '.join(layers[:2])}, ...): the plan belongs to another model"
            )

    def count(self, method: str) -> int:
        return sum(row.count(method) for row in self.methods)


def attention_layers(transformer: torch.nn.Module) -> tuple[str, ...]:
    """Names of the modules whose processor the plan drives, in forward order."""
    return tuple(name for name, m in transformer.named_modules() if hasattr(m, "processor"))


def check_layout(parallel) -> None:
    """One process and data parallel run a plan; the other layouts are refused here."""
    why = [
        f"--{name} {getattr(parallel, name)}"
        for name in ("ulysses", "ring", "pipefusion", "cfg")
        if getattr(parallel, name) > 1
    ]
    if why:
        raise InvalidArgument(
            f"--fast-attn runs on one process or data parallel (--dp) gangs, not with "
            f"{', '.join(why)} (sequence-split, pipelined and CFG-split attention would each "
            "need the plan's layer outputs split the same way)"
        )


def check_serving(speed, parallel) -> None:
    """What the CLI and the service check before any weight loads: the layout, the plan
    file (readable and valid), and the speed-ups it composes with (Speedups checks)."""
    check_layout(parallel)
    FastAttnPlan.load(speed.fast_attn)
