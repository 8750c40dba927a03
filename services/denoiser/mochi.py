"""Mochi-1 model adapter: video noise, flow matching on Mochi's linear-quadratic sigmas,
the transformer with the T5 mask, CFG, all of it in float32 around the transformer.

Follows diffusers' MochiPipeline step for step: noise [N, 12, (F-1)/6+1, H/8, W/8]
drawn in float32 from the seed, the sigmas of `linear_quadratic_schedule` (threshold
0.025) on the saved scheduler, the begin index set to 0, CFG on [uncond, cond] whenever
guidance > 1, the prediction, guidance and step in float32 and the latents kept in the
model's dtype. The encoder sends each prompt padded to 256 tokens with its mask.

Sequence parallelism: the video tokens of all frames form one sequence ([frames x rows x
columns], frame first), split across the gang where it enters the blocks; the text tokens
are whole on every rank and attended exactly once (`MochiParallelProcessor`). Two
permanent, value-preserving hooks give the plan the seams it needs: the patch embedding's
output is laid out [batch, frames x tokens, dim] (the model's next reshape then leaves it
as it is), and the rotary tables come as one tensor [2, tokens, heads, dim/2] (cos, sin;
diffusers' processor unpacks it as it does the tuple). Both are then split on dim 1.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

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
from ditmesh.denoiser.parallel.processors import attend
from ditmesh.denoiser.parallel.sequence import SequencePlan
from ditmesh.denoiser.parallel.usp import SequenceParallel

# MochiPipeline's constants: the VAE's temporal compression and the schedule's threshold.
TEMPORAL_COMPRESSION = 6
THRESHOLD_NOISE = 0.025


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Mochi's rotary embedding: interleaved (even, odd) channel pairs turned by the
    position's angles, in float32, back in x's dtype. x: [B, L, H, D]; cos, sin: [L, H, D/2]."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    turned = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return turned.flatten(-2).to(x.dtype)


class MochiParallelProcessor:
    """For MochiAttention: diffusers' projections, q/k norms and rotary positions, joint
    attention over this rank's video tokens and each video's real text tokens, the
    attention itself the gang's.

    As diffusers' processor does, each video of the batch attends to its own real text
    tokens (the mask's), and the text output holds them first, zeros after.
    """

    def __init__(self, sp: SequenceParallel, attn: torch.nn.Module) -> None:
        self.sp = sp

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states,
        attention_mask,
        image_rotary_emb=None,
        **kwargs,
    ):
        extra = [k for k, v in kwargs.items() if v is not None]
        if extra:
            raise ValueError(
                f"attention inputs {extra} are not supported under sequence parallelism"
            )
        heads = attn.heads
        video = ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k), (attn.to_v, None))
        text = (
            (attn.add_q_proj, attn.norm_added_q),
            (attn.add_k_proj, attn.norm_added_k),
            (attn.add_v_proj, None),
        )

        def projection(x, layer, norm):
            y = layer(x).unflatten(2, (heads, -1))  # [B, S, H, D]: the norms act on D
            return y if norm is None else norm(y)

        b, seq = hidden_states.shape[:2]
        text_out = encoder_hidden_states.new_zeros(
            (*encoder_hidden_states.shape[:2], attn.to_q.out_features)
        )
        video_out = []
        for i in range(b):
            x = hidden_states[i : i + 1]
            real = torch.nonzero(attention_mask[i].flatten(), as_tuple=False).flatten()
            c = encoder_hidden_states[i : i + 1, real]
            t_len = c.shape[1]

            def project(j: int, x=x, c=c, t_len=t_len):
                v = projection(x, *video[j])
                if j < 2 and image_rotary_emb is not None:
                    v = _rotate(v, image_rotary_emb[0], image_rotary_emb[1])
                return v, (projection(c, *text[j]) if t_len else None)

            shape = (1, seq, heads, attn.to_q.out_features // heads)
            out = attend(self.sp, shape, t_len, x, project).flatten(2, 3)
            video_out.append(out[:, t_len:])
            text_out[i : i + 1, :t_len] = out[:, :t_len].to(text_out.dtype)
        out = torch.cat(video_out).to(hidden_states.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if hasattr(attn, "to_add_out"):
            text_out = attn.to_add_out(text_out)
        return out, text_out


MOCHI_PLAN = SequencePlan(
    split_outputs={"patch_embed": 1, "rope": 1},
    gather_output=("proj_out", 1),
    processors={"transformer_blocks.*.attn1": MochiParallelProcessor},
)


class MochiAdapter(TransformerAdapterBase):
    plan = MOCHI_PLAN

    def __init__(
        self, model: ModelRef, device: torch.device, dtype: torch.dtype, on_host: bool = False
    ) -> None:
        from diffusers import MochiTransformer3DModel
        from diffusers.models.attention_processor import MochiAttention

        super().__init__(model, device, dtype, MochiTransformer3DModel, on_host)
        self.schedulers = SchedulerFactory(model.source)
        self.videos = 0
        """Videos in the current transformer call (what the patch embedding's hook needs)."""
        tr = self.transformer
        tr.register_forward_pre_hook(self._count_videos, with_kwargs=True)
        tr.patch_embed.register_forward_hook(self._one_sequence)
        tr.rope.register_forward_hook(lambda module, args, out: torch.stack(out))
        for module in tr.modules():
            # MochiAttention keeps its processor in a plain attribute; the plan's attach
            # swaps processors through `set_processor`, as on diffusers' other attentions.
            if isinstance(module, MochiAttention) and not hasattr(module, "set_processor"):
                module.set_processor = functools.partial(setattr, module, "processor")

    def _count_videos(self, module, args, kwargs) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.videos = hidden.shape[0]

    def _one_sequence(self, module, args, out: torch.Tensor) -> torch.Tensor:
        # [videos * frames, tokens, dim] -> [videos, frames * tokens, dim], frame first, as
        # the model lays it out next (its unflatten(0, (videos, -1)).flatten(1, 2) then
        # keeps it as it is).
        return out.unflatten(0, (self.videos, -1)).flatten(1, 2)

    def latent_frames(self, job: DenoiseJob) -> int:
        if job.num_frames < 1:
            raise InvalidArgument(f"model {self.model.name!r} makes videos: num_frames must be set")
        return (job.num_frames - 1) // TEMPORAL_COMPRESSION + 1

    def warmup_cond(self) -> dict[str, torch.Tensor]:
        """Conditioning of the shapes the encoder sends (T5 padded to its max length)."""
        n = self.model.max_prompt_tokens
        return {
            "prompt_embeds": torch.zeros(1, n, self.transformer.config.text_embed_dim),
            "prompt_attention_mask": torch.ones(1, n, dtype=torch.int64),
        }

    def prepare(self, job: DenoiseJob) -> Prepared:
        from diffusers.pipelines.mochi.pipeline_mochi import (
            linear_quadratic_schedule,
            retrieve_timesteps,
        )
        from diffusers.utils.torch_utils import randn_tensor

        dev, dt, n = self.device, self.dtype, job.num_images

        def branch(prefix: str) -> dict[str, torch.Tensor]:
            embeds = cond_tensor(job, prefix + "prompt_embeds", dev, dt)
            mask = cond_tensor(job, prefix + "prompt_attention_mask", dev, torch.bool)
            return {
                "encoder_hidden_states": embeds.repeat_interleave(n, dim=0),
                "encoder_attention_mask": mask.repeat_interleave(n, dim=0),
            }

        cfg_on = do_cfg(self.model, job)
        branches = {"cond": branch("")}
        if cfg_on:
            branches["uncond"] = branch("negative_")

        vsf = self.model.vae_scale_factor
        shape = (
            n,
            self.transformer.config.in_channels,
            self.latent_frames(job),
            job.height // vsf,
            job.width // vsf,
        )
        generator = torch.Generator("cpu").manual_seed(job.seed)
        noise = randn_tensor(shape, generator=generator, device=torch.device("cpu"))
        scheduler = self.schedulers()
        if job.steps < self.model.family.min_steps:  # the gateway refuses it first
            raise InvalidArgument(
                f"model {self.model.name!r} needs at least {self.model.family.min_steps} "
                f"steps; got {job.steps}"
            )
        sigmas = np.array(linear_quadratic_schedule(job.steps, THRESHOLD_NOISE))
        timesteps, _ = retrieve_timesteps(scheduler, job.steps, dev, None, sigmas)
        scheduler.set_begin_index(0)  # as the pipeline does
        return Prepared(
            latents=noise.to(dev, dt),
            timesteps=timesteps,
            scheduler=Float32Steps(scheduler),
            do_cfg=cfg_on,
            branches=branches,
        )

    def predict(
        self, prep: Prepared, latents, t, branches: list[str], images: slice
    ) -> list[torch.Tensor]:
        order, inputs = stack_branches(prep, branches, images)
        x = torch.cat([latents] * len(order)) if len(order) > 1 else latents
        out = self.forward(
            hidden_states=x,
            timestep=t.expand(x.shape[0]).to(latents.dtype),
            return_dict=False,
            **inputs,
        )[0]
        return unstack_branches(out.float(), order, branches)

    def combine(self, cond, uncond, prep: Prepared, job: DenoiseJob) -> torch.Tensor:
        return guide(cond, uncond, job.guidance)

    def finish(self, prep: Prepared, latents: torch.Tensor, job: DenoiseJob) -> torch.Tensor:
        # [N, 12, frames, H/8, W/8], still normalized: the VAE stage applies the latents'
        # mean and std before decoding.
        return latents


class Float32Steps:
    """The request's scheduler stepped as MochiPipeline steps it: prediction and latents
    in float32, the new latents back in the latents' dtype."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def __getattr__(self, name: str):
        return getattr(self.scheduler, name)

    def step(self, model_output, timestep, sample, return_dict: bool = False):
        prev = self.scheduler.step(
            model_output.float(), timestep, sample.float(), return_dict=False
        )[0]
        return (prev.to(sample.dtype),)
