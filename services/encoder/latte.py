"""Latte text encoding: the T5 sequence padded to 120 tokens and its attention mask.

The pipeline object holds only the tokenizer and the text encoder; its `encode_prompt`
(with `mask_feature=False`) gives the embeddings plain `LattePipeline` computes before it
masks them, and the mask is the same tokenizer call's. The masking itself (cutting the
embeddings at the prompt's length, which the pipeline does to the negative prompt's
embeddings too) needs both prompts, so the denoiser adapter does it (denoiser/latte.py).

`clean_caption` is off (it needs bs4 and ftfy); the pipeline then lower-cases and strips,
as this stage does always (callers comparing with the pipeline pass `clean_caption=False`).
"""

from __future__ import annotations

import torch

from ditmesh.common.models import ModelRef

# LattePipeline.encode_prompt pads and cuts every prompt to this many tokens.
LATTE_TOKENS = 120


class LatteTextEncoder:
    def __init__(self, model: ModelRef, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import LattePipeline

        self.model = model
        self.device = device
        self.pipe = LattePipeline.from_pretrained(
            model.source, transformer=None, vae=None, dtype=dtype
        ).to(device)
        self.max_tokens = min(model.max_prompt_tokens, LATTE_TOKENS)

    def _text(self, prompt: str) -> str:
        # The same preprocessing the pipeline applies before tokenizing.
        return self.pipe._text_preprocessing(prompt, clean_caption=False)[0]

    def count_tokens(self, prompt: str) -> int:
        return len(self.pipe.tokenizer(self._text(prompt), truncation=False).input_ids)

    @torch.inference_mode()
    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(
            prompt,
            do_classifier_free_guidance=False,
            num_images_per_prompt=1,
            device=self.device,
            clean_caption=False,
            mask_feature=False,
        )
        mask = self.pipe.tokenizer(
            self._text(prompt),
            padding="max_length",
            max_length=LATTE_TOKENS,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).attention_mask
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask.to(self.device)}
