"""Model input/output data in MACE's file conventions, and layout handling.

``--input_dir``: every file whose name starts with the first input's formatted name (non-alphanumeric
characters replaced by ``_``) names one sample by the rest of its name (the *suffix*); the sample's file for
input i is ``<dir>/<formatted name of input i><suffix>``. Files are raw float32 in the YAML's data format
(NHWC by default), or ``.npy`` (loaded without pickle). ``--output_dir`` writes
``<dir>/<formatted output name><suffix>`` (raw float32) and the same name plus ``.npy``.
Samples are read lazily, one at a time, so calibration memory does not grow with the sample count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qmace.config import SubgraphConfig, input_name_format
from qmace.errors import InputDataError, first_line
from qmace.fileio import atomic_write

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One set of model inputs: a name (the file-name suffix shared by its files, ``""`` for generated inputs),
    the arrays in the model's layout by input tensor name, and the file each was read from.
    """
    name: str  # the file-name suffix that identifies the sample ("" for generated inputs)
    feeds: dict[str, np.ndarray]  # input tensor name -> array in the model's layout
    files: dict[str, Path] = field(default_factory=dict)  # input tensor name -> file it was read from

    def source(self, tensor: str) -> str:
        """Where an input came from, for messages.

        Args:
            tensor: the input tensor name.

        Returns:
            Its file's path, or the sample's name for generated inputs.
        """
        return str(self.files[tensor]) if tensor in self.files else f"sample {self.name!r}"


def to_model_layout(x: np.ndarray, data_format: str) -> np.ndarray:
    """(N, H, W, C) -> (N, C, H, W) for NHWC rank-4 data; anything else is already in the model's layout.

    Args:
        x: the input as given (YAML layout).
        data_format: the YAML's input_data_formats entry (``"NHWC"``, ``"NCHW"``, ``"NONE"``, ...).

    Returns:
        The array in the model's (NCHW) layout.
    """
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if data_format == "NHWC" and x.ndim == 4 else x


def from_model_layout(x: np.ndarray, data_format: str) -> np.ndarray:
    """(N, C, H, W) -> (N, H, W, C) for NHWC rank-4 outputs; the inverse of ``to_model_layout``.

    Args:
        x: an output in the model's layout.
        data_format: the YAML's output_data_formats entry.

    Returns:
        The array in the YAML's layout.
    """
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if data_format == "NHWC" and x.ndim == 4 else x


def model_shape(yaml_shape: tuple[int, ...], data_format: str) -> tuple[int, ...]:
    """A YAML input shape in the model's layout: NHWC rank 4 (N, H, W, C) -> (N, C, H, W), else unchanged.

    Args:
        yaml_shape: the shape as the YAML gives it.
        data_format: the input's data format.

    Returns:
        The shape in the model's layout.
    """
    if data_format == "NHWC" and len(yaml_shape) == 4:
        n, h, w, c = yaml_shape
        return (n, c, h, w)
    return tuple(yaml_shape)


