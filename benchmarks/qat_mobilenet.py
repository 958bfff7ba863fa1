#!/usr/bin/env python3
"""Benchmark B (label-free QAT): MobileNetV2 (torchvision ImageNet weights), PTQ vs QAT, both schemas.

    python scripts/fetch_assets.py mobilenet stamps [extra-photos] [gcompris-photos]
    python benchmarks/qat_mobilenet.py [--steps 160] [--lr 1e-5] [--range-lr 1e-4] [--extra-photos]
                                       [--gcompris-photos] [--qdrop P] [--mix P] [--hard W]
    python benchmarks/qat_mobilenet.py --holdout 12 ...   # hyper-parameter selection, never touches the 233

PTQ = the best post-training state we ship, and QAT starts from exactly it, built as ``quantize_one_shot``
does: activation equalization first (``ChannelMaxima`` over the 64 calibration stamps, then
``equalize_activations`` on the float graph; ``--no-equalization`` skips it), then activation ranges from the
``percentile`` (99.95) calibrator and bias-corrected weights (``correct_biases`` with ``ChannelMeans``
collected in the same second ``calibrate`` pass over the 64 calibration stamps). QAT: ``qmace.qat.prepare``
from that state, then label-free distillation from the ORIGINAL FP32 model (not the equalized or
bias-corrected one; equalization leaves the float function unchanged anyway) on augmented
views of the 64 calibration stamps only (random resized crops at several scales, flips, small colour jitter;
never the 233 evaluation stamps): loss = T^2 KL(softmax(t/T) || softmax(s/T)) + mse * MSE(s, t) on logits,
Adam with separate learning rates for weights and LSQ ranges, linear warm-up + cosine decay.

``--extra-photos``: the distillation pool also holds the 17 real photos of ``fetch_assets.py extra-photos``
(12 nature photos of Debian ``mate-backgrounds``, 5 photos of scikit-image's sample data), prepared and
augmented exactly as the calibration stamps; PTQ (ranges, equalization, bias correction) still uses the 64
calibration stamps only, so the PTQ row does not change.

Evaluation on the 233 evaluation stamps against FP32 (ONNX Runtime): top-1 agreement, top-5 overlap
(mean |top5 & top5_fp32| / 5), logits SQNR. Quantized models (PTQ and ``module.quantized_graph()``) run in
ONNX Runtime (bit-exact with qmace's reference runtime). Target: QAT recovers at least half of the
agreement PTQ lost, per schema.

``--holdout K``: selection mode. Trains on the first 64-K calibration stamps and reports the same metrics on
fixed augmented views of the K held-out calibration stamps (PTQ vs QAT); the 233 are not loaded.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: qmace_zoo is not installed

from qmace.metrics import compare
from qmace_zoo.stamps import CROP, IMAGENET_MEAN, IMAGENET_STD


def load_resized(paths, root: Path, short: int = 256) -> list[np.ndarray]:
    """Images composited on white, shorter side resized to ``short`` (uint8 HWC), as the evaluation does."""
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(root / p) as im:
            rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
        w, h = rgb.size
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        out.append(np.asarray(rgb.resize(size, Image.BILINEAR)))
    return out


def _thumbnail(path: Path) -> np.ndarray:
    """24x24 grey thumbnail (composited on white), zero-mean, unit norm: for near-duplicate checks."""
    from PIL import Image

    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    g = np.asarray(Image.alpha_composite(white, rgba).convert("L").resize((24, 24), Image.BILINEAR), np.float64)
    g = g.ravel() - g.mean()
    return g / (np.linalg.norm(g) + 1e-9)


def extra_photo_paths(asset: str, manifest: Path, eval_paths, stamps_root: Path) -> list[Path]:
    """The photos listed by a ``fetch_assets.py`` manifest; checked to be none of the evaluation stamps: not
    byte-identical (sha256) and no near-duplicate (correlation of 24x24 grey thumbnails > 0.95)."""
    import hashlib
    import json

    try:
        paths = [Path(p) for p in json.loads(manifest.read_text())["photos"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--{asset}: {manifest}: {e}; run python scripts/fetch_assets.py {asset}") from None

    def digest(path):
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    evaluation = {digest(stamps_root / p) for p in eval_paths}
    clash = [p for p in paths if digest(p) in evaluation]
    if clash:
        raise SystemExit(f"--{asset}: {clash[0]} is one of the evaluation stamps")
    corr = np.stack([_thumbnail(p) for p in paths]) @ np.stack([_thumbnail(stamps_root / p) for p in eval_paths]).T
    i, j = np.unravel_index(np.argmax(corr), corr.shape)
    if corr[i, j] > 0.95:
        raise SystemExit(f"--{asset}: {paths[i]} looks like evaluation stamp {eval_paths[j]} "
                         f"(thumbnail correlation {corr[i, j]:.3f})")
    print(f"--{asset}: {len(paths)} photos, none among the evaluation stamps (highest thumbnail correlation "
          f"{corr.max():.2f})", flush=True)
    return paths


def augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One augmented view -> CHW normalised float32.

    A quarter of the views are the evaluation's own centre crop; the rest are random resized crops (area
    10-100% of the image, aspect ratio 3/4-4/3, resized to 224). Then a horizontal flip (p = 0.5) and a
    small colour jitter (brightness, contrast, saturation each x U(0.85, 1.15))."""
    from PIL import Image

    h, w, _ = img.shape
    if rng.random() < 0.25:
        top, left = round((h - CROP) / 2.0), round((w - CROP) / 2.0)
        x = img[top:top + CROP, left:left + CROP].astype(np.float32) / 255.0
    else:
        for _ in range(10):
            area = h * w * rng.uniform(0.1, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:
            ch = cw = min(h, w)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(img[top:top + ch, left:left + cw]).resize((CROP, CROP), Image.BILINEAR)
        x = np.asarray(crop, np.float32) / 255.0
    if rng.random() < 0.5:
        x = x[:, ::-1]
    b, c, s = rng.uniform(0.85, 1.15, size=3)
    x = x * b
    x = (x - x.mean()) * c + x.mean()
    grey = x.mean(axis=2, keepdims=True)
    x = np.clip((x - grey) * s + grey, 0.0, 1.0)
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), np.float32)


