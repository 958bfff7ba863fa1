#!/usr/bin/env python3
"""A/B of the uint8 equalization rule on MobileNetV2 (issue 10 item 5): ``run_ptq``'s per-schema rule
(per-tensor weights: no producer's range grows, no consumer free) against the per-channel rule (``equalize_on``
without the schema), everything else equal (percentile 99.95, bias correction or AdaRound, 64 calibration
stamps, 233 evaluation stamps, logits vs FP32 ONNX Runtime).

    python benchmarks/ab_uint8_equalization.py [--rules per_tensor,per_channel]
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
from qmace.quantize.recipe import options_for, run_ptq
from qmace.runtime import Session


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", default="per_tensor,per_channel")
    ap.add_argument("--rows", default="percentile 99.95 +equalization,percentile 99.95 +equalization +AdaRound")
    args = ap.parse_args()
    logging.getLogger("qmace").setLevel(logging.ERROR)
    onnx_path = common.mobilenet_onnx(None)
    xc, _ = common.stamp_images("calib")
    xe, pe = common.stamp_images("eval")
    labels = common.labels_for(pe)
    m1 = load_config(common.write_yaml(Path(tempfile.mkdtemp()), onnx_path, batch=1)).model()
    g1 = load_float_graph(m1)
    fp32 = common.ort_session(onnx_path, 1)
    ref = common.run_batched(lambda a: fp32.run([common.OUTPUT], {common.INPUT: a})[0], xe)
    schema_rule = recipe_module.equalize_on
    try:
        for rule in args.rules.split(","):
            if rule == "per_channel":  # run_ptq looks equalize_on up in its module at call time
                recipe_module.equalize_on = lambda g, s, t=None, schema=None: schema_rule(g, s, t, None)
            else:
                recipe_module.equalize_on = schema_rule
            for key in args.rows.split(","):
                res = run_ptq(g1, lambda: samples(xc), recipe_for(key, "uint8"), options_for(m1), num_threads=1)
                s = Session(res.graph, backend="onnxruntime", num_threads=1)
                lg = common.run_batched(lambda a, s=s: s.run({common.INPUT: a})[common.OUTPUT], xe)
                mm = common.logits_metrics(ref, lg, labels)
                print(f"uint8 {key}, {rule} rule: top-1 agreement {mm['agree']:.2f}%, SQNR {mm['sqnr']:.2f} dB",
                      flush=True)
    finally:
        recipe_module.equalize_on = schema_rule
    return 0


if __name__ == "__main__":
    sys.exit(main())
