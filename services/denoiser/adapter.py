"""What a family adapter is and what every adapter needs: the `Adapter` protocol the
loops call, the `Prepared` request it makes, its base class, conditioning lookup, seeded
noise, schedulers, CFG.

The loops (sampler.py, parallel/pipefusion.py) know the mesh and nothing of a family;
an adapter (flux.py, sd3.py, pixart.py, hunyuan.py) knows its model and nothing of the mesh beyond
the plans it declares (its sequence plan, and a PipeFusion plan where it has one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ditmesh.common.errors import InvalidArgument
from ditmesh.common.models import ModelRef
from ditmesh.denoiser.job import DenoiseJob

if TYPE_CHECKING:
    from ditmesh.denoiser.parallel.pipefusion_stage import PipeFusionPlan, Stage


@dataclass(kw_only=True)
class Prepared:
    """A request made ready for the loop, identical on every rank."""

    latents: torch.Tensor
    """Initial noise for all images of the request, in the transformer's layout."""
    timesteps: torch.Tensor
    scheduler: Any
    do_cfg: bool
    branches: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Transformer inputs of each branch ("cond", "uncond"), batch = all images."""
    extra: dict[str, Any] = field(default_factory=dict)


class Adapter(Protocol):
    transformer: torch.nn.Module

    def prepare(self, job: DenoiseJob) -> Prepared: ...

    def predict(
        self,
        prep: Prepared,
        latents: torch.Tensor,
        t: torch.Tensor,
        branches: list[str],
        images: slice,
    ) -> list[torch.Tensor]:
        """The transformer's prediction of each branch for `images`, the family's one
        transformer call. A family with a PipeFusion plan also takes `text=False` (no text
        tokens in this pass), and with token patches `tokens=(start, stop)`."""
        ...

    def combine(
        self, cond: torch.Tensor, uncond: torch.Tensor | None, prep: Prepared, job: DenoiseJob
    ) -> torch.Tensor: ...

    def finish(self, prep: Prepared, latents: torch.Tensor, job: DenoiseJob) -> torch.Tensor: ...


def cond_tensor(job: DenoiseJob, name: str, device, dtype) -> torch.Tensor:
    """A conditioning tensor by name; `dtype=None` keeps its dtype (attention masks)."""
    try:
        t = job.cond[name]
    except KeyError:
        raise InvalidArgument(f"conditioning tensor {name!r} is missing") from None
    return t.to(device) if dtype is None else t.to(device, dtype)


def initial_noise(job: DenoiseJob, shape: tuple[int, ...], dtype, device) -> torch.Tensor:
    """Drawn on the CPU so a seed gives the same image on any device and any rank."""
    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator("cpu").manual_seed(job.seed)
    return randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dtype).to(
        device
    )


class SchedulerFactory:
    """The model's saved scheduler (class and config), made fresh for each request.

    Schedulers hold per-run state (step index, multistep history), so requests
    must not share one.
    """

    def __init__(self, source: str) -> None:
        import diffusers

        class _Reader(diffusers.ConfigMixin):
            config_name = "scheduler_config.json"

        self.config = _Reader.load_config(source, subfolder="scheduler")
        name = self.config.get("_class_name", "")
        self.cls = getattr(diffusers, name, None)
        if self.cls is None:
            raise ValueError(f"unknown scheduler class {name!r} in {source!r}")

    def __call__(self) -> Any:
        return self.cls.from_config(self.config)


def do_cfg(model: ModelRef, job: DenoiseJob) -> bool:
    """The family's CFG rule (as the gateway applies it); CFG needs the negative encoding."""
    has_negative = "negative_prompt_embeds" in job.cond
    on = model.family.uses_cfg(
        guidance=job.guidance, true_cfg_scale=job.true_cfg_scale, has_negative=has_negative
    )
    if on and not has_negative:
        raise InvalidArgument(
            f"guidance {job.guidance} > 1 runs classifier-free guidance, which needs the "
            "negative conditioning (negative_prompt_embeds); none was sent"
        )
    return on


def stack_branches(
    prep, branches: list[str], images: slice
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The transformer inputs of `branches` for `images`, batched as the pipelines batch them.

    SD3 and PixArt pipelines run CFG as one call on [uncond, cond]; keeping that
    order (not [cond, uncond]) keeps the single-process result next to theirs.
    Returns the batch order and the concatenated inputs.
    """
    order = ["uncond", "cond"] if sorted(branches) == ["cond", "uncond"] else list(branches)
    parts = [{k: v[images] for k, v in prep.branches[name].items()} for name in order]
    return order, {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def unstack_branches(
    out: torch.Tensor, order: list[str], branches: list[str]
) -> list[torch.Tensor]:
    """Splits a batched prediction back into `branches`, in the order they were asked for."""
    by_name = dict(zip(order, out.chunk(len(order)), strict=True))
    return [by_name[name] for name in branches]


def guide(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance as the pipelines write it."""
    if uncond is None:
        return cond
    return uncond + scale * (cond - uncond)


class TransformerAdapterBase:
    """What every family adapter holds: the model, its transformer in eval mode on the
    device, the callable `predict` uses (the transformer, or its CUDA-graphed replay, see
    runner.py) and the head count the mesh checks Ulysses against."""

    # Where the transformer's weights are; `device` is where the work runs. They differ
    # only between loading on the host and `to_device` (see load_adapter's `on_host`).
    weights_on: torch.device

    pipefusion_plan: PipeFusionPlan | None = None
    """What PipeFusion needs of this family (parallel/pipefusion_stage.py); None: the
    family cannot run PipeFusion."""
    pipefusion_stage: Stage | None = None
    """This rank's PipeFusion stage, once attached (the gang's, or the one-rank form)."""
    fast_attn = None
    """The DiTFastAttn state installed by --fast-attn (fastattn.FastAttnState), or None."""

    def __init__(
        self,
        model: ModelRef,
        device: torch.device,
        dtype: torch.dtype,
        transformer_cls,
        on_host: bool = False,
    ) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.weights_on = torch.device("cpu") if on_host else device
        self.transformer = transformer_cls.from_pretrained(
            model.source, subfolder="transformer", dtype=dtype
        ).to(self.weights_on)
        self.transformer.eval()
        self.forward = self.transformer
        self.heads = self.transformer.config.num_attention_heads

    def to_device(self) -> None:
        """Moves the transformer's weights (what is left of them) to `device`."""
        if self.weights_on != self.device:
            self.transformer.to(self.device)
            self.weights_on = self.device


def fix_first_step(scheduler, timesteps: torch.Tensor) -> None:
    """Sets the scheduler's begin index to what its first `step` would look up itself.

    Without a begin index, a scheduler finds its place in the schedule at the first step
    with a search over the timesteps that reads the result on the host (a GPU sync
    inside the loop). Doing that search here, before the loop, on a host copy and with
    the scheduler's own rule (`index_for_timestep`), gives the very same index.
    """
    if getattr(scheduler, "begin_index", 0) is not None:
        return  # already set (or the scheduler has none)
    find = getattr(scheduler, "index_for_timestep", None)
    if find is None or not hasattr(scheduler, "set_begin_index"):
        return
    schedule = scheduler.timesteps.detach().cpu()
    scheduler.set_begin_index(int(find(timesteps[0].detach().cpu(), schedule)))
