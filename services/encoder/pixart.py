"""PixArt (alpha and Sigma) text encoding: T5 sequence and its attention mask.

The pipeline object holds only the tokenizer and the text encoder; its
`encode_prompt` is the function plain `PixArtSigmaPipeline` / `PixArtAlphaPipeline`
calls, so the conditioning matches it exactly. The pipelines encode the negative
prompt padded to the prompt's length (`max_sequence_length`) with its own mask,
which is what encoding it as a prompt here gives.

`clean_caption` is off: the pipelines' caption cleaning needs bs4 and ftfy and
otherwise falls back to lower-casing, which is what this stage does always
(callers comparing with the pipeline pass `clean_caption=False`).
"""

from __future__ import annotations

import torch

from ditmesh.common.models import ModelRef, load_class


class PixArtTextEncoder:
    def __init__(self, model: ModelRef, device: torch.device, dtype: torch.dtype) -> None:
        pipeline_cls = load_class(f"diffusers:{model.family.pipeline_classes[0]}")
        self.model = model
        self.device = device
        self.pipe = pipeline_cls.from_pretrained(
            model.source, transformer=None, vae=None, dtype=dtype
        ).to(device)
        self.max_tokens = model.max_prompt_tokens

    def count_tokens(self, prompt: str) -> int:
        # The same preprocessing the pipeline applies before tokenizing.
        text = self.pipe._text_preprocessing(prompt, clean_caption=False)[0]
        return len(self.pipe.tokenizer(text, truncation=False).input_ids)

    @torch.inference_mode()
    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompt,
            do_classifier_free_guidance=False,
            num_images_per_prompt=1,
            device=self.device,
            clean_caption=False,
            max_sequence_length=self.max_tokens,
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}
