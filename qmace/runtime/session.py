"""One session API over every backend.

``Session(graph, backend="onnxruntime" | "openvino" | "reference", num_threads=N)``;
``run(feeds, observe=names)`` returns the graph outputs and the observed intermediate tensors by name, the
same on every backend. The ONNX Runtime and OpenVINO backends run the lowered ONNX model
(``qmace.onnx_bridge.to_onnx``); the reference backend runs qmace's numpy kernels node by node (and can time
each node). Also here: ONNX Runtime sessions with the exact-int8 rewrite for CPUs without VNNI.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable

import numpy as np

from qmace.errors import ModelError, first_line
from qmace.ir import Graph
from qmace.onnx_bridge import to_onnx
from qmace.runtime import ort_lowering, reference

BACKENDS = ("onnxruntime", "openvino", "reference")
log = logging.getLogger(__name__)

# Integer-weight inputs of ONNX ops: op type -> (weight input index, weight zero-point input index).
_INT_WEIGHT_INPUTS = {
    "DequantizeLinear": (0, 2),
    "QLinearConv": (3, 5),
    "QLinearMatMul": (3, 5),
    "ConvInteger": (1, 3),
    "MatMulInteger": (1, 3),
}


def _probe_model(k: int):
    from onnx import TensorProto, helper

    node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, k]),
                                                helper.make_tensor_value_info("b", TensorProto.INT8, [k, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@functools.cache
def ort_u8s8_exact() -> bool:
    """Whether this host's ONNX Runtime multiplies u8 x s8 exactly.

    On x86 CPUs without VNNI (AVX2 only), ORT's u8 x s8 GEMM uses ``vpmaddubsw``, which adds two u8 x s8
    products into a saturating int16: 255 * 127 * 2 = 64770 comes back as 32767 (ORT's docs mention this
    "saturation issue"). The probe multiplies rows of 255s by columns of 127s with ``MatMulInteger`` and
    compares with the exact sum.
    """
    k = 64
    a = np.full((4, k), 255, np.uint8)
    b = np.full((k, 16), 127, np.int8)
    got = _raw_ort_session(_probe_model(k).SerializeToString(), 1).run(["y"], {"a": a, "b": b})[0]
    exact = bool(np.all(got == 255 * 127 * k))
    if not exact:
        log.info("ONNX Runtime's u8 x s8 kernels saturate on this CPU (no VNNI): int8 weights are given to it "
                 "as uint8 + 128, which its exact u8 x u8 kernels run")
    return exact


def _fold_weight_quantize(model) -> None:
    """``QuantizeLinear(float initializer) -> int8`` (PyTorch's fake-quant export) becomes the int8
    initializer it computes (qmath.quantize: ORT's rounding), so that the rewrite below sees the weight."""
    from onnx import TensorProto, numpy_helper

    from qmace.qmath import QuantParams, quantize

    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        names = list(node.input) + [""] * (3 - len(node.input))
        x, scale, zp = (inits.get(n) if n else None for n in names[:3])
        if (node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx") or x is None or scale is None
                or zp is None or zp.data_type != TensorProto.INT8 or x.data_type != TensorProto.FLOAT):
            keep.append(node)
            continue
        s_arr, z_arr = numpy_helper.to_array(scale), numpy_helper.to_array(zp)
        axis = None
        if s_arr.ndim == 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % len(x.dims)
        qp = QuantParams(s_arr.astype(np.float32), z_arr.astype(np.int32), "int8", axis)
        model.graph.initializer.append(numpy_helper.from_array(quantize(numpy_helper.to_array(x), qp),
                                                               node.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(keep)


#: |int8 weight code| up to which ORT's u8 x s8 kernels cannot saturate: 255 * 64 * 2 = 32640 <= 32767.
U8S8_SAFE_WEIGHT_CODE = 64


def int8_weights_as_uint8(model) -> bool:
    """Hand int8 weights to ONNX Runtime as uint8 so that its exact u8 x u8 kernels compute them.

    Every int8 weight initializer read by DequantizeLinear / QLinearConv / QLinearMatMul / ConvInteger /
    MatMulInteger becomes uint8 ``q + 128`` with zero point ``z + 128``: the same real values and the same
    integer products ``(q_x - z_x)(q_w - z_w)``, but ORT runs them with its u8 x u8 kernels, which are exact
    where u8 x s8 saturates. Weights whose codes all lie in [-64, 64] (7-bit weights,
    ``quantize_schema: int8_w7``) cannot saturate (``vpmaddubsw`` adds two u8 x s8 products:
    255 * 64 * 2 < 2^15) and stay int8 on ORT's fast kernels.

    Args:
        model: an ``onnx.ModelProto``, rewritten in place.

    Returns:
        Whether anything changed.
    """
    from onnx import TensorProto, numpy_helper

    _fold_weight_quantize(model)
    inits = {t.name: t for t in model.graph.initializer}
    added: dict[str, object] = {}

    def as_uint8(name: str, codes: np.ndarray) -> str:
        new_name = f"{name}__u8"
        if new_name not in added:
            added[new_name] = numpy_helper.from_array((codes.astype(np.int16) + 128).astype(np.uint8), new_name)
        return new_name

    for node in model.graph.node:
        slots = _INT_WEIGHT_INPUTS.get(node.op_type)
        if slots is None or node.domain not in ("", "ai.onnx"):
            continue
        w_i, z_i = slots
        w = inits.get(node.input[w_i]) if len(node.input) > w_i else None
        if w is None or w.data_type != TensorProto.INT8:
            continue
        codes = numpy_helper.to_array(w)
        if codes.size == 0 or int(np.abs(codes.astype(np.int16)).max()) <= U8S8_SAFE_WEIGHT_CODE:
            continue
        zp_name = node.input[z_i] if len(node.input) > z_i else ""
        if zp_name and zp_name not in inits:  # a zero point computed at run time: leave the node alone
            continue
        if zp_name:
            zp = numpy_helper.to_array(inits[zp_name])
        else:  # absent = 0, shaped like DequantizeLinear's scale (per axis) or a scalar
            scale = inits.get(node.input[1]) if node.op_type == "DequantizeLinear" else None
            zp = np.zeros(tuple(scale.dims) if scale is not None else (), np.int8)
            zp_name = f"{w.name}__zero"
        node.input[w_i] = as_uint8(w.name, codes)
        while len(node.input) <= z_i:
            node.input.append("")
        node.input[z_i] = as_uint8(zp_name, zp)
    model.graph.initializer.extend(added.values())
    return bool(added)


def int8_activations_as_uint8(model) -> bool:
    """Give ONNX Runtime int8 activation codes as uint8 ``q + 128`` (zero point ``z + 128``), after
    ``int8_weights_as_uint8``.

    Imported models (an int8 ``.tflite``, an ONNX QDQ model with int8 activations) quantize activations to
    int8. Once their weights are uint8, ORT's QDQ fusion has no kernel for int8 activations x uint8 weights
    and leaves ``DequantizeLinear -> Conv -> QuantizeLinear`` as a float convolution (float32 sums: codes
    one step off near rounding ties, and slow). With the activations shifted as well, the pattern is
    u8 x u8 QLinearConv / QLinearMatMul, exact: ``(q_x - z_x)`` and the real values are unchanged, and
    ``QuantizeLinear`` rounds ``x / s`` the same way before adding either zero point (the sum is an integer
    either way, and ``q + 128`` is within [0, 255] exactly when ``q`` is within [-128, 127]).

    Applies only when every int8 activation ``QuantizeLinear`` (non-constant input, int8 zero-point
    initializer) is read only by ``DequantizeLinear`` nodes with initializer (or absent) zero points;
    otherwise nothing changes. Such a tensor that is also a graph output (``extra_outputs``) is still given
    as int8 codes: ``Cast(int32) - 128 -> Cast(int8)`` of the uint8 ones.

    Args:
        model: an ``onnx.ModelProto``, rewritten in place.

    Returns:
        Whether anything changed.
    """
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {v.name for v in g.output}
    readers: dict[str, list] = {}
    for node in g.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    quants = []
    for node in g.node:
        if (node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx") or node.input[0] in inits
                or len(node.input) < 3 or node.input[2] not in inits or inits[node.input[2]].data_type != TensorProto.INT8):
            continue
        out = node.output[0]
        dqs = readers.get(out, [])
        if out in {v.name for v in g.input} or not (dqs or out in outputs) or any(
                r.op_type != "DequantizeLinear" or r.domain not in ("", "ai.onnx") or list(r.input).index(out) != 0
                or (len(r.input) > 2 and r.input[2] and r.input[2] not in inits) for r in dqs):
            return False
        quants.append((node, dqs))
    if not quants:
        return False
    added: dict[str, object] = {}

    def shifted(zp_name: str | None, like: str) -> str:
        if zp_name:
            new = f"{zp_name}__u8"
            if new in inits:  # a zero point shared with a weight: int8_weights_as_uint8 made the same z + 128
                return new
            codes = numpy_helper.to_array(inits[zp_name]).astype(np.int16)
        else:  # absent: zero, shaped like the scale
            new = f"{like}__zero__u8"
            codes = np.zeros(tuple(inits[like].dims) if like in inits else (), np.int16)
        if new not in added:
            added[new] = numpy_helper.from_array((codes + 128).astype(np.uint8), new)
        return new

    for q, dqs in quants:
        q.input[2] = shifted(q.input[2], q.input[1])
        for dq in dqs:
            zp = dq.input[2] if len(dq.input) > 2 and dq.input[2] else None
            while len(dq.input) < 3:
                dq.input.append("")
            dq.input[2] = shifted(zp, dq.input[1])
    names = {q.output[0] for q, _ in quants}
    back = []
    for q, dqs in quants:
        out = q.output[0]
        if out not in outputs:
            continue
        u8 = f"{out}__u8"
        q.output[0] = u8
        for dq in dqs:
            dq.input[0] = u8
        if "__128_i32" not in added:
            added["__128_i32"] = numpy_helper.from_array(np.array(128, np.int32), "__128_i32")
        back += [helper.make_node("Cast", [u8], [f"{u8}__i32"], to=TensorProto.INT32),
                 helper.make_node("Sub", [f"{u8}__i32", "__128_i32"], [f"{out}__i32"]),
                 helper.make_node("Cast", [f"{out}__i32"], [out], to=TensorProto.INT8)]
    g.node.extend(back)
    keep = [v for v in g.value_info if v.name not in names]
    del g.value_info[:]
    g.value_info.extend(keep)
    g.initializer.extend(added.values())
    return True


def _raw_ort_session(model_bytes: bytes | str, num_threads: int | None = None, disabled: tuple[str, ...] = ()):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # ORT fuses DequantizeLinear(8-bit constant weight) -> MatMul/Gemm into MatMulNBits and by default (level 4)
    # then quantizes the float activations to int8 inside it. qmace's float ops (weight-only models, float
    # fallbacks) compute in float, as the reference backend does: level 1 keeps the fused op in fp32.
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if num_threads:
        opts.intra_op_num_threads = int(num_threads)
        opts.inter_op_num_threads = 1
    try:
        # ORT (>= 1.2x) quantizes the float constant weight of a Conv/MatMul/Gemm that sits between a
        # DequantizeLinear and a QuantizeLinear to int8 per tensor ("WeightBiasQuantization") and fuses it into
        # a QLinearConv/QLinearMatMul: a layer qmace keeps float (--float_nodes, --sensitivity_float_layers)
        # must compute in float, as the reference backend does (tests/test_sensitivity.py)
        return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=["WeightBiasQuantization", *disabled])
    except Exception as e:  # ORT raises its own exception types; keep the message, one line
        raise ModelError(f"ONNX Runtime could not load the model: {first_line(e)}") from e


@functools.cache
def _note_16bit_islands(count: int) -> None:
    log.warning("%d 16-bit activation(s): ONNX Runtime has no 16-bit kernels, so the ops next to them run as float "
                "islands with separate QuantizeLinear/DequantizeLinear passes; OpenVINO fuses those into its float "
                "kernels and may run the model faster: compare with `qmace run --benchmark --backend "
                "onnxruntime,openvino` (docs/quantization.md, \"The openvino backend\")", count)


@functools.cache
def _warn_slow_exact_path() -> None:
    log.warning("this CPU has no VNNI: ONNX Runtime's fast u8 x s8 kernels would saturate on full-range int8 "
                "weights, so they run exactly through its u8 x u8 kernels (no faster than float here); "
                "quantize_schema: int8_w7 (7-bit weights) is exact on the fast kernels")


def ort_session(model_bytes: bytes | str, num_threads: int | None = None, exact_int8: bool = True,
                disabled: tuple[str, ...] = ()):
    """An ONNX Runtime CPU session on serialized model bytes or a model file path.

    ``exact_int8`` (default): on a host whose u8 x s8 kernels saturate (``ort_u8s8_exact``), int8 weights
    are handed to ORT as uint8 + 128 (``int8_weights_as_uint8``) so it computes the exact integer products,
    and int8 activations of imported models with them (``int8_activations_as_uint8``).

    Args:
        model_bytes: a serialized ONNX model, or its file path (a path lets ORT find external data beside
            the file).
        num_threads: intra-op threads, or None for ORT's default.
        exact_int8: False runs the model as plain ORT would (peers).
        disabled: ORT graph optimizers to turn off besides ``WeightBiasQuantization`` (``ort_lowering``).

    Returns:
        The ``onnxruntime.InferenceSession``.

    Raises:
        ModelError: with ORT's first message line when it cannot load the model.
    """
    if exact_int8 and not ort_u8s8_exact():
        import onnx

        try:
            model = (onnx.load_model_from_string(model_bytes) if isinstance(model_bytes, bytes)
                     else onnx.load(model_bytes))
        except Exception:  # not parseable: let ORT say so below
            model = None
        if model is not None and int8_weights_as_uint8(model):
            int8_activations_as_uint8(model)  # int8 activations x uint8 weights would not fuse: shift them too
            model_bytes = model.SerializeToString()
            _warn_slow_exact_path()
    return _raw_ort_session(model_bytes, num_threads, disabled)


class Session:
    """One graph ready to run on one backend, with the same calling convention on every backend.

    ``run(feeds, observe=names)`` returns the graph outputs and the observed intermediate tensors by name,
    whichever backend runs: the reference executor keeps the observed tensors, the ONNX backends run the
    lowered model with them as extra outputs (one lowered model per distinct observed set, built on first
    use and kept). A quantized tensor is observed as its integer codes on every backend.

    Args:
        graph: the graph to run (float or quantized).
        backend: ``"onnxruntime"``, ``"openvino"`` (both run the lowered ONNX model) or ``"reference"``
            (qmace's exact numpy kernels).
        num_threads: intra-op threads, or None for the backend's default.

    Raises:
        ValueError: an unknown backend.
        ModelError: the backend cannot load the lowered model.
    """

    def __init__(self, graph: Graph, backend: str = "onnxruntime", num_threads: int | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
        self.graph = graph
        self.backend = backend
        self.num_threads = num_threads
        self._lowered: dict[tuple[str, ...], object] = {}
        # the backend session of the plain graph (None: the reference executor)
        self._ort = None if backend == "reference" else self._backend_session(())

    @property
    def input_names(self) -> list[str]:
        """The graph's input names."""
        return list(self.graph.inputs)

    @property
    def output_names(self) -> list[str]:
        """The graph's output names."""
        return list(self.graph.outputs)

    @property
    def times_ops(self) -> bool:
        """Whether ``run`` can report per-node times (``op_times``): the reference executor runs node by node."""
        return self.backend == "reference"

    def _backend_session(self, extra: tuple[str, ...]):
        """The ONNX Runtime / OpenVINO session of the lowered graph exposing ``extra`` as outputs too."""
        if extra not in self._lowered:
            proto = to_onnx(self.graph, extra_outputs=list(extra))
            if self.backend == "onnxruntime":
                wide = sum(t.is_quantized and t.dtype in ("uint16", "int16") for t in self.graph.tensors.values())
                if wide:
                    _note_16bit_islands(wide)
                # same codes through ORT's faster float kernels where its integer ones are slow (ort_lowering)
                disabled = ort_lowering.DISABLED_OPTIMIZERS if ort_lowering.lower_for_ort(proto) else ()
                self._lowered[extra] = ort_session(proto.SerializeToString(), self.num_threads, disabled=disabled)
            else:
                from qmace.runtime.openvino_backend import OpenVINOSession

                self._lowered[extra] = OpenVINOSession(proto.SerializeToString(), self.num_threads)
        return self._lowered[extra]

    def run(
        self,
        feeds: dict[str, np.ndarray],
        observe: Iterable[str] | None = None,
        op_times: dict[str, float] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run once.

        Args:
            feeds: input name -> array (in the graph's layout and dtype).
            observe: intermediate tensors (or inputs) to return besides the graph outputs.
            op_times: accumulates seconds per node name (only when ``times_ops``: the reference backend).

        Returns:
            Tensor name -> array for every graph output and every observed tensor.

        Raises:
            ValueError: ``op_times`` on a backend that cannot time nodes.
            ModelError: an observed name that is not a tensor of the graph; the backend fails on the inputs
                (ORT's first message line, or the failing node).
        """
        observed = list(dict.fromkeys(observe or ()))
        unknown = [n for n in observed if n not in self.graph.tensors]
        if unknown:
            raise ModelError(f"graph {self.graph.name!r}: cannot observe {', '.join(map(repr, unknown))}: "
                             "no such tensor")
        wanted = list(dict.fromkeys(self.output_names + observed))
        if self.backend == "reference":
            return reference.execute(self.graph, feeds, outputs=wanted, op_times=op_times)
        if op_times is not None:
            raise ValueError(f"per-node times need the reference backend, not {self.backend}")
        fed = {k: np.asarray(v, order="C") for k, v in feeds.items()}
        known = set(self.output_names)
        extra = tuple(n for n in observed if n not in known and n not in fed)
        session = self._backend_session(extra)
        fetch = [n for n in wanted if n not in fed or n in known]
        try:
            res = session.run(fetch, fed)
        except Exception as e:  # ORT's own exception types: one line naming the runtime
            runtime = "ONNX Runtime" if self.backend == "onnxruntime" else "OpenVINO"
            raise ModelError(f"graph {self.graph.name!r}: {runtime} failed: {first_line(e, 300)}") from e
        out = dict(zip(fetch, res))
        return {n: out[n] if n in out else np.asarray(feeds[n]) for n in wanted}
