"""HunyuanDiT model adapter: noise, DDPM schedule (stochastic, seeded as the pipeline
seeds it), the DiT with long skips and 2-D rotary positions, image meta size and style,
CFG and the learned-sigma split.

Follows diffusers' HunyuanDiTPipeline step for step: the same noise from the same seed
scaled by the scheduler's init sigma, the scheduler's own timesteps, the rotary table of
the image grid cropped from the 512-px base grid, the meta size (original 1024x1024,
target = the size asked for, crop at 0,0) and style 0 for every image, the variance half
dropped before guidance, CFG on [uncond, cond] whenever guidance > 1, and every scheduler
step drawn from the request's generator (DDPM adds fresh noise at each step), so a
request gives the image plain diffusers gives with `use_resolution_binning=False` (the
mesh serves the size asked for). `guidance_rescale` (0 in the pipeline) is not offered.

Sequence parallelism: image tokens are born in `pos_embed` and leave through `proj_out`;
the rotary table is split with them (it is one [2, L, D] tensor here, cos and sin, which
diffusers' `apply_rotary_emb` unpacks as it does the pipeline's tuple). Only the
self-attention (attn1) mixes image tokens; the cross-attention to the text (attn2) is
local to each shard's queries (their rotary rows come split), so it keeps diffusers'
processor. The long skips are per token, so each shard keeps its own.

PipeFusion (`HUNYUAN_PIPEFUSION`): a patch is a band of token rows, as for PixArt; the
self-attention keeps stale keys and values (rotary positions applied before they are
kept), the rotary table is cut to the patch's rows, the text is an input of every patch.
The long skips that cross a stage boundary travel with the patch (`long_skips`, see
parallel/pipefusion_skips.py). DDPM keeps no history; its per-patch copies share the
request's generator and draw in patch order (parallel/pipefusion_schedule.py).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ditmesh.common.models import ModelRef
from ditmesh.denoiser.adapter import (
    Prepared,
    SchedulerFactory,
    TransformerAdapterBase,
    cond_tensor,
    do_cfg,
    fix_first_step,
    guide,
    stack_branches,
    unstack_branches,
)
from ditmesh.denoiser.job import DenoiseJob
from ditmesh.denoiser.parallel.pipefusion_attention import StaleSelfProcessor
from ditmesh.denoiser.parallel.pipefusion_patches import RowBandPatches
from ditmesh.denoiser.parallel.pipefusion_stage import PipeFusionPlan
from ditmesh.denoiser.parallel.processors import attend
from ditmesh.denoiser.parallel.sequence import SequencePlan
from ditmesh.denoiser.parallel.usp import SequenceParallel

# HunyuanDiTPipeline's default `original_size` and `crops_coords_top_left`.
ORIGINAL_SIZE = (1024, 1024)
CROP_TOP_LEFT = (0, 0)


class HunyuanSelfParallelProcessor:
    """For HunyuanDiT's self-attention (attn1): diffusers' HunyuanAttnProcessor2_0 (q/k
    layer norms, then rotary positions on q and k) with the attention the gang's."""

    def __init__(self, sp: SequenceParallel, attn: torch.nn.Module) -> None:
        self.sp = sp

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        image_rotary_emb=None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("HunyuanSelfParallelProcessor is for self-attention without a mask")
        b, s = hidden_states.shape[:2]
        heads = attn.heads
        layers = ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k), (attn.to_v, None))

        def project(i: int):
            layer, norm = layers[i]
            x = layer(hidden_states)
            x = x.view(b, s, heads, x.shape[-1] // heads)  # [B, S, H, D]: norms act on D
            if norm is not None:
                x = norm(x)
            if i < 2 and image_rotary_emb is not None:
                x = apply_rotary_emb(x, image_rotary_emb, sequence_dim=1)
            return x, None

        shape = (b, s, heads, attn.to_q.out_features // heads)
        out = attend(self.sp, shape, 0, hidden_states, project)
        out = out.flatten(2, 3).to(hidden_states.dtype)
        return attn.to_out[1](attn.to_out[0](out))


HUNYUAN_PLAN = SequencePlan(
    split_inputs={"image_rotary_emb": 1},
    split_outputs={"pos_embed": 1},
    gather_output=("proj_out", 1),
    processors={"blocks.*.attn1": HunyuanSelfParallelProcessor},
)


def long_skips(blocks: int) -> dict[int, int]:
    """HunyuanDiT2DModel's long skips, producer -> the block that takes its output: its
    forward pushes the outputs of blocks 0..n/2-2 and pops one in each block past n/2, so
    block j feeds block n-1-j (the 6-block tiny model: 0 -> 5, 1 -> 4)."""
    if blocks % 2:
        raise ValueError(f"HunyuanDiT's long skips need an even number of blocks, not {blocks}")
    return {j: blocks - 1 - j for j in range(blocks // 2 - 1)}


# One block list; attn1 over kept keys and values (rotary on q and k), attn2 (to the
# text) as it is. Bands of token rows are cut after pos_embed, the rotary table with them,
# and put back before proj_out. Blocks return the image tokens alone.
HUNYUAN_PIPEFUSION = PipeFusionPlan(
    block_lists=("blocks",),
    processors={"attn1": StaleSelfProcessor},
    patches=RowBandPatches,
    cut_at=("pos_embed", "proj_out"),
    carried=("hidden_states",),
    cut_inputs={"image_rotary_emb": 1},
    long_skips=long_skips,
)


class SeededSteps:
    """The request's scheduler, stepped with the request's generator as the pipeline does.

    HunyuanDiT's DDPM draws new noise at every step from the generator that drew the
    initial noise, shaped like the whole batch. A rank that holds only some images (data
    parallel) steps the whole batch, its own images in place and zeros elsewhere, and
    keeps its rows: every scheduler diffusers ships updates each element on its own, so
    its rows are the pipeline's, noise included. Schedulers whose `step` takes no
    generator are stepped as they are. Everything else is the scheduler's.
    """

    def __init__(self, scheduler, generator: torch.Generator, images: int) -> None:
        self.scheduler = scheduler
        self.generator = generator
        self.total = images
        self.images = slice(0, images)
        """The rows of the batch this rank steps; the adapter's `predict` sets them."""
        self.seeded = "generator" in inspect.signature(scheduler.step).parameters

    def __getattr__(self, name: str) -> Any:
        # Only once made: copy.deepcopy (PipeFusion's per-patch copies) looks up
        # __setstate__ on an instance that has no `scheduler` yet.
        scheduler = self.__dict__.get("scheduler")
        if scheduler is None:
            raise AttributeError(name)
        return getattr(scheduler, name)

    def step(self, model_output, timestep, sample, return_dict: bool = False):
        if not self.seeded:
            return self.scheduler.step(model_output, timestep, sample, return_dict=return_dict)
        part = model_output.shape[0] != self.total
        if part:
            whole = (self.total, *model_output.shape[1:])
            out, x = model_output.new_zeros(whole), sample.new_zeros(whole)
            out[self.images], x[self.images] = model_output, sample
            model_output, sample = out, x
        prev = self.scheduler.step(
            model_output, timestep, sample, generator=self.generator, return_dict=False
        )[0]
        return (prev[self.images] if part else prev,)


class HunyuanDiTAdapter(TransformerAdapterBase):
    plan = HUNYUAN_PLAN
    pipefusion_plan = HUNYUAN_PIPEFUSION

    def __init__(
        self, model: ModelRef, device: torch.device, dtype: torch.dtype, on_host: bool = False
    ) -> None:
        from diffusers import HunyuanDiT2DModel

        super().__init__(model, device, dtype, HunyuanDiT2DModel, on_host)
        self.schedulers = SchedulerFactory(model.source)
        c = self.transformer.config
        self.learned_sigma = self.transformer.out_channels == 2 * c.in_channels

    def warmup_cond(self) -> dict[str, torch.Tensor]:
        """Conditioning of the shapes the encoder sends (BERT 77, mT5 256 tokens)."""
        c = self.transformer.config
        return {
            "prompt_embeds": torch.zeros(1, c.text_len, c.cross_attention_dim),
            "prompt_attention_mask": torch.ones(1, c.text_len, dtype=torch.int64),
            "prompt_embeds_2": torch.zeros(1, c.text_len_t5, c.cross_attention_dim_t5),
            "prompt_attention_mask_2": torch.ones(1, c.text_len_t5, dtype=torch.int64),
        }

    def rotary(self, height: int, width: int) -> torch.Tensor:
        """The pipeline's 2-D rotary table of the image grid, cos and sin stacked: [2, L, D].

        The pipeline writes 8 for the VAE's scale factor; it is 8 in every checkpoint.
        """
        from diffusers.models.embeddings import get_2d_rotary_pos_embed
        from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import (
            get_resize_crop_region_for_grid,
        )

        p, vsf = self.transformer.config.patch_size, self.model.vae_scale_factor
        grid = (height // vsf // p, width // vsf // p)
        crops = get_resize_crop_region_for_grid(grid, 512 // vsf // p)
        head_dim = self.transformer.inner_dim // self.transformer.num_heads
        cos, sin = get_2d_rotary_pos_embed(head_dim, crops, grid, device=self.device)
        return torch.stack([cos, sin])

    def prepare(self, job: DenoiseJob) -> Prepared:
        from diffusers.utils.torch_utils import randn_tensor

        dev, dt, n = self.device, self.dtype, job.num_images
        meta = torch.tensor([[*ORIGINAL_SIZE, job.height, job.width, *CROP_TOP_LEFT]], dtype=dt)

        def branch(prefix: str) -> dict[str, torch.Tensor]:
            def text(name: str, dtype) -> torch.Tensor:
                return cond_tensor(job, prefix + name, dev, dtype).repeat_interleave(n, dim=0)

            return {
                "encoder_hidden_states": text("prompt_embeds", dt),
                "text_embedding_mask": text("prompt_attention_mask", None),
                "encoder_hidden_states_t5": text("prompt_embeds_2", dt),
                "text_embedding_mask_t5": text("prompt_attention_mask_2", None),
                "image_meta_size": meta.repeat(n, 1).to(dev),
                "style": torch.zeros(n, dtype=torch.int64, device=dev),
            }

        cfg_on = do_cfg(self.model, job)
        branches = {"cond": branch("")}
        if cfg_on:
            branches["uncond"] = branch("negative_")

        scheduler = self.schedulers()
        scheduler.set_timesteps(job.steps, device=dev)
        timesteps = scheduler.timesteps
        fix_first_step(scheduler, timesteps)
        vsf = self.model.vae_scale_factor
        shape = (n, self.transformer.config.in_channels, job.height // vsf, job.width // vsf)
        # One generator for the request, on the CPU (the same image on any device and
        # rank): the initial noise first, then every scheduler step's (see SeededSteps).
        generator = torch.Generator("cpu").manual_seed(job.seed)
        noise = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dt)
        return Prepared(
            latents=noise.to(dev) * scheduler.init_noise_sigma,
            timesteps=timesteps,
            scheduler=SeededSteps(scheduler, generator, n),
            do_cfg=cfg_on,
            branches=branches,
            extra={"rotary": self.rotary(job.height, job.width)},
        )

    def predict(
        self, prep: Prepared, latents, t, branches: list[str], images: slice, *, text: bool = True
    ) -> list[torch.Tensor]:
        """`text` is PipeFusion's (False: a patch after the first); the text goes to a
        cross-attention, which every patch needs whole, so every call takes it."""
        prep.scheduler.images = images  # the rows this rank steps next
        order, inputs = stack_branches(prep, branches, images)
        x = torch.cat([latents] * len(order)) if len(order) > 1 else latents
        x = prep.scheduler.scale_model_input(x, t)
        out = self.forward(
            hidden_states=x,
            timestep=t.expand(x.shape[0]).to(x.dtype),
            image_rotary_emb=prep.extra["rotary"],
            return_dict=False,
            **inputs,
        )[0]
        return unstack_branches(out, order, branches)

    def combine(self, cond, uncond, prep: Prepared, job: DenoiseJob) -> torch.Tensor:
        # The pipeline drops the variance half before guidance (the same numbers after).
        if self.learned_sigma:
            cond = cond.chunk(2, dim=1)[0]
            uncond = None if uncond is None else uncond.chunk(2, dim=1)[0]
        return guide(cond, uncond, job.guidance)

    def finish(self, prep: Prepared, latents: torch.Tensor, job: DenoiseJob) -> torch.Tensor:
        # Already [N, 4, H/8, W/8] in VAE latent space; the VAE stage unscales.
        return latents
