"""The ``qmace`` command line: MACE's verbs and flags on top of ``qmace.api``.

Expected errors (bad files, bad keys, unsupported models) print one line to stderr and exit 2; a failed
validation exits 1. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable

import numpy as np

from qmace.cli.report import print_backend_comparison, print_run_report
from qmace.errors import QmaceError
from qmace.qmath import SCHEMAS
from qmace.quantize.ranges import DEFAULT_ENHANCE_RATIO

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str, *aliases: str):
    """Register the decorated ``cmd_*`` function in ``COMMANDS`` under ``name`` and each alias.

    Args:
        name: the subcommand as typed (``quantize-stat``).
        *aliases: further spellings of the same subcommand (``quantize_stat``).

    Returns:
        The decorator; it returns the function unchanged.
    """
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
    _flag(p, "config", required=True, help="MACE deployment YAML (docs/deployment-yaml.md)")
    _flag(p, "model_name", default=None, help="model in the YAML (default: the first)")
    _flag(p, "build_dir", default=None, help="root of the build tree (default: ./build)")


def build_parser() -> argparse.ArgumentParser:
    """The ``qmace`` argument parser: global flags and one subparser per command (MACE's flag spellings,
    dashed forms accepted too).

    Returns:
        The parser; ``parse_args`` leaves the subcommand in ``.command``.
    """
    ap = argparse.ArgumentParser(prog="qmace", description="MACE-compatible converter, 8-bit quantizer and CPU runtime")
    from qmace import __version__

    ap.add_argument("--version", action="version", version=f"qmace {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("--memory_budget", "--memory-budget", default=None, metavar="SIZE",
                    help="largest tensor an input may declare (bytes, or 512M, 4G, ...; default 4G or "
                         "$QMACE_MEMORY_BUDGET); larger ones are refused with a named error")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert the YAML's model (quantized when quantize: 1)")
    _common(p)

    p = sub.add_parser("run", help="run the converted model")
    _common(p)
    _flag(p, "round", type=int, default=1, help="runs per sample (default 1; latency is measured on every run)")
    _flag(p, "validate", action="store_true", help="compare with the source model run by its own framework (ONNX Runtime for ONNX)")
    _flag(p, "input_dir", default=None,
          help="input samples: files <input name><suffix> (non-alphanumerics of the name as '_'), raw float32 "
               "in the YAML's data format, or .npy; default: one random sample from input_ranges")
    _flag(p, "output_dir", default=None, help="write outputs here: <output name><suffix> raw float32, plus .npy")
    _flag(p, "benchmark", action="store_true", help="latency percentiles (and per-op times on the reference backend)")
    _flag(p, "num_threads", type=int, default=None, help="intra-op threads (>= 1; default: the runtime's choice)")
    _flag(p, "example", action="store_true", help="accepted for MACE compatibility: runs the model")
    _flag(p, "quantize_stat", action="store_true",
          help="print MACE's range log of every op output to stdout (for quantize-stat); use with --input_dir")
    _flag(p, "backend", type=_backends, default=["onnxruntime"],
          help="onnxruntime (default), openvino (pip install 'qmace[openvino]') or reference; a comma list "
               "(e.g. onnxruntime,openvino) runs them in turn on every sample and compares latency and outputs")

    p = sub.add_parser("quantize-stat", aliases=["quantize_stat"],
                       help="range log -> range file (MACE's quantize_stat.py)")
    _flag(p, "log_file", required=True, help="range log written by `qmace run --quantize_stat` (or MACE)")
    _flag(p, "percentile", type=float, default=0.0,
          help="drop this percentile of per-sample minima/maxima at each end, in [0, 50) (default 0: min/max)")
    _flag(p, "enhance", action="store_true", help="MACE's outlier walk: narrow ranges past isolated extrema")
    _flag(p, "enhance_ratio", type=float, default=DEFAULT_ENHANCE_RATIO,
          help=f"--enhance's outlier ratio (default {DEFAULT_ENHANCE_RATIO:g}, > 0)")
    _flag(p, "output", default=None, help="write the range file here (default: stdout)")

    p = sub.add_parser("quantize", help="one-shot: statistics + ranges + quantized model")
    _common(p)
    _flag(p, "input_dir", required=True, help="calibration samples (same naming as run --input_dir)")
    _flag(p, "percentile", type=float, default=None, help="MACE percentile over per-sample extrema (default 0)")
    _flag(p, "method", default="mace", choices=["mace", "percentile", "entropy", "mse"],
          help="range method: mace (per-sample extrema, as MACE), percentile / entropy / mse (histograms); "
               "see docs/quantization.md")
    _flag(p, "enhance", action="store_true", help="with --method mace: MACE's outlier walk")
    _flag(p, "enhance_ratio", type=float, default=DEFAULT_ENHANCE_RATIO,
          help=f"--enhance's outlier ratio (default {DEFAULT_ENHANCE_RATIO:g})")
    _flag(p, "schema", default=None, choices=list(SCHEMAS), help="override the YAML's quantize_schema")
    _flag(p, "range_file", default=None, help="where to write the ranges used (default: beside the model)")
    _flag(p, "no_bias_correction", action="store_true", help="skip correcting biases for weight rounding")
    _flag(p, "adaround", action="store_true",
          help="choose weight rounding by output reconstruction (AdaRound) + bias correction; slower")
    _flag(p, "no_equalization", action="store_true",
          help="skip rescaling activation channels (equalization) before choosing ranges")
    _mixed_precision_flags(p)
    _flag(p, "num_threads", type=int, default=None, help="intra-op threads for calibration (>= 1)")

    p = sub.add_parser("export", help="export the converted model as standard ONNX")
    _common(p)
    _flag(p, "format", default="onnx-qdq", choices=["onnx-qdq", "onnx"],
          help="onnx-qdq: QuantizeLinear/DequantizeLinear around integer ops (needs a quantized model; "
               "default); onnx: whatever the model is, float ops as float")
    p.add_argument("-o", "--output", required=True, help="the ONNX file to write")

    p = sub.add_parser("qat", help="quantization-aware fine-tuning (needs qmace[qat])")
    _common(p)
    _flag(p, "train_dir", required=True, help="training samples (same naming as run --input_dir)")
    _mixed_precision_flags(p)
    _flag(p, "labels", default=None,
          help="labels file: one integer per line in sample order, or '<sample> <label>' lines; "
               "default: distillation from the float model")
    _flag(p, "distill", default="softmax",
          help="the loss without --labels: softmax (KL of each output's class distribution; default) or sigmoid "
               "(per-element KL of probability maps, e.g. a segmentation mask: every output must be a Sigmoid's)")
    _flag(p, "epochs", type=int, default=1, help="passes over the training samples (>= 0; default 1)")
    _flag(p, "lr", type=float, default=1e-5, help="Adam learning rate (> 0; default 1e-5)")
    _flag(p, "batch_size", type=int, default=16, help="samples per step (>= 1; default 16)")
    _flag(p, "output_dir", default=None,
          help="where the fine-tuned ONNX, range file, checkpoint and YAML go (default: "
               "<build_dir>/<library_name>/qat)")
    _flag(p, "no_equalization", action="store_true",
          help="skip rescaling activation channels (equalization) before the initial calibration")
    _flag(p, "range_lr", type=float, default=None, help="learning rate of the LSQ ranges (default: --lr)")
    _flag(p, "freeze_below", type=float, default=0.0,
          help="keep weight tensors whose largest magnitude is below this fixed (default 0: train all; Adam "
               "moves each weight by about --lr per step, too much for a layer of tiny weights)")
    _flag(p, "lr_schedule", default="cosine", choices=["cosine", "constant"],
          help="learning-rate schedule after the warm-up: cosine decay to 0 (default) or constant")
    _flag(p, "warmup", type=float, default=0.0, help="share of the steps with linear learning-rate warm-up")
    _flag(p, "val_dir", default=None, help="validation samples: the quantized model is scored after every epoch")
    _flag(p, "val_labels", default=None, help="labels of --val_dir (needed with --labels)")
    _flag(p, "patience", type=int, default=None,
          help="stop after this many epochs without a better validation score (needs --val_dir)")
    _flag(p, "gate_alpha", default="0.05", help="significance gate level (default 0.05) or off")
    _flag(p, "device", default="cpu", help="cpu or cuda (one GPU per process)")
    _flag(p, "nproc", type=int, default=1,
          help="data-parallel processes on this machine (torch.distributed; several machines: torchrun)")
    _flag(p, "workers", type=int, default=0, help="DataLoader worker processes per training process")
    _flag(p, "resume", action="store_true", help="continue from the checkpoint in the output directory")
    _flag(p, "seed", type=int, default=0, help="seed of the data order")
    _flag(p, "threads", type=int, default=None, help="torch threads per process")
    return ap


def _mixed_precision_flags(p: argparse.ArgumentParser) -> None:
    """What stays float or gets 16-bit codes: the same flags for ``quantize`` and for ``qat``'s PTQ start."""
    _flag(p, "float_nodes", default="", help="comma-separated node names or op types to keep in float")
    _flag(p, "sensitivity_16bit", type=int, default=0, metavar="N", help="uint16 codes for the N activations "
          "whose 8-bit rounding alone costs most output SQNR on calibration samples (docs/quantization.md)")
    _flag(p, "sensitivity_float_layers", type=int, default=0, metavar="N", help="keep in float the N layers whose "
          "int8/uint8 weights alone cost most output SQNR on calibration samples (docs/quantization.md)")
    _flag(p, "sensitivity_samples", type=int, default=8, help="samples the sensitivity rules measure (default 8)")


