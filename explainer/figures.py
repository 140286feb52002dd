"""Paper-style figures (Fig. 1): an image, the Explainer's mask for each of its classes, and the baselines' maps.

Rendering uses matplotlib's Agg backend (no display needed) and every PNG is written to a temporary file first and then
renamed, so a reader never sees a half-written figure.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402

from explainer.atomic import write_bytes_atomic  # noqa: E402

METHOD_TITLES = {"explainer": "Explainer", "rtis": "RTIS", "gradcam": "Grad-CAM", "rise": "RISE", "ep": "Extremal P."}


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Render to memory, write a temp file next to `path`, rename; the figure is closed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return write_bytes_atomic(path, buffer.getvalue())


def _hwc(image: Tensor) -> np.ndarray:
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def fig1_panel(
    images: Tensor,
    labels: Tensor,
    maps: dict[str, Tensor],
    classes: Sequence[str],
    path: str | os.PathLike,
    max_rows: int = 8,
    mask_methods: Sequence[str] = ("explainer", "rtis"),
) -> Path:
    """One row per (image, ground-truth class): the image, then per method that class's map.

    images: [N,3,H,W] display images in [0,1] (denormalised); labels: [N,C]; maps: method -> [N,C,H,W] in [0,1].
    Mask networks (the Explainer, RTIS) are shown as the image times the mask, as in the paper (what the classifier
    sees); saliency baselines as a heat map over the greyed image.
    """
    rows = [(i, k) for i in range(len(images)) for k in labels[i].nonzero().flatten().tolist()][:max_rows]
    if not rows:
        rows = [(i, -1) for i in range(min(len(images), max_rows))]
    names = list(maps)
    fig, axes = plt.subplots(len(rows), 1 + len(names), figsize=(2.0 * (1 + len(names)), 2.0 * len(rows)),
                             squeeze=False)
    for r, (i, k) in enumerate(rows):
        img = _hwc(images[i])
        axes[r, 0].imshow(img)
        axes[r, 0].set_ylabel(classes[k] if k >= 0 else "(no class)", fontsize=9)
        for c, name in enumerate(names, start=1):
            ax = axes[r, c]
            m = maps[name][i, k].detach().float().cpu().numpy() if k >= 0 else np.zeros(img.shape[:2])
            if name in mask_methods:
                ax.imshow(img * m[..., None])
            else:
                ax.imshow(img.mean(-1), cmap="gray", vmin=0, vmax=1)
                ax.imshow(m, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if r == 0:
                ax.set_title(METHOD_TITLES.get(name, name), fontsize=9)
        if r == 0:
            axes[r, 0].set_title("Image", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return save_figure(fig, path)


def class_specific_heatmap(table: Sequence[Sequence[float]], targets: Sequence[str], columns: Sequence[str],
                           path: str | os.PathLike, title: str = "") -> Path:
    """Table 1 as a heat map: rows = target class, columns = mask class (+ "none"), values x100."""
    values = np.asarray(table, dtype=float) * 100
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(columns), 1.0 + 0.5 * len(targets)))
    ax.imshow(np.nan_to_num(values, nan=0.0), cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(columns)), labels=list(columns), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(targets)), labels=list(targets), fontsize=8)
    for (r, c), v in np.ndenumerate(values):
        ax.text(c, r, "-" if np.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=7,
                color="white" if not np.isnan(v) and v < 50 else "black")
    ax.set_xlabel("mask class")
    ax.set_ylabel("target class")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
