"""bench_ptq.py's `--diagnose`: where the int8 error of the MobileNetV2 PTQ model comes from (per-layer SQNR on
the reference backend, ablations on the lowered QDQ model, single-tensor costs, range-table variants)."""

from __future__ import annotations

import time

import common
import numpy as np

from qmace.metrics import sqnr_from_energies
from qmace.quantize.ranges import Range
from qmace.quantize.recipe import quantize_for_config
from qmace.runtime import Session


def tensor_kinds(g) -> dict[str, str]:
    """Activation tensor -> its role in MobileNetV2 (stem, expand, dw, project, add, head, pool, logits)."""
    kinds = {common.INPUT: "input"}
    convs = [n for n in g.nodes if n.op_type == "Conv"]
    for n in g.nodes:
        o = n.outputs[0]
        if n.op_type == "Conv":
            if n is convs[0]:
                kinds[o] = "stem"
            elif n is convs[-1]:
                kinds[o] = "head 1x1"
            elif int(n.attrs.get("group", 1)) > 1:
                kinds[o] = "depthwise"
            elif n.attrs.get("qm_activation"):
                kinds[o] = "expand 1x1"
            else:
                kinds[o] = "project 1x1"
        elif n.op_type == "Add":
            kinds[o] = "residual add"
        elif n.op_type == "Gemm":
            kinds[o] = "logits (gemm)"
        else:
            kinds[o] = n.op_type.lower()
    return kinds


def per_layer_reference(g_float, qg, x: np.ndarray) -> dict[str, tuple[float, float]]:
    """Cumulative SQNR of every quantized activation on the reference backend: dequantized codes of the
    integer graph vs the float graph's tensor of the same name. name -> (SQNR dB, max|float|)."""
    from qmace.qmath import dequantize
    from qmace.runtime import reference

    sig: dict[str, float] = {}
    noise: dict[str, float] = {}
    amax: dict[str, float] = {}
    rename = {"output__quant": common.OUTPUT}
    for i in range(len(x)):
        feeds = {common.INPUT: x[i : i + 1]}
        f = reference.execute(g_float, feeds, keep_all=True)
        q = reference.execute(qg, feeds, keep_all=True)
        for name, v in q.items():
            t = qg.tensors[name]
            fname = rename.get(name, name)
            if not t.is_quantized or fname not in f or f[fname].shape != v.shape:
                continue
            ref = f[fname].astype(np.float64)
            d = dequantize(v, t.quant).astype(np.float64)
            sig[fname] = sig.get(fname, 0.0) + float(np.sum(ref**2))
            noise[fname] = noise.get(fname, 0.0) + float(np.sum((ref - d) ** 2))
            amax[fname] = max(amax.get(fname, 0.0), float(np.abs(ref).max()))
    return {k: (sqnr_from_energies(sig[k], noise[k]), amax[k]) for k in sig}


