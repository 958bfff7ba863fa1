"""MobileNetV2 in plain torch, state_dict-compatible with torchvision's `mobilenet_v2` (strict=True).

torchvision is not importable here, so the architecture is written out: `features.0` is the stem
(Conv-BN-ReLU6), `features.1..17` the inverted residual blocks (attribute `conv`), `features.18` the 1x1
Conv-BN-ReLU6 to 1280 channels, and `classifier` is `Sequential(Dropout(0.2), Linear(1280, 1000))`.

torch is optional: it is imported inside the functions, so `import qmace_zoo` works without it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import warnings
from pathlib import Path

from qmace.errors import ModelError

# t (expansion), c (output channels), n (repeats), s (first stride) -- torchvision's table.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


@functools.cache
def _model_class():
    """Define the torch module classes on first use (keeps torch out of module import)."""
    import torch
    from torch import nn

    class ConvBNReLU6(nn.Sequential):
        """Conv2d(bias=False) -> BatchNorm2d -> ReLU6, keys `.0` / `.1` like torchvision's Conv2dNormActivation."""

        def __init__(self, inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1):
            super().__init__(
                nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                nn.BatchNorm2d(oup),
                nn.ReLU6(inplace=True),
            )

    class InvertedResidual(nn.Module):
        def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
            super().__init__()
            hidden = round(inp * expand_ratio)
            self.use_res_connect = stride == 1 and inp == oup
            layers: list[nn.Module] = []
            if expand_ratio != 1:
                layers.append(ConvBNReLU6(inp, hidden, kernel=1))
            layers += [
                ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
                nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            if self.use_res_connect:
                return x + self.conv(x)
            return self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
            super().__init__()
            inp, last = 32, 1280
            features: list[nn.Module] = [ConvBNReLU6(3, inp, stride=2)]
            for t, c, n, s in INVERTED_RESIDUAL_SETTING:
                for i in range(n):
                    features.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                    inp = c
            features.append(ConvBNReLU6(inp, last, kernel=1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last, num_classes))
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)

        def forward(self, x):
            x = self.features(x)
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
            return self.classifier(x)

    return MobileNetV2


def build_mobilenet_v2(num_classes: int = 1000):
    """A randomly initialised MobileNetV2 (width 1.0) in eval mode. Requires torch."""
    return _model_class()(num_classes=num_classes).eval()


def load_mobilenet_v2(pth_path: str | os.PathLike):
    """Load torchvision's ImageNet MobileNetV2 weights (e.g. `mobilenet_v2-b0353104.pth`) strictly.

    Returns the model in eval mode. Raises ModelError naming the file if it is missing or does not match.
    """
    import torch

    path = Path(pth_path)
    if not path.is_file():
        raise ModelError(f"{path}: MobileNetV2 weights not found (run scripts/fetch_assets.py mobilenet)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt/truncated file
        raise ModelError(f"{path}: cannot read torch weights: {e}") from e
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state_dict, got {type(state).__name__}")
    model = build_mobilenet_v2(
        num_classes=state["classifier.1.weight"].shape[0] if "classifier.1.weight" in state else 1000
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{path}: not a torchvision MobileNetV2 state_dict: {e}") from e
    return model.eval()


def export_onnx(model, path: str | os.PathLike, batch: int | None = None) -> Path:
    """Export `model` (input N x 3 x 224 x 224) to ONNX opset 17 with the TorchScript exporter.

    Input is named `input`, output `output`. With `batch=None` the batch axis is dynamic (traced at 1);
    with an int the batch size is fixed to it. The file is written atomically. Returns the path.
    """
    import torch

    path = Path(path)
    model = model.eval()
    dummy = torch.zeros(1 if batch is None else int(batch), 3, 224, 224)
    dynamic_axes = {"input": {0: "batch"}, "output": {0: "batch"}} if batch is None else None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is chosen on purpose
            torch.onnx.export(
                model,
                (dummy,),
                tmp,
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
