#!/usr/bin/env python3
"""Issue 10: label-free QAT distillation of the dense-output mobile models (``seg``, ``det``) from their PTQ start.

    python benchmarks/qat_mobile.py train --model seg --schema int8_w7 --tag T [--lr 1e-5] [--range-lr 1e-5]
        [--freeze-below 0] [--epochs 6] [--steps-per-epoch 25] [--batch 8] [--temperature 1] [--gate 0.05] [--seed 0]
    python benchmarks/qat_mobile.py final --model seg --schema int8_w7 --tag T [--repeats 10]

Setup: ``python scripts/fetch_assets.py rapidocr mediapipe stamps extra-photos gcompris-photos``.

Models, evaluation images, task metrics and the PTQ start are benchmarks/bench_mobile_models.py's (its ``bc``
row: ``qmace quantize --method percentile --percentile 99.95`` with the schema's equalization and bias
correction). **Data rule:** training images are the 213 unlabeled ``gcompris-photos`` (none an evaluation
stamp, checked by sha256 and thumbnail correlation); ``det`` gets text drawn on them with its own seed.
Validation (``fit``'s best state and its significance gate) uses calibration-side stamps only (the split's 64
``calib`` stamps; ``det``: text drawn with another seed). The evaluation images are read only by ``final``.

Loss: the per-pixel Bernoulli KL between the FP32 model's map and the fake-quantized model's, on the logits the
map's Sigmoid reads (``fit(distill="sigmoid")``); Adam; LSQ ranges. Validation score per image: the task score
(IoU of the thresholded map vs FP32's), on the integer model (``module.quantized_graph()`` on qmace's onnxruntime
backend). Intermediate files go to <cache>/qat-mobile/ (never the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_mobile_models as B

TRAIN_SEED, VAL_SEED = 5, 6  # text drawn on training / validation images (calibration 1, evaluation 2)


def model_input(name: str, im, rng: np.random.Generator) -> np.ndarray:
    """One PIL image as the model's input, as bench_mobile_models makes it (det: text drawn with ``rng``)."""
    return B.det_input(im, rng) if name == "det" else B.seg_input(im)


def training_photos() -> list:
    """The 213 gcompris photos, checked to be none of the evaluation stamps (benchmarks/qat_mobilenet.py)."""
    from qat_mobilenet import extra_photo_paths

    from qmace_zoo import default_cache, load_split, stamps_dir

    paths = extra_photo_paths("gcompris-photos", default_cache() / "gcompris-photos.json",
                              list(load_split()["eval"]), stamps_dir())
    return [B._photo(str(p)) for p in paths]


def augmented(name: str, photos: list, epoch: int, seed: int) -> np.ndarray:
    """One view of every training photo for ``epoch``: a random crop (60-100% of each side), a random
    horizontal flip, and (det) freshly drawn text; depends only on (seed, epoch)."""
    rng = np.random.default_rng([seed, TRAIN_SEED, epoch])
    out = []
    for im in photos:
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        v = im.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            v = v.transpose(0)  # Image.FLIP_LEFT_RIGHT
        out.append(model_input(name, v, rng))
    return np.stack(out)


def validation_inputs(name: str) -> np.ndarray:
    """Calibration-side validation images: the 64 ``calib`` stamps (det: text drawn with VAL_SEED)."""
    rng = np.random.default_rng(VAL_SEED)
    return np.stack([model_input(name, im, rng) for im in B._sources("calib", 64, False)])


