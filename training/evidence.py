"""The evidence: does ImageNet pretraining beat training from scratch when data is scarce?

    python -m training evidence --card models/classifier/fashion/1/model.json

Trains the same architecture on 10, 100 and all training images per class, three ways
(pretrained + full fine-tuning, pretrained + linear probe, random init from scratch), and
measures each on the test split (Fashion-MNIST's official 10,000 images). Subsets are drawn
with the seed from the training images outside the validation hold-out; every run uses the
same validation images for early stopping.

Budgets: subsets train for --small-epochs epochs of at least --epoch-images images (the
subset repeated, augmented); 'all' trains for --epochs epochs. With --card, the 'all'
fine-tuning cell reuses that shipped model's measured test accuracy when its configuration
is the same (backbone, image size, epochs, seed) instead of training it again; the
from-scratch 'all' run gets the same epoch budget. Writes a JSON and a Markdown table
under --out, and with --card adds the table to the card's metrics.evidence.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from services.contracts.repository import write_json_atomic
from training import classifier as clf
from training.classifier_nets import normalisation
from training.labelled_images import Batches, load_data, per_class_subset

METHOD_NAMES = {"finetune": "pretrained + fine-tuning", "probe": "pretrained + linear probe",
                "scratch": "same architecture from scratch"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training evidence", description=__doc__.split("\n")[0])
    clf.add_common_args(p)
    p.add_argument("--sizes", default="10,100,all", help="images per class, comma-separated; 'all' for every image")
    p.add_argument("--methods", default="finetune,probe,scratch")
    p.add_argument("--small-epochs", type=int, default=10, help="epochs for the per-class subsets")
    p.add_argument("--epoch-images", type=int, default=1280, help="minimum images per epoch (small subsets repeat)")
    p.add_argument("--val-limit", type=int, default=1000, help="validation images used for early stopping")
    p.add_argument("--card", type=Path, help="shipped model card: reuse its 'all' fine-tuning result, add the table")
    p.add_argument("--out", type=Path, default=Path("runs/evidence"))
    p.add_argument("--note", action="append", default=[], help="a line to add under the table")
    p.add_argument("--merge", type=Path, nargs="*", default=[],
                   help="evidence.json files of runs with the same configuration (e.g. run in parallel) to include")
    args = p.parse_args(argv)
    args.per_class = None
    clf.finish_args(args)
    return args


def reusable(card: dict | None, args) -> float | None:
    """The shipped model's test accuracy when it is the 'all' fine-tuning run of this table."""
    if not card:
        return None
    t = card["training"]
    same = (t["mode"] == "finetune" and t["backbone"] == args.backbone and t["seed"] == args.seed
            and card["contract"]["preprocessing"]["input_size"] == args.image_size
            and t["hyperparameters"]["epochs"] == args.epochs and card["metrics"]["test_images"] == 10_000
            and "--per-class" not in t["command"] and args.data == "fashion-mnist")
    return float(card["metrics"]["test_accuracy"]) if same else None


