"""Issue 16: a real text recognizer with attention blocks (PaddleOCR PP-OCRv4 rec, from RapidOCR's wheel),
quantized by qmace and by its peers, judged by what it reads.

    python scripts/fetch_assets.py rapidocr ocr-text extra-photos
    python benchmarks/ocr_data.py
    python benchmarks/bench_ocr.py [--threads 1] [--repeats 20] [--schemas int8,int8_w7,uint8]
                                   [--nncf-python PY] [--skip-ort] [--skip-nncf]
                                   [--quantize-args "--sensitivity_16bit 8" ...] [--backends onnxruntime,openvino]

Rows: FP32 (plain ONNX Runtime on the original ONNX: the reference), qmace FP32 (`convert`), `qmace quantize
--schema S` (CLI, calibrated on the calibration lines, run on qmace's onnxruntime backend), ONNX Runtime's
`quantize_static` (QDQ, all defaults, same calibration lines, run in plain ORT) and NNCF's `nncf.quantize` on
the ONNX model (defaults; run through ``--nncf-python``, an interpreter with NNCF installed, e.g. a venv with
``pip install nncf``, then plain ORT).

Per model, over the evaluation lines, against FP32: greedy-CTC decoded strings equal to FP32's (% of lines; the
task metric, ``qmace.metrics.ctc_greedy_decode``), per-timestep argmax agreement, mean cosine of the
(40, 6625) outputs; latency at ``--threads`` in one interleaved run (median ms per line, ratio to FP32); the
convert summary's ops in float (qmace) / the ops left in float (peers: compute nodes without a
DequantizeLinear input). ``qmace run --validate`` with ``validation_outputs_metric: ctc_greedy`` on the
int8 model is also run (count of evaluation lines that pass). ``--backends onnxruntime,openvino`` adds, per
qmace quantized model, a row for the same model file on qmace's openvino backend (``qmace run --backend
openvino``; OpenVINO's own arithmetic, so its accuracy is measured, not assumed) and a row for the original FP32
ONNX in OpenVINO (that backend's float baseline). Nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _load_zoo() -> None:
    """This repository's ``qmace_zoo`` (not installed), without putting the repository first on ``sys.path``:
    ``qmace`` itself then comes from PYTHONPATH, so ``PYTHONPATH=<other worktree>`` measures that qmace."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("qmace_zoo", REPO / "qmace_zoo" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "qmace_zoo")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["qmace_zoo"] = module
    spec.loader.exec_module(module)


_load_zoo()

import qmace  # before benchmarks/common.py, which puts this repository first on sys.path
from qmace_zoo.ocr import (
    LINES_DIR,
    REC_HEIGHT,
    REC_INPUT,
    REC_MODEL,
    REC_OUTPUT,
    REC_TIMESTEPS,
    REC_WIDTH,
    load_inputs,
    load_lines,
    recognizer_charset,
)

try:  # qmace's own decoder; a copy of it when the qmace under test predates it (e.g. PYTHONPATH=<other branch>)
    from qmace.metrics import ctc_greedy_decode
    CTC_SOURCE = "qmace.metrics.ctc_greedy_decode"
except ImportError:  # pragma: no cover - depends on the qmace on the path
    CTC_SOURCE = "the benchmark's copy of ctc_greedy_decode (the qmace on the path has none)"

    def ctc_greedy_decode(probs, blank=0):
        idx = np.asarray(probs).reshape(-1, *np.shape(probs)[-2:]).argmax(-1)
        out = []
        for row in idx:
            keep = np.ones(row.shape, bool)
            keep[1:] = row[1:] != row[:-1]
            out.append(tuple(row[keep & (row != blank)].tolist()))
        return out


# ------------------------------------------------------------------------------------------------- helpers


