"""Train a DCGAN, measure it, export its generator to ONNX and write the model card.

    python -m training gan --name fashion --epochs 8 --seed 0                 # Fashion-MNIST, 28 px grey
    python -m training gan --data ~/faces --image-size 64 --channels 3 --name faces

One run does the whole job, top to bottom:
  1. train the classic DCGAN (Radford et al., 2016; pytorch/examples dcgan): transposed
     convolutions, batch norm, Adam(lr 2e-4, beta1 0.5), weights from N(0, 0.02). A progress
     bar per epoch, a sample grid per epoch from one fixed latent batch (seeds 0..63), a
     checkpoint per epoch (--resume continues from it), and a loss-curve PNG;
  2. measure: FID and KID between generated and held-out real images with the project's
     fixed Fashion-MNIST CNN (training/gan_quality.py), beside the real-vs-real floor and
     the untrained-generator ceiling; the class histogram and confident share;
  3. export the generator to ONNX, latent [N, z] -> image [N, C, H, W], dynamic batch;
     onnx.checker, then parity with torch (max abs diff <= 1e-4);
  4. write models/generator/<name>/<version>/{model.onnx, model.json, samples.png, loss_curve.png}.

Sizes: 28 px (7x7 -> 14 -> 28), 32 px (4 -> 8 -> 16 -> 32) and 64 px (4 -> ... -> 64); 1 or 3
channels. Any folder of images (class subfolders or flat) is resized and centre-cropped.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from services.contracts.predictor import Predictor
from services.contracts.latents import SEED_TO_LATENT, TO_UINT8, image_grid, seed_latents
from training import export, gan_quality
from training.datasets import load_images, to_tensor, to_uint8

GRID_SEEDS = 64  # the fixed latent batch: seeds 0..63, the same images the service gives for them


def layout(image_size: int) -> tuple[int, int]:
    """(first feature-map size, number of 2x upsamplings) for a supported image size."""
    if image_size == 28:
        return 7, 2
    if image_size in (32, 64):
        return 4, int(math.log2(image_size // 4))
    raise SystemExit(f"--image-size {image_size} is not supported: use 28, 32 or 64")


class Generator(nn.Module):
    """z [N, nz, 1, 1] -> image [N, nc, size, size] in [-1, 1]; widths halve as the maps double."""

    def __init__(self, nz: int, ngf: int, nc: int, image_size: int):
        super().__init__()
        base, ups = layout(image_size)
        width = ngf * 2 ** (ups - 1)
        layers = [nn.ConvTranspose2d(nz, width, base, 1, 0, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
        for _ in range(ups - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2),
                       nn.ReLU(True)]
            width //= 2
        layers += [nn.ConvTranspose2d(width, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class Discriminator(nn.Module):
    """image -> one logit per image (BCEWithLogitsLoss: the sigmoid lives in the loss, stabler)."""

    def __init__(self, nc: int, ndf: int, image_size: int):
        super().__init__()
        base, downs = layout(image_size)
        layers = [nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        width = ndf
        for _ in range(downs - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2),
                       nn.LeakyReLU(0.2, inplace=True)]
            width *= 2
        layers += [nn.Conv2d(width, 1, base, 1, 0, bias=False), nn.Flatten()]
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1)


def weights_init(m: nn.Module) -> None:
    """DCGAN's initialisation: conv weights from N(0, 0.02), batch-norm scales from N(1, 0.02)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class FlatLatentGenerator(nn.Module):
    """What is exported: latent [N, nz] -> image [N, C, H, W] (clients need not know about 1x1 maps)."""

    def __init__(self, generator: Generator):
        super().__init__()
        self.generator = generator

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.generator(latent.view(latent.shape[0], latent.shape[1], 1, 1))


def build(args) -> tuple[Generator, Discriminator]:
    torch.manual_seed(args.seed)  # the generator is built first, so the ceiling model is this same init
    net_g = Generator(args.nz, args.ngf, args.channels, args.image_size)
    net_g.apply(weights_init)
    net_d = Discriminator(args.channels, args.ndf, args.image_size)
    net_d.apply(weights_init)
    return net_g, net_d


@torch.no_grad()
def generate(net_g: Generator, latents: np.ndarray | torch.Tensor, batch: int = 500) -> torch.Tensor:
    net_g.eval()
    latents = torch.as_tensor(latents, dtype=torch.float32)
    return torch.cat([net_g(latents[i:i + batch].view(-1, latents.shape[1], 1, 1))
                      for i in range(0, len(latents), batch)])


