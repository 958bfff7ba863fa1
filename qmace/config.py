"""The MACE deployment YAML, read as MACE reads it, into typed frozen dataclasses.

    cfg = load_config("mobilenet.yml")       # DeploymentConfig; raises ConfigError naming file and key path
    model = cfg.model(None)                  # the only (or first) model
    model.verify_model_file()                # sha256 against model_sha256_checksum; raises ModelError
    model.subgraph.input_shapes              # ((1, 224, 224, 3),)

Every error names the YAML file and the key path (`models.mobilenet.subgraphs[0].input_shapes`). Unknown
keys are logged as warnings, one per key; keys that only matter to MACE's other runtimes or to its build are
accepted and reported once, in one INFO line, as "not applicable here".

Where qmace deliberately differs from MACE:
- Relative paths (`model_file_path`, `weight_file_path`, `quantize_range_file`, `validation_inputs_data`,
  `validation_outputs_data`) are resolved against the YAML file's directory, not the working directory, so a
  command gives the same result wherever it is run from. `~` is expanded.
- qmace works offline: a URL where MACE would download a file is a ConfigError asking for a local path.
- Supported platforms: `onnx`, `tensorflow` (frozen GraphDef `.pb`), `caffe` (needs `weight_file_path`,
  the .caffemodel, and its `weight_sha256_checksum`) and `tflite` (beyond MACE: `.tflite` files); other
  MACE platforms (megengine, ...) are rejected
  when the file is read.
- Everything runs on the host CPU: a `runtime` other than `cpu`, `target_abis` other than `host`, a
  `data_type` other than fp32, `model_graph_format`/`model_data_format: code`, and GPU/DSP/APU/HTA/OpenCL,
  obfuscation and build settings are accepted and reported as not applicable (MACE would act on them).
- `validation_threshold` may also be a single number, meaning the CPU threshold; device names are
  case-insensitive (`DSP` is an alias of `HEXAGON`, as in MACE).
- `quantize_schema: uint8` is accepted as the explicit name of MACE's default (empty) schema; the 16-bit
  schemas are not supported yet.
- `validation_outputs_metric` / `validation_outputs_threshold` (qmace's own subgraph keys, one per output or
  one for all, like `output_data_formats`): the `--validate` metric per output (`cosine`, MACE's, the default;
  `sqnr` in dB; `rel_error`; `max_abs_error`; `ctc_greedy`, the share of sequences of a (..., T, C) output
  whose greedy CTC decodings equal the reference's) and its threshold (default: the one equivalent to the
  model's cosine `validation_threshold`, qmace.metrics.default_threshold, 1.0 for `ctc_greedy`;
  `max_abs_error` needs one).
- `quantize_float_nodes` / `quantize_16bit_tensors` (qmace's own keys, lists of names): nodes (names or op
  types) kept in float and activations given uint16 codes whenever the model is quantized (`convert` with a
  range file, `quantize`, `qat`); `qmace quantize --sensitivity_float_layers / --sensitivity_16bit` prints the
  lines that keep its choice, and the YAML `qmace qat` writes carries them. A name not in the converted graph
  is an error naming the key.
- `quantize_large_weights_schema` (qmace's own key, `int8` by default) chooses how `quantize_large_weights: 1`
  stores weights: `int8` symmetric per channel, or `uint8`, MACE's asymmetric per-tensor storage
  (docs/quantization.md has the measurement behind the default).
- A one-element list of data formats or data types applies to every tensor, like a single value (MACE
  accepts only the bare value for that). Data formats, data types and platform names are case-insensitive.
- Shapes and ranges may also be written as YAML lists (`[1, 224, 224, 3]`, `[-1.0, 1.0]`); a tensor name that
  YAML reads as an integer (`output_tensors: 495`) is taken as the string "495"; unquoted float-looking
  names are rejected (YAML would have changed them), asking to quote them.
- Unknown keys are warned about with their key path (MACE ignores them silently); with more than one
  subgraph, a warning says only the first is used (MACE uses it silently).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qmace import limits
from qmace.errors import ConfigError, ModelError, ResourceLimitError, first_line
from qmace.fileio import check_plain_name
from qmace.qmath import SCHEMAS

logger = logging.getLogger(__name__)

SUPPORTED_PLATFORMS = ("onnx", "tensorflow", "caffe", "tflite")
MACE_PLATFORMS = ("tensorflow", "caffe", "onnx", "megengine", "keras", "pytorch")
EXTRA_PLATFORMS = ("tflite",)  # platforms qmace reads beyond MACE's
DATA_FORMATS = ("NHWC", "NCHW", "NONE")
TENSOR_DATA_TYPES = ("float32", "int32")
MODEL_DATA_TYPES = ("fp32_fp32", "fp16_fp32", "bf16_fp32", "fp16_fp16", "fp32")
MODEL_FORMATS = ("file", "code")
QUANTIZE_SCHEMAS = SCHEMAS  # qmace.qmath.Schema's values
# MACE's 16-bit quantize_schema values -> (qmace schema, 16-bit activation mode of qmace.quantize.mixed).
MACE_16BIT_SCHEMAS = {"mace_htp_u16a_s8w": ("int8", "all")}
LARGE_WEIGHTS_SCHEMAS = ("int8", "uint8")  # qmace.quantize.weight_only.WEIGHT_SCHEMAS; the first is the default
DEFAULT_INPUT_RANGE = (-1.0, 1.0)
DEFAULT_VALIDATION_THRESHOLD = {"CPU": 0.999, "GPU": 0.995, "QUANTIZE": 0.980}
THRESHOLD_DEVICES = ("CPU", "GPU", "HEXAGON", "HTA", "APU", "QUANTIZE")

# Keys that only concern MACE's other runtimes (GPU/OpenCL, DSP/Hexagon, HTA, APU) or its build; accepted
# at any level and reported once as not applicable.
NOT_APPLICABLE_KEYS = frozenset({
    "target_socs", "embed_model_data", "linkshared", "build_type", "winograd", "obfuscate",
    "opencl_mem_type", "cl_mem_type", "dsp_mode", "nnlib_graph_mode", "hexagon_mode",
    "limit_opencl_kernel_time", "opencl_queue_window_size", "graph_optimize_options", "accelerator_api",
    "apu_cache_policy", "apu_binary_file", "apu_storage_file", "backend", "accuracy_validation_script",
    "docker_image_tag", "dockerfile_path", "dockerfile_sha256_checksum",
})
_TOP_KEYS = ("library_name", "target_abis", "model_graph_format", "model_data_format", "models")
_MODEL_KEYS = (
    "platform", "model_file_path", "model_sha256_checksum", "weight_file_path", "weight_sha256_checksum",
    "subgraphs", "runtime", "data_type", "quantize", "quantize_range_file", "quantize_large_weights",
    "quantize_schema", "quantize_large_weights_schema", "change_concat_ranges", "validation_threshold",
    "quantize_float_nodes", "quantize_16bit_tensors",
)
_SUBGRAPH_KEYS = (
    "input_tensors", "input_shapes", "input_ranges", "input_data_formats", "input_data_types",
    "output_tensors", "output_shapes", "output_data_formats", "output_data_types", "check_tensors",
    "check_shapes", "validation_inputs_data", "validation_outputs_data", "validation_outputs_metric",
    "validation_outputs_threshold",
)
VALIDATION_METRICS = ("cosine", "sqnr", "rel_error", "max_abs_error", "ctc_greedy")  # qmace.metrics.METRICS
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class SubgraphConfig:
    """One graph's inputs and outputs. Per-tensor tuples are index-aligned with the tensor names.

    Empty `input_ranges`, `input_data_formats`, `input_data_types`, `output_data_formats` and
    `output_data_types` are filled with MACE's defaults (-1,1 / NHWC / float32) per tensor.
    """

    input_tensors: tuple[str, ...]
    input_shapes: tuple[Shape, ...]
    output_tensors: tuple[str, ...]
    input_ranges: tuple[tuple[float, float], ...] = ()
    input_data_formats: tuple[str, ...] = ()
    input_data_types: tuple[str, ...] = ()
    output_shapes: tuple[Shape, ...] | None = None
    output_data_formats: tuple[str, ...] = ()
    output_data_types: tuple[str, ...] = ()
    check_tensors: tuple[str, ...] = ()
    check_shapes: tuple[Shape, ...] | None = None
    validation_inputs_data: tuple[Path, ...] = ()
    validation_outputs_data: tuple[Path, ...] = ()
    # qmace's own: per output, the --validate metric (cosine = MACE's) and its threshold (None = the one
    # equivalent to the model's cosine validation_threshold, qmace.metrics.default_threshold)
    validation_outputs_metric: tuple[str, ...] = ()
    validation_outputs_threshold: tuple[float | None, ...] = ()
    key: str = "subgraphs[0]"  # key path in the YAML, for messages

    def __post_init__(self) -> None:
        n_in, n_out = len(self.input_tensors), len(self.output_tensors)
        for name, default, n in (
            ("input_ranges", DEFAULT_INPUT_RANGE, n_in),
            ("input_data_formats", "NHWC", n_in),
            ("input_data_types", "float32", n_in),
            ("output_data_formats", "NHWC", n_out),
            ("output_data_types", "float32", n_out),
            ("validation_outputs_metric", "cosine", n_out),
            ("validation_outputs_threshold", None, n_out),
        ):
            if not getattr(self, name):
                object.__setattr__(self, name, (default,) * n)


@dataclass(frozen=True)
class ModelConfig:
    """One entry of `models:`. Paths are absolute; `quantize_schema` is "uint8", "int8" or "int8_w7"."""

    name: str
    platform: str
    model_file_path: Path
    model_sha256_checksum: str  # lower-case hex
    subgraph: SubgraphConfig  # the one used: element 0 of a list, or the first of a dict
    weight_file_path: Path | None = None
    weight_sha256_checksum: str | None = None
    runtime: str = "cpu"
    data_type: str = "fp32_fp32"
    quantize: bool = False
    quantize_range_file: Path | None = None
    quantize_large_weights: bool = False
    quantize_schema: str = "uint8"
    quantize_large_weights_schema: str = LARGE_WEIGHTS_SCHEMAS[0]
    # 16-bit activations: "rule" (qmace.quantize.mixed's rule), or "all" for MACE's mace_htp_u16a_s8w
    wide_activations: str = "rule"
    # qmace's own keys: node names / op types kept float, activations given uint16 codes (what `qmace quantize
    # --float_nodes / --sensitivity_float_layers / --sensitivity_16bit` chose, so `convert` and `qat` keep it)
    quantize_float_nodes: tuple[str, ...] = ()
    quantize_16bit_tensors: tuple[str, ...] = ()
    change_concat_ranges: bool = False
    validation_threshold: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_VALIDATION_THRESHOLD))
    yaml_path: Path | None = None  # the deployment file, for messages

    @property
    def key(self) -> str:
        """Key path of this model in the YAML: `models.<name>`."""
        return f"models.{self.name}"

    def threshold_for(self, quantized: bool) -> float:
        """Minimum cosine similarity for --validate: QUANTIZE's threshold (0.980 by default) for any quantized
        model, weight-only (`quantize_large_weights: 1`) included, as MACE (its validate_type is QUANTIZE when
        `quantize` or `quantize_large_weights` is 1); else CPU's.

        Args:
            quantized: whether the model is quantized (fully or weight-only).

        Returns:
            The threshold: the YAML's `validation_threshold` for that device, else MACE's default.
        """
        device = "QUANTIZE" if quantized else "CPU"
        return self.validation_threshold.get(device, DEFAULT_VALIDATION_THRESHOLD[device])

    def verify_model_file(self) -> None:
        """Check the model file (and the weight file, if any) against the YAML's sha256 checksums."""
        where = f" in {self.yaml_path}" if self.yaml_path else ""
        if self.model_file_path.is_dir():
            hint = ""
            if (self.model_file_path / "saved_model.pb").is_file():
                hint = (": a TensorFlow SavedModel; freeze it into one GraphDef .pb first (e.g. "
                        "convert_variables_to_constants_v2 on its serving function, then "
                        "graph_def.SerializeToString())")
            raise ModelError(f"{self.model_file_path}: a directory, not a model file ({self.key}.model_file_path"
                             f"{where}){hint}")
        verify_checksum(self.model_file_path, self.model_sha256_checksum,
                        f"{self.key}.model_sha256_checksum{where}")
        if self.weight_file_path is not None and self.weight_sha256_checksum is not None:
            verify_checksum(self.weight_file_path, self.weight_sha256_checksum,
                            f"{self.key}.weight_sha256_checksum{where}")


