"""SD3 text encoding: CLIP-L + CLIP-G (pooled and sequence) + T5 (sequence).

The pipeline object holds only tokenizers and text encoders; its
`encode_prompt` is the function plain `StableDiffusion3Pipeline` calls, so the
conditioning matches it exactly. The negative prompt is encoded by the same
call as a prompt: the pipeline's negative path is the same code (no clip skip,
same T5 length), applied to `negative_prompt or ""`.
"""

from __future__ import annotations

import torch

from ditmesh.common.models import ModelRef


class SD3TextEncoder:
    def __init__(self, model: ModelRef, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import StableDiffusion3Pipeline

        self.model = model
        self.device = device
        self.pipe = StableDiffusion3Pipeline.from_pretrained(
            model.source, transformer=None, vae=None, dtype=dtype
        ).to(device)
        if self.pipe.text_encoder_3 is None or self.pipe.tokenizer_3 is None:
            # Without T5 the pipeline pads with zeros sized by the transformer config,
            # which this stage does not load.
            raise ValueError(
                f"model {model.name!r} has no T5 text encoder; SD3 needs text_encoder_3"
            )
        self.max_tokens = model.max_prompt_tokens

    def count_tokens(self, prompt: str) -> int:
        # T5 bounds the prompt: CLIP sees its first 77 tokens, as in the pipeline.
        return len(self.pipe.tokenizer_3(prompt, truncation=False).input_ids)

    @torch.inference_mode()
    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            clip_skip=None,
            max_sequence_length=self.max_tokens,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
