"""Every public function, method and class of the covered modules has a docstring, and every public function
or method that takes parameters has a Google-style ``Args:`` section naming them (issue 12, item 7).

"Public" means: no leading underscore, defined in the module itself (not imported into it), reachable as a
module attribute, or a method/property defined in such a class's own body.

Exemptions (the only ones, both checked, not assumed):

- Op interface overrides. An Op subclass in ``qmace.ops`` that overrides a method of ``qmace.ops.base.Op``
  (``run``, ``run_quantized``, ``weight_axis``, ...) or of an intermediate Op base class (the ``compute``
  hook of the elementwise bases, ``reduce`` of the reductions) needs no docstring of its own for that
  override: it implements the documented interface, and the subclass's own docstring (required) states the
  op's formula/semantics. The test requires the overridden base method to be documented (Args included).
- TFLite operator converters. The functions registered with ``qmace.frontends.tflite.ops.converts`` all
  take ``(b, op)`` (the Builder and the operator) and return nothing; ``converts`` documents that interface
  once (checked). Each converter still needs its own docstring, saying what the operator becomes.
- TensorFlow op emitters. The functions registered with ``qmace.frontends.tensorflow.ops.emits`` are
  private (``_conv``, ...) and all take ``(b, n, ins)`` and return the IR names of the node's outputs;
  ``emits`` documents that interface once (checked). Each emitter still needs its own docstring, saying what
  its ops become (checked, although they are private).
- Attributes that merely hold a function defined elsewhere (``fn = staticmethod(np.argmax)``) are not
  methods written in that class and are skipped.

The covered modules are listed explicitly: every module of qmace except ``qmace/__init__.py`` and
``qmace/__main__.py``, the command line (``qmace.cli``) and the PyTorch QAT package (``qmace.qat``) included; a
package in ``COVERED_PACKAGES`` cannot gain an unlisted module.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re

import pytest

# Every op module is covered without being listed: an op is one module + its test (issue 11), and a new
# module is never skipped.
_OP_MODULES = sorted(f"qmace.ops.{m.name}"
                     for m in pkgutil.iter_modules(importlib.import_module("qmace.ops").__path__))

COVERED = [
    "qmace.api",
    "qmace.cli",
    "qmace.cli.main",
    "qmace.cli.qat",
    "qmace.cli.report",
    "qmace.config",
    "qmace.data",
    "qmace.errors",
    "qmace.fileio",
    "qmace.ir",
    "qmace.limits",
    "qmace.metrics",
    "qmace.modelfile",
    "qmace.frontends",
    "qmace.frontends.onnx_frontend",
    "qmace.frontends.qdq_import",
    "qmace.frontends.tflite",
    "qmace.frontends.tflite.builder",
    "qmace.frontends.tflite.convert",
    "qmace.frontends.tflite.oracle",
    "qmace.frontends.tflite.reader",
    "qmace.frontends.tflite.ops",
    "qmace.frontends.tflite.ops.nn",
    "qmace.frontends.tflite.ops.tensor",
    "qmace.frontends.caffe",
    "qmace.frontends.caffe.layers",
    "qmace.frontends.caffe.net",
    "qmace.frontends.caffe.graph",
    "qmace.frontends.caffe.oracle",
    "qmace.frontends.caffe.proto",
    "qmace.frontends.tensorflow",
    "qmace.frontends.tensorflow.builder",
    "qmace.frontends.tensorflow.convert",
    "qmace.frontends.tensorflow.fakequant",
    "qmace.frontends.tensorflow.graphdef",
    "qmace.frontends.tensorflow.ops",
    "qmace.frontends.tensorflow.oracle",
    "qmace.passes",
    "qmace.passes.affine",
    "qmace.passes.bn",
    "qmace.passes.cleanup",
    "qmace.passes.deconv",
    "qmace.passes.fold",
    "qmace.passes.fuse",
    "qmace.passes.decomposed",
    "qmace.passes.hardswish",
    "qmace.passes.pad",
    "qmace.passes.pool",
    "qmace.passes.shapes",
    "qmace.passes.transpose",
    "qmace.passes.weight_params",
    "qmace.qat",
    "qmace.qat.checkpoint",
    "qmace.qat.data",
    "qmace.qat.distributed",
    "qmace.qat.evaluate",
    "qmace.qat.fakequant",
    "qmace.qat.forward",
    "qmace.qat.gate",
    "qmace.qat.losses",
    "qmace.qat.job",
    "qmace.qat.kernels",
    "qmace.qat.module",
    "qmace.qat.ranges",
    "qmace.qat.trainer",
    "qmace.quantize",
    "qmace.quantize.adaround",
    "qmace.quantize.recipe",
    "qmace.pipeline",
    "qmace.api.convert",
    "qmace.api.run",
    "qmace.api.quantize",
    "qmace.quantize.bias_correction",
    "qmace.quantize.calibration",
    "qmace.quantize.cle",
    "qmace.quantize.dense",
    "qmace.quantize.equalize",
    "qmace.quantize.plan",
    "qmace.qmath",
    "qmace.quantize.quantizer",
    "qmace.quantize.ranges",
    "qmace.quantize.sensitivity",
    "qmace.quantize.mixed",
    "qmace.quantize.weight_only",
    "qmace.runtime",
    "qmace.onnx_bridge",
    "qmace.runtime.openvino_backend",
    "qmace.runtime.ort_lowering",
    "qmace.runtime.reference",
    "qmace.runtime.session",
    "qmace.ops",
    *_OP_MODULES,
]

# Packages covered as a whole: each of their modules must be listed above (a new module is not skipped silently).
COVERED_PACKAGES = [
    "qmace.quantize", "qmace.runtime", "qmace.ops", "qmace.frontends", "qmace.passes", "qmace.cli", "qmace.qat",
]


def _own_doc(obj: object) -> str | None:
    """The docstring written for ``obj`` itself (not inherited, not generated by ``dataclass``)."""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
        if doc and dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
            return None  # dataclass's generated signature, not a docstring
        return doc
    return getattr(obj, "__doc__", None)


def _params(fn: object) -> list[str]:
    """The parameter names a caller passes (``self``/``cls`` left out)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    names = [p.name for p in sig.parameters.values()]
    return names[1:] if names and names[0] in ("self", "cls") else names


