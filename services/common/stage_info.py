"""What a stage replica serves (`ditmesh.v1.StageInfo`): model, family, and a fingerprint.

The fingerprint identifies the components a stage loaded, so a gateway can tell that
two models share a stage's replicas: FLUX.1-dev and FLUX.1-schnell have the same text
encoders and VAE, so one encoder pool and one VAE pool can serve both. It hashes, per
component, every file's path and size, the whole of small files (configs, tokenizers)
and three 1 MiB samples (start, middle, end) of large ones (weights): hashing every
byte of a 12B model at each start would take minutes, while two fine-tunes of one
architecture differ in every sample. A hub id that is not a local folder is
fingerprinted by its id and component names.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ditmesh.common.models import ModelRef
from ditmesh.v1 import stage_pb2, stage_pb2_grpc

STAGE_COMPONENTS = {
    "encoder": (
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
    ),
    "denoiser": ("transformer", "scheduler"),
    "vae": ("vae",),
}
SMALL_FILE_BYTES = 4 * 1024 * 1024
SAMPLE_BYTES = 1024 * 1024


def components_of(source: str, stage: str) -> list[str]:
    """The components of `stage` the model has (those its model_index.json fills in)."""
    from diffusers import DiffusionPipeline

    index = dict(DiffusionPipeline.load_config(source))
    present = {k for k, v in index.items() if isinstance(v, list | tuple) and v and v[0]}
    return [c for c in STAGE_COMPONENTS[stage] if c in present]


def _hash_file(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{size}\0".encode())
    with path.open("rb") as f:
        if size <= SMALL_FILE_BYTES:
            h.update(f.read())
            return
        for offset in (0, size // 2, size - SAMPLE_BYTES):
            f.seek(offset)
            h.update(f.read(SAMPLE_BYTES))


def fingerprint(source: str, components: list[str]) -> str:
    h = hashlib.sha256()
    root = Path(source)
    for component in sorted(components):
        h.update(f"{component}\0".encode())
        folder = root / component
        if not folder.is_dir():
            h.update(f"{source}/{component}\0".encode())
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(f"{path.relative_to(folder)}\0".encode())
            _hash_file(h, path)
    return h.hexdigest()[:24]


def describe(stage: str, model: ModelRef, processes: int = 1) -> stage_pb2.StageDescription:
    components = components_of(model.source, stage)
    return stage_pb2.StageDescription(
        stage=stage,
        model=model.name,
        family=model.family.name,
        fingerprint=fingerprint(model.source, components),
        components=components,
        processes=processes,
    )


class StageInfoService(stage_pb2_grpc.StageInfoServicer):
    def __init__(self, description: stage_pb2.StageDescription) -> None:
        self.description = description

    def Describe(self, request, context) -> stage_pb2.StageDescription:
        return self.description


def stage_info(stage: str, model: ModelRef, processes: int = 1) -> tuple:
    """The (add_servicer, servicer, name) triple a stage registers with its server."""
    return (
        stage_pb2_grpc.add_StageInfoServicer_to_server,
        StageInfoService(describe(stage, model, processes)),
        "ditmesh.v1.StageInfo",
    )
