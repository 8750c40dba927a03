"""PixArt (alpha and Sigma) model adapter: noise, DPM-Solver schedule, cross-attention
transformer with a text mask, CFG and the learned-sigma split.

Follows diffusers' PixArtSigmaPipeline / PixArtAlphaPipeline step for step (same
noise from the same seed scaled by the scheduler's init sigma, the saved
scheduler's own timesteps, CFG on [uncond, cond] whenever guidance > 1, the
variance half of the output dropped after guidance), so a request gives the image
plain diffusers gives with `use_resolution_binning=False` (the mesh serves the
size asked for) and `clean_caption=False` (see the encoder).

PipeFusion (`PIXART_PIPEFUSION`): a patch is a band of token rows, as for SD3, since the
model patchifies inside; only the self-attention keeps stale keys and values. The
cross-attention reads the text afresh in every patch, so the text is an input of each
patch and stage, not an activation that travels between stages. The DPM-Solver's history
is stepped a patch at a time (parallel/pipefusion_schedule.py).
"""

from __future__ import annotations

import torch

from ditmesh.common.models import PIXART_ALPHA, ModelRef
from ditmesh.denoiser.adapter import (
    Prepared,
    SchedulerFactory,
    TransformerAdapterBase,
    cond_tensor,
    do_cfg,
    fix_first_step,
    guide,
    initial_noise,
    stack_branches,
    unstack_branches,
)
from ditmesh.denoiser.job import DenoiseJob
from ditmesh.denoiser.parallel.pipefusion_attention import StaleSelfProcessor
from ditmesh.denoiser.parallel.pipefusion_patches import RowBandPatches
from ditmesh.denoiser.parallel.pipefusion_stage import PipeFusionPlan
from ditmesh.denoiser.parallel.processors import SelfParallelProcessor
from ditmesh.denoiser.parallel.sequence import SequencePlan

# Image tokens are born in `pos_embed` and leave through `proj_out`. Only the
# self-attention (attn1) mixes image tokens; the cross-attention to the text
# (attn2) is local to each shard's queries, so it keeps its own processor.
PIXART_PLAN = SequencePlan(
    split_outputs={"pos_embed": 1},
    gather_output=("proj_out", 1),
    processors={"transformer_blocks.*.attn1": SelfParallelProcessor},
)

# One block list; attn1 (image self-attention) over kept keys and values, attn2 (to the
# text) as it is. Bands of token rows are cut after pos_embed and put back before
# proj_out (the unpatchify needs the whole image). Blocks return the image tokens alone.
PIXART_PIPEFUSION = PipeFusionPlan(
    block_lists=("transformer_blocks",),
    processors={"attn1": StaleSelfProcessor},
    patches=RowBandPatches,
    cut_at=("pos_embed", "proj_out"),
    carried=("hidden_states",),
)


