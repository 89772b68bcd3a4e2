"""Writing study outputs: tables as Markdown + CSV + JSON, figures as PNG (matplotlib, Agg)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.atomic import atomic_file


def _clean(v):
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def write_json(path, obj, *, inputs=()) -> Path:
    """JSON with NaN/Inf written as null (strict JSON), atomically; never over or inside one of ``inputs``."""
    path = Path(path)
    with atomic_file(path, inputs=inputs) as tmp:
        tmp.write_text(json.dumps(_clean(obj), indent=2, sort_keys=False))
    return path


def write_table(out_dir, stem: str, rows: list, *, title: str = "", floatfmt: str = ".4f") -> Path:
    """``stem.csv``, ``stem.md`` and ``stem.json`` from a list of flat dicts; returns the .md path."""
    import pandas as pd

    out_dir = Path(out_dir)
    df = pd.DataFrame(rows)
    with atomic_file(out_dir / f"{stem}.csv") as tmp:
        df.to_csv(tmp, index=False)
    write_json(out_dir / f"{stem}.json", rows)
    md = (f"### {title}\n\n" if title else "") + df.to_markdown(index=False, floatfmt=floatfmt) + "\n"
    with atomic_file(out_dir / f"{stem}.md") as tmp:
        tmp.write_text(md)
    return out_dir / f"{stem}.md"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UnmergeError("the studies draw their figures with matplotlib: pip install 'unmerge_jax[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(nrows=1, ncols=2, size=(11, 4.2)):
    """A matplotlib figure (Agg backend) and its axes, flattened."""
    plt = _pyplot()

    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False)
    return fig, axes.ravel()


def save_figure(fig, path) -> Path:
    """Write ``fig`` as a PNG (atomically) and close it."""
    plt = _pyplot()
    path = Path(path)
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def mean_std(values) -> tuple:
    """``(mean, sample std)`` of ``values`` (std 0 for a single value), as floats."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
