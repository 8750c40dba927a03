"""Latte model adapter: video noise, the saved scheduler (DDIM for Latte-1) stepped with
the request's generator, the text embeddings masked as the pipeline masks them, CFG and
the learned-sigma split.

Follows diffusers' LattePipeline step for step: noise [N, C, F, H/8, W/8] from the seed
scaled by the scheduler's init sigma, the scheduler's own timesteps, every step given the
request's generator (DDIM at eta 0 draws nothing; a stochastic scheduler draws as in the
pipeline, see hunyuan.SeededSteps), CFG on [uncond, cond] whenever guidance > 1, the
variance half dropped after guidance unless the scheduler config learns the variance.
`mask_feature` (the pipeline's default) is applied here, since it needs both prompts: for
one video the prompt's embeddings are cut at its length and the negative prompt's at the
same length; for several, the prompt's padding is zeroed and the negative kept whole.
The encoder sends both padded to 120 tokens with their masks (encoder/latte.py).

The transformer alternates spatial blocks (self-attention among the tokens of one frame,
cross-attention to the text) and temporal blocks (attention among the frames of one token
position). Sequence parallelism splits each frame's tokens: the spatial self-attention
is the gang's, the cross-attention is local to each shard's queries, and the temporal
attention is local too, since every rank holds all frames of its token positions.

Frames: a video has exactly the transformer's `video_length` frames (its temporal
position table is that long), or 1 (a still image, no temporal positions).
"""

from __future__ import annotations

import torch

from ditmesh.common.errors import InvalidArgument
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
from ditmesh.denoiser.hunyuan import SeededSteps
from ditmesh.denoiser.job import DenoiseJob
from ditmesh.denoiser.parallel.processors import SelfParallelProcessor
from ditmesh.denoiser.parallel.sequence import SequencePlan

# Each frame's tokens are born in `pos_embed` ([batch * frames, tokens, dim]) and leave
# through `proj_out`. Only the spatial self-attention mixes a frame's tokens; the
# temporal blocks' attention (also named attn1) is per token position, so it keeps
# diffusers' processor (the pattern does not match `temporal_transformer_blocks`).
LATTE_PLAN = SequencePlan(
    split_outputs={"pos_embed": 1},
    gather_output=("proj_out", 1),
    processors={"transformer_blocks.*.attn1": SelfParallelProcessor},
)


