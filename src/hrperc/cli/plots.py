"""Pictures for humans: the crops of an image, and attention over a window (matplotlib, optional).

Example::

    >>> import torch, hrperc
    >>> from hrperc.cli.plots import plot_crops
    >>> crops = hrperc.DualPerspectiveCrop(grid=(2, 2), tile_size=64)(torch.rand(1, 3, 128, 128))
    >>> fig = plot_crops(torch.rand(3, 128, 128), crops)      # matplotlib Figure
"""

from __future__ import annotations

import importlib.util

import torch

from ..modules.dual_crop import DualCrops

__all__ = ["plot_crops", "to_display", "has_matplotlib", "PLOT_EXTRA"]

#: How to get the pictures: the extra that installs matplotlib.
PLOT_EXTRA = "pip install 'hrperc[plot]'"


def has_matplotlib() -> bool:
    """Whether matplotlib is installed (the pictures need it; nothing else does)."""
    return importlib.util.find_spec("matplotlib") is not None


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"hrperc's pictures need matplotlib: {PLOT_EXTRA} (or pip install matplotlib).") from e
    return plt


def to_display(img: torch.Tensor):
    """``(C, H, W)`` float in [0, 1] (or uint8) -> ``(H, W, C)`` numpy array for ``imshow``."""
    img = img.detach().cpu()
    if not img.is_floating_point():
        img = img.float() / 255.0
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def plot_crops(image: torch.Tensor, crops: DualCrops, index: int = 0, path=None):
    """Image with its grid, the local tiles and the strided sub-images side by side.

    ``image``: ``(C, H, W)`` canvas-sized or original image of item ``index`` of ``crops``. Writes a PNG
    to ``path`` when given and returns the matplotlib ``Figure``.
    """
    plt = _plt()
    from matplotlib.gridspec import GridSpec, GridSpecFromSubplotSpec

    geo = crops.geometries[index]
    gh, gw = geo.grid
    start = crops.offsets[index]
    n = gh * gw
    aspect = image.shape[-1] / image.shape[-2]
    ratios = [aspect * gh, gw, gw]
    fig = plt.figure(figsize=(1.5 * sum(ratios) + 0.6, 1.5 * gh + 0.6), dpi=120)
    outer = GridSpec(1, 3, figure=fig, width_ratios=ratios, wspace=0.06)

    ax = fig.add_subplot(outer[0])
    ax.imshow(to_display(image))
    H0, W0 = image.shape[-2:]
    top, left, height, width = geo.valid_box
    for i in range(1, gh):
        ax.axhline((i * geo.tile_size[0] - top) * H0 / height, color="yellow", lw=1.2)
    for j in range(1, gw):
        ax.axvline((j * geo.tile_size[1] - left) * W0 / width, color="yellow", lw=1.2)
    ax.set_title(f"input {W0}x{H0} -> canvas {geo.canvas_size[1]}x{geo.canvas_size[0]}, grid {gh}x{gw}", fontsize=9)
    ax.axis("off")

    for col, (name, stack) in enumerate(
        (("local tiles (contiguous)", crops.local), ("strided global sub-images", crops.strided))
    ):
        inner = GridSpecFromSubplotSpec(gh, gw, subplot_spec=outer[col + 1], wspace=0.04, hspace=0.04)
        for k in range(n):
            a = fig.add_subplot(inner[k // gw, k % gw])
            a.imshow(to_display(stack[start + k]))
            a.set_xticks([])
            a.set_yticks([])
            a.text(
                2,
                2,
                f"k={k}",
                color="white",
                fontsize=7,
                va="top",
                bbox=dict(facecolor="black", alpha=0.5, pad=1, lw=0),
            )
            if k == 0:
                a.set_title(name, fontsize=9, loc="left")
    if path is not None:
        fig.savefig(path, bbox_inches="tight")
    return fig
