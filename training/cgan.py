"""Train a class-conditional GAN on Fashion-MNIST, measure it, export it to ONNX, write its card.

    # v3's recipe (the defaults are v2's, so v2's card command still reproduces it)
    python -m training cgan --epochs 18 --decay-start 12 --precision bf16 --g-depth 3 --minibatch-std 4 \
        --no-spectral-norm --loss bce --r1 1                                        # models/generator/fashion/<next>
    python -m training cgan --g-depth 2 --epochs 2 --no-export --run-dir runs/screen/depth2  # an ablation run
    python -m training cgan --epochs 18 --resume ... --ablation runs/screen/*     # finished: measure, export
    python -m training cgan --compare runs/cgan/fashion runs/screen/*             # their figures side by side

Top to bottom:
  1. train: a generator with class-conditional batch norm (its gains and biases a linear map
     of the class weights) and nearest-neighbour upsampling; a projection discriminator
     (Miyato & Koyama, 2018) with spectral normalisation; hinge loss; Adam with TTUR; an
     exponential moving average of the generator's weights for sampling (the defaults: v2's
     recipe). Flags for what was tried beside it: convs per resolution in the generator, the
     minibatch standard deviation and the R1 penalty for the discriminator, the non-saturating
     loss, wider networks, a linear learning-rate decay, bf16 mixed precision on the CPU, the
     mode-seeking term. A progress bar per epoch, a grid per epoch (one row per class), a
     checkpoint per epoch (--resume), loss and FID curves;
  2. measure on the held-out test split: FID and KID with the project's fixed extractor
     (training/gan_quality.py) for raw and averaged weights, floor and ceiling; per class,
     FID against that class's held-out images and the spread of generated over real ones;
     class fidelity: how often the shipped `fashion` classifier, through the service's own
     preprocessing, names the requested class on 10,000 generated images, and the same
     on the 10,000 real test images (the ceiling);
  3. export [N, latent_dim + classes] -> image [N, 1, 28, 28] (the latent, then the class
     weights: one-hot for a class, a mixture to morph between classes); parity with torch;
  4. write models/generator/<name>/<version>/ with the card, report.md (the tables the docs
     show), samples and curves.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import spectral_norm
from tqdm import tqdm

from services.contracts.latents import SEED_TO_LATENT, TO_UINT8, seed_latents
from training import cards, gan_quality
from training.datasets import FASHION_CLASSES, load_fashion_mnist, to_tensor, to_uint8
from training.gan import parity_report, read_checkpoint, save_png, sample_grid, write_checkpoint

CLASSES = len(FASHION_CLASSES)
GRID_COLUMNS = 10  # seeds 0..9 in every row of the per-epoch grid
EARLY_EPOCH = 2  # the tables compare runs here too: the screening runs of the ablation are 2 epochs long
R1_EVERY = 4  # lazy R1: every 4th discriminator step, its weight times 4 (StyleGAN2)


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


def grid_inputs(nz: int) -> tuple[np.ndarray, np.ndarray]:
    """One row per class, seeds 0..9 across: the same latents in every row."""
    latents = seed_latents(range(GRID_COLUMNS), nz)
    return np.tile(latents, (CLASSES, 1)), np.repeat(np.arange(CLASSES), GRID_COLUMNS)


def save_grid(net_g: Generator, nz: int, path: Path) -> None:
    latents, labels = grid_inputs(nz)
    save_png(sample_grid(to_uint8(generate(net_g, latents, labels)), columns=GRID_COLUMNS, scale=2), path)


class Judge:
    """The shipped `fashion` classifier, through the service's own preprocessing (services/contracts/imaging.py):
    what the served /classify would answer for each image sent as a PNG."""

    def __init__(self, models_dir: Path = Path("models/classifier")):
        import onnxruntime as ort

        from services.contracts import repository

        self.entry = repository.resolve(models_dir, "fashion", kind="classifier")
        self.pre = self.entry.card["contract"]["preprocessing"]
        options = ort.SessionOptions()
        self.session = ort.InferenceSession(str(self.entry.path), options, providers=["CPUExecutionProvider"])

    def probabilities(self, images: np.ndarray, batch: int = 250) -> np.ndarray:
        """uint8 [N, 28, 28, 1] -> softmax [N, classes]."""
        from PIL import Image

        from services.contracts import imaging

        out = []
        for i in range(0, len(images), batch):
            pixels = np.stack([imaging.prepare(Image.fromarray(im[..., 0]), **imaging.contract_args(self.pre))
                               for im in images[i:i + batch]])
            logits = self.session.run(["logits"], {"image": imaging.normalise(pixels, self.pre["mean"],
                                                                             self.pre["std"])})[0]
            e = np.exp(logits - logits.max(1, keepdims=True))
            out.append(e / e.sum(1, keepdims=True))
        return np.concatenate(out)

    def fidelity(self, images: np.ndarray, labels: np.ndarray) -> dict:
        p = self.probabilities(images)
        agree = p.argmax(1) == labels
        return {"agreement": float(agree.mean()), "confident_share": float((p.max(1) >= gan_quality.CONFIDENT).mean()),
                "mean_top1_confidence": float(p.max(1).mean()),
                "per_class_agreement": {FASHION_CLASSES[c]: float(agree[labels == c].mean()) for c in range(CLASSES)},
                "images": int(len(images))}


def fid_now(net_g: Generator, extractor, held_features: np.ndarray, nz: int, n: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    features, _ = gan_quality.embed(extractor, generate(net_g, rng.standard_normal((n, nz)).astype(np.float32),
                                                        np.arange(n) % CLASSES))
    return gan_quality.fid(features, held_features)


def plot_curves(history: list[dict], epochs: list[dict], per_epoch: int, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6))
    window = max(1, min(100, len(history) // 20))
    for key, label in (("loss_d", "discriminator"), ("loss_g", "generator")):
        values = np.convolve([h[key] for h in history], np.ones(window) / window, mode="valid")
        top.plot(np.arange(window, len(history) + 1) / per_epoch, values, label=f"{label} loss (mean of {window})")
    top.set(xlabel="epoch", ylabel="loss", title="class-conditional GAN on Fashion-MNIST")
    for key, label in (("fid", "raw weights"), ("fid_ema", "moving average")):
        if any(e.get(key) is not None for e in epochs):
            bottom.plot([e["epoch"] for e in epochs], [e.get(key) for e in epochs], "o-", label=f"FID, {label}")
    bottom.set(xlabel="epoch", ylabel="FID (2,000 images)", yscale="log")
    for ax in (top, bottom):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def export_onnx(net_g: Generator, path: Path) -> None:
    module = Exported(copy.deepcopy(net_g)).eval()
    torch.onnx.export(module, (torch.zeros(2, net_g.nz + CLASSES),), str(path), input_names=["latent_and_class"],
                      output_names=["image"], dynamic_axes={"latent_and_class": {0: "batch"}, "image": {0: "batch"}},
                      opset_version=17, dynamo=False)


def check_parity(net_g: Generator, path: Path, seed: int, count: int = 1000) -> dict:
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed + 2)
    latents = rng.standard_normal((count, net_g.nz)).astype(np.float32)
    labels = np.arange(count) % CLASSES
    inputs = np.concatenate([latents, one_hot(labels).numpy()], 1)
    onnx_out = np.concatenate([session.run(None, {"latent_and_class": inputs[i:i + 100]})[0]
                               for i in range(0, count, 100)])
    diff = float(np.abs(onnx_out - generate(net_g, latents, labels).numpy()).max())
    single = np.concatenate([session.run(None, {"latent_and_class": inputs[i:i + 1]})[0] for i in range(64)])
    whole = session.run(None, {"latent_and_class": inputs[:64]})[0]
    return parity_report({"inputs": count}, diff, single, whole)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training cgan", description=__doc__.split("\n")[0])
    p.add_argument("--name", default="fashion", help="model name in the repository (fashion: a new version of it)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr-g", type=float, default=1e-4)
    p.add_argument("--lr-d", type=float, default=4e-4, help="4x the generator's (TTUR, as SAGAN)")
    p.add_argument("--beta1", type=float, default=0.0)
    p.add_argument("--beta2", type=float, default=0.9)
    p.add_argument("--nz", type=int, default=100, help="latent size")
    # The defaults are v2's recipe, so its card's command reproduces it; v3's card names its flags.
    p.add_argument("--width", type=int, default=32, help="the generator's base channel width")
    p.add_argument("--d-width", type=int, default=32, help="the discriminator's base channel width")
    p.add_argument("--loss", choices=["hinge", "bce"], default="hinge", help="bce: the non-saturating loss")
    p.add_argument("--decay-start", type=int, default=0,
                   help="from this epoch both learning rates fall linearly to 0 at the last epoch "
                        "(as SNGAN and the projection discriminator); 0: constant")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="fp32",
                   help="bf16: mixed precision (autocast; weights, losses and sampling stay float32), about "
                        "1.6x faster on CPUs with AVX-512 BF16")
    p.add_argument("--g-depth", type=int, default=1, help="3x3 convs per resolution in the generator")
    p.add_argument("--minibatch-std", type=int, default=0, metavar="GROUP",
                   help="the discriminator sees how much groups of this many images differ (ProGAN); 0: off")
    p.add_argument("--r1", type=float, default=0.0, metavar="GAMMA",
                   help=f"R1 gradient penalty on real images, every {R1_EVERY} steps (lazy, as StyleGAN2); 0: off")
    p.add_argument("--no-spectral-norm", dest="spectral_norm", action="store_false")
    p.add_argument("--no-projection", dest="projection", action="store_false",
                   help="condition the discriminator by an extra input plane instead of the projection")
    p.add_argument("--mode-seeking", type=float, default=0.0,
                   help="weight of the mode-seeking term (Mao et al., 2019): pairs of images of one class "
                        "must differ as their latents do; 0: off")
    p.add_argument("--ema-decay", type=float, default=0.999, help="0: sample from the raw weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--limit", type=int, help="use only the first N training images (smoke tests)")
    p.add_argument("--fid-samples", type=int, default=10_000, help="generated and real images for the final FID/KID")
    p.add_argument("--epoch-fid-samples", type=int, default=2_000, help="images for the per-epoch FID curve")
    p.add_argument("--kid-subset", type=int, default=1000)
    p.add_argument("--run-dir", type=Path, help="checkpoints, grids, summary (default: runs/cgan/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument("--no-export", dest="export", action="store_false", help="measure only (ablation runs)")
    p.add_argument("--ablation", type=Path, nargs="*", default=[],
                   help="run directories of ablation runs whose summaries go into the card")
    p.add_argument("--models-dir", type=Path, default=Path("models/generator"))
    p.add_argument("--classifier-dir", type=Path, default=Path("models/classifier"),
                   help="where the shipped fashion classifier (the class-fidelity judge) is")
    p.add_argument("--version", type=int)
    p.add_argument("--max-fid", type=float, help="fail (and write no model) above this FID")
    p.add_argument("--compare", type=Path, nargs="+", metavar="RUN_DIR",
                   help="train nothing: print a table comparing these runs' summaries with the first")
    args = p.parse_args(argv)
    args.run_dir = args.run_dir or Path("runs/cgan") / args.name
    return args


HYPERPARAMETERS = ("batch_size", "lr_g", "lr_d", "beta1", "beta2", "nz", "width", "d_width", "loss",
                   "spectral_norm", "projection", "ema_decay", "decay_start", "precision", "mode_seeking",
                   "g_depth", "minibatch_std", "r1")


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        runs = [read_summary(d) for d in args.compare]
        names = [f"`{d}`" for d in args.compare]
        print("\n".join(runs_table(runs, names) + [""] + per_class_table(runs, names)))
        return None
    command = "python -m training cgan " + shlex.join(sys.argv[2:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_images, train_labels = load_fashion_mnist("train")
    held_images, held_labels = load_fashion_mnist("test")
    if args.limit:
        train_images, train_labels = train_images[:args.limit], train_labels[:args.limit]
    x, y = to_tensor(train_images), torch.as_tensor(train_labels, dtype=torch.long)
    net_g = Generator(args.nz, args.width, depth=args.g_depth)
    net_d = Discriminator(args.d_width, normalise=args.spectral_norm, projection=args.projection,
                          std_group=args.minibatch_std)
    untrained = copy.deepcopy(net_g)
    ema = copy.deepcopy(net_g)
    opt_g = torch.optim.Adam(net_g.parameters(), lr=args.lr_g, betas=(args.beta1, args.beta2))
    opt_d = torch.optim.Adam(net_d.parameters(), lr=args.lr_d, betas=(args.beta1, args.beta2))
    shuffle = torch.Generator().manual_seed(args.seed)
    extractor = gan_quality.load_extractor()
    held_features, _ = gan_quality.embed(extractor, to_tensor(held_images[:args.epoch_fid_samples]))
    history, epoch_lines, start_epoch, trained_seconds, resumed = [], [], 1, 0.0, []

    checkpoint_path = args.run_dir / "checkpoint.pt"
    (args.run_dir / "samples").mkdir(parents=True, exist_ok=True)
    if args.resume:
        state = read_checkpoint(checkpoint_path, args, HYPERPARAMETERS, shuffle, {
            "g": net_g, "d": net_d, "ema": ema, "untrained": untrained, "opt_g": opt_g, "opt_d": opt_d},
            added_later=with_later_flags)
        history, epoch_lines, trained_seconds = state["history"], state["epochs"], state["duration_s"]
        start_epoch, resumed = state["epoch"] + 1, state.get("resumed", []) + [state["epoch"]]

    per_epoch = math.ceil(len(x) / args.batch_size)
    decay_from = (args.decay_start - 1) * per_epoch if 0 < args.decay_start <= args.epochs else None
    mixed = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    print(f"training a class-conditional GAN on {len(x):,} images, epochs {start_epoch}..{args.epochs}, "
          f"{per_epoch} iterations each: loss {args.loss}, spectral norm {args.spectral_norm}, "
          f"projection {args.projection}, EMA {args.ema_decay}, widths G {args.width} D {args.d_width}, "
          f"{args.precision}, learning rates decaying from epoch {args.decay_start or 'never'}, seed {args.seed}",
          flush=True)
    step = len(history)
    for epoch in range(start_epoch, args.epochs + 1):
        started = time.time()
        net_g.train()
        net_d.train()
        order = torch.randperm(len(x), generator=shuffle)
        bar = tqdm(range(0, len(x), args.batch_size), desc=f"epoch {epoch}/{args.epochs}", leave=False)
        for start in bar:
            index = order[start:start + args.batch_size]
            real, real_w = x[index], one_hot(y[index])
            b = len(real)
            if args.mode_seeking:  # image i and i + b - b // 2 share a class (the mode-seeking pairs)
                labels = torch.randint(0, CLASSES, (b - b // 2,))
                labels = torch.cat([labels, labels[:b // 2]])
            else:  # as v2 was trained: the same draws, in the same order, so its command reproduces it
                labels = torch.randint(0, CLASSES, (b,))
            fake_w = one_hot(labels)
            z = torch.randn(b, args.nz)
            if decay_from is not None and step >= decay_from:
                left = max(0.0, 1 - (step - decay_from) / (args.epochs * per_epoch - decay_from))
                for opt, lr in ((opt_g, args.lr_g), (opt_d, args.lr_d)):
                    for group in opt.param_groups:
                        group["lr"] = lr * left
            with mixed:
                fake = net_g(z, fake_w)
                # (1) the discriminator on real images of their class and generated ones of theirs
                real_scores, fake_scores = net_d(real, real_w), net_d(fake.detach(), fake_w)
            loss_d = discriminator_loss(args.loss, real_scores.float(), fake_scores.float())
            if args.r1 and step % R1_EVERY == 0:
                with mixed:
                    loss_d = loss_d + args.r1 / 2 * R1_EVERY * r1_penalty(net_d, real, real_w)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            # (2) the generator, judged by the updated discriminator
            with mixed:
                fake_scores = net_d(fake, fake_w)
            loss_g = generator_loss(args.loss, fake_scores.float())
            if args.mode_seeking and b > 1:
                loss_g = loss_g + args.mode_seeking * mode_seeking_loss(fake.float(), z, b - b // 2)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            step += 1
            decay = min(args.ema_decay, (1 + step) / (10 + step))  # a short warm-up, as in most EMA recipes
            with torch.no_grad():
                for average, current in zip(ema.parameters(), net_g.parameters()):
                    average.lerp_(current, 1 - decay)
                for average, current in zip(ema.buffers(), net_g.buffers()):
                    average.copy_(current)  # batch-norm statistics: the current ones
            history.append({"loss_d": loss_d.item(), "loss_g": loss_g.item()})
            bar.set_postfix(loss_d=f"{loss_d.item():.3f}", loss_g=f"{loss_g.item():.3f}")
        seconds = time.time() - started
        trained_seconds += seconds
        last = history[-per_epoch:]
        line = {"epoch": epoch, "loss_d": float(np.mean([h["loss_d"] for h in last])),
                "loss_g": float(np.mean([h["loss_g"] for h in last])), "seconds": round(seconds, 1),
                "fid": fid_now(net_g, extractor, held_features, args.nz, args.epoch_fid_samples, args.seed + 7),
                "fid_ema": fid_now(ema, extractor, held_features, args.nz, args.epoch_fid_samples, args.seed + 7)
                if args.ema_decay > 0 else None}
        epoch_lines.append(line)
        print(f"epoch {epoch}/{args.epochs}: loss D {line['loss_d']:.3f}  loss G {line['loss_g']:.3f}  "
              f"FID {line['fid']:.2f}" + (f"  FID (EMA) {line['fid_ema']:.2f}" if line["fid_ema"] else "")
              + f"  ({seconds:.0f}s)", flush=True)
        save_grid(ema if args.ema_decay > 0 else net_g, args.nz, args.run_dir / "samples" / f"epoch_{epoch:03d}.png")
        plot_curves(history, epoch_lines, per_epoch, args.run_dir / "curves.png")
        write_checkpoint(checkpoint_path, args, shuffle, {
            "g": net_g, "d": net_d, "ema": ema, "untrained": untrained, "opt_g": opt_g, "opt_d": opt_d},
            epoch=epoch, history=history, epochs=epoch_lines, duration_s=trained_seconds, resumed=resumed)
    if not epoch_lines:
        raise SystemExit("nothing trained: --epochs is not above the checkpoint's epoch")
    if start_epoch > args.epochs:
        print(f"the checkpoint has all {args.epochs} epochs: measuring" + (" and exporting" if args.export else "")
              + " it", flush=True)

    # 2. Measure the sampling weights (the moving average unless --ema-decay 0), raw ones beside them.
    sampler = ema if args.ema_decay > 0 else net_g
    print(f"measuring: FID/KID and class fidelity on {args.fid_samples:,} generated images ...", flush=True)
    metrics = measure(sampler, net_g, untrained, train_images, train_labels, held_images, held_labels, args)
    print(f"FID {metrics['fid']:.2f} (raw weights {metrics['fid_raw_weights']:.2f}, floor "
          f"{metrics['floor']['fid']:.2f}, ceiling {metrics['ceiling']['fid']:.2f})  class fidelity "
          f"{metrics['class_fidelity']['agreement']:.3f} (real test images "
          f"{metrics['class_fidelity_real']['agreement']:.3f})  confident "
          f"{metrics['class_fidelity']['confident_share']:.2f}", flush=True)
    summary = {"command": command, "hyperparameters": {k: vars(args)[k] for k in HYPERPARAMETERS},
               "epochs": args.epochs, "duration_s": round(trained_seconds, 1), "fid": metrics["fid"],
               "fid_raw_weights": metrics["fid_raw_weights"], "kid": metrics["kid"],
               "class_fidelity": metrics["class_fidelity"]["agreement"],
               "confident_share": metrics["class_fidelity"]["confident_share"], "per_class": metrics["per_class"],
               "per_epoch": epoch_lines}
    (args.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.max_fid is not None and metrics["fid"] > args.max_fid:
        raise SystemExit(f"FID {metrics['fid']:.2f} is above --max-fid {args.max_fid}")
    if not args.export:
        print(f"wrote {args.run_dir / 'summary.json'} (--no-export: no model written)")
        return args.run_dir

    # 3. Export and check.
    out = cards.new_version_dir(args.models_dir, args.name, args.version)
    onnx_path = out / "model.onnx"
    export_onnx(sampler, onnx_path)
    parity = check_parity(sampler, onnx_path, args.seed)
    print(f"export: {onnx_path} ({onnx_path.stat().st_size:,} bytes) parity {parity}")
    save_grid(sampler, args.nz, out / "samples.png")
    plot_curves(history, epoch_lines, per_epoch, out / "curves.png")

    # 4. The model card.
    ablation = [read_summary(d) for d in args.ablation]
    card = {
        "name": args.name, "version": out.name, "kind": "generator",
        "description": f"class-conditional GAN: a {args.nz}-d latent and one of {CLASSES} Fashion-MNIST classes to "
                       "a 28x28 greyscale image",
        "training": {
            "data": f"Fashion-MNIST train split ({len(x):,} images with their labels; Debian package "
                    "dataset-fashion-mnist), held out: its test split",
            "classes": FASHION_CLASSES, "command": command, "seed": args.seed, "epochs": args.epochs,
            "iterations": len(history), "device": "cpu", "threads": args.threads,
            "epoch_fid_samples": args.epoch_fid_samples,
            "hyperparameters": {**{k: vars(args)[k] for k in HYPERPARAMETERS},
                                "generator": "linear to 7x7, two nearest-neighbour upsampling blocks of "
                                             f"{args.g_depth} 3x3 conv(s) each, class-conditional batch norm, tanh",
                                "discriminator": "5 conv layers, global sum pooling, linear head"
                                                 + (" + class projection" if args.projection else
                                                    " (label as an extra input plane)")
                                                 + (", spectral norm on every layer" if args.spectral_norm else "")
                                                 + (f", minibatch standard deviation over groups of "
                                                    f"{args.minibatch_std} before the last conv"
                                                    if args.minibatch_std else "")
                                                 + (f", R1 penalty {args.r1} every {R1_EVERY} steps"
                                                    if args.r1 else ""),
                                "generator_parameters": sum(p.numel() for p in net_g.parameters()),
                                "discriminator_parameters": sum(p.numel() for p in net_d.parameters())},
            "duration_s": round(trained_seconds, 1), "resumed_after_epochs": resumed, "per_epoch": epoch_lines,
            "samples": f"samples.png: one row per class ({', '.join(FASHION_CLASSES)}), seeds 0..9 across",
            "curves": "curves.png: losses and the per-epoch FID",
            "ablation": ablation,
        },
        "metrics": metrics,
        "export": {"opset": 17, "parity": parity},
        "contract": {
            "inputs": [{"name": "latent_and_class", "dtype": "float32", "shape": ["N", args.nz + CLASSES],
                        "meaning": f"the latent ({args.nz}), then the class weights ({CLASSES}): one-hot for a "
                                   "class, a mixture of two to morph between them"}],
            "outputs": [{"name": "image", "dtype": "float32", "shape": ["N", 1, 28, 28],
                         "meaning": "images, channels first, in [-1, 1] (tanh)"}],
            "latent_dim": args.nz, "classes": FASHION_CLASSES, "image_size": 28, "channels": 1,
            "output_range": [-1.0, 1.0], "seed_to_latent": SEED_TO_LATENT,
            "latent_distribution": "standard normal, independent components",
            "to_uint8": TO_UINT8 + " (then transpose to [N, H, W, C])",
        },
    }
    cards.write_card(out, card, extra_packages=["torch", "onnx"])
    (out / "report.md").write_text(report(card, args.models_dir))
    print(f"wrote {out}: FID {metrics['fid']:.2f}, class fidelity {metrics['class_fidelity']['agreement']:.3f}")
    return out


def epoch_fid(line: dict | None) -> str:
    """A per-epoch FID as the tables show it: the moving average's, else the raw weights'."""
    return f"{line['fid_ema'] or line['fid']:.1f}" if line else ""


def mean_spread(per_class: dict | None) -> str:
    return f"{np.mean([q['spread_vs_real'] for q in per_class.values()]):.2f}" if per_class else ""


def with_later_flags(hyperparameters: dict) -> dict:
    """A run's settings with the flags added after it was trained, at the values its code had."""
    return {"d_width": hyperparameters["width"], "decay_start": 0, "precision": "fp32", "mode_seeking": 0.0,
            "g_depth": 1, "minibatch_std": 0, "r1": 0.0, **hyperparameters}


