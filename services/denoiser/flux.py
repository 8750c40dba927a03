"""Flux model adapter: latent packing, positional ids, transformer call, true CFG, scheduler.

Follows diffusers' FluxPipeline step for step (same noise from the same seed,
same sigmas and shift, same guidance handling), using the pipeline's own static
helpers, so a request gives the image plain diffusers gives.
"""

from __future__ import annotations

import numpy as np
import torch

from ditmesh.common.models import ModelRef
from ditmesh.denoiser.adapter import (
    Prepared,
    TransformerAdapterBase,
    cond_tensor,
    do_cfg,
    initial_noise,
)
from ditmesh.denoiser.job import DenoiseJob
from ditmesh.denoiser.parallel.pipefusion_attention import StaleKVProcessor
from ditmesh.denoiser.parallel.pipefusion_patches import TokenPatches
from ditmesh.denoiser.parallel.pipefusion_stage import PipeFusionPlan
from ditmesh.denoiser.parallel.processors import FluxParallelProcessor
from ditmesh.denoiser.parallel.sequence import SequencePlan

# Image tokens enter as `hidden_states` with their positions `img_ids`; splitting
# both splits the rotary embedding with them. Text tokens (`encoder_hidden_states`,
# `txt_ids`) are split too under Ulysses alone, else stay whole on every rank.
FLUX_PLAN = SequencePlan(
    split_inputs={"hidden_states": 1, "img_ids": 0},
    gather_output=("proj_out", 1),
    text_len_input=("encoder_hidden_states", 1),
    split_text_inputs={"encoder_hidden_states": 1, "txt_ids": 0},
    processors={
        "transformer_blocks.*.attn": FluxParallelProcessor,
        "single_transformer_blocks.*.attn": FluxParallelProcessor,
    },
)

# Double-stream blocks, then single-stream ones; the latents are packed tokens already,
# so a patch is a run of them (with its positions, img_ids).
FLUX_PIPEFUSION = PipeFusionPlan(
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    processors={"attn": StaleKVProcessor},
    patches=TokenPatches,
)


class FluxAdapter(TransformerAdapterBase):
    plan = FLUX_PLAN
    pipefusion_plan = FLUX_PIPEFUSION

    def __init__(
        self, model: ModelRef, device: torch.device, dtype: torch.dtype, on_host: bool = False
    ) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        super().__init__(model, device, dtype, FluxTransformer2DModel, on_host)
        self.scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(
            model.source, subfolder="scheduler"
        )
        self._scheduler_cls = FlowMatchEulerDiscreteScheduler

    def warmup_cond(self) -> dict[str, torch.Tensor]:
        """Conditioning of the shapes the encoder sends (T5 padded to its max length)."""
        c = self.transformer.config
        return {
            "prompt_embeds": torch.zeros(1, self.model.max_prompt_tokens, c.joint_attention_dim),
            "pooled_prompt_embeds": torch.zeros(1, c.pooled_projection_dim),
        }

    def prepare(self, job: DenoiseJob) -> Prepared:
        from diffusers.pipelines.flux.pipeline_flux import (
            FluxPipeline,
            calculate_shift,
            retrieve_timesteps,
        )

        dev, dt, n = self.device, self.dtype, job.num_images
        vsf = self.model.vae_scale_factor

        def branch(prefix: str) -> dict:
            embeds = cond_tensor(job, prefix + "prompt_embeds", dev, dt).repeat_interleave(n, dim=0)
            pooled = cond_tensor(job, prefix + "pooled_prompt_embeds", dev, dt).repeat_interleave(
                n, dim=0
            )
            return {
                "encoder_hidden_states": embeds,
                "pooled_projections": pooled,
                "txt_ids": torch.zeros(embeds.shape[1], 3, device=dev, dtype=dt),
            }

        cfg_on = do_cfg(self.model, job)
        branches = {"cond": branch("")}
        if cfg_on:
            branches["uncond"] = branch("negative_")
        channels = self.transformer.config.in_channels // 4
        h = 2 * (job.height // (vsf * 2))
        w = 2 * (job.width // (vsf * 2))
        latents = initial_noise(job, (n, channels, h, w), dt, dev)
        latents = FluxPipeline._pack_latents(latents, n, channels, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, dev, dt)

        # Schedulers hold per-run state (step index, sigmas): one per request.
        scheduler = self._scheduler_cls.from_config(self.scheduler_config)
        sigmas = np.linspace(1.0, 1 / job.steps, job.steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        c = scheduler.config
        mu = calculate_shift(
            latents.shape[1],
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, job.steps, dev, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([n], job.guidance, device=dev, dtype=torch.float32)
        return Prepared(
            latents=latents,
            timesteps=timesteps,
            scheduler=scheduler,
            do_cfg=cfg_on,
            branches=branches,
            extra={"img_ids": img_ids, "guidance": guidance},
        )

    def predict(
        self,
        prep: Prepared,
        latents,
        t,
        branches: list[str],
        images: slice,
        *,
        tokens: tuple[int, int] | None = None,
        text: bool = True,
    ) -> list[torch.Tensor]:
        """`tokens`: only these image tokens (a PipeFusion patch); `text` False: without the
        text tokens (PipeFusion's later patches reuse the text's kept keys and values)."""
        # FluxPipeline runs the two branches as two calls; so do we.
        n = latents.shape[0]
        timestep = t.expand(n).to(latents.dtype) / 1000
        guidance = prep.extra["guidance"]
        rows = slice(None) if tokens is None else slice(*tokens)
        words = slice(None) if text else slice(0, 0)
        out = []
        for name in branches:
            b = prep.branches[name]
            out.append(
                self.forward(
                    hidden_states=latents[:, rows],
                    timestep=timestep,
                    guidance=None if guidance is None else guidance[images],
                    pooled_projections=b["pooled_projections"][images],
                    encoder_hidden_states=b["encoder_hidden_states"][images][:, words],
                    txt_ids=b["txt_ids"][words],
                    img_ids=prep.extra["img_ids"][rows],
                    return_dict=False,
                )[0]
            )
        return out

    def combine(self, cond, uncond, prep: Prepared, job: DenoiseJob) -> torch.Tensor:
        if uncond is None:
            return cond
        return uncond + job.true_cfg_scale * (cond - uncond)

    def finish(self, prep: Prepared, latents: torch.Tensor, job: DenoiseJob) -> torch.Tensor:
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

        return FluxPipeline._unpack_latents(
            latents, job.height, job.width, self.model.vae_scale_factor
        )
