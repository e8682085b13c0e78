"""face-api's FaceLandmark68Net (the full one, not tiny) in PyTorch, plus numpy pre/post-processing.

    net = load(FACE_API)                       # FACE_API = the unpacked @vladmandic/face-api package
    face, t = crop(rgb, (x, y, w, h))          # face-api's crop + pad-to-square + resize to 112
    rel = net(torch.from_numpy(face))[0]       # [68, 2], (x, y) in 0..1 of the 112x112 input
    points = to_image_points(rel.numpy(), t)   # [68, 2] pixels in `rgb`

The net (face-api src/faceFeatureExtractor + src/faceProcessor): four "dense blocks" of TF-'same'
separable convolutions, 112 -> 56 -> 28 -> 14 -> 7, a 7x7 average pool and a 256 -> 136 linear
layer whose outputs are x0, y0, x1, y1, ... relative to the (padded, square) 112x112 input.
Points follow the iBUG 300-W 68-point order, like dlib's shape_predictor_68_face_landmarks.

The box matters: face-api feeds boxes from its own detectors, which cover the whole face. A tight box
(dlib's HOG detector) cuts the chin off the crop and the net then squeezes the jaw line inside it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from services.contracts.face_geometry import LANDMARK_SIZE as SIZE  # noqa: F401 - the input side, for callers
from services.contracts.face_geometry import landmark_input as crop  # noqa: F401 - face-api's names
from services.contracts.face_geometry import landmark_points as to_image_points  # noqa: F401
from training.faces.tfjs import read_weights

INPUT = "face"  # float32 [N, 3, 112, 112], RGB, 0..255: crop() output
OUTPUT = "landmarks"  # float32 [N, 68, 2], (x, y) relative to the 112x112 input
MEAN_RGB = (122.782, 117.001, 104.298)  # face-api subtracts these, then divides by 255
MANIFEST = "model/face_landmark_68_model-weights_manifest.json"

# dlib's 5-point order as 68-point indices: outer and inner corner of the eye on the image's right,
# the same for the eye on the image's left, bottom of the nose (checked against dlib's 5-point model).
FIVE_POINTS = (45, 42, 36, 39, 33)


def same_pad(x: torch.Tensor, stride: int) -> torch.Tensor:
    # TF 'same' with a 3x3 kernel: stride 1 pads 1 on each side; stride 2 on an even size pads
    # only 1 on the bottom/right, which torch's symmetric `padding=` cannot express.
    return F.pad(x, (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1))


class SeparableConv(nn.Module):
    """tf.separableConv2d + bias: a 3x3 depthwise conv (no bias), then a 1x1 conv with bias."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.depthwise = nn.Conv2d(cin, cin, 3, stride, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(same_pad(x, self.stride)))


class Conv(nn.Module):
    """Plain 3x3 conv with TF 'same' padding (only the first layer of the net)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(cin, cout, 3, stride)

    def forward(self, x):
        return self.conv(same_pad(x, self.stride))


class DenseBlock(nn.Module):
    """face-api's denseBlock4: every conv sees the ReLU of the sum of all earlier outputs."""

    def __init__(self, cin: int, cout: int, first: bool = False):
        super().__init__()
        self.conv0 = (Conv if first else SeparableConv)(cin, cout, stride=2)
        self.conv1 = SeparableConv(cout, cout)
        self.conv2 = SeparableConv(cout, cout)
        self.conv3 = SeparableConv(cout, cout)

    def forward(self, x):
        out1 = F.relu(self.conv0(x))
        out2 = self.conv1(out1)
        out3 = self.conv2(F.relu(out1 + out2))
        out4 = self.conv3(F.relu(out1 + out2 + out3))
        return F.relu(out1 + out2 + out3 + out4)


class FaceLandmarks(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense0 = DenseBlock(3, 32, first=True)
        self.dense1 = DenseBlock(32, 64)
        self.dense2 = DenseBlock(64, 128)
        self.dense3 = DenseBlock(128, 256)
        self.fc = nn.Linear(256, 136)
        self.register_buffer("mean", torch.tensor(MEAN_RGB).view(1, 3, 1, 1), persistent=False)

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        x = (face - self.mean) / 255
        x = self.dense3(self.dense2(self.dense1(self.dense0(x))))
        x = F.avg_pool2d(x, 7, 2).flatten(1)  # 7x7 -> 1x1, as tf.avgPool([7, 7], [2, 2], 'valid')
        return self.fc(x).view(-1, 68, 2)  # interleaved x0, y0, x1, y1, ...


def load(face_api_dir: Path) -> FaceLandmarks:
    """FaceLandmarks with face-api's weights (TF layouts: HWIO convs, [H, W, C, 1] depthwise)."""
    w = {k: torch.from_numpy(v) for k, v in read_weights(Path(face_api_dir) / MANIFEST).items()}
    state = {"fc.weight": w.pop("fc/weights").T, "fc.bias": w.pop("fc/bias")}
    for name, value in w.items():
        block, conv, kind = name.split("/")
        prefix = f"{block}.{conv}"
        if kind == "filters":  # HWIO -> OIHW
            state[f"{prefix}.conv.weight"] = value.permute(3, 2, 0, 1)
        elif kind == "depthwise_filter":  # [H, W, C, 1] -> [C, 1, H, W]
            state[f"{prefix}.depthwise.weight"] = value.permute(2, 3, 0, 1)
        elif kind == "pointwise_filter":  # [1, 1, I, O] -> [O, I, 1, 1]
            state[f"{prefix}.pointwise.weight"] = value.permute(3, 2, 0, 1)
        elif kind == "bias":
            state[f"{prefix}.{'conv' if block == 'dense0' and conv == 'conv0' else 'pointwise'}.bias"] = value
        else:
            raise KeyError(name)
    net = FaceLandmarks()
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)  # inference only: outputs can go straight to .numpy()
