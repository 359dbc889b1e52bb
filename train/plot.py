"""Draw a run's curves (loss, accuracy, learning rate, and sharpness when measured, per epoch) from its
metrics.jsonl to a PNG.

    python -m train.plot runs/sam                 # -> runs/sam/curves.png
    python -m train.plot runs/sam runs/sgd -o sam_vs_sgd.png   # two runs on the same axes

Each run is labelled with its optimizer, rho and model from args.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    """The per-epoch rows of ``run_dir/metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run folder of python -m train.cifar10?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_label(run_dir: Path) -> str:
    args_path = run_dir / "args.json"
    if not args_path.exists():
        return run_dir.name
    args = json.loads(args_path.read_text())
    optim = "SGD" if args.get("optim") == "sgd" else f"SAM rho={args.get('rho')}"
    return f"{run_dir.name}: {args.get('model')} {optim}"


def plot_runs(run_dirs: list[Path], output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    runs = {run_dir: read_metrics(run_dir) for run_dir in run_dirs}
    sharpness = any("top_eigenvalue" in row for rows in runs.values() for row in rows)
    fig, axes = plt.subplots(1, 4 if sharpness else 3, figsize=(20 if sharpness else 15, 4.2))
    for run_dir, rows in runs.items():
        label = run_label(run_dir)
        epochs = [r["epoch"] for r in rows]
        line = axes[0].plot(epochs, [r["train_loss"] for r in rows], "--", label=f"{label} train")[0]
        axes[0].plot(epochs, [r["test_loss"] for r in rows], color=line.get_color(), label=f"{label} test")
        axes[1].plot(epochs, [100 * r["train_acc"] for r in rows], "--", color=line.get_color(), label=f"{label} train")
        axes[1].plot(epochs, [100 * r["test_acc"] for r in rows], color=line.get_color(), label=f"{label} test")
        axes[2].plot(epochs, [r["lr"] for r in rows], color=line.get_color(), label=label)
        measured = [r for r in rows if "top_eigenvalue" in r]
        if sharpness and measured:
            axes[3].plot([r["epoch"] for r in measured], [r["top_eigenvalue"] for r in measured], "o-",
                         color=line.get_color(), label=label)
    titles = ("loss", "accuracy (%)", "learning rate (end of epoch)", "sharpness: top Hessian eigenvalue")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="one or two (or more) --out folders")
    p.add_argument("-o", "--output", type=Path, default=None, help="PNG path (default: RUN_DIR/curves.png of the first)")
    args = p.parse_args(argv)
    output = args.output or args.run_dirs[0] / "curves.png"
    try:
        plot_runs(args.run_dirs, output)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
