"""Draw the train and val curves of a record's seeds into a PNG for its README (needs matplotlib, optional).

    python3 records/plot.py records/track_10min_16mb/2026-04-01_Name [--out curves.png]

Exit codes: 0 written, 2 bad input or matplotlib missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import logparse as lp


class PlotUnavailable(RuntimeError):
    pass


def plot_curves(logs: list[lp.RunLog], out_png: Path) -> Path:
    """Left: train_loss by step; right: val_bpb by step, the submission's score as a marker at the end."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed (pip install matplotlib); the plot is optional "
                              "and matplotlib is not a project dependency") from None
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for g in logs:
        label = f"seed {g.seed}" if g.seed is not None else g.run_id
        if g.train_steps:
            ax_train.plot([s["step"] for s in g.train_steps], [s["train_loss"] for s in g.train_steps],
                          label=label, linewidth=1)
        line = None
        if g.val_steps:
            (line,) = ax_val.plot([s["step"] for s in g.val_steps], [s["val_bpb"] for s in g.val_steps],
                                  marker=".", label=label, linewidth=1)
        ax_val.scatter([g.train_done["steps"]], [g.submission["val_bpb"]], marker="*", s=80,
                       color=line.get_color() if line else None,
                       label=f"{label} {g.submission['what']} {g.submission['val_bpb']:.4f}")
    ax_train.set(xlabel="step", ylabel="train_loss (nats)", title="training loss")
    ax_val.set(xlabel="step", ylabel="val_bpb", title="validation bpb (star: submission score)")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Plot the train and val curves of a record's seeds.")
    ap.add_argument("folder", help="a record folder (its submission.json lists the logs)")
    ap.add_argument("--out", help="PNG path (default FOLDER/curves.png)")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    try:
        sub = json.loads((folder / "submission.json").read_text())
        logs = [lp.parse_log(folder / r["log"]) for r in sub["seed_results"]]
        out = plot_curves(logs, Path(args.out) if args.out else folder / "curves.png")
    except (OSError, ValueError, KeyError, PlotUnavailable) as exc:
        print(f"plot: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
