"""Caffe's message definitions (a subset of ``caffe.proto``), built at run time with protobuf's descriptor
API, and the readers of ``.prototxt`` (text format) and ``.caffemodel`` (binary) files.

The subset below is written in ``.proto`` syntax and turned into a ``FileDescriptorProto`` by a small parser
of that restricted syntax (messages, enums nested one level, ``optional``/``repeated``/``required`` fields
with ``default``/``packed`` options); protobuf itself then parses and serializes the Caffe files. Field
numbers and types are Caffe's (BVLC master), so any Caffe file reads as in Caffe. It holds the net and blob
messages, the ``*Parameter`` messages of the layers qmace converts, and the deprecated ``layers`` (V1)
format. A text field outside the subset (the parameters of a layer type qmace does not convert, training
settings) is skipped with a warning that names its line; the layer's type is what gets reported.
"""

from __future__ import annotations

import logging
import re
from functools import cache
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import DecodeError

from qmace.errors import ModelError

log = logging.getLogger(__name__)

CAFFE_PROTO = """
enum Phase { TRAIN = 0; TEST = 1; }
message BlobShape { repeated int64 dim = 1 [packed = true]; }
message BlobProto {
  optional BlobShape shape = 7;
  repeated float data = 5 [packed = true];
  repeated float diff = 6 [packed = true];
  repeated double double_data = 8 [packed = true];
  repeated double double_diff = 9 [packed = true];
  optional int32 num = 1 [default = 0];
  optional int32 channels = 2 [default = 0];
  optional int32 height = 3 [default = 0];
  optional int32 width = 4 [default = 0];
}
message NetState {
  optional Phase phase = 1 [default = TEST];
  optional int32 level = 2 [default = 0];
  repeated string stage = 3;
}
message NetStateRule {
  optional Phase phase = 1;
  optional int32 min_level = 2;
  optional int32 max_level = 3;
  repeated string stage = 4;
  repeated string not_stage = 5;
}
message ParamSpec {
  enum DimCheckMode { STRICT = 0; PERMISSIVE = 1; }
  optional string name = 1;
  optional DimCheckMode share_mode = 2;
  optional float lr_mult = 3 [default = 1.0];
  optional float decay_mult = 4 [default = 1.0];
}
message FillerParameter {
  enum VarianceNorm { FAN_IN = 0; FAN_OUT = 1; AVERAGE = 2; }
  optional string type = 1 [default = "constant"];
  optional float value = 2 [default = 0];
  optional float min = 3 [default = 0];
  optional float max = 4 [default = 1];
  optional float mean = 5 [default = 0];
  optional float std = 6 [default = 1];
  optional int32 sparse = 7 [default = -1];
  optional VarianceNorm variance_norm = 8 [default = FAN_IN];
}
message NetParameter {
  optional string name = 1;
  repeated string input = 3;
  repeated BlobShape input_shape = 8;
  repeated int32 input_dim = 4;
  optional bool force_backward = 5 [default = false];
  optional NetState state = 6;
  optional bool debug_info = 7 [default = false];
  repeated LayerParameter layer = 100;
  repeated V1LayerParameter layers = 2;
}
message LayerParameter {
  optional string name = 1;
  optional string type = 2;
  repeated string bottom = 3;
  repeated string top = 4;
  optional Phase phase = 10;
  repeated float loss_weight = 5;
  repeated ParamSpec param = 6;
  repeated BlobProto blobs = 7;
  repeated bool propagate_down = 11;
  repeated NetStateRule include = 8;
  repeated NetStateRule exclude = 9;
  optional BatchNormParameter batch_norm_param = 139;
  optional BiasParameter bias_param = 141;
  optional ClipParameter clip_param = 148;
  optional ConcatParameter concat_param = 104;
  optional ConvolutionParameter convolution_param = 106;
  optional CropParameter crop_param = 144;
  optional DropoutParameter dropout_param = 108;
  optional EltwiseParameter eltwise_param = 110;
  optional FlattenParameter flatten_param = 135;
  optional InnerProductParameter inner_product_param = 117;
  optional InputParameter input_param = 143;
  optional PoolingParameter pooling_param = 121;
  optional PowerParameter power_param = 122;
  optional PReLUParameter prelu_param = 131;
  optional ReLUParameter relu_param = 123;
  optional ReshapeParameter reshape_param = 133;
  optional ScaleParameter scale_param = 142;
  optional SigmoidParameter sigmoid_param = 124;
  optional SoftmaxParameter softmax_param = 125;
  optional SliceParameter slice_param = 126;
  optional TanHParameter tanh_param = 127;
}
message V1LayerParameter {
  enum LayerType {
    NONE = 0; ABSVAL = 35; ACCURACY = 1; ARGMAX = 30; BNLL = 2; CONCAT = 3; CONTRASTIVE_LOSS = 37;
    CONVOLUTION = 4; DATA = 5; DECONVOLUTION = 39; DROPOUT = 6; DUMMY_DATA = 32; EUCLIDEAN_LOSS = 7;
    ELTWISE = 25; EXP = 38; FLATTEN = 8; HDF5_DATA = 9; HDF5_OUTPUT = 10; HINGE_LOSS = 28; IM2COL = 11;
    IMAGE_DATA = 12; INFOGAIN_LOSS = 13; INNER_PRODUCT = 14; LRN = 15; MEMORY_DATA = 29;
    MULTINOMIAL_LOGISTIC_LOSS = 16; MVN = 34; POOLING = 17; POWER = 26; RELU = 18; SIGMOID = 19;
    SIGMOID_CROSS_ENTROPY_LOSS = 27; SILENCE = 36; SOFTMAX = 20; SOFTMAX_LOSS = 21; SPLIT = 22;
    SLICE = 33; TANH = 23; WINDOW_DATA = 24; THRESHOLD = 31;
  }
  enum DimCheckMode { STRICT = 0; PERMISSIVE = 1; }
  repeated string bottom = 2;
  repeated string top = 3;
  optional string name = 4;
  repeated NetStateRule include = 32;
  repeated NetStateRule exclude = 33;
  optional LayerType type = 5;
  repeated BlobProto blobs = 6;
  repeated string param = 1001;
  repeated DimCheckMode blob_share_mode = 1002;
  repeated float blobs_lr = 7;
  repeated float weight_decay = 8;
  repeated float loss_weight = 35;
  optional ConcatParameter concat_param = 9;
  optional ConvolutionParameter convolution_param = 10;
  optional DropoutParameter dropout_param = 12;
  optional EltwiseParameter eltwise_param = 24;
  optional InnerProductParameter inner_product_param = 17;
  optional PoolingParameter pooling_param = 19;
  optional PowerParameter power_param = 21;
  optional ReLUParameter relu_param = 30;
  optional SigmoidParameter sigmoid_param = 38;
  optional SoftmaxParameter softmax_param = 39;
  optional SliceParameter slice_param = 31;
  optional TanHParameter tanh_param = 37;
}
message BatchNormParameter {
  optional bool use_global_stats = 1;
  optional float moving_average_fraction = 2 [default = 0.999];
  optional float eps = 3 [default = 1e-5];
}
message BiasParameter {
  optional int32 axis = 1 [default = 1];
  optional int32 num_axes = 2 [default = 1];
  optional FillerParameter filler = 3;
}
message ClipParameter {
  optional float min = 1;
  optional float max = 2;
}
message ConcatParameter {
  optional int32 axis = 2 [default = 1];
  optional uint32 concat_dim = 1 [default = 1];
}
message ConvolutionParameter {
  enum Engine { DEFAULT = 0; CAFFE = 1; CUDNN = 2; }
  optional uint32 num_output = 1;
  optional bool bias_term = 2 [default = true];
  repeated uint32 pad = 3;
  repeated uint32 kernel_size = 4;
  repeated uint32 stride = 6;
  repeated uint32 dilation = 18;
  optional uint32 pad_h = 9 [default = 0];
  optional uint32 pad_w = 10 [default = 0];
  optional uint32 kernel_h = 11;
  optional uint32 kernel_w = 12;
  optional uint32 stride_h = 13;
  optional uint32 stride_w = 14;
  optional uint32 group = 5 [default = 1];
  optional FillerParameter weight_filler = 7;
  optional FillerParameter bias_filler = 8;
  optional Engine engine = 15 [default = DEFAULT];
  optional int32 axis = 16 [default = 1];
  optional bool force_nd_im2col = 17 [default = false];
}
message CropParameter {
  optional int32 axis = 1 [default = 2];
  repeated uint32 offset = 2;
}
message DropoutParameter { optional float dropout_ratio = 1 [default = 0.5]; }
message EltwiseParameter {
  enum EltwiseOp { PROD = 0; SUM = 1; MAX = 2; }
  optional EltwiseOp operation = 1 [default = SUM];
  repeated float coeff = 2;
  optional bool stable_prod_grad = 3 [default = true];
}
message FlattenParameter {
  optional int32 axis = 1 [default = 1];
  optional int32 end_axis = 2 [default = -1];
}
message InnerProductParameter {
  optional uint32 num_output = 1;
  optional bool bias_term = 2 [default = true];
  optional FillerParameter weight_filler = 3;
  optional FillerParameter bias_filler = 4;
  optional int32 axis = 5 [default = 1];
  optional bool transpose = 6 [default = false];
}
message InputParameter { repeated BlobShape shape = 1; }
message PoolingParameter {
  enum PoolMethod { MAX = 0; AVE = 1; STOCHASTIC = 2; }
  enum Engine { DEFAULT = 0; CAFFE = 1; CUDNN = 2; }
  enum RoundMode { CEIL = 0; FLOOR = 1; }
  optional PoolMethod pool = 1 [default = MAX];
  optional uint32 pad = 4 [default = 0];
  optional uint32 pad_h = 9 [default = 0];
  optional uint32 pad_w = 10 [default = 0];
  optional uint32 kernel_size = 2;
  optional uint32 kernel_h = 5;
  optional uint32 kernel_w = 6;
  optional uint32 stride = 3 [default = 1];
  optional uint32 stride_h = 7;
  optional uint32 stride_w = 8;
  optional Engine engine = 11 [default = DEFAULT];
  optional bool global_pooling = 12 [default = false];
  optional RoundMode round_mode = 13 [default = CEIL];
}
message PowerParameter {
  optional float power = 1 [default = 1.0];
  optional float scale = 2 [default = 1.0];
  optional float shift = 3 [default = 0.0];
}
message PReLUParameter {
  optional FillerParameter filler = 1;
  optional bool channel_shared = 2 [default = false];
}
message ReLUParameter {
  enum Engine { DEFAULT = 0; CAFFE = 1; CUDNN = 2; }
  optional float negative_slope = 1 [default = 0];
  optional Engine engine = 2 [default = DEFAULT];
}
message ReshapeParameter {
  optional BlobShape shape = 1;
  optional int32 axis = 2 [default = 0];
  optional int32 num_axes = 3 [default = -1];
}
message ScaleParameter {
  optional int32 axis = 1 [default = 1];
  optional int32 num_axes = 2 [default = 1];
  optional FillerParameter filler = 3;
  optional bool bias_term = 4 [default = false];
  optional FillerParameter bias_filler = 5;
}
message SigmoidParameter {
  enum Engine { DEFAULT = 0; CAFFE = 1; CUDNN = 2; }
  optional Engine engine = 1 [default = DEFAULT];
}
message SliceParameter {
  optional int32 axis = 3 [default = 1];
  repeated uint32 slice_point = 2;
  optional uint32 slice_dim = 1 [default = 1];
}
message SoftmaxParameter {
  enum Engine { DEFAULT = 0; CAFFE = 1; CUDNN = 2; }
  optional Engine engine = 1 [default = DEFAULT];
  optional int32 axis = 2 [default = 1];
}
message TanHParameter {
  enum Engine { DEFAULT = 0; CAFFE = 1; CUDNN = 2; }
  optional Engine engine = 1 [default = DEFAULT];
}
"""

