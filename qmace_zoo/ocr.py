"""Text-line data for the PP-OCRv4 recognizer benchmark (issue 16): rendered and photographed lines.

Sources (all from packages, fetched by ``scripts/fetch_assets.py rapidocr ocr-text extra-photos``):

- text: the English message ids and Chinese (zh_CN) translations of Debian ``sed`` and ``grep`` (their
  ``.mo`` catalogs) and the two packages' copyright files, cut into phrases that fit one 48 x 320 line;
- fonts: DejaVu, Liberation and Noto CJK (Debian), sizes 22-44 px;
- backgrounds: plain colours, and crops of the 17 real photos of ``extra-photos`` (Debian mate-backgrounds,
  scikit-image);
- photographed text: scikit-image's ``page.png`` (a photographed book page) and ``text.png`` (handwriting on
  paper), cropped by :func:`page_line_boxes` / :func:`strip_boxes` (rules in their docstrings).

**Split rule (calibration and evaluation disjoint).** A phrase goes to calibration when the first byte of
``sha256(phrase)`` is < 64 (a quarter), else to evaluation; a background photo likewise by ``sha256`` of its
file name, with the same cut, so no phrase and no photo appears on both sides (:func:`split_of`). Fonts and
plain colours are shared (they are the rendering domain, not data). Photographed lines are evaluation only.

Preprocessing (:func:`preprocess_line`) is RapidOCR's ``TextRecognizer.resize_norm_img`` for a batch of one
line: resize to height 48 keeping the aspect ratio (width ``ceil(48 w / h)``, at most 320), scale to [-1, 1]
(``x / 255 - 0.5) / 0.5``), zero-pad on the right to 320; BGR channel order (RapidOCR reads with OpenCV). The
resize is Pillow's bilinear instead of OpenCV's (not installed), a sub-pixel difference. Lines are rendered no
wider than 320/48 of their height, so no line is squeezed.

numpy only at import; Pillow is imported by the functions that need it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qmace.errors import InputDataError

REC_MODEL = "ch_PP-OCRv4_rec_infer.onnx"
DET_MODEL = "ch_PP-OCRv4_det_infer.onnx"
REC_INPUT, REC_OUTPUT = "x", "softmax_11.tmp_0"
REC_HEIGHT, REC_WIDTH = 48, 320
REC_TIMESTEPS = 40  # output (1, 40, 6625) for a 320-wide input
MAX_ASPECT = REC_WIDTH / REC_HEIGHT
CALIB_CUT = 64  # first sha256 byte < CALIB_CUT -> calibration (1/4)
LINES_DIR = "ocr-lines"
LINES_MANIFEST = "lines.json"


@dataclass(frozen=True)
class Line:
    """One text-line image of the set: file (relative to the set folder), split and how it was made."""
    file: str
    split: str  # "calib" or "eval"
    kind: str  # "rendered" or "photographed"
    text: str  # the rendered phrase ("" for photographed lines: not transcribed)
    source: str  # text source / photo file
    font: str = ""
    background: str = ""


def split_of(key: str) -> str:
    """``"calib"`` when the first byte of ``sha256(key)`` is < ``CALIB_CUT`` (a quarter of keys), else ``"eval"``.

    Args:
        key: a phrase, or a background photo's file name.

    Returns:
        The split the key belongs to.
    """
    return "calib" if hashlib.sha256(key.encode("utf-8")).digest()[0] < CALIB_CUT else "eval"


def split_pools(phrases: list[tuple[str, str]], photos: list[str]) -> dict[str, tuple[list, list]]:
    """``{"calib": (phrases, photos), "eval": (phrases, photos)}`` by :func:`split_of` of each phrase and of
    each photo's file name (order kept). A phrase listed twice lands on one side only.

    Args:
        phrases: (phrase, source) pairs.
        photos: background photo paths.

    Returns:
        The two disjoint pools.
    """
    out: dict[str, tuple[list, list]] = {"calib": ([], []), "eval": ([], [])}
    for t, src in phrases:
        out[split_of(t)][0].append((t, src))
    for p in photos:
        out[split_of(Path(p).name)][1].append(p)
    return out


def preprocess_line(image, height: int = REC_HEIGHT, width: int = REC_WIDTH) -> np.ndarray:
    """One line image -> (3, height, width) float32 as RapidOCR's ``resize_norm_img`` (batch of one).

    ``w' = min(width, ceil(height * w / h))``; bilinear resize to (height, w'); ``(x / 255 - 0.5) / 0.5``;
    zeros right of ``w'``. Channels BGR.

    Args:
        image: a PIL image (any mode) or an (h, w[, 3]) uint8 RGB array.

    Returns:
        The network input of one line (no batch axis).
    """
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    im = im.convert("RGB")
    w, h = im.size
    rw = min(width, int(math.ceil(height * w / float(h))))
    arr = np.asarray(im.resize((rw, height), Image.BILINEAR), np.float32)[:, :, ::-1]  # RGB -> BGR
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :rw] = (arr.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


# ------------------------------------------------------------------------------------------------ text


def _mo_catalog(path: Path) -> dict[str, str]:
    import gettext

    with open(path, "rb") as f:
        return dict(gettext.GNUTranslations(f)._catalog)  # msgid -> msgstr


def _phrases(text: str) -> Iterator[str]:
    """Whitespace-normalised pieces of ``text``: one per line / sentence, without format placeholders."""
    for raw in re.split(r"[\n。；;]|\.\s", text):
        s = re.sub(r"%[-#0-9.]*[a-zA-Z]|\\[a-z]", "", raw)
        s = " ".join(s.split()).strip(" -:*,.")
        if len(s) >= 3 and not s.startswith(("http", "Project-Id", "Content-", "Language", "MIME", "Plural",
                                             "PO-Revision", "Last-Translator", "Report-Msgid")):
            yield s


def phrases_from(paths: Iterable[Path], charset: set[str] | None = None) -> list[tuple[str, str]]:
    """(phrase, source) pairs from ``.mo`` catalogs (msgids and msgstrs) and plain-text files, deduplicated
    in order, keeping only phrases whose every character is in ``charset`` (when given)."""
    seen: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        if p.suffix == ".mo":
            texts = [t for pair in _mo_catalog(p).items() for t in pair if isinstance(t, str)]
        else:
            texts = [p.read_text(encoding="utf-8", errors="replace")]
        src = f"{p.parent.name}/{p.name}"
        for t in texts:
            for s in _phrases(t):
                if charset is None or all(c in charset for c in s):
                    seen.setdefault(s, src)
    return list(seen.items())


def recognizer_charset(rec_model: Path) -> list[str]:
    """The recognizer's classes: ``["blank", *dictionary, " "]`` (RapidOCR's ``CTCLabelDecode``), the dictionary
    being the ONNX metadata key ``character`` (one character per line)."""
    import onnx

    m = onnx.load(str(rec_model), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    if "character" not in meta:
        raise InputDataError(f"{rec_model}: no 'character' metadata (not a RapidOCR PP-OCR recognizer?)")
    return ["blank", *meta["character"].splitlines(), " "]


# ------------------------------------------------------------------------------------------- rendering


def fit_phrase(text: str, font, max_w: float) -> str:
    """The longest prefix of ``text`` (whole words for spaced text, else characters) rendered in ``font``
    no wider than ``max_w`` px; "" if not even one unit fits."""
    units = text.split(" ") if " " in text else list(text)
    sep = " " if " " in text else ""
    out = ""
    for u in units:
        cand = (out + sep + u) if out else u
        if font.getlength(cand) > max_w:
            break
        out = cand
    return out


def render_line(text: str, font_path: str, size: int, rng: np.random.Generator, background=None):
    """``text`` in the given font on a plain colour (``background`` None) or on a crop of ``background`` (a PIL
    RGB photo), with a contrasting ink colour, a small rotation and blur / noise / JPEG at random. Returns
    (PIL RGB image, the text actually drawn) — the phrase is cut to keep width / height <= 320 / 48."""
    import io

    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    font = ImageFont.truetype(font_path, size)
    pad_y = int(size * rng.uniform(0.15, 0.4))
    pad_x = int(size * rng.uniform(0.2, 0.6))
    asc, desc = font.getmetrics()
    h = asc + desc + 2 * pad_y
    text = fit_phrase(text, font, MAX_ASPECT * h - 2 * pad_x)
    if not text:
        return None, ""
    w = int(math.ceil(font.getlength(text))) + 2 * pad_x
    if background is None:
        light = rng.random() < 0.8
        bg = tuple(int(v) for v in (rng.integers(190, 256, 3) if light else rng.integers(0, 70, 3)))
        canvas = Image.new("RGB", (w, h), bg)
    else:
        bw, bh = background.size
        scale = max(w / bw, h / bh, rng.uniform(0.3, 1.0))
        photo = background.resize((max(w, int(bw * scale)), max(h, int(bh * scale))), Image.BILINEAR)
        x0 = int(rng.integers(0, photo.size[0] - w + 1))
        y0 = int(rng.integers(0, photo.size[1] - h + 1))
        canvas = photo.crop((x0, y0, x0 + w, y0 + h))
    lum = float(np.asarray(canvas.convert("L"), np.float32).mean())
    ink = tuple(int(v) for v in (rng.integers(0, 60, 3) if lum > 110 else rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(canvas)
    stroke = 1 if background is not None and rng.random() < 0.5 else 0
    draw.text((pad_x, pad_y), text, font=font, fill=ink, stroke_width=stroke,
              stroke_fill=tuple(255 - c for c in ink))
    angle = float(rng.uniform(-2.0, 2.0))
    canvas = canvas.rotate(angle, resample=Image.BILINEAR, expand=False, fillcolor=canvas.getpixel((0, 0)))
    if rng.random() < 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    if rng.random() < 0.3:
        arr = np.asarray(canvas, np.float32) + rng.normal(0, rng.uniform(3, 10), (h, w, 3))
        canvas = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        buf = io.BytesIO()
        canvas.save(buf, format="JPEG", quality=int(rng.integers(40, 85)))
        buf.seek(0)
        canvas = Image.open(buf).convert("RGB")
    return canvas, text


# ----------------------------------------------------------------------------------- photographed text


def _box_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over a k x k window (edge-padded), via an integral image."""
    r = k // 2
    p = np.pad(a, r + 1, mode="edge").astype(np.float64)
    s = p.cumsum(0).cumsum(1)
    h, w = a.shape
    return (s[k:k + h, k:k + w] - s[:h, k:k + w] - s[k:k + h, :w] + s[:h, :w]) / (k * k)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of the runs of True in a 1-D mask."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def page_line_boxes(gray: np.ndarray, min_height: int = 8, pad: int = 4, gap: int = 5) -> list[tuple[int, ...]]:
    """Text-line crops of a photographed page, by a fixed rule.

    Ink = pixels darker than their 31 x 31 neighbourhood mean minus 12; a text row has ink in > 2% of its
    pixels; runs of text rows >= ``min_height`` high are lines (padded by ``pad``). Within a line, ink columns
    separated by more than ``gap`` blank columns are words; the crops are consecutive word groups, greedily
    as long as width <= 320/48 x height, every word in exactly one crop; crops narrower than their height are
    dropped.

    Args:
        gray: (h, w) uint8 image.

    Returns:
        (left, top, right, bottom) boxes.
    """
    g = gray.astype(np.float32)
    ink = g < _box_mean(g, 31) - 12
    rows = ink.mean(1) > 0.02
    boxes = []
    H, W = g.shape
    for y0, y1 in _runs(rows):
        if y1 - y0 < min_height:
            continue
        t, b = max(0, y0 - pad), min(H, y1 + pad)
        cols = ink[y0:y1].any(0)
        # close gaps of <= gap columns: words
        words, start, last = [], None, -10**9
        for x in np.flatnonzero(cols):
            if start is None:
                start = x
            elif x - last > gap:
                words.append((start, last + 1))
                start = x
            last = x
        if start is not None:
            words.append((start, last + 1))
        words = [(a, c) for a, c in words if c - a >= 3]
        limit = MAX_ASPECT * (b - t)
        group: list[tuple[int, int]] = []
        for wd in words:
            if group and wd[1] - group[0][0] + 2 * pad > limit:
                boxes.append((max(0, group[0][0] - pad), t, min(W, group[-1][1] + pad), b))
                group = []
            group.append(wd)
        if group:
            boxes.append((max(0, group[0][0] - pad), t, min(W, group[-1][1] + pad), b))
    return [bx for bx in boxes if bx[2] - bx[0] >= bx[3] - bx[1]]


