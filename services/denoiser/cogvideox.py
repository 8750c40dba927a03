"""CogVideoX 1.0 (2B and 5B) model adapter: video noise, the CogVideoX DDIM / DPM
schedules, the expert transformer with text and video in one attention, CFG.

Follows diffusers' CogVideoXPipeline step for step: timesteps first, then the noise
[N, latent frames, C, h, w] from the seed scaled by the init sigma; 3D rotary positions
(5B) from the pipeline's own `_prepare_rotary_positional_embeddings`, or the sinusoidal
ones the 2B transformer adds itself; CFG on [uncond, cond] whenever guidance > 1 (no
dynamic CFG, the pipeline's default); the prediction cast to float32 before guidance.
The DPM scheduler (5B) steps with the previous step's predicted sample, the previous
timestep and fresh noise from the request's generator (`CogVideoXSteps`).
CogVideoX 1.5 (temporal patches, `patch_size_t`) and image-to-video (`ofs`) are refused.

Sequence parallelism (`COGVIDEOX_PLAN`): the transformer embeds text and video in one
`patch_embed` call and splits them inside its forward, so no submodule's output holds
the video tokens alone before the blocks. The split is therefore a pre-hook on the first
block (`_split_video`, installed at load and inert until the parallel processor is
attached, since it takes the group from that processor); the text stays whole on every
rank and joins the attention once (`attend`); the 5B rotary table is cut to each rank's
tokens in the processor; `proj_out`'s output (video only) is gathered. Token counts that
do not divide by the degree are padded and masked as for the image families.
A cleaner form, a plan field "split this keyword input of that submodule", belongs in
parallel/sequence.py.

How another video family plugs in: an adapter like this one whose `prepare` reads
`job.num_frames`, registered in `Family.denoiser` (common/models.py); the sampler and the
parallel layouts need nothing else (latents may have any number of dims after the batch).
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from ditmesh.common.errors import InvalidArgument
from ditmesh.common.models import ModelRef
from ditmesh.denoiser.adapter import (
    Prepared,
    SchedulerFactory,
    TransformerAdapterBase,
    cond_tensor,
    do_cfg,
    guide,
    stack_branches,
    unstack_branches,
)
from ditmesh.denoiser.job import DenoiseJob
from ditmesh.denoiser.parallel.processors import _check_plain, _projection, attend
from ditmesh.denoiser.parallel.sequence import SequencePlan, shard
from ditmesh.denoiser.parallel.usp import SequenceParallel


class CogVideoXParallelProcessor:
    """For CogVideoX's attention (CogVideoXAttnProcessor2_0): one set of projections and
    q/k layer norms for text and video tokens, rotary positions on the video ones only;
    returns (video, text) as the original does."""

    def __init__(self, sp: SequenceParallel, attn: torch.nn.Module) -> None:
        _check_plain(attn)
        self.sp = sp

    def _rotary(self, image_rotary_emb):
        """This rank's rows of the (cos, sin) table, zero rows for the padded tail."""
        s = self.sp.shards
        start = self.sp.shard_index * s.local
        out = []
        for f in image_rotary_emb:
            part = f[start : start + s.local]
            out.append(F.pad(part, (0, 0, 0, s.local - part.shape[0])))
        return tuple(out)

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states,
        attention_mask=None,
        image_rotary_emb=None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("attention masks are not supported under sequence parallelism")
        text_len = encoder_hidden_states.shape[1]
        freqs = None if image_rotary_emb is None else self._rotary(image_rotary_emb)
        layers = ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k), (attn.to_v, None))

        def project(i: int):
            video = _projection(attn, hidden_states, *layers[i])
            text = _projection(attn, encoder_hidden_states, *layers[i])
            if i < 2 and freqs is not None:
                video = apply_rotary_emb(video, freqs, sequence_dim=1)
            return video, text

        shape = (*hidden_states.shape[:2], attn.heads, attn.to_q.out_features // attn.heads)
        out = attend(self.sp, shape, text_len, hidden_states, project)
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(hidden_states.dtype)))
        return out[:, text_len:], out[:, :text_len]


def _split_video(block, args, kwargs):
    """Pre-hook of the first block: this rank's video tokens, while the parallel processor
    is attached (the group is the processor's); a no-op otherwise."""
    proc = block.attn1.processor
    if isinstance(proc, CogVideoXParallelProcessor):
        kwargs["hidden_states"] = shard(kwargs["hidden_states"], 1, proc.sp)
    return args, kwargs


# The video tokens are cut before the first block (`_split_video`) and gathered where they
# leave through proj_out; every block's attention is the joint text+video one.
COGVIDEOX_PLAN = SequencePlan(
    gather_output=("proj_out", 1),
    processors={"transformer_blocks.*.attn1": CogVideoXParallelProcessor},
)


