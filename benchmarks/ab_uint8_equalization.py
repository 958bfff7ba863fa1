#!/usr/bin/env python3
"""A/B of the uint8 equalization rule on MobileNetV2 (issue 10 item 5), everything else equal (percentile 99.95,
bias correction or AdaRound, 64 calibration stamps, logits vs FP32 ONNX Runtime). Rules:

- ``per_tensor``: ``equalize_activations(per_tensor_weights=True)`` (activation equalization, no producer's
  range grows, no consumer free; the rule of the s2-collapse fix)
- ``per_channel``: ``equalize_activations`` with the per-channel (``int8``) rules
- ``cle``: ``cross_layer_equalize`` (per-tensor cross-layer equalization, qmace/quantize/cle.py)
- ``cle+act``: ``cle``, then ``per_tensor`` on the leveled model (``scaled_maxima``, no second pass): what
  ``run_ptq`` does for ``uint8`` since issue 10's run 3 (``cle.equalize_per_tensor_weights``)
- ``none``: no equalization
- ``schema``: whatever ``run_ptq`` does for ``uint8`` on this code

``--split calib`` measures on the 64 calibration stamps themselves (the development metric: every choice of
rule and setting is made there); ``--split eval`` on the 233 evaluation stamps (final figures only).

    python benchmarks/ab_uint8_equalization.py [--rules per_tensor,per_channel,cle,cle+act] [--split calib]
        [--rows "percentile 99.95 +equalization,percentile 99.95 +equalization +AdaRound"]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from ptq_memory import recipe_for, samples

from qmace.config import load_config
from qmace.pipeline import load_float_graph
from qmace.quantize import recipe as recipe_module
from qmace.quantize.cle import cross_layer_equalize, scaled_maxima
from qmace.quantize.equalize import ChannelMaxima, equalize_activations
from qmace.quantize.recipe import calibrate, options_for, run_ptq
from qmace.runtime import Session


def _rule(name: str, schema_rule):
    """An ``equalize_on`` replacement applying rule ``name`` (run_ptq looks it up in its module at call time)."""
    if name == "schema":
        return schema_rule
    if name == "none":
        return lambda g, s, t=None, schema=None: (g, [])
    if name == "per_channel":
        return lambda g, s, t=None, schema=None: schema_rule(g, s, t, None)

    def on(g, s, t=None, schema=None):
        mx = ChannelMaxima(g)
        calibrate(g, s, None, t, observers=[mx])
        if name == "per_tensor":
            return equalize_activations(g, mx, per_tensor_weights=True)
        gc, groups = cross_layer_equalize(g, mx)
        if name == "cle":
            return gc, groups
        if name == "cle+act":
            ga, more = equalize_activations(gc, scaled_maxima(mx, groups), per_tensor_weights=True)
            return ga, groups + more
        raise SystemExit(f"unknown rule {name}")
    return on


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", default="per_tensor,per_channel,cle,cle+act")
    ap.add_argument("--rows", default="percentile 99.95 +equalization,percentile 99.95 +equalization +AdaRound")
    ap.add_argument("--split", choices=("calib", "eval"), default="calib")
    ap.add_argument("--schema", default="uint8")
    args = ap.parse_args()
    logging.getLogger("qmace").setLevel(logging.ERROR)
    onnx_path = common.mobilenet_onnx(None)
    xc, _ = common.stamp_images("calib")
    xe, pe = common.stamp_images(args.split)
    labels = common.labels_for(pe)
    m1 = load_config(common.write_yaml(Path(tempfile.mkdtemp()), onnx_path, batch=1)).model()
    g1 = load_float_graph(m1)
    fp32 = common.ort_session(onnx_path, 1)
    ref = common.run_batched(lambda a: fp32.run([common.OUTPUT], {common.INPUT: a})[0], xe)
    schema_rule = recipe_module.equalize_on
    print(f"{args.schema}, measured on the {len(xe)} {args.split} stamps", flush=True)
    try:
        for rule in args.rules.split(","):
            recipe_module.equalize_on = _rule(rule, schema_rule)
            for key in args.rows.split(","):
                res = run_ptq(g1, lambda: samples(xc), recipe_for(key, args.schema), options_for(m1), num_threads=1)
                s = Session(res.graph, backend="onnxruntime", num_threads=1)
                lg = common.run_batched(lambda a, s=s: s.run({common.INPUT: a})[common.OUTPUT], xe)
                mm = common.logits_metrics(ref, lg, labels)
                print(f"{args.schema} {key}, {rule} rule: top-1 agreement {mm['agree']:.2f}%, SQNR {mm['sqnr']:.2f} dB",
                      flush=True)
    finally:
        recipe_module.equalize_on = schema_rule
    return 0


if __name__ == "__main__":
    sys.exit(main())
