"""Resource budgets that turn hostile or mistaken inputs into named errors instead of exhausted memory.

- ``memory_budget()``: the most bytes one declared tensor may take (an ONNX initializer or external data
  block, a YAML input shape, a model-file array). Default 4 GiB; ``QMACE_MEMORY_BUDGET`` (bytes, or with a
  K/M/G/T suffix: ``512M``) or ``qmace --memory_budget`` overrides it.
- ``MAX_YAML_BYTES``, ``MAX_YAML_DEPTH``, ``MAX_YAML_NODES``: the deployment YAML's text size, nesting depth
  and size after alias expansion.
- ``MAX_RANGE_LOG_LINES``: range lines read from one range log (a MobileNet's 64-sample log has ~10,000).
"""

from __future__ import annotations

import os
import re

from qmace.errors import ConfigError, ResourceLimitError

DEFAULT_MEMORY_BUDGET = 4 << 30
MAX_YAML_BYTES = 16 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 1_000_000
MAX_RANGE_LOG_LINES = 50_000_000

_override: int | None = None
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, what: str = "size") -> int:
    """A byte size: ``"512M"`` -> 536870912; plain integers are bytes (K/M/G/T suffixes are powers of 1024).

    Args:
        text: the size as written.
        what: the setting it came from, for the message.

    Returns:
        The size in bytes (> 0).

    Raises:
        ConfigError: not a size, or <= 0.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"{what}: {text!r} is not a size (bytes, or a number with K, M, G or T)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ConfigError(f"{what}: {text!r} must be positive")
    return value


def set_memory_budget(nbytes: int | None) -> None:
    """Override the budget for this process.

    Args:
        nbytes: the budget in bytes; None goes back to ``QMACE_MEMORY_BUDGET`` or the default.
    """
    global _override
    _override = nbytes


def memory_budget() -> int:
    """The current per-tensor memory budget in bytes."""
    if _override is not None:
        return _override
    env = os.environ.get("QMACE_MEMORY_BUDGET")
    return parse_size(env, "QMACE_MEMORY_BUDGET") if env else DEFAULT_MEMORY_BUDGET


def human(nbytes: float) -> str:
    """A byte count for messages: ``1536`` -> ``"1.5 KiB"``.

    Args:
        nbytes: the number of bytes.

    Returns:
        The count in B, KiB, MiB, ... (one decimal above bytes).
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(nbytes) < 1024 or unit == "PiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} PiB"


def check_tensor_bytes(nbytes: int, where: str) -> None:
    """Refuse one tensor that would take more than the memory budget.

    Args:
        nbytes: the bytes the tensor would take (declared shape x dtype size).
        where: the file and tensor, for the message.

    Raises:
        ResourceLimitError: naming ``where``, the size and the budget, when ``nbytes`` > ``memory_budget()``.
    """
    budget = memory_budget()
    if nbytes > budget:
        raise ResourceLimitError(f"{where}: declares {human(nbytes)}, over the memory budget of {human(budget)} "
                                 "(raise it with --memory_budget or QMACE_MEMORY_BUDGET if this is intended)")
