"""face-api's SsdMobilenetv1 face detector in PyTorch, plus numpy pre/post-processing.

    net = load(FACE_API)                        # FACE_API = the unpacked @vladmandic/face-api package
    image, size = prepare(rgb)                  # face-api's pad-to-square (bottom/right) + resize to 512
    boxes, scores = net(torch.from_numpy(image))
    faces = postprocess(boxes[0].numpy(), scores[0].numpy(), size)   # [(x0, y0, x1, y1, score)] in pixels

The net (face-api src/ssdMobilenetv1): a MobileNetV1 backbone (TF-'same' convs, ReLU6) 512 -> 16, four
extra stride-2 convs 16 -> 1, and six SSD box predictors on the 32, 16, 8, 4, 2, 1 feature maps
(3 anchors per cell on the first, 6 on the others: 5118 anchors). The output layer decodes the box
offsets against the anchors stored in the weights (Output/extra_dim) with TF object detection's
faster-RCNN box coder (scales 10, 10, 5, 5) and takes sigmoid of the "face" class logit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.contracts.face_geometry import DETECTOR_SIZE as SIZE
from services.contracts.face_geometry import detections as postprocess  # noqa: F401 - face-api's names
from services.contracts.face_geometry import detector_input as prepare  # noqa: F401
from training.faces.tfjs import read_weights

ANCHORS = 5118
INPUT = ("image", [-1, 3, SIZE, SIZE])  # float32 RGB 0..255, prepare() output; -1 = dynamic batch
OUTPUTS = (
    ("boxes", [-1, ANCHORS, 4]),  # float32 (x0, y0, x1, y1) relative to the 512 square, not clipped
    ("scores", [-1, ANCHORS]),  # float32 face probability per anchor
)
MANIFEST = "model/ssd_mobilenetv1_model-weights_manifest.json"
BN_EPSILON = 0.0010000000474974513  # face-api's, the float32 nearest 1e-3


class SameConv2d(nn.Conv2d):
    """3x3 conv with TF 'same' padding: stride 1 pads 1 on each side; stride 2 (always on an even size
    here) pads only 1 on the bottom/right, which torch's symmetric `padding=` cannot express."""

    def __init__(self, cin: int, cout: int, stride: int, **kwargs):
        super().__init__(cin, cout, 3, stride, padding=1 if stride == 1 else 0, **kwargs)

    def forward(self, x):
        return super().forward(x if self.stride[0] == 1 else F.pad(x, (0, 1, 0, 1)))


class ConvRelu6(nn.Module):
    """face-api's pointwiseConvLayer: conv (1x1 or 3x3, 'same') + bias (a folded batch norm), ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1):
        super().__init__()
        self.conv = SameConv2d(cin, cout, stride) if kernel == 3 else nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return F.relu6(self.conv(x))


class DepthwiseBnRelu6(nn.Module):
    """face-api's depthwiseConvLayer: 3x3 depthwise conv ('same', no bias), batch norm, ReLU6."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.conv = SameConv2d(channels, channels, stride, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels, eps=BN_EPSILON)

    def forward(self, x):
        return F.relu6(self.bn(self.conv(x)))


class BoxPredictor(nn.Module):
    """1x1 convs giving, per cell and anchor, 4 box offsets and 3 class logits (background, face, unused)."""

    def __init__(self, cin: int, grid: int, anchors: int):
        super().__init__()
        self.count = grid * grid * anchors  # boxes from this feature map
        self.box = nn.Conv2d(cin, anchors * 4, 1)
        self.cls = nn.Conv2d(cin, anchors * 3, 1)

    def forward(self, x):
        # TF is NHWC: anchors are ordered row, column, anchor; match that before flattening.
        nhwc = lambda t: t.permute(0, 2, 3, 1)
        return nhwc(self.box(x)).reshape(-1, self.count, 4), nhwc(self.cls(x)).reshape(-1, self.count, 3)


# MobileNetV1 (depthwise stride, pointwise output channels) for conv_1 .. conv_13
MOBILENET = [(1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512)] + [(1, 512)] * 5 + [(2, 1024), (1, 1024)]
# the extra feature layers after MobileNetV1 (prediction_layer conv_0 .. conv_7): (kernel, stride, out)
EXTRAS = [(1, 1, 256), (3, 2, 512), (1, 1, 128), (3, 2, 256), (1, 1, 128), (3, 2, 256), (1, 1, 64), (3, 2, 128)]


class FaceDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = ConvRelu6(3, 32, kernel=3, stride=2)
        layers, cin = [], 32
        for stride, cout in MOBILENET:
            layers += [DepthwiseBnRelu6(cin, stride), ConvRelu6(cin, cout)]
            cin = cout
        self.mobilenet = nn.ModuleList(layers)
        self.extras = nn.ModuleList()
        for kernel, stride, cout in EXTRAS:
            self.extras.append(ConvRelu6(cin, cout, kernel, stride))
            cin = cout
        # on conv_11 (32x32), conv_13 (16x16), then extras 1, 3, 5, 7 (8, 4, 2, 1)
        grids = zip((1024, 512, 256, 256, 128), (16, 8, 4, 2, 1))
        self.predictors = nn.ModuleList([BoxPredictor(512, 32, 3)] + [BoxPredictor(c, g, 6) for c, g in grids])
        # the anchors' centres (y, x) and sizes (h, w), relative to the 512 square; set by load()
        self.register_buffer("anchor_center", torch.zeros(ANCHORS, 2))
        self.register_buffer("anchor_size", torch.zeros(ANCHORS, 2))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv0(image / 127.5 - 1)  # face-api normalises to -1..1
        for i, layer in enumerate(self.mobilenet):
            x = layer(x)
            if i == 2 * 11 - 1:  # conv_11 (its pointwise half), 32x32
                conv11 = x
        features = [conv11, x]
        for i, layer in enumerate(self.extras):
            x = layer(x)
            if i % 2 == 1:
                features.append(x)
        box, cls = zip(*(p(f) for p, f in zip(self.predictors, features)))
        box, cls = torch.cat(box, 1), torch.cat(cls, 1)

        # faster-RCNN box decoding, same op order as face-api's decodeBoxesLayer; offsets are (ty, tx, th, tw)
        offset, log_scale = box.split(2, -1)
        center = offset / 10 * self.anchor_size + self.anchor_center
        half = torch.exp(log_scale / 5) * self.anchor_size / 2
        (y0, x0), (y1, x1) = (center - half).unbind(-1), (center + half).unbind(-1)
        return torch.stack([x0, y0, x1, y1], -1), torch.sigmoid(cls[..., 1])


def load(face_api_dir: Path) -> FaceDetector:
    """FaceDetector with face-api's weights (TF layouts: HWIO convs, [H, W, C, 1] depthwise)."""
    w = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in read_weights(Path(face_api_dir) / MANIFEST).items()}
    conv = lambda v: v.permute(3, 2, 0, 1)  # HWIO -> OIHW
    state = {}

    def pointwise(module: str, prefix: str):
        state[f"{module}.conv.weight"] = conv(w[f"{prefix}/weights"])
        state[f"{module}.conv.bias"] = w[f"{prefix}/convolution_bn_offset"]

    pointwise("conv0", "MobilenetV1/Conv2d_0_pointwise")
    for i in range(1, 14):
        dw, m = f"MobilenetV1/Conv2d_{i}_depthwise", f"mobilenet.{2 * i - 2}"
        state[f"{m}.conv.weight"] = w[f"{dw}/depthwise_weights"].permute(2, 3, 0, 1)  # [H, W, C, 1] -> [C, 1, H, W]
        bn = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
        for ours, theirs in bn.items():
            state[f"{m}.bn.{ours}"] = w[f"{dw}/BatchNorm/{theirs}"]
        pointwise(f"mobilenet.{2 * i - 1}", f"MobilenetV1/Conv2d_{i}_pointwise")
    for i in range(8):
        pointwise(f"extras.{i}", f"Prediction/Conv2d_{i}_pointwise")
    for i in range(6):
        for ours, theirs in [("box", "BoxEncodingPredictor"), ("cls", "ClassPredictor")]:
            state[f"predictors.{i}.{ours}.weight"] = conv(w[f"Prediction/BoxPredictor_{i}/{theirs}/weights"])
            state[f"predictors.{i}.{ours}.bias"] = w[f"Prediction/BoxPredictor_{i}/{theirs}/biases"]

    # Anchors as face-api stores them, [1, 5118, (ymin, xmin, ymax, xmax)]: to centre + size in float32,
    # in the order of its getCenterCoordinatesAndSizesLayer, so that decoding rounds alike.
    anchors = w["Output/extra_dim"][0]
    state["anchor_size"] = anchors[:, 2:] - anchors[:, :2]
    state["anchor_center"] = anchors[:, :2] + state["anchor_size"] / 2
    # (the manifest's Preprocessor/Postprocessor/stack int constants are unused, by face-api too)

    net = FaceDetector()
    missing, unexpected = net.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return net.eval()
