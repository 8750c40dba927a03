"""Mochi-1 text encoding: the T5 sequence padded to 256 tokens and its attention mask.

The pipeline object holds only the tokenizer and the text encoder; its `encode_prompt` is
the function plain `MochiPipeline` calls, so the conditioning matches it exactly,
including what `force_zeros_for_empty_prompt` does to an empty (negative) prompt. The
pipeline encodes the negative prompt on its own, padded to the same length, which is
what encoding it as a prompt here gives. The mask goes out as int64 (the wire's usual
mask type); the denoiser adapter turns it back into the pipeline's booleans.
"""

from __future__ import annotations

import torch

from ditmesh.common.models import ModelRef


class MochiTextEncoder:
    def __init__(self, model: ModelRef, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import MochiPipeline

        self.model = model
        self.device = device
        self.dtype = dtype
        self.pipe = MochiPipeline.from_pretrained(
            model.source, transformer=None, vae=None, dtype=dtype
        ).to(device)
        self.max_tokens = model.max_prompt_tokens

    def count_tokens(self, prompt: str) -> int:
        return len(self.pipe.tokenizer(prompt, truncation=False).input_ids)

    @torch.inference_mode()
    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompt,
            do_classifier_free_guidance=False,
            num_videos_per_prompt=1,
            max_sequence_length=self.max_tokens,
            device=self.device,
            dtype=self.dtype,
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask.to(torch.int64)}
