"""What ``qmace run`` prints: per-backend latency and per-op time, the ``--validate`` table, and the
side-by-side comparison of several backends (``--backend a,b``)."""

from __future__ import annotations

import math


def _criterion(check) -> str:
    """What decided a --validate row: the YAML's metric and threshold, or MACE's cosine (rel-error where the
    reference is ~0)."""
    if check.metric == "cosine":
        return check.comparison.criterion
    return f"{check.metric}{'>=' if check.metric in ('sqnr', 'ctc_greedy') else '<='}{check.threshold:.3g}"


def print_backend_comparison(cmp) -> None:
    """Print each backend's report, then the median latencies relative to the first backend and how far each
    backend's outputs are from the first's.

    Args:
        cmp: the ``BackendComparison`` of ``qmace.api.run`` with several backends.
    """
    first = cmp.reports[0].backend
    for rep in cmp.reports:
        print_run_report(rep, True)
    print(f"median latency relative to {first} (interleaved runs):")
    for rep in cmp.reports:
        line = f"  {rep.backend:<12} {cmp.median_ms(rep.backend):9.3f} ms  {cmp.median_ms(first) / cmp.median_ms(rep.backend):5.2f}x"
        checks = cmp.versus_first.get(rep.backend)
        if checks:
            worst = min(checks, key=lambda c: c.comparison.cosine).comparison
            line += (f"  outputs vs {first}: min cosine {worst.cosine:.6f}, "
                     f"max abs diff {max(c.comparison.max_abs_error for c in checks):.4g}")
        print(line)


def print_run_report(rep, benchmark: bool) -> None:
    """Print one backend's run: latency percentiles (with ``benchmark`` or when timed), per-op times, and the
    ``--validate`` table with the criterion that decided each row.

    Args:
        rep: the ``RunReport``.
        benchmark: print the latency line even without timed runs.
    """
    if benchmark or rep.latencies_ms:
        pct = rep.latency_percentiles()
        print(f"{rep.backend}: {rep.samples} sample(s), {len(rep.latencies_ms)} run(s), latency ms: "
              + ", ".join(f"{k} {v:.3f}" for k, v in pct.items()))
    if rep.op_times_ms:
        by_type: dict[str, float] = {}
        for node, ms in rep.op_times_ms.items():
            by_type[rep.op_types[node]] = by_type.get(rep.op_types[node], 0.0) + ms
        total = sum(by_type.values()) or 1.0
        print("per-op time (reference backend, ms per run):")
        for op, ms in sorted(by_type.items(), key=lambda kv: -kv[1]):
            print(f"  {op:<24} {ms:9.3f}  {100 * ms / total:5.1f}%")
        print("slowest nodes:")
        for node, ms in sorted(rep.op_times_ms.items(), key=lambda kv: -kv[1])[:10]:
            print(f"  {node:<40} {rep.op_types[node]:<16} {ms:9.3f}")
    if rep.checks:
        print(f"validation against {rep.oracle} (threshold: cosine >= {rep.threshold}); where the reference "
              f"is ~0, relative error <= {math.sqrt(2 * max(0.0, 1 - rep.threshold)):.3g} decides:")
        argmax = any(not math.isnan(c.comparison.argmax_agreement) for c in rep.checks)  # classifier outputs only
        ctc = any(c.metric == "ctc_greedy" for c in rep.checks)  # share of sequences decoded alike
        ws = max([6, *(len(c.sample or "-") for c in rep.checks)])  # columns as wide as the longest name
        wo = max([6, *(len(c.output) for c in rep.checks)])
        print(f"  {'sample':<{ws}} {'output':<{wo}} {'cosine':>10} {'SQNR dB':>9} {'max abs err':>12} {'rel err':>9} "
              f"{'decided by':>10}" + (f" {'argmax':>7}" if argmax else "") + (f" {'CTC same':>8}" if ctc else ""))
        for c in rep.checks:
            cmp = c.comparison
            ok = "" if c.passed else "  FAIL"
            sqnr = "ref~0" if cmp.sqnr_db is None else f"{cmp.sqnr_db:.2f}"
            agree = "-" if math.isnan(cmp.argmax_agreement) else f"{cmp.argmax_agreement:.1%}"
            print(f"  {c.sample or '-':<{ws}} {c.output:<{wo}} {cmp.cosine:10.6f} {sqnr:>9} {cmp.max_abs_error:12.4g} "
                  f"{cmp.rel_error:9.3g} {_criterion(c):>10}" + (f" {agree:>7}" if argmax else "")
                  + (f" {cmp.ctc_agreement:8.1%}" if ctc else "") + ok)
        print("validation " + ("passed" if rep.passed else "FAILED"))
