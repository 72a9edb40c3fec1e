"""One look for every figure: colours per class and per force, axis labels with units, figure sizes
(``default`` for screens, ``paper`` for a single journal column), vector output beside PNG, and
the heat maps the W&B dashboard shows.

Colours never change meaning: a force has the same colour in every figure, a class has the same
colour in every figure, and the two palettes do not share a colour.  Matplotlib is imported inside
the functions, through its object API (no pyplot state).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["CLASS_COLORS", "FORCES", "STYLES", "Style", "class_color", "figure", "heatmap_image",
           "quantity_label", "save", "style"]

#: force key -> (legend label, colour).  Blue/orange/green/grey, as in the paper's figures.
FORCES: dict[str, tuple[str, str]] = {
    "align": ("A (alignment)", "#1f77b4"),
    "inject": ("I (injection)", "#ff7f0e"),
    "decay": ("D (decay)", "#2ca02c"),
    "rest": ("R (rest)", "#7f7f7f"),
    "delta": ("Δ observed", "#000000"),
    "closure": ("closure", "#d62728"),
}
#: aggregate -> colour; none of the force colours (Okabe-Ito and Dark2 hues).
CLASS_COLORS: dict[str, str] = {
    "transmission": "#7b3294",
    "selection": "#a6611a",
    "value": "#e7298a",
    "embedding": "#1b9e77",
    "other": "#b8a000",
    "matrices": "#2c7fb8",
    "adapters": "#f46d43",
    "total": "#000000",
}


def class_color(name: str) -> str:
    return CLASS_COLORS.get(name, "#666666")


#: field -> axis label with its unit.  Forces are contributions to Δ‖w‖² (squared weight units).
_LABELS: dict[str, str] = {
    "align": "A  [‖w‖² per optimizer step]",
    "align_post": "A at w_(t+1)  [‖w‖² per optimizer step]",
    "inject": "I  [‖w‖² per optimizer step]",
    "decay": "D  [‖w‖² per optimizer step]",
    "rest": "R  [‖w‖² per optimizer step]",
    "delta": "observed Δ‖w‖² per optimizer step",
    "closure": "closure  [‖w‖² per optimizer step]",
    "closure_rel": "closure / (|A|+|I|+|D|)",
    "rounding": "rounding  [‖w‖² per optimizer step]",
    "align_share": "|A| / (|A|+|I|+|D|)",
    "inject_share": "|I| / (|A|+|I|+|D|)",
    "decay_share": "|D| / (|A|+|I|+|D|)",
    "nonfinite_steps": "non-finite steps per interval",
    "norm2": "‖w‖²",
    "rms": "σ = RMS of w  [weight units]",
    "weibull_k": "Weibull shape k  [dimensionless]",
    "weibull_scale": "Weibull scale λ  [weight units]",
    "weibull_scale_over_rms": "λ / σ  [dimensionless]",
    "stable_rank": "stable rank Σs² / max s²",
    "effective_rank": "effective rank exp(H(s/Σs))",
    "top_share": "top-direction energy share",
}
_SIGNED = frozenset({"align", "align_post", "decay", "rest", "delta", "closure", "closure_rel", "rounding", "align_no_super"})


def quantity_label(quantity: str) -> str:
    """Axis label of a metric field (the last part of a key), with its unit."""
    field = quantity.split("/")[-1]
    return _LABELS.get(field, field.replace("_", " "))


@dataclass(frozen=True)
class Style:
    """Sizes of one figure family: ``width`` of a whole figure and ``panel_height`` per row, in
    inches; at most ``max_columns`` panels side by side."""

    name: str
    width: float
    panel_height: float
    max_columns: int
    font_size: float
    line_width: float
    dpi: int


STYLES: dict[str, Style] = {
    "default": Style("default", 11.0, 2.8, 3, 9.0, 1.4, 130),
    # one journal column (3.5 in, 8.9 cm), 7 pt text, printed at 300 dpi
    "paper": Style("paper", 3.5, 1.9, 2, 7.0, 1.0, 300),
}


@contextmanager
def style(name: str | Style = "default"):
    """Matplotlib rc settings of a :class:`Style` for the figures drawn inside the block."""
    import matplotlib as mpl

    s = name if isinstance(name, Style) else STYLES[name]
    rc = {"font.size": s.font_size, "axes.titlesize": s.font_size + 0.5, "axes.labelsize": s.font_size,
          "xtick.labelsize": s.font_size - 1, "ytick.labelsize": s.font_size - 1, "legend.fontsize": s.font_size - 1,
          "lines.linewidth": s.line_width, "axes.grid": True, "grid.alpha": 0.25, "grid.linewidth": 0.5,
          "figure.titlesize": s.font_size + 1.5, "svg.fonttype": "none", "pdf.fonttype": 42}
    with mpl.rc_context(rc):
        yield s


def figure(nrows: int, ncols: int, s: Style, *, width: float | None = None, height: float | None = None):
    """A constrained-layout figure of ``nrows`` x ``ncols`` panels; returns (figure, flat axes)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width or s.width, (height or s.panel_height) * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    from matplotlib.ticker import MaxNLocator

    for ax in axes:  # steps are whole numbers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, axes