@dataclass(frozen=True)
class DeploymentConfig:
    """A whole deployment file. `models` keeps the YAML's order."""

    path: Path  # resolved path of the YAML file
    library_name: str
    models: dict[str, ModelConfig]
    target_abis: tuple[str, ...] = ("host",)
    model_graph_format: str = "file"
    model_data_format: str = "file"

    def model(self, name: str | None = None) -> ModelConfig:
        """The model called `name`; None means the only (or first) model.

        Args:
            name: the model's key under `models`, or None.

        Returns:
            Its configuration.

        Raises:
            ConfigError: no model of that name (the message lists the models).
        """
        if name is None:
            return next(iter(self.models.values()))
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError(f"{self.path}: no model {name!r} under models "
                              f"(models: {', '.join(self.models)})") from None


def input_name_format(name: str) -> str:
    """MACE's file-name form of a tensor name: every non-alphanumeric character becomes `_`.

    Args:
        name: the tensor name.

    Returns:
        The name with each non-alphanumeric character replaced by `_` (same length).
    """
    return "".join(c if c.isalnum() else "_" for c in name)


def verify_checksum(path: Path, expected: str, key: str) -> None:
    """Check the sha256 of the file at `path` (read in 1 MiB chunks) against `expected` (hex).

    Args:
        path: the file.
        expected: the sha256 the YAML states (hex; case and surrounding blanks ignored).
        key: the YAML key that gave the checksum, for the message.

    Raises:
        ModelError: naming the file when it is missing, unreadable or has another sha256.
    """
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise ModelError(f"{path}: file not found (checked against {key})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e.strerror or e}") from None
    actual = digest.hexdigest()
    if actual != expected.strip().lower():
        raise ModelError(f"{path}: sha256 mismatch: the file's sha256 is {actual}, {key} says "
                         f"{expected.strip().lower()} (fix the checksum if the file was replaced on purpose)")