def sample_grid(images: np.ndarray, columns: int, scale: int = 1) -> np.ndarray:
    """The service's grid (services/generator.py), enlarged by pixel repetition for viewing."""
    grid = image_grid(images, columns)
    return grid.repeat(scale, 0).repeat(scale, 1) if scale > 1 else grid


def save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path, optimize=True)


def save_samples(net_g: Generator, fixed: np.ndarray, path: Path) -> None:
    images = to_uint8(generate(net_g, fixed))
    save_png(sample_grid(images, columns=8, scale=max(1, 64 // images.shape[1])), path)


def plot_losses(history: list[dict], iterations_per_epoch: int, out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(history) + 1)
    window = max(1, min(50, len(history) // 20))
    # "valid" averaging: no zero padding, so the curve's ends are not dragged towards 0
    smooth = lambda key: np.convolve([h[key] for h in history], np.ones(window) / window, mode="valid")
    smooth_steps = steps[window - 1:]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for key, label in (("loss_d", "discriminator loss"), ("loss_g", "generator loss")):
        top.plot(steps, [h[key] for h in history], alpha=0.2)
        top.plot(smooth_steps, smooth(key), label=f"{label} (moving average of {window})", color=top.lines[-1].get_color())
    top.set(ylabel="BCE loss", title=title)
    for key, label in (("d_real", "D(x): real judged real"), ("d_fake", "D(G(z)): fake judged real")):
        bottom.plot(smooth_steps, smooth(key), label=label)
    bottom.axhline(0.5, color="grey", linestyle=":")
    bottom.set(xlabel=f"iteration ({iterations_per_epoch} per epoch)", ylabel="mean probability", ylim=(0, 1))
    for ax in (top, bottom):
        for epoch_end in range(iterations_per_epoch, len(history) + 1, iterations_per_epoch):
            ax.axvline(epoch_end, color="grey", alpha=0.15)
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def load_data(args) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """Training images, held-out real images (for FID/KID), class names, and a description."""
    if args.data == "fashion-mnist":
        train, _, classes = load_images("fashion-mnist", "train", args.image_size, args.channels, args.limit)
        held, _, _ = load_images("fashion-mnist", "test", args.image_size, args.channels)
        return train, held, classes, (f"Fashion-MNIST train split ({len(train):,} images; Debian package "
                                      f"dataset-fashion-mnist), held-out: its test split")
    images, _, classes = load_images(args.data, size=args.image_size, channels=args.channels, limit=args.limit)
    order = np.random.default_rng(args.seed).permutation(len(images))
    n_held = max(1, int(len(images) * args.holdout))
    held, train = images[order[:n_held]], images[order[n_held:]]
    return train, held, classes, (f"image folder {args.data} ({len(train):,} training images, {n_held:,} held out "
                                  f"at random, seed {args.seed}; classes {classes[:10]})")


def measure(net_g: Generator, untrained: Generator, train: np.ndarray, held: np.ndarray, args) -> dict:
    """FID/KID of the generator vs held-out real images, with the floor and the ceiling."""
    extractor = gan_quality.load_extractor()
    n = args.fid_samples
    rng = np.random.default_rng(args.seed + 1)
    latents = rng.standard_normal((n, args.nz)).astype(np.float32)
    real_held = to_tensor(held[rng.choice(len(held), min(n, len(held)), replace=False)])
    real_train = to_tensor(train[rng.choice(len(train), min(n, len(train)), replace=False)])
    f_held, p_held = gan_quality.embed(extractor, real_held)
    f_train, _ = gan_quality.embed(extractor, real_train)
    f_gen, p_gen = gan_quality.embed(extractor, generate(net_g, latents))
    f_init, p_init = gan_quality.embed(extractor, generate(untrained, latents))
    gen = gan_quality.compare(f_gen, f_held, args.kid_subset)
    floor = gan_quality.compare(f_train, f_held, args.kid_subset)
    ceiling = gan_quality.compare(f_init, f_held, args.kid_subset)
    classes = gan_quality.extractor_info()["classes"]
    return {
        "fid": gen["fid"], "kid": gen["kid"], "kid_std": gen["kid_std"],
        "samples": {"generated": int(len(f_gen)), "held_out_real": int(len(f_held))},
        "floor": {**floor, "what": "real vs real: training images vs the held-out images, same sample sizes"},
        "ceiling": {**ceiling, "what": "the untrained generator (its initial weights, same seed) vs held-out images"},
        "class_histogram": gan_quality.class_histogram(p_gen, classes),
        "class_histogram_held_out_real": gan_quality.class_histogram(p_held, classes),
        "class_histogram_untrained": gan_quality.class_histogram(p_init, classes),
        "latents": f"numpy default_rng({args.seed + 1}).standard_normal(({n}, {args.nz}))",
        "kid_subsets": "100 random subsets of " + str(min(args.kid_subset, n)) + ", cubic polynomial kernel",
        "feature_extractor": gan_quality.extractor_info(),
    }


def export_onnx(net_g: Generator, nz: int, path: Path) -> None:
    module = FlatLatentGenerator(net_g).eval()
    export.export_onnx(module, torch.zeros(2, nz), path, ["latent"], ["image"])


def check_parity(net_g: Generator, path: Path, nz: int, seed: int, count: int = 1000) -> dict:
    predict = Predictor(path)
    latents = np.concatenate([seed_latents(range(GRID_SEEDS), nz),
                              np.random.default_rng(seed + 2).standard_normal((count - GRID_SEEDS, nz)).astype(np.float32)])
    onnx_out = predict(latents, rows=100)[0]
    torch_out = generate(net_g, latents).numpy()
    diff = float(np.abs(onnx_out - torch_out).max())
    # The service merges requests into batches of any size: a row's image must not depend on them.
    single = predict(latents[:GRID_SEEDS], rows=1)[0]
    whole = predict(latents[:GRID_SEEDS])[0]
    return parity_report({"latents": count}, diff, single, whole)


def parity_report(inputs: dict, diff: float, single: np.ndarray, whole: np.ndarray) -> dict:
    """The card's parity record: ONNX vs torch within 1e-4, and 64 rows run one by one vs as one
    batch (the service merges requests into batches of any size); SystemExit when it fails."""
    report = {
        **inputs,
        "max_abs_diff": diff,
        "tolerance": 1e-4,
        "batch_sizes_checked": [1, 64, 100],
        "max_abs_diff_batch_of_1_vs_64": float(np.abs(single - whole).max()),
        "uint8_identical_batch_of_1_vs_64": bool(np.array_equal(to_uint8(single), to_uint8(whole))),
        "onnx_checker": "passed (full_check)",
    }
    return export.parity(report, diff <= 1e-4)


def write_checkpoint(path: Path, args, shuffle: torch.Generator, modules: dict, **progress) -> None:
    """Each module's state under its key, the shuffle and torch RNG states, the progress and the
    arguments; written to a temporary file first, so a checkpoint is never half-written."""
    state = {key: module.state_dict() for key, module in modules.items()}
    state.update(shuffle=shuffle.get_state(), torch_rng=torch.get_rng_state(), **progress,
                 args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def read_checkpoint(path: Path, args, hyperparameters: tuple[str, ...], shuffle: torch.Generator,
                    modules: dict, added_later=None) -> dict:
    """--resume: load write_checkpoint's file into the modules and RNGs; its state. Refuses one
    trained with other hyperparameters (continuing it would mix two runs). added_later: a function
    completing an older checkpoint's settings with the flags added since, at the values its code had."""
    if not path.exists():
        raise SystemExit(f"--resume: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    trained = added_later(state["args"]) if added_later else state["args"]
    if {k: trained.get(k) for k in hyperparameters} != {k: vars(args)[k] for k in hyperparameters}:
        raise SystemExit(f"--resume: {path} was trained with other settings: {state['args']}")
    for key, module in modules.items():
        module.load_state_dict(state[key])
    shuffle.set_state(state["shuffle"])
    torch.set_rng_state(state["torch_rng"])
    print(f"resumed from {path} after epoch {state['epoch']}")
    return state


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training gan", description=__doc__.split("\n")[0])
    p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or a folder of images")
    p.add_argument("--name", default="fashion", help="model name in the repository")
    p.add_argument("--image-size", type=int, help="28, 32 or 64 (default: 28 for fashion-mnist, else 64)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="default: 1 for fashion-mnist, else 3")
    p.add_argument("--limit", type=int, help="use only the first N training images (smoke tests)")
    p.add_argument("--holdout", type=float, default=0.1, help="share of a folder held out for FID/KID")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--beta1", type=float, default=0.5)
    p.add_argument("--nz", type=int, default=100, help="latent size")
    p.add_argument("--ngf", type=int, default=64, help="generator width")
    p.add_argument("--ndf", type=int, default=64, help="discriminator width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--fid-samples", type=int, default=10_000, help="generated and real images for FID/KID")
    p.add_argument("--kid-subset", type=int, default=1000)
    p.add_argument("--run-dir", type=Path, help="checkpoints and per-epoch samples (default: runs/gan/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument("--models-dir", type=Path, default=Path("models/generator"), help="the generator service's repository")
    p.add_argument("--version", type=int, help="default: one past the newest version present")
    p.add_argument("--max-fid", type=float, help="fail (and write no model) above this FID")
    args = p.parse_args(argv)
    folder = args.data != "fashion-mnist"
    args.image_size = args.image_size or (64 if folder else 28)
    args.channels = args.channels or (3 if folder else 1)
    args.run_dir = args.run_dir or Path("runs/gan") / args.name
    layout(args.image_size)
    return args


HYPERPARAMETERS = ("image_size", "channels", "batch_size", "lr", "beta1", "nz", "ngf", "ndf")


def main(argv=None):
    args = parse_args(argv)
    command = "python -m training gan " + shlex.join(sys.argv[2:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    train, held, classes, data_text = load_data(args)
    x = to_tensor(train)
    net_g, net_d = build(args)
    untrained = Generator(args.nz, args.ngf, args.channels, args.image_size)
    untrained.load_state_dict(net_g.state_dict())
    opt_g = torch.optim.Adam(net_g.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    opt_d = torch.optim.Adam(net_d.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    criterion = nn.BCEWithLogitsLoss()
    shuffle = torch.Generator().manual_seed(args.seed)
    fixed = seed_latents(range(GRID_SEEDS), args.nz)
    history: list[dict] = []
    epoch_lines: list[dict] = []
    start_epoch, trained_seconds, resumed = 1, 0.0, []

    checkpoint_path = args.run_dir / "checkpoint.pt"
    (args.run_dir / "samples").mkdir(parents=True, exist_ok=True)
    if args.resume:
        state = read_checkpoint(checkpoint_path, args, HYPERPARAMETERS, shuffle, {
            "g": net_g, "d": net_d, "opt_g": opt_g, "opt_d": opt_d, "untrained_g": untrained})
        history, epoch_lines, trained_seconds = state["history"], state["epochs"], state["duration_s"]
        start_epoch = state["epoch"] + 1
        resumed = state.get("resumed", []) + [state["epoch"]]

    per_epoch = math.ceil(len(x) / args.batch_size)
    print(f"training DCGAN {args.image_size}x{args.image_size}x{args.channels} on {len(x):,} images, "
          f"epochs {start_epoch}..{args.epochs}, {per_epoch} iterations each, seed {args.seed}")
    for epoch in range(start_epoch, args.epochs + 1):
        started = time.time()
        net_g.train()
        net_d.train()
        order = torch.randperm(len(x), generator=shuffle)
        bar = tqdm(range(0, len(x), args.batch_size), desc=f"epoch {epoch}/{args.epochs}", leave=False)
        for start in bar:
            real = x[order[start:start + args.batch_size]]
            b = len(real)
            ones, zeros = torch.ones(b), torch.zeros(b)
            # (1) Discriminator: maximise log D(x) + log(1 - D(G(z))).
            net_d.zero_grad()
            out_real = net_d(real)
            fake = net_g(torch.randn(b, args.nz, 1, 1))
            out_fake = net_d(fake.detach())
            loss_d = criterion(out_real, ones) + criterion(out_fake, zeros)
            loss_d.backward()
            opt_d.step()
            # (2) Generator: maximise log D(G(z)) (the non-saturating loss).
            net_g.zero_grad()
            out = net_d(fake)
            loss_g = criterion(out, ones)
            loss_g.backward()
            opt_g.step()
            history.append({"loss_d": loss_d.item(), "loss_g": loss_g.item(),
                            "d_real": torch.sigmoid(out_real).mean().item(),
                            "d_fake": torch.sigmoid(out_fake).mean().item()})
            bar.set_postfix(loss_d=f"{loss_d.item():.3f}", loss_g=f"{loss_g.item():.3f}")
        seconds = time.time() - started
        trained_seconds += seconds
        last = history[-per_epoch:]
        line = {"epoch": epoch, "loss_d": float(np.mean([h["loss_d"] for h in last])),
                "loss_g": float(np.mean([h["loss_g"] for h in last])),
                "d_real": float(np.mean([h["d_real"] for h in last])),
                "d_fake": float(np.mean([h["d_fake"] for h in last])), "seconds": round(seconds, 1)}
        epoch_lines.append(line)
        print(f"epoch {epoch}/{args.epochs}: loss D {line['loss_d']:.3f}  loss G {line['loss_g']:.3f}  "
              f"D(x) {line['d_real']:.2f}  D(G(z)) {line['d_fake']:.2f}  ({seconds:.0f}s)", flush=True)
        save_samples(net_g, fixed, args.run_dir / "samples" / f"epoch_{epoch:03d}.png")
        plot_losses(history, per_epoch, args.run_dir / "loss_curve.png", f"DCGAN on {args.data}")
        write_checkpoint(checkpoint_path, args, shuffle, {
            "g": net_g, "d": net_d, "opt_g": opt_g, "opt_d": opt_d, "untrained_g": untrained},
            epoch=epoch, history=history, epochs=epoch_lines, duration_s=trained_seconds, resumed=resumed)
    if not epoch_lines:
        raise SystemExit("nothing trained: --epochs is not above the checkpoint's epoch")

    # 2. Measure.
    print(f"measuring: FID/KID on {args.fid_samples:,} generated vs held-out real images ...", flush=True)
    metrics = measure(net_g, untrained, train, held, args)
    hist = metrics["class_histogram"]
    print(f"FID {metrics['fid']:.2f} (floor {metrics['floor']['fid']:.2f}, ceiling {metrics['ceiling']['fid']:.2f})  "
          f"KID {metrics['kid']:.4f} (floor {metrics['floor']['kid']:.4f}, ceiling {metrics['ceiling']['kid']:.4f})  "
          f"confident share {hist['confident_share']:.2f}  classes {hist['counts']}", flush=True)
    if args.max_fid is not None and metrics["fid"] > args.max_fid:
        raise SystemExit(f"FID {metrics['fid']:.2f} is above --max-fid {args.max_fid}")

    # 3. Export and check.
    out = export.new_version_dir(args.models_dir, args.name, args.version)
    onnx_path = out / "model.onnx"
    export_onnx(net_g, args.nz, onnx_path)
    parity = check_parity(net_g, onnx_path, args.nz, args.seed)
    print(f"export: {onnx_path} ({onnx_path.stat().st_size:,} bytes) parity {parity}")
    save_samples(net_g, fixed, out / "samples.png")
    plot_losses(history, per_epoch, out / "loss_curve.png", f"DCGAN on {args.data}")

    # 4. The model card.
    shape = [args.channels, args.image_size, args.image_size]
    card = {
        "name": args.name,
        "version": out.name,
        "kind": "generator",
        "description": f"DCGAN generator: a {args.nz}-d latent to a {args.image_size}x{args.image_size} "
                       f"{'greyscale' if args.channels == 1 else 'RGB'} image, trained on {args.data}",
        "training": {
            "data": data_text,
            "classes": classes,
            "command": command,
            "seed": args.seed,
            "epochs": args.epochs,
            "iterations": len(history),
            "hyperparameters": {**{k: vars(args)[k] for k in HYPERPARAMETERS}, "beta2": 0.999,
                                "loss": "non-saturating GAN loss (BCE with logits)",
                                "init": "conv weights N(0, 0.02), batch-norm scales N(1, 0.02)",
                                "generator_parameters": sum(p.numel() for p in net_g.parameters()),
                                "discriminator_parameters": sum(p.numel() for p in net_d.parameters())},
            "duration_s": round(trained_seconds, 1),
            "threads": args.threads,
            "resumed_after_epochs": resumed,  # a run continued with --resume: the command is the last one
            "per_epoch": epoch_lines,
            "samples": "samples.png: seeds 0..63, row by row",
            "loss_curve": "loss_curve.png",
        },
        "metrics": metrics,
        "export": {"opset": 17, "parity": parity},
        "contract": {
            "inputs": [{"name": "latent", "dtype": "float32", "shape": ["N", args.nz]}],
            "outputs": [{"name": "image", "dtype": "float32", "shape": ["N", *shape],
                         "meaning": "images, channels first, in [-1, 1] (tanh)"}],
            "latent_dim": args.nz,
            "image_size": args.image_size,
            "channels": args.channels,
            "output_range": [-1.0, 1.0],
            "seed_to_latent": SEED_TO_LATENT,
            "latent_distribution": "standard normal, independent components",
            "to_uint8": TO_UINT8 + " (then transpose to [N, H, W, C])",
        },
    }
    export.write_card(out, card, extra_packages=["torch", "onnx"])
    print(f"wrote {out}: FID {metrics['fid']:.2f}")
    return out


if __name__ == "__main__":
    main()
