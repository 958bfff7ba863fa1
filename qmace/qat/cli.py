"""``qmace qat``: calibrate on the training samples, fine-tune with fake quantization, write a float ONNX
model + learned range file + a ready ``quantize: 1`` YAML (docs/qat.md)."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

from qmace.errors import ConfigError, InputDataError, QmaceError


class TorchMissing(QmaceError):
    pass


def _need_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise TorchMissing("qmace qat needs PyTorch: pip install 'qmace[qat]'") from None


def read_labels(path: str | Path, sample_names: list[str]) -> list[int]:
    """Labels file: one integer per line in sample order, or ``name label`` pairs (``name`` = the sample's
    file-name suffix, or the whole file name). Blank lines and ``#`` comments are ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise InputDataError(f"{path}: cannot read labels: {e}") from e
    rows = [ln.split() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    try:
        if rows and all(len(r) == 1 for r in rows):
            labels = [int(r[0]) for r in rows]
            if len(labels) != len(sample_names):
                raise InputDataError(f"{path}: {len(labels)} labels for {len(sample_names)} samples")
            return labels
        by_name = {}
        for r in rows:
            if len(r) != 2:
                raise InputDataError(f"{path}: expected 'label' or 'name label' lines, got {' '.join(r)!r}")
            by_name[r[0]] = int(r[1])
    except ValueError as e:
        raise InputDataError(f"{path}: labels must be integers: {e}") from e
    out = []
    for s in sample_names:
        hit = by_name.get(s)
        if hit is None:
            hit = next((v for k, v in by_name.items() if k.endswith(s) or s.endswith(k)), None)
        if hit is None:
            raise InputDataError(f"{path}: no label for sample {s!r}")
        out.append(hit)
    return out


def write_qat_yaml(config_path: Path, m, out_yaml: Path, onnx_path: Path, range_path: Path,
                   input_ranges: list[tuple[float, float]]) -> Path:
    """The source YAML's entry for model ``m`` pointing at the QAT float model, with ``quantize: 1``."""
    import yaml

    from qmace.fileio import atomic_write

    raw = yaml.safe_load(Path(config_path).read_text())
    entry = dict(raw["models"][m.name])
    entry["model_file_path"] = onnx_path.name
    entry["model_sha256_checksum"] = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    entry.pop("weight_file_path", None)
    entry.pop("weight_sha256_checksum", None)
    entry.pop("quantize_large_weights", None)
    entry.pop("quantize_large_weights_schema", None)
    entry["quantize"] = 1
    entry["quantize_range_file"] = range_path.name
    entry["quantize_schema"] = m.quantize_schema
    subs = entry["subgraphs"]
    first = subs[0] if isinstance(subs, list) else next(iter(subs.values()))
    first = dict(first)
    first["input_ranges"] = [f"{lo!r},{hi!r}" for lo, hi in input_ranges]
    entry["subgraphs"] = [first]
    doc = {k: v for k, v in raw.items() if k != "models"}
    doc["models"] = {m.name: entry}
    with atomic_write(out_yaml) as f:
        f.write(yaml.safe_dump(doc, sort_keys=False))
    return out_yaml


def qat_command(args: argparse.Namespace, progress=None) -> int:
    _need_torch()
    from qmace.api import count_samples, load_float_graph, samples_for
    from qmace.config import load_config
    from qmace.fileio import check_inside, check_plain_name, ensure_dir
    from qmace.qat.module import export_qat, prepare
    from qmace.qat.train import train
    from qmace.quantize.api import calibrate, equalize_on, options_for
    from qmace.quantize.calibration import make_calibrator

    if args.epochs < 0 or args.batch_size < 1:
        raise ConfigError("--epochs must be >= 0 and --batch_size >= 1")
    if not (args.lr > 0 and np.isfinite(args.lr)):
        raise ConfigError(f"--lr must be a positive finite number, got {args.lr}")
    cfg = load_config(args.config)
    m = cfg.model(args.model_name)
    graph = load_float_graph(m)
    n = count_samples(m, args.train_dir, 0)
    samples = list(progress(samples_for(m, args.train_dir, 0), total=n, desc="loading") if progress
                   else samples_for(m, args.train_dir, 0))
    if not getattr(args, "no_equalization", False):
        # as `qmace quantize`: rescale activation channels first (same float function), so the ranges below
        # come from the equalized graph and training starts from the better post-training state
        graph, groups = equalize_on(graph, samples)
        print(f"qat: activation equalization rescaled {sum(len(g.tensors) for g in groups)} tensor(s)")
    # Start from the better post-training ranges (histogram percentile), not MACE's min/max.
    cal = make_calibrator("percentile")
    calibrate(graph, samples, cal)
    opts = options_for(m)
    module = prepare(graph, cal.ranges(), opts)
    labels = read_labels(args.labels, [s.name for s in samples]) if args.labels else None

    bs = args.batch_size
    rng = np.random.default_rng(0)

    def batches(epoch: int):
        order = rng.permutation(len(samples))
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            feeds = {k: np.concatenate([samples[j].feeds[k] for j in idx]) for k in samples[0].feeds}
            x = feeds if len(feeds) > 1 else next(iter(feeds.values()))
            yield (x, np.array([labels[j] for j in idx])) if labels is not None else x

    if args.output_dir:
        out_dir = Path(args.output_dir)
    else:
        root = Path(args.build_dir or "build")
        out_dir = root / check_plain_name(cfg.library_name, f"{cfg.path}: library_name") / "qat"
        check_inside(root, out_dir, "the QAT output folder")
    ensure_dir(out_dir)
    losses = train(module, batches, epochs=args.epochs, lr=args.lr, progress=progress,
                   checkpoint=out_dir / f"{m.name}_qat.ckpt")
    onnx_path, range_path = export_qat(module, out_dir / f"{m.name}_qat.onnx", out_dir / f"{m.name}_qat.ranges")
    yml = write_qat_yaml(Path(args.config), m, out_dir / f"{m.name}_qat.yml", onnx_path, range_path,
                         list(opts.input_ranges.values()))
    objective = "cross-entropy" if labels is not None else "distillation from the float model"
    print(f"qat: {len(samples)} sample(s), {args.epochs} epoch(s), {objective}; "
          f"loss per epoch: {', '.join(f'{x:.4f}' for x in losses) or '-'}")
    print(f"fine-tuned float model: {onnx_path}")
    print(f"learned ranges: {range_path}")
    print(f"checkpoint: {out_dir / f'{m.name}_qat.ckpt'}")
    print(f"YAML (quantize: 1): {yml}  ->  qmace convert --config {yml}")
    return 0
