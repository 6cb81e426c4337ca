"""Loss-curve plots for the demo and converge reports (PNG, written atomically)."""

from __future__ import annotations

from pathlib import Path

from hetune.files import save_figure


def plot_losses(curves: dict[str, list[dict]], path: Path, title: str, log_scale: bool = False, markers: bool = False) -> None:
    """curves: label -> metrics rows with "step" and "loss"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ("-o", "--s", ":^", "-.d", "-v") if markers else ("-",) * len(curves)
    for (label, rows), style in zip(curves.items(), styles * len(curves)):
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], style, label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
