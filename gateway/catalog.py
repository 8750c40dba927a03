"""The models a gateway serves, and the stage pools they need.

Each model is read from its folder (or hub id) as the stages read it, and each of its
stages gets the fingerprint of the components that stage loads (the same function the
stages use to describe themselves: services/common/stage_info.py). Models whose stage
fingerprints are equal share that stage's pool: FLUX.1-dev and FLUX.1-schnell have the
same text encoders and VAE, so one encoder pool and one VAE pool serve both, while each
has its own denoiser pool. Which replica belongs to which pool is learned from the
replicas themselves (gateway/replicas.py), so every address of a stage may be given to
every pool of that stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ditmesh.common.errors import InvalidArgument
from ditmesh.common.models import ModelRef, resolve_model
from ditmesh.gateway.stages import Serves

STAGES = ("encoder", "denoiser", "vae")


@dataclass(frozen=True, kw_only=True)
class ServedModel:
    ref: ModelRef
    fingerprints: dict[str, str]
    """Stage -> fingerprint of the components that stage loads for this model."""

    @property
    def name(self) -> str:
        return self.ref.name


def load_catalog(sources: Sequence[str], names: Sequence[str] = ()) -> list[ServedModel]:
    """Reads each model; `names`, when given, name them in the same order."""
    from ditmesh.common.stage_info import components_of, fingerprint

    if not sources:
        raise InvalidArgument("the gateway needs at least one --model")
    if names and len(names) != len(sources):
        raise InvalidArgument(
            f"{len(names)} --name for {len(sources)} --model: give a name for every model, "
            "in the same order, or none"
        )
    out: list[ServedModel] = []
    for i, source in enumerate(sources):
        ref = resolve_model(source, names[i] if names else None)
        if any(m.name == ref.name for m in out):
            raise InvalidArgument(f"two models are named {ref.name!r}; name them apart with --name")
        fps = {s: fingerprint(source, components_of(source, s)) for s in STAGES}
        out.append(ServedModel(ref=ref, fingerprints=fps))
    return out


def pools_of(catalog: Sequence[ServedModel]) -> dict[tuple[str, str], Serves]:
    """(stage, fingerprint) -> what that pool serves, in the catalog's order."""
    users: dict[tuple[str, str], list[str]] = {}
    for m in catalog:
        for stage in STAGES:
            users.setdefault((stage, m.fingerprints[stage]), []).append(m.name)
    return {
        (stage, fp): Serves(
            stage=stage,
            fingerprint=fp,
            models=tuple(models),
            others=frozenset(f for (s, f) in users if s == stage and f != fp),
        )
        for (stage, fp), models in users.items()
    }
