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
from tqdm import tqdm

from services.contracts.predictor import Predictor
from services.contracts.latents import SEED_TO_LATENT, TO_UINT8, seed_latents
from training import export, gan_quality
from training.datasets import FASHION_CLASSES, load_fashion_mnist, to_tensor, to_uint8
from training.cgan_measure import fid_now, measure
from training.cgan_nets import (CLASSES, Discriminator, Exported, Generator, discriminator_loss, generate,
                                generator_loss, mode_seeking_loss, one_hot, r1_penalty)
from training.cgan_report import HYPERPARAMETERS, per_class_table, read_summary, report, runs_table, with_later_flags
from training.gan import parity_report, read_checkpoint, save_png, sample_grid, write_checkpoint

GRID_COLUMNS = 10  # seeds 0..9 in every row of the per-epoch grid
R1_EVERY = 4  # lazy R1: every 4th discriminator step, its weight times 4 (StyleGAN2)


def grid_inputs(nz: int) -> tuple[np.ndarray, np.ndarray]:
    """One row per class, seeds 0..9 across: the same latents in every row."""
    latents = seed_latents(range(GRID_COLUMNS), nz)
    return np.tile(latents, (CLASSES, 1)), np.repeat(np.arange(CLASSES), GRID_COLUMNS)


def save_grid(net_g: Generator, nz: int, path: Path) -> None:
    latents, labels = grid_inputs(nz)
    save_png(sample_grid(to_uint8(generate(net_g, latents, labels)), columns=GRID_COLUMNS, scale=2), path)


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
    export.export_onnx(module, torch.zeros(2, net_g.nz + CLASSES), path, ["latent_and_class"], ["image"])


def check_parity(net_g: Generator, path: Path, seed: int, count: int = 1000) -> dict:
    predict = Predictor(path)
    rng = np.random.default_rng(seed + 2)
    latents = rng.standard_normal((count, net_g.nz)).astype(np.float32)
    labels = np.arange(count) % CLASSES
    inputs = np.concatenate([latents, one_hot(labels).numpy()], 1)
    onnx_out = predict(inputs, rows=100)[0]
    diff = float(np.abs(onnx_out - generate(net_g, latents, labels).numpy()).max())
    single = predict(inputs[:64], rows=1)[0]
    whole = predict(inputs[:64])[0]
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
    out = export.new_version_dir(args.models_dir, args.name, args.version)
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
    export.write_card(out, card, extra_packages=["torch", "onnx"])
    (out / "report.md").write_text(report(card, args.models_dir))
    print(f"wrote {out}: FID {metrics['fid']:.2f}, class fidelity {metrics['class_fidelity']['agreement']:.3f}")
    return out