class Ctx:
    """The model, its PTQ start, FP32 references and the QAT module: what both stages need."""

    def __init__(self, a):
        from qmace.qat.job import sigmoid_logits
        from qmace.runtime import Session
        from qmace_zoo import default_cache

        self.a = a
        self.work = default_cache() / "qat-mobile"
        self.work.mkdir(parents=True, exist_ok=True)
        bench = default_cache() / "bench-mobile"
        bench.mkdir(parents=True, exist_ok=True)
        self.m = B.load_models([a.model], bench)[0]
        t0 = time.perf_counter()
        self.res = B.qmace_ptq(self.m, a.schema)
        print(f"{a.model} {a.schema}: PTQ start {time.perf_counter() - t0:.0f} s", flush=True)
        # the teacher and the reference are the original float model: the PTQ result's float graph carries
        # the bias correction, which is not the FP32 function
        g = self.m.graph
        self.logits = sigmoid_logits(g)[0]  # what `qmace qat --distill sigmoid` distils
        self.fp32 = Session(g.copy(), backend="onnxruntime", num_threads=a.threads)

    def module(self):
        from qmace.qat import prepare

        mod = prepare(self.res.float_graph, self.res.ranges, self.res.options)
        mod.train_outputs = [self.logits]
        return mod

    def teacher(self, x: np.ndarray) -> np.ndarray:
        """FP32 logits (the Sigmoid's input), image by image."""
        name = self.m.input_name
        return np.concatenate([self.fp32.run({name: np.asarray(x[i:i + 1], np.float32)}, observe=[self.logits])
                               [self.logits] for i in range(len(x))])

    def fp32_map(self, xs: np.ndarray) -> np.ndarray:
        return B.run_all(lambda x: self.fp32.run({self.m.input_name: x})[self.m.output_name], xs)

    def quantized_map(self, graph, xs: np.ndarray) -> np.ndarray:
        from qmace.runtime import Session

        s = Session(graph, backend="onnxruntime", num_threads=self.a.threads)
        return B.run_all(lambda x: s.run({self.m.input_name: x})[self.m.output_name], xs)


def scores(m, ref: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, float, float, float, float]:
    """Per-image task score (IoU vs FP32, rounded as bench_mobile_models reports it), the share of ok images
    (IoU >= 0.95 or cosine >= 0.98), SQNR, mean IoU and pooled IoU."""
    from qmace.metrics import compare

    per = np.array([s for s, _ in B.per_image(m, ref, out)])
    metric, ok, pooled = B.task_metric(m, ref, out)
    return per, ok, compare(ref, out).sqnr_db, metric, pooled


