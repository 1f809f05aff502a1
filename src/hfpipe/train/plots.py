"""Loss curves from a Trainer's log history."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def _save(figure: Any, axes: Any, path: Path, title: str, ylabel: str, legend_size: float | None = None) -> None:
    """Label the step axis and `ylabel`, title, grid and legend; write the PNG and free the figure."""
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=legend_size)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_losses(log_history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Plot training loss and validation loss against the optimizer step into a PNG file."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    valid = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if valid:
        axes.plot(*zip(*valid, strict=True), "o-", label="validation loss", linewidth=1.5)
    _save(figure, axes, path, title, "cross-entropy (nats/token)")


def plot_rewards(
    log_history: list[dict[str, Any]],
    path: Path,
    title: str,
    accuracy: str = "eval_rewards/accuracies",
    margin: str = "eval_rewards/margins",
) -> None:
    """Plot the held-out reward accuracy and margin (DPO's implicit rewards by default; a reward model's
    `eval_accuracy` / `eval_margin`) against the optimizer step into a PNG file."""
    evaluations = [entry for entry in log_history if accuracy in entry]
    steps = [entry["step"] for entry in evaluations]
    figure, accuracy_axes = plt.subplots(figsize=(7, 4), dpi=120)
    accuracy_axes.plot(steps, [e[accuracy] for e in evaluations], "o-", label="reward accuracy")
    accuracy_axes.set_ylim(0, 1.05)
    accuracy_axes.set_xlabel("optimizer step")
    accuracy_axes.set_ylabel("held-out accuracy (chosen reward > rejected)")
    margin_axes = accuracy_axes.twinx()
    margin_axes.plot(steps, [e[margin] for e in evaluations], "s--", color="tab:orange", label="margin")
    margin_axes.set_ylabel("reward margin (chosen - rejected)")
    lines = accuracy_axes.get_lines() + margin_axes.get_lines()
    accuracy_axes.legend(lines, [line.get_label() for line in lines], loc="lower right")
    accuracy_axes.set_title(title)
    accuracy_axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_training_rewards(
    log_history: list[dict[str, Any]], path: Path, title: str, heldout: dict[str, float] | None = None
) -> None:
    """Plot GRPO's mean reward per logging step (the weighted total and each reward's mean) into a PNG file, with
    the held-out reward before and after (`heldout`: {"before": x, "after": y}) as markers at the ends."""
    logged = [entry for entry in log_history if "reward" in entry and "step" in entry]
    names = sorted({key for entry in logged for key in entry if key.startswith("rewards/") and key.endswith("/mean")})
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    steps = [entry["step"] for entry in logged]
    axes.plot(steps, [entry["reward"] for entry in logged], "-", linewidth=1.8, label="training reward (weighted)")
    for name in names:
        axes.plot(steps, [entry.get(name) for entry in logged], "--", linewidth=1, label=name.removesuffix("/mean"))
    if heldout:
        last = steps[-1] if steps else 1
        axes.plot([0, last], [heldout["before"], heldout["after"]], "ks", label="held-out reward before / after")
    _save(figure, axes, path, title, "mean reward", legend_size=8)


def plot_eval_curves(log_history: list[dict[str, Any]], path: Path, title: str, keys: dict[str, str]) -> bool:
    """Plot held-out metrics (`keys`: log key -> legend label, e.g. KTO's implicit rewards and KL, which have no
    accuracy) against the optimizer step into a PNG file; False, with nothing written, when the log has none."""
    series = {key: [(e["step"], e[key]) for e in log_history if key in e and "step" in e] for key in keys}
    if not any(series.values()):
        return False
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    for key, points in series.items():
        if points:
            axes.plot(*zip(*points, strict=True), "o-", label=keys[key], linewidth=1.5)
    axes.axhline(0.0, color="grey", linewidth=0.8)
    _save(figure, axes, path, title, "held-out value")
    return True
