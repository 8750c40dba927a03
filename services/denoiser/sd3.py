"""SD3 model adapter: noise, flow-matching schedule, joint-attention transformer, CFG.

Follows diffusers' StableDiffusion3Pipeline step for step (same noise from the
same seed, the same timesteps and optional dynamic shift, CFG on [uncond, cond]
whenever guidance > 1), with the pipeline module's own `retrieve_timesteps` and
`calculate_shift`, so a request gives the image plain diffusers gives.
Skip-layer guidance (off by default in the pipeline) is not offered.
"""

from __future__ import annotations

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
    initial_noise,
    stack_branches,
    unstack_branches,
)
from ditmesh.denoiser.job import DenoiseJob
from ditmesh.denoiser.parallel.pipefusion_attention import (
    StaleJointProcessor,
    StaleSelfProcessor,
)
from ditmesh.denoiser.parallel.pipefusion_patches import RowBandPatches
from ditmesh.denoiser.parallel.pipefusion_stage import PipeFusionPlan
from ditmesh.denoiser.parallel.processors import JointParallelProcessor, SelfParallelProcessor
from ditmesh.denoiser.parallel.sequence import SequencePlan


def sd3_plan(transformer: torch.nn.Module) -> SequencePlan:
    """Image tokens are born in `pos_embed` (patchify + positions) and leave through
    `proj_out`; text tokens are whole on every rank and join the joint attention.

    SD3.5 blocks add a second, image-only attention (`attn2`); SD3.0 has none.
    """
    processors = {"transformer_blocks.*.attn": JointParallelProcessor}
    if any(getattr(b, "attn2", None) is not None for b in transformer.transformer_blocks):
        processors["transformer_blocks.*.attn2"] = SelfParallelProcessor
    return SequencePlan(
        split_outputs={"pos_embed": 1},
        gather_output=("proj_out", 1),
        text_len_input=("encoder_hidden_states", 1),
        # Under Ulysses alone the context tokens are split across the ranks too.
        split_text_inputs={"encoder_hidden_states": 1},
        processors=processors,
    )


# Joint blocks (SD3.5's with an image-only attn2 too); the model patchifies inside, so a
# patch is a band of token rows, cut out after pos_embed and put back before proj_out.
SD3_PIPEFUSION = PipeFusionPlan(
    block_lists=("transformer_blocks",),
    processors={"attn": StaleJointProcessor, "attn2": StaleSelfProcessor},
    patches=RowBandPatches,
    cut_at=("pos_embed", "proj_out"),
)


class SD3Adapter(TransformerAdapterBase):
    pipefusion_plan = SD3_PIPEFUSION

    def __init__(
        self, model: ModelRef, device: torch.device, dtype: torch.dtype, on_host: bool = False
    ) -> None:
        from diffusers import SD3Transformer2DModel

        super().__init__(model, device, dtype, SD3Transformer2DModel, on_host)
        self.plan = sd3_plan(self.transformer)
        self.schedulers = SchedulerFactory(model.source)

    def warmup_cond(self) -> dict[str, torch.Tensor]:
        """Conditioning of the shapes the encoder sends (77 CLIP + the T5 max length)."""
        c = self.transformer.config
        return {
            "prompt_embeds": torch.zeros(
                1, 77 + self.model.max_prompt_tokens, c.joint_attention_dim
            ),
            "pooled_prompt_embeds": torch.zeros(1, c.pooled_projection_dim),
        }

    def prepare(self, job: DenoiseJob) -> Prepared:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        dev, dt, n = self.device, self.dtype, job.num_images
        vsf = self.model.vae_scale_factor

        def branch(prefix: str) -> dict[str, torch.Tensor]:
            embeds = cond_tensor(job, prefix + "prompt_embeds", dev, dt)
            pooled = cond_tensor(job, prefix + "pooled_prompt_embeds", dev, dt)
            return {
                "encoder_hidden_states": embeds.repeat_interleave(n, dim=0),
                "pooled_projections": pooled.repeat_interleave(n, dim=0),
            }

        cfg_on = do_cfg(self.model, job)
        branches = {"cond": branch("")}
        if cfg_on:
            branches["uncond"] = branch("negative_")
        cfg = self.transformer.config
        shape = (n, cfg.in_channels, job.height // vsf, job.width // vsf)
        latents = initial_noise(job, shape, dt, dev)

        scheduler = self.schedulers()
        kwargs = {}
        c = scheduler.config
        if c.get("use_dynamic_shifting", None):
            seq_len = (shape[2] // cfg.patch_size) * (shape[3] // cfg.patch_size)
            kwargs["mu"] = calculate_shift(
                seq_len,
                c.get("base_image_seq_len", 256),
                c.get("max_image_seq_len", 4096),
                c.get("base_shift", 0.5),
                c.get("max_shift", 1.16),
            )
        timesteps, _ = retrieve_timesteps(scheduler, job.steps, dev, sigmas=None, **kwargs)
        fix_first_step(scheduler, timesteps)  # the pipeline leaves it to the first step
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
        """`text` False: without the context tokens (PipeFusion's later patches reuse the
        context's kept keys and values)."""
        order, inputs = stack_branches(prep, branches, images)
        x = torch.cat([latents] * len(order)) if len(order) > 1 else latents
        context = inputs["encoder_hidden_states"]
        out = self.forward(
            hidden_states=x,
            timestep=t.expand(x.shape[0]),
            encoder_hidden_states=context if text else context[:, :0],
            pooled_projections=inputs["pooled_projections"],
            return_dict=False,
        )[0]
        return unstack_branches(out, order, branches)

    def combine(self, cond, uncond, prep: Prepared, job: DenoiseJob) -> torch.Tensor:
        return guide(cond, uncond, job.guidance)

    def finish(self, prep: Prepared, latents: torch.Tensor, job: DenoiseJob) -> torch.Tensor:
        # Already [N, C, H/8, W/8] in VAE latent space; the VAE stage unscales and shifts.
        return latents