def stage_train(a) -> int:
    import torch

    from qmace.qat.trainer import fit

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    ctx = Ctx(a)
    mod = ctx.module()
    photos = training_photos()
    xv = validation_inputs(a.model)
    ref_v = ctx.fp32_map(xv)
    print(f"{len(photos)} training photos, {len(xv)} validation images; ready {time.perf_counter() - t0:.0f} s",
          flush=True)
    hist: list[dict] = []

    def validate(mm) -> np.ndarray:
        t1 = time.perf_counter()
        per, ok, sqnr, _, _ = scores(ctx.m, ref_v, ctx.quantized_map(mm.quantized_graph(), xv))
        hist.append({"iou": float(per.mean()), "ok": ok, "sqnr": sqnr, "t": time.perf_counter() - t0})
        print(f"  validation: mean IoU {per.mean():.4f}, ok {100 * ok:.1f}%, {sqnr:.2f} dB "
              f"({time.perf_counter() - t1:.0f} s, at {time.perf_counter() - t0:.0f} s)", flush=True)
        return per

    def batches(epoch: int):
        views = augmented(a.model, photos, epoch, a.seed)
        order = np.random.default_rng([a.seed, 11, epoch]).permutation(len(views))
        need = a.steps_per_epoch * a.batch
        order = np.concatenate([order] * (need // len(order) + 1))[:need]
        return [torch.from_numpy(views[order[i * a.batch:(i + 1) * a.batch]]) for i in range(a.steps_per_epoch)]

    tag = f"{a.model}_{a.schema}_{a.tag}"
    r = fit(mod, batches, epochs=a.epochs, lr=a.lr, range_lr=a.range_lr, teacher=ctx.teacher,
            temperature=a.temperature, distill="sigmoid", validate=validate, freeze_below=a.freeze_below,
            gate_alpha=a.gate if a.gate > 0 else None, checkpoint=ctx.work / f"{tag}.ckpt",
            on_epoch=lambda e: print(f"epoch {e.epoch}/{e.epochs}: loss {e.loss:.5f}, validation IoU {e.metric:.4f}"
                                     f"{' (best)' if e.best else ''} at {time.perf_counter() - t0:.0f} s",
                                     flush=True))
    if r.frozen:
        print(f"kept fixed (largest magnitude < {a.freeze_below:g}): {', '.join(r.frozen)}", flush=True)
    torch.save({"model": mod.state_dict()}, ctx.work / f"{tag}.kept.pt")
    summary = {"tag": tag, "args": vars(a), "losses": r.losses, "metrics": r.metrics, "start": r.start_metric,
               "best": r.best_metric, "best_epoch": r.best_epoch,
               "kept": "start" if (r.gate.kept_start if r.gate else r.best_epoch == 0) else "trained",
               "gate": r.gate.message() if r.gate else None, "history": hist, "seconds": time.perf_counter() - t0}
    (ctx.work / f"{tag}.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "args")}, default=str), flush=True)
    return 0


def stage_final(a) -> int:
    """The one evaluation: FP32, the PTQ start and the kept QAT state on the evaluation images; latency."""
    import torch
    from common import interleaved_medians, machine_note

    from qmace.runtime import Session

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    ctx = Ctx(a)
    mod = ctx.module()
    tag = f"{a.model}_{a.schema}_{a.tag}"
    mod.load_state_dict(torch.load(ctx.work / f"{tag}.kept.pt", weights_only=True)["model"])
    mod.eval()
    qg = mod.quantized_graph()
    x1 = ctx.m.calib[:1]
    same = np.array_equal(mod(torch.from_numpy(x1), exact=True).numpy(),
                          Session(qg, backend="reference").run({ctx.m.input_name: x1})[ctx.m.output_name])
    print(f"module(x, exact=True) == quantized_graph() on the reference runtime: {same}", flush=True)
    xe = ctx.m.evals
    ref = ctx.fp32_map(xe)
    rows, fns = {}, {}
    name = ctx.m.input_name
    for label, graph in ((f"PTQ start ({a.schema}, bc)", ctx.res.graph), (f"QAT ({tag})", qg)):
        out = ctx.quantized_map(graph, xe)
        per, ok, sqnr, metric, pooled = scores(ctx.m, ref, out)
        rows[label] = {"mean_iou": metric, "pooled_iou": pooled, "ok": ok, "sqnr": sqnr,
                       "per_image": per.round(4).tolist()}
        s = Session(graph, backend="onnxruntime", num_threads=1)
        fns[label] = lambda s=s: s.run({name: xe[:1]})
        print(f"{label}: mean IoU {metric:.3f}, pooled {pooled:.3f}, ok {100 * ok:.1f}%, {sqnr:.2f} dB", flush=True)
    fp = B.ort_session(ctx.m.fp32_onnx, 1)
    fns["FP32"] = lambda: fp.run(None, {fp.get_inputs()[0].name: xe[:1]})
    lat = interleaved_medians(fns, repeats=a.repeats, warmup=2)
    print(f"\n| {a.model} | mean IoU | pooled IoU | ok images | SQNR dB | ORT ms | FP32/int8 |\n|---|---|---|---|---|---|---|")
    print(f"| FP32 | 1.000 | 1.000 | 100% | inf | {lat['FP32']:.2f} | 1.00x |")
    for label, r in rows.items():
        print(f"| {label} | {r['mean_iou']:.3f} | {r['pooled_iou']:.3f} | {100 * r['ok']:.0f}% | {r['sqnr']:.1f} "
              f"| {lat[label]:.2f} | {lat['FP32'] / lat[label]:.2f}x |")
    (ctx.work / f"{tag}.final.json").write_text(json.dumps({"rows": rows, "latency_ms": lat, "exact": same}))
    print(f"\n{machine_note()}; run time {time.perf_counter() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("train", "final"))
    ap.add_argument("--model", choices=("seg", "det"), required=True)
    ap.add_argument("--schema", default="int8_w7", choices=("int8_w7", "int8", "uint8"))
    ap.add_argument("--tag", required=True)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--range-lr", type=float, default=1e-5)
    ap.add_argument("--freeze-below", type=float, default=0.0,
                    help="fit(freeze_below=): weight tensors (not biases) whose largest magnitude is below this stay fixed "
                         "(default 0: none)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--steps-per-epoch", type=int, default=25)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--gate", type=float, default=0.05, help="fit's significance gate (0: off, best state kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args(argv)
    return stage_train(a) if a.stage == "train" else stage_final(a)


if __name__ == "__main__":
    raise SystemExit(main())
