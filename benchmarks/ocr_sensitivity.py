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
    if steps & {"diagnose", "tensors", "weights", "ranges"}:  # fake quantization of the equalized float graph
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

    def fake(ctl, idx=None) -> dict:
        idx = list(range(len(feeds))) if idx is None else idx
        return judge([runner.run(feeds[i], ctl) for i in idx], idx)

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

    if "sweep" in steps:
        # run_ptq's steps for the default recipe with --method (equalization, one calibration pass, bias
        # correction), spelled out so that the ranking --sensitivity_16bit measures (on the equalized graph and
        # its ranges, before bias correction) and every model of the sweep share one calibration
        from qmace.quantize.bias_correction import ChannelMeans, correct_biases
        from qmace.quantize.recipe import equalize_on

        recipe = PTQRecipe(method=a.method, percentile=a.percentile, schema=a.schema)
        eq, _ = equalize_on(g, samples, a.threads, a.schema)
        cal, means = recipe.calibrator(), ChannelMeans(eq)
        calibrate(eq, samples, cal, a.threads, observers=[means])
        ranges = cal.ranges()
        if a.method != "mace":
            ranges, _ = saturating_input_ranges(eq, ranges, cal.extrema())
        rank_plan = plan_quantization(eq, ranges, opts)
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
        import common
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
        fp32 = ort.InferenceSession(str(rec), so, providers=["CPUExecutionProvider"])
        x1 = feeds[0]
        fns = {"fp32": lambda: fp32.run([B.REC_OUTPUT], x1)}
        fns.update({n: (lambda s=s: s.run(x1)) for n, s in sessions.items()})
        lat = common.interleaved_medians(fns, repeats=a.repeats)
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


if __name__ == "__main__":
    sys.exit(main())