def _backends(text: str) -> list[str]:
    from qmace.runtime.session import BACKENDS

    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in BACKENDS]
    if bad or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct names from {', '.join(BACKENDS)}")
    return names


def _progress(it, total=None, desc="samples", unit="sample"):
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=None)


@command("convert")
def cmd_convert(a: argparse.Namespace) -> int:
    """``qmace convert``: convert (and quantize, with ``quantize: 1``) the YAML's model; print its summary.

    Args:
        a: the parsed command line (:func:`build_parser`).

    Returns:
        0.

    Raises:
        QmaceError: bad YAML, model or ranges (a subclass naming the file and key/node).
    """
    from qmace.api import convert

    res = convert(a.config, model_name=a.model_name, build_dir=a.build_dir)
    print(res.summary())
    print(f"model file: {res.path}")
    return 0


@command("run")
def cmd_run(a: argparse.Namespace) -> int:
    """``qmace run``: run the converted model on the inputs (one or several backends), optionally validate
    it against the framework oracle, benchmark it or log tensor ranges (``--quantize_stat``).

    Args:
        a: the parsed command line (:func:`build_parser`).

    Returns:
        0 when validation passed (or was not asked for), 1 when it failed.

    Raises:
        QmaceError: several ``--backend`` with ``--quantize_stat``/``--output_dir``, or bad inputs/model.
    """
    from qmace.api import run

    on_tensor = None
    if a.quantize_stat:
        from qmace.quantize.ranges import format_range_log_line

        def on_tensor(sample: str, name: str, value: np.ndarray) -> None:
            if value.size and np.issubdtype(value.dtype, np.floating):
                print(format_range_log_line(name, float(value.min()), float(value.max())))

    if len(a.backend) > 1:
        from qmace.api import run_backends

        if a.quantize_stat or a.output_dir:
            raise QmaceError("--quantize_stat and --output_dir take one --backend")
        cmp = run_backends(a.config, a.backend, model_name=a.model_name, build_dir=a.build_dir,
                           input_dir=a.input_dir, rounds=a.round, validate=a.validate, num_threads=a.num_threads,
                           progress=_progress)
        print_backend_comparison(cmp)
        return 0 if all(r.passed for r in cmp.reports) else 1
    rep = run(
        a.config, model_name=a.model_name, build_dir=a.build_dir, backend=a.backend[0], input_dir=a.input_dir,
        output_dir=a.output_dir, rounds=a.round, validate=a.validate, benchmark=a.benchmark,
        num_threads=a.num_threads, on_tensor=on_tensor, progress=_progress,
    )
    if a.quantize_stat:
        return 0 if rep.passed else 1
    print_run_report(rep, a.benchmark)
    if rep.outputs_written:
        print(f"wrote {len(rep.outputs_written)} output file(s) to {a.output_dir}")
    return 0 if rep.passed else 1


