"""Where one request's time went, stage by stage, for its Finished event.

Per stage: the wait in the gateway's queue for a slot (over every attempt), the
stage's own work as the stage reported it (services/common/timings.py), and the rest
of the answering call's time at the gateway, counted as transfer: tensors and images
on the wire, (de)serialisation, gRPC. The VAE reports its image encoding apart.
The run records each stage once it answered (`answered`); a stage called again for
the same request (the VAE, after decoding partial images) keeps its last call, the
one that made the images.
"""

from __future__ import annotations

from dataclasses import dataclass

from ditmesh.v1 import gateway_pb2

STAGE_ORDER = ("encoder", "denoiser", "vae")


@dataclass(slots=True)
class CallTime:
    """What an attempt measured: its call's seconds at the gateway and the stage's report."""

    seconds: float = 0.0
    reported: dict[str, float] | None = None


class RequestTimings:
    """The StageTiming of each stage a request has been through so far."""

    def __init__(self) -> None:
        self._stages: dict[str, gateway_pb2.StageTiming] = {}

    def answered(self, stage: str, replica: str, call: CallTime, queued: float, attempts: int):
        reported = call.reported or {}
        work = reported.get("work", 0.0)
        self._stages[stage] = gateway_pb2.StageTiming(
            stage=stage,
            queue_seconds=queued,
            work_seconds=work,
            transfer_seconds=max(0.0, call.seconds - work),
            image_encode_seconds=reported.get("image_encode", 0.0),
            attempts=attempts,
            replica=replica,
        )

    def stages(self) -> list[gateway_pb2.StageTiming]:
        order = {name: i for i, name in enumerate(STAGE_ORDER)}
        return sorted(self._stages.values(), key=lambda s: order.get(s.stage, len(order)))
