"""Typed errors. Library code raises these; the CLI turns them into one line and a non-zero exit code.

Every message must name what is wrong and where: the file, the YAML key path, the tensor, the node or the
line number.
"""


class QmaceError(Exception):
    """Base of every expected error (bad input, unsupported model, ...)."""


class ConfigError(QmaceError):
    """The deployment YAML is missing, malformed or inconsistent. Message names the file and key path."""


class ModelError(QmaceError):
    """The model file is missing, truncated, not ONNX, or contradicts the YAML."""


class KernelError(ModelError):
    """An op's kernel rejected a node's inputs (at run time, or when a pass such as constant folding evaluates
    it); the message names the node, its op type, the input shapes and the kernel's reason."""


class UnsupportedOpsError(ModelError):
    """The model uses ops qmace cannot convert; the message lists every op type with its node count."""


class InputDataError(QmaceError):
    """Input samples are missing, of the wrong size, or unreadable. Message names the file."""


class RangeError(QmaceError):
    """A range log or range file is malformed, or tensors lack a quantization range."""


class QuantizationError(QmaceError):
    """The quantization plan cannot be built (missing ranges, bad options)."""


class FileAccessError(QmaceError):
    """A file or folder cannot be read or written (missing, permission, read-only, disk full, a folder where a
    file is expected, ...). Message names the path and the operating system's reason."""


class PathError(QmaceError):
    """A name or path would place output outside the build folder, or read input outside the model's folder."""


class ResourceLimitError(QmaceError):
    """Something declares more memory, depth or size than the configured budget (``qmace.limits``)."""


class ModelFileError(ModelError):
    """A ``.qmace`` model file is corrupt, tampered with, or stale (built from other settings)."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of ``str(e)``, for one-line errors that quote a third-party library.

    Args:
        e: the exception.
        limit: the most characters kept.

    Returns:
        The first line (at most ``limit`` characters), or the exception's type name when it has no message.
    """
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__
