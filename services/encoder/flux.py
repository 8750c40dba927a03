"""Flux text encoding: CLIP (pooled) + T5 (sequence), through diffusers' own code.

The pipeline object holds only tokenizers and text encoders; its
`encode_prompt` is the same function plain `FluxPipeline` calls, so the
conditioning matches it exactly.
"""

from __future__ import annotations

import torch

from ditmesh.common.models import ModelRef


class FluxTextEncoder:
    def __init__(self, model: ModelRef, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import FluxPipeline

        self.model = model
        self.device = device
        self.pipe = FluxPipeline.from_pretrained(
            model.source, transformer=None, vae=None, dtype=dtype
        ).to(device)
        self.max_tokens = model.max_prompt_tokens

    def count_tokens(self, prompt: str) -> int:
        return len(self.pipe.tokenizer_2(prompt, truncation=False).input_ids)

    @torch.inference_mode()
    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        embeds, pooled, _text_ids = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_tokens,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
