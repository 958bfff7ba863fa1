"""Op knowledge lives in qmace/ops/ (issue 11): outside it, code asks an op's traits, not lists of op names.

Two checks over the package's source (its syntax tree, so comments and docstrings do not count):
- op names: a string that is a registered op type, compared with an ``op_type`` (``node.op_type == "Conv"``,
  ``op_type in ("Add", "Sub")``), or compared directly with anything (``op == "Concat"`` on a local copy of an
  op type, ``act == "Relu"`` on a fused activation), or written in a set/tuple/list display or as dict keys with at least one
  other op name (an op-name list such as ``{"Relu", "Clip"}``), is allowed only in the files of ``ALLOWED``,
  each with the op names it may use and why;
- attribute defaults: ``node.attrs.get("<key>", <default>)`` restates an op's default outside the op; read
  ``get_op(op_type).attr(node, key)`` instead (``qm_*`` attributes are qmace's own fused-activation marks,
  not ONNX attributes with spec defaults).
"""

from __future__ import annotations

import ast
from pathlib import Path

from qmace.ops import supported_ops

PKG = Path(__file__).resolve().parent.parent / "qmace"

# file (relative to qmace/) or folder (ending in /) -> (op names it may name, why). Keep it short.
ALLOWED: dict[str, tuple[frozenset[str], str]] = {
    # Pattern passes match one specific op shape; the pattern is the op names.
    "passes/decomposed.py": (frozenset({"Add", "Div", "Erf", "Gelu", "LayerNormalization", "Mul", "Pow", "ReduceMean",
                                        "Sigmoid", "Swish", "Tanh"}),
                             "pattern pass: decomposed LayerNorm/GELU/Swish spellings fused into one op"),
    "quantize/mixed.py": (frozenset({"Add", "Div", "LayerNormalization", "MatMul", "Mul", "Softmax"}),
                          "the structural 16-bit rule: LayerNorm inputs and the attention-score path into Softmax"),
    "passes/pool.py": (frozenset({"ReduceMean"}), "pattern pass: a spatial ReduceMean becomes GlobalAveragePool"),
    "passes/deconv.py": (frozenset({"Add", "ConvTranspose"}),
                         "pattern pass: a ConvTranspose with kernel == stride (and its bias Add) as Conv + DepthToSpace"),
    "passes/hardswish.py": (frozenset({"Add", "Clip", "Div", "HardSigmoid", "Mul"}),
                            "pattern pass: decomposed HardSigmoid/HardSwish spellings fused into one op"),
    "passes/bn.py": (frozenset({"BatchNormalization", "Conv", "ConvTranspose", "Gemm"}),
                     "BatchNormalization folding into the weights of the producing Conv/ConvTranspose/Gemm"),
    "passes/affine.py": (frozenset({"Add", "Sub", "Mul", "Conv", "MatMul"}),
                         "constant Mul/Add/Sub folding into Conv and MatMul -> Gemm"),
    "passes/pad.py": (frozenset({"Pad", "Conv"}), "a zero Pad folded into the Conv that reads it"),
    "quantize/bias_correction.py": (frozenset({"Add"}),
                                    "the bias Add that follows a MatMul (x @ W + b) absorbs its bias correction"),
    "passes/cleanup.py": (frozenset({"Identity", "Dropout"}), "removal of no-op nodes"),
    "qat/job.py": (frozenset({"Sigmoid"}),
                   "--distill sigmoid: the Bernoulli KL is defined on the logits a logistic Sigmoid reads"),
    "passes/fold.py": (frozenset({"QuantizeLinear", "DequantizeLinear", "Shape"}),
                       "constant folding: never fold Q/DQ markers; Shape of a known shape"),
    # Layout rewrite: how axis attributes/inputs follow a permutation (elementwise ops ask their trait).
    "passes/transpose.py": (frozenset({"Transpose", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "Concat",
                                       "Softmax", "Pad"}),
                            "transpose sinking through reductions, Concat, Softmax and Pad"),
    # QuantizeLinear/DequantizeLinear are the quantized graph's own markers, not ordinary ops.
    "frontends/qdq_import.py": (frozenset({"QuantizeLinear", "DequantizeLinear"}), "QDQ pattern matching"),
    "onnx_bridge.py": (frozenset({"QuantizeLinear", "DequantizeLinear", "Relu"}),
                       "lowering of explicit Q/DQ nodes and of a fused Relu/Clip (qm_activation)"),
    "runtime/session.py": (frozenset({"QuantizeLinear", "DequantizeLinear"}), "exact-int8 weight rewrite"),
    "runtime/ort_lowering.py": (frozenset({"QuantizeLinear", "DequantizeLinear", "Relu", "MaxPool", "Conv"}),
                                "ONNX Runtime's QDQ patterns (its kernels, not IR ops) given to its float kernels"),
    # MACE's large-weight rule names MACE's ops (Conv2D, FullyConnected, Deconv2D) in ONNX terms.
    "quantize/weight_only.py": (frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"}),
                                "MACE's quantize_large_weights rule"),
    # Frontends translate foreign ops into IR ops: the names are the translation table.
    "frontends/caffe/": (frozenset({"BatchNormalization"}), "Caffe BatchNorm + Scale merge"),
    "frontends/tensorflow/": (frozenset(supported_ops()), "TensorFlow op translation"),
    "frontends/tflite/": (frozenset(supported_ops()), "TFLite op translation"),
    # TORCH_OPS and QAT's integer accumulation move into ops/ with the QAT side of issue 11; Q/DQ markers stay.
    "qat/forward.py": (frozenset({"QuantizeLinear", "DequantizeLinear"}), "the quantized graph's Q/DQ boundary nodes"),
    "qat/kernels.py": (frozenset({"QuantizeLinear", "DequantizeLinear"}), "the quantized graph's Q/DQ boundary nodes"),
    "qat/ranges.py": (frozenset({"QuantizeLinear", "DequantizeLinear"}), "the quantized graph's Q/DQ boundary nodes"),
}
# Files that may still restate attribute defaults: foreign frontends read foreign attributes; QAT's op table.
ATTR_DEFAULTS_ALLOWED = ("frontends/tensorflow/",)


