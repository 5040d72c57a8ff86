"""Where one DEM query token looks: attention probabilities over its window, and a picture of them.

The DEM's fast paths never materialize attention probabilities, so they are recomputed here with the
plain reference formula from the DEM's own weights, for one query token only::

    q = W_q x_query + b_q,   K = W_k X_window + b_k       (per head, head_dim = D / heads)
    p = softmax(q K^T / sqrt(head_dim))                   over the ht*wt tokens of the query's window

Two directions (``docs/dem.md``): ``"global"`` -- a token of the global map queries the local map inside its
window; ``"local"`` -- a token of the local map queries the global map. The window kind of each comes
from the DEM's pairing (released: global -> contiguous, local -> strided).

Example::

    >>> import torch, hrperc
    >>> from hrperc.cli.attention_plot import dem_attention
    >>> dem = hrperc.DualPerspectiveEnhancement(32, heads=4)
    >>> loc, glo = torch.randn(9, 16, 32), torch.randn(9, 16, 32)       # grid 3x3, 4x4 tokens per tile
    >>> att = dem_attention(dem, loc, glo, (3, 3), (4, 4), query=(5, 6), direction="local")
    >>> att.probs.shape, att.window, round(att.probs.sum().item(), 4)  # (heads, Ht, Wt), zero off-window
    (torch.Size([4, 12, 12]), 'strided', 4.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._errors import public
from .._validation import as_grid, as_pair
from ..ops.crop import local_merge, stride_merge
from ..ops.geometry import window_mask

__all__ = ["DemAttention", "dem_attention", "plot_dem_attention"]


@dataclass
class DemAttention:
    """``probs``: ``(heads, Ht, Wt)`` attention of the query over the key map (zero outside its window);
    ``window_mask``: ``(Ht, Wt)`` bool, the query's window; ``query``: ``(R, C)`` on the map;
    ``direction``: ``"global"``/``"local"`` (which map queries); ``window``: ``"contiguous"``/``"strided"``."""

    probs: torch.Tensor
    window_mask: torch.Tensor
    query: tuple[int, int]
    direction: str
    window: str

    @property
    def mean_probs(self) -> torch.Tensor:
        """``(Ht, Wt)``: probabilities averaged over heads."""
        return self.probs.mean(0)


@public
def dem_attention(dem, local_feats, global_feats, grid, tile_size, query, direction: str = "global") -> DemAttention:
    """Attention probabilities of one query token of one image (see module docs).

    Args:
        dem: a :class:`~hrperc.DualPerspectiveEnhancement`.
        local_feats, global_feats: ``(N, ht*wt, D)``, one image's stacks in ``local_crop`` /
            ``stride_crop`` order (what the ViT returns; see ``HighResEncoder.subimage_features``).
        grid: ``(gh, gw)``; tile_size: ``(ht, wt)`` tokens per sub-image.
        query: ``(R, C)`` position on the ``(gh*ht, gw*wt)`` map.
        direction: ``"global"`` (global token queries local tokens) or ``"local"``.

    Returns: :class:`DemAttention`, computed in float32.
    """
    (gh, gw), (th, tw) = as_grid(grid), as_pair(tile_size, "tile_size")
    if direction not in ("global", "local"):
        raise ValueError(f"direction={direction!r}; pass 'global' or 'local'.")
    n = gh * gw
    for name, t in (("local_feats", local_feats), ("global_feats", global_feats)):
        if not isinstance(t, torch.Tensor):  # a wrong type is a TypeError, as for the backbone's pixels
            raise TypeError(
                f"{name} is a {type(t).__name__}; expected a torch.Tensor, one image's stack ({n}, {th * tw}, D). "
                f"Pass the features as a tensor, e.g. torch.as_tensor({name})."
            )
        if t.ndim != 3 or t.shape[0] != n or t.shape[1] != th * tw:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; expected one image's stack ({n}, {th * tw}, D) for grid "
                f"{(gh, gw)} and tile {(th, tw)}. Slice one image: feats[offset : offset + {n}]."
            )
    R, C = as_pair(query, "query", minimum=0)
    if R >= gh * th or C >= gw * tw:
        raise ValueError(f"query={(R, C)} is outside the {gh * th}x{gw * tw} token map.")
    if getattr(dem, "directions", "both") not in ("both", direction):
        raise ValueError(f"this DEM has directions={dem.directions!r}; the {direction!r} attention is off.")
    attn = dem.attention if dem.shared_attention else getattr(dem, f"attention_{direction}")
    window = dem.windows[0] if direction == "global" else dem.windows[1]
    D = local_feats.shape[-1]
    loc_map = local_merge(local_feats.float().reshape(n, th, tw, D), (gh, gw), layout="nhwc")[0]
    glo_map = stride_merge(global_feats.float().reshape(n, th, tw, D), (gh, gw), layout="nhwc")[0]
    q_map, kv_map = (glo_map, loc_map) if direction == "global" else (loc_map, glo_map)
    mask = window_mask((R, C), (gh, gw), (th, tw), window)
    lq, lk = attn.linears[0], attn.linears[1]
    heads = attn.heads
    hd = D // heads
    with torch.no_grad():
        q = torch.nn.functional.linear(q_map[R, C], lq.weight.float(), lq.bias.float()).view(heads, hd)
        keys = kv_map[mask]  # (ht*wt, D), row-major over the window's map positions
        k = torch.nn.functional.linear(keys, lk.weight.float(), lk.bias.float()).view(-1, heads, hd)
        p = torch.softmax(torch.einsum("hd,khd->hk", q, k) * hd**-0.5, dim=-1)  # (heads, ht*wt)
        probs = q_map.new_zeros(heads, gh * th, gw * tw)
        probs[:, mask] = p
    return DemAttention(probs, mask, (R, C), direction, window)


@public
def plot_dem_attention(canvas: torch.Tensor, attentions, patch_size, path=None):
    """Draw each :class:`DemAttention` over the canvas image, one panel per direction.

    ``canvas``: ``(3, gh*h, gw*w)`` float image in ``[0, 1]`` (the resized/padded canvas the crops were cut
    from); ``patch_size``: ViT patch ``(ph, pw)``. The query token is boxed in white, its window outlined,
    and the head-averaged probabilities shown as a heat map on the key tokens. Returns the Figure.
    """
    from .plots import _plt, to_display

    plt = _plt()
    from matplotlib.patches import Rectangle

    ph, pw = as_pair(patch_size, "patch_size")
    attentions = list(attentions)
    H, W = canvas.shape[-2:]
    fig, axes = plt.subplots(1, len(attentions), figsize=(5.2 * len(attentions), 5.2 * H / W + 0.8), dpi=120)
    axes = [axes] if len(attentions) == 1 else list(axes)
    for ax, att in zip(axes, attentions):
        ax.imshow(to_display(canvas), extent=(0, W, H, 0))
        heat = att.mean_probs.clone()
        heat[~att.window_mask] = float("nan")
        heat = heat / heat.nan_to_num(0).max().clamp_min(1e-12)
        ax.imshow(heat.numpy(), cmap="inferno", alpha=0.65, extent=(0, W, H, 0), interpolation="nearest")
        shade = (~att.window_mask).float().numpy()
        ax.imshow(shade, cmap="Greys", alpha=0.35 * shade, extent=(0, W, H, 0), interpolation="nearest")
        R, C = att.query
        ax.add_patch(Rectangle((C * pw, R * ph), pw, ph, fill=False, edgecolor="white", linewidth=2))
        ax.add_patch(Rectangle((C * pw, R * ph), pw, ph, fill=False, edgecolor="black", linewidth=0.8))
        other = "local" if att.direction == "global" else "global"
        ax.set_title(
            f"{att.direction} token {att.query} queries {other} tokens\n"
            f"in its {att.window} window (head mean, max-normalized)",
            fontsize=9,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
