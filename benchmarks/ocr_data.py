"""Build the text-line set of the PP-OCRv4 recognizer benchmark (issue 16) into the qmace cache.

    python scripts/fetch_assets.py rapidocr ocr-text extra-photos
    python benchmarks/ocr_data.py [--calib 100] [--eval 200] [--seed 0] [--force]

-> ``<cache>/ocr-lines/{calib,eval}/*.png`` and ``<cache>/ocr-lines/lines.json`` (every line's file, split,
kind, phrase, source, font, background). Rendered lines: ``--calib`` / ``--eval`` of them, phrases from Debian
sed/grep (English and Chinese) drawn with the Debian fonts on plain colours or photo crops; photographed lines:
every crop of scikit-image's page.png / text.png by the rules of ``qmace_zoo.ocr`` (evaluation only). The
split rule (phrases and background photos by sha256, disjoint) is in ``qmace_zoo/ocr.py``'s docstring.
Idempotent: an existing set built with the same arguments is kept (``--force`` rebuilds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: qmace_zoo is not installed

from qmace_zoo import default_cache
from qmace_zoo.ocr import (
    LINES_DIR,
    REC_MODEL,
    Line,
    load_lines,
    page_line_boxes,
    phrases_from,
    recognizer_charset,
    render_line,
    save_lines,
    split_pools,
    strip_boxes,
)

CJK_FONT_HINT = "CJK"


def _manifest(cache: Path, name: str, what: str) -> dict:
    try:
        return json.loads((cache / name).read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"ocr_data: {cache / name}: {e} (run scripts/fetch_assets.py {what})")


def is_cjk(text: str) -> bool:
    """Whether ``text`` has a character outside Latin-1 (drawn with a Noto CJK font then)."""
    return any(ord(c) > 0xFF for c in text)


def build(cache: Path, n_calib: int, n_eval: int, seed: int) -> tuple[Path, list[Line]]:
    from PIL import Image

    root = cache / LINES_DIR
    texts = _manifest(cache, "ocr-text.json", "ocr-text")
    photos = _manifest(cache, "extra-photos.json", "extra-photos")["photos"]
    charset = set(recognizer_charset(cache / "rapidocr" / REC_MODEL)[1:])
    phrases = phrases_from([Path(p) for p in texts["texts"]], charset)
    fonts = list(texts["fonts"])
    cjk_fonts = [f for f in fonts if CJK_FONT_HINT in Path(f).name]
    tmp = cache / f".{LINES_DIR}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    lines: list[Line] = []
    pools = split_pools(phrases, photos)
    for split, count in (("calib", n_calib), ("eval", n_eval)):
        (tmp / split).mkdir(parents=True)
        rng = np.random.default_rng([seed, 0 if split == "calib" else 1])
        pool, bgs = pools[split]
        order = rng.permutation(len(pool))
        made = 0
        for i in order:
            if made == count:
                break
            text, src = pool[i]
            font = str(rng.choice(cjk_fonts if is_cjk(text) else fonts))
            bg_path = str(rng.choice(bgs)) if bgs and rng.random() < 0.5 else None
            bg = Image.open(bg_path).convert("RGB") if bg_path else None
            img, drawn = render_line(text, font, int(rng.integers(22, 45)), rng, bg)
            if img is None:
                continue
            name = f"{split}/r{made:03d}.png"
            img.save(tmp / name)
            lines.append(Line(name, split, "rendered", drawn, src, Path(font).name,
                              Path(bg_path).name if bg_path else "plain"))
            made += 1
        if made < count:
            sys.exit(f"ocr_data: only {made} {split} phrases could be rendered ({len(pool)} in the pool), "
                     f"{count} asked")
    # photographed text: evaluation only
    k = 0
    for p in texts["photos"]:
        with Image.open(p) as im:
            gray = im.convert("L")
        arr = np.asarray(gray)
        boxes = page_line_boxes(arr) if Path(p).name == "page.png" else strip_boxes(*arr.shape)
        for box in boxes:
            name = f"eval/p{k:03d}.png"
            gray.crop(box).save(tmp / name)
            lines.append(Line(name, "eval", "photographed", "", f"scikit-image/{Path(p).name} {list(box)}"))
            k += 1
    save_lines(tmp, lines, {"seed": seed, "calib": n_calib, "eval": n_eval})
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return root, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None, help="default: $QMACE_CACHE or ~/.cache/qmace")
    ap.add_argument("--calib", type=int, default=100, help="rendered calibration lines (default 100)")
    ap.add_argument("--eval", type=int, default=200, help="rendered evaluation lines (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if a set with these arguments exists")
    a = ap.parse_args(argv)
    cache = (a.cache or default_cache()).expanduser()
    root = cache / LINES_DIR
    if not a.force and (root / "lines.json").is_file():
        meta = json.loads((root / "lines.json").read_text())
        if (meta.get("seed"), meta.get("calib"), meta.get("eval")) == (a.seed, a.calib, a.eval):
            lines = load_lines(root)
            print(f"ocr-lines: {root} (cached): " + _counts(lines))
            return 0
    root, lines = build(cache, a.calib, a.eval, a.seed)
    print(f"ocr-lines: {root} (built): " + _counts(lines))
    return 0


def _counts(lines: list[Line]) -> str:
    c: dict[str, int] = {}
    for ln in lines:
        c[f"{ln.split} {ln.kind}"] = c.get(f"{ln.split} {ln.kind}", 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(c.items()))


if __name__ == "__main__":
    sys.exit(main())
