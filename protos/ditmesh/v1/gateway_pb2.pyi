from ditmesh.v1 import vae_pb2 as _vae_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt", "negative_prompt", "height", "width", "steps", "guidance", "true_cfg_scale", "seed", "num_images", "output_format", "quality", "partial_images", "num_frames", "fps", "cache_threshold")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    TRUE_CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_IMAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    CACHE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    guidance: float
    true_cfg_scale: float
    seed: int
    num_images: int
    output_format: _vae_pb2.OutputFormat
    quality: int
    partial_images: int
    num_frames: int
    fps: int
    cache_threshold: float
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., true_cfg_scale: _Optional[float] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ..., output_format: _Optional[_Union[_vae_pb2.OutputFormat, str]] = ..., quality: _Optional[int] = ..., partial_images: _Optional[int] = ..., num_frames: _Optional[int] = ..., fps: _Optional[int] = ..., cache_threshold: _Optional[float] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class Encoded(_message.Message):
    __slots__ = ("seconds",)
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    seconds: float
    def __init__(self, seconds: _Optional[float] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("step", "total")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class PartialImage(_message.Message):
    __slots__ = ("partial_image_index", "step", "total", "image")
    PARTIAL_IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    partial_image_index: int
    step: int
    total: int
    image: Image
    def __init__(self, partial_image_index: _Optional[int] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., image: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class FrameProgress(_message.Message):
    __slots__ = ("stage", "video_index", "frames_done", "frames_total")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_INDEX_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DONE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    stage: str
    video_index: int
    frames_done: int
    frames_total: int
    def __init__(self, stage: _Optional[str] = ..., video_index: _Optional[int] = ..., frames_done: _Optional[int] = ..., frames_total: _Optional[int] = ...) -> None: ...

class Decoded(_message.Message):
    __slots__ = ("seconds",)
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    seconds: float
    def __init__(self, seconds: _Optional[float] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("seed", "num_images", "encode_seconds", "denoise_seconds", "decode_seconds", "total_seconds", "stages", "cached_steps", "steps_total", "attention_computed", "speedups")
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DENOISE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    CACHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    SPEEDUPS_FIELD_NUMBER: _ClassVar[int]
    seed: int
    num_images: int
    encode_seconds: float
    denoise_seconds: float
    decode_seconds: float
    total_seconds: float
    stages: _containers.RepeatedCompositeFieldContainer[StageTiming]
    cached_steps: int
    steps_total: int
    attention_computed: float
    speedups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, seed: _Optional[int] = ..., num_images: _Optional[int] = ..., encode_seconds: _Optional[float] = ..., denoise_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., stages: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., cached_steps: _Optional[int] = ..., steps_total: _Optional[int] = ..., attention_computed: _Optional[float] = ..., speedups: _Optional[_Iterable[str]] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "queue_seconds", "work_seconds", "transfer_seconds", "image_encode_seconds", "attempts", "replica")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WORK_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    stage: str
    queue_seconds: float
    work_seconds: float
    transfer_seconds: float
    image_encode_seconds: float
    attempts: int
    replica: str
    def __init__(self, stage: _Optional[str] = ..., queue_seconds: _Optional[float] = ..., work_seconds: _Optional[float] = ..., transfer_seconds: _Optional[float] = ..., image_encode_seconds: _Optional[float] = ..., attempts: _Optional[int] = ..., replica: _Optional[str] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("request_id", "queued", "encoded", "step", "decoded", "image", "finished", "partial_image", "frames")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DECODED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_IMAGE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    queued: Queued
    encoded: Encoded
    step: Step
    decoded: Decoded
    image: _vae_pb2.ImageChunk
    finished: Finished
    partial_image: PartialImage
    frames: FrameProgress
    def __init__(self, request_id: _Optional[str] = ..., queued: _Optional[_Union[Queued, _Mapping]] = ..., encoded: _Optional[_Union[Encoded, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., decoded: _Optional[_Union[Decoded, _Mapping]] = ..., image: _Optional[_Union[_vae_pb2.ImageChunk, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ..., partial_image: _Optional[_Union[PartialImage, _Mapping]] = ..., frames: _Optional[_Union[FrameProgress, _Mapping]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("index", "format", "mime_type", "width", "height", "data", "num_frames", "fps")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    index: int
    format: _vae_pb2.OutputFormat
    mime_type: str
    width: int
    height: int
    data: bytes
    num_frames: int
    fps: int
    def __init__(self, index: _Optional[int] = ..., format: _Optional[_Union[_vae_pb2.OutputFormat, str]] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., data: _Optional[bytes] = ..., num_frames: _Optional[int] = ..., fps: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "images", "finished")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    finished: Finished
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "family", "default_height", "default_width", "default_steps", "default_guidance", "size_multiple", "max_prompt_tokens", "default_num_frames", "max_num_frames", "frame_multiple", "default_fps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SIZE_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FRAME_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    default_height: int
    default_width: int
    default_steps: int
    default_guidance: float
    size_multiple: int
    max_prompt_tokens: int
    default_num_frames: int
    max_num_frames: int
    frame_multiple: int
    default_fps: int
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., default_height: _Optional[int] = ..., default_width: _Optional[int] = ..., default_steps: _Optional[int] = ..., default_guidance: _Optional[float] = ..., size_multiple: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., default_num_frames: _Optional[int] = ..., max_num_frames: _Optional[int] = ..., frame_multiple: _Optional[int] = ..., default_fps: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...
