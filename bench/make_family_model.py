"""Random-weight pipeline folders of the real shapes for HunyuanDiT-v1.2, CogVideoX-5B and
Mochi-1, for the family benchmarks (bench/family_gpu.sh).

The folder starts as `ditmesh make-tiny FAMILY` (tiny text encoders and the offline
tokenizers, the family's real scheduler config), then its transformer and VAE are
replaced by random-weight ones built from the released models' configs: the denoiser and
the VAE do the same work per step as the released weights (images are noise). The text
encoders stay tiny: every benchmark passes prompt embeddings of the real shapes
(random), as the Flux peers do, so the encoders never run.

    python bench/make_family_model.py hunyuandit-v1.2 /tmp/hunyuan        # on a GPU
    python bench/make_family_model.py cogvideox-5b /tmp/cog --size tiny     # CPU smoke test
"""

from __future__ import annotations

import argparse
import time

import torch
from vae_gpu import FLUX_VAE  # bench/ is this script's path

# Each family: (make-tiny name, transformer class and its released config, VAE class and
# its released config). Values not given are the classes' defaults, which are the
# released ones (checked against diffusers 0.42.1's constructors).
HUNYUAN_V12 = dict(
    num_attention_heads=16,
    attention_head_dim=88,
    in_channels=4,
    patch_size=2,
    activation_fn="gelu-approximate",
    sample_size=128,
    hidden_size=1408,
    num_layers=40,
    mlp_ratio=4.3637,
    learn_sigma=True,
    cross_attention_dim=1024,
    cross_attention_dim_t5=2048,
    pooled_projection_dim=1024,
    text_len=77,
    text_len_t5=256,
    use_style_cond_and_image_meta_size=False,
)
# The SDXL VAE: Flux's VAE layout (bench/vae_gpu.py) with 4 latent channels, its own
# scaling and the quant convolutions Flux's dropped.
SDXL_VAE = {
    **FLUX_VAE,
    "latent_channels": 4,
    "scaling_factor": 0.13025,
    "shift_factor": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
}
COGVIDEOX_5B = dict(
    num_attention_heads=48,
    attention_head_dim=64,
    num_layers=42,
    use_rotary_positional_embeddings=True,
)
FAMILIES = {
    "hunyuandit-v1.2": ("hunyuandit", "HunyuanDiT2DModel", HUNYUAN_V12, "AutoencoderKL", SDXL_VAE),
    "cogvideox-5b": (
        "cogvideox",
        "CogVideoXTransformer3DModel",
        COGVIDEOX_5B,
        "AutoencoderKLCogVideoX",
        dict(scaling_factor=0.7),
    ),
    "mochi": ("mochi", "MochiTransformer3DModel", {}, "AutoencoderKLMochi", {}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("family", choices=sorted(FAMILIES))
    ap.add_argument("out")
    ap.add_argument("--size", choices=("full", "tiny"), default="full")
    args = ap.parse_args()

    import diffusers

    from ditmesh.tiny import make_tiny

    t0 = time.time()
    tiny, tr_cls, tr_cfg, vae_cls, vae_cfg = FAMILIES[args.family]
    out = make_tiny(tiny, args.out)
    if args.size == "tiny":
        print(f"wrote {out} (tiny) in {time.time() - t0:.0f}s", flush=True)
        return
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        transformer = getattr(diffusers, tr_cls)(**tr_cfg).to(torch.bfloat16)
        vae = getattr(diffusers, vae_cls)(**vae_cfg).to(torch.bfloat16)
    if args.family == "mochi":
        # The rotary frequencies are a learned parameter initialised to zero.
        with torch.no_grad():
            transformer.pos_frequencies.normal_(0.0, 0.5)
    transformer.save_pretrained(out / "transformer", max_shard_size="10GB")
    vae.save_pretrained(out / "vae")
    n = sum(p.numel() for p in transformer.parameters())
    print(
        f"wrote {out}: {tr_cls} {n / 1e9:.2f}B params, {vae_cls} "
        f"{sum(p.numel() for p in vae.parameters()) / 1e6:.0f}M, in {time.time() - t0:.0f}s",
        flush=True,
    )


if __name__ == "__main__":
    main()