class PixArtAdapter(TransformerAdapterBase):
    plan = PIXART_PLAN
    pipefusion_plan = PIXART_PIPEFUSION

    def __init__(
        self, model: ModelRef, device: torch.device, dtype: torch.dtype, on_host: bool = False
    ) -> None:
        from diffusers import PixArtTransformer2DModel

        super().__init__(model, device, dtype, PixArtTransformer2DModel, on_host)
        self.schedulers = SchedulerFactory(model.source)
        if "sde" in str(self.schedulers.config.get("algorithm_type", "")):
            # The pipeline feeds its seeded generator to stochastic solvers step by
            # step; split across data-parallel ranks that noise cannot be reproduced.
            raise ValueError(
                f"model {model.name!r} uses a stochastic scheduler "
                f"({self.schedulers.config['algorithm_type']}); only deterministic ones are supported"
            )

    def warmup_cond(self) -> dict[str, torch.Tensor]:
        """Conditioning of the shapes the encoder sends (T5 padded to its max length)."""
        n = self.model.max_prompt_tokens
        return {
            "prompt_embeds": torch.zeros(1, n, self.transformer.config.caption_channels),
            "prompt_attention_mask": torch.ones(1, n, dtype=torch.int64),
        }

    def prepare(self, job: DenoiseJob) -> Prepared:
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import retrieve_timesteps

        dev, dt, n = self.device, self.dtype, job.num_images
        vsf = self.model.vae_scale_factor
        micro = None
        if self.transformer.use_additional_conditions:
            # Alpha 1024-px checkpoints embed the size and aspect ratio (micro-conditions).
            micro = {
                "resolution": torch.tensor([job.height, job.width]).repeat(n, 1).to(dev, dt),
                "aspect_ratio": torch.tensor([float(job.height / job.width)])
                .repeat(n, 1)
                .to(dev, dt),
            }

        def branch(prefix: str) -> dict[str, torch.Tensor]:
            embeds = cond_tensor(job, prefix + "prompt_embeds", dev, dt)
            mask = cond_tensor(job, prefix + "prompt_attention_mask", dev, None)
            b = {
                "encoder_hidden_states": embeds.repeat_interleave(n, dim=0),
                "encoder_attention_mask": mask.repeat_interleave(n, dim=0),
            }
            return b if micro is None else {**b, **micro}

        cfg_on = do_cfg(self.model, job)
        branches = {"cond": branch("")}
        if cfg_on:
            branches["uncond"] = branch("negative_")

        # The pipelines set the timesteps before drawing the noise: some schedulers'
        # init_noise_sigma depends on them.
        scheduler = self.schedulers()
        timesteps, _ = retrieve_timesteps(scheduler, job.steps, dev)
        channels = self.transformer.config.in_channels
        shape = (n, channels, job.height // vsf, job.width // vsf)
        latents = initial_noise(job, shape, dt, dev) * scheduler.init_noise_sigma
        if self.model.family is PIXART_ALPHA and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # as PixArtAlphaPipeline does
        fix_first_step(scheduler, timesteps)  # Sigma's pipeline leaves it to the first step
        return Prepared(
            latents=latents,
            timesteps=timesteps,
            scheduler=scheduler,
            do_cfg=cfg_on,
            branches=branches,
        )

    def predict(
        self, prep: Prepared, latents, t, branches: list[str], images: slice, *, text: bool = True
    ) -> list[torch.Tensor]:
        """`text` is PipeFusion's (False: a patch after the first); PixArt's text goes to a
        cross-attention, which every patch needs whole, so every call takes it."""
        order, inputs = stack_branches(prep, branches, images)
        x = torch.cat([latents] * len(order)) if len(order) > 1 else latents
        x = prep.scheduler.scale_model_input(x, t)
        timestep = t[None].to(x.device) if t.dim() == 0 else t
        kwargs = dict(
            hidden_states=x,
            encoder_hidden_states=inputs["encoder_hidden_states"],
            encoder_attention_mask=inputs["encoder_attention_mask"],
            timestep=timestep.expand(x.shape[0]),
            return_dict=False,
        )
        if "resolution" in inputs:
            micro = {"resolution": inputs["resolution"], "aspect_ratio": inputs["aspect_ratio"]}
        else:
            micro = {"resolution": None, "aspect_ratio": None}
        out = self.forward(**kwargs, added_cond_kwargs=micro)[0]
        return unstack_branches(out, order, branches)

    def combine(self, cond, uncond, prep: Prepared, job: DenoiseJob) -> torch.Tensor:
        noise = guide(cond, uncond, job.guidance)
        # Learned sigma: the transformer also predicts the variance; the solver uses
        # only the noise half (split after guidance, as the pipelines do).
        if self.transformer.config.out_channels // 2 == self.transformer.config.in_channels:
            noise = noise.chunk(2, dim=1)[0]
        return noise

    def finish(self, prep: Prepared, latents: torch.Tensor, job: DenoiseJob) -> torch.Tensor:
        # Already [N, 4, H/8, W/8] in VAE latent space; the VAE stage unscales.
        return latents