class QDQSurgery:
    """The lowered QDQ model of a qmace-quantized graph, with chosen quantizations bypassed.

    Activation T: lowered as QuantizeLinear(X) -> T -> DequantizeLinear -> D; bypass = D := Identity(X).
    Weight/bias W (initializer `<w>__quant`): DequantizeLinear -> D; bypass = D := Identity(float `<w>`).
    """

    def __init__(self, qg, g_float):
        from qmace.onnx_bridge import to_onnx

        self.model = to_onnx(qg)
        self.g_float = g_float
        nodes = self.model.graph.node
        q_by_out = {n.output[0]: n for n in nodes if n.op_type == "QuantizeLinear"}
        inits = {t.name for t in self.model.graph.initializer}
        self.act: dict[str, tuple[int, str]] = {}  # float tensor name -> (DQ node index, Q input)
        self.weights: dict[str, list[tuple[int, str]]] = {}  # consumer float output -> [(DQ idx, float w)]
        consumer_out = {}
        for n in nodes:
            for i in n.input:
                consumer_out.setdefault(i, n.output[0])
        for idx, n in enumerate(nodes):
            if n.op_type != "DequantizeLinear":
                continue
            src = n.input[0]
            if src in q_by_out:
                name = src.removesuffix("__quant")
                name = {"input": common.INPUT}.get(name, name)
                if src == "output__quant":
                    name = common.OUTPUT
                self.act.setdefault(name, (idx, q_by_out[src].input[0]))
            elif src in inits and src.endswith("__quant"):
                fw = src[: -len("__quant")]
                if fw in g_float.tensors and g_float.tensors[fw].data is not None:
                    out = consumer_out.get(n.output[0], "?")
                    self.weights.setdefault(out, []).append((idx, fw))

    def build(self, keep_acts: set[str] | None = None, keep_weights: bool = True, drop_acts: set[str] = frozenset()):
        """A model with activations outside `keep_acts` (None: all kept) or in `drop_acts` in float, and
        all weights in float unless `keep_weights`."""
        import onnx
        from onnx import helper, numpy_helper

        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        nodes = m.graph.node
        for name, (idx, x) in self.act.items():
            if (keep_acts is not None and name not in keep_acts) or name in drop_acts:
                nodes[idx].CopyFrom(helper.make_node("Identity", [x], [nodes[idx].output[0]]))
        if not keep_weights:
            for lst in self.weights.values():
                for idx, fw in lst:
                    fname = f"{fw}__float"
                    m.graph.initializer.append(numpy_helper.from_array(
                        np.ascontiguousarray(self.g_float.tensors[fw].data.astype(np.float32)), fname))
                    nodes[idx].CopyFrom(helper.make_node("Identity", [fname], [nodes[idx].output[0]]))
        return m.SerializeToString()


def logits_of(model_bytes: bytes, x: np.ndarray, threads: int) -> np.ndarray:
    s = common.ort_session(model_bytes, threads)
    return common.run_batched(lambda a: s.run([common.OUTPUT], {common.INPUT: a})[0], x)


