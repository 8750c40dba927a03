"""Height-sharded copies of the causal 3-D video VAEs (CogVideoX, Mochi-1) for the video gang.

What distvae covers and what is added here. distvae (the image gang's library) ships the
layers: `PatchConv3d` / `PatchConv2d` (a convolution that exchanges the halo rows its kernel
needs with the neighbouring ranks and keeps the original padding, zeros or `replicate`, at
the image's global top and bottom only), `PatchGroupNorm` (group-norm statistics summed over
the ranks, 4-D or 5-D) and the adapters around them. Its `parallelize_decoder` knows the 2-D
decoder and some causal video VAEs (Wan, HunyuanVideo, LTX-2), but not CogVideoX's or
Mochi's: no adapter matches their blocks. So this module patches module *instances* of a
deep copy of those VAEs with distvae's layers, and diffusers' own blocks and decode loop run
unchanged on a band of latent rows:

- every `CogVideoXCausalConv3d` (both families' causal convolution) whose kernel is wider
  than one row gets a `PatchConv3d` as its `conv`. The temporal padding (repeating the
  first frame, or the previous frame batch's conv cache) stays where diffusers puts it,
  since frames are not split. CogVideoX pads space with zeros inside the conv, which
  `PatchConv3d` keeps. Mochi (`pad_mode="replicate"`) pads all three axes with one `F.pad`
  before the conv; here that pad keeps its temporal part only and the spatial part moves
  into `PatchConv3d` (`padding_mode="replicate"`), which replicates only at the global edge
  and takes the neighbours' rows elsewhere (replicating one axis after another is the same
  as all at once: each clamps its own index).
- other convolutions wider than one row (CogVideoX's 2-D upsampling conv) get distvae's
  `Conv2dAdapter` / `Conv3dAdapter`; one-row kernels (1x1x1 projections) stay as they are.
- every `nn.GroupNorm` gets distvae's `GroupNormAdapter`. The wrapped norm still sees what
  the single decode's sees: CogVideoX's spatial norms normalise one decoder call (one frame
  batch of the conv-cached loop) over frames and rows; `MochiChunkedGroupNorm3D` normalises
  frame by frame (frames folded into the batch); the sums are reduced over the gang either way.
- upsampling stays local: CogVideoX interpolates (nearest, 2x) and its spatial norms resize
  the latents to the activation's size (nearest, an exact power of two), and Mochi unfolds
  each row into two with a linear projection, so a band of latent rows maps onto the same
  band of output rows as long as bands are cut in whole latent rows (`row_bands`).
- neither decoder has attention (CogVideoX's has none; Mochi's decoder blocks are built with
  `add_attention=False`); a decoder that has some is refused, since its sequence would have
  to be gathered.

What is left to others: running the ranks and gathering frames (video_gang.py), the latents'
scaling and post-processing (the VideoDecoder of each family), the 2-D Latte VAE (distvae's
own `parallelize_decoder`, through gang.parallel_copy). Lost in the copy: CogVideoX's
`CogVideoXSafeConv3d` cuts inputs over 2 GB into frame chunks; the sharded conv does not,
since each rank holds 1/M of the rows.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.distributed as dist
from torch import nn

from ditmesh.common.errors import FailedPrecondition


def row_bands(rows: int, world: int) -> list[tuple[int, int]]:
    """(start, length) of each rank's latent rows: contiguous, the first `rows % world` ranks
    one row longer (the rule distvae's Patchify uses). Needs rows >= world (split_fits)."""
    band, extra = divmod(rows, world)
    return [(r * band + min(r, extra), band + (1 if r < extra else 0)) for r in range(world)]


def _context(group: dist.ProcessGroup | None):
    from distvae.utils import parallel_context

    return parallel_context(group, -2, ndim=5)  # height: -2 of [N, C, F, H, W] and [N, C, H, W]


def _rows_wide(kernel: tuple[int, ...]) -> bool:
    """Whether a kernel reads more than one row or column (so a band needs its neighbours')."""
    return any(k > 1 for k in kernel[-2:])


def _patched_causal_conv(module: nn.Module, ctx) -> nn.Module:
    """The `PatchConv3d` that replaces a CogVideoXCausalConv3d's conv (see the docstring)."""
    from distvae.models.layers.conv3d import PatchConv3d
    from distvae.modules.adapters.adapter_utils import adopt_convolution_parameters

    conv = module.conv
    if tuple(conv.dilation) != (1, 1, 1):
        raise FailedPrecondition("the video VAE gang cannot shard a dilated causal convolution")
    replicate = module.pad_mode == "replicate"
    patched = PatchConv3d(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=(0, module.height_pad, module.width_pad) if replicate else conv.padding,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode="replicate" if replicate else conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
        parallel_context=ctx,
    )
    adopt_convolution_parameters(patched, conv)
    if replicate:
        # F.pad's order is (W, W, H, H, F, F): keep the causal frames, drop the spatial part.
        module.time_causal_padding = (0, 0, 0, 0, module.time_pad, 0)
    return patched


def shard_causal_vae(vae: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """A copy of a CogVideoX or Mochi VAE whose decoder works on this rank's band of rows.

    The copy shares the parameters and buffers (seeded into deepcopy's memo), so the weights
    exist once. Its decoder takes the band of latent rows `row_bands` gives this rank (the
    `sample` the decoder also uses for its spatial norms) and returns that band's pixel rows;
    every rank must run the same calls in the same order.
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d
    from distvae.modules.adapters.layers.conv_adapters import Conv2dAdapter, Conv3dAdapter
    from distvae.modules.adapters.layers.norm_adapters import GroupNormAdapter

    shared = {id(t): t for t in itertools.chain(vae.parameters(), vae.buffers())}
    sharded = copy.deepcopy(vae, memo=shared)
    decoder = sharded.decoder
    attention = [name for name, m in decoder.named_modules() if isinstance(m, Attention)]
    if attention:
        raise FailedPrecondition(
            f"the video VAE gang cannot shard {type(vae).__name__}: its decoder has attention "
            f"({', '.join(attention)}), which would need the whole frame on every rank"
        )
    ctx = _context(group)
    causal = [m for m in decoder.modules() if isinstance(m, CogVideoXCausalConv3d)]
    inside_causal = {id(m.conv) for m in causal}
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in decoder.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.GroupNorm):
                swaps.append((parent, name, GroupNormAdapter(child, parallel_context=ctx)))
            elif id(child) in inside_causal:
                if _rows_wide(child.kernel_size):
                    swaps.append((parent, name, _patched_causal_conv(parent, ctx)))
            elif isinstance(child, nn.Conv3d | nn.Conv2d) and _rows_wide(child.kernel_size):
                adapter = Conv3dAdapter if isinstance(child, nn.Conv3d) else Conv2dAdapter
                swaps.append((parent, name, adapter(child, parallel_context=ctx)))
    # Swapped after the walk: replacing children while iterating would visit the adapters.
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return sharded


def gather_rows(
    band: torch.Tensor, rows: list[int], group: dist.ProcessGroup | None = None, dst: int = 0
) -> torch.Tensor | None:
    """Rank `dst` (of `group`) gets the bands of every rank joined along the rows (dim -2);
    the others get None. `rows` is each rank's row count, known to all, so no sizes travel.
    Bands are padded to the longest for the collective and cut back after it."""
    group = group or dist.group.WORLD
    rank = dist.get_rank(group)
    longest = max(rows)
    padded = band
    if band.shape[-2] < longest:
        padded = nn.functional.pad(band, (0, 0, 0, longest - band.shape[-2]))
    padded = padded.contiguous()
    bufs = [torch.empty_like(padded) for _ in rows] if rank == dst else None
    dist.gather(padded, bufs, dst=dist.get_global_rank(group, dst), group=group)
    if bufs is None:
        return None
    return torch.cat([b[..., :n, :] for b, n in zip(bufs, rows, strict=True)], dim=-2)


__all__ = ["gather_rows", "row_bands", "shard_causal_vae"]
