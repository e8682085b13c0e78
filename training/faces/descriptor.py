"""face-api's FaceRecognitionNet in PyTorch: 150x150 aligned face chip -> 128-d face descriptor.

    net = load(FACE_API)                     # FACE_API = the unpacked @vladmandic/face-api package
    descriptor = net(chip)                   # chip float32 [N, 3, 150, 150], RGB, 0..255

The net is dlib's face recognition ResNet (dlib_face_recognition_resnet_model_v1, the one behind
`face_recognition`), as face-api ported it to TF.js: a 7x7/2 conv, a 3x3/2 max pool, 14 residual blocks
(32, 64, 128, 256 channels), a global average pool and a 256 -> 128 linear layer with no bias.
Weights: face-api's model/face_recognition_model-weights_manifest.json + .bin, i.e. dlib's weights
quantised to uint8 per tensor (read and dequantised by training.faces.tfjs.read_weights).
Two faces are the same person when their descriptors are closer than about 0.6 (Euclidean).

The chip must be aligned the way dlib.get_face_chip(img, shape_5_points, size=150, padding=0.25) does it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.faces.tfjs import read_weights

SIZE = 150
INPUT = {"name": "chip", "shape": ["batch", 3, SIZE, SIZE], "dtype": "float32",
         "description": "aligned face chip (dlib.get_face_chip, 150 px, padding 0.25), RGB, 0..255"}
OUTPUT = {"name": "descriptor", "shape": ["batch", 128], "dtype": "float32",
          "description": "face descriptor; same person if Euclidean distance < 0.6"}
MEAN_RGB = (122.782, 117.001, 104.298)
# face-api divides by 255 where dlib divides by 256. We follow face-api, whose weights and outputs these are;
# /256 would move a descriptor by only ~0.001. What separates us from dlib (~0.04) is the uint8 weights.
SCALE = 255.0
MANIFEST = "model/face_recognition_model-weights_manifest.json"


class Conv(nn.Module):
    """conv + bias, then dlib's affine layer (a frozen batch norm: x * weight + bias). Kept apart
    rather than folded into the conv: the conv's weights stay face-api's 256 uint8 levels per tensor,
    which the exported ONNX stores as one byte each (training/faces/compact.py)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, relu: bool = True):
        super().__init__()
        # dlib pads 3x3 stride-1 convs by 1 and does not pad strided ones (TF 'same' and 'valid').
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2 if stride == 1 else 0)
        self.scale = nn.Parameter(torch.ones(1, cout, 1, 1), requires_grad=False)
        self.shift = nn.Parameter(torch.zeros(1, cout, 1, 1), requires_grad=False)
        self.relu = relu

    def forward(self, x):
        x = self.conv(x) * self.scale + self.shift
        return F.relu(x) if self.relu else x


class Residual(nn.Module):
    """Two 3x3 convs plus a shortcut. `down` halves the size with a strided conv, and the shortcut with a
    2x2 average pool whose extra channels are zeros (dlib's add_prev pads the smaller tensor with zeros)."""

    def __init__(self, cin: int, cout: int, down: bool = False):
        super().__init__()
        self.conv1 = Conv(cin, cout, stride=2 if down else 1)
        self.conv2 = Conv(cout, cout, relu=False)
        self.down = down

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        if self.down:
            x = F.avg_pool2d(x, 2, 2)
            # A valid 3x3/2 conv can give one row/column fewer than the 2x2/2 pool (8 -> 3 vs 4, 4 -> 1 vs 2):
            # pad the conv output at the bottom/right and the pool with zero channels up to cout.
            out = F.pad(out, (0, x.shape[3] - out.shape[3], 0, x.shape[2] - out.shape[2]))
            x = F.pad(x, (0, 0, 0, 0, 0, out.shape[1] - x.shape[1]))
        return F.relu(out + x)


class FaceDescriptor(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv32_down = Conv(3, 32, kernel=7, stride=2)
        self.conv32_1, self.conv32_2, self.conv32_3 = Residual(32, 32), Residual(32, 32), Residual(32, 32)
        self.conv64_down = Residual(32, 64, down=True)
        self.conv64_1, self.conv64_2, self.conv64_3 = Residual(64, 64), Residual(64, 64), Residual(64, 64)
        self.conv128_down = Residual(64, 128, down=True)
        self.conv128_1, self.conv128_2 = Residual(128, 128), Residual(128, 128)
        self.conv256_down = Residual(128, 256, down=True)
        self.conv256_1, self.conv256_2 = Residual(256, 256), Residual(256, 256)
        self.conv256_down_out = Residual(256, 256, down=True)
        self.fc = nn.Linear(256, 128, bias=False)
        self.register_buffer("mean", torch.tensor(MEAN_RGB).view(1, 3, 1, 1))

    def forward(self, chip: torch.Tensor) -> torch.Tensor:
        x = (chip - self.mean) / SCALE
        x = F.max_pool2d(self.conv32_down(x), 3, 2)  # 150 -> 72 -> 35
        for block in (self.conv32_1, self.conv32_2, self.conv32_3,
                      self.conv64_down, self.conv64_1, self.conv64_2, self.conv64_3,  # 17
                      self.conv128_down, self.conv128_1, self.conv128_2,  # 8
                      self.conv256_down, self.conv256_1, self.conv256_2,  # 4
                      self.conv256_down_out):  # 2
            x = block(x)
        return self.fc(x.mean((2, 3)))


def load(face_api_dir: Path) -> FaceDescriptor:
    """FaceDescriptor with face-api's weights, in eval mode, float32."""
    weights = read_weights(Path(face_api_dir) / MANIFEST)
    w = {k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in weights.items()}
    state = {"fc.weight": w.pop("fc").T, "mean": torch.tensor(MEAN_RGB).view(1, 3, 1, 1)}
    for name in [k for k in w if k.endswith("/conv/filters")]:
        prefix = name.removesuffix("/conv/filters")  # "conv32_down" or "conv32_1/conv1"
        key = prefix.replace("/", ".")
        state[f"{key}.conv.weight"] = w[name].permute(3, 2, 0, 1)  # filters are HWIO, torch wants OIHW
        state[f"{key}.conv.bias"] = w[f"{prefix}/conv/bias"]
        state[f"{key}.scale"] = w[f"{prefix}/scale/weights"].view(1, -1, 1, 1)
        state[f"{key}.shift"] = w[f"{prefix}/scale/biases"].view(1, -1, 1, 1)
    net = FaceDescriptor()
    net.load_state_dict({k: v.contiguous() for k, v in state.items()})
    return net.eval().requires_grad_(False)