def strip_boxes(h: int, w: int, strips: int = 4) -> list[tuple[int, ...]]:
    """Overlapping horizontal strips for a photo whose lines are not horizontal (scikit-image's text.png,
    handwriting at an angle): height ``h / strips``, stride half of it, each cut into pieces of width
    <= 320/48 x height at the same half-overlap."""
    sh = h // strips
    step = max(1, sh // 2)
    pw = int(MAX_ASPECT * sh)
    out = []
    for y in range(0, h - sh + 1, step):
        for x in range(0, max(1, w - pw + 1), max(1, pw // 2)):
            out.append((x, y, min(w, x + pw), y + sh))
    return out


# ------------------------------------------------------------------------------------------- the set


def load_lines(root: Path) -> list[Line]:
    """The manifest of a built set (``<root>/lines.json``); InputDataError if missing."""
    path = Path(root) / LINES_MANIFEST
    try:
        return [Line(**d) for d in json.loads(path.read_text())["lines"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputDataError(f"{path}: no text-line set ({e}); run benchmarks/ocr_data.py") from None


def save_lines(root: Path, lines: list[Line], meta: dict) -> Path:
    """Write ``<root>/lines.json`` (lines + how they were made)."""
    path = Path(root) / LINES_MANIFEST
    path.write_text(json.dumps({**meta, "lines": [asdict(x) for x in lines]}, ensure_ascii=False, indent=1) + "\n")
    return path


def load_inputs(root: Path, lines: list[Line]) -> np.ndarray:
    """(N, 3, 48, 320) float32 network inputs of ``lines`` (``preprocess_line`` of each image)."""
    from PIL import Image

    xs = []
    for ln in lines:
        with Image.open(Path(root) / ln.file) as im:
            xs.append(preprocess_line(im))
    return np.stack(xs) if xs else np.zeros((0, 3, REC_HEIGHT, REC_WIDTH), np.float32)
