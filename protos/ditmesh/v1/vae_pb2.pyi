from ditmesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_PNG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_JPEG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_WEBP: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_RAW: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_MP4: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_GIF: _ClassVar[OutputFormat]
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_PNG: OutputFormat
OUTPUT_FORMAT_JPEG: OutputFormat
OUTPUT_FORMAT_WEBP: OutputFormat
OUTPUT_FORMAT_RAW: OutputFormat
OUTPUT_FORMAT_MP4: OutputFormat
OUTPUT_FORMAT_GIF: OutputFormat

class DecodeParams(_message.Message):
    __slots__ = ("request_id", "model", "height", "width", "output_format", "quality", "num_frames", "fps", "report_frames")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    height: int
    width: int
    output_format: OutputFormat
    quality: int
    num_frames: int
    fps: int
    report_frames: bool
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ..., quality: _Optional[int] = ..., num_frames: _Optional[int] = ..., fps: _Optional[int] = ..., report_frames: _Optional[bool] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("params", "chunk", "done")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    params: DecodeParams
    chunk: _tensor_pb2.TensorChunk
    done: _tensor_pb2.TensorsDone
    def __init__(self, params: _Optional[_Union[DecodeParams, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ..., done: _Optional[_Union[_tensor_pb2.TensorsDone, _Mapping]] = ...) -> None: ...

class ImageChunk(_message.Message):
    __slots__ = ("index", "format", "mime_type", "width", "height", "offset", "data", "last", "total_bytes", "num_frames", "fps", "progress")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    index: int
    format: OutputFormat
    mime_type: str
    width: int
    height: int
    offset: int
    data: bytes
    last: bool
    total_bytes: int
    num_frames: int
    fps: int
    progress: VideoProgress
    def __init__(self, index: _Optional[int] = ..., format: _Optional[_Union[OutputFormat, str]] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ..., total_bytes: _Optional[int] = ..., num_frames: _Optional[int] = ..., fps: _Optional[int] = ..., progress: _Optional[_Union[VideoProgress, _Mapping]] = ...) -> None: ...

class VideoProgress(_message.Message):
    __slots__ = ("video_index", "frames_done", "frames_total")
    VIDEO_INDEX_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DONE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    video_index: int
    frames_done: int
    frames_total: int
    def __init__(self, video_index: _Optional[int] = ..., frames_done: _Optional[int] = ..., frames_total: _Optional[int] = ...) -> None: ...