def qmace_cli(*args: object, threads: int) -> str:
    """One qmace CLI command in a subprocess (the qmace on PYTHONPATH); its stdout. Exits when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "qmace", *map(str, args)]
    # cwd: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=tempfile.gettempdir())
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and args[0] != "run"):
        sys.exit(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def write_yaml(path: Path, model: Path, *, quantize: bool, extra: tuple[str, ...] = (), schema: str = "") -> Path:
    import hashlib

    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    lines = ["library_name: ppocr", "target_abis: [host]", "model_graph_format: file", "model_data_format: file",
             "models:", "  ppocr_rec:", "    platform: onnx", f"    model_file_path: {model}",
             f"    model_sha256_checksum: {sha}", "    runtime: cpu"]
    if quantize:
        lines.append("    quantize: 1")
    if schema:
        lines.append(f"    quantize_schema: {schema}")
    lines += ["    subgraphs:", f"      - input_tensors: [{REC_INPUT}]",
              f"        input_shapes: [1,3,{REC_HEIGHT},{REC_WIDTH}]", "        input_data_formats: [NCHW]",
              "        input_ranges: [-1.0, 1.0]", f"        output_tensors: [{REC_OUTPUT}]",
              f"        output_shapes: [1,{REC_TIMESTEPS},{len(CHARSET)}]", "        output_data_formats: [NONE]",
              *[f"        {e}" for e in extra]]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_inputs(directory: Path, xs: np.ndarray) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(xs):
        x[None].astype(np.float32).tofile(directory / f"{REC_INPUT}_{i:03d}")
    return directory


def ort_plain(model: Path | bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    data = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def run_all(fn, xs: np.ndarray) -> np.ndarray:
    return np.concatenate([fn(xs[i:i + 1]) for i in range(len(xs))])


def float_ops_of_qdq(model_path: Path) -> Counter:
    """Op types of a QDQ ONNX model's compute nodes that read no DequantizeLinear output (= run in float)."""
    import onnx

    m = onnx.load(str(model_path))
    dq_out = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    skip = {"QuantizeLinear", "DequantizeLinear", "Constant", "Shape", "Cast", "Reshape", "Transpose", "Squeeze",
            "Unsqueeze", "Slice", "Concat", "Flatten", "Gather"}
    return Counter(n.op_type for n in m.graph.node if n.op_type not in skip and not any(i in dq_out for i in n.input))


def summary_float_ops(text: str) -> tuple[int, Counter, list[str]]:
    """From a qmace convert/quantize summary: ops in float (count, by type + reason) and 16-bit notes."""
    m = re.search(r"^(\d+) op\(s\) run in float", text, re.MULTILINE)
    by = Counter(f"{t} ({re.sub(r' [(][-0-9.]+ dB[)]$', '', why.strip())})"  # the weight rule's dB: per layer
                 for _, t, why in re.findall(r"^\s+(\S+) \((\w+)\): (.*)$", text, re.MULTILINE))
    notes = [ln.strip() for ln in text.splitlines() if re.search(r"16.?bit|int16|uint16", ln)]
    return (int(m.group(1)) if m else 0), by, notes


def decode(probs: np.ndarray) -> list[str]:
    return ["".join(CHARSET[k] for k in seq) for seq in ctc_greedy_decode(probs)]


def metrics(ref: np.ndarray, got: np.ndarray, kinds: list[str], ref_text: list[str]) -> dict[str, float]:
    got_text = decode(got)
    same = np.array([a == b for a, b in zip(ref_text, got_text)])
    nonempty = np.array([bool(t) for t in ref_text])
    rendered = np.array([k == "rendered" for k in kinds])
    a, b = ref.reshape(len(ref), -1).astype(np.float64), got.reshape(len(got), -1).astype(np.float64)
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"same": 100 * same.mean(), "same_rendered": 100 * same[rendered].mean(),
            "same_photo": 100 * same[~rendered].mean() if (~rendered).any() else float("nan"),
            "same_nonempty": 100 * same[nonempty].mean(),
            "argmax": 100 * float(np.mean(ref.argmax(-1) == got.argmax(-1))),
            "cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "texts": got_text}


def results_table(rows: dict, lat: dict[str, float], base: float, kinds: list[str], ref_text: list[str],
                  threads: int) -> str:
    """The OCR benchmarks' markdown table: per model (``rows``: ``metrics`` of each label), lines decoded as
    FP32's (all, rendered, photographed, FP32 non-empty), per-timestep argmax agreement, cosine, the latency
    ``lat[label]`` in ms per line and its speed-up over ``base`` (FP32's ms)."""
    import common

    hdr = ["model", f"decoded = FP32's, all {len(kinds)} lines", f"rendered ({kinds.count('rendered')})",
           f"photographed ({kinds.count('photographed')})",
           f"lines FP32 reads non-empty ({sum(bool(t) for t in ref_text)})", "per-timestep argmax agreement",
           "mean / min cosine", f"ms per line ({threads} thread)", "speed-up vs FP32"]
    table = [[label, f"{r['same']:.1f}%", f"{r['same_rendered']:.1f}%", f"{r['same_photo']:.1f}%",
              f"{r['same_nonempty']:.1f}%", f"{r['argmax']:.2f}%", f"{r['cos_mean']:.4f} / {r['cos_min']:.4f}",
              f"{lat[label]:.2f}", f"{base / lat[label]:.2f}x"] for label, r in rows.items()]
    return common.md_table(hdr, table)