_FDP = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "double": _FDP.TYPE_DOUBLE, "float": _FDP.TYPE_FLOAT, "int64": _FDP.TYPE_INT64, "uint64": _FDP.TYPE_UINT64,
    "int32": _FDP.TYPE_INT32, "uint32": _FDP.TYPE_UINT32, "bool": _FDP.TYPE_BOOL, "string": _FDP.TYPE_STRING,
    "bytes": _FDP.TYPE_BYTES,
}
_LABELS = {"optional": _FDP.LABEL_OPTIONAL, "repeated": _FDP.LABEL_REPEATED, "required": _FDP.LABEL_REQUIRED}
_TOKEN = re.compile(r'"[^"]*"|[A-Za-z_][A-Za-z0-9_.]*|-?[0-9][0-9.eE+-]*|-?\.[0-9][0-9eE+-]*|[{}=;\[\],]')
_PACKAGE = "caffe"
_SKIP_RANGE = (100_000, 536_870_912)


def _file_descriptor(source: str) -> descriptor_pb2.FileDescriptorProto:
    """Parse the restricted ``.proto`` syntax of ``CAFFE_PROTO`` into a ``FileDescriptorProto``."""
    tokens = _TOKEN.findall(source)
    pos = 0

    def take(expected: str | None = None) -> str:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if expected is not None and tok != expected:
            raise ValueError(f"caffe proto subset: expected {expected!r}, got {tok!r} at token {pos}")
        return tok

    def enum_body(e: descriptor_pb2.EnumDescriptorProto) -> None:
        take("{")
        while tokens[pos] != "}":
            value = e.value.add(name=take())
            take("=")
            value.number = int(take())
            take(";")
        take("}")

    fdp = descriptor_pb2.FileDescriptorProto(name="qmace_caffe_subset.proto", package=_PACKAGE, syntax="proto2")
    pending: list[tuple[descriptor_pb2.FieldDescriptorProto, str, str]] = []  # field, type word, message
    while pos < len(tokens):
        kind = take()
        if kind == "enum":
            enum_body(fdp.enum_type.add(name=take()))
            continue
        if kind != "message":
            raise ValueError(f"caffe proto subset: unexpected {kind!r}")
        msg = fdp.message_type.add(name=take())
        take("{")
        while tokens[pos] != "}":
            word = take()
            if word == "enum":
                enum_body(msg.enum_type.add(name=take()))
                continue
            type_word, name = take(), take()
            take("=")
            field = msg.field.add(name=name, number=int(take()), label=_LABELS[word])
            if tokens[pos] == "[":
                take("[")
                while True:
                    option = take()
                    take("=")
                    value = take().strip('"')
                    if option == "packed":
                        field.options.packed = value == "true"
                    else:
                        field.default_value = value
                    if take() == "]":
                        break
            take(";")
            pending.append((field, type_word, msg.name))
        take("}")
    for msg in fdp.message_type:
        # An extension range Caffe never uses: lets the unknown-field scan skip a field it has reported.
        msg.extension_range.add(start=_SKIP_RANGE[0], end=_SKIP_RANGE[1])
    messages = {m.name: m for m in fdp.message_type}
    top_enums = {e.name for e in fdp.enum_type}
    for field, type_word, owner in pending:
        if type_word in _SCALARS:
            field.type = _SCALARS[type_word]
        elif type_word in {e.name for e in messages[owner].enum_type}:
            field.type, field.type_name = _FDP.TYPE_ENUM, f".{_PACKAGE}.{owner}.{type_word}"
        elif type_word in top_enums:
            field.type, field.type_name = _FDP.TYPE_ENUM, f".{_PACKAGE}.{type_word}"
        elif type_word in messages:
            field.type, field.type_name = _FDP.TYPE_MESSAGE, f".{_PACKAGE}.{type_word}"
        else:
            raise ValueError(f"caffe proto subset: unknown type {type_word!r} of {owner}.{field.name}")
    return fdp


