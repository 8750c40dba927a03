from ditmesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DenoiseParams(_message.Message):
    __slots__ = ("request_id", "model", "height", "width", "steps", "guidance", "true_cfg_scale", "seed", "num_images", "preview_steps", "num_frames", "cache_threshold")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    TRUE_CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    CACHE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    height: int
    width: int
    steps: int
    guidance: float
    true_cfg_scale: float
    seed: int
    num_images: int
    preview_steps: _containers.RepeatedScalarFieldContainer[int]
    num_frames: int
    cache_threshold: float
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., true_cfg_scale: _Optional[float] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ..., preview_steps: _Optional[_Iterable[int]] = ..., num_frames: _Optional[int] = ..., cache_threshold: _Optional[float] = ...) -> None: ...

class DenoiseRequest(_message.Message):
    __slots__ = ("params", "chunk", "done")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    params: DenoiseParams
    chunk: _tensor_pb2.TensorChunk
    done: _tensor_pb2.TensorsDone
    def __init__(self, params: _Optional[_Union[DenoiseParams, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ..., done: _Optional[_Union[_tensor_pb2.TensorsDone, _Mapping]] = ...) -> None: ...

class DenoiseStep(_message.Message):
    __slots__ = ("step", "total", "cached_steps", "attention_computed", "speedups")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    CACHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    SPEEDUPS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    cached_steps: int
    attention_computed: float
    speedups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., cached_steps: _Optional[int] = ..., attention_computed: _Optional[float] = ..., speedups: _Optional[_Iterable[str]] = ...) -> None: ...

class DenoisePreview(_message.Message):
    __slots__ = ("step", "total", "latents")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    latents: _tensor_pb2.Tensor
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class DenoiseResponse(_message.Message):
    __slots__ = ("step", "chunk", "done", "preview")
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    step: DenoiseStep
    chunk: _tensor_pb2.TensorChunk
    done: _tensor_pb2.TensorsDone
    preview: DenoisePreview
    def __init__(self, step: _Optional[_Union[DenoiseStep, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ..., done: _Optional[_Union[_tensor_pb2.TensorsDone, _Mapping]] = ..., preview: _Optional[_Union[DenoisePreview, _Mapping]] = ...) -> None: ...
