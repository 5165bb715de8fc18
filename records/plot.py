"""Draw the train and val curves of a record's seeds as one SVG for its README (standard library only).

    python3 records/plot.py records/track_10min_16mb/2026-04-01_Name [--out curves.svg]

An SVG written by hand rather than a PNG by matplotlib: a few lines and axes need no plotting library, GitHub
shows an SVG in a README as it shows a PNG, and the file stays a small text diff in the record.
Exit codes: 0 written, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from html import escape
from pathlib import Path

import logparse as lp

PLOT_NAME = "curves.svg"
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
PANEL_W, PANEL_H = 520, 340  # one panel, pixels
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 32, 44  # the margins around a panel's plot area: labels and title


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round values (steps of 1, 2 or 5 times a power of ten) from at or below lo to at or above hi."""
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [round(k * step, 12) for k in range(first, last + 1)]


def _label(value: float) -> str:
    return f"{value:.6g}"


def panel(left: float, title: str, xlabel: str, ylabel: str, curves: list[tuple[str, str, list[tuple]]],
          stars: list[tuple[str, str, tuple]]) -> list[str]:
    """SVG elements of one panel at x offset `left`: axes with ticks, one polyline per curve, star markers.

    curves: (label, colour, [(x, y), ...]); stars: (label, colour, (x, y)), drawn as marked points.
    """
    points = [p for _, _, pts in curves for p in pts] + [p for _, _, p in stars]
    xs = nice_ticks(min((p[0] for p in points), default=0), max((p[0] for p in points), default=1))
    ys = nice_ticks(min((p[1] for p in points), default=0), max((p[1] for p in points), default=1))
    x0, x1, y0, y1 = left + LEFT, left + PANEL_W - RIGHT, PANEL_H - BOTTOM, TOP  # pixels; y grows downwards

    def at(x: float, y: float) -> tuple[float, float]:
        return (x0 + (x - xs[0]) / (xs[-1] - xs[0]) * (x1 - x0), y0 + (y - ys[0]) / (ys[-1] - ys[0]) * (y1 - y0))

    out = ['<g class="panel">',
           f'<text x="{(x0 + x1) / 2:.1f}" y="{TOP - 12}" text-anchor="middle" font-weight="bold">'
           f'{escape(title)}</text>',
           f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="none" stroke="#444"/>']
    for x in xs:
        px = at(x, ys[0])[0]
        out.append(f'<line x1="{px:.1f}" y1="{y1}" x2="{px:.1f}" y2="{y0}" stroke="#ddd"/>'
                   f'<text x="{px:.1f}" y="{y0 + 16}" text-anchor="middle">{_label(x)}</text>')
    for y in ys:
        py = at(xs[0], y)[1]
        out.append(f'<line x1="{x0}" y1="{py:.1f}" x2="{x1}" y2="{py:.1f}" stroke="#ddd"/>'
                   f'<text x="{x0 - 6}" y="{py + 4:.1f}" text-anchor="end">{_label(y)}</text>')
    out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{PANEL_H - 8}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text transform="translate({left + 14},{(y0 + y1) / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle">{escape(ylabel)}</text>')
    for label, colour, pts in (c for c in curves if c[2]):
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in (at(x, y) for x, y in pts))
        out.append(f'<polyline class="curve" points="{path}" fill="none" stroke="{colour}" stroke-width="1.5">'
                   f'<title>{escape(label)}</title></polyline>')
    for label, colour, (x, y) in stars:
        px, py = at(x, y)
        out.append(f'<circle class="score" cx="{px:.1f}" cy="{py:.1f}" r="5" fill="{colour}" stroke="#000">'
                   f'<title>{escape(label)}</title></circle>')
    for i, (label, colour, _) in enumerate(curves):  # the legend: one entry per seed
        ly = y1 + 14 + 16 * i
        out.append(f'<line x1="{x1 - 150}" y1="{ly - 4}" x2="{x1 - 132}" y2="{ly - 4}" stroke="{colour}" '
                   f'stroke-width="3"/><text x="{x1 - 126}" y="{ly}">{escape(label)}</text>')
    return out + ["</g>"]


def plot_curves(logs: list[lp.RunLog], out_svg: Path) -> Path:
    """Left: train_loss by step; right: val_bpb by step, each seed's submission score as a dot at its last step."""
    train, val, scores = [], [], []
    for i, g in enumerate(logs):
        label, colour = f"seed {g.seed}" if g.seed is not None else g.run_id, COLORS[i % len(COLORS)]
        train.append((label, colour, [(s["step"], s["train_loss"]) for s in g.train_steps]))
        val.append((label, colour, [(s["step"], s["val_bpb"]) for s in g.val_steps]))
        scores.append((f"{label} {g.submission['what']} {g.submission['val_bpb']:.8f}", colour,
                       (g.train_done["steps"], g.submission["val_bpb"])))
    body = (panel(0, "training loss", "step", "train_loss (nats)", train, [])
            + panel(PANEL_W, "validation bpb (dot: submission score)", "step", "val_bpb", val, scores))
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * PANEL_W}" height="{PANEL_H}" '
           f'viewBox="0 0 {2 * PANEL_W} {PANEL_H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{2 * PANEL_W}" height="{PANEL_H}" fill="white"/>', *body, "</svg>"]
    out_svg = Path(out_svg)
    out_svg.write_text("\n".join(svg) + "\n")
    return out_svg


def plot_folder(folder: Path, out_svg: Path | None) -> Path:
    """The curves of the seeds a record folder's submission.json lists (default FOLDER/curves.svg)."""
    sub = json.loads((folder / "submission.json").read_text())
    logs = [lp.parse_log(folder / r["log"]) for r in sub["seed_results"]]
    return plot_curves(logs, out_svg or folder / PLOT_NAME)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Plot the train and val curves of a record's seeds.")
    ap.add_argument("folder", help="a record folder (its submission.json lists the logs)")
    ap.add_argument("--out", type=Path, help=f"SVG path (default FOLDER/{PLOT_NAME})")
    args = ap.parse_args(argv)
    return lp.run_command("plot", lambda: f"wrote {plot_folder(Path(args.folder), args.out)}",
                          (OSError, ValueError, KeyError))


if __name__ == "__main__":
    sys.exit(main())
