"""CogVideoX text encoding: the T5 sequence, padded to the model's 226 tokens.

The pipeline object holds only the tokenizer and the text encoder; its
`_get_t5_prompt_embeds` is what `CogVideoXPipeline.encode_prompt` runs for a prompt and
for the negative prompt alike (no mask: the transformer takes all 226 tokens, the
padding's embeddings included), so the conditioning matches the pipeline's exactly.
A missing negative prompt is the empty one, as in the pipeline.
"""

from __future__ import annotations

import torch

from ditmesh.common.models import ModelRef


class CogVideoXTextEncoder:
    def __init__(self, model: ModelRef, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import CogVideoXPipeline

        self.model = model
        self.device = device
        self.dtype = dtype
        self.pipe = CogVideoXPipeline.from_pretrained(
            model.source, transformer=None, vae=None, scheduler=None, dtype=dtype
        ).to(device)
        self.max_tokens = model.max_prompt_tokens

    def count_tokens(self, prompt: str) -> int:
        return len(self.pipe.tokenizer(prompt, truncation=False).input_ids)

    @torch.inference_mode()
    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        embeds = self.pipe._get_t5_prompt_embeds(
            prompt,
            num_videos_per_prompt=1,
            max_sequence_length=self.max_tokens,
            device=self.device,
            dtype=self.dtype,
        )
        return {"prompt_embeds": embeds}