class CogVideoXSteps:
    """The request's scheduler stepped as CogVideoXPipeline steps it.

    The DPM scheduler (5B) takes the previous step's predicted sample and timestep, and
    draws noise from the request's generator shaped like the whole batch, at every step.
    A rank that holds only some videos (data parallel) steps the whole batch, its own rows
    in place and zeros elsewhere, and keeps its rows (the scheduler is elementwise), so the
    noise of each video is the pipeline's. DDIM (2B, eta 0) draws nothing and is stepped as
    it is. Everything else is the scheduler's.
    """

    def __init__(self, scheduler, generator: torch.Generator, videos: int) -> None:
        self.scheduler = scheduler
        self.generator = generator
        self.total = videos
        self.images = slice(0, videos)
        """The rows of the batch this rank steps; the adapter's `predict` sets them."""
        self.dpm = "old_pred_original_sample" in inspect.signature(scheduler.step).parameters
        self.old_pred: torch.Tensor | None = None
        self.prev_t: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)

    def step(self, model_output, timestep, sample, return_dict: bool = False):
        # The pipeline casts the latents back to the model's dtype after every step.
        dtype = sample.dtype
        if not self.dpm:
            prev = self.scheduler.step(model_output, timestep, sample, return_dict=False)[0]
            return (prev.to(dtype),)
        part = model_output.shape[0] != self.total
        if part:
            whole = (self.total, *model_output.shape[1:])
            out, x = model_output.new_zeros(whole), sample.new_zeros(whole)
            out[self.images], x[self.images] = model_output, sample
            model_output, sample = out, x
        prev, self.old_pred = self.scheduler.step(
            model_output,
            self.old_pred,
            timestep,
            self.prev_t,
            sample,
            generator=self.generator,
            return_dict=False,
        )
        self.prev_t = timestep
        return ((prev[self.images] if part else prev).to(dtype),)


class CogVideoXAdapter(TransformerAdapterBase):
    plan = COGVIDEOX_PLAN

    def __init__(
        self, model: ModelRef, device: torch.device, dtype: torch.dtype, on_host: bool = False
    ) -> None:
        from diffusers import CogVideoXTransformer3DModel

        super().__init__(model, device, dtype, CogVideoXTransformer3DModel, on_host)
        cfg = self.transformer.config
        if cfg.patch_size_t is not None or cfg.ofs_embed_dim is not None:
            raise ValueError(
                f"model {model.name!r} is CogVideoX 1.5 or image-to-video (temporal patches or "
                "an ofs embedding); only CogVideoX 1.0 text-to-video (2B, 5B) is supported"
            )
        self.schedulers = SchedulerFactory(model.source)
        self.transformer.transformer_blocks[0].register_forward_pre_hook(
            _split_video, with_kwargs=True
        )

    def warmup_cond(self) -> dict[str, torch.Tensor]:
        """Conditioning of the shape the encoder sends (T5 padded to its max length)."""
        n, width = self.model.max_prompt_tokens, self.transformer.config.text_embed_dim
        return {"prompt_embeds": torch.zeros(1, n, width)}

    def latent_frames(self, num_frames: int) -> int:
        if num_frames < 1:
            raise InvalidArgument(f"model {self.model.name!r} makes videos: num_frames must be set")
        return (num_frames - 1) // self.model.frame_multiple + 1

    def rotary(self, height: int, width: int, frames: int):
        """The 5B's 3D rotary table (cos, sin) by the pipeline's own method; None for 2B."""
        from diffusers import CogVideoXPipeline

        if not self.transformer.config.use_rotary_positional_embeddings:
            return None
        holder = SimpleNamespace(
            vae_scale_factor_spatial=self.model.vae_scale_factor, transformer=self.transformer
        )
        return CogVideoXPipeline._prepare_rotary_positional_embeddings(
            holder, height, width, frames, self.device
        )

    def prepare(self, job: DenoiseJob) -> Prepared:
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import retrieve_timesteps
        from diffusers.utils.torch_utils import randn_tensor

        dev, dt, n = self.device, self.dtype, job.num_images
        vsf = self.model.vae_scale_factor
        frames = self.latent_frames(job.num_frames)

        def branch(prefix: str) -> dict[str, torch.Tensor]:
            embeds = cond_tensor(job, prefix + "prompt_embeds", dev, dt)
            return {"encoder_hidden_states": embeds.repeat_interleave(n, dim=0)}

        cfg_on = do_cfg(self.model, job)
        branches = {"cond": branch("")}
        if cfg_on:
            branches["uncond"] = branch("negative_")
        scheduler = self.schedulers()
        timesteps, _ = retrieve_timesteps(scheduler, job.steps, dev)
        channels = self.transformer.config.in_channels
        shape = (n, frames, channels, job.height // vsf, job.width // vsf)
        # One generator on the CPU: the initial noise, then the DPM scheduler's per step.
        generator = torch.Generator("cpu").manual_seed(job.seed)
        noise = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dt)
        return Prepared(
            latents=noise.to(dev) * scheduler.init_noise_sigma,
            timesteps=timesteps,
            scheduler=CogVideoXSteps(scheduler, generator, n),
            do_cfg=cfg_on,
            branches=branches,
            extra={"rotary": self.rotary(job.height, job.width, frames)},
        )

    def predict(
        self, prep: Prepared, latents, t, branches: list[str], images: slice
    ) -> list[torch.Tensor]:
        prep.scheduler.images = images
        order, inputs = stack_branches(prep, branches, images)
        x = torch.cat([latents] * len(order)) if len(order) > 1 else latents
        x = prep.scheduler.scale_model_input(x, t)
        out = self.forward(
            hidden_states=x,
            encoder_hidden_states=inputs["encoder_hidden_states"],
            timestep=t.expand(x.shape[0]),
            image_rotary_emb=prep.extra["rotary"],
            return_dict=False,
        )[0]
        return unstack_branches(out.float(), order, branches)

    def combine(self, cond, uncond, prep: Prepared, job: DenoiseJob) -> torch.Tensor:
        return guide(cond, uncond, job.guidance)

    def finish(self, prep: Prepared, latents: torch.Tensor, job: DenoiseJob) -> torch.Tensor:
        # [N, latent frames, C, h, w], scaling not undone: the VAE stage's decoder does it.
        return latents.to(self.dtype)