class LatteAdapter(TransformerAdapterBase):
    plan = LATTE_PLAN

    def __init__(
        self, model: ModelRef, device: torch.device, dtype: torch.dtype, on_host: bool = False
    ) -> None:
        from diffusers import LatteTransformer3DModel

        super().__init__(model, device, dtype, LatteTransformer3DModel, on_host)
        self.schedulers = SchedulerFactory(model.source)
        self.video_length = int(self.transformer.config.video_length)
        # LattePipeline keeps the variance half only for schedulers that learn it.
        learned = self.schedulers.config.get("variance_type") in ("learned", "learned_range")
        self.drop_variance = not learned
        self.videos = 0
        """Videos in the current transformer call (what the temporal blocks' hook needs)."""
        self.transformer.register_forward_pre_hook(self._count_videos, with_kwargs=True)
        for block in self.transformer.temporal_transformer_blocks:
            block.register_forward_pre_hook(self._temporal_timestep)

    def _count_videos(self, module, args, kwargs) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.videos = hidden.shape[0]

    def _temporal_timestep(self, module, args):
        """The temporal blocks' timestep, cut to the token positions this rank holds.

        The model repeats each video's timestep embedding once per token position of a
        whole frame; a rank holding a shard of the positions has fewer rows. The rows of
        one video are all equal, so its first ones serve. Without sequence parallelism the
        counts match and nothing changes. The blocks are called positionally:
        (hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
        timestep, ...).
        """
        hidden, timestep = args[0], args[4]
        if timestep is None or timestep.shape[0] == hidden.shape[0]:
            return None
        videos = self.videos
        held = hidden.shape[0] // videos
        cut = timestep.view(videos, -1, timestep.shape[-1])[:, :held].reshape(
            -1, timestep.shape[-1]
        )
        return (*args[:4], cut, *args[5:])

    def frames(self, job: DenoiseJob) -> int:
        """The job's frame count, checked against what the model takes."""
        frames = job.num_frames
        if frames not in (1, self.video_length):
            raise InvalidArgument(
                f"model {self.model.name!r} makes videos of exactly {self.video_length} "
                f"frames (or 1); {frames} were asked for"
            )
        return frames

    def warmup_cond(self) -> dict[str, torch.Tensor]:
        """Conditioning of the shapes the encoder sends (T5 padded to 120 tokens)."""
        from ditmesh.encoder.latte import LATTE_TOKENS

        return {
            "prompt_embeds": torch.zeros(1, LATTE_TOKENS, self.transformer.config.caption_channels),
            "prompt_attention_mask": torch.ones(1, LATTE_TOKENS, dtype=torch.int64),
        }

    def text(self, job: DenoiseJob, cfg_on: bool) -> dict[str, torch.Tensor]:
        """The text embeddings of each branch as LattePipeline's `mask_feature` leaves them."""
        dev, dt, n = self.device, self.dtype, job.num_images
        embeds = cond_tensor(job, "prompt_embeds", dev, dt).repeat_interleave(n, dim=0)
        mask = cond_tensor(job, "prompt_attention_mask", dev, None).repeat_interleave(n, dim=0)
        negative = None
        if cfg_on:
            negative = cond_tensor(job, "negative_prompt_embeds", dev, dt)
            negative = negative.repeat_interleave(n, dim=0)
        if n == 1:
            keep = int(mask.sum())
            out = {"cond": embeds[:, :keep]}
            if negative is not None:
                out["uncond"] = negative[:, :keep]
            return out
        out = {"cond": embeds * mask[:, :, None]}
        if negative is not None:
            out["uncond"] = negative
        return out

    def prepare(self, job: DenoiseJob) -> Prepared:
        from diffusers.pipelines.latte.pipeline_latte import retrieve_timesteps
        from diffusers.utils.torch_utils import randn_tensor

        dev, dt, n = self.device, self.dtype, job.num_images
        frames = self.frames(job)
        cfg_on = do_cfg(self.model, job)
        branches = {
            name: {"encoder_hidden_states": embeds}
            for name, embeds in self.text(job, cfg_on).items()
        }
        # The pipeline sets the timesteps before drawing the noise: some schedulers'
        # init_noise_sigma depends on them.
        scheduler = self.schedulers()
        timesteps, _ = retrieve_timesteps(scheduler, job.steps, dev)
        fix_first_step(scheduler, timesteps)
        vsf = self.model.vae_scale_factor
        shape = (
            n,
            self.transformer.config.in_channels,
            frames,
            job.height // vsf,
            job.width // vsf,
        )
        # One generator for the request, on the CPU (the same video on any device and
        # rank): the initial noise first, then every scheduler step's.
        generator = torch.Generator("cpu").manual_seed(job.seed)
        noise = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dt)
        return Prepared(
            latents=noise.to(dev) * scheduler.init_noise_sigma,
            timesteps=timesteps,
            scheduler=SeededSteps(scheduler, generator, n),
            do_cfg=cfg_on,
            branches=branches,
        )

    def predict(
        self, prep: Prepared, latents, t, branches: list[str], images: slice
    ) -> list[torch.Tensor]:
        prep.scheduler.images = images  # the rows this rank steps next
        order, inputs = stack_branches(prep, branches, images)
        x = torch.cat([latents] * len(order)) if len(order) > 1 else latents
        x = prep.scheduler.scale_model_input(x, t)
        timestep = t[None].to(x.device) if t.dim() == 0 else t
        out = self.forward(
            hidden_states=x,
            encoder_hidden_states=inputs["encoder_hidden_states"],
            timestep=timestep.expand(x.shape[0]),
            enable_temporal_attentions=True,
            return_dict=False,
        )[0]
        return unstack_branches(out, order, branches)

    def combine(self, cond, uncond, prep: Prepared, job: DenoiseJob) -> torch.Tensor:
        noise = guide(cond, uncond, job.guidance)
        if self.drop_variance:
            noise = noise.chunk(2, dim=1)[0]  # after guidance, as the pipeline does
        return noise

    def finish(self, prep: Prepared, latents: torch.Tensor, job: DenoiseJob) -> torch.Tensor:
        # [N, 4, F, H/8, W/8], still scaled: the VAE stage unscales and decodes each frame.
        return latents
