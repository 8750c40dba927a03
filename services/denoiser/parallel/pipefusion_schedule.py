"""PipeFusion's scheduler state, one per patch: how a scheduler is stepped a patch at a time.

A diffusion scheduler's step updates each latent token from that token's values alone:
this step's model output and sample, and, for a multistep solver (DPM-Solver++,
UniPC, DEIS), the same token's earlier model outputs (and samples) that it keeps as its
history. So a patch can be stepped on its own if it has its own history: at the first
patch step the request's scheduler (which ran the whole-image warm-up steps) is copied
once per patch, and in each copy every tensor of the latents' shape (the history) is
replaced by the patch's rows of it (`PatchSchedulers`). Each copy then steps once a step,
so its step index and solver order advance as the whole-image scheduler's would; its
timesteps and sigmas are the request's. Nothing here names a scheduler class: a scheduler
without history (flow-matching Euler, DDPM) is copied the same way, with nothing to cut,
and a wrapper that holds the scheduler (HunyuanDiT's SeededSteps) has the history of the
scheduler it holds cut the same way.

What cannot be stepped a patch at a time is refused up front (`check_patchable`), with
the reason: state that mixes tokens (dynamic thresholding takes a quantile over the
whole image), and an input scaling that follows the scheduler's step index (the first
stage scales the model input but never steps a scheduler). A stochastic step (DDPM)
draws its noise in the patch's shape from the generator it is given: the same draws, in
the same order (patch by patch), on one rank and on a gang's last stage. A generator the
scheduler keeps (HunyuanDiT's SeededSteps keeps the request's) is shared by all the
copies, not copied, so the patches draw from one stream in patch order and the
whole-image steps before and after draw from it too.

The loop that steps the patches is pipefusion.py; how a patch is cut from the latents,
pipefusion_patches.py.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ditmesh.common.errors import InvalidArgument


def check_patchable(scheduler: Any, timesteps: torch.Tensor, like: torch.Tensor) -> None:
    """Refuses a scheduler that cannot be stepped a patch at a time (why, in the error).

    `like`: latents of the request's shape (the input scaling is probed on them)."""
    name = type(scheduler).__name__
    if scheduler.config.get("thresholding", False):
        raise InvalidArgument(
            f"PipeFusion steps the scheduler a patch at a time; {name} with dynamic "
            "thresholding takes a quantile over the whole image at each step, which a "
            "patch alone does not have"
        )
    scale = getattr(scheduler, "scale_model_input", None)
    if scale is None or len(timesteps) == 0:
        return
    probe = torch.ones(1, *like.shape[1:], dtype=torch.float32)
    # On a copy: scale_model_input may set the step index or other flags.
    if not torch.equal(copy.deepcopy(scheduler).scale_model_input(probe, timesteps[0]), probe):
        raise InvalidArgument(
            f"PipeFusion runs the first stage's model input without stepping its scheduler; "
            f"{name} scales that input by its step index, which only the last stage advances"
        )


def history_of(scheduler: Any, shape: torch.Size) -> list[torch.Tensor]:
    """The tensors of a scheduler's per-token state: its attributes (or their list or
    tuple items) shaped like the latents it steps. Timesteps, sigmas and alphas are 1-D
    and never match a latents shape ([B, N, C] or [B, C, H, W])."""
    found: list[torch.Tensor] = []
    for value in vars(scheduler).values():
        if callable(getattr(value, "step", None)) and hasattr(value, "__dict__"):
            found += history_of(value, shape)  # the scheduler a wrapper holds
            continue
        items = value if isinstance(value, (list, tuple)) else (value,)
        found += [x for x in items if isinstance(x, torch.Tensor) and x.shape == shape]
    return found


def generators_of(scheduler: Any) -> list[torch.Generator]:
    """The random generators a scheduler (or a wrapper of one) keeps."""
    found: list[torch.Generator] = []
    for value in vars(scheduler).values():
        if isinstance(value, torch.Generator):
            found.append(value)
        elif callable(getattr(value, "step", None)) and hasattr(value, "__dict__"):
            found += generators_of(value)
    return found


class PatchSchedulers:
    """One copy of a request's scheduler per patch, each holding its patch's rows of the
    history; made at the first patch step (see the module docstring)."""

    def __init__(self, scheduler: Any, latents: torch.Tensor, indices: list[tuple]) -> None:
        """`latents`: what the scheduler has stepped so far (its history is shaped like
        them); `indices[p]`: patch p's rows of them."""
        history = history_of(scheduler, latents.shape)
        shared = generators_of(scheduler)
        self.copies = []
        for index in indices:
            # deepcopy's memo maps an object's id to its copy: each history tensor is
            # "copied" as the patch's rows of it, wherever the scheduler keeps it, and a
            # generator as itself (one stream of draws for all patches).
            memo: dict[int, Any] = {id(h): h[index].clone() for h in history}
            memo.update({id(g): g for g in shared})
            self.copies.append(copy.deepcopy(scheduler, memo))

    def __getitem__(self, patch: int) -> Any:
        return self.copies[patch]

    def __len__(self) -> int:
        return len(self.copies)