def grid_shape(n: int, s: Style) -> tuple[int, int]:
    cols = max(1, min(s.max_columns, n))
    return math.ceil(n / cols), cols


def save(fig, path: Path, dpi: int, formats: Sequence[str] = ("png",)) -> None:
    """``path`` (its suffix is replaced) in every format asked for: ``png``, ``pdf``, ``svg``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    for ext in formats:
        fig.savefig(Path(path).with_suffix(f".{ext}"), dpi=dpi)


def heatmap_image(steps: np.ndarray, rows: Sequence[str], data: np.ndarray, quantity: str, family: str,
                  x_label: str = "optimizer step") -> np.ndarray:
    """An RGB image (uint8, H x W x 3) of ``data[rows, steps]``: a diverging colour map centred on 0
    for signed quantities, a sequential one otherwise; NaN cells are left blank."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import SymLogNorm, TwoSlopeNorm
    from matplotlib.figure import Figure

    data = np.asarray(data, dtype=np.float64)
    height = min(9.0, 1.5 + 0.14 * len(rows))
    fig = Figure(figsize=(7.0, height), dpi=90)  # fixed axes: constrained layout costs more than the drawing
    FigureCanvasAgg(fig)
    bottom, top = 0.55 / height, 1.0 - 0.35 / height
    ax = fig.add_axes((0.1, bottom, 0.68, top - bottom))
    finite = data[np.isfinite(data)]
    field = quantity.split("/")[-1]
    cmap, norm = "viridis", None
    if field in _SIGNED and finite.size and finite.min() < 0 < finite.max():
        bound = float(np.max(np.abs(finite)))
        small = float(np.percentile(np.abs(finite[finite != 0]), 20))
        norm = (SymLogNorm(linthresh=small, vmin=-bound, vmax=bound) if bound > 100 * small
                else TwoSlopeNorm(0.0, -bound, bound))
        cmap = "RdBu_r"
    x = np.asarray(steps, dtype=np.float64)
    edges = (np.concatenate([[x[0] - 0.5], (x[:-1] + x[1:]) / 2, [x[-1] + 0.5]]) if x.size > 1
             else np.array([x[0] - 0.5, x[0] + 0.5]))
    mesh = ax.pcolormesh(edges, np.arange(len(rows) + 1) - 0.5, np.ma.masked_invalid(data), cmap=cmap, norm=norm)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    every = max(1, math.ceil(len(rows) / 24))
    ax.set_yticks(range(0, len(rows), every), [str(r).replace("layer_", "") for r in rows][::every], fontsize=7)
    ax.set_ylabel("layer" if family == "layers" else "tensor")
    ax.set_xlabel(x_label)
    ax.set_title(quantity, fontsize=10)
    fig.colorbar(mesh, cax=fig.add_axes((0.82, bottom, 0.025, top - bottom)), label=quantity_label(quantity))
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