@command("quantize-stat", "quantize_stat")
def cmd_quantize_stat(a: argparse.Namespace) -> int:
    """``qmace quantize-stat``: reduce a ``run --quantize_stat`` range log to a range file (per-tensor
    min/max, or the ``--percentile`` of the logged values, optionally enhanced).

    Args:
        a: the parsed command line (:func:`build_parser`).

    Returns:
        0.

    Raises:
        RangeError: the log is missing, unreadable or malformed (the message names the file).
    """
    from pathlib import Path

    from qmace.errors import RangeError
    from qmace.quantize.ranges import format_range_file, parse_range_log, quantize_stat, write_range_file

    path = Path(a.log_file)
    if not path.is_file():
        raise RangeError(f"{path}: range log not found")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            log_ = parse_range_log(f, str(path))
    except OSError as e:
        raise RangeError(f"{path}: cannot read range log: {e.strerror or e}") from None
    try:
        table = quantize_stat(log_, percentile=a.percentile, enhance=a.enhance, enhance_ratio=a.enhance_ratio)
    except RangeError as e:
        raise RangeError(f"{path}: {e}") from None
    if a.output:
        write_range_file(a.output, table)
        print(f"wrote {len(table)} ranges to {a.output}", file=sys.stderr)
    else:
        sys.stdout.write(format_range_file(table))
    return 0