def diagnose(args, g1, gbc, m1, tables, qgraphs, xe, ref, labels, T) -> list[str]:
    """`g1`: the float graph; `gbc`: the same with int8 bias correction (what the quantized rows use)."""
    t0 = time.perf_counter()
    meth = args.diag_method
    kinds = tensor_kinds(g1)
    out = ["", f"### Diagnosis: where the int8 error comes from (int8 schema, `{meth}` ranges, bias-corrected)", ""]

    # (1) cumulative per-layer SQNR on the reference backend (integer kernels) vs the float graph
    qg = qgraphs[("int8", meth)]
    per = per_layer_reference(g1, qg, xe[: args.diag_images])
    rows = []
    order = [n.outputs[0] for n in g1.nodes]
    for i, name in enumerate([common.INPUT] + order):
        if name in per:
            r = tables[meth].get(name)
            rows.append([i, kinds.get(name, "?"), name.replace("/features/", "").replace("_output_0", ""),
                         f"{per[name][0]:.1f}", f"{per[name][1]:.2f}",
                         f"[{r.min:.2f}, {r.max:.2f}]" if r is not None else "input_ranges"])
    out += [(f"Cumulative SQNR of each quantized activation, reference backend (exact integer kernels), "
             f"{args.diag_images} eval images, vs the float graph:"), "",
            common.md_table(["#", "kind", "tensor", "SQNR dB", "max|float|", "range used"], rows), ""]
    print("\n".join(out), flush=True)

    # (2) ablations on the lowered QDQ model (ORT, fake-quant semantics), all 233 images
    sur = QDQSurgery(qg, gbc)
    acts = set(sur.act)
    groups: dict[str, set[str]] = {}
    for a in acts:
        groups.setdefault(kinds.get(a, "?"), set()).add(a)
    ab_rows = []

    def row(label, mb):
        lg = logits_of(mb, xe, T)
        mm = common.logits_metrics(ref, lg, labels)
        ab_rows.append([label, mm["agree"], mm["sqnr"]])
        return mm

    row("all quantized (QDQ in ORT)", sur.build())
    row("weights only (activations float)", sur.build(keep_acts=set()))
    row("activations only (weights float)", sur.build(keep_weights=False))
    for k in sorted(groups):
        row(f"only `{k}` activations quantized ({len(groups[k])}), weights float",
            sur.build(keep_acts=groups[k], keep_weights=False))
    for k in sorted(groups):
        row(f"all quantized except `{k}` activations", sur.build(drop_acts=groups[k]))
    out += ["Ablations on the lowered QDQ model, 233 images (top-1 agreement %, logits SQNR dB):", "",
            common.md_table(["variant", "agree %", "SQNR dB"], ab_rows), ""]
    print("\n".join(out[-4:]), flush=True)

    # (3) per-tensor: only this one activation quantized (weights float) -> logits SQNR, 64 images
    xs = xe[:32]
    ref_s = ref[:32]
    single = []
    for a in sorted(acts):
        lg = logits_of(sur.build(keep_acts={a}, keep_weights=False), xs, T)
        single.append((common.sqnr_db(ref_s, lg), a))
    single.sort()
    rows = [[f"{s:.1f}", kinds.get(a, "?"), a.replace("/features/", "").replace("_output_0", ""),
             f"[{tables[meth][a].min:.2f}, {tables[meth][a].max:.2f}]" if a in tables[meth] else "input_ranges"]
            for s, a in single[:12]]
    noise = sum(10 ** (-s / 10) for s, _ in single)
    by_kind: dict[str, float] = {}
    for s, a in single:
        by_kind[kinds.get(a, "?")] = by_kind.get(kinds.get(a, "?"), 0.0) + 10 ** (-s / 10)
    out += [("The 12 activations whose quantization alone (weights float, everything else float) costs the most, "
             "32 images (logits SQNR dB):"), "",
            common.md_table(["SQNR dB alone", "kind", "tensor", "range used"], rows), "",
            "Share of the summed single-tensor noise power by kind: "
            + ", ".join(f"{k} {100 * v / noise:.0f}%" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])), ""]
    print("\n".join(out[-6:]), flush=True)

    # (4) range-table variants through the public API (ranges only; library unchanged)
    var_rows = []
    relu6 = {n.outputs[0] for n in g1.nodes if n.attrs.get("qm_activation") == "Clip"}
    base = dict(tables[meth])

    def variant(label, table, schema="int8"):
        qgv, _ = quantize_for_config(gbc, m1, table=table, schema=schema)
        s = Session(qgv, backend="onnxruntime", num_threads=T)
        lg = common.run_batched(lambda a: s.run({common.INPUT: a})[common.OUTPUT], xe)
        mm = common.logits_metrics(ref, lg, labels)
        var_rows.append([label, mm["agree"], mm["sqnr"]])

    variant(f"{meth} (as in the table)", base)
    variant(f"{meth}, ReLU6 outputs at their clip range [0, 6]", {**base, **{k: Range(0.0, 6.0) for k in relu6}})
    mm = tables["mace P=0"]
    variant(f"{meth}, logits at min/max", {**base, common.OUTPUT: mm[common.OUTPUT]})
    adds = groups.get("residual add", set()) | groups.get("project 1x1", set())
    variant(f"{meth}, project/add outputs at min/max", {**base, **{k: mm[k] for k in adds if k in mm}})
    variant(f"{meth}, depthwise outputs at min/max", {**base, **{k: mm[k] for k in groups.get("depthwise", ()) if k in mm}})
    variant("mace P=0, ReLU6 outputs at [0, 6]", {**mm, **{k: Range(0.0, 6.0) for k in relu6}})
    out += ["Range-table variants (int8 schema, qmace onnxruntime backend, 233 images):", "",
            common.md_table(["ranges", "agree %", "SQNR dB"], var_rows), "",
            f"(diagnosis {time.perf_counter() - t0:.0f} s)"]
    print("\n".join(out[-5:]), flush=True)
    return out
