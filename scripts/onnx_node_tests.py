#!/usr/bin/env python3
"""Run the official ONNX backend node tests through qmace's own import path, and count.

    python scripts/onnx_node_tests.py [--node-dir DIR] [--backend onnxruntime|reference|both] [-k SUBSTR]
                                      [--write-selection] [--show-failures]

The tests are the 1,653 folders that the ``onnx==1.20.1`` wheel ships under onnx/backend/test/data/node/
(fetched, checked and cached by ``python scripts/fetch_assets.py onnx-node-tests``): each holds a
``model.onnx`` (one node, or a small "expanded" graph, at the opset the test was written for) and
``test_data_set_*/{input,output}_*.pb``.

A test is *selected* when (1) every op of its graph is one qmace claims (its op registry, plus Constant),
and (2) plain ONNX Runtime, on the same file, reproduces the expected outputs. A selected test *passes* on
a qmace backend when the path a user takes —
``load_onnx`` (frontend) -> ``bind_io`` (inputs/outputs as a YAML entry would name them) -> ``optimize``
(passes) -> ``save_graph``/``load_graph`` (the model file) -> ``Session(backend)`` —
reproduces every expected output: same dtype, same shape, and ``|got - want| <= atol + rtol * |want|``
with ONNX's backend-test defaults rtol = 1e-3, atol = 1e-7 (NaN matches NaN). The model is used as shipped
(no opset conversion here).

``--write-selection`` rewrites tests/onnx_node_selection.json (test -> its ops), which
tests/test_onnx_node_conformance.py runs and scripts/gen_supported_ops.py counts per op, with
``EXPECTED_FAILURES`` below (the known failures, each with its reason; the test enforces it both ways).
Prints the counts, per backend, as ``passed/selected``, and flags failures that are not expected.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SELECTION_FILE = ROOT / "tests" / "onnx_node_selection.json"
RTOL, ATOL = 1e-3, 1e-7
BACKENDS = ("onnxruntime", "reference")


@dataclass(frozen=True)
class ExpectedFailure:
    """A known failure: ``match`` is a regular expression its message must contain, ``reason`` says why."""

    match: str
    reason: str


# (test, backend) -> the known failure. Every entry is a stated limitation with a named error, not a wrong
# number; tests/test_onnx_node_conformance.py fails when an entry passes or fails differently.
_STRINGS = ExpectedFailure(r"hold strings; qmace supports numeric tensors only",
                           "Equal is claimed, but not on strings: the model file and both backends hold numeric "
                           "tensors only, and the frontend refuses string tensors by name")
EXPECTED_FAILURES: dict[tuple[str, str], ExpectedFailure] = {
    ("test_equal_string", "onnxruntime"): _STRINGS,
    ("test_equal_string", "reference"): _STRINGS,
    ("test_equal_string_broadcast", "onnxruntime"): _STRINGS,
    ("test_equal_string_broadcast", "reference"): _STRINGS,
}

def default_node_dir() -> Path:
    env = os.environ.get("QMACE_CACHE")
    cache = Path(env).expanduser() if env else Path.home() / ".cache" / "qmace"
    return cache / "onnx-node-tests" / "node"


@dataclass
class DataSet:
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


@dataclass
class Case:
    """One node test: its folder, model bytes, ops and data sets (``readable`` False for non-tensor I/O)."""

    name: str
    path: Path
    model_bytes: bytes
    ops: list[str]
    data_sets: list[DataSet] = field(default_factory=list)
    readable: bool = True


def _graph_ops(graph) -> set[str]:
    ops = set()
    for n in graph.node:
        ops.add(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}")
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                ops |= _graph_ops(sub)
    return ops


def load_case(path: Path) -> Case:
    """Read one test folder (model + every data set whose inputs and outputs are plain tensors)."""
    import onnx
    from onnx import numpy_helper

    data = (path / "model.onnx").read_bytes()
    model = onnx.load_model_from_string(data)
    case = Case(path.name, path, data, sorted(_graph_ops(model.graph)))
    inits = {i.name for i in model.graph.initializer}
    ins = [vi for vi in model.graph.input if vi.name not in inits]
    outs = list(model.graph.output)
    if not all(vi.type.HasField("tensor_type") for vi in ins + outs):
        case.readable = False
        return case
    for ds in sorted(path.glob("test_data_set_*")):
        feeds, wants = {}, {}
        for kind, vis, dest in (("input", ins, feeds), ("output", outs, wants)):
            for i, vi in enumerate(vis):
                pb = ds / f"{kind}_{i}.pb"
                if not pb.is_file():
                    continue  # an omitted optional input
                t = onnx.TensorProto()
                t.ParseFromString(pb.read_bytes())
                dest[vi.name] = numpy_helper.to_array(t)
        case.data_sets.append(DataSet(feeds, wants))
    return case


def iter_cases(node_dir: Path, names: list[str] | None = None) -> Iterator[Case]:
    for p in sorted(node_dir.iterdir()) if names is None else [node_dir / n for n in names]:
        if (p / "model.onnx").is_file():
            yield load_case(p)


def qmace_claims(case: Case) -> bool:
    from qmace.ops import is_supported

    return all(op == "Constant" or ("." not in op and is_supported(op)) for op in case.ops)


def mismatch(name: str, want: np.ndarray, got: np.ndarray) -> str | None:
    """Why ``got`` is not ``want`` (dtype, shape, values beyond rtol/atol), or None when it matches."""
    got = np.asarray(got)
    if got.dtype != want.dtype:
        return f"output {name!r}: dtype {got.dtype}, expected {want.dtype}"
    if got.shape != want.shape:
        return f"output {name!r}: shape {got.shape}, expected {want.shape}"
    if want.dtype.kind in "fc" or want.dtype.name.startswith(("bfloat", "float")):  # ml_dtypes' floats too
        w, g = want.astype(np.float64), got.astype(np.float64)
        with np.errstate(invalid="ignore"):  # inf - inf
            bad = ~((np.abs(g - w) <= ATOL + RTOL * np.abs(w)) | (np.isnan(w) & np.isnan(g)) | (g == w))
    elif want.dtype.kind in "biu?":
        bad = want != got
    else:
        bad = np.asarray(want.astype(object) != got.astype(object))
    if np.any(bad):
        idx = np.argwhere(bad)[0] if want.ndim else ()
        return (f"output {name!r}: {int(np.sum(bad))} of {want.size} values differ, e.g. at {tuple(idx)}: "
                f"{got[tuple(idx)]!r} vs {want[tuple(idx)]!r}")
    return None


def ort_result(case: Case) -> str | None:
    """None when plain ONNX Runtime reproduces every expected output of the file, else why not."""
    import onnxruntime as ort

    if not case.readable or not case.data_sets:
        return "inputs/outputs are not plain tensors"
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(case.model_bytes, opts, providers=["CPUExecutionProvider"])
        for ds in case.data_sets:
            names = list(ds.outputs)
            got = sess.run(names, ds.inputs)
            for n, g in zip(names, got):
                why = mismatch(n, ds.outputs[n], g)
                if why:
                    return why
    except Exception as e:  # ORT's own exception types
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def qmace_result(case: Case, backend: str, workdir: Path) -> str | None:
    """None when qmace reproduces every expected output on ``backend``, else the first reason it does not."""
    from qmace.api import bind_io
    from qmace.config import SubgraphConfig
    from qmace.frontends import onnx_to_graph
    from qmace.modelfile import load_graph, save_graph
    from qmace.passes import optimize
    from qmace.runtime import Session

    try:
        import onnx

        graph = onnx_to_graph(onnx.load_model_from_string(case.model_bytes), case.path / "model.onnx")
        first = case.data_sets[0]
        sub = SubgraphConfig(
            input_tensors=tuple(first.inputs), input_shapes=tuple(v.shape for v in first.inputs.values()),
            output_tensors=tuple(first.outputs), input_data_formats=("NCHW",) * len(first.inputs))
        entry = SimpleNamespace(subgraph=sub, yaml_path=case.path / "deploy.yml")
        graph = optimize(bind_io(graph, entry))
        path = save_graph(graph, workdir / f"{case.name}.qmace")
        session = Session(load_graph(path), backend=backend, num_threads=1)
        for ds in case.data_sets:
            got = session.run(ds.inputs)
            for n, want in ds.outputs.items():
                why = mismatch(n, want, got[n])
                if why:
                    return why
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def select(node_dir: Path, substr: str | None = None) -> dict[str, list[str]]:
    """test name -> ops, for the tests qmace claims and plain ONNX Runtime passes."""
    chosen = {}
    for case in iter_cases(node_dir):
        if substr and substr not in case.name:
            continue
        if qmace_claims(case) and ort_result(case) is None:
            chosen[case.name] = case.ops
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--node-dir", type=Path, default=None, help="default: <cache>/onnx-node-tests/node")
    ap.add_argument("--backend", choices=(*BACKENDS, "both"), default="both")
    ap.add_argument("-k", dest="substr", default=None, help="only tests whose name contains this")
    ap.add_argument("--write-selection", action="store_true", help=f"rewrite {SELECTION_FILE.relative_to(ROOT)}")
    ap.add_argument("--show-failures", action="store_true", help="one line per failing test with the reason")
    args = ap.parse_args(argv)
    node_dir = args.node_dir or default_node_dir()
    if not node_dir.is_dir():
        print(f"onnx_node_tests: error: {node_dir} not found; run python scripts/fetch_assets.py onnx-node-tests",
              file=sys.stderr)
        return 1
    import logging

    logging.disable(logging.WARNING)
    selection = select(node_dir, args.substr)
    if args.write_selection:
        lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(selection.items())]
        SELECTION_FILE.write_text("{\n" + ",\n".join(lines) + "\n}\n")
        print(f"wrote {SELECTION_FILE} ({len(selection)} tests)", file=sys.stderr)
    backends = BACKENDS if args.backend == "both" else (args.backend,)
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            failed = {}
            for case in iter_cases(node_dir, sorted(selection)):
                why = qmace_result(case, backend, Path(tmp))
                if why:
                    failed[case.name] = why
            n = len(selection)
            unexpected = [k for k in failed if (k, backend) not in EXPECTED_FAILURES]
            print(f"{backend}: {n - len(failed)}/{n} passed ({100 * (n - len(failed)) / max(n, 1):.1f}%), "
                  f"{len(unexpected)} unexpected failure(s)")
            if args.show_failures:
                for name, why in failed.items():
                    mark = "" if (name, backend) in EXPECTED_FAILURES else " [unexpected]"
                    print(f"  {backend} {name}{mark}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