@cache
def messages() -> dict[str, Any]:
    """Caffe message classes by name (``NetParameter``, ``LayerParameter``, ``BlobProto``, ...)."""
    pool = descriptor_pool.DescriptorPool()
    fdp = _file_descriptor(CAFFE_PROTO)
    pool.Add(fdp)
    classes = message_factory.GetMessageClassesForFiles([fdp.name], pool)
    return {name.removeprefix(f"{_PACKAGE}."): cls for name, cls in classes.items()}


def net_parameter() -> Any:
    """A new, empty ``caffe.NetParameter``."""
    return messages()["NetParameter"]()


def parse_prototxt(text: str, path: str | Path = "<prototxt>") -> Any:
    """A ``.prototxt`` text -> ``NetParameter``. Syntax errors raise ModelError with ``file:line:column``;
    fields outside qmace's Caffe subset are skipped with one warning each (line and field).

    Args:
        text: the prototxt's text.
        path: its file, for messages.

    Returns:
        The ``NetParameter``.

    Raises:
        ModelError: a syntax error, with ``file:line:column``.
    """
    net = net_parameter()
    try:
        text_format.Parse(text, net)
        return net
    except text_format.ParseError as e:
        if "has no field named" not in str(e):
            raise ModelError(f"{path}:{_where(e)}: prototxt syntax error: {_reason(e)}") from None
    skipped = _unknown_fields(text, path)
    net = net_parameter()
    try:
        text_format.Parse(text, net, allow_unknown_field=True)
    except text_format.ParseError as e:
        raise ModelError(f"{path}:{_where(e)}: prototxt syntax error: {_reason(e)}") from None
    for where, what in skipped:
        log.warning("%s:%s: skipped a field qmace's Caffe frontend does not read (%s)", path, where, what)
    return net


