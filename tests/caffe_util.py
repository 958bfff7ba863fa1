"""Tiny Caffe nets for the tests: a prototxt text, a caffemodel built with qmace's own Caffe message classes,
numpy references of Caffe's layer maths (written from Caffe's layer definitions, loop by loop), and helpers
that write both files plus a MACE YAML into tmp_path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from qmace.frontends.caffe import caffe_to_graph, messages, parse_prototxt
from qmace.passes import optimize
from qmace.runtime import Session


def input_layer(shape: tuple[int, ...], name: str = "data") -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {dims} }} }} }}\n'


def caffemodel(blobs: dict[str, list[np.ndarray]], legacy: bool = False, v1: bool = False):
    """A NetParameter holding only weights: layer name -> blobs (legacy: 4-D num/channels/height/width)."""
    net = messages()["NetParameter"]()
    for name, arrays in blobs.items():
        layer = (net.layers if v1 else net.layer).add(name=name)
        for a in arrays:
            a = np.asarray(a, np.float32)
            b = layer.blobs.add()
            if legacy:
                b.num, b.channels, b.height, b.width = (1,) * (4 - a.ndim) + a.shape
            else:
                b.shape.dim.extend(a.shape)
            b.data.extend(a.ravel().tolist())
    return net


def convert(prototxt: str, blobs: dict[str, list[np.ndarray]] | None = None, **kw):
    net = parse_prototxt(prototxt, "t.prototxt")
    return caffe_to_graph(net, caffemodel(blobs or {}, **kw), "t.prototxt", "t.caffemodel")


def run_both(prototxt: str, blobs: dict[str, list[np.ndarray]] | None, feeds: dict[str, np.ndarray],
             **kw) -> list[dict[str, np.ndarray]]:
    """The converted, optimized graph on qmace's reference kernels and on ONNX Runtime."""
    g = optimize(convert(prototxt, blobs, **kw))
    return [Session(g, backend=b).run(feeds) for b in ("reference", "onnxruntime")]


def write_caffe_files(root: Path, prototxt: str, blobs: dict[str, list[np.ndarray]], name: str = "tiny") -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    proto_path, model_path = root / f"{name}.prototxt", root / f"{name}.caffemodel"
    proto_path.write_text(prototxt)
    model_path.write_bytes(caffemodel(blobs).SerializeToString())
    return proto_path, model_path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def caffe_yaml(root: Path, proto_path: Path, model_path: Path, inputs: str, shapes: str, outputs: str,
               name: str = "tiny", weight_sha: str | None = None, extra: str = "") -> Path:
    text = (
        "library_name: caffelib\n"
        "target_abis: [host]\n"
        "models:\n"
        f"  {name}:\n"
        "    platform: caffe\n"
        f"    model_file_path: {proto_path}\n"
        f"    model_sha256_checksum: {sha256(proto_path)}\n"
        f"    weight_file_path: {model_path}\n"
        f"    weight_sha256_checksum: {weight_sha or sha256(model_path)}\n"
        "    runtime: cpu\n"
        f"{extra}"
        "    subgraphs:\n"
        f"      - input_tensors: {inputs}\n"
        f"        input_shapes: {shapes}\n"
        "        input_data_formats: NCHW\n"
        f"        output_tensors: {outputs}\n"
        "        output_data_formats: NONE\n"
    )
    path = root / f"{name}.yml"
    path.write_text(text)
    return path


# ---- numpy references of Caffe's layers ------------------------------------------------------------------


def conv_ref(x, w, b, stride, pad, dilation, group):
    """Caffe Convolution (cross-correlation, zero padding, output floor((in + 2p - d(k-1) - 1)/s) + 1)."""
    n, _c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0],) * 2, (pad[1],) * 2))
    ho = (h + 2 * pad[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    wo = (wd + 2 * pad[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    y = np.zeros((n, m, ho, wo))
    mg = m // group
    for o in range(m):
        g = o // mg
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg,
                           i * dilation[0]: i * dilation[0] + stride[0] * (ho - 1) + 1: stride[0],
                           j * dilation[1]: j * dilation[1] + stride[1] * (wo - 1) + 1: stride[1]]
                y[:, o] += np.einsum("nchw,c->nhw", patch, w[o, :, i, j])
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y


def deconv_ref(x, w, b, stride, pad, dilation, group):
    """Caffe Deconvolution: every input pixel scatters w[c, :, i, j] to output (h s - p + i d, w s - p + j d)."""
    n, c, h, wd = x.shape
    _, mg, kh, kw = w.shape
    cg = c // group
    fh, fw = stride[0] * (h - 1) + dilation[0] * (kh - 1) + 1, stride[1] * (wd - 1) + dilation[1] * (kw - 1) + 1
    full = np.zeros((n, mg * group, fh, fw))
    for ci in range(c):
        g = ci // cg
        for i in range(kh):
            for j in range(kw):
                full[:, g * mg:(g + 1) * mg,
                     i * dilation[0]: i * dilation[0] + stride[0] * (h - 1) + 1: stride[0],
                     j * dilation[1]: j * dilation[1] + stride[1] * (wd - 1) + 1: stride[1]] += (
                    x[:, ci][:, None] * w[ci, :, i, j][None, :, None, None])
    y = full[:, :, pad[0]: fh - pad[0], pad[1]: fw - pad[1]]
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return y


def pool_ref(x, method, kernel, stride, pad, ceil=True):
    """Caffe PoolingLayer::Forward_cpu, loop for loop (output size, window clipping, AVE divisor)."""
    n, c, h, w = x.shape
    out = []
    for size, k, s, p in zip((h, w), kernel, stride, pad):
        span = size + 2 * p - k
        o = (-(-span // s) if ceil else span // s) + 1
        if p and (o - 1) * s >= size + p:
            o -= 1
        out.append(o)
    y = np.zeros((n, c, *out))
    for ph in range(out[0]):
        for pw in range(out[1]):
            hs, ws = ph * stride[0] - pad[0], pw * stride[1] - pad[1]
            if method == "MAX":
                he, we = min(hs + kernel[0], h), min(ws + kernel[1], w)
                hs, ws = max(hs, 0), max(ws, 0)
                y[:, :, ph, pw] = x[:, :, hs:he, ws:we].max(axis=(2, 3))
            else:
                he, we = min(hs + kernel[0], h + pad[0]), min(ws + kernel[1], w + pad[1])
                pool_size = (he - hs) * (we - ws)
                hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
                y[:, :, ph, pw] = x[:, :, hs:he, ws:we].sum(axis=(2, 3)) / pool_size
    return y