def load_config(path: str | Path) -> DeploymentConfig:
    """Read and validate a MACE deployment YAML.

    Args:
        path: the YAML file; relative paths inside it are resolved against its folder.

    Returns:
        DeploymentConfig with one ModelConfig per entry of ``models:``.

    Raises:
        ConfigError naming the file and key path (missing, malformed, inconsistent keys);
        PathError for a library or model name that is not a plain name; ResourceLimitError for a file over
        ``qmace.limits`` (size, nesting depth, alias-expanded size, an input shape over the memory budget).
    """
    path = Path(path).expanduser().resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: deployment file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a deployment YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read deployment file: {e}") from None
    if len(text) > limits.MAX_YAML_BYTES:
        raise ResourceLimitError(f"{path}: {len(text):,} characters, over the limit of {limits.MAX_YAML_BYTES:,} "
                                 "for a deployment file")
    try:
        _check_yaml_depth(text, path)
        data = yaml.safe_load(text)
        _check_expanded_size(data, path)
    except (ValueError, OverflowError) as e:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{path}: malformed YAML value: {first_line(e, 200)}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if not isinstance(data, Mapping):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{path}: the top level must be a mapping of keys (library_name, models, ...), "
                          f"got {got}")
    reader = _Reader(path)
    config = reader.deployment(data)
    if reader.not_applicable:
        logger.info("%s: not applicable here (qmace converts for the host CPU and runs there), ignored: %s",
                    path, ", ".join(reader.not_applicable))
    return config


