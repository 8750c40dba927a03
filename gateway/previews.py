"""Partial images: which steps a request previews, and previews as whole images.

A request asks for 0-3 partial images (`GenerateRequest.partial_images`, OpenAI's
`partial_images`); they are taken at evenly spaced steps before the last (the last
step is the image itself). The denoiser sends its latents after each such step, the
request run has the VAE stage decode them like the final latents (gateway/run.py),
and they reach the client as `partial_image` events. What decides the steps and what
turns VAE chunks into whole images lives here; the run does the calls.
"""

from __future__ import annotations

from ditmesh.common.errors import DitmeshError, InvalidArgument
from ditmesh.v1 import gateway_pb2, vae_pb2

MAX_PARTIAL_IMAGES = 3


def preview_steps(partial_images: int, steps: int) -> tuple[int, ...]:
    """The 1-based steps after which a request with `steps` steps is previewed."""
    if not 0 <= partial_images <= MAX_PARTIAL_IMAGES:
        raise InvalidArgument(
            f"partial_images must be between 0 and {MAX_PARTIAL_IMAGES}; got {partial_images}"
        )
    if partial_images > steps - 1:
        raise InvalidArgument(
            f"{partial_images} partial images need at least {partial_images + 1} steps "
            f"(one preview per step before the last); this request has {steps}"
        )
    # Spaced by steps / (k + 1) >= 1, so the steps are distinct, >= 1 and < steps.
    return tuple((i + 1) * steps // (partial_images + 1) for i in range(partial_images))


def whole_images(chunks: list[vae_pb2.ImageChunk]) -> list[gateway_pb2.Image]:
    """The VAE stage's chunks joined into one Image per index, in index order."""
    images: dict[int, gateway_pb2.Image] = {}
    parts: dict[int, list[bytes]] = {}
    for c in chunks:
        if c.index not in images:
            images[c.index] = gateway_pb2.Image(
                index=c.index,
                format=c.format,
                mime_type=c.mime_type,
                width=c.width,
                height=c.height,
                num_frames=c.num_frames,
                fps=c.fps,
            )
            parts[c.index] = []
        parts[c.index].append(c.data)
    out = []
    for index in sorted(images):
        image = images[index]
        image.data = b"".join(parts[index])
        out.append(image)
    if not out:
        raise DitmeshError("the vae stage returned no image for a partial image")
    return out
