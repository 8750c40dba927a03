"""HunyuanDiT text encoding: the bilingual CLIP-style BERT and mT5, each with its mask.

The pipeline object holds only the tokenizers and the text encoders; its
`encode_prompt` is the function plain `HunyuanDiTPipeline` calls (once per encoder:
BERT padded to 77 tokens, mT5 to 256), so the conditioning matches it exactly. The
pipeline encodes the negative prompt padded to the prompt's length with its own mask,
which is what encoding it as a prompt here gives.

mT5 bounds the prompt (256 tokens); BERT sees its first 77 tokens and the rest is cut
silently, as the pipeline does (it only logs a warning).
"""

from __future__ import annotations

import torch

from ditmesh.common.models import ModelRef

# What HunyuanDiTPipeline pads and cuts each prompt to (fixed in the pipeline; the
# transformer's learned text padding is that long too).
BERT_TOKENS = 77
MT5_TOKENS = 256


class HunyuanTextEncoder:
    def __init__(self, model: ModelRef, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import HunyuanDiTPipeline

        self.model = model
        self.device = device
        self.dtype = dtype
        self.pipe = HunyuanDiTPipeline.from_pretrained(
            model.source, transformer=None, vae=None, dtype=dtype
        ).to(device)
        if self.pipe.text_encoder_2 is None or self.pipe.tokenizer_2 is None:
            raise ValueError(f"model {model.name!r} has no mT5 text encoder (text_encoder_2)")
        if self.pipe.text_encoder is None or self.pipe.tokenizer is None:
            raise ValueError(f"model {model.name!r} has no BERT text encoder (text_encoder)")
        self.max_tokens = model.max_prompt_tokens

    def count_tokens(self, prompt: str) -> int:
        return len(self.pipe.tokenizer_2(prompt, truncation=False).input_ids)

    @torch.inference_mode()
    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        # Suffix "" for BERT, "_2" for mT5: the pipeline's own names.
        for index, (suffix, length) in enumerate((("", BERT_TOKENS), ("_2", MT5_TOKENS))):
            embeds, _, mask, _ = self.pipe.encode_prompt(
                prompt,
                device=self.device,
                dtype=self.dtype,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                max_sequence_length=length,
                text_encoder_index=index,
            )
            out["prompt_embeds" + suffix] = embeds
            out["prompt_attention_mask" + suffix] = mask
        return out