def vs_reference(graph, xs: np.ndarray, sessions: dict) -> str:
    """How far each backend session's outputs (``sessions``: backend -> ``qmace.runtime.Session`` of
    ``graph``) are from qmace's reference runtime on ``xs`` (calibration lines: this is a check of the
    backend's arithmetic, not an evaluation): max |probability difference|, per-timestep argmax agreement
    and lines decoded alike."""
    from qmace.runtime import Session

    def outputs(s) -> np.ndarray:
        return run_all(lambda x: s.run({REC_INPUT: x})[REC_OUTPUT], xs)

    ref = outputs(Session(graph, backend="reference"))
    ref_text = decode(ref)
    parts = []
    for backend, session in sessions.items():
        got = outputs(session)
        alike = sum(a == b for a, b in zip(decode(got), ref_text))
        parts.append(f"{backend}: max |probability difference| {np.abs(got - ref).max():.4f}, per-timestep argmax "
                     f"agreement {100 * np.mean(got.argmax(-1) == ref.argmax(-1)):.2f}%, {alike} of {len(xs)} "
                     "lines decoded alike")
    return f"vs qmace's reference runtime on the {len(xs)} calibration lines: " + "; ".join(parts)


def constants_as_initializers(path: Path) -> bytes:
    """The model with every ``Constant`` node's tensor moved into the initializers (same graph, same values):
    paddle2onnx writes the recognizer's weights as Constant nodes, and qmace's exact hand-over
    (``int8_weights_as_uint8``) looks for weights among the initializers."""
    import onnx

    m = onnx.load(str(path))
    keep = []
    for n in m.graph.node:
        value = next((a.t for a in n.attribute if a.name == "value"), None)
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and value is not None:
            t = onnx.TensorProto()
            t.CopyFrom(value)
            t.name = n.output[0]
            m.graph.initializer.append(t)
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m.SerializeToString()