def markdown(rows: list[dict], sizes: list[str], methods: list[str], notes: list[str]) -> str:
    head = "| method | " + " | ".join(f"{s} per class" if s != "all" else "all (about 5,500 per class)"
                                        for s in sizes) + " |"
    lines = [head, "|" + "---|" * (len(sizes) + 1)]
    for method in methods:
        cells = []
        for size in sizes:
            row = next((r for r in rows if r["method"] == method and r["per_class"] == size), None)
            cells.append(f"{row['test_accuracy']:.2%}" if row else "not run")
        lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def main(argv=None):
    args = parse_args(argv)
    command = "python -m training evidence " + shlex.join(sys.argv[2:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    sizes = [s.strip() for s in args.sizes.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    card = json.loads(args.card.read_text()) if args.card else None
    args.out.mkdir(parents=True, exist_ok=True)
    prep = {"size": args.image_size, "colour": args.colour, "background": args.background_rgb}
    mean, std = normalisation(args.backbone)
    full = load_data(args, prep, np.random.default_rng(args.seed))  # same split as training/classifier.py
    full["val"] = tuple(a[:args.val_limit] for a in full["val"])
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k in ("data", "backbone", "weights", "image_size", "colour", "background", "epochs", "batch_size",
                       "lr", "backbone_lr_factor", "weight_decay", "patience", "probe_epochs", "val_size",
                       "test_limit", "seed", "small_epochs", "epoch_images", "val_limit")}
    results_path = args.out / "evidence.json"
    rows, notes, commands = [], [], [command]
    if results_path.exists():  # resume: keep the cells an earlier run with the same configuration measured
        earlier = json.loads(results_path.read_text())
        if earlier.get("config") == config:
            rows = [r for r in earlier["rows"] if "source" not in r]
            commands = earlier.get("commands", []) + [command]
            print(f"resuming: {len(rows)} cells from {results_path}")
    for path in args.merge:
        other = json.loads(path.read_text())
        if other.get("config") != config:
            raise SystemExit(f"{path} was measured with another configuration: {other.get('config')}")
        # A merged file's cells replace resumed ones: they are the later, separate measurement.
        theirs = [r for r in other["rows"] if "source" not in r]
        cells = {(r["per_class"], r["method"]) for r in theirs}
        rows = [r for r in rows if (r["per_class"], r["method"]) not in cells] + theirs
        commands += [c for c in other.get("commands", []) if c not in commands]
    for size in sizes:
        per_class = None if size == "all" else int(size)
        keep = per_class_subset(full["train"][1], per_class, np.random.default_rng(args.seed + 1))
        data = {**full, "train": tuple(a[keep] for a in full["train"])}
        for method in methods:
            label = f"[{size}/class {method}] "
            if any(r["method"] == method and r["per_class"] == size for r in rows):
                continue
            shipped = reusable(card, args) if (size == "all" and method == "finetune") else None
            if shipped is not None:
                rows.append({"per_class": size, "method": method, "test_accuracy": shipped,
                             "train_images": card["training"]["train_images"], "epochs": args.epochs,
                             "source": f"shipped model {card['name']} version {card['version']} ({card['training']['command']})"})
                print(f"{label}reused the shipped model's test accuracy {shipped:.4f}", flush=True)
                continue
            run_args = argparse.Namespace(**vars(args))
            run_args.epochs = args.epochs if size == "all" else args.small_epochs
            run_args.epoch_images = 0 if size == "all" else args.epoch_images
            net, history, seconds = clf.run_training(run_args, data, method, args.seed, label)
            batches = Batches(mean, std, args.background_rgb, augment=False, rng=np.random.default_rng(0))
            logits, _ = clf.predict(net, data["test"][0], batches, desc=f"{label}test")
            acc = clf.accuracy(logits, data["test"][1])
            rows.append({"per_class": size, "method": method, "test_accuracy": acc,
                         "train_images": int(len(keep)), "epochs": len(history), "duration_s": round(seconds, 1),
                         "best_validation_accuracy": max(h["val_accuracy"] for h in history)})
            print(f"{label}test accuracy {acc:.4f} ({len(keep)} training images, {seconds:.0f}s)", flush=True)
            write_json_atomic(results_path, {"commands": commands, "config": config, "rows": rows})  # partial results
    notes.append(f"test split: {len(full['test'][1])} images ({'the official Fashion-MNIST test split' if args.data == 'fashion-mnist' else args.data}); "
                 f"backbone {args.backbone} at {args.image_size}px, seed {args.seed}")
    notes.append(f"subsets: {args.small_epochs} epochs of at least {args.epoch_images} images (subset repeated, augmented); "
                 f"'all': {args.epochs} epochs for fine-tuning and from scratch alike; linear probe: up to "
                 f"{args.probe_epochs} epochs on frozen features; early stopping on {len(full['val'][1])} validation images")
    notes.extend(f"{r['per_class']}/{r['method']}: {r['source']}" for r in rows if "source" in r)
    notes.extend(args.note)
    table = markdown(rows, sizes, methods, notes)
    result = {"commands": commands, "config": config, "rows": rows, "table_markdown": table, "notes": notes}
    write_json_atomic(results_path, result)
    (args.out / "evidence.md").write_text(table)
    print(table)
    if card is not None:
        card.setdefault("metrics", {})["evidence"] = result
        write_json_atomic(args.card, card)  # the sha256 is the ONNX file's: the card stays valid
        print(f"added the table to {args.card}")


if __name__ == "__main__":
    main()
