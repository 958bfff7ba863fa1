"""Real evaluation data: Tux Paint photo stamps (ImageNet mini set) and Fashion-MNIST.

Assets are fetched by `scripts/fetch_assets.py` into the cache (`~/.cache/qmace`, or `$QMACE_CACHE`, or the
explicit `cache` argument). The split and hand labels live in the repository's
`data/` folder (see its README.md). numpy only; Pillow is imported lazily by `preprocess`.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np

from qmace.errors import InputDataError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
RESIZE = 256
CROP = 224

REPO_DATA = Path(__file__).resolve().parents[1] / "data"
STAMPS_SUBDIR = Path("tuxpaint/usr/share/tuxpaint/stamps")
FASHION_SUBDIR = Path("fashion-mnist")
FASHION_MANIFEST = "fashion-mnist.json"
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def default_cache() -> Path:
    """`$QMACE_CACHE` if set, else `~/.cache/qmace`."""
    env = os.environ.get("QMACE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qmace"


def _cache(cache: str | os.PathLike | None) -> Path:
    return Path(cache).expanduser() if cache is not None else default_cache()


def data_dir_of(data_dir: str | os.PathLike | None = None) -> Path:
    """The split/labels folder: `data_dir` if given, else the repository's `data/`."""
    d = Path(data_dir) if data_dir is not None else REPO_DATA
    if not (d / "stamps-split.json").is_file():
        raise InputDataError(f"{d}: data folder has no stamps-split.json")
    return d


def stamps_dir(cache: str | os.PathLike | None = None) -> Path:
    """`<cache>/tuxpaint/usr/share/tuxpaint/stamps`; InputDataError if it was not fetched."""
    d = _cache(cache) / STAMPS_SUBDIR
    if not d.is_dir():
        raise InputDataError(f"{d}: Tux Paint stamps not found (run scripts/fetch_assets.py stamps)")
    return d


def load_split(data_dir: str | os.PathLike | None = None) -> dict:
    """The parsed `stamps-split.json`: keys `calib` (64 paths), `eval` (233), `excluded`, `rule`, ..."""
    path = data_dir_of(data_dir) / "stamps-split.json"
    try:
        split = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputDataError(f"{path}: cannot read split: {e}") from e
    for key in ("calib", "eval"):
        if not isinstance(split.get(key), list):
            raise InputDataError(f"{path}: key '{key}' missing or not a list")
    return split


def imagenet_labels(data_dir: str | os.PathLike | None = None) -> dict[str, list[int]]:
    """Hand labels: stamp path (relative to the stamps folder) -> acceptable ImageNet-1k class ids."""
    path = data_dir_of(data_dir) / "stamps-imagenet-labels.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputDataError(f"{path}: cannot read labels: {e}") from e
    return {str(k): [int(c) for c in v] for k, v in raw.items()}


def preprocess(path: str | os.PathLike) -> np.ndarray:
    """One image -> (3, 224, 224) float32, exactly as data/README.md specifies.

    Alpha-composite on white, RGB, resize the shorter side to 256 (bilinear, longer side
    `int(256 * long / short)`), centre crop 224 (torchvision's rounding), /255, ImageNet mean/std, CHW.
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            rgba = im.convert("RGBA")
    except (OSError, ValueError) as e:
        raise InputDataError(f"{path}: cannot read image: {e}") from e
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")

    w, h = rgb.size
    if w <= h:
        size = (RESIZE, int(RESIZE * h / w))
    else:
        size = (int(RESIZE * w / h), RESIZE)
    rgb = rgb.resize(size, Image.BILINEAR)

    w, h = rgb.size
    top = round((h - CROP) / 2.0)
    left = round((w - CROP) / 2.0)
    rgb = rgb.crop((left, top, left + CROP, top + CROP))

    x = np.asarray(rgb, dtype=np.float32) / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def load_images(paths, root: str | os.PathLike | None = None) -> np.ndarray:
    """Preprocess several images into (N, 3, 224, 224) float32. Relative paths are taken under `root`."""
    paths = list(paths)
    base = Path(root) if root is not None else None
    out = np.empty((len(paths), 3, CROP, CROP), dtype=np.float32)
    for i, p in enumerate(paths):
        p = Path(p)
        if base is not None and not p.is_absolute():
            p = base / p
        out[i] = preprocess(p)
    return out


# --- IDX (MNIST-style) files ---------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed, detected by magic bytes) into a numpy array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise InputDataError(f"{path}: cannot read IDX file: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise InputDataError(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputDataError(f"{path}: IDX header truncated")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) != header + count * dtype.itemsize:
        raise InputDataError(
            f"{path}: IDX size mismatch: shape {shape} needs {header + count * dtype.itemsize} bytes, "
            f"file has {len(raw)}"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def _fashion_paths(cache: Path) -> dict[str, Path]:
    manifest = cache / FASHION_MANIFEST
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text())
            paths = {k: Path(recorded[k]) for k in FASHION_FILES}
            if all(p.is_file() for p in paths.values()):
                return paths
        except (OSError, ValueError, KeyError, TypeError):
            pass  # fall back to searching the extracted tree
    root = cache / FASHION_SUBDIR
    paths = {}
    for key, stem in FASHION_FILES.items():
        hits = sorted(root.rglob(f"{stem}.gz")) + sorted(root.rglob(stem)) if root.is_dir() else []
        if not hits:
            raise InputDataError(
                f"{root}: Fashion-MNIST file {stem}[.gz] not found (run scripts/fetch_assets.py fashion-mnist)"
            )
        paths[key] = hits[0]
    return paths


def fashion_mnist(cache: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Fashion-MNIST as uint8 arrays: train_images (60000,28,28), train_labels (60000,),
    test_images (10000,28,28), test_labels (10000,)."""
    paths = _fashion_paths(_cache(cache))
    data = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        imgs, labels = data[f"{split}_images"], data[f"{split}_labels"]
        if imgs.ndim != 3 or labels.ndim != 1 or imgs.shape[0] != labels.shape[0]:
            raise InputDataError(
                f"{paths[f'{split}_images']}: Fashion-MNIST {split} images {imgs.shape} do not match "
                f"labels {labels.shape}"
            )
    return {k: v.astype(np.uint8, copy=False) for k, v in data.items()}