def add_peer(sessions: dict, label: str, path: Path, threads: int, openvino: bool = False) -> None:
    """A peer's QDQ model twice: in plain ONNX Runtime (as its users run it; on a CPU without VNNI its u8 x s8
    kernels saturate) and through qmace's exact hand-over (int8 weights as uint8 + 128 where the host
    saturates, ``qmace.runtime.session.ort_session(exact_int8=True)``); with ``openvino`` also the same file in
    OpenVINO (NNCF's own runtime)."""
    from qmace.runtime.session import ort_session, ort_u8s8_exact

    plain = ort_plain(path, threads)
    sessions[label] = lambda x, s=plain: s.run([REC_OUTPUT], {REC_INPUT: x})[0]
    if openvino:
        from qmace.runtime.openvino_backend import OpenVINOSession

        try:
            ov = OpenVINOSession(path.read_bytes(), threads)
            sessions[label + " [OpenVINO]"] = lambda x, s=ov: s.run([REC_OUTPUT], {REC_INPUT: x})[0]
        except Exception as e:  # a peer's failure is a result, not a crash
            print(f"{label}: OpenVINO failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    if ort_u8s8_exact():
        return  # nothing to hand over differently on this host
    try:
        exact = ort_session(constants_as_initializers(path), threads, exact_int8=True)
        sessions[label + ", int8 weights as u8 (exact)"] = lambda x, s=exact: s.run([REC_OUTPUT], {REC_INPUT: x})[0]
    except Exception as e:  # e.g. a kernel ORT lacks for the rewritten types: a result, not a crash
        print(f"{label}: exact hand-over failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)


class Reader:
    """ONNX Runtime's CalibrationDataReader over the calibration inputs."""

    def __init__(self, xs: np.ndarray):
        self.xs, self.i = xs, 0

    def get_next(self):
        if self.i >= len(self.xs):
            return None
        self.i += 1
        return {REC_INPUT: self.xs[self.i - 1:self.i]}

    def rewind(self):
        self.i = 0


# ---------------------------------------------------------------------------------------- NNCF (child)


def nncf_child(model: str, calib: str, out: str, variant: str = "") -> int:
    """Run inside the NNCF interpreter: ``nncf.quantize`` (defaults; ``variant == "transformer"``:
    ``model_type=ModelType.TRANSFORMER``) of the ONNX model on the calibration inputs (.npy, (N, 3, 48, 320)),
    saved to ``out`` (NNCF's default subset_size, 300, covers all the calibration lines)."""
    import nncf
    import onnx

    xs = np.load(calib)
    m = onnx.load(model)
    extra = {"model_type": nncf.ModelType.TRANSFORMER} if variant == "transformer" else {}
    q = nncf.quantize(m, nncf.Dataset([{REC_INPUT: xs[i:i + 1]} for i in range(len(xs))]), **extra)
    onnx.save(q, out)
    print(f"nncf {nncf.__version__}")
    return 0


# ---------------------------------------------------------------------------------------------------- main


CHARSET: list[str] = []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20, help="interleaved latency rounds (default 20)")
    ap.add_argument("--schemas", default="int8,int8_w7,uint8")
    ap.add_argument("--nncf-python", default=os.environ.get("QMACE_NNCF_PYTHON", ""),
                    help="interpreter with NNCF installed, e.g. a venv's bin/python (default: $QMACE_NNCF_PYTHON; "
                         "none: NNCF skipped)")
    ap.add_argument("--skip-ort", action="store_true", help="skip ONNX Runtime's quantize_static")
    ap.add_argument("--skip-nncf", action="store_true")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--float-nodes", default="",
                    help="also run each schema with `qmace quantize --float_nodes` of these (diagnosis rows)")
    ap.add_argument("--quantize-args", action="append", default=[],
                    help="extra `qmace quantize` options for the schemas' rows, e.g. '--sensitivity_16bit 8 "
                         "--adaround'; repeat for several configurations (each one row per schema)")
    ap.add_argument("--yaml-quantize-schema", default="", help="the quantized rows' YAML quantize_schema (e.g. "
                    "mace_htp_u16a_s8w: every activation uint16); `--schema` on the command line still sets the "
                    "weights' schema")
    ap.add_argument("--backends", default="onnxruntime",
                    help="qmace backends the quantized rows run on: onnxruntime (default) and/or openvino (adds "
                         "FP32 in OpenVINO too)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the built models in this folder")
    ap.add_argument("--nncf-transformer", action="store_true",
                    help="also NNCF with model_type=TRANSFORMER (its setting for attention models)")
    ap.add_argument("--nncf-child", nargs="+", metavar="ARG", help=argparse.SUPPRESS)  # MODEL CALIB OUT [VARIANT]
    a = ap.parse_args(argv)
    if a.nncf_child:
        return nncf_child(*a.nncf_child)
    backends = [b for b in a.backends.split(",") if b]
    if not backends or set(backends) - {"onnxruntime", "openvino"}:
        ap.error(f"--backends: onnxruntime and/or openvino, not {a.backends!r}")

    from qmace.modelfile import load_graph
    from qmace.runtime import Session
    from qmace_zoo import default_cache

    t_start = time.perf_counter()
    T = a.threads
    cache = (a.cache or default_cache()).expanduser()
    rec = cache / "rapidocr" / REC_MODEL
    if not rec.is_file():
        sys.exit(f"{rec} missing: run scripts/fetch_assets.py rapidocr ocr-text extra-photos")
    root = cache / LINES_DIR
    lines = load_lines(root)
    CHARSET[:] = recognizer_charset(rec)
    calib = [ln for ln in lines if ln.split == "calib"]
    evals = [ln for ln in lines if ln.split == "eval"]
    xc, xe = load_inputs(root, calib), load_inputs(root, evals)
    kinds = [ln.kind for ln in evals]
    print(f"qmace from {Path(qmace.__file__).parent}; {len(calib)} calibration lines, {len(evals)} evaluation "
          f"lines ({kinds.count('rendered')} rendered, {kinds.count('photographed')} photographed); CTC decoding: "
          f"{CTC_SOURCE}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench_ocr."))
    calib_dir = write_inputs(tmp / "calib", xc)
    eval_dir = write_inputs(tmp / "eval", xe)

    fp32 = ort_plain(rec, T)
    ref = run_all(lambda x: fp32.run([REC_OUTPUT], {REC_INPUT: x})[0], xe)
    ref_text = decode(ref)
    print(f"FP32 reads {sum(bool(t) for t in ref_text)} of {len(evals)} evaluation lines as non-empty; exact "
          f"rendered phrase on {sum(t == ln.text for t, ln in zip(ref_text, evals) if ln.kind == 'rendered')} of "
          f"{kinds.count('rendered')} rendered lines ({time.perf_counter() - t_start:.0f} s)", flush=True)

    sessions: dict[str, object] = {"FP32 (ONNX Runtime, original model)": lambda x: fp32.run([REC_OUTPUT],
                                                                                          {REC_INPUT: x})[0]}
    if "openvino" in backends:
        from qmace.runtime.openvino_backend import OpenVINOSession

        ov32 = OpenVINOSession(rec.read_bytes(), T)
        sessions["FP32 (OpenVINO, original model)"] = lambda x: ov32.run([REC_OUTPUT], {REC_INPUT: x})[0]
    rows: dict[str, dict] = {}
    notes: dict[str, str] = {}

    # qmace FP32 and quantized (CLI, as a user runs it)
    y32 = write_yaml(tmp / "fp32.yml", rec, quantize=False)
    out = qmace_cli("convert", "--config", y32, "--build_dir", tmp / "b32", threads=T)
    g32 = load_graph(next((tmp / "b32").rglob("*.qmace")))
    s32 = Session(g32, backend="onnxruntime", num_threads=T)
    sessions["qmace FP32 (convert)"] = lambda x, s=s32: s.run({REC_INPUT: x})[REC_OUTPUT]
    notes["qmace FP32 (convert)"] = "0 ops in float"
    from qmace.config import VALIDATION_METRICS

    ctc_yaml = "ctc_greedy" in VALIDATION_METRICS
    validate_note = ""
    runs = [(s, "", q) for s in a.schemas.split(",") if s for q in (a.quantize_args or [""])]
    runs += [(s, a.float_nodes, "") for s in a.schemas.split(",") if s and a.float_nodes]
    for run_i, (schema, float_nodes, qargs) in enumerate(runs):
        label = ((f"quantize_schema: {a.yaml_quantize_schema}, " if a.yaml_quantize_schema else "")
                 + f"qmace quantize --schema {schema}" + (f" --float_nodes {float_nodes}" if float_nodes else "")
                 + (f" {qargs}" if qargs else ""))
        tag = schema + ("_float" if float_nodes else "") + (f"_q{run_i}" if qargs else "")
        yq = write_yaml(tmp / f"q_{tag}.yml", rec, quantize=True, schema=a.yaml_quantize_schema,
                        extra=("validation_outputs_metric: ctc_greedy",) if ctc_yaml else ())
        bq = tmp / f"b_{tag}"
        t0 = time.perf_counter()
        out = qmace_cli("quantize", "--config", yq, "--build_dir", bq, "--input_dir", calib_dir, "--schema", schema,
                        "--num_threads", T, *(["--float_nodes", float_nodes] if float_nodes else []), *qargs.split(),
                        threads=T)
        n_float, by, bit16 = summary_float_ops(out)
        notes[label] = (f"{n_float} ops in float: " + ", ".join(f"{k} x{v}" for k, v in sorted(by.items()))
                        + ("; " + "; ".join(bit16) if bit16 else ""))
        print(f"{label}: {time.perf_counter() - t0:.0f} s; {notes[label]}", flush=True)
        gq = load_graph(next(bq.rglob("*.qmace")))
        by_backend = {backend: Session(gq, backend=backend, num_threads=T) for backend in backends}
        if "openvino" in backends:
            print(vs_reference(gq, xc, by_backend), flush=True)
        for backend, sq in by_backend.items():
            row = label if backend == "onnxruntime" else f"{label} [openvino backend]"
            sessions[row] = lambda x, s=sq: s.run({REC_INPUT: x})[REC_OUTPUT]
        if schema == "int8" and not float_nodes and ctc_yaml and run_i == 0:
            text = qmace_cli("run", "--config", yq, "--build_dir", bq, "--input_dir", eval_dir, "--validate",
                             "--num_threads", T, threads=T)
            fails = sum(1 for ln in text.splitlines() if ln.rstrip().endswith("FAIL"))
            checks = sum(1 for ln in text.splitlines() if "ctc_greedy>=" in ln)
            validate_note = (f"`qmace run --validate` of the int8 model with `validation_outputs_metric: "
                             f"ctc_greedy` (threshold 1.0: the line's decoding equals the source model's in ORT): "
                             f"{checks - fails} of {checks} evaluation lines pass, exit code "
                             f"{'0' if fails == 0 else '1'}.")
            print(validate_note, flush=True)

    # ONNX Runtime quantize_static, defaults
    if not a.skip_ort:
        from onnxruntime.quantization import quantize_static

        label = "ORT quantize_static (QDQ, defaults)"
        ort_path = tmp / "ort_qdq.onnx"
        t0 = time.perf_counter()
        try:
            quantize_static(str(rec), str(ort_path), Reader(xc))
            add_peer(sessions, label, ort_path, T, "openvino" in backends)
            fo = float_ops_of_qdq(ort_path)
            notes[label] = (f"{sum(fo.values())} compute nodes without a DequantizeLinear input: "
                            + ", ".join(f"{k} x{v}" for k, v in sorted(fo.items())))
        except Exception as e:  # a peer's failure is a result, not a crash
            notes[label] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(f"{label}: {time.perf_counter() - t0:.0f} s; {notes[label]}", flush=True)

    # NNCF, defaults, in its own interpreter
    variants = [("", "defaults")] + ([("transformer", "model_type=TRANSFORMER")] if a.nncf_transformer else [])
    for variant, what in variants if a.nncf_python and not a.skip_nncf else []:
        label = f"NNCF quantize (ONNX, {what})"
        np.save(tmp / "calib.npy", xc)
        nn_path = tmp / f"nncf{variant}.onnx"
        t0 = time.perf_counter()
        proc = subprocess.run([a.nncf_python, __file__, "--nncf-child", str(rec), str(tmp / "calib.npy"),
                               str(nn_path), variant], capture_output=True, text=True, check=False,
                              env=dict(os.environ, OMP_NUM_THREADS=str(T)))
        if proc.returncode == 0:
            add_peer(sessions, label, nn_path, T, "openvino" in backends)
            fo = float_ops_of_qdq(nn_path)
            notes[label] = (proc.stdout.strip().splitlines()[-1] + f"; {sum(fo.values())} compute nodes without a "
                            "DequantizeLinear input: " + ", ".join(f"{k} x{v}" for k, v in sorted(fo.items())))
        else:
            notes[label] = "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        print(f"{label}: {time.perf_counter() - t0:.0f} s; {notes[label]}", flush=True)

    # accuracy
    for label, fn in sessions.items():
        got = ref if label == "FP32 (ONNX Runtime, original model)" else run_all(fn, xe)
        rows[label] = metrics(ref, got, kinds, ref_text)
        r = rows[label]
        print(f"{label}: same string {r['same']:.1f}% argmax {r['argmax']:.2f}% cos {r['cos_mean']:.5f}", flush=True)

    # latency, one interleaved run
    import common

    x1 = xe[:1]
    lat = common.interleaved_medians({k: (lambda fn=fn: fn(x1)) for k, fn in sessions.items()}, repeats=a.repeats)
    base = lat["FP32 (ONNX Runtime, original model)"]

    n = len(evals)
    print("\n## PP-OCRv4 recognizer (RapidOCR), rendered + photographed text lines\n")
    print("Command: `python benchmarks/bench_ocr.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`"
          + f" with qmace from `{Path(qmace.__file__).parent.parent}`\n")
    print(results_table(rows, lat, base, kinds, ref_text, T))
    print("\nOps in float / quantization notes:\n")
    for label, note in notes.items():
        print(f"- {label}: {note}")
    if validate_note:
        print("\n" + validate_note)
    print("\nExamples where a quantized model reads differently (FP32 -> model):\n")
    for label, r in rows.items():
        if label.startswith(("FP32", "qmace FP32")):
            continue
        diff = [(ref_text[i], r["texts"][i]) for i in range(n) if ref_text[i] != r["texts"][i]][:4]
        print(f"- {label}: " + "; ".join(f"`{a}` -> `{b}`" for a, b in diff))
    print(f"\n{common.machine_note()}; run time {time.perf_counter() - t_start:.0f} s")
    import shutil

    if a.keep is not None:
        a.keep.mkdir(parents=True, exist_ok=True)
        for f in [*tmp.glob("*.onnx"), *tmp.rglob("*.qmace")]:
            shutil.copy(f, a.keep / (f.name if f.suffix == ".onnx" else f"{f.parent.parent.parent.name}.qmace"))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
