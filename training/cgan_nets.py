"""The class-conditional GAN's networks and losses (training/cgan.py trains them): a generator
with class-conditional batch norm, a projection discriminator, the losses and penalties tried.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import spectral_norm

from training.datasets import FASHION_CLASSES

CLASSES = len(FASHION_CLASSES)


class ConditionalBatchNorm(nn.Module):
    """Batch norm whose scale and shift are a linear map of the class weights: a one-hot picks a
    class's pair; a mixture of two classes mixes their pairs (class morphing)."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Linear(classes, channels, bias=False)
        self.bias = nn.Linear(classes, channels, bias=False)
        nn.init.zeros_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * (1 + self.gain(weights)[:, :, None, None]) + self.bias(weights)[:, :, None, None]


class Generator(nn.Module):
    """[latent, class weights] -> 7x7x(4w) -> 14x14x(2w) -> 28x28x(w) -> 28x28x1 in [-1, 1]; depth: 3x3 convs
    per resolution after each upsampling (1: v2's generator)."""

    def __init__(self, nz: int, width: int, classes: int = CLASSES, depth: int = 1):
        super().__init__()
        self.nz, self.width = nz, width
        self.project = nn.Linear(nz + classes, 4 * width * 7 * 7)
        self.norm0 = ConditionalBatchNorm(4 * width, classes)
        self.conv1 = nn.Conv2d(4 * width, 2 * width, 3, padding=1)
        self.norm1 = ConditionalBatchNorm(2 * width, classes)
        self.conv2 = nn.Conv2d(2 * width, width, 3, padding=1)
        self.norm2 = ConditionalBatchNorm(width, classes)
        # the extra convs at 14x14 and 28x28 (none at depth 1, so v2's weights load as they are)
        self.extra = nn.ModuleList([nn.ModuleList([nn.Conv2d(c, c, 3, padding=1), ConditionalBatchNorm(c, classes)])
                                    for c in (2 * width, width) for _ in range(depth - 1)])
        self.out = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        x = self.project(torch.cat([z, weights], 1)).unflatten(1, (4 * self.width, 7, 7))
        x = F.relu(self.norm0(x, weights))
        per_resolution = len(self.extra) // 2
        for i, (conv, norm) in enumerate(((self.conv1, self.norm1), (self.conv2, self.norm2))):
            x = F.relu(norm(conv(F.interpolate(x, scale_factor=2.0, mode="nearest")), weights))
            for extra_conv, extra_norm in self.extra[i * per_resolution:(i + 1) * per_resolution]:
                x = F.relu(extra_norm(extra_conv(x), weights))
        return torch.tanh(self.out(x))


class Discriminator(nn.Module):
    """image, class weights -> one score: a linear head on pooled features plus the projection
    <embed(class), features> that asks "is this a real image OF THIS CLASS"."""

    def __init__(self, width: int, classes: int = CLASSES, normalise: bool = True, projection: bool = True,
                 std_group: int = 0):
        super().__init__()
        sn = spectral_norm if normalise else (lambda m: m)
        self.std_group = std_group
        self.layers = nn.ModuleList([
            sn(nn.Conv2d(1, width, 3, 1, 1)), sn(nn.Conv2d(width, 2 * width, 4, 2, 1)),            # 14x14
            sn(nn.Conv2d(2 * width, 2 * width, 3, 1, 1)), sn(nn.Conv2d(2 * width, 4 * width, 4, 2, 1)),  # 7x7
            sn(nn.Conv2d(4 * width + (1 if std_group else 0), 4 * width, 3, 1, 1))])
        self.head = sn(nn.Linear(4 * width, 1))
        self.embed = sn(nn.Linear(classes, 4 * width, bias=False)) if projection else None
        self.concat = None if projection else sn(nn.Linear(classes, 28 * 28))  # the label as an extra input plane

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.concat is not None:
            x = x + self.concat(weights).view(-1, 1, 28, 28)
        for layer in self.layers[:-1]:
            x = F.leaky_relu(layer(x), 0.1)
        if self.std_group:  # one more input channel for the last conv
            x = minibatch_std(x, self.std_group)
        x = F.leaky_relu(self.layers[-1](x), 0.1)
        features = x.sum(dim=(2, 3))
        score = self.head(features).view(-1)
        if self.embed is not None:
            score = score + (self.embed(weights) * features).sum(1)
        return score


def minibatch_std(x: torch.Tensor, group: int) -> torch.Tensor:
    """ProGAN's minibatch standard deviation (Karras et al., 2018): one more feature map, how much the
    images of a small group differ, so the discriminator can see a generator whose images all look alike."""
    n, c, h, w = x.shape
    g = math.gcd(group, n)
    # the small constant keeps the square root's gradient finite where the images are identical
    spread = (x.float().view(g, -1, c, h, w).var(0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))
    return torch.cat([x, spread.repeat(g).view(n, 1, 1, 1).expand(n, 1, h, w).to(x.dtype)], 1)


def r1_penalty(net_d: "Discriminator", real: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al., 2018): the squared gradient of the discriminator at real images."""
    real = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(net_d(real, weights).float().sum(), real, create_graph=True)
    return grad.pow(2).sum(dim=(1, 2, 3)).mean()


class Exported(nn.Module):
    """What is exported: [N, nz + classes] -> image [N, 1, 28, 28] (one input: the runtime's batcher merges rows)."""

    def __init__(self, generator: Generator):
        super().__init__()
        self.generator = generator

    def forward(self, latent_and_class: torch.Tensor) -> torch.Tensor:
        nz = self.generator.nz
        return self.generator(latent_and_class[:, :nz], latent_and_class[:, nz:])


def one_hot(labels, classes: int = CLASSES) -> torch.Tensor:
    return F.one_hot(torch.as_tensor(labels, dtype=torch.long), classes).float()


def discriminator_loss(kind: str, real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()
    return (F.binary_cross_entropy_with_logits(real_scores, torch.ones_like(real_scores))
            + F.binary_cross_entropy_with_logits(fake_scores, torch.zeros_like(fake_scores)))


def generator_loss(kind: str, fake_scores: torch.Tensor) -> torch.Tensor:
    """Hinge's generator loss, or the non-saturating BCE one."""
    if kind == "hinge":
        return -fake_scores.mean()
    return F.binary_cross_entropy_with_logits(fake_scores, torch.ones_like(fake_scores))


def mode_seeking_loss(fake: torch.Tensor, z: torch.Tensor, half: int) -> torch.Tensor:
    """MSGAN (Mao et al., 2019): pairs of one class whose latents differ should differ as images;
    the inverse of their distance ratio, so a generator that ignores its latent pays. It works
    against the within-class collapse the per-class FIDs showed (a class's images varied less than
    the real ones of that class)."""
    n = len(fake) - half
    images = (fake[:n] - fake[half:half + n]).abs().mean()
    latents = (z[:n] - z[half:half + n]).abs().mean()
    return 1 / (images / latents + 1e-5)


@torch.no_grad()
def generate(net_g: Generator, latents, labels, batch: int = 500) -> torch.Tensor:
    net_g.eval()
    latents, weights = torch.as_tensor(latents, dtype=torch.float32), one_hot(labels)
    return torch.cat([net_g(latents[i:i + batch], weights[i:i + batch]) for i in range(0, len(latents), batch)])