def read_summary(run_dir: Path) -> dict:
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    return {**summary, "hyperparameters": with_later_flags(summary["hyperparameters"])}


def runs_table(runs: list[dict], names: list[str]) -> list[str]:
    """Markdown rows comparing training runs (summary.json files) with the first one."""
    reference = runs[0]["hyperparameters"]
    lines = [f"| run | differs from the first | epochs | FID at epoch {EARLY_EPOCH} | FID at its last epoch | "
             "final FID | class fidelity | spread, generated / real (mean of classes) | minutes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in zip(names, runs):
        h = run["hyperparameters"]
        differs = ", ".join(f"{k} {h.get(k, 'n/a')}" for k in HYPERPARAMETERS if h.get(k) != reference.get(k)) or "-"
        early = next((e for e in run["per_epoch"] if e["epoch"] == EARLY_EPOCH), None)
        lines.append(f"| {name} | {differs} | {run['epochs']} | {epoch_fid(early)} | "
                     f"{epoch_fid(run['per_epoch'][-1])} | {run['fid']:.2f} | {run['class_fidelity']:.1%} | "
                     f"{mean_spread(run.get('per_class'))} | {run['duration_s'] / 60:.0f} |")
    return lines


def per_class_table(runs: list[dict], names: list[str]) -> list[str]:
    """Markdown rows: per class, each run's FID within the class and its spread (generated / real)."""
    measured = [(name, run["per_class"]) for name, run in zip(names, runs) if run.get("per_class")]
    if not measured:
        return []
    floor = measured[0][1]
    lines = ["| class | real vs real | " + " | ".join(name for name, _ in measured) + " |",
             "|---|---:|" + "---:|" * len(measured)]
    for c in FASHION_CLASSES:
        lines.append(f"| {c} | {floor[c]['fid_real_floor']:.1f} | " + " | ".join(
            f"{q[c]['fid']:.1f} ({q[c]['spread_vs_real']:.2f})" for _, q in measured) + " |")
    return lines


def report(card: dict, models_dir: Path) -> str:
    """The card's figures as the Markdown tables docs/generator.md and the README show (copied from
    here, never typed): quality beside the other versions, class fidelity per class, the ablation."""
    m, name, version = card["metrics"], card["name"], card["version"]
    others = sorted((int(d.name), json.loads((d / "model.json").read_text())) for d in (models_dir / name).iterdir()
                    if d.name.isdigit() and d.name != version and (d / "model.json").exists())
    lines = ["| | FID (lower is better) | KID |", "|---|---:|---:|",
             f"| floor: real training images vs held-out real images | {m['floor']['fid']:.2f} | "
             f"{m['floor']['kid']:.2f} +/- {m['floor']['kid_std']:.2f} |"]
    for number, other in others:
        o = other["metrics"]
        kind = "class-conditional" if other["contract"].get("classes") else "the unconditional DCGAN"
        lines.append(f"| `{name}` v{number}, {kind} | {o['fid']:.2f} | {o['kid']:.2f} +/- {o['kid_std']:.2f} |")
    lines += [f"| **`{name}` v{version}, class-conditional** (moving-average weights) | **{m['fid']:.2f}** | "
              f"**{m['kid']:.2f} +/- {m['kid_std']:.2f}** |",
              f"| `{name}` v{version}, its raw weights | {m['fid_raw_weights']:.2f} | |",
              f"| ceiling: the untrained generator | {m['ceiling']['fid']:.2f} | "
              f"{m['ceiling']['kid']:.2f} +/- {m['ceiling']['kid_std']:.2f} |", ""]
    fake, real = m["class_fidelity"], m["class_fidelity_real"]
    per_class = m.get("per_class", {})
    lines += ["| class | the served classifier agrees, generated | real test images (the ceiling) | FID within the "
              "class (real vs real) | spread, generated / real |", "|---|---:|---:|---:|---:|"]
    for c in fake["per_class_agreement"]:
        q = per_class.get(c)
        lines.append(f"| {c} | {fake['per_class_agreement'][c]:.1%} | {real['per_class_agreement'][c]:.1%} | "
                     + (f"{q['fid']:.1f} ({q['fid_real_floor']:.1f}) | {q['spread_vs_real']:.2f} |" if q else " | |"))
    lines += [f"| **all ({fake['images']:,} each)** | **{fake['agreement']:.1%}** | {real['agreement']:.1%} | | |",
              f"| confident (top class >= {gan_quality.CONFIDENT}) | {fake['confident_share']:.1%} | "
              f"{real['confident_share']:.1%} | | |",
              f"| mean top-1 confidence | {fake['mean_top1_confidence']:.3f} | "
              f"{real['mean_top1_confidence']:.3f} | | |", ""]
    t = card["training"]
    recipe = with_later_flags(t["hyperparameters"])
    this = {"hyperparameters": {k: recipe[k] for k in HYPERPARAMETERS}, "per_epoch": t["per_epoch"], "fid": m["fid"],
            "class_fidelity": fake["agreement"], "per_class": per_class, "epochs": t["epochs"],
            "duration_s": t["duration_s"]}
    names = ["this model"] + [f"ablation {i}" for i in range(1, len(t["ablation"]) + 1)]
    ablation = [{**run, "hyperparameters": with_later_flags(run["hyperparameters"])} for run in t["ablation"]]
    lines += runs_table([this] + ablation, names)
    epoch_samples = t.get("epoch_fid_samples", 2_000)  # cards from before the field: 2,000
    lines += ["", f"Per-epoch FIDs: {epoch_samples:,} generated images of the moving-average "
              f"weights against as many held-out images; final FIDs and the spread: {m['samples']['generated']:,}. "
              f"Trained in {t['duration_s'] / 60:.0f} min on {t['threads']} CPU threads "
              f"({t['epochs']} epochs, {t['iterations']:,} iterations of {recipe['batch_size']} images)."]
    return "\n".join(lines) + "\n"


def spread(features: np.ndarray) -> float:
    """How much a set of images varies, to the extractor: the trace of its features' covariance."""
    return float(np.trace(np.cov(features, rowvar=False)))


def per_class_quality(f_gen, gen_labels, f_held, held_labels, f_train, train_labels) -> dict:
    """Per class: FID against that class's held-out images (real training images of the class give
    its floor) and the spread of generated over real images; a spread well below 1 is a generator
    that draws the class from too few variations (within-class collapse), which a pooled FID hides
    behind the spread between classes."""
    out = {}
    for c, name in enumerate(FASHION_CLASSES):
        gen, held, train = f_gen[gen_labels == c], f_held[held_labels == c], f_train[train_labels == c]
        out[name] = {"fid": gan_quality.fid(gen, held), "fid_real_floor": gan_quality.fid(train, held),
                     "spread_vs_real": spread(gen) / spread(held), "images": int(len(gen))}
    return out


def measure(sampler: Generator, raw: Generator, untrained: Generator, train_images, train_labels, held_images,
            held_labels, args) -> dict:
    extractor = gan_quality.load_extractor()
    n = args.fid_samples
    rng = np.random.default_rng(args.seed + 1)
    latents = rng.standard_normal((n, args.nz)).astype(np.float32)
    labels = np.arange(n) % CLASSES  # every class equally often
    generated = generate(sampler, latents, labels)
    f_held, p_held = gan_quality.embed(extractor, to_tensor(held_images[:n]))
    pick = rng.choice(len(train_images), min(n, len(train_images)), replace=False)
    f_train, _ = gan_quality.embed(extractor, to_tensor(train_images[pick]))
    train_labels = np.asarray(train_labels)[pick]
    f_gen, p_gen = gan_quality.embed(extractor, generated)
    f_raw, _ = gan_quality.embed(extractor, generate(raw, latents, labels))
    f_init, _ = gan_quality.embed(extractor, generate(untrained, latents, labels))
    gen = gan_quality.compare(f_gen, f_held, args.kid_subset)
    held_labels = np.asarray(held_labels[:n])
    judge = Judge(args.classifier_dir)
    return {
        "fid": gen["fid"], "kid": gen["kid"], "kid_std": gen["kid_std"],
        "fid_raw_weights": gan_quality.fid(f_raw, f_held),
        "samples": {"generated": int(n), "held_out_real": int(len(f_held)), "labels": "0..9 in turn"},
        "floor": {**gan_quality.compare(f_train, f_held, args.kid_subset),
                  "what": "real vs real: training images vs the held-out images, same sample sizes"},
        "ceiling": {**gan_quality.compare(f_init, f_held, args.kid_subset),
                    "what": "the untrained generator (its initial weights, same seed) vs held-out images"},
        "per_class": per_class_quality(f_gen, labels, f_held, held_labels, f_train, train_labels),
        "class_histogram": gan_quality.class_histogram(p_gen, FASHION_CLASSES),
        "class_histogram_held_out_real": gan_quality.class_histogram(p_held, FASHION_CLASSES),
        "class_fidelity": {**judge.fidelity(to_uint8(generated), labels),
                           "judge": f"the shipped classifier fashion v{judge.entry.version} through "
                                    "services/contracts/imaging.py (what /classify answers for these images as PNGs)"},
        "class_fidelity_real": {**judge.fidelity(held_images[:n], held_labels),
                                "what": "the same judge on real test images with their true labels: the ceiling"},
        "latents": f"numpy default_rng({args.seed + 1}).standard_normal(({n}, {args.nz})), labels i % 10",
        "kid_subsets": f"100 random subsets of {min(args.kid_subset, n)}, cubic polynomial kernel",
        "feature_extractor": gan_quality.extractor_info(),
    }