@command("quantize")
def cmd_quantize(a: argparse.Namespace) -> int:
    """``qmace quantize``: one-shot post-training quantization (calibrate on ``--input_dir``, write the range
    file and the quantized model).

    Args:
        a: the parsed command line (:func:`build_parser`).

    Returns:
        0.

    Raises:
        QmaceError: bad YAML, inputs, ranges or flags (a subclass naming the file/key).
    """
    from qmace.api import quantize_one_shot
    from qmace.quantize.recipe import PTQRecipe

    recipe = PTQRecipe(method=a.method, percentile=a.percentile, enhance=a.enhance, enhance_ratio=a.enhance_ratio,
                       equalize=not a.no_equalization, bias_correction=not a.no_bias_correction,
                       adaround=a.adaround, schema=a.schema, sensitivity_samples=a.sensitivity_samples,
                       sensitivity_16bit=a.sensitivity_16bit, sensitivity_float_layers=a.sensitivity_float_layers)
    res = quantize_one_shot(
        a.config, input_dir=a.input_dir, recipe=recipe, model_name=a.model_name, build_dir=a.build_dir,
        range_file=a.range_file, num_threads=a.num_threads,
        float_nodes={x for x in a.float_nodes.split(",") if x}, progress=_progress,
    )
    print(res.convert.summary())
    print(f"model file: {res.convert.path}\nrange file: {res.range_file}")
    if res.yaml_keys:
        import yaml

        print(f"to keep these float nodes / 16-bit activations when the model is quantized again from the range "
              f"file (qmace convert, qmace qat), add to {res.model_key} in the YAML:")
        for key, names in res.yaml_keys.items():
            print(f"  {key}: {yaml.safe_dump(names, default_flow_style=True, width=10**9).strip()}")
    if res.convert.graph.metadata["quantization"].get("equalized_tensors"):
        print("note: the range file holds the ranges of the activation-equalized model this command built; "
              "for `convert` with this file on the original model, rerun with --no_equalization")
    return 0


@command("export")
def cmd_export(a: argparse.Namespace) -> int:
    """``qmace export``: write the converted model in another format (``--format``) to ``--output``.

    Args:
        a: the parsed command line (:func:`build_parser`).

    Returns:
        0.

    Raises:
        QmaceError: bad YAML or model, or an unsupported format.
    """
    from qmace.api import export

    path = export(a.config, a.output, model_name=a.model_name, build_dir=a.build_dir, fmt=a.format)
    print(f"wrote {path}")
    return 0


@command("qat")
def cmd_qat(a: argparse.Namespace) -> int:
    """``qmace qat``: quantization-aware training (:func:`qmace.cli.qat.qat_command`) with a progress bar.

    Args:
        a: the parsed command line (:func:`build_parser`).

    Returns:
        0.

    Raises:
        QmaceError: PyTorch missing, or a bad job (see :func:`qmace.qat.job.check_job`).
    """
    from qmace.cli.qat import qat_command

    return qat_command(a, progress=_progress)


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt, so every temporary file is removed on the way."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run one ``qmace`` command line; returns the exit code (see docs/errors.md): 0 success, 1 failed
    validation, 2 bad input or a filesystem/resource fault (one ``qmace: error:`` line), 3 a bug in qmace,
    130/143 interrupted by SIGINT/SIGTERM.

    Args:
        argv: the arguments after ``qmace`` (default: ``sys.argv[1:]``).

    Returns:
        The exit code. Errors are printed, not raised (``--debug`` re-raises them).
    """
    from qmace import limits

    ap = build_parser()
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="qmace: %(levelname)s: %(message)s")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        limits.set_memory_budget(limits.parse_size(a.memory_budget, "--memory_budget") if a.memory_budget else None)
        return COMMANDS[a.command](a)
    except QmaceError as e:
        if a.debug:
            raise
        print(f"qmace: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a filesystem fault outside the wrapped writers: name the file
        if isinstance(e, BrokenPipeError):  # e.g. `qmace ... | head`: the reader left; not an error of ours
            sys.stderr.close()
            return 0
        if a.debug:
            raise
        where = e.filename if e.filename is not None else a.command
        print(f"qmace: error: {where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except MemoryError as e:
        if a.debug:
            raise
        detail = f": {e}" if str(e) else ""
        print(f"qmace: error: {getattr(a, 'config', None) or a.command}: out of memory{detail} (lower the input "
              "sizes, or the memory budget with --memory_budget so this is caught earlier)", file=sys.stderr)
        return 2
    except RecursionError as e:
        if a.debug:
            raise
        print(f"qmace: error: {getattr(a, 'config', None) or a.command}: input nested too deeply ({e})",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qmace: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("qmace: terminated", file=sys.stderr)
        return 143
    except Exception as e:  # an internal error: one line unless --debug
        if a.debug:
            raise
        print(f"qmace: internal error: {type(e).__name__}: {str(e)[:500]} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 3
    finally:
        limits.set_memory_budget(None)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
