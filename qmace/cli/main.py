"""The ``qmace`` command line: MACE's verbs and flags on top of ``qmace.api``.

Expected errors (bad files, bad keys, unsupported models) print one line to stderr and exit 2; a failed
validation exits 1. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

import numpy as np

from qmace.errors import QmaceError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str, *aliases: str):
    def deco(fn):
        for n in (name, *aliases):
            COMMANDS[n] = fn
        return fn

    return deco


def _flag(p: argparse.ArgumentParser, name: str, **kw) -> None:
    """MACE spells flags with underscores; accept the dashed spelling too."""
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    p.add_argument(*names, dest=name, **kw)


def _common(p: argparse.ArgumentParser) -> None:
    _flag(p, "config", required=True, help="MACE deployment YAML")
    _flag(p, "model_name", default=None, help="model in the YAML (default: the first)")
    _flag(p, "build_dir", default=None, help="root of the build tree (default: ./build)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qmace", description="MACE-compatible converter, 8-bit quantizer and CPU runtime")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert the YAML's model (quantized when quantize: 1)")
    _common(p)

    p = sub.add_parser("run", help="run the converted model")
    _common(p)
    _flag(p, "round", type=int, default=1, help="runs per sample")
    _flag(p, "validate", action="store_true", help="compare with the source model run by its own framework (ONNX Runtime for ONNX)")
    _flag(p, "input_dir", default=None, help="input samples (MACE file naming; raw float32 or .npy)")
    _flag(p, "output_dir", default=None, help="write outputs here (raw float32 and .npy)")
    _flag(p, "benchmark", action="store_true", help="latency percentiles (and per-op times on the reference backend)")
    _flag(p, "num_threads", type=int, default=None)
    _flag(p, "example", action="store_true", help="accepted for MACE compatibility: runs the model")
    _flag(p, "quantize_stat", action="store_true", help="print MACE's range log of every op output")
    _flag(p, "backend", choices=["onnxruntime", "reference"], default="onnxruntime")

    for name in ("quantize-stat", "quantize_stat"):
        p = sub.add_parser(name, help="range log -> range file (MACE's quantize_stat.py)")
        _flag(p, "log_file", required=True)
        _flag(p, "percentile", type=float, default=0.0)
        _flag(p, "enhance", action="store_true")
        _flag(p, "enhance_ratio", type=float, default=10.0)
        _flag(p, "output", default=None, help="write the range file here (default: stdout)")

    p = sub.add_parser("quantize", help="one-shot: statistics + ranges + quantized model")
    _common(p)
    _flag(p, "input_dir", required=True)
    _flag(p, "percentile", type=float, default=None, help="MACE percentile over per-sample extrema (default 0)")
    _flag(p, "method", default="mace", choices=["mace", "percentile", "entropy", "mse"])
    _flag(p, "enhance", action="store_true")
    _flag(p, "enhance_ratio", type=float, default=10.0)
    _flag(p, "schema", default=None, choices=["uint8", "int8"], help="override the YAML's quantize_schema")
    _flag(p, "range_file", default=None, help="where to write the ranges used (default: beside the model)")
    _flag(p, "no_bias_correction", action="store_true", help="skip correcting biases for weight rounding")
    _flag(p, "adaround", action="store_true",
          help="choose weight rounding by output reconstruction (AdaRound) + bias correction; slower")
    _flag(p, "no_equalization", action="store_true",
          help="skip rescaling activation channels (equalization) before choosing ranges")
    _flag(p, "float_nodes", default="", help="comma-separated node names or op types to keep in float")
    _flag(p, "num_threads", type=int, default=None)

    p = sub.add_parser("export", help="export the converted model as standard ONNX")
    _common(p)
    _flag(p, "format", default="onnx-qdq", choices=["onnx-qdq", "onnx"])
    p.add_argument("-o", "--output", required=True)

    p = sub.add_parser("qat", help="quantization-aware fine-tuning (needs qmace[qat])")
    _common(p)
    _flag(p, "train_dir", required=True)
    _flag(p, "labels", default=None)
    _flag(p, "epochs", type=int, default=1)
    _flag(p, "lr", type=float, default=1e-5)
    _flag(p, "batch_size", type=int, default=16)
    _flag(p, "output_dir", default=None)
    _flag(p, "no_equalization", action="store_true",
          help="skip rescaling activation channels (equalization) before the initial calibration")
    _flag(p, "range_lr", type=float, default=None, help="learning rate of the LSQ ranges (default: --lr)")
    _flag(p, "lr_schedule", default="cosine", choices=["cosine", "constant"])
    _flag(p, "warmup", type=float, default=0.0, help="share of the steps with linear learning-rate warm-up")
    _flag(p, "val_dir", default=None, help="validation samples: the quantized model is scored after every epoch")
    _flag(p, "val_labels", default=None, help="labels of --val_dir (needed with --labels)")
    _flag(p, "patience", type=int, default=None,
          help="stop after this many epochs without a better validation score (needs --val_dir)")
    _flag(p, "device", default="cpu", help="cpu or cuda (one GPU per process)")
    _flag(p, "nproc", type=int, default=1,
          help="data-parallel processes on this machine (torch.distributed; several machines: torchrun)")
    _flag(p, "workers", type=int, default=0, help="DataLoader worker processes per training process")
    _flag(p, "resume", action="store_true", help="continue from the checkpoint in the output directory")
    _flag(p, "seed", type=int, default=0, help="seed of the data order")
    _flag(p, "threads", type=int, default=None, help="torch threads per process")
    return ap


def _progress(it, total=None, desc="samples", unit="sample"):
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=None)


@command("convert")
def cmd_convert(a: argparse.Namespace) -> int:
    from qmace.api import convert

    res = convert(a.config, model_name=a.model_name, build_dir=a.build_dir)
    print(res.summary())
    print(f"model file: {res.path}")
    return 0


def _print_run_report(rep, benchmark: bool) -> None:
    if benchmark or rep.latencies_ms:
        pct = rep.latency_percentiles()
        print(f"{rep.backend}: {rep.samples} sample(s), {len(rep.latencies_ms)} run(s), latency ms: "
              + ", ".join(f"{k} {v:.3f}" for k, v in pct.items()))
    if rep.op_times_ms:
        by_type: dict[str, float] = {}
        for node, ms in rep.op_times_ms.items():
            by_type[rep.op_types[node]] = by_type.get(rep.op_types[node], 0.0) + ms
        total = sum(by_type.values()) or 1.0
        print("per-op time (reference backend, ms per run):")
        for op, ms in sorted(by_type.items(), key=lambda kv: -kv[1]):
            print(f"  {op:<24} {ms:9.3f}  {100 * ms / total:5.1f}%")
        print("slowest nodes:")
        for node, ms in sorted(rep.op_times_ms.items(), key=lambda kv: -kv[1])[:10]:
            print(f"  {node:<40} {rep.op_types[node]:<16} {ms:9.3f}")
    if rep.checks:
        print(f"validation against {rep.oracle} (threshold: cosine >= {rep.threshold}):")
        print(f"  {'sample':<16} {'output':<24} {'cosine':>10} {'SQNR dB':>9} {'max abs err':>12} {'argmax':>7}")
        for c in rep.checks:
            cmp = c.comparison
            ok = "" if cmp.passes(rep.threshold) else "  FAIL"
            print(f"  {c.sample or '-':<16} {c.output:<24} {cmp.cosine:10.6f} {cmp.sqnr_db:9.2f} "
                  f"{cmp.max_abs_error:12.4g} {cmp.argmax_agreement:7.1%}{ok}")
        print("validation " + ("passed" if rep.passed else "FAILED"))


@command("run")
def cmd_run(a: argparse.Namespace) -> int:
    from qmace.api import run

    on_tensor = None
    if a.quantize_stat:
        from qmace.quantize.ranges import format_range_log_line

        def on_tensor(sample: str, name: str, value: np.ndarray) -> None:
            if value.size and np.issubdtype(value.dtype, np.floating):
                print(format_range_log_line(name, float(value.min()), float(value.max())))

    rep = run(
        a.config, model_name=a.model_name, build_dir=a.build_dir, backend=a.backend, input_dir=a.input_dir,
        output_dir=a.output_dir, rounds=a.round, validate=a.validate, benchmark=a.benchmark,
        num_threads=a.num_threads, on_tensor=on_tensor, progress=_progress,
    )
    if a.quantize_stat:
        return 0 if rep.passed else 1
    _print_run_report(rep, a.benchmark)
    if rep.outputs_written:
        print(f"wrote {len(rep.outputs_written)} output file(s) to {a.output_dir}")
    return 0 if rep.passed else 1


@command("quantize-stat", "quantize_stat")
def cmd_quantize_stat(a: argparse.Namespace) -> int:
    from pathlib import Path

    from qmace.errors import RangeError
    from qmace.quantize.ranges import format_range_file, parse_range_log, quantize_stat, write_range_file

    path = Path(a.log_file)
    if not path.is_file():
        raise RangeError(f"{path}: range log not found")
    with open(path, encoding="utf-8", errors="replace") as f:
        log_ = parse_range_log(f, str(path))
    table = quantize_stat(log_, percentile=a.percentile, enhance=a.enhance, enhance_ratio=a.enhance_ratio)
    if a.output:
        write_range_file(a.output, table)
        print(f"wrote {len(table)} ranges to {a.output}", file=sys.stderr)
    else:
        sys.stdout.write(format_range_file(table))
    return 0


@command("quantize")
def cmd_quantize(a: argparse.Namespace) -> int:
    from qmace.quantize.api import quantize_one_shot

    res = quantize_one_shot(
        a.config, input_dir=a.input_dir, model_name=a.model_name, build_dir=a.build_dir, method=a.method,
        percentile=a.percentile, enhance=a.enhance, enhance_ratio=a.enhance_ratio, schema=a.schema,
        range_file=a.range_file, num_threads=a.num_threads, bias_correction=not a.no_bias_correction,
        adaround=a.adaround, equalize=not a.no_equalization,
        float_nodes={x for x in a.float_nodes.split(",") if x}, progress=_progress,
    )
    print(res.convert.summary())
    print(f"model file: {res.convert.path}")
    print(f"range file: {res.range_file}")
    if res.convert.graph.metadata["quantization"].get("equalized_tensors"):
        print("note: the range file holds the ranges of the activation-equalized model this command built; "
              "for `convert` with this file on the original model, rerun with --no_equalization")
    return 0


@command("export")
def cmd_export(a: argparse.Namespace) -> int:
    from qmace.quantize.api import export

    path = export(a.config, a.output, model_name=a.model_name, build_dir=a.build_dir, fmt=a.format)
    print(f"wrote {path}")
    return 0


@command("qat")
def cmd_qat(a: argparse.Namespace) -> int:
    from qmace.cli.qat import qat_command

    return qat_command(a, progress=_progress)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="qmace: %(levelname)s: %(message)s")
    try:
        return COMMANDS[a.command](a)
    except QmaceError as e:
        if a.debug:
            raise
        print(f"qmace: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qmace: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `qmace ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except Exception as e:  # an internal error: one line unless --debug
        if a.debug:
            raise
        print(f"qmace: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
