"""One figure style for the whole book, and one colour per estimator.

Chapters call :func:`use_style` once; figures then share sizes, fonts and colours, so the
pathwise estimator is the same blue in every chapter.
"""
from __future__ import annotations

import matplotlib as mpl

__all__ = ["COLORS", "use_style"]

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
COLORS = {
    "pathwise": "#0072B2",
    "score_function": "#D55E00",
    "measure_valued": "#009E73",
    "reference": "#000000",
    "relaxed": "#CC79A7",
    "straight_through": "#E69F00",
    "data": "#999999",
}


def use_style() -> None:
    """Set matplotlib's rcParams for the book: compact figures, light grid, no top/right spines."""
    mpl.rcParams.update(
        {
            "figure.figsize": (6.4, 3.6),
            "figure.dpi": 110,
            "savefig.bbox": "tight",
            "font.size": 10,
            "axes.titlesize": 10,
            "axes.labelsize": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "legend.frameon": False,
            "axes.prop_cycle": mpl.cycler(color=list(COLORS.values())),
        }
    )
