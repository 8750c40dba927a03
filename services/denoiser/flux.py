"""Flux model adapter: latent packing, positional ids, transformer call, true CFG, scheduler.

The loop follows diffusers' FluxPipeline step for step (same noise from the same
seed, same sigmas and shift, same guidance handling), using the pipeline's own
static helpers, so a request gives the image plain diffusers gives.
"""

from __future__ import annotations

import numpy as np
import torch
from ditmesh.common.errors import InvalidArgument
from ditmesh.common.models import ModelRef
from ditmesh.denoiser.job import DenoiseJob, StepCallback


class FluxAdapter:
    def __init__(self, model: ModelRef, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        self.model = model
        self.device = device
        self.dtype = dtype
        self.transformer = FluxTransformer2DModel.from_pretrained(
            model.source, subfolder="transformer", dtype=dtype
        ).to(device)
        self.transformer.eval()
        self.scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(
            model.source, subfolder="scheduler"
        )
        self._scheduler_cls = FlowMatchEulerDiscreteScheduler

    def new_scheduler(self):
        # Schedulers hold per-run state (step index, sigmas): one per request.
        return self._scheduler_cls.from_config(self.scheduler_config)

    def _cond(self, job: DenoiseJob, name: str) -> torch.Tensor:
        try:
            t = job.cond[name]
        except KeyError:
            raise InvalidArgument(f"conditioning tensor {name!r} is missing") from None
        return t.to(self.device, self.dtype)

    @torch.inference_mode()
    def run(self, job: DenoiseJob, on_step: StepCallback | None = None) -> torch.Tensor:
        """Returns the final latents, unpacked: [num_images, C, H/8, W/8] in VAE latent space."""
        from diffusers.pipelines.flux.pipeline_flux import (
            FluxPipeline,
            calculate_shift,
            retrieve_timesteps,
        )
        from diffusers.utils.torch_utils import randn_tensor

        n = job.num_images
        vsf = self.model.vae_scale_factor
        prompt_embeds = self._cond(job, "prompt_embeds").repeat_interleave(n, dim=0)
        pooled = self._cond(job, "pooled_prompt_embeds").repeat_interleave(n, dim=0)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        do_true_cfg = job.true_cfg_scale > 1 and "negative_prompt_embeds" in job.cond
        if do_true_cfg:
            neg_embeds = self._cond(job, "negative_prompt_embeds").repeat_interleave(n, dim=0)
            neg_pooled = self._cond(job, "negative_pooled_prompt_embeds").repeat_interleave(
                n, dim=0
            )
            neg_text_ids = torch.zeros(neg_embeds.shape[1], 3, device=self.device, dtype=self.dtype)

        channels = self.transformer.config.in_channels // 4
        h = 2 * (job.height // (vsf * 2))
        w = 2 * (job.width // (vsf * 2))
        # Noise is drawn on the CPU so a seed gives the same image on any device.
        generator = torch.Generator("cpu").manual_seed(job.seed)
        latents = randn_tensor(
            (n, channels, h, w), generator=generator, device=torch.device("cpu"), dtype=self.dtype
        )
        latents = latents.to(self.device)
        latents = FluxPipeline._pack_latents(latents, n, channels, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, self.device, self.dtype)

        scheduler = self.new_scheduler()
        sigmas = np.linspace(1.0, 1 / job.steps, job.steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        cfg = scheduler.config
        mu = calculate_shift(
            latents.shape[1],
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, job.steps, self.device, sigmas=sigmas, mu=mu)
        if self.transformer.config.guidance_embeds:
            guidance = torch.full(
                [1], job.guidance, device=self.device, dtype=torch.float32
            ).expand(n)
        else:
            guidance = None
        scheduler.set_begin_index(0)
        total = len(timesteps)
        for i, t in enumerate(timesteps):
            timestep = t.expand(n).to(latents.dtype) / 1000
            noise = self.transformer(
                hidden_states=latents,
                timestep=timestep,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=prompt_embeds,
                txt_ids=text_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
            if do_true_cfg:
                neg = self.transformer(
                    hidden_states=latents,
                    timestep=timestep,
                    guidance=guidance,
                    pooled_projections=neg_pooled,
                    encoder_hidden_states=neg_embeds,
                    txt_ids=neg_text_ids,
                    img_ids=img_ids,
                    return_dict=False,
                )[0]
                noise = neg + job.true_cfg_scale * (noise - neg)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, total)
        return FluxPipeline._unpack_latents(latents, job.height, job.width, vsf)