def _allowed(rel: str) -> tuple[frozenset[str], str] | None:
    for key, value in ALLOWED.items():
        if rel == key or (key.endswith("/") and rel.startswith(key)):
            return value
    return None


def _names(node: ast.AST, ops: set[str]) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and n.value in ops]


def _op_name_uses(tree: ast.AST, ops: set[str]) -> list[tuple[int, str]]:
    """(line, op name) for every op name compared with an ``op_type`` or listed with another op name."""
    found = []
    for n in ast.walk(tree):
        names: list[str] = []
        if isinstance(n, ast.Compare) and any(isinstance(x, ast.Attribute) and x.attr == "op_type"
                                              for x in ast.walk(n)):
            names = _names(n, ops)
        elif isinstance(n, ast.Compare):  # a direct operand: a string, or a tuple/set/list of strings
            names = [name for side in (n.left, *n.comparators) if not isinstance(side, ast.Call)
                     for name in _names(side, ops)]
        elif isinstance(n, (ast.Set, ast.Tuple, ast.List)):
            elts = [e.value for e in n.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            names = [e for e in elts if e in ops] if len([e for e in elts if e in ops]) >= 2 else []
        elif isinstance(n, ast.Dict):
            keys = [k.value for k in n.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
            names = [k for k in keys if k in ops] if len([k for k in keys if k in ops]) >= 2 else []
        found += [(n.lineno, name) for name in names]
    return found


def _sources():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if not rel.startswith("ops/"):
            yield rel, ast.parse(path.read_text(), filename=str(path))


def test_no_op_name_lists_outside_ops():
    ops = set(supported_ops())
    bad = []
    for rel, tree in _sources():
        allowed = _allowed(rel)
        for line, name in _op_name_uses(tree, ops):
            if allowed is None or name not in allowed[0]:
                bad.append(f"qmace/{rel}:{line}: {name!r}")
    assert not bad, "op names outside qmace/ops/ (ask the op's traits, or extend ALLOWED with a reason):\n" + \
        "\n".join(bad)


def test_no_attribute_defaults_outside_ops():
    bad = []
    for rel, tree in _sources():
        if rel.startswith(ATTR_DEFAULTS_ALLOWED):
            continue
        for n in ast.walk(tree):
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get"
                    and isinstance(n.func.value, ast.Attribute) and n.func.value.attr == "attrs"
                    and n.args and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str)
                    and not n.args[0].value.startswith("qm_")):
                bad.append(f"qmace/{rel}:{n.lineno}: attrs.get({n.args[0].value!r}, ...)")
    assert not bad, "attribute defaults restated outside qmace/ops/ (use get_op(t).attr(node, key)):\n" + \
        "\n".join(bad)


def test_the_checks_catch_what_they_forbid():
    """The scanner finds a comparison, a set display and dict keys, and leaves single strings alone."""
    src = ('if node.op_type == "Conv": pass\n'
           'X = {"Relu", "Clip"}\n'
           'Y = {"Add": 1, "Mul": 2}\n'
           'z = ("Relu", "not an op")\n'
           'if op == "Pad" or get_op("Gemm").attr(n, "x") == 1: pass\n')
    found = _op_name_uses(ast.parse(src), set(supported_ops()))
    assert sorted(found) == [(1, "Conv"), (2, "Clip"), (2, "Relu"), (3, "Add"), (3, "Mul"), (5, "Pad")]
