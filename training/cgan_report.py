"""The class-conditional GAN's report tables (report.md beside the card, `--compare`): runs side by
side and per class.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training import gan_quality
from training.datasets import FASHION_CLASSES

EARLY_EPOCH = 2  # the tables compare runs here too: the screening runs of the ablation are 2 epochs long
# The settings a run records (summary.json, checkpoints) and the tables compare.
HYPERPARAMETERS = ("batch_size", "lr_g", "lr_d", "beta1", "beta2", "nz", "width", "d_width", "loss",
                   "spectral_norm", "projection", "ema_decay", "decay_start", "precision", "mode_seeking",
                   "g_depth", "minibatch_std", "r1")


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