def _check_yaml_depth(text: str, path: Path) -> None:
    """ResourceLimitError when collections nest deeper than ``limits.MAX_YAML_DEPTH`` (checked on the event
    stream, which does not recurse, before PyYAML's recursive composer sees the text)."""
    depth = 0
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > limits.MAX_YAML_DEPTH:
                mark = ev.start_mark
                raise ResourceLimitError(f"{path}: line {mark.line + 1}: collections nested more than "
                                         f"{limits.MAX_YAML_DEPTH} deep")
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _check_expanded_size(data: Any, path: Path) -> None:
    """ResourceLimitError when the document, with every alias expanded, has more than
    ``limits.MAX_YAML_NODES`` values (an alias bomb), or an alias refers to itself. Counted per shared object
    (memoised), so the bomb is never expanded; its value is never printed."""
    sizes: dict[int, int] = {}

    def size(v: Any) -> int:
        if not isinstance(v, (list, dict)):
            return 1
        key = id(v)
        if key in sizes:
            if sizes[key] < 0:
                raise ResourceLimitError(f"{path}: a YAML alias refers to itself (recursive value)")
            return sizes[key]
        sizes[key] = -1
        items = list(v.keys()) + list(v.values()) if isinstance(v, dict) else v
        n = 1
        for x in items:
            n += size(x)
            if n > limits.MAX_YAML_NODES:
                raise ResourceLimitError(f"{path}: more than {limits.MAX_YAML_NODES:,} values once aliases are "
                                         "expanded (an alias bomb?)")
        sizes[key] = n
        return n

    size(data)