def _where(e: text_format.ParseError) -> str:
    line, column = e.GetLine(), e.GetColumn()
    return f"{line}:{column}" if line is not None else "?"


def _reason(e: text_format.ParseError) -> str:
    # ParseError's text is "line:column : reason", the reason sometimes led by the quoted line; the
    # location is printed separately.
    return re.sub(r"^'.*'\s*:\s*", "", re.sub(r"^\d+:\d+\s*:\s*", "", str(e)))


def _unknown_fields(text: str, path: str | Path) -> list[tuple[str, str]]:
    """(line:column, description) of every field the subset lacks: strict parses, one field at a time."""
    found: list[tuple[str, str]] = []
    lines = text.split("\n")
    for _ in range(10_000):
        try:
            text_format.Parse("\n".join(lines), net_parameter(), allow_unknown_extension=True)
            return found
        except text_format.ParseError as e:
            if "has no field named" not in str(e) or e.GetLine() is None:
                return found
            found.append((_where(e), _reason(e)))
            line = e.GetLine() - 1
            lines[line] = _blank_field(lines[line], e.GetColumn() - 1)
    return found


def _blank_field(line: str, column: int) -> str:
    """Turn the unknown field at ``column`` into an extension name, which the next strict parse (with
    ``allow_unknown_extension``) skips with its value, so it stops at the next unknown field."""
    match = re.match(r"[A-Za-z_][A-Za-z0-9_]*", line[column:])
    if match is None:
        return line
    return line[:column] + "[qmace.skip]" + line[column + match.end():]


def read_prototxt(path: str | Path) -> Any:
    """Read a ``.prototxt`` file (``parse_prototxt``).

    Args:
        path: the file.

    Returns:
        The ``NetParameter``.

    Raises:
        ModelError: the file is missing, not UTF-8 text, or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file (prototxt) not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ModelError(f"{path}: not a text prototxt (byte {e.start} is not UTF-8); model_file_path must be "
                         f"the .prototxt and weight_file_path the .caffemodel") from None
    return parse_prototxt(text, path)


def read_caffemodel(path: str | Path) -> Any:
    """A binary ``.caffemodel`` -> ``NetParameter`` (its layers carry the ``blobs``).

    Args:
        path: the file.

    Returns:
        The ``NetParameter``.

    Raises:
        ModelError: the file is missing, empty, truncated or not a binary caffemodel.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weight file (caffemodel) not found")
    data = path.read_bytes()
    if not data:
        raise ModelError(f"{path}: weight file is empty")
    net = net_parameter()
    try:
        net.ParseFromString(data)
    except DecodeError as e:
        raise ModelError(f"{path}: not a binary caffemodel, or truncated ({e})") from None
    if not net.layer and not net.layers:
        raise ModelError(f"{path}: not a binary caffemodel (no layers)")
    return net