def _check_function(fn: object, where: str, problems: list[str], *, is_method: bool = False) -> None:
    doc = _own_doc(fn)
    if not doc or not doc.strip():
        problems.append(f"{where}: no docstring")
        return
    params = _params(fn)
    if not params:
        return
    documented = _args_documented(doc)
    if documented is None:
        problems.append(f"{where}: takes {', '.join(params)} but its docstring has no 'Args:' section")
        return
    missing = [p for p in params if p not in documented]
    if missing:
        problems.append(f"{where}: 'Args:' does not describe {', '.join(missing)}")


def _args_documented(doc: str) -> set[str] | None:
    """The parameter names an ``Args:`` section describes (``name: ...`` entries; several names may share
    one entry, ``a, b: as for run``), or None when the docstring has no such section."""
    lines = inspect.cleandoc(doc).splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if start is None:
        return None
    indent = len(lines[start]) - len(lines[start].lstrip())
    names: set[str] = set()
    for line in lines[start + 1:]:
        depth = len(line) - len(line.lstrip())
        if line.strip() and depth <= indent:
            break  # the next section (Returns:, Raises:) or text after the section
        m = re.match(r"\s+([\w*, ]+):(\s|$)", line)
        if m and depth == indent + 4:
            names.update(n.strip().lstrip("*") for n in m.group(1).split(","))
    return names


def _unwrap(member: object) -> object | None:
    """The function behind a class-body member (classmethod/staticmethod/property), None if not a routine."""
    if isinstance(member, (classmethod, staticmethod)):
        return member.__func__
    if isinstance(member, property):
        return member.fget
    if inspect.isfunction(member):
        return member
    return None


def _check_class(cls: type, where: str, problems: list[str]) -> None:
    from qmace.ops.base import Op

    if not _own_doc(cls):
        problems.append(f"{where}: no class docstring")
    for name, member in cls.__dict__.items():
        if name.startswith("_"):
            continue
        fn = _unwrap(member)
        if fn is None or not getattr(fn, "__qualname__", "").startswith(f"{cls.__qualname__}."):
            continue  # not a routine, or a function defined elsewhere held as an attribute
        if issubclass(cls, Op) and cls is not Op:
            # Op interface override: documented once, on the Op base class that defines it (checked here).
            base = next((b for b in cls.__mro__[1:] if issubclass(b, Op) and name in b.__dict__), None)
            if base is not None:
                _check_function(_unwrap(base.__dict__[name]), f"{where}.{name} (overrides {base.__name__}.{name})",
                                problems, is_method=True)
                continue
        if isinstance(member, property):
            if not _own_doc(fn):
                problems.append(f"{where}.{name}: property without a docstring")
            continue
        _check_function(fn, f"{where}.{name}", problems, is_method=True)


