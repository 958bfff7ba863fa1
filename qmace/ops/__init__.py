"""Op modules. Each registers one op (or a small family) with ``qmace.ops.base.register``."""

from qmace.ops.base import Op, get_op, is_supported, register, supported_ops

__all__ = ["Op", "get_op", "is_supported", "register", "supported_ops"]
