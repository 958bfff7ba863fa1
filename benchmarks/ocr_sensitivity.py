"""Issue 16: where PP-OCRv4 rec loses its text at 8 bits, measured on the CALIBRATION lines only (nothing here
reads the evaluation lines), and the accuracy/latency trade-off of the sensitivity 16-bit rule.

    python benchmarks/ocr_sensitivity.py [--threads 1] [--steps diagnose,tensors,ranges,sweep]
                                         [--schema int8] [--subset-step 10] [--json OUT]

Steps (each on the 100 calibration lines; "decoded = FP32's" is the benchmark's task metric, greedy CTC):
- ``diagnose``: fake quantization (``qmace.quantize.sensitivity.FakeQuantRunner`` on the equalized float graph,
  min/max ranges, no bias correction) of the weights only, the activations only, both; and the real int8 model
  of ``qmace quantize``'s default recipe;
- ``tensors``: each activation alone at 8 bits (everything else float), on every ``--subset-step``-th
  calibration line: output SQNR, decoded = FP32's, argmax agreement;
- ``weights``: each layer's weights alone (subset), and groups of layers (all lines);
- ``ranges``: the range methods (min/max, MACE percentile of per-sample extrema, histogram percentile, mse,
  entropy) in fake quantization with every weight and activation quantized;
- ``recipes``: real quantized models of ``qmace quantize``'s recipes (bias correction on/off, AdaRound, range
  methods);
- ``wcap``: the weight cap (issue 16, session 5): each layer's weights alone (ranked, subset); weights-only
  fake quantization with the K lowest-ranked layers kept float or given 16-bit symmetric per-channel weights;
  MSE-optimal per-channel weight clipping; then Run 5's activation plan (percentile 99.99 + the 27 uint16
  activations of the cached QAT start, ``benchmarks/qat_ocr.py start``) with int8 and with float weights;
- ``layers``: real quantized models (``run_ptq``'s steps with ``--method``, one calibration) with
  ``--layers-16bit`` sensitivity-chosen uint16 activations and the K layers of ``--layer-sweep`` kept float by
  the weight rule (``--sensitivity_float_layers K``: lowest weights-alone SQNR on the first ``--rank-samples``
  lines; their biases not corrected): decoded = FP32's on the calibration lines and latency;
- ``backends``: the real model of ``run_ptq`` with ``--method`` and ``--sensitivity-float-layers K`` (every
  activation uint16 with ``--all-uint16``) on qmace's onnxruntime and reference backends, on the first
  ``--backend-lines`` calibration lines: how far the float islands on ONNX Runtime are from the reference;
- ``sweep``: real quantized models (``run_ptq`` with the default recipe) with the N most sensitive activations
  (the rule of ``--sensitivity_16bit N``, ranked on the first 8 calibration lines) in uint16: decoded = FP32's
  on the calibration lines and the latency of each model (one interleaved run, 1 thread).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ocr as B  # loads qmace_zoo the way bench_ocr does


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", default="diagnose,tensors,ranges,sweep")
    ap.add_argument("--schema", default="int8")
    ap.add_argument("--no-equalization", action="store_true", help="fake-quant steps on the unequalized graph")
    ap.add_argument("--subset-step", type=int, default=10, help="tensors: every k-th calibration line (default 10)")
    ap.add_argument("--rank-samples", type=int, default=8, help="sweep: calibration lines the ranking uses "
                    "(the first ones, as --sensitivity_samples; default 8)")
    ap.add_argument("--sweep", default="0,2,4,8,16,32", help="sweep: numbers of sensitivity-chosen uint16 tensors")
    ap.add_argument("--layer-sweep", default="0,1,2,4,8,16", help="layers: numbers of layers kept float")
    ap.add_argument("--layer-grid", default="", help="layers: comma-separated N:K pairs (N sensitivity-chosen "
                    "uint16 activations or 'all', K layers kept float); overrides --layer-sweep / --layers-16bit")
    ap.add_argument("--sensitivity-float-layers", type=int, default=32, help="backends: K")
    ap.add_argument("--all-uint16", action="store_true", help="backends: every activation uint16")
    ap.add_argument("--backend-lines", type=int, default=2, help="backends: calibration lines compared")
    ap.add_argument("--layers-16bit", type=int, default=16, help="layers: sensitivity-chosen uint16 activations")
    ap.add_argument("--uint16-from-qat-start", action="store_true", help="layers: take the sensitivity-chosen "
                    "uint16 activations from the cached start of benchmarks/qat_ocr.py (the same measurement on the "
                    "same lines with percentile 99.99; saves ~6 min) instead of measuring them again")
    ap.add_argument("--method", default="mace", help="sweep: range method of the recipe (default mace = min/max)")
    ap.add_argument("--percentile", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--recipes", default="", help="recipes: ';'-separated labels to run (default: all)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    steps = set(a.steps.split(","))

    from qmace.config import load_config
    from qmace.data import Sample
    from qmace.pipeline import load_float_graph
    from qmace.quantize import sensitivity as S
    from qmace.quantize.calibration import make_calibrator
    from qmace.quantize.dense import saturating_input_ranges
    from qmace.quantize.plan import plan_quantization
    from qmace.quantize.recipe import PTQRecipe, calibrate, options_for, run_ptq
    from qmace.runtime import Session
    from qmace_zoo import default_cache

    t0 = time.perf_counter()
    cache = default_cache().expanduser()
    rec = cache / "rapidocr" / B.REC_MODEL
    root = cache / B.LINES_DIR
    B.CHARSET[:] = B.recognizer_charset(rec)
    calib = [ln for ln in B.load_lines(root) if ln.split == "calib"]  # calibration lines only
    xc = B.load_inputs(root, calib)
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="ocr_sens."))
    m = load_config(B.write_yaml(tmp / "q.yml", rec, quantize=True)).model(None)
    g = load_float_graph(m)
    samples = [Sample(str(i), {B.REC_INPUT: xc[i:i + 1]}) for i in range(len(xc))]
    feeds = [s.feeds for s in samples]
    opts = replace(options_for(m, a.schema), schema=a.schema)
    fp32 = B.ort_plain(rec, a.threads)  # the reference: the original model in ONNX Runtime
    ref = [[fp32.run([B.REC_OUTPUT], f)[0]] for f in feeds]
    ref_text = B.decode(np.concatenate([r[0] for r in ref]))
    runner = plan = fg = None
    if steps & {"diagnose", "tensors", "weights", "ranges", "wcap"}:  # fake quantization of the equalized float graph
        base = run_ptq(g, samples, PTQRecipe(bias_correction=False, equalize=not a.no_equalization, schema=a.schema),
                       opts, num_threads=a.threads)
        fg, table = base.float_graph, base.ranges
        plan = plan_quantization(fg, table, opts)
        runner = S.FakeQuantRunner(fg, plan, a.threads)
        print(f"{len(calib)} calibration lines; {len(runner.tensors)} activations with own parameters "
              f"({len(S.candidates(fg, plan))} 8-bit, the rest uint16 by the structural rule), "
              f"{len(runner.weight_inputs)} weights ({time.perf_counter() - t0:.0f} s)", flush=True)
    out: dict = {"calibration_lines": len(calib), "schema": a.schema}

    def judge(got: list[list[np.ndarray]], idx: list[int]) -> dict:
        txt = B.decode(np.concatenate([o[0] for o in got]))
        same = float(np.mean([ref_text[i] == t for i, t in zip(idx, txt)]))
        r = np.concatenate([ref[i][0] for i in idx]).argmax(-1)
        return {"same": 100 * same, "argmax": 100 * float(np.mean(r == np.concatenate([o[0] for o in got]).argmax(-1))),
                "sqnr_db": S.output_sqnr([ref[i] for i in idx], got)}

    def fake(ctl, idx=None, rn=None) -> dict:
        idx = list(range(len(feeds))) if idx is None else idx
        rn = runner if rn is None else rn
        return judge([rn.run(feeds[i], ctl) for i in idx], idx)

    def show(label: str, r: dict) -> None:
        print(f"{label}: decoded = FP32's {r['same']:.1f}%, argmax {r['argmax']:.2f}%, output SQNR "
              f"{r['sqnr_db']:.2f} dB ({time.perf_counter() - t0:.0f} s)", flush=True)

    planned = runner.planned_bits() if runner is not None else {}
    if "diagnose" in steps:
        d = out["diagnose"] = {}
        for label, ctl in [("weights only", runner.control({}, "all")),
                           ("activations only (structural rule widths)", runner.control(planned)),
                           ("activations only, every one uint16", runner.control({t: 16 for t in runner.tensors})),
                           ("weights + activations", runner.control(planned, "all")),
                           ("weights + every activation uint16", runner.control({t: 16 for t in runner.tensors}, "all"))]:
            d[label] = fake(ctl)
            show("fake quant, " + label, d[label])
        real = run_ptq(g, samples, PTQRecipe(schema=a.schema), opts, num_threads=a.threads)
        sq = Session(real.graph, backend="onnxruntime", num_threads=a.threads)
        d["real int8 model, default recipe"] = judge([[sq.run(f)[B.REC_OUTPUT]] for f in feeds], list(range(len(feeds))))
        show("real model, default recipe", d["real int8 model, default recipe"])

    if "tensors" in steps:
        sub = list(range(0, len(feeds), a.subset_step))
        producers = fg.producers()
        per = out["tensors"] = {}
        for t in runner.tensors:
            r = fake(runner.control({t: 8}), sub)
            r["op"] = producers[t].op_type if t in producers else "input"
            r["structural_16bit"] = planned[t] == 16
            per[t] = r
        for t, r in sorted(per.items(), key=lambda kv: kv[1]["sqnr_db"])[:25]:
            print(f"  {t} ({r['op']}{', uint16 by the structural rule' if r['structural_16bit'] else ''}): "
                  f"SQNR {r['sqnr_db']:.2f} dB, decoded = FP32's {r['same']:.0f}%, argmax {r['argmax']:.2f}%")

    if "weights" in steps:  # each layer's weights alone (subset), then groups of layers (all lines)
        sub = list(range(0, len(feeds), a.subset_step))
        readers = {i: n for n in fg.nodes for i in n.inputs}
        groups = {"conv backbone weights": [w for w in runner.weight_inputs if readers[w].op_type == "Conv"],
                  "MatMul weights of the attention neck": [w for w in runner.weight_inputs
                                                           if readers[w].op_type != "Conv" and readers[w].name != "p2o.MatMul.24"],
                  "output head weights (6625 classes)": [w for w in runner.weight_inputs
                                                         if readers[w].name == "p2o.MatMul.24"]}
        wl = out["weight_layers"] = {}
        for w in runner.weight_inputs:
            wl[w] = fake(runner.control({}, [w]), sub)
            wl[w].update(layer=readers[w].name, op=readers[w].op_type, shape=list(fg.tensors[w].shape))
        for w, r in sorted(wl.items(), key=lambda kv: kv[1]["sqnr_db"])[:12]:
            print(f"  weight {w} ({r['layer']}, {r['op']} {r['shape']}): SQNR {r['sqnr_db']:.2f} dB, decoded = "
                  f"FP32's {r['same']:.0f}%, argmax {r['argmax']:.2f}%")
        wg = out["weight_groups"] = {}
        for label, ws in groups.items():
            wg[label] = fake(runner.control({}, ws))
            show(f"fake quant, only the {label} ({len(ws)})", wg[label])


    if "wcap" in steps:
        out["wcap"] = weight_cap(a, fg, plan, runner, fake, show, opts, samples)

    if "ranges" in steps:
        methods = {"min/max (mace, P=0)": ("mace", {}), "mace P=0.1": ("mace", {"percentile": 0.1}),
                   "percentile 99.99": ("percentile", {"percentile": 99.99}),
                   "percentile 99.9": ("percentile", {"percentile": 99.9}), "mse": ("mse", {}),
                   "entropy": ("entropy", {})}
        cals = {k: make_calibrator(meth, **o) for k, (meth, o) in methods.items()}

        class Both:  # one calibration pass feeds every calibrator
            def observe(self, name, v):
                for c in cals.values():
                    c.observe(name, v)

        calibrate(fg, samples, Both(), a.threads)
        rr = out["ranges"] = {}
        for label, c in cals.items():
            t = c.ranges()
            if methods[label][0] != "mace":
                t, _ = saturating_input_ranges(fg, t, c.extrema())
            runner.plan = plan_quantization(fg, t, opts)
            rr[label] = {"weights + activations": fake(runner.control(planned, "all")),
                         "activations only": fake(runner.control(planned))}
            show(f"fake quant, ranges {label}, weights + activations", rr[label]["weights + activations"])
            show(f"fake quant, ranges {label}, activations only", rr[label]["activations only"])
        runner.plan = plan

    if "recipes" in steps:  # real quantized models of qmace quantize's recipes (its flags in the labels)
        recipes = {"default (min/max, bias correction)": PTQRecipe(schema=a.schema),
                   "--no_bias_correction": PTQRecipe(schema=a.schema, bias_correction=False),
                   "--adaround": PTQRecipe(schema=a.schema, adaround=True),
                   "--method mse": PTQRecipe(method="mse", schema=a.schema),
                   "--method percentile --percentile 99.99": PTQRecipe(method="percentile", percentile=99.99,
                                                                     schema=a.schema),
                   "--method mse --no_bias_correction": PTQRecipe(method="mse", bias_correction=False,
                                                                  schema=a.schema),
                   "--method mse --adaround": PTQRecipe(method="mse", adaround=True, schema=a.schema)}
        only = [x for x in a.recipes.split(";") if x]
        rs = out["recipes"] = {}
        for label, recipe in recipes.items():
            if only and label not in only:
                continue
            res = run_ptq(g, samples, recipe, opts, num_threads=a.threads)
            sq = Session(res.graph, backend="onnxruntime", num_threads=a.threads)
            rs[label] = judge([[sq.run(f)[B.REC_OUTPUT]] for f in feeds], list(range(len(feeds))))
            rs[label]["corrected_layers"] = res.corrected_layers
            show(f"real model, recipe {label} ({res.corrected_layers} layers refined)", rs[label])

    if "layers" in steps:
        out["layers"] = layer_sweep(a, g, samples, feeds, opts, judge, show, rec)

    if "backends" in steps:
        recipe = PTQRecipe(method=a.method, percentile=a.percentile, schema=a.schema,
                           sensitivity_float_layers=a.sensitivity_float_layers)
        o = replace(opts, wide_activations="all") if a.all_uint16 else opts
        q = run_ptq(g, samples, recipe, o, num_threads=a.threads).graph
        ort_s = Session(q, backend="onnxruntime", num_threads=a.threads)
        ref_s = Session(q, backend="reference")
        bk = out["backends"] = []
        for i in range(a.backend_lines):
            x, y = ort_s.run(feeds[i])[B.REC_OUTPUT], ref_s.run(feeds[i])[B.REC_OUTPUT]
            r = {"line": i, "max_abs_prob_diff": float(np.max(np.abs(x - y))),
                 "argmax_agree": 100 * float(np.mean(x.argmax(-1) == y.argmax(-1))),
                 "same_text": B.decode(x) == B.decode(y)}
            bk.append(r)
            print(f"backends, calibration line {i}: onnxruntime vs reference: max |prob diff| "
                  f"{r['max_abs_prob_diff']:.4g}, argmax agreement {r['argmax_agree']:.1f}%, same decoding "
                  f"{r['same_text']} ({time.perf_counter() - t0:.0f} s)", flush=True)
        print(f"backends, {len(bk)} lines: max |prob diff| {max(r['max_abs_prob_diff'] for r in bk):.4g}, "
              f"argmax agreement {np.mean([r['argmax_agree'] for r in bk]):.2f}%, same decoding on "
              f"{sum(r['same_text'] for r in bk)} lines", flush=True)

    if "sweep" in steps:
        # run_ptq's steps for the default recipe with --method (equalization, one calibration pass, bias
        # correction), spelled out so that the ranking --sensitivity_16bit measures (on the equalized graph and
        # its ranges, before bias correction) and every model of the sweep share one calibration
        from qmace.quantize.bias_correction import correct_biases

        eq, means, ranges, rank_plan = calibrated_plan(a, g, samples, opts)
        _, ranking = S.sensitive_activations(eq, rank_plan, feeds[:a.rank_samples], 10**6, a.threads)
        refined, _ = correct_biases(eq, means, a.schema)
        out["ranking"] = [(r.tensor, r.sqnr_db) for r in ranking]
        print("ranking (lowest SQNR first): " + ", ".join(f"{r.tensor} {r.sqnr_db:.1f}" for r in ranking[:40]),
              flush=True)
        from qmace.quantize.quantizer import quantize_graph

        sessions: dict = {}
        sw = out["sweep"] = {}
        for n in [int(x) for x in a.sweep.split(",")]:
            chosen = {r.tensor: S.REASON for r in ranking[:n]}
            q = quantize_graph(refined, ranges, replace(opts, wide_extra=chosen))
            sq = Session(q.graph, backend="onnxruntime", num_threads=a.threads)
            sessions[n] = sq
            sw[n] = judge([[sq.run(f)[B.REC_OUTPUT]] for f in feeds], list(range(len(feeds))))
            sw[n]["uint16_tensors"] = len(q.plan.wide)
            show(f"real model, {n} sensitivity-chosen + structural = {len(q.plan.wide)} uint16 tensors", sw[n])
        lat = latency_vs_fp32(a, rec, feeds[0], sessions)
        for n in sessions:
            sw[n]["ms"] = lat[n]
            sw[n]["speedup_vs_fp32"] = lat["fp32"] / lat[n]
        out["fp32_ms"] = lat["fp32"]
        print("\n| sensitivity-chosen uint16 tensors (N) | uint16 tensors in all | decoded = FP32's (100 calibration "
              "lines) | argmax | output SQNR | ms per line | speed-up vs FP32 |\n|---|---|---|---|---|---|---|")
        for n, r in sw.items():
            print(f"| {n} | {r['uint16_tensors']} | {r['same']:.1f}% | {r['argmax']:.2f}% | {r['sqnr_db']:.2f} dB | "
                  f"{r['ms']:.2f} | {r['speedup_vs_fp32']:.2f}x |")
        print(f"FP32 (ONNX Runtime) {lat['fp32']:.2f} ms", flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1, default=float))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    print(f"run time {time.perf_counter() - t0:.0f} s")
    return 0


def latency_vs_fp32(a, rec, x1, sessions: dict) -> dict:
    """Interleaved median ms per line of ONNX Runtime's FP32 recognizer (key ``"fp32"``) and of each session
    in ``sessions``, on the one input ``x1``, ``a.repeats`` rounds at ``a.threads`` threads."""
    import common

    fp32 = B.ort_plain(rec, a.threads)
    fns = {"fp32": lambda: fp32.run([B.REC_OUTPUT], x1)}
    fns.update({k: (lambda s=s: s.run(x1)) for k, s in sessions.items()})
    return common.interleaved_medians(fns, repeats=a.repeats)


def cached_starts() -> list[str]:
    """The ``start.json`` files of the PTQ starts ``benchmarks/qat_ocr.py start`` cached, sorted."""
    import glob

    from qmace_zoo import default_cache

    return sorted(glob.glob(str(default_cache().expanduser() / "ocr-qat" / "start-*" / "start.json")))


def calibrated_plan(a, g, samples, opts):
    """run_ptq's first steps for the default recipe with ``--method``, spelled out so that a sensitivity
    ranking and every model built after it share one calibration: equalization, one calibration pass that
    also gathers the channel means bias correction needs, the saturating-input rule, the plan.

    Returns:
        ``(equalized graph, channel means, ranges, plan)``.
    """
    from qmace.quantize.bias_correction import ChannelMeans
    from qmace.quantize.dense import saturating_input_ranges
    from qmace.quantize.plan import plan_quantization
    from qmace.quantize.recipe import PTQRecipe, calibrate, equalize_on

    recipe = PTQRecipe(method=a.method, percentile=a.percentile, schema=a.schema)
    eq, _ = equalize_on(g, samples, a.threads, a.schema)
    cal, means = recipe.calibrator(), ChannelMeans(eq)
    calibrate(eq, samples, cal, a.threads, observers=[means])
    ranges = cal.ranges()
    if a.method != "mace":
        ranges, _ = saturating_input_ranges(eq, ranges, cal.extrema())
    return eq, means, ranges, plan_quantization(eq, ranges, opts)


def int16_params(w: np.ndarray, axis: int):
    """Symmetric per-channel 16-bit weight parameters: scale = max|w| / 32767, codes in [-32767, 32767]."""
    from qmace import qmath

    w = np.asarray(w, np.float64)
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(w), axis=red)
    scale = np.where(amax == 0, 1.0, amax / 32767.0).astype(np.float32)
    return qmath.QuantParams(scale, np.zeros(scale.shape, np.int32), "int16", axis, narrow_range=True)


def mse_clip_params(w: np.ndarray, qp, grid: int = 100):
    """Per output channel, the clip ``a * max|w|`` (a in (0, 1], ``grid`` steps) minimizing ||w - Q(w)||^2 at
    the width of ``qp`` (symmetric, zero point 0)."""
    from qmace import qmath

    axis = qp.axis
    qmax = qp.qmax
    wc = np.moveaxis(np.asarray(w, np.float64), axis, 0).reshape(w.shape[axis], -1)
    amax = np.abs(wc).max(1)
    best_err = np.full(amax.shape, np.inf)
    best = amax.copy()
    for a in np.linspace(1.0, 0.2, grid):
        s = np.where(amax == 0, 1.0, a * amax / qmax).astype(np.float32).astype(np.float64)
        q = np.clip(np.rint(wc / s[:, None]), -qmax, qmax) * s[:, None]
        err = np.square(wc - q).sum(1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, s, best)
    return qmath.QuantParams(best.astype(np.float32), np.zeros(best.shape, np.int32), qp.dtype, axis,
                             narrow_range=True)


def plan_with_weights(plan, fn):
    """A copy of ``plan`` whose weight parameters are ``fn(weight_plan)`` (None: unchanged)."""
    new = replace(plan, weights=dict(plan.weights))
    for k, wp in plan.weights.items():
        qp = fn(wp)
        if qp is not None:
            new.weights[k] = replace(wp, params=qp)
    return new


def weight_cap(a, fg, plan, runner, fake, show, opts, samples) -> dict:
    """The ``wcap`` step (module docstring)."""
    from qmace.quantize import sensitivity as S
    from qmace.quantize.plan import plan_quantization

    t0 = time.perf_counter()
    res: dict = {}
    sub = list(range(0, len(samples), a.subset_step))
    readers = {i: n for n in fg.nodes for i in n.inputs}
    per = {w: fake(runner.control({}, [w]), sub) for w in runner.weight_inputs}
    rank = sorted(per, key=lambda w: per[w]["sqnr_db"])
    res["ranking"] = [(w, readers[w].name, list(fg.tensors[w].shape), per[w]["sqnr_db"], per[w]["same"]) for w in rank]
    print(f"weights ranked (alone quantized, every {a.subset_step}-th line), lowest SQNR first: "
          + ", ".join(f"{readers[w].name} {list(fg.tensors[w].shape)} {per[w]['sqnr_db']:.1f} dB" for w in rank[:16]),
          flush=True)
    ks = [0, 1, 2, 4, 8, 16]
    rows = res["weights_only"] = {}
    for k in ks:
        keep = set(rank[:k])
        r = fake(runner.control({}, [w for w in runner.weight_inputs if w not in keep]))
        rows[f"K={k} float"] = r
        show(f"weights only, K={k} lowest kept float", r)
    for k in ks[1:]:
        keep = set(rank[:k])
        p16 = plan_with_weights(plan, lambda wp, keep=keep: int16_params(fg.tensors[wp.tensor].data, wp.params.axis)
                                if wp.tensor in keep else None)
        r16 = S.FakeQuantRunner(fg, p16, a.threads)
        r = fake_with(r16, fake, r16.control({}, "all"))
        rows[f"K={k} int16"] = r
        show(f"weights only, K={k} lowest as 16-bit symmetric per channel", r)
    pm = plan_with_weights(plan, lambda wp: mse_clip_params(fg.tensors[wp.tensor].data, wp.params))
    rm = S.FakeQuantRunner(fg, pm, a.threads)
    rows["mse clip"] = fake_with(rm, fake, rm.control({}, "all"))
    show("weights only, MSE-optimal per-channel clipping, all layers", rows["mse clip"])
    for k in (4, 8, 16):
        keep = set(rank[:k])
        rows[f"mse clip, K={k} float"] = fake_with(rm, fake, rm.control({}, [w for w in rm.weight_inputs if w not in keep]))
        show(f"weights only, MSE clipping, K={k} lowest kept float", rows[f"mse clip, K={k} float"])
    print(f"wcap weights-only part {time.perf_counter() - t0:.0f} s", flush=True)
    # combined with Run 5's activation plan: the cached PTQ start (percentile 99.99, equalized, bias-corrected
    # for int8 weights, 16 sensitivity-chosen + 11 structural uint16 activations)
    from qmace.modelfile import load_graph
    from qmace.qmath import Range

    starts = cached_starts()
    if not starts:
        print("no cached QAT start (benchmarks/qat_ocr.py start): combined rows skipped")
        return res
    doc = json.loads(Path(starts[0]).read_text())
    g5 = load_graph(Path(starts[0]).parent / "float.qmace")
    p5 = plan_quantization(g5, {k: Range(*v) for k, v in doc["ranges"].items()},
                           replace(opts, wide_extra=doc["wide_extra"]))
    run5 = S.FakeQuantRunner(g5, p5, a.threads)
    bits5 = run5.planned_bits()
    res["run5_uint16"] = sum(b == 16 for b in bits5.values())
    comb = res["combined"] = {}
    comb["int8 weights (Run 5 plan)"] = fake_with(run5, fake, run5.control(bits5, "all"))
    show(f"Run 5 activations ({res['run5_uint16']} uint16) + int8 weights", comb["int8 weights (Run 5 plan)"])
    comb["float weights"] = fake_with(run5, fake, run5.control(bits5))
    show("Run 5 activations + float weights", comb["float weights"])
    # NOTE: this graph's biases are corrected for int8 weights, so "float weights" here keeps the int8 rounding's
    # mean error and reads FEWER lines than int8 weights (62% vs 70%, Run 7): float layers need their biases
    # uncorrected, which is what the ``layers`` step (real models) and the product rule do.
    print(f"wcap {time.perf_counter() - t0:.0f} s", flush=True)
    return res


def layer_sweep(a, g, samples, feeds, opts, judge, show, rec) -> dict:
    """The ``layers`` step (module docstring): run_ptq's steps spelled out so that every K shares one
    equalization, calibration and both rankings."""

    from qmace.quantize import sensitivity as S
    from qmace.quantize.bias_correction import correct_biases
    from qmace.quantize.quantizer import quantize_graph
    from qmace.runtime import Session

    t0 = time.perf_counter()
    eq, means, ranges, plan = calibrated_plan(a, g, samples, opts)
    grid = [(x.split(":")[0], int(x.split(":")[1])) for x in a.layer_grid.split(",")] if a.layer_grid else \
        [(str(a.layers_16bit), int(k)) for k in a.layer_sweep.split(",")]
    if a.uint16_from_qat_start and all(n == str(a.layers_16bit) for n, _ in grid):
        start = cached_starts()[0]
        wide16 = json.loads(Path(start).read_text())["wide_extra"]
        act_rank = list(wide16)
        print(f"uint16 activations from {start}: {len(wide16)}", flush=True)
    elif all(n == "all" for n, _ in grid):  # nothing to rank
        act_rank = []
    else:
        _, ar = S.sensitive_activations(eq, plan, feeds[:a.rank_samples], 10**6, a.threads)
        act_rank = [r.tensor for r in ar]
        print("activations ranked: " + ", ".join(f"{r.tensor} {r.sqnr_db:.1f}" for r in ar[:40]), flush=True)
    ks = [k for _, k in grid]
    _, ranking = S.sensitive_layers(eq, plan, feeds[:a.rank_samples], max(ks + [1]), a.threads)
    readers: dict[str, list[str]] = {}
    for wp in plan.weights.values():
        readers.setdefault(wp.tensor, []).append(wp.node)
    res: dict = {"ranking": [(r.tensor, readers[r.tensor], r.sqnr_db) for r in ranking], "act_ranking": act_rank}
    print(f"layers step: calibration + rankings {time.perf_counter() - t0:.0f} s; weights ranked: "
          + ", ".join(f"{'/'.join(readers[r.tensor])} {r.sqnr_db:.1f}" for r in ranking[:16]), flush=True)
    sessions = {}
    rows = []
    for n, k in grid:
        layers = {x: S.LAYER_REASON for r in ranking[:k] for x in readers[r.tensor]}
        refined, corrected = correct_biases(eq, means, a.schema, skip=set(layers))
        mode = "all" if n == "all" else "rule"
        wide = {} if n == "all" else {t: S.REASON for t in act_rank[:int(n)]}
        q = quantize_graph(refined, ranges, replace(opts, wide_activations=mode, wide_extra=wide, float_layers=layers))
        sq = Session(q.graph, backend="onnxruntime", num_threads=a.threads)
        key = f"N={n} K={k}"
        sessions[key] = sq
        rows.append((n, k, key))
        r = judge([[sq.run(f)[B.REC_OUTPUT]] for f in feeds], list(range(len(feeds))))
        r.update(uint16_tensors=len(q.plan.wide), float_layers=sorted(layers), corrected=corrected,
                 fallbacks=len(q.plan.fallbacks))
        res[key] = r
        show(f"real model, {key}: {len(q.plan.wide)} uint16, float layers {', '.join(sorted(layers))}", r)
    lat = latency_vs_fp32(a, rec, feeds[0], sessions)
    print("\n| sensitivity-chosen uint16 (N) | layers kept float (K) | uint16 tensors | decoded = FP32's (100 "
          "calibration lines) | argmax | output SQNR | ms per line | speed-up vs FP32 |\n|---|---|---|---|---|---|---|---|")
    for n, k, key in rows:
        res[key]["ms"] = lat[key]
        res[key]["speedup_vs_fp32"] = lat["fp32"] / lat[key]
        r = res[key]
        print(f"| {n} | {k} | {r['uint16_tensors']} | {r['same']:.1f}% | {r['argmax']:.2f}% | {r['sqnr_db']:.2f} dB | "
              f"{r['ms']:.2f} | {r['speedup_vs_fp32']:.2f}x |")
    res["fp32_ms"] = lat["fp32"]
    print(f"FP32 (ONNX Runtime) {lat['fp32']:.2f} ms; layers step {time.perf_counter() - t0:.0f} s", flush=True)
    return res


def fake_with(runner, fake, ctl, idx=None) -> dict:
    """``fake`` (main's closure over the calibration feeds) with another runner."""
    return fake(ctl, idx, runner)


if __name__ == "__main__":
    sys.exit(main())