def _read_file(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """One input file: ``.npy`` (plain numeric array, no pickle; cast to float32) or raw float32 bytes.
    InputDataError naming the file for a wrong size, a non-numeric ``.npy`` or a read fault."""
    try:
        if path.suffix == ".npy":
            try:
                raw = np.load(path, allow_pickle=False, mmap_mode="r")
            except (ValueError, EOFError) as e:
                raise InputDataError(f"{path}: not a plain .npy array ({first_line(e, 200)})") from e
            if raw.dtype.fields is not None or raw.dtype.kind not in "biuf":
                raise InputDataError(f"{path}: .npy of dtype {raw.dtype} is not a plain numeric array "
                                     "(save it as float32)")
            if raw.size != int(np.prod(shape)):
                raise InputDataError(f"{path}: {raw.size} values, expected {int(np.prod(shape))} for shape {shape}")
            arr = np.asarray(raw, dtype=np.float32).reshape(shape)
        else:
            size = path.stat().st_size
            expected = int(np.prod(shape)) * 4
            if size != expected:
                raise InputDataError(
                    f"{path}: {size} bytes, expected {expected} (float32 of shape {','.join(map(str, shape))})")
            arr = np.fromfile(path, dtype=np.float32).reshape(shape)
    except OSError as e:
        raise InputDataError(f"{path}: cannot read: {e.strerror or e}") from None
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        log.warning("%s: %d NaN/Inf values in input data", path, bad)
    return arr


def sample_names(input_dir: str | Path, sub: SubgraphConfig) -> list[str]:
    """The samples in ``input_dir``: the file-name suffixes after MACE's prefix of the first input tensor.

    MACE's naming: the file of input tensor ``t`` for sample ``s`` is ``<input_name_format(t)><s>``
    (raw float32 bytes, or ``.npy`` when the name ends in ``.npy``).

    Args:
        input_dir: the input folder.
        sub: the YAML subgraph (input tensor names).

    Returns:
        The suffixes, sorted.

    Raises:
        InputDataError: the folder is missing or unreadable, holds no input files, or holds two files
            (``x_page`` and ``x_page.npy``) that would write the same outputs.
    """
    d = Path(input_dir)
    if not d.is_dir():
        raise InputDataError(f"{d}: input directory not found")
    prefix = input_name_format(sub.input_tensors[0])
    try:
        names = sorted(p.name[len(prefix):] for p in d.iterdir() if p.is_file() and p.name.startswith(prefix))
    except OSError as e:
        raise InputDataError(f"{d}: cannot list input folder: {e.strerror or e}") from None
    if not names:
        raise InputDataError(f"{d}: no input files named {prefix}<suffix> (for input tensor {sub.input_tensors[0]!r})")
    seen: dict[str, str] = {}
    for n in names:  # x_page and x_page.npy would write the same output files
        key = n.removesuffix(".npy")
        if key in seen:
            raise InputDataError(f"{d}: {prefix}{seen[key]} and {prefix}{n} are the same sample "
                                 f"{key!r} twice (raw and .npy); keep one")
        seen[key] = n
    return names


def iter_samples(input_dir: str | Path, sub: SubgraphConfig) -> Iterator[Sample]:
    """Read every sample of ``input_dir`` (see ``sample_names`` for the file naming).

    Args:
        input_dir: the input folder.
        sub: the YAML subgraph (input names, shapes, data formats).

    Returns:
        An iterator of ``Sample`` in the model's layout, read lazily one sample at a time.

    Raises:
        InputDataError: naming the file: missing for some input, of the wrong size, not a plain numeric
            ``.npy``, or unreadable (NaN/Inf values are only logged).
    """
    d = Path(input_dir)
    for suffix in sample_names(d, sub):
        feeds, files = {}, {}
        for name, shape, fmt in zip(sub.input_tensors, sub.input_shapes, sub.input_data_formats):
            path = d / f"{input_name_format(name)}{suffix}"
            if not path.is_file():
                raise InputDataError(f"{path}: missing input file for tensor {name!r} of sample {suffix!r}")
            feeds[name] = to_model_layout(_read_file(path, tuple(shape)), fmt)
            files[name] = path
        yield Sample(suffix, feeds, files)


def random_sample(sub: SubgraphConfig, rng: np.random.Generator, name: str = "") -> Sample:
    """Inputs drawn uniformly from each input's ``input_ranges`` (MACE's default -1,1).

    Args:
        sub: the YAML subgraph (input names, shapes, formats, ranges).
        rng: the random generator.
        name: the sample's name.

    Returns:
        A Sample in the model's layout.
    """
    feeds = {}
    for tname, shape, (lo, hi), fmt in zip(sub.input_tensors, sub.input_shapes, sub.input_ranges, sub.input_data_formats):
        feeds[tname] = to_model_layout(rng.uniform(lo, hi, size=shape).astype(np.float32), fmt)
    return Sample(name, feeds)


def write_outputs(output_dir: str | Path, sample: str, outputs: dict[str, np.ndarray], formats: dict[str, str]) -> list[Path]:
    """Write one sample's outputs in MACE's naming, each as raw float32 and as ``.npy``, atomically.

    Args:
        output_dir: the output folder (created).
        sample: the sample's name (a ``.npy`` suffix is dropped).
        outputs: output tensor name -> array in the model's layout.
        formats: output tensor name -> data format (NHWC outputs are transposed back).

    Returns:
        The raw files written (each has a ``.npy`` beside it).

    Raises:
        FileAccessError: a file cannot be written.
    """
    d = Path(output_dir)
    sample = sample.removesuffix(".npy")
    written = []
    for name, value in outputs.items():
        arr = from_model_layout(np.asarray(value, np.float32), formats.get(name, "NONE"))
        base = d / f"{input_name_format(name)}{sample}"
        with atomic_write(base, "wb") as f:
            f.write(arr.tobytes())
        with atomic_write(base.with_name(base.name + ".npy"), "wb") as f:
            np.save(f, arr, allow_pickle=False)
        written.append(base)
    return written