# --------------------------------------------------------------------------------------------- parsing


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Reader:
    """Walks the parsed YAML; knows the file for messages and collects the not-applicable keys."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dir = path.parent
        self.not_applicable: list[str] = []

    def error(self, key: str, message: str) -> ConfigError:
        if len(message) > 400:  # a long value (never more than limits.MAX_YAML_NODES) shown in part
            message = f"{message[:300]} ... {message[-80:]}"
        return ConfigError(f"{self.path}: {key}: {message}")

    def note(self, key: str, value: Any) -> None:
        shown = value if isinstance(value, (str, int, float, bool)) else type(value).__name__
        self.not_applicable.append(f"{key}={shown}")

    def check_keys(self, mapping: Mapping, prefix: str, known: tuple[str, ...]) -> None:
        for k, v in mapping.items():
            key = _join(prefix, k)
            if k in known:
                continue
            if k in NOT_APPLICABLE_KEYS:
                self.note(key, v)
                continue
            close = difflib.get_close_matches(str(k), known + tuple(NOT_APPLICABLE_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            logger.warning("%s: unknown key %s ignored%s", self.path, key, hint)

    def mapping(self, value: Any, key: str) -> Mapping:
        if not isinstance(value, Mapping):
            raise self.error(key, f"must be a mapping of keys, got {type(value).__name__}")
        return value

    # -- scalars

    def string(self, m: Mapping, prefix: str, name: str, default: str | None = None) -> str:
        key = _join(prefix, name)
        value = m.get(name)
        if value is None or value == "":
            if default is None:
                raise self.error(key, "missing (required)")
            return default
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {value!r}")
        return value.strip()

    def choice(self, m: Mapping, prefix: str, name: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.string(m, prefix, name, default).lower()
        if value not in allowed:
            raise self.error(_join(prefix, name), f"{value!r} is not one of: {', '.join(allowed)}")
        return value

    def flag(self, m: Mapping, prefix: str, name: str) -> bool:
        value = m.get(name, 0)
        if value is None:
            return False
        if isinstance(value, bool) or (_is_int(value) and value in (0, 1)):
            return bool(value)
        raise self.error(_join(prefix, name), f"must be 0 or 1, got {value!r}")

    def path_value(self, value: Any, key: str, what: str) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a file path, got {value!r}")
        value = value.strip()
        if "\0" in value:
            raise self.error(key, "a path cannot contain a NUL character")
        if _URL.match(value):
            raise self.error(key, f"{value} is a URL; qmace works offline: download the {what} and give "
                                  f"its local path (relative paths are relative to the YAML file)")
        return (self.dir / Path(value).expanduser()).resolve()

    def sha256(self, m: Mapping, prefix: str, name: str) -> str:
        key = _join(prefix, name)
        value = m.get(name)
        if value is None or value == "":
            raise self.error(key, "missing (required: the sha256 of the file, 64 hex digits)")
        if not isinstance(value, str) or not _SHA256.match(value.strip()):
            raise self.error(key, f"must be a sha256 checksum (64 hex digits), got {value!r}")
        return value.strip().lower()

    # -- lists

    def names(self, value: Any, key: str, what: str = "tensor name") -> tuple[str, ...]:
        """A name list: a bare name or a YAML list of names."""
        items = value if isinstance(value, list) else [value]
        out = []
        for i, v in enumerate(items):
            k = f"{key}[{i}]" if isinstance(value, list) else key
            if _is_int(v):
                v = str(v)
            if not isinstance(v, str) or not v.strip():
                hint = " (quote the name)" if isinstance(v, float) else ""
                raise self.error(k, f"must be a {what}, got {v!r}{hint}")
            out.append(v.strip())
        dupes = sorted({n for n in out if out.count(n) > 1})
        if dupes:
            raise self.error(key, f"given more than once: {', '.join(dupes)}")
        return tuple(out)

    def shape(self, value: Any, key: str) -> Shape:
        """"1,224,224,3", 10 or [1, 224, 224, 3]: positive integer dimensions."""
        if _is_int(value):
            parts: list[Any] = [value]
        elif isinstance(value, str):
            parts = [p.strip() for p in value.split(",")]
        elif isinstance(value, list):
            parts = value
        else:
            raise self.error(key, f"must be a shape like \"1,224,224,3\", got {value!r}")
        dims = []
        for p in parts:
            if isinstance(p, str) and re.fullmatch(r"[+-]?\d+", p):
                p = int(p)
            if not _is_int(p) or p <= 0:
                raise self.error(key, f"must be a shape of positive integers like \"1,224,224,3\", "
                                      f"got {value!r}")
            dims.append(p)
        return tuple(dims)

    def shapes(self, value: Any, key: str) -> tuple[Shape, ...] | None:
        if value is None or value == "":
            return None
        if isinstance(value, list) and value and all(_is_int(v) for v in value):
            return (self.shape(value, key),)  # one shape written as a YAML list of ints
        if not isinstance(value, list):
            return (self.shape(value, key),)
        return tuple(self.shape(v, f"{key}[{i}]") for i, v in enumerate(value))

    def range_(self, value: Any, key: str) -> tuple[float, float]:
        parts: list[Any]
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",")]
        elif isinstance(value, list):
            parts = value
        else:
            raise self.error(key, f"must be a range \"min,max\", got {value!r}")
        try:
            if len(parts) != 2 or any(isinstance(p, bool) for p in parts):
                raise ValueError
            lo, hi = float(parts[0]), float(parts[1])
        except (TypeError, ValueError, OverflowError):
            raise self.error(key, f"must be a range \"min,max\" of two numbers, got {value!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise self.error(key, f"range bounds must be finite, got {value!r}")
        if not lo < hi:
            raise self.error(key, f"range min must be less than max, got min {lo:g} >= max {hi:g}")
        return lo, hi

    def ranges(self, value: Any, key: str) -> tuple[tuple[float, float], ...] | None:
        if value is None or value == "":
            return None
        if not isinstance(value, list) or (len(value) == 2 and all(_is_number(v) for v in value)):
            return (self.range_(value, key),)
        return tuple(self.range_(v, f"{key}[{i}]") for i, v in enumerate(value))

    def per_tensor(self, value: Any, key: str, allowed: tuple[str, ...], default: str, count: int,
                   noun: str, tensors: str) -> tuple[str, ...]:
        """A data format/type list; a bare value or one-element list applies to every tensor."""
        if value is None or value == "" or value == []:
            return (default,) * count
        items = value if isinstance(value, list) else [value]
        out = []
        for i, v in enumerate(items):
            k = f"{key}[{i}]" if isinstance(value, list) else key
            canon = v.strip() if isinstance(v, str) else v
            canon = canon.upper() if isinstance(canon, str) and allowed is DATA_FORMATS else canon
            canon = canon.lower() if isinstance(canon, str) and allowed is not DATA_FORMATS else canon
            if canon not in allowed:
                raise self.error(k, f"{v!r} is not one of: {', '.join(allowed)}")
            out.append(canon)
        if len(out) == 1:
            return (out[0],) * count
        if len(out) != count:
            raise self.error(key, f"{_plural(len(out), noun)} for {_plural(count, tensors)}")
        return tuple(out)

    def output_thresholds(self, value: Any, key: str, metrics: tuple[str, ...]) -> tuple[float | None, ...]:
        """Per-output validation thresholds (a bare number applies to every output); max_abs_error needs one."""
        items = [None] * len(metrics) if value in (None, "", []) else value if isinstance(value, list) else [value]
        if len(items) == 1:
            items = items * len(metrics)
        if len(items) != len(metrics):
            raise self.error(key, f"{_plural(len(items), 'threshold')} for {_plural(len(metrics), 'output tensor')}")
        out: list[float | None] = []
        for i, (v, metric) in enumerate(zip(items, metrics)):
            if v is None and metric == "max_abs_error":
                raise self.error(key, f"output {i} uses max_abs_error, which needs a threshold")
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise self.error(f"{key}[{i}]" if isinstance(value, list) else key, f"{v!r} is not a number")
            out.append(None if v is None else float(v))
        return tuple(out)

    def paths(self, value: Any, key: str) -> tuple[Path, ...]:
        if value is None or value == "":
            return ()
        if isinstance(value, list):
            return tuple(self.path_value(v, f"{key}[{i}]", "file") for i, v in enumerate(value))
        return (self.path_value(value, key, "file"),)

    def count(self, got: tuple | None, want: int, key: str, noun: str, tensors: str) -> None:
        if got is not None and len(got) != want:
            raise self.error(key, f"{_plural(len(got), noun)} for {_plural(want, tensors)}")

    # -- sections

    def deployment(self, data: Mapping) -> DeploymentConfig:
        self.check_keys(data, "", _TOP_KEYS)
        library_name = check_plain_name(self.string(data, "", "library_name"), f"{self.path}: library_name")
        abis_value = data.get("target_abis")
        abis = self.names(abis_value, "target_abis", "target ABI") if abis_value not in (None, "", []) else ("host",)
        if any(a != "host" for a in abis):
            self.note("target_abis", ",".join(abis))
        graph_format = self.choice(data, "", "model_graph_format", MODEL_FORMATS, "file")
        data_format = self.choice(data, "", "model_data_format", MODEL_FORMATS, "file")
        for name, value in (("model_graph_format", graph_format), ("model_data_format", data_format)):
            if value == "code":
                self.note(name, value)
        models_value = data.get("models")
        if models_value is None:
            raise self.error("models", "missing (required: a mapping of model name to model settings)")
        models_map = self.mapping(models_value, "models")
        if not models_map:
            raise self.error("models", "no models given")
        models = {str(n): self.model(str(n), m) for n, m in models_map.items()}
        return DeploymentConfig(path=self.path, library_name=library_name, models=models,
                                target_abis=abis, model_graph_format=graph_format,
                                model_data_format=data_format)

    def model(self, name: str, value: Any) -> ModelConfig:
        prefix = f"models.{name}"
        check_plain_name(name, f"{self.path}: models: model name")
        m = self.mapping(value, prefix)
        self.check_keys(m, prefix, _MODEL_KEYS)

        platform = self.string(m, prefix, "platform").lower()
        if platform not in MACE_PLATFORMS + EXTRA_PLATFORMS:
            raise self.error(f"{prefix}.platform", f"unknown platform {platform!r} (MACE platforms: "
                                                   f"{', '.join(MACE_PLATFORMS)}; supported: "
                                                   f"{', '.join(SUPPORTED_PLATFORMS)})")
        if platform not in SUPPORTED_PLATFORMS:
            raise self.error(f"{prefix}.platform", f"platform {platform!r} is not supported yet "
                                                   f"(supported: {', '.join(SUPPORTED_PLATFORMS)})")

        if m.get("model_file_path") in (None, ""):
            raise self.error(f"{prefix}.model_file_path", "missing (required)")
        model_file = self.path_value(m["model_file_path"], f"{prefix}.model_file_path", "model file")
        model_sha = self.sha256(m, prefix, "model_sha256_checksum")
        weight_file = weight_sha = None
        if platform == "caffe" and m.get("weight_file_path") in (None, ""):
            raise self.error(f"{prefix}.weight_file_path", "missing (required for platform caffe: the .caffemodel)")
        if m.get("weight_file_path") not in (None, ""):
            weight_file = self.path_value(m["weight_file_path"], f"{prefix}.weight_file_path", "weight file")
            weight_sha = self.sha256(m, prefix, "weight_sha256_checksum")

        runtime = self.string(m, prefix, "runtime", "cpu").lower()
        if runtime != "cpu":
            self.note(f"{prefix}.runtime", runtime)
        data_type = self.choice(m, prefix, "data_type", MODEL_DATA_TYPES, "fp32_fp32")
        if data_type not in ("fp32_fp32", "fp32"):
            self.note(f"{prefix}.data_type", data_type)

        quantize = self.flag(m, prefix, "quantize")
        large_weights = self.flag(m, prefix, "quantize_large_weights")
        if quantize and large_weights:
            raise self.error(f"{prefix}.quantize", "quantize: 1 and quantize_large_weights: 1 are exclusive "
                                                   "(as in MACE); set one of them to 0")
        range_file = None
        if m.get("quantize_range_file") not in (None, ""):
            range_file = self.path_value(m["quantize_range_file"], f"{prefix}.quantize_range_file",
                                         "range file")
        schema = self.string(m, prefix, "quantize_schema", "uint8").lower()
        wide = "rule"
        if schema in MACE_16BIT_SCHEMAS:
            schema, wide = MACE_16BIT_SCHEMAS[schema]
        if schema not in QUANTIZE_SCHEMAS:
            if "16" in schema:
                what = (" (MACE's APU schema: int16 activations and weights, per tensor)"
                        if schema == "mace_apu_16bit_per_tensor" else "")
                raise self.error(f"{prefix}.quantize_schema", f"{schema!r}{what}: 16-bit weights are not supported "
                                                              f"yet (supported: uint8, int8, int8_w7, and "
                                                              f"mace_htp_u16a_s8w: uint16 activations, int8 weights; "
                                                              f"`qmace quantize --sensitivity_float_layers N` keeps "
                                                              f"the N layers whose weights matter most in float)")
            raise self.error(f"{prefix}.quantize_schema", f"{schema!r} is not one of: "
                                                          f"{', '.join(QUANTIZE_SCHEMAS)} (empty = uint8)")
        lw_schema = self.string(m, prefix, "quantize_large_weights_schema", LARGE_WEIGHTS_SCHEMAS[0]).lower()
        if lw_schema not in LARGE_WEIGHTS_SCHEMAS:
            raise self.error(f"{prefix}.quantize_large_weights_schema",
                             f"{lw_schema!r} is not one of: {', '.join(LARGE_WEIGHTS_SCHEMAS)}")

        return ModelConfig(
            name=name, platform=platform, model_file_path=model_file, model_sha256_checksum=model_sha,
            subgraph=self.subgraph_of(m, prefix), weight_file_path=weight_file,
            weight_sha256_checksum=weight_sha, runtime=runtime, data_type=data_type, quantize=quantize,
            quantize_range_file=range_file, quantize_large_weights=large_weights, quantize_schema=schema,
            quantize_large_weights_schema=lw_schema, wide_activations=wide,
            quantize_float_nodes=self.names(m.get("quantize_float_nodes") or [], f"{prefix}.quantize_float_nodes",
                                            "node name or op type"),
            quantize_16bit_tensors=self.names(m.get("quantize_16bit_tensors") or [],
                                              f"{prefix}.quantize_16bit_tensors"),
            change_concat_ranges=self.flag(m, prefix, "change_concat_ranges"),
            validation_threshold=self.thresholds(m.get("validation_threshold"),
                                                 f"{prefix}.validation_threshold"),
            yaml_path=self.path,
        )

    def thresholds(self, value: Any, key: str) -> dict[str, float]:
        out = dict(DEFAULT_VALIDATION_THRESHOLD)
        if value is None or value == "":
            return out
        items = {"CPU": value} if _is_number(value) else self.mapping(value, key)
        for device, v in items.items():
            k = key if _is_number(value) else f"{key}.{device}"
            name = "HEXAGON" if str(device).upper() == "DSP" else str(device).upper()
            if name not in THRESHOLD_DEVICES:
                raise self.error(k, f"unknown device {device!r} (devices: {', '.join(THRESHOLD_DEVICES)})")
            if not _is_number(v) or not 0.0 <= v <= 1.0:
                raise self.error(k, f"must be a number between 0 and 1, got {v!r}")
            out[name] = float(v)
        return out

    def subgraph_of(self, m: Mapping, prefix: str) -> SubgraphConfig:
        key = f"{prefix}.subgraphs"
        value = m.get("subgraphs")
        if value is None or value == [] or value == {}:
            raise self.error(key, "missing (required: a list, or a mapping of named graphs, giving "
                                  "input_tensors, input_shapes and output_tensors)")
        if isinstance(value, list):
            first, first_key = value[0], f"{key}[0]"
        elif isinstance(value, Mapping):
            name = next(iter(value))
            first, first_key = value[name], f"{key}.{name}"
        else:
            raise self.error(key, f"must be a list or a mapping of graphs, got {type(value).__name__}")
        if len(value) > 1:
            logger.warning("%s: %s has %d graphs; only the first (%s) is used, as in MACE",
                           self.path, key, len(value), first_key)
        return self.subgraph(first, first_key)

    def subgraph(self, value: Any, prefix: str) -> SubgraphConfig:
        s = self.mapping(value, prefix)
        self.check_keys(s, prefix, _SUBGRAPH_KEYS)

        def k(name: str) -> str:
            return f"{prefix}.{name}"

        for required in ("input_tensors", "input_shapes", "output_tensors"):
            if s.get(required) in (None, "", []):
                raise self.error(k(required), "missing (required)")
        inputs = self.names(s["input_tensors"], k("input_tensors"))
        outputs = self.names(s["output_tensors"], k("output_tensors"))
        n_in, n_out = len(inputs), len(outputs)

        input_shapes = self.shapes(s["input_shapes"], k("input_shapes"))
        assert input_shapes is not None
        self.count(input_shapes, n_in, k("input_shapes"), "shape", "input tensor")
        for i, shp in enumerate(input_shapes):
            limits.check_tensor_bytes(4 * math.prod(shp), f"{self.path}: {k('input_shapes')}[{i}] {shp}")
        input_ranges = self.ranges(s.get("input_ranges"), k("input_ranges"))
        self.count(input_ranges, n_in, k("input_ranges"), "range", "input tensor")
        output_shapes = self.shapes(s.get("output_shapes"), k("output_shapes"))
        self.count(output_shapes, n_out, k("output_shapes"), "shape", "output tensor")

        check_value = s.get("check_tensors")
        checks = self.names(check_value, k("check_tensors")) if check_value not in (None, "", []) else ()
        check_shapes = self.shapes(s.get("check_shapes"), k("check_shapes"))
        if check_shapes is not None:
            self.count(check_shapes, len(checks), k("check_shapes"), "shape", "check tensor")

        metrics = self.per_tensor(s.get("validation_outputs_metric"), k("validation_outputs_metric"),
                                  VALIDATION_METRICS, "cosine", n_out, "metric", "output tensor")
        return SubgraphConfig(
            input_tensors=inputs,
            input_shapes=input_shapes,
            output_tensors=outputs,
            input_ranges=input_ranges or (DEFAULT_INPUT_RANGE,) * n_in,
            input_data_formats=self.per_tensor(s.get("input_data_formats"), k("input_data_formats"),
                                               DATA_FORMATS, "NHWC", n_in, "data format", "input tensor"),
            input_data_types=self.per_tensor(s.get("input_data_types"), k("input_data_types"),
                                             TENSOR_DATA_TYPES, "float32", n_in, "data type", "input tensor"),
            output_shapes=output_shapes,
            output_data_formats=self.per_tensor(s.get("output_data_formats"), k("output_data_formats"),
                                                DATA_FORMATS, "NHWC", n_out, "data format", "output tensor"),
            output_data_types=self.per_tensor(s.get("output_data_types"), k("output_data_types"),
                                              TENSOR_DATA_TYPES, "float32", n_out, "data type",
                                              "output tensor"),
            check_tensors=checks,
            check_shapes=check_shapes,
            validation_inputs_data=self.paths(s.get("validation_inputs_data"), k("validation_inputs_data")),
            validation_outputs_data=self.paths(s.get("validation_outputs_data"),
                                               k("validation_outputs_data")),
            validation_outputs_metric=metrics,
            validation_outputs_threshold=self.output_thresholds(s.get("validation_outputs_threshold"),
                                                                k("validation_outputs_threshold"), metrics),
            key=prefix,
        )
