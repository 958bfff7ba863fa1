"""bench_ptq.py's calibration-memory runs: `run_ptq` by one recipe in a fresh process per (recipe, sample
count), peak RSS growth compared between sample counts; plus the method labels and recipes the benchmark
shares with them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import common
import numpy as np

from qmace.config import load_config
from qmace.data import Sample
from qmace.pipeline import load_float_graph
from qmace.quantize.recipe import PTQRecipe, options_for, run_ptq

BENCH = Path(__file__).with_name("bench_ptq.py")

ALL_METHODS = {  # label -> (method, options)
    "mace P=0": ("mace", {"percentile": 0.0}),
    "mace P=5": ("mace", {"percentile": 5.0}),
    "percentile 99.95": ("percentile", {"percentile": 99.95}),
    "percentile 99.99": ("percentile", {"percentile": 99.99}),
    "percentile 99.999": ("percentile", {"percentile": 99.999}),
    "entropy": ("entropy", {}),
    "mse": ("mse", {}),
}
EQ_TAG = " +equalization"
ADAROUND_TAG = " +AdaRound"


def recipe_for(label: str, schema: str, bias_correction: bool = True, adaround_iters: int = 400) -> PTQRecipe:
    """The PTQ recipe of a row label: an ALL_METHODS key, then optionally EQ_TAG, then optionally ADAROUND_TAG."""
    adaround = label.endswith(ADAROUND_TAG)
    label = label.removesuffix(ADAROUND_TAG)
    equalize = label.endswith(EQ_TAG)
    method, opts = ALL_METHODS[label.removesuffix(EQ_TAG)]
    return PTQRecipe(method=method, percentile=opts.get("percentile"), equalize=equalize,
                     bias_correction=bias_correction, adaround=adaround, adaround_iters=adaround_iters,
                     schema=schema)


def samples(x: np.ndarray, n: int | None = None):
    """`n` single-image samples cycling through `x` (all of `x` once when n is None)."""
    n = len(x) if n is None else n
    for i in range(n):
        yield Sample(f"_{i}", {common.INPUT: x[i % len(x)][None]})



def calib_memory_child(args) -> int:
    """Child mode: `run_ptq` (int8) by the recipe of `--_method` on `--_n` samples: for a `... +equalization`
    label first the channel-maxima pass and `equalize_activations`, then calibration with bias correction's
    channel means (or AdaRound's input statistics for a `... +AdaRound` label), `correct_biases` / `adaround`
    and the quantization; print peak RSS growth as JSON."""
    xc = np.load(args._images)
    m = load_config(args._yaml).model()
    g = load_float_graph(m)
    recipe = recipe_for(args._method, "int8", adaround_iters=args.adaround_iters)
    peak_load = common.peak_rss_mb()  # loading the model and images
    reset = common.reset_peak_rss()
    before = common.current_rss_mb()
    t0 = time.perf_counter()
    res = run_ptq(g, lambda: samples(xc, args._n), recipe, options_for(m), num_threads=args.threads)
    dt = time.perf_counter() - t0
    peak = common.peak_rss_mb()  # VmHWM: this process only (ru_maxrss would include the forking parent's)
    if not reset:
        peak = max(peak, peak_load)
    print(json.dumps({"n": res.samples, "tensors": len(res.ranges), "rss_before": before, "peak_load": peak_load,
                      "peak_reset": reset, "peak": max(peak, peak_load), "growth": peak - before, "seconds": dt}))
    return 0


def memory_runs(args, xc, tmp, yaml1, T, times) -> list[str]:
    """The memory runs of `--mem-methods` x sample counts, `--mem-parallel` child processes at a time."""
    t0 = time.perf_counter()
    img = tmp / "calib.npy"
    np.save(img, xc)
    jobs = []  # (label, n)
    for meth in [v.strip() for v in args.mem_methods.split(",") if v.strip()]:
        ns = args.mem_adaround_samples if meth.endswith(ADAROUND_TAG) else args.mem_samples
        jobs += [(meth, int(n)) for n in ns.split(",")]
    results: dict[tuple[str, int], dict] = {}
    running: list = []
    pending = list(jobs)
    while pending or running:
        while pending and len(running) < max(1, args.mem_parallel):
            meth, n = pending.pop(0)
            cmd = [sys.executable, str(BENCH), "--_mem-child", "--_images", str(img), "--_yaml", str(yaml1),
                   "--_method", meth, "--_n", str(n), "--threads", str(T),
                   "--adaround-iters", str(args.mem_adaround_iters)]
            running.append(((meth, n), subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                        text=True)))
        time.sleep(1)
        for item in list(running):
            key, pr = item
            if pr.poll() is None:
                continue
            running.remove(item)
            so, se = pr.communicate()
            if pr.returncode != 0:
                print(se[-2000:], file=sys.stderr)
                continue
            results[key] = json.loads(so.strip().splitlines()[-1])
            print(f"  memory {key[0]} @{key[1]}: growth {results[key]['growth']:.1f} MB, "
                  f"{results[key]['seconds']:.0f} s", flush=True)
    mem_rows = []
    for meth in dict.fromkeys(j[0] for j in jobs):
        ns = sorted(n for (mm, n) in results if mm == meth)
        if len(ns) < 2:
            continue
        a, b = results[(meth, ns[0])], results[(meth, ns[-1])]
        what = ("run_ptq: calibrate + AdaRound statistics, adaround(), quantize" if meth.endswith(ADAROUND_TAG)
                else "run_ptq: calibrate + channel means, correct_biases(), quantize")
        if EQ_TAG in meth:
            what = "channel-maxima pass, equalize, " + what
        mem_rows.append([meth, what, f"{ns[0]} / {ns[-1]}", f"{a['growth']:.1f}", f"{b['growth']:.1f}",
                         f"{100 * (b['growth'] - a['growth']) / a['growth']:+.1f}%",
                         f"{a['peak']:.0f} / {b['peak']:.0f}",
                         f"{100 * (b['peak'] - a['peak']) / a['peak']:+.1f}%",
                         f"{a['seconds']:.0f} / {b['seconds']:.0f}"])
    mt = ["", ("### Calibration peak memory (64 images cycled to N samples; fresh process each; "
               f"{args.mem_parallel} at a time)"), "",
          ("Growth = peak RSS during the measured steps minus RSS just before them (includes building the ORT "
           "session with every activation as an output)."), "",
          common.md_table(["method", "measured steps", "samples N1 / N2", "growth MB @N1", "growth MB @N2",
                           "growth change", "process peak MB", "process peak change", "seconds"], mem_rows)]
    times["calibration memory runs"] = time.perf_counter() - t0
    print("\n".join(mt), flush=True)
    return mt
