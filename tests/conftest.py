"""Shared fixtures: tiny ONNX models + MACE YAMLs written into tmp_path, the CLI run in-process, and
hypothesis configured so that its example database lives in a temporary directory."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

# ---- hypothesis: never write .hypothesis/ into the working tree ----------------------------------------
try:
    from hypothesis import settings
    from hypothesis.configuration import set_hypothesis_home_dir
    from hypothesis.database import DirectoryBasedExampleDatabase

    _HYP_DIR = os.path.join(tempfile.gettempdir(), f"qmace-hypothesis-{os.getuid()}")
    set_hypothesis_home_dir(_HYP_DIR)
    settings.register_profile(
        "qmace", database=DirectoryBasedExampleDatabase(os.path.join(_HYP_DIR, "examples")), deadline=None
    )
    settings.load_profile("qmace")
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass

REPO = Path(__file__).resolve().parent.parent


# ---- ONNX model building ---------------------------------------------------------------------------------


def make_onnx(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, tuple[int, ...]],
    outputs: list[str],
    inits: dict[str, np.ndarray] | None = None,
    opset: int = 21,
    name: str = "tiny",
) -> onnx.ModelProto:
    """A float32 ONNX model from nodes; ``inits`` become initializers (dtype kept)."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v)) for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qmace-tests")
    model.ir_version = 10 if opset >= 21 else 8
    return model


def rand(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def tiny_cnn(seed: int = 0) -> onnx.ModelProto:
    """input (1,3,8,8) -> Conv+Relu -> Conv(1x1)+BN -> Clip(0,6) -> Add(skip) -> MaxPool -> GlobalAveragePool
    -> Flatten -> Gemm -> Softmax -> output (1,10)."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": rand(rng, 8, 3, 3, 3), "b1": rand(rng, 8, scale=0.1),
        "w2": rand(rng, 8, 8, 1, 1), "b2": rand(rng, 8, scale=0.1),
        "bn_g": (1 + 0.1 * rng.standard_normal(8)).astype(np.float32), "bn_b": rand(rng, 8, scale=0.1),
        "bn_m": rand(rng, 8, scale=0.1), "bn_v": (0.5 + rng.random(8)).astype(np.float32),
        "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32),
        "w3": rand(rng, 10, 8), "b3": rand(rng, 10, scale=0.1),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("Conv", ["relu1", "w2", "b2"], ["conv2"], name="conv2"),
        helper.make_node("BatchNormalization", ["conv2", "bn_g", "bn_b", "bn_m", "bn_v"], ["bn2"], name="bn2"),
        helper.make_node("Clip", ["bn2", "lo", "hi"], ["relu6"], name="relu6"),
        helper.make_node("Add", ["relu6", "relu1"], ["add"], name="add"),
        helper.make_node("MaxPool", ["add"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["pool"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["output"], name="softmax", axis=-1),
    ]
    return make_onnx(nodes, {"input": (1, 3, 8, 8)}, ["output"], inits)


# ---- YAML + files in tmp_path ----------------------------------------------------------------------------


@dataclass
class TinyModel:
    root: Path
    yaml: Path
    onnx_path: Path
    model: onnx.ModelProto
    name: str
    library: str
    input_name: str
    yaml_shape: tuple[int, ...]  # the YAML's (NHWC) input shape
    sha256: str

    @property
    def model_file(self) -> Path:
        return self.root / "build" / self.library / "model" / f"{self.name}.qmace"

    def write_yaml(self, **model_extra) -> Path:
        """Rewrite the YAML with extra model keys (values written verbatim)."""
        self.yaml.write_text(yaml_text(self, **model_extra))
        return self.yaml


def yaml_text(t: TinyModel, sha: str | None = None, input_shape: str | None = None,
              input_tensors: str | None = None, output_tensors: str = "output", **model_extra) -> str:
    extra = "".join(f"    {k}: {v}\n" for k, v in model_extra.items())
    shape = input_shape or ",".join(map(str, t.yaml_shape))
    return (
        f"library_name: {t.library}\n"
        "target_abis: [host]\n"
        "models:\n"
        f"  {t.name}:\n"
        "    platform: onnx\n"
        f"    model_file_path: models/{t.onnx_path.name}\n"
        f"    model_sha256_checksum: {sha or t.sha256}\n"
        "    runtime: cpu\n"
        f"{extra}"
        "    subgraphs:\n"
        f"      - input_tensors: {input_tensors or t.input_name}\n"
        f"        input_shapes: {shape}\n"
        "        input_ranges: -1,1\n"
        f"        output_tensors: {output_tensors}\n"
    )


def write_tiny_model(root: Path, model: onnx.ModelProto | None = None, name: str = "tiny",
                     library: str = "tinylib", **model_extra) -> TinyModel:
    """Write ``root/models/<name>.onnx`` and ``root/<name>.yml`` (NHWC input, correct sha256)."""
    model = model if model is not None else tiny_cnn()
    onnx_path = root / "models" / f"{name}.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    data = model.SerializeToString()
    onnx_path.write_bytes(data)
    vi = model.graph.input[0]
    dims = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
    yaml_shape = (dims[0], dims[2], dims[3], dims[1]) if len(dims) == 4 else dims
    t = TinyModel(root, root / f"{name}.yml", onnx_path, model, name, library, vi.name, yaml_shape,
                  hashlib.sha256(data).hexdigest())
    t.write_yaml(**model_extra)
    return t


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> TinyModel:
    """The tiny CNN written into tmp_path, with the working directory moved there (build/ lands in it)."""
    monkeypatch.chdir(tmp_path)
    return write_tiny_model(tmp_path)


@pytest.fixture
def model_factory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def make(model: onnx.ModelProto | None = None, name: str = "tiny", **model_extra) -> TinyModel:
        return write_tiny_model(tmp_path, model, name, **model_extra)

    return make


# ---- the CLI in-process ----------------------------------------------------------------------------------


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


@pytest.fixture
def cli(capsys):
    """``cli("convert", "--config", f)`` runs ``qmace.cli.main.main`` in-process and captures its output.

    The root logger's handlers are swapped out for the call so that ``logging.basicConfig`` in ``main``
    binds to the captured stderr, exactly as a fresh process would."""
    from qmace.cli.main import main

    def run(*argv: str | Path) -> CliResult:
        capsys.readouterr()
        root = logging.getLogger()
        saved, level = root.handlers[:], root.level
        root.handlers = []
        try:
            try:
                code = main([str(a) for a in argv])
            except SystemExit as e:  # argparse errors
                code = e.code if isinstance(e.code, int) else 2
        finally:
            for h in root.handlers:
                h.close()
            root.handlers, root.level = saved, level
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


def python_m_qmace(*argv: str | Path, cwd: Path) -> CliResult:
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "qmace", *map(str, argv)], check=False, cwd=cwd,
                       capture_output=True, text=True, env=env, timeout=120)
    return CliResult(p.returncode, p.stdout, p.stderr)


def write_samples(d: Path, t: TinyModel, n: int, seed: int = 0, lo: float = -1.0, hi: float = 1.0) -> list[np.ndarray]:
    """``n`` raw float32 samples in the YAML's (NHWC) layout, MACE naming: ``<input>_<i>``."""
    from qmace.config import input_name_format

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for i in range(n):
        x = rng.uniform(lo, hi, size=t.yaml_shape).astype(np.float32)
        x.tofile(d / f"{input_name_format(t.input_name)}_{i}")
        arrays.append(x)
    return arrays