def _tflite_converters() -> set[int]:
    """The functions registered as TFLite operator converters (by id)."""
    from qmace.frontends.tflite import ops

    return {id(fn) for fn in [*ops.CONVERTERS.values(), *ops.CUSTOM_CONVERTERS.values()]}


def _problems(modname: str) -> list[str]:
    mod = importlib.import_module(modname)
    converters = _tflite_converters() if modname.startswith("qmace.frontends.tflite.ops") else set()
    problems: list[str] = []
    if not _own_doc(mod):
        problems.append(f"{modname}: no module docstring")
    for name, obj in vars(mod).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != modname:
            continue
        if inspect.isclass(obj):
            _check_class(obj, f"{modname}.{name}", problems)
        elif inspect.isfunction(obj) and id(obj) in converters:
            if not (_own_doc(obj) or "").strip():  # (b, op): documented once, on converts (tested below)
                problems.append(f"{modname}.{name}: no docstring")
        elif inspect.isfunction(obj):
            _check_function(obj, f"{modname}.{name}", problems)
    return problems


@pytest.mark.parametrize("modname", COVERED)
def test_public_api_documented(modname: str) -> None:
    problems = _problems(modname)
    assert not problems, f"{len(problems)} undocumented public item(s):\n" + "\n".join(problems)


def test_covered_packages_fully_listed() -> None:
    import pkgutil

    found = set()
    for pkg in COVERED_PACKAGES:
        found.add(pkg)
        path = importlib.import_module(pkg).__path__
        found.update(m.name for m in pkgutil.walk_packages(path, prefix=f"{pkg}."))
    assert sorted(found - set(COVERED)) == []


def test_converter_interface_documented() -> None:
    """The converters' shared arguments are documented where they are registered, and there are some."""
    from qmace.frontends.tflite import ops

    assert len(_tflite_converters()) > 10
    doc = inspect.getdoc(ops.converts) or ""
    assert "fn(b, op)" in doc and "Builder" in doc and "TflOp" in doc


def test_tf_emitter_interface_documented() -> None:
    """The TensorFlow emitters' shared interface is documented where they are registered, there are some,
    and each says what its ops become."""
    from qmace.frontends.tensorflow import ops

    assert len(set(map(id, ops.EMITTERS.values()))) > 10
    doc = inspect.getdoc(ops.emits) or ""
    assert "fn(b, n, ins)" in doc and "Builder" in doc and "TfNode" in doc
    undocumented = sorted({fn.__name__ for fn in ops.EMITTERS.values() if not (_own_doc(fn) or "").strip()})
    assert undocumented == []


def test_checker_catches_missing_docs() -> None:
    """The checker flags what it must (no docstring, no Args section, an undescribed parameter, a bare
    class, an Op override whose base method is undocumented) and accepts the documented forms."""
    import numpy as np

    from qmace.ops.base import Op

    def f(x):
        return x

    def g(x):
        """Doc without args."""

    def h(x, y, *args, **opts):
        """Doc.

        Args:
            x, y: values.
            *args: more values.
            **opts: options.

        Returns:
            Nothing.
        """

    def k(x, y):
        """Doc.

        Args:
            x: a value.

        Returns:
            y, mentioned here but not described in Args.
        """

    class C:
        fn = staticmethod(np.argmax)  # held, not written here: skipped

        def m(self, y):
            """Doc."""

    class _Base(Op):
        """Documented base."""

        @classmethod
        def hook(cls, x):
            return x

    class Good(Op):
        """``y = x`` (the formula)."""

        @classmethod
        def run(cls, node, inputs):  # overrides the documented Op.run: no docstring needed
            return inputs

    class Bad(_Base):
        """``y = 2x``."""

        @classmethod
        def hook(cls, x):  # overrides _Base.hook, which is undocumented
            return 2 * x

    problems: list[str] = []
    for fn, name in ((f, "f"), (g, "g"), (h, "h"), (k, "k")):
        _check_function(fn, name, problems)
    for cls in (C, Good, Bad):
        _check_class(cls, cls.__name__, problems)
    assert problems == [
        "f: no docstring",
        "g: takes x but its docstring has no 'Args:' section",
        "k: 'Args:' does not describe y",
        "C: no class docstring",
        "C.m: takes y but its docstring has no 'Args:' section",
        "Bad.hook (overrides _Base.hook): no docstring",
    ]