def metrics(ref: np.ndarray, x: np.ndarray) -> tuple[float, float, float]:
    """Top-1 agreement %, top-5 overlap %, logits SQNR dB against ``ref``."""
    agree = float((x.argmax(1) == ref.argmax(1)).mean() * 100)
    t5r, t5x = np.argsort(-ref, 1)[:, :5], np.argsort(-x, 1)[:, :5]
    overlap = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(t5r, t5x)]) * 100)
    return agree, overlap, compare(ref, x).sqnr_db


def run_batched(graph, x, threads=1):
    from qmace.runtime import Session

    s = Session(graph, num_threads=threads)
    name, out = graph.inputs[0], graph.outputs[0]
    return np.concatenate([s.run({name: x[i:i + 1]})[out] for i in range(len(x))])


def depthwise_weights(module) -> set[int]:
    """Indices (in ``module.weights``) of the weights of depthwise convolutions (group == channels)."""
    from qmace.ops import get_op

    out = set()
    for node in module.float_graph.nodes:
        if node.op_type != "Conv" or int(get_op("Conv").attr(node, "group")) == 1:
            continue
        name = node.inputs[1]
        if name in module._weight_index:
            out.add(module._weight_index[name])
    return out


def distill(module, views, teacher, *, steps, batch, lr, range_lr, temperature, mse, warmup, freeze_dw, seed,
            mix=0.0, qdrop=0.0, hard=0.0, log_every=10):
    """Adam + linear warm-up + cosine decay; loss T^2 KL + mse * MSE on logits. Returns the loss curve."""
    import torch
    import torch.nn.functional as F

    frozen = depthwise_weights(module) if freeze_dw else set()
    for i, p in enumerate(module.weights):
        p.requires_grad_(i not in frozen)
    weights = [p for i, p in enumerate(module.weights) if i not in frozen]
    ranges = [p for n, p in module.named_parameters() if n in ("act_min", "act_max") and p.requires_grad]
    opt = torch.optim.Adam([{"params": weights, "lr": lr}, {"params": ranges, "lr": range_lr}])
    n_warm = max(1, int(warmup * steps))

    def factor(k):
        if k < n_warm:
            return (k + 1) / n_warm
        return 0.5 * (1 + math.cos(math.pi * (k - n_warm) / max(1, steps - n_warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    module.act_drop = qdrop
    module.train()
    curve, run = [], []
    t0 = time.perf_counter()
    for k in range(steps):
        idx = rng.choice(len(views), size=batch, replace=len(views) < batch)
        x = np.stack([augment(views[j], rng) for j in idx])
        if mix > 0:  # mixup of two views, taught as such (function matching): the teacher sees the mixed image
            other = np.stack([augment(views[j], rng) for j in rng.choice(len(views), size=batch)])
            lam = np.where(rng.random(batch) < mix, rng.uniform(0.0, 1.0, batch), 1.0).astype(np.float32)
            x = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * other
        t = torch.from_numpy(teacher(x))
        s = module(torch.from_numpy(x))
        s = s.reshape(t.shape)
        kl = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1),
                      reduction="batchmean") * temperature**2
        loss = kl + mse * F.mse_loss(s, t) if mse else kl
        if hard:  # cross-entropy towards the teacher's top-1 class: top-1 agreement is what is scored
            loss = loss + hard * F.cross_entropy(s, t.argmax(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run.append(float(loss.detach()))
        if (k + 1) % log_every == 0 or k + 1 == steps:
            curve.append(float(np.mean(run)))
            print(f"  step {k + 1}/{steps}: loss {curve[-1]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            run = []
    module.act_drop = 0.0
    module.eval()
    return curve


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=160, help="optimizer steps per schema")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-5, help="weights' peak learning rate")
    ap.add_argument("--range-lr", type=float, default=1e-4, help="LSQ ranges' peak learning rate")
    ap.add_argument("--temperature", type=float, default=3.0, help="KL distillation temperature")
    ap.add_argument("--mse", type=float, default=1.0, help="weight of the MSE-on-logits term (0: KL only)")
    ap.add_argument("--warmup", type=float, default=0.05, help="share of steps of linear warm-up")
    ap.add_argument("--mix", type=float, default=0.0,
                    help="share of training views mixed (mixup, weight U(0,1)) with a second view")
    ap.add_argument("--qdrop", type=float, default=0.0,
                    help="QDrop: probability that an activation element skips fake quantization in training")
    ap.add_argument("--hard", type=float, default=0.0,
                    help="weight of a cross-entropy term towards the teacher's top-1 class")
    ap.add_argument("--soup", type=int, default=1,
                    help="train K students from the same start (seeds seed..seed+K-1) and average their weights "
                         "and ranges (a model soup)")
    ap.add_argument("--freeze-dw", action="store_true", help="keep the BN-folded depthwise weights fixed")
    ap.add_argument("--percentile", type=float, default=99.95,
                    help="calibration percentile (PTQ = QAT start); 99.95 as qmace quantize, chosen with --holdout")
    ap.add_argument("--no-bias-correction", action="store_true")
    ap.add_argument("--adaround", action="store_true",
                    help="PTQ = QAT start with AdaRound weights (qmace quantize --adaround) instead of bias correction")
    ap.add_argument("--no-equalization", action="store_true",
                    help="skip activation equalization before the calibration pass")
    ap.add_argument("--extra-photos", action="store_true",
                    help="add the 17 photos of fetch_assets.py extra-photos to the distillation pool (not to PTQ)")
    ap.add_argument("--gcompris-photos", action="store_true",
                    help="add the 213 photos of fetch_assets.py gcompris-photos to the distillation pool (not to PTQ)")
    ap.add_argument("--holdout", type=int, default=0,
                    help="selection mode: hold out the last K calibration stamps, evaluate on their views only")
    ap.add_argument("--holdout-views", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schemas", default="uint8,int8")
    args = ap.parse_args(argv)

    import torch

    from qmace.frontends.onnx_frontend import onnx_to_graph, read_onnx
    from qmace.passes import optimize
    from qmace.qat import prepare
    from qmace.quantize.quantizer import QuantizeOptions
    from qmace.quantize.recipe import PTQRecipe, run_ptq
    from qmace.runtime import Session
    from qmace_zoo import default_cache, export_onnx, load_images, load_mobilenet_v2, load_split, stamps_dir

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    cache = default_cache()
    onnx_path = cache / "mobilenet_v2_fp32.onnx"
    if not onnx_path.is_file():
        export_onnx(load_mobilenet_v2(cache / "mobilenet_v2-b0353104.pth"), onnx_path)
    graph = optimize(onnx_to_graph(read_onnx(onnx_path), onnx_path))
    graph.tensors[graph.inputs[0]].shape = (1, 3, 224, 224)
    split = load_split()
    root = stamps_dir(cache)
    calib = list(split["calib"])
    train_paths = calib[:len(calib) - args.holdout] if args.holdout else calib
    x_cal = load_images(calib, root=root)  # calibration (PTQ) always uses all 64
    resized = load_resized(train_paths, root)
    extra = []
    for asset, wanted in (("extra-photos", args.extra_photos), ("gcompris-photos", args.gcompris_photos)):
        if wanted:
            extra += extra_photo_paths(asset, cache / f"{asset}.json", split["eval"], root)
    resized += load_resized(extra, root)  # absolute paths: root / p == p
    if args.holdout:
        held = load_resized(calib[len(calib) - args.holdout:], root)
        vrng = np.random.default_rng(12345)
        x_eval = np.stack([augment(img, vrng) for img in held for _ in range(args.holdout_views)])
        eval_name = f"{len(x_eval)} augmented views of {args.holdout} held-out calibration stamps"
    else:
        x_eval = load_images(split["eval"], root=root)
        eval_name = "233 evaluation stamps"

    # the teacher is the ORIGINAL FP32 model (bias correction changes the float graph)
    teacher_session = Session(graph.copy(), num_threads=args.threads)
    in_name, out_name = graph.inputs[0], graph.outputs[0]

    def teacher(x):
        return np.concatenate([teacher_session.run({in_name: x[i:i + 1]})[out_name] for i in range(len(x))])

    ref = teacher(x_eval)
    samples = [SimpleNamespace(name=str(i), feeds={"input": x_cal[i:i + 1]}) for i in range(len(x_cal))]
    in_range = (float(x_cal.min()), float(x_cal.max()))

    rows, equalized = [], 0
    for schema in args.schemas.split(","):
        # the PTQ model and QAT's start: qmace's recipe (as qmace quantize with these options)
        recipe = PTQRecipe(method="percentile", percentile=args.percentile, equalize=not args.no_equalization,
                           bias_correction=not args.no_bias_correction, adaround=args.adaround, schema=schema)
        t_ptq = time.perf_counter()
        res = run_ptq(graph, samples, recipe, QuantizeOptions(schema=schema, input_ranges={"input": in_range}),
                      num_threads=args.threads)
        print(f"{schema}: PTQ ({res.equalized_tensors} tensors equalized, {res.corrected_layers} layers "
              f"corrected{' by AdaRound' if args.adaround else ''}) {time.perf_counter() - t_ptq:.0f} s", flush=True)
        start, ranges, equalized = res.float_graph, res.ranges, res.equalized_tensors
        opts = QuantizeOptions(schema=schema, input_ranges={"input": in_range}, fixed_params=res.fixed_params)
        ptq = run_batched(res.graph, x_eval, args.threads)
        t0 = time.perf_counter()
        module = prepare(start, ranges, opts)
        same = np.array_equal(run_batched(module.quantized_graph(), x_eval[:4], args.threads), ptq[:4])
        print(f"{schema}: QAT start == PTQ model: {same}", flush=True)
        members = []
        for k in range(args.soup):  # --soup K: K students from the same start (seeds seed..seed+K-1), averaged
            if k:
                module = prepare(start, ranges, opts)
            distill(module, resized, teacher, steps=args.steps, batch=args.batch, lr=args.lr,
                    range_lr=args.range_lr, temperature=args.temperature, mse=args.mse, warmup=args.warmup,
                    freeze_dw=args.freeze_dw, seed=args.seed + k, mix=args.mix, qdrop=args.qdrop, hard=args.hard)
            if args.soup > 1:
                members.append({n: v.detach().clone() for n, v in module.state_dict().items()})
                ma, _, ms = metrics(ref, run_batched(module.quantized_graph(), x_eval, args.threads))
                print(f"{schema}: soup member {k} (seed {args.seed + k}): agreement {ma:.1f}%, SQNR {ms:.2f} dB",
                      flush=True)
        if args.soup > 1:
            module.load_state_dict({n: sum(m[n] for m in members) / len(members) for n in members[0]})
        t_train = time.perf_counter() - t0
        qat = run_batched(module.quantized_graph(), x_eval, args.threads)
        t_qat = time.perf_counter() - t0
        rows.append((schema, metrics(ref, ptq), metrics(ref, qat), t_train, t_qat))
        pa, qa = rows[-1][1][0], rows[-1][2][0]
        print(f"{schema}: agreement PTQ {pa:.1f}% -> QAT {qa:.1f}%, SQNR {rows[-1][1][2]:.2f} -> "
              f"{rows[-1][2][2]:.2f} dB, train {t_train:.0f} s", flush=True)

    print(f"\nMobileNetV2 (torchvision weights), {eval_name} vs FP32; PTQ = QAT start: "
          f"{'no equalization' if args.no_equalization else f'activation equalization ({equalized} tensors)'}, "
          f"percentile {args.percentile:g} ranges{' + AdaRound' if args.adaround else '' if args.no_bias_correction else ' + bias correction'} from the 64 "
          f"calibration stamps; QAT: {args.steps} steps x batch {args.batch} of distillation on augmented views of "
          f"{len(train_paths)} calibration stamps{f' + {len(extra)} extra photos' if extra else ''}, lr {args.lr:g} (ranges {args.range_lr:g}), warm-up + cosine, "
          f"T={args.temperature:g} KL + {args.mse:g} x MSE on logits{', depthwise frozen' if args.freeze_dw else ''}"
          f"{f', mixup {args.mix:g}' if args.mix else ''}{f', QDrop {args.qdrop:g}' if args.qdrop else ''}"
          f"{f', {args.hard:g} x CE to teacher top-1' if args.hard else ''}"
          f"{f', soup of {args.soup} seeds' if args.soup > 1 else ''}, "
          f"{args.threads} thread(s)")
    print("| schema | PTQ top-1 agr. | QAT top-1 agr. | PTQ top-5 ovl. | QAT top-5 ovl. | PTQ SQNR | QAT SQNR "
          "| recovered | QAT time (train + eval) |")
    print("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for schema, (pa, p5, ps), (qa, q5, qs), tt, t in rows:
        lost = 100 - pa
        rec = (qa - pa) / lost if lost > 0 else float("nan")
        ok &= lost <= 0 or rec >= 0.5
        print(f"| {schema} | {pa:.1f}% | {qa:.1f}% | {p5:.1f}% | {q5:.1f}% | {ps:.2f} dB | {qs:.2f} dB "
              f"| {rec:.0%} of {lost:.1f} pt | {t:.0f} s ({tt:.0f} + {t - tt:.0f}) |")
    print(f"target (QAT recovers >= half of the agreement PTQ lost, per schema): {'met' if ok else 'NOT met'}")
    print(f"total time: {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
