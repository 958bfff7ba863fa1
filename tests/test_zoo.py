"""Fast tests of qmace_zoo that need no downloads: IDX parsing, stamp preprocessing, MobileNetV2."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qmace.errors import InputDataError
from qmace_zoo import stamps as zstamps
from qmace_zoo.stamps import IMAGENET_MEAN, IMAGENET_STD, fashion_mnist, load_images, preprocess, read_idx

REPO = Path(__file__).resolve().parents[1]


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


# --- IDX ------------------------------------------------------------------------------------------------


def test_read_idx_uint8_plain_and_gzip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a-idx3-ubyte").write_bytes(_idx_bytes(arr))
    (tmp_path / "b-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        got = read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
        np.testing.assert_array_equal(got, arr)


def test_read_idx_big_endian_int32(tmp_path):
    arr = np.array([1, -2, 70000], dtype=np.int32)
    (tmp_path / "i.idx").write_bytes(_idx_bytes(arr, code=0x0C))
    got = read_idx(tmp_path / "i.idx")
    np.testing.assert_array_equal(got, arr)
    assert got.dtype == np.int32


@pytest.mark.parametrize("data", [b"\x00\x01\x08\x01", b"\x00\x00\x08\x01\x00\x00\x00\x05abc", b"PK"])
def test_read_idx_rejects_bad_files(tmp_path, data):
    p = tmp_path / "bad.idx"
    p.write_bytes(data)
    with pytest.raises(InputDataError, match="bad.idx"):
        read_idx(p)


def test_fashion_mnist_from_tiny_tree(tmp_path):
    root = tmp_path / "fashion-mnist" / "usr/share/datasets/fashion-mnist"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("t10k", 3)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(imgs)))
        (root / f"{split}-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    d = fashion_mnist(tmp_path)
    assert d["train_images"].shape == (5, 28, 28) and d["train_labels"].shape == (5,)
    assert d["test_images"].shape == (3, 28, 28) and d["test_images"].dtype == np.uint8


def test_fashion_mnist_missing_is_clear(tmp_path):
    with pytest.raises(InputDataError, match="fetch_assets"):
        fashion_mnist(tmp_path)


# --- preprocessing --------------------------------------------------------------------------------------


def test_preprocess_white_and_transparent(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    expected = (1.0 - IMAGENET_MEAN) / IMAGENET_STD
    # Opaque white, and fully transparent (composited on white), in non-square RGBA images.
    Image.new("RGBA", (300, 200), (255, 255, 255, 255)).save(tmp_path / "white.png")
    Image.new("RGBA", (150, 400), (10, 200, 30, 0)).save(tmp_path / "clear.png")
    for name in ("white.png", "clear.png"):
        x = preprocess(tmp_path / name)
        assert x.shape == (3, 224, 224) and x.dtype == np.float32
        np.testing.assert_allclose(x, np.broadcast_to(expected[:, None, None], x.shape), atol=1e-6)


def test_preprocess_crop_and_channels(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    # Left half red, right half blue, 512x256: resize to 512x256 (no-op), centre crop keeps both halves.
    a = np.zeros((256, 512, 4), np.uint8)
    a[..., 3] = 255
    a[:, :256, 0] = 255
    a[:, 256:, 2] = 255
    Image.fromarray(a, "RGBA").save(tmp_path / "rb.png")
    x = preprocess(tmp_path / "rb.png") * IMAGENET_STD[:, None, None] + IMAGENET_MEAN[:, None, None]
    np.testing.assert_allclose(x[:, :, :112].mean(axis=(1, 2)), [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(x[:, :, 112:].mean(axis=(1, 2)), [0, 0, 1], atol=1e-6)
    batch = load_images(["rb.png", tmp_path / "rb.png"], root=tmp_path)
    assert batch.shape == (2, 3, 224, 224)
    np.testing.assert_array_equal(batch[0], batch[1])


def test_preprocess_unreadable(tmp_path):
    pytest.importorskip("PIL.Image")
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(InputDataError, match="x.png"):
        preprocess(tmp_path / "x.png")


def test_repo_data_split_and_labels():
    split = zstamps.load_split()
    assert len(split["calib"]) == 64 and len(split["eval"]) == 233
    labels = zstamps.imagenet_labels()
    assert sum(p in labels for p in split["eval"]) == 113


def test_import_is_lazy():
    code = "import sys, qmace_zoo; print('torch' in sys.modules, 'PIL' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_fetch_assets_rejects_unknown_asset(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fetch_assets.py"), "--cache", str(tmp_path), "nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0 and "unknown asset" in proc.stderr and "Traceback" not in proc.stderr


def _rcc_bytes(tree: dict, version: int = 2) -> bytes:
    """A Qt .rcc bundle (format 1-2) holding ``tree``: {name: bytes | (bytes, "zlib") | dict}."""
    import struct
    import zlib

    names, payload, nodes = bytearray(), bytearray(), [None]

    def name_off(name):
        off = len(names)
        names.extend(struct.pack(">HI", len(name), 0) + name.encode("utf-16-be"))
        return off

    def fill(slot, name, children):  # a directory's children occupy consecutive node slots
        items = sorted(children.items())
        first = len(nodes)
        nodes.extend([None] * len(items))
        nodes[slot] = ("dir", name_off(name) if slot else 0, len(items), first)
        for k, (child, value) in enumerate(items):
            if isinstance(value, dict):
                fill(first + k, child, value)
                continue
            blob, flags = (value, 0) if isinstance(value, bytes) else (value[0], 1)
            if flags:  # qCompress: uncompressed size, then zlib
                blob = struct.pack(">I", len(blob)) + zlib.compress(blob)
            nodes[first + k] = ("file", name_off(child), flags, len(payload))
            payload.extend(struct.pack(">I", len(blob)) + blob)

    fill(0, "", tree)
    tail = b"\0" * 8 if version >= 2 else b""
    tree_bytes = b"".join(
        (struct.pack(">IHII", n[1], 2, n[2], n[3]) if n[0] == "dir" else struct.pack(">IHHHI", n[1], n[2], 0, 0, n[3]))
        + tail for n in nodes)
    t = 20
    return b"qres" + struct.pack(">IIII", version, t, t + len(tree_bytes), t + len(tree_bytes) + len(payload)) \
        + tree_bytes + bytes(payload) + bytes(names)


def test_fetch_assets_reads_qt_resource_bundles(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import fetch_assets
    finally:
        sys.path.pop(0)
    photo, other = bytes(range(256)) * 3, b"x" * 1000
    tree = {"gcompris": {"a.jpg": (photo, "zlib"), "sub": {"b.webp": other}}, "top.txt": b"hi"}
    data = _rcc_bytes(tree)
    got = dict(fetch_assets.read_rcc(data, tmp_path / "t.rcc"))
    assert got == dict(fetch_assets.read_rcc(_rcc_bytes(tree, version=1), tmp_path))
    assert got == {"/gcompris/a.jpg": photo, "/gcompris/sub/b.webp": other, "/top.txt": b"hi"}
    with pytest.raises(fetch_assets.FetchError, match="t.rcc: not a Qt resource"):
        list(fetch_assets.read_rcc(b"junk" + data[4:], tmp_path / "t.rcc"))


# --- MobileNetV2 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mbv2():
    torch = pytest.importorskip("torch")
    from qmace_zoo import build_mobilenet_v2

    torch.manual_seed(0)
    model = build_mobilenet_v2()
    # Give BatchNorm non-trivial statistics, as trained weights would have.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model


def test_mobilenet_v2_torchvision_keys(mbv2):
    sd = mbv2.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["features.0.0.weight"] == (32, 3, 3, 3)
    assert shapes["features.0.1.running_var"] == (32,)
    assert shapes["features.1.conv.0.0.weight"] == (32, 1, 3, 3)  # t=1 block: dw, pw-linear, bn
    assert shapes["features.1.conv.1.weight"] == (16, 32, 1, 1)
    assert shapes["features.1.conv.2.weight"] == (16,)
    assert shapes["features.2.conv.0.0.weight"] == (96, 16, 1, 1)  # t=6 block: expand, dw, pw-linear, bn
    assert shapes["features.2.conv.1.0.weight"] == (96, 1, 3, 3)
    assert shapes["features.2.conv.2.weight"] == (24, 96, 1, 1)
    assert shapes["features.2.conv.3.num_batches_tracked"] == ()
    assert shapes["features.17.conv.2.weight"] == (320, 960, 1, 1)
    assert shapes["features.18.0.weight"] == (1280, 320, 1, 1)
    assert shapes["classifier.1.weight"] == (1000, 1280)
    assert shapes["classifier.1.bias"] == (1000,)
    assert len(sd) == 314  # torchvision's mobilenet_v2 state_dict has 314 entries
    assert sum(p.numel() for p in mbv2.parameters()) == 3_504_872


def test_load_mobilenet_v2_strict_roundtrip(tmp_path, mbv2):
    torch = pytest.importorskip("torch")
    from qmace.errors import ModelError
    from qmace_zoo import load_mobilenet_v2

    torch.save(mbv2.state_dict(), tmp_path / "w.pth")
    loaded = load_mobilenet_v2(tmp_path / "w.pth")
    assert not loaded.training
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), mbv2(x))
    bad = dict(mbv2.state_dict())
    bad.pop("classifier.1.bias")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ModelError, match="bad.pth"):
        load_mobilenet_v2(tmp_path / "bad.pth")
    with pytest.raises(ModelError, match="missing.pth"):
        load_mobilenet_v2(tmp_path / "missing.pth")


def test_export_onnx_matches_torch(tmp_path, mbv2):
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    from qmace_zoo import export_onnx

    path = export_onnx(mbv2, tmp_path / "sub" / "m.onnx")
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["m.onnx"]  # no temp file left behind
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["output"]
    x = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)  # batch 3: dynamic
    got = sess.run(["output"], {"input": x})[0]
    with torch.no_grad():
        ref = mbv2(torch.from_numpy(x)).numpy()
    assert got.shape == (3, 1000)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
