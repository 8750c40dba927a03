"""DiTFastAttn's calibration: sample a few prompts exactly as a request would, and at each
step and attention layer pick the cheapest method (fastattn.METHODS: step, window, cfg,
full) whose relative L1 error at the layer's output, against full attention on the same
input, stays under the threshold; write the choices as a plan (fastattn.FastAttnPlan).

Step by step and layer by layer: at each call every candidate is computed next to full
attention on the layer's actual input (which reflects the choices already made at the
earlier layers and steps), and the chosen method's output is what the next layer sees.
With CFG (Flux calls the transformer once per branch) the first branch picks among
step/window/full on its own errors; the second branch then keeps that choice if its own
error passes too, else moves to the next costlier method (cfg: its full output against
the first branch's). Such a move makes the first branch (whose pass has run) more
exact in serving than during calibration, never less. Each prompt is calibrated on its
own; the plan takes, per step and layer, the costliest choice any prompt needed.

A threshold of 0 picks `full` everywhere (an error must be below the threshold).
Left to others: the CLI (`ditmesh fastattn-calibrate`), serving the plan (fastattn.py).
"""

from __future__ import annotations

import logging
import os

import torch

from ditmesh.denoiser.fastattn import (
    METHODS,
    PLAN_FILE,
    FastAttnPlan,
    FastAttnState,
    _map,
    attention_layers,
    install,
    uninstall,
)
from ditmesh.denoiser.job import DenoiseJob

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "a small red circle on the left and a large blue square on the right, on a white background",
    "a photograph of a lighthouse on a rocky coast at sunset",
    "a bowl of fruit on a wooden table, soft window light",
    "a city street at night in the rain, neon signs",
    "a watercolour painting of a fox in a snowy forest",
    "a close-up portrait of an old man with a grey beard",
    "a large green triangle in the centre, on a black background",
    "an astronaut riding a horse on the moon",
)


def relative_l1(out, ref) -> float:
    """sum |out - ref| / sum |ref| over every part of a layer's output."""
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    num = sum(
        float((o - r).abs().sum(dtype=torch.float64)) for o, r in zip(outs, refs, strict=True)
    )
    den = sum(float(r.abs().sum(dtype=torch.float64)) for r in refs)
    return num / den if den > 0 else float("inf")


class Calibration(FastAttnState):
    """Stands where FastAttnState does during one calibration request; records choices."""

    def __init__(self, steps: int, layers, window: float, threshold: float) -> None:
        self.threshold = threshold
        super().__init__(FastAttnPlan.all_full(steps, layers, window))
        self.choices = [[""] * len(self.plan.layers) for _ in range(steps)]

    def begin_request(self, *, steps: int, branches: int, text: int) -> None:
        if steps != self.plan.steps:
            raise ValueError(f"calibrating {self.plan.steps} steps; the job has {steps}")
        super().begin_request(steps=steps, branches=branches, text=text)
        self.pending: dict = {}

    def _first_passing(self, errors: dict, start: int = 0) -> str:
        for m in METHODS[start:]:
            if m == "full" or errors.get(m, float("inf")) < self.threshold:
                return m
        raise AssertionError("full always passes")

    def run(self, layer: int, attn, inner, hs, ehs, mask, rotary):
        if layer == 0:
            self.call += 1
        step, branch = divmod(self.call, self.branches)
        key = (layer, branch)
        full = self.full_kernel(inner, attn, hs, ehs, mask, rotary)
        win = self.window(attn, hs, ehs, rotary)
        candidates = {}
        if key in self.outputs:
            candidates["step"] = self.outputs[key]
        if key in self.residuals:
            candidates["window"] = _map(torch.add, win, self.residuals[key])
        errors = {m: relative_l1(out, full) for m, out in candidates.items()}
        if self.branches == 1 or branch == 0:
            # Not cfg: in the first branch it computes what full does.
            first = self._first_passing({**errors, "cfg": float("inf")})
            out = full if first == "full" else candidates[first]
            if self.branches == 1:
                self._keep(step, layer, 0, first, out, full, win, record=True)
            else:
                self.pending[layer] = (first, errors, out, full, win)
            return out
        first, errors0, out0, full0, win0 = self.pending.pop(layer)
        # step/window must pass in both branches; cfg is exact in the first.
        both = {m: max(e, errors0.get(m, float("inf"))) for m, e in errors.items()}
        both["cfg"] = relative_l1(full0, full)
        final = self._first_passing(both, METHODS.index("cfg" if first == "full" else first))
        if final == "window" and first == "step":
            out0 = _map(torch.add, win0, self.residuals[(layer, 0)])
        self._keep(
            step,
            layer,
            0,
            final if final in ("step", "window") else "full",
            out0 if final in ("step", "window") else full0,
            full0,
            win0,
            record=False,
        )
        out = {
            "step": candidates.get("step"),
            "window": candidates.get("window"),
            "cfg": full0,
        }.get(final, full)
        self._keep(step, layer, 1, final, out, full, win, record=True)
        return out

    def _keep(self, step, layer, branch, method, out, full, win, *, record: bool) -> None:
        """Records the choice and keeps what serving would keep after it."""
        key = (layer, branch)
        if record:
            self.choices[step][layer] = method
        if method == "full":
            self.residuals[key] = _map(torch.sub, full, win)
        elif method == "cfg":
            self.residuals[key] = self.residuals[(layer, 0)]
        self.outputs[key] = out


