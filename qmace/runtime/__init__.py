"""Runtime backends behind one session API: ``reference`` (numpy, exact) and ``onnxruntime`` (fast)."""

from qmace.runtime.session import BACKENDS, Session

__all__ = ["BACKENDS", "Session"]
