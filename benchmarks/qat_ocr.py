"""Issue 16: label-free QAT distillation of the PP-OCRv4 recognizer from its FP32 model, starting from the best
PTQ state (int8, ``--method percentile --percentile 99.99 --sensitivity_16bit 16``).

    python benchmarks/ocr_data.py                      # the calibration / evaluation lines (as bench_ocr)
    python benchmarks/qat_ocr.py render [--train-lines 3000]
    python benchmarks/qat_ocr.py start                 # the PTQ start (run_ptq, ~10 min at 1 thread; cached)
    python benchmarks/qat_ocr.py time   [--batch 8]    # seconds per training step
    python benchmarks/qat_ocr.py train  --lr 1e-5 --epochs E --steps-per-epoch S [--batch 8] [--tag NAME]
    python benchmarks/qat_ocr.py final  --tag NAME     # the ONE evaluation on the 234 evaluation lines

Data (nothing in git; ``<cache>/ocr-qat/``):
- training lines: freshly rendered CALIBRATION-side text (``qmace_zoo.ocr``'s sha256 split rule), with the
  calibration lines' fonts, sizes, backgrounds and augmentations (``render_line``); the phrases are the
  calibration-side phrases NOT drawn on any of the 100 calibration lines, and recombinations of their words
  (Latin) / characters (Chinese) that the split rule also puts on the calibration side. No evaluation phrase or
  photo is ever drawn;
- held-out (choice of lr / steps, ``fit``'s ``validate``): the 100 calibration lines themselves, whose phrases the
  training lines never show. The evaluation lines are read only by ``final``.

Start (``start``): ``run_ptq`` of the recipe above on the 100 calibration lines; the 16 sensitivity-chosen
tensors are cached (``start.json``) so later runs pass them as ``wide_extra`` (``run_ptq`` keeps a given
``wide_extra``: the same quantized model without re-measuring 164 candidates); ``qmace.qat.prepare`` of that
PTQ result (equalized + bias-corrected float graph, its ranges, the options with the 16-bit choices).

Training (``train``): ``qmace.qat.fit``: Adam, LSQ ranges, distillation of the logits before the final Softmax
(``module.train_outputs``) to the FP32 converted graph's logits, one KL per timestep (``distill_axis=-1``) at
temperature ``--temperature``; validation after every epoch = decoded strings of the deployed integer model
(``module.quantized_graph()`` on qmace's onnxruntime backend) equal to FP32's on the held-out lines; the best
epoch (the start included) is kept; checkpoint every epoch (``--resume`` continues).

Final (``final``): ``module.quantized_graph()`` of the trained state (the range-file hand-over does not carry
the 16-bit choices), checked against ``module(x, exact=True)`` on a few lines, then bench_ocr's metric on the
evaluation lines and the latency of FP32 / PTQ start / QAT in one interleaved run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ocr as B  # loads qmace_zoo the way bench_ocr does

RECIPE = {"method": "percentile", "percentile": 99.99, "sensitivity_16bit": 16, "schema": "int8"}


# ------------------------------------------------------------------------------------------------ data


def _calib_phrases_drawn(calib_lines) -> set[str]:
    return {ln.text for ln in calib_lines}


def training_phrases(cache: Path, calib_lines, seed: int, n_mix: int) -> tuple[list[str], list[str]]:
    """Calibration-side phrases not drawn on a calibration line (``drawn`` prefix rule: a phrase is excluded when
    a calibration line's text is a prefix of it), plus ``n_mix`` recombinations of their words / characters
    that the split rule puts on the calibration side and that are no evaluation phrase. Also returns the
    calibration-side background photos."""
    from qmace_zoo.ocr import phrases_from, recognizer_charset, split_of, split_pools

    texts = json.loads((cache / "ocr-text.json").read_text())
    photos = json.loads((cache / "extra-photos.json").read_text())["photos"]
    charset = set(recognizer_charset(cache / "rapidocr" / B.REC_MODEL)[1:])
    phrases = phrases_from([Path(p) for p in texts["texts"]], charset)
    pools = split_pools(phrases, photos)
    eval_set = {t for t, _ in pools["eval"][0]}
    drawn = _calib_phrases_drawn(calib_lines)
    base = [t for t, _ in pools["calib"][0] if not any(t.startswith(d) for d in drawn)]
    words = sorted({w for t in base if t.isascii() for w in t.split(" ") if w})
    chars = sorted({c for t in base if not t.isascii() for c in t if not c.isspace()})
    rng = np.random.default_rng([seed, 7])
    mixed: list[str] = []
    seen = set(base)
    while len(mixed) < n_mix:
        if rng.random() < 0.6 and words:
            t = " ".join(rng.choice(words, int(rng.integers(1, 7))))
        else:
            t = "".join(rng.choice(chars, int(rng.integers(2, 13))))
        if t in seen or t in eval_set or split_of(t) != "calib":
            continue
        seen.add(t)
        mixed.append(t)
    return base + mixed, pools["calib"][1]


def render_training(cache: Path, out: Path, n: int, seed: int) -> list[dict]:
    """Render ``n`` training lines into ``out`` (PNG + ``lines.json``); idempotent for the same (n, seed)."""
    from PIL import Image

    from qmace_zoo.ocr import load_lines, render_line

    manifest = out / "lines.json"
    if manifest.is_file():
        meta = json.loads(manifest.read_text())
        if meta["n"] == n and meta["seed"] == seed:
            return meta["lines"]
    lines = load_lines(cache / B.LINES_DIR)
    calib = [ln for ln in lines if ln.split == "calib"]
    phrases, bgs = training_phrases(cache, calib, seed, n_mix=n // 2)
    texts = json.loads((cache / "ocr-text.json").read_text())
    fonts = list(texts["fonts"])
    cjk_fonts = [f for f in fonts if "CJK" in Path(f).name]
    rng = np.random.default_rng([seed, 3])
    out.mkdir(parents=True, exist_ok=True)
    made: list[dict] = []
    bg_cache: dict[str, object] = {}
    while len(made) < n:
        text = phrases[int(rng.integers(len(phrases)))]
        font = str(rng.choice(cjk_fonts if any(ord(c) > 0xFF for c in text) else fonts))
        bg_path = str(rng.choice(bgs)) if bgs and rng.random() < 0.5 else None
        if bg_path and bg_path not in bg_cache:
            bg_cache[bg_path] = Image.open(bg_path).convert("RGB")
        img, drawn = render_line(text, font, int(rng.integers(22, 45)), rng, bg_cache.get(bg_path))
        if img is None:
            continue
        name = f"t{len(made):05d}.png"
        img.save(out / name)
        made.append({"file": name, "text": drawn, "font": Path(font).name,
                     "background": Path(bg_path).name if bg_path else "plain"})
    manifest.write_text(json.dumps({"n": n, "seed": seed, "lines": made}, ensure_ascii=False))
    return made


def load_training(out: Path, lines: list[dict]) -> np.ndarray:
    from PIL import Image

    from qmace_zoo.ocr import preprocess_line

    xs = []
    for ln in lines:
        with Image.open(out / ln["file"]) as im:
            xs.append(preprocess_line(im).astype(np.float16))  # half the memory; cast back per batch
    return np.stack(xs)


# ----------------------------------------------------------------------------------------------- start


class Ctx:
    """Model, lines, float graph, options, FP32 references: what every stage needs."""

    def __init__(self, a):
        from qmace.config import load_config
        from qmace.data import Sample
        from qmace.pipeline import load_float_graph
        from qmace.quantize.recipe import options_for
        from qmace_zoo import default_cache

        self.a = a
        self.cache = default_cache().expanduser()
        self.work = (a.work or self.cache / "ocr-qat").expanduser()
        self.work.mkdir(parents=True, exist_ok=True)
        self.rec = self.cache / "rapidocr" / B.REC_MODEL
        root = self.cache / B.LINES_DIR
        B.CHARSET[:] = B.recognizer_charset(self.rec)
        self.lines = B.load_lines(root)
        self.calib = [ln for ln in self.lines if ln.split == "calib"]
        self.xc = B.load_inputs(root, self.calib)
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="qat_ocr."))
        self.m = load_config(B.write_yaml(tmp / "q.yml", self.rec, quantize=True)).model(None)
        self.g = load_float_graph(self.m)
        self.samples = [Sample(str(i), {B.REC_INPUT: self.xc[i:i + 1]}) for i in range(len(self.xc))]
        self.opts = replace(options_for(self.m, RECIPE["schema"]), schema=RECIPE["schema"])
        self.fp32 = B.ort_plain(self.rec, a.threads)
        self.ref_c = B.run_all(lambda x: self.fp32.run([B.REC_OUTPUT], {B.REC_INPUT: x})[0], self.xc)
        self.ref_c_text = B.decode(self.ref_c)
        # the logits: the final Softmax's input, before the Flatten that the conversion puts around it
        soft = next(n for n in reversed(self.g.nodes) if n.op_type == "Softmax")
        producers = self.g.producers()
        self.logits = soft.inputs[0]
        while producers[self.logits].op_type in ("Flatten", "Reshape"):
            self.logits = producers[self.logits].inputs[0]

    def start(self):
        """The PTQ start: (PTQResult, options with the 16-bit choices); the sensitivity choice cached."""
        from qmace.quantize.recipe import PTQRecipe, run_ptq
        from qmace.quantize.sensitivity import REASON

        key = hashlib.sha256(json.dumps([RECIPE, hashlib.sha256(self.rec.read_bytes()).hexdigest(),
                                         [ln.file for ln in self.calib]]).encode()).hexdigest()[:16]
        cached = self.work / f"start-{key}"
        if (cached / "start.json").is_file():
            return self._load_start(cached)
        t0 = time.perf_counter()
        recipe = PTQRecipe(**RECIPE)
        res = run_ptq(self.g, self.samples, recipe, self.opts, num_threads=self.a.threads)
        wide = res.graph.metadata["quantization"]["wide_activations"]
        extra = {t: why for t, why in wide.items() if why == REASON}
        opts = replace(self.opts, wide_extra=extra)
        print(f"PTQ start: {len(wide)} uint16 activations ({len(extra)} by calibration sensitivity: "
              f"{', '.join(extra)}), {res.corrected_layers} layers bias-corrected, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        self._save_start(cached, res, extra)
        return res, opts

    @staticmethod
    def _save_start(d: Path, res, extra: dict[str, str]) -> None:
        """The PTQ start as two qmace model files (checksummed) and a JSON of its ranges (exact float repr)
        and 16-bit choices; ``start.json`` is written last, so a killed run leaves no loadable half."""
        from qmace.modelfile import save_graph

        d.mkdir(parents=True, exist_ok=True)
        save_graph(res.graph, d / "quantized.qmace")
        save_graph(res.float_graph, d / "float.qmace")
        doc = {"ranges": {k: [r.min, r.max] for k, r in res.ranges.items()}, "wide_extra": extra,
               "samples": res.samples, "corrected_layers": res.corrected_layers}
        (d / "start.json").write_text(json.dumps(doc))

    def _load_start(self, d: Path):
        """The cached start written by :meth:`_save_start`: (a PTQResult, the options with the 16-bit choices)."""
        from qmace.modelfile import load_graph
        from qmace.qmath import Range
        from qmace.quantize.recipe import PTQResult

        doc = json.loads((d / "start.json").read_text())
        res = PTQResult(graph=load_graph(d / "quantized.qmace"), float_graph=load_graph(d / "float.qmace"),
                        ranges={k: Range(*v) for k, v in doc["ranges"].items()}, samples=doc["samples"],
                        corrected_layers=doc["corrected_layers"])
        return res, replace(self.opts, wide_extra=doc["wide_extra"])

    def module(self):
        from qmace.qat import prepare

        res, opts = self.start()
        mod = prepare(res.float_graph, res.ranges, opts)
        mod.train_outputs = [self.logits]
        return mod, res, opts

    def teacher(self):
        """x (N, 3, 48, 320) -> the FP32 converted graph's logits (N, 40, 6625), line by line."""
        from qmace.runtime import Session

        s = Session(self.g.copy(), backend="onnxruntime", num_threads=self.a.threads)

        def run(x):
            x = np.asarray(x, np.float32)
            return np.concatenate([s.run({B.REC_INPUT: x[i:i + 1]}, observe=[self.logits])[self.logits]
                                   for i in range(len(x))])

        return run


def same_share(ref_text: list[str], probs: np.ndarray) -> float:
    got = B.decode(probs)
    return 100 * float(np.mean([a == b for a, b in zip(ref_text, got)]))


def quantized_session(mod, threads: int):
    from qmace.runtime import Session

    return Session(mod.quantized_graph(), backend="onnxruntime", num_threads=threads)


# ----------------------------------------------------------------------------------------------- stages


def stage_render(a) -> int:
    from qmace_zoo import default_cache

    cache = default_cache().expanduser()
    out = (a.work or cache / "ocr-qat").expanduser() / f"train-{a.train_lines}-s{a.seed}"
    t0 = time.perf_counter()
    lines = render_training(cache, out, a.train_lines, a.seed)
    print(f"{len(lines)} training lines in {out} ({time.perf_counter() - t0:.0f} s); "
          f"{len({ln['text'] for ln in lines})} distinct texts", flush=True)
    return 0


def _train_data(ctx, a) -> np.ndarray:
    out = ctx.work / f"train-{a.train_lines}-s{a.seed}"
    lines = render_training(ctx.cache, out, a.train_lines, a.seed)
    return load_training(out, lines)


def _batches(xt: np.ndarray, batch: int, steps: int, seed: int):
    """``epoch -> steps`` batches of ``batch`` training lines, drawn without replacement in an order that
    depends only on (seed, epoch)."""
    import torch

    def epoch_batches(epoch: int):
        rng = np.random.default_rng([seed, 11, epoch])
        order = rng.permutation(len(xt))
        need = steps * batch
        order = np.concatenate([order] * (need // len(order) + 1))[:need]
        return [torch.from_numpy(xt[order[i * batch:(i + 1) * batch]].astype(np.float32)) for i in range(steps)]

    return epoch_batches


def stage_time(a) -> int:
    import torch

    from qmace.qat.trainer import fit

    torch.set_num_threads(a.threads)
    ctx = Ctx(a)
    mod, res, _ = ctx.module()
    xt = ctx.xc[:a.batch * 3]
    t0 = time.perf_counter()
    fit(mod, [torch.from_numpy(xt[i * a.batch:(i + 1) * a.batch]) for i in range(3)], epochs=1, lr=1e-6,
        teacher=ctx.teacher(), temperature=a.temperature, distill_axis=-1)
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    q = quantized_session(mod, a.threads)
    share = same_share(ctx.ref_c_text, B.run_all(lambda x: q.run({B.REC_INPUT: x})[B.REC_OUTPUT], ctx.xc))
    print(f"3 steps of batch {a.batch}: {dt:.1f} s ({dt / 3:.1f} s per step, teacher included); validation "
          f"(quantized_graph + 100 lines) {time.perf_counter() - t1:.1f} s, {share:.1f}%", flush=True)
    return 0


class _Progress:
    """``fit``'s progress hook: prints the running mean loss every ``every`` steps."""

    def __init__(self, items, total: int, desc: str, every: int = 5):
        self.items, self.total, self.desc, self.every, self.k = items, total, desc, every, 0

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return self.total

    def set_postfix(self, loss: str) -> None:
        self.k += 1
        if self.k % self.every == 0:
            print(f"  {self.desc} step {self.k}/{self.total}: running loss {loss}", flush=True)


def stage_train(a) -> int:
    import torch

    from qmace.qat.trainer import fit

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    ctx = Ctx(a)
    mod, res, opts = ctx.module()
    xt = _train_data(ctx, a)
    print(f"{len(xt)} training lines, {len(ctx.xc)} held-out calibration lines; start ready "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    hist: list[dict] = []

    def validate(m) -> float:
        t1 = time.perf_counter()
        q = quantized_session(m, a.threads)
        probs = B.run_all(lambda x: q.run({B.REC_INPUT: x})[B.REC_OUTPUT], ctx.xc)
        s = same_share(ctx.ref_c_text, probs)
        am = 100 * float(np.mean(probs.argmax(-1) == ctx.ref_c.argmax(-1)))
        hist.append({"same": s, "argmax": am, "t": time.perf_counter() - t0})
        print(f"  held-out: decoded = FP32's {s:.1f}%, argmax {am:.2f}% ({time.perf_counter() - t1:.0f} s, "
              f"at {time.perf_counter() - t0:.0f} s)", flush=True)
        return s + am / 1000  # ties on lines broken by the argmax agreement

    ck = ctx.work / f"{a.tag}.ckpt"
    r = fit(mod, _batches(xt, a.batch, a.steps_per_epoch, a.seed), epochs=a.epochs, lr=a.lr, range_lr=a.range_lr,
            teacher=ctx.teacher(), temperature=a.temperature, distill_axis=-1, schedule=a.schedule,
            warmup=a.warmup, validate=validate, patience=a.patience, checkpoint=ck,
            resume=ck if a.resume and ck.is_file() else None, progress=_Progress,
            on_epoch=lambda e: print(f"epoch {e.epoch}/{e.epochs}: loss {e.loss:.4f}, held-out {e.metric:.3f}"
                                     f"{' (best)' if e.best else ''} at {time.perf_counter() - t0:.0f} s",
                                     flush=True))
    torch.save({"model": mod.state_dict()}, ctx.work / f"{a.tag}.best.pt")
    summary = {"tag": a.tag, "lr": a.lr, "range_lr": a.range_lr, "batch": a.batch, "epochs": a.epochs,
               "steps_per_epoch": a.steps_per_epoch, "temperature": a.temperature, "schedule": a.schedule,
               "warmup": a.warmup, "losses": r.losses, "metrics": r.metrics, "start": r.start_metric,
               "best": r.best_metric, "best_epoch": r.best_epoch, "history": hist,
               "train_lines": len(xt), "seconds": time.perf_counter() - t0}
    (ctx.work / f"{a.tag}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}), flush=True)
    return 0


def stage_final(a) -> int:
    import common
    import torch

    from qmace.runtime import Session

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    ctx = Ctx(a)
    mod, res, opts = ctx.module()
    best = ctx.work / f"{a.tag}.best.pt"  # written when train ends; else the last checkpoint's best state
    state = (torch.load(best, weights_only=True)["model"] if best.is_file()
             else torch.load(ctx.work / f"{a.tag}.ckpt", weights_only=True)["best_model"])
    mod.load_state_dict(state)
    mod.eval()
    qg = mod.quantized_graph()
    wide = qg.metadata["quantization"]["wide_activations"]
    # bit-exactness of the hand-over on a few held-out (calibration) lines
    sq_ref = Session(qg, backend="reference")
    sq = Session(qg, backend="onnxruntime", num_threads=a.threads)
    exact_ref = exact_ort = 0
    diffs = []
    for i in range(a.check_lines):
        x = ctx.xc[i:i + 1]
        e = mod(torch.from_numpy(x), exact=True).numpy()
        r_ = sq_ref.run({B.REC_INPUT: x})[B.REC_OUTPUT]
        o_ = sq.run({B.REC_INPUT: x})[B.REC_OUTPUT]
        exact_ref += int(np.array_equal(e, r_))
        exact_ort += int(np.array_equal(e, o_))
        diffs.append(float(np.max(np.abs(e.astype(np.float64) - o_))))
    step = float(qg.tensors[B.REC_OUTPUT].quant.scale) if qg.tensors[B.REC_OUTPUT].is_quantized else float("nan")
    check = (f"module(x, exact=True) vs quantized_graph(): reference runtime bit-exact on {exact_ref} of "
             f"{a.check_lines} lines, onnxruntime backend on {exact_ort} of {a.check_lines} (max |diff| "
             f"{max(diffs):.3g}; output step {step:.3g})")
    print(check, flush=True)
    # the ONE evaluation on the evaluation lines
    root = ctx.cache / B.LINES_DIR
    evals = [ln for ln in ctx.lines if ln.split == "eval"]
    xe = B.load_inputs(root, evals)
    kinds = [ln.kind for ln in evals]
    ref = B.run_all(lambda x: ctx.fp32.run([B.REC_OUTPUT], {B.REC_INPUT: x})[0], xe)
    ref_text = B.decode(ref)
    s_ptq = Session(res.graph, backend="onnxruntime", num_threads=a.threads)
    label_ptq = "PTQ start: int8 --method percentile --percentile 99.99 --sensitivity_16bit 16"
    label_qat = f"QAT distillation ({a.tag}) from that start, module.quantized_graph()"
    sessions = {"FP32 (ONNX Runtime, original model)": lambda x: ctx.fp32.run([B.REC_OUTPUT], {B.REC_INPUT: x})[0],
                label_ptq: lambda x: s_ptq.run({B.REC_INPUT: x})[B.REC_OUTPUT],
                label_qat: lambda x: sq.run({B.REC_INPUT: x})[B.REC_OUTPUT]}
    rows = {}
    for label, fn in sessions.items():
        got = ref if label.startswith("FP32") else B.run_all(fn, xe)
        rows[label] = B.metrics(ref, got, kinds, ref_text)
        print(f"{label}: {rows[label]['same']:.1f}%", flush=True)
    lat = common.interleaved_medians({k: (lambda fn=fn: fn(xe[:1])) for k, fn in sessions.items()},
                                     repeats=a.repeats)
    base = lat["FP32 (ONNX Runtime, original model)"]
    n = len(evals)
    print("\n" + B.results_table(rows, lat, base, kinds, ref_text, a.threads))
    print(f"\nuint16 activations in the QAT model: {len(wide)} ({sum(w == 'calibration sensitivity' for w in wide.values())}"
          f" by calibration sensitivity); {check}")
    for label in (label_ptq, label_qat):
        diff = [(ref_text[i], rows[label]["texts"][i]) for i in range(n) if ref_text[i] != rows[label]["texts"][i]]
        print(f"- {label}: " + "; ".join(f"`{x}` -> `{y}`" for x, y in diff[:5]))
    print(f"\n{common.machine_note()}; run time {time.perf_counter() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=["render", "start", "time", "train", "final"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="default <cache>/ocr-qat")
    ap.add_argument("--train-lines", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--range-lr", type=float, default=None, help="default: 10x --lr")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--steps-per-epoch", type=int, default=25)
    ap.add_argument("--schedule", default="cosine")
    ap.add_argument("--warmup", type=float, default=0.05)
    ap.add_argument("--patience", type=int, default=None)
    ap.add_argument("--tag", default="qat")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--check-lines", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args(argv)
    if a.range_lr is None:
        a.range_lr = 10 * a.lr
    if a.stage == "render":
        return stage_render(a)
    if a.stage == "start":
        Ctx(a).start()
        return 0
    return {"time": stage_time, "train": stage_train, "final": stage_final}[a.stage](a)


if __name__ == "__main__":
    sys.exit(main())
