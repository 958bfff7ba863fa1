"""From a YAML model entry to a graph: load, bind and optimize the float model; the build tree's model file
(its path, what it was built from, staleness); the samples of a model entry.

This layer sits above the frontends and passes and below ``quantize``: the verbs (``qmace.api``), the
one-shot quantizer and QAT all start from ``load_float_graph`` and ``samples_for``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from qmace.config import DeploymentConfig, ModelConfig
from qmace.data import Sample, iter_samples, model_shape, random_sample, sample_names
from qmace.errors import ConfigError, ModelError, ModelFileError
from qmace.fileio import check_inside, check_plain_name
from qmace.frontends import frontend_for
from qmace.ir import Graph
from qmace.modelfile import EXTENSION, load_graph
from qmace.passes import optimize

log = logging.getLogger(__name__)


def model_file_path(cfg: DeploymentConfig, m: ModelConfig, build_dir: str | Path | None = None) -> Path:
    """MACE's place for the converted model: ``<build_dir>/<library_name>/model/<model_name>.qmace``.

    Args:
        cfg: the deployment YAML (gives ``library_name``).
        m: the model entry (gives the model name).
        build_dir: the build folder; None means ``./build``.

    Returns:
        The model file's path (not checked for existence).

    Raises:
        PathError: the names would put the file outside ``build_dir`` (the YAML reader already insists on
            plain names; this is the last check before anything is written).
    """
    root = Path(build_dir or "build")
    path = root / check_plain_name(cfg.library_name, f"{cfg.path}: library_name") / "model" / \
        f"{check_plain_name(m.name, f'{cfg.path}: models: model name')}{EXTENSION}"
    check_inside(root, path, "the model file")
    return path

def bind_io(graph: Graph, m: ModelConfig) -> Graph:
    """Check the YAML's inputs/outputs against the model, fix the input shapes, select the outputs.

    Args:
        graph: the imported graph; changed in place (input shapes set, outputs replaced, unused nodes removed).
        m: the YAML model entry whose subgraph names the input/output tensors, shapes and data formats.

    Returns:
        ``graph`` itself.

    Raises:
        ModelError: an input tensor the model does not have (or a model input the YAML leaves unfed), a YAML
            input shape that contradicts the model's, or an output tensor not in the model.
    """
    sub = m.subgraph
    where = f"{m.yaml_path}: {sub.key}"
    unknown = [n for n in sub.input_tensors if n not in graph.inputs]
    if unknown:
        raise ModelError(f"{where}.input_tensors: {', '.join(map(repr, unknown))} not an input of the model; "
                         f"the model's inputs are: {', '.join(graph.inputs)}")
    unfed = [n for n in graph.inputs if n not in sub.input_tensors]
    if unfed:
        raise ModelError(f"{where}.input_tensors: the model also needs input(s) {', '.join(unfed)}")
    for i, (name, shape, fmt) in enumerate(zip(sub.input_tensors, sub.input_shapes, sub.input_data_formats)):
        t = graph.tensors[name]
        want = model_shape(tuple(shape), fmt)
        have = t.shape
        if have is not None and (len(have) != len(want) or any(h is not None and h != w for h, w in zip(have, want))):
            shown = "x".join("?" if d is None else str(d) for d in have)
            layout = f" ({fmt}; {','.join(map(str, want))} in the model's layout)" if tuple(want) != tuple(shape) else ""
            raise ModelError(f"{where}.input_shapes[{i}]: {','.join(map(str, shape))}{layout} contradicts the "
                             f"model's input {name!r} of shape {shown}")
        t.shape = tuple(want)
    # Any tensor of the model may be an output, constants included (a graph output produced by a Constant
    # node, or one that constant folding computes).
    missing = [n for n in sub.output_tensors if n not in graph.tensors]
    if missing:
        raise ModelError(f"{where}.output_tensors: {', '.join(map(repr, missing))} not in the model; "
                         f"the model's outputs are: {', '.join(graph.outputs)}")
    graph.outputs = list(sub.output_tensors)
    graph.remove_unused()
    return graph

def build_settings(m: ModelConfig, built_by: str = "convert") -> dict:
    """What a model file is built from, recorded in its metadata (``built_from``).

    ``run`` and ``export`` compare it with the YAML: the source file's sha256, the YAML's inputs/outputs and,
    for ``convert``, the quantization settings (quantize, quantize_large_weights, schema, range file sha256,
    input ranges, concat ranges).

    Args:
        m: the YAML model entry.
        built_by: ``"convert"``, or ``"quantize"``: the one-shot command chose the ranges itself, so the
            YAML's quantization keys do not apply.

    Returns:
        A JSON-serializable dict of the settings that matter.

    Raises:
        FileAccessError: the range file cannot be read for its sha256.
    """
    sub = m.subgraph
    out: dict = {
        "built_by": built_by,
        "source_sha256": m.model_sha256_checksum,
        "weight_sha256": m.weight_sha256_checksum,
        "input_tensors": sub.input_tensors, "input_shapes": sub.input_shapes,
        "input_data_formats": sub.input_data_formats, "output_tensors": sub.output_tensors,
    }
    if built_by == "convert":
        out |= {"quantize": m.quantize, "quantize_large_weights": m.quantize_large_weights}
        if m.quantize:
            rf = m.quantize_range_file
            out |= {"quantize_schema": m.quantize_schema, "change_concat_ranges": m.change_concat_ranges,
                    "input_ranges": sub.input_ranges,
                    "quantize_range_file_sha256": _sha256_or_none(rf) if rf is not None else None}
            for key in ("quantize_float_nodes", "quantize_16bit_tensors"):  # recorded when set: older files stay valid
                if getattr(m, key):
                    out[key] = sorted(getattr(m, key))
    return json.loads(json.dumps(out, default=str))

def _sha256_or_none(path: Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None

def load_float_graph(m: ModelConfig) -> Graph:
    """Verify, load and optimize the float model of a YAML model entry.

    Args:
        m: the YAML model entry.

    Returns:
        The optimized float graph, its metadata naming the model and the source sha256.

    Raises:
        ModelError: the source file is missing, its sha256 differs from the YAML's, the frontend rejects it,
            or the YAML's inputs/outputs contradict it (``bind_io``).
        ResourceLimitError: declared shapes or initializers exceed the memory budget.
    """
    m.verify_model_file()
    graph = bind_io(frontend_for(m).load(m), m)
    g = optimize(graph)
    g.metadata.update({"model_name": m.name, "source_sha256": m.model_sha256_checksum})
    return g

def rebuild_command(cfg: DeploymentConfig, m: ModelConfig, build_dir: str | Path | None, verb: str = "convert") -> str:
    """The command line that (re)builds model ``m`` into ``build_dir``.

    Args:
        cfg: the deployment YAML (its path goes into the command).
        m: the model entry (named with ``--model_name`` when the YAML has several).
        build_dir: the build folder; None leaves ``--build_dir`` out.
        verb: ``"convert"`` or ``"quantize"``, whichever built the model.

    Returns:
        A shell command line, e.g. ``qmace convert --config m.yml``.
    """
    cmd = f"qmace {verb} --config {cfg.path}"
    if len(cfg.models) > 1:
        cmd += f" --model_name {m.name}"
    if build_dir is not None:
        cmd += f" --build_dir {build_dir}"
    return cmd + (" --input_dir <samples>" if verb == "quantize" else "")

def load_converted(cfg: DeploymentConfig, m: ModelConfig, build_dir: str | Path | None = None) -> Graph:
    """Load the model file built for ``m`` and return its graph.

    Args:
        cfg: the deployment YAML.
        m: the model entry.
        build_dir: the build folder; None means ``./build``.

    Returns:
        The converted graph, checked to be current.

    Raises:
        ModelError: there is no model file (the message names the command that builds it).
        ModelFileError: the file is corrupt or tampered (``load_graph``), or was built from another source
            file or other settings than the YAML now gives (a stale build; the message names the setting
            and the command that rebuilds it).
    """
    path = model_file_path(cfg, m, build_dir)
    if not path.is_file():
        raise ModelError(f"{path}: no converted model; run `{rebuild_command(cfg, m, build_dir)}` first")
    graph = load_graph(path)
    recorded = graph.metadata.get("built_from")
    verb = recorded.get("built_by", "convert") if isinstance(recorded, dict) else "convert"
    verb = verb if verb in ("convert", "quantize") else "convert"
    now = build_settings(m, verb)
    if not isinstance(recorded, dict):
        raise ModelFileError(f"{path}: the file does not record what it was built from; rebuild it: "
                             f"{rebuild_command(cfg, m, build_dir, verb)}")
    for key in [*now, *(k for k in recorded if k not in now)]:
        if now.get(key) != recorded.get(key):
            raise ModelFileError(f"{path}: stale build: built with {key} = {str(recorded.get(key))[:80]}, "
                                 f"{cfg.path} now gives {str(now.get(key))[:80]}; rebuild it: "
                                 f"{rebuild_command(cfg, m, build_dir, verb)}")
    return graph

def samples_for(m: ModelConfig, input_dir: str | Path | None, count: int, seed: int = 0) -> Iterator[Sample]:
    """Samples from ``input_dir`` (MACE file naming), else ``count`` random ones from ``input_ranges``.

    Args:
        m: the YAML model entry (its subgraph gives the input names, shapes, formats and ranges).
        input_dir: folder of input files, or None for random samples.
        count: how many random samples when ``input_dir`` is None.
        seed: seed of the random generator.

    Returns:
        An iterator of ``Sample`` in the model's layout.

    Raises:
        InputDataError: the folder or a file is missing, unreadable or of the wrong size/shape.
    """
    if input_dir is not None:
        yield from iter_samples(input_dir, m.subgraph)
        return
    rng = np.random.default_rng(seed)
    for i in range(count):
        yield random_sample(m.subgraph, rng, f"_{i}")

def count_samples(m: ModelConfig, input_dir: str | Path | None, count: int) -> int:
    """How many samples ``samples_for`` will yield, without reading them.

    Args:
        m: the YAML model entry.
        input_dir: folder of input files, or None.
        count: the number of random samples used when ``input_dir`` is None.

    Returns:
        The number of samples.

    Raises:
        InputDataError: ``input_dir`` is missing, unreadable or holds no input files.
    """
    return len(sample_names(input_dir, m.subgraph)) if input_dir is not None else count


def check_threads(num_threads: int | None) -> None:
    """Check a ``--num_threads`` value.

    Args:
        num_threads: None (the runtime's default) or a thread count.

    Raises:
        ConfigError: ``num_threads`` < 1.
    """
    if num_threads is not None and num_threads < 1:
        raise ConfigError(f"--num_threads must be >= 1, got {num_threads}")