def calibrate(
    adapter, jobs: list[DenoiseJob], threshold: float, window: float = 0.125, prompts=()
) -> FastAttnPlan:
    """The plan for `jobs` (one prompt each, the same step count) on `adapter`."""
    from ditmesh.denoiser.parallel.mesh import single_process_mesh
    from ditmesh.denoiser.sampler import sample

    steps = {job.steps for job in jobs}
    if len(steps) != 1:
        raise ValueError(f"calibration jobs must share one step count; got {sorted(steps)}")
    (n,) = steps
    layers = attention_layers(adapter.transformer)
    merged = [["step"] * len(layers) for _ in range(n)]
    for job in jobs:
        cal = Calibration(n, layers, window, threshold)
        install(adapter, cal)
        try:
            sample(adapter, job, single_process_mesh())
        finally:
            uninstall(adapter)
        for s in range(n):
            for i in range(len(layers)):
                if METHODS.index(cal.choices[s][i]) > METHODS.index(merged[s][i]):
                    merged[s][i] = cal.choices[s][i]
    return FastAttnPlan(
        steps=n,
        layers=layers,
        window=window,
        methods=merged,
        threshold=threshold,
        prompts=tuple(prompts),
        model=adapter.model.name,
    )


def calibrate_model(
    model_dir: str,
    *,
    prompts: list[str],
    threshold: float,
    window: float = 0.125,
    steps: int = 0,
    size: tuple[int, int] | None = None,
    true_cfg_scale: float = 1.0,
    device: str = "auto",
    dtype: str = "auto",
    out: str | None = None,
) -> tuple[FastAttnPlan, str]:
    """Encodes `prompts` with the model's text encoder, calibrates, saves the plan (default
    MODEL/ditmesh_fastattn.json); returns it and where it went."""
    from ditmesh.common.models import load_class, pick_device, pick_dtype, resolve_model
    from ditmesh.denoiser.runner import load_adapter

    model = resolve_model(model_dir)
    dev = pick_device(device)
    encoder = load_class(model.family.text_encoder)(model, dev, pick_dtype(dtype, dev))
    conds = []
    for p in prompts:
        cond = {k: v.cpu() for k, v in encoder.encode(p).items()}
        if true_cfg_scale > 1:
            cond.update({"negative_" + k: v.cpu() for k, v in encoder.encode("").items()})
        conds.append(cond)
    del encoder
    height, width = size or model.family.default_hw
    jobs = [
        DenoiseJob(
            request_id=f"calibrate-{i}",
            height=height,
            width=width,
            steps=steps or model.default_steps,
            guidance=model.default_guidance,
            true_cfg_scale=true_cfg_scale,
            seed=i,
            num_images=1,
            cond=cond,
        )
        for i, cond in enumerate(conds)
    ]
    adapter = load_adapter(model, device, dtype)
    plan = calibrate(adapter, jobs, threshold, window, prompts)
    path = out or os.path.join(model_dir, PLAN_FILE)
    plan.save(path)
    return plan, path


def run_cli(args) -> int:
    """`ditmesh fastattn-calibrate MODEL --threshold T [--prompts N] [--out PLAN]`."""
    import sys

    prompts = list(args.prompt or DEFAULT_PROMPTS)[: args.prompts]
    if not prompts or args.threshold < 0 or not 0 < args.window <= 1:
        print("error: need a prompt, --threshold >= 0 and 0 < --window <= 1", file=sys.stderr)
        return 2
    plan, path = calibrate_model(
        args.model,
        prompts=prompts,
        threshold=args.threshold,
        window=args.window,
        steps=args.steps,
        size=args.size[0] if args.size else None,
        true_cfg_scale=args.true_cfg,
        device=args.device,
        dtype=args.dtype,
        out=args.out,
    )
    counts = ", ".join(f"{m} {plan.count(m)}" for m in METHODS)
    print(f"wrote {path}: {plan.steps} steps x {len(plan.layers)} layers ({counts})")
    return 0
