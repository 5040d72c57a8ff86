"""The DEM's index plan: which queries, keys and values its skipping path reads, as gather indices.

The reduction reads only its footprint (:func:`hrperc.ops.reduce.reduction_footprint`); with a
per-token fusion only the enhanced tokens there matter. Per direction (global-as-query,
local-as-query) the plan lists the query tokens at those positions grouped by the window they fall
in (padded to the same count per window with a duplicate that is dropped later), the key/value
tokens of the windows touched, and where each read position's result lands. Everything is computed
per axis on small Python tuples (rows and columns are independent: every window kind and every
reduction is separable) from :mod:`hrperc.ops.geometry`, then turned into index tensors once per
device (:func:`plan_indices`).

Example::

    >>> from hrperc.ops.dem_plan import plan_for, required_subimages
    >>> plan = plan_for((3, 3), (6, 6), (6, 6), "bilinear", ("contiguous", "strided"), "both")
    >>> plan.read_rows, plan.loc.rows.windows                      # centre rows; one strided window row
    ((1, 4, 7, 10, 13, 16), (1,))
    >>> required_subimages(plan)[1].tolist()                        # strided sub-images read
    [False, False, False, False, True, False, False, False, False]
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .._cache import tensor_cache
from .geometry import KIND_CODE, axis_position, axis_window
from .reduce import reduction_plan

__all__ = ["Plan", "DirectionPlan", "plan_for", "plan_indices", "required_subimages", "NATIVE_ORDER"]

#: Native window order of each ViT stack: local sub-features are contiguous windows, global ones strided.
NATIVE_ORDER = {"local": "contiguous", "global": "strided"}
_ORDER = NATIVE_ORDER


def _axis_window(r: int, g: int, t: int, kind: str) -> tuple[int, int]:
    return axis_window(r, g, t, KIND_CODE[kind])


def _axis_coord(a: int, u: int, g: int, t: int, kind: str) -> int:
    return axis_position(a, u, g, t, KIND_CODE[kind])


class _Axis(NamedTuple):
    g: int  # grid size along the axis
    t: int  # tile size along the axis
    stride_k: int  # flat-index stride of the sub-image coordinate along this axis
    stride_u: int  # flat-index stride of the in-tile coordinate along this axis

    def native(self, r: int, order: str) -> int:
        """This axis' share of the flat (per image) index of map row/col ``r`` in a stack of ``order``."""
        k, u = _axis_window(r, self.g, self.t, order)
        return k * self.stride_k + u * self.stride_u


class _AxisDir(NamedTuple):
    slots: tuple[int, ...]  # per (touched window, slot): native index of the query (this axis' share)
    select: tuple[int, ...]  # per read coordinate: its slot position (this axis' share)
    kv: tuple[int, ...]  # per (touched window, token): native kv index share
    windows: tuple[int, ...]  # touched window coordinates
    m: int  # query slots per window


def _groups(read: tuple[int, ...], ax: _Axis, window: str) -> dict[int, list[int]]:
    """Read coordinates (their positions ``j`` in ``read``) grouped by the window they fall in."""
    groups: dict[int, list[int]] = {}
    for j, r in enumerate(read):
        groups.setdefault(_axis_window(r, ax.g, ax.t, window)[0], []).append(j)
    return groups


def _axis_direction(read, ax: _Axis, window: str, q_order: str, kv_order: str, select_strides) -> _AxisDir:
    groups = _groups(read, ax, window)
    touched = tuple(sorted(groups))
    m = max(len(v) for v in groups.values())
    slots: list[int] = []
    pos: dict[int, tuple[int, int]] = {}  # read position j -> (touched window, slot)
    for ia, a in enumerate(touched):
        js = groups[a] + [groups[a][0]] * (m - len(groups[a]))  # pad with a duplicate query, dropped later
        for s, j in enumerate(js):
            slots.append(ax.native(read[j], q_order))
            pos.setdefault(j, (ia, s))
    kv = tuple(ax.native(_axis_coord(a, u, ax.g, ax.t, window), kv_order) for a in touched for u in range(ax.t))
    sw, ss = select_strides
    select = tuple(pos[j][0] * sw + pos[j][1] * ss for j in range(len(read)))
    return _AxisDir(tuple(slots), select, kv, touched, m)


class DirectionPlan(NamedTuple):
    window: str
    q_order: str
    kv_order: str
    rows: _AxisDir
    cols: _AxisDir
    kv_subimages: tuple[int, ...] | None  # kv stack already in window order: which sub-images to take


class Plan(NamedTuple):
    key: tuple
    reads_all: bool  # the footprint is every token: nothing to skip
    read_rows: tuple[int, ...]
    read_cols: tuple[int, ...]
    read_local: tuple[tuple[int, ...], tuple[int, ...]]  # native index shares of read positions, local stack
    read_global: tuple[tuple[int, ...], tuple[int, ...]]
    glob: DirectionPlan | None  # global-as-query direction
    loc: DirectionPlan | None  # local-as-query direction
    reduction: object  # ReductionPlan


@functools.lru_cache(maxsize=64)
def _build_plan(grid, tile, out_hw, mode, windows, directions) -> Plan:
    (gh, gw), (th, tw) = grid, tile
    t = th * tw
    red = reduction_plan((gh * th, gw * tw), out_hw, mode)
    rows_ax = _Axis(gh, th, gw * t, tw)
    cols_ax = _Axis(gw, tw, t, 1)
    rr, rc = red.rows, red.cols

    def read_shares(order):
        return tuple(rows_ax.native(r, order) for r in rr), tuple(cols_ax.native(c, order) for c in rc)

    def direction(query: str, window: str) -> DirectionPlan:
        q_order, kv_order = _ORDER[query], _ORDER["global" if query == "local" else "local"]
        # Query slots are ordered (row window, col window, row slot, col slot); the flat slot of a read
        # position is a row share plus a column share.
        g_r, g_c = _groups(rr, rows_ax, window), _groups(rc, cols_ax, window)
        m_r, m_c, n_c = max(map(len, g_r.values())), max(map(len, g_c.values())), len(g_c)
        rows = _axis_direction(rr, rows_ax, window, q_order, kv_order, (n_c * m_r * m_c, m_c))
        cols = _axis_direction(rc, cols_ax, window, q_order, kv_order, (m_r * m_c, 1))
        sub = None
        if kv_order == window:
            sub = tuple(a * gw + e for a in rows.windows for e in cols.windows)
        return DirectionPlan(window, q_order, kv_order, rows, cols, sub)

    w_g, w_l = windows
    glob = direction("global", w_g) if directions in ("both", "global") else None
    loc = direction("local", w_l) if directions in ("both", "local") else None
    key = (grid, tile, out_hw, mode, windows, directions)
    reads_all = len(rr) == gh * th and len(rc) == gw * tw
    return Plan(key, reads_all, rr, rc, read_shares("contiguous"), read_shares("strided"), glob, loc, red)


@torch._dynamo.assume_constant_result
def plan_for(grid, tile, out_hw, mode, windows, directions) -> Plan:
    """The cached :class:`Plan` (a constant under ``torch.compile``)."""
    return _build_plan(grid, tile, out_hw, mode, windows, directions)


def _outer(rows: tuple[int, ...], cols: tuple[int, ...], device) -> torch.Tensor:
    r = torch.tensor(rows, device=device)
    c = torch.tensor(cols, device=device)
    return (r[:, None] + c[None, :]).reshape(-1)


def _window_index(rows: _AxisDir, cols: _AxisDir, field: str, per_window_r: int, per_window_c: int, device):
    """(n_r*n_c*per_r*per_c,) index, window-major (row windows, col windows), then row, col inside."""
    r = torch.tensor(getattr(rows, field), device=device).view(len(rows.windows), per_window_r)
    c = torch.tensor(getattr(cols, field), device=device).view(len(cols.windows), per_window_c)
    return (r[:, None, :, None] + c[None, :, None, :]).reshape(-1)


def _make_indices(plan: Plan, device) -> dict[str, torch.Tensor]:
    idx = {
        "read_local": _outer(*plan.read_local, device),
        "read_global": _outer(*plan.read_global, device),
    }
    for name, dp in (("glob", plan.glob), ("loc", plan.loc)):
        if dp is None:
            continue
        idx[f"{name}_q"] = _window_index(dp.rows, dp.cols, "slots", dp.rows.m, dp.cols.m, device)
        idx[f"{name}_select"] = _outer(dp.rows.select, dp.cols.select, device)
        if dp.kv_subimages is None:
            t_r, t_c = len(dp.rows.kv) // len(dp.rows.windows), len(dp.cols.kv) // len(dp.cols.windows)
            idx[f"{name}_kv"] = _window_index(dp.rows, dp.cols, "kv", t_r, t_c, device)
        else:
            idx[f"{name}_kv"] = torch.tensor(dp.kv_subimages, device=device)
    return idx


@tensor_cache(maxsize=64)
def plan_indices(plan: Plan, device) -> dict[str, torch.Tensor]:
    """The index tensors of ``plan`` on ``device`` (cached; read only)."""
    return _make_indices(plan, device)


def required_subimages(plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """``(local_needed, global_needed)``: two ``(N,)`` bool tensors, the sub-images ``plan`` reads at all.

    A sub-image is read when it holds a read position of its map (a query, a residual or a token
    passed through) or a key/value token of a window a query attends in.
    """
    (gh, gw), (th, tw) = plan.key[0], plan.key[1]
    n = gh * gw
    need = {"local": torch.zeros(gh, gw, dtype=torch.bool), "global": torch.zeros(gh, gw, dtype=torch.bool)}

    def mark(which: str, rows, cols):
        order = _ORDER[which]
        kr = sorted({_axis_window(r, gh, th, order)[0] for r in rows})
        kc = sorted({_axis_window(c, gw, tw, order)[0] for c in cols})
        need[which][torch.tensor(kr)[:, None], torch.tensor(kc)[None, :]] = True

    mark("local", plan.read_rows, plan.read_cols)
    mark("global", plan.read_rows, plan.read_cols)
    for dp, kv_side in ((plan.glob, "local"), (plan.loc, "global")):
        if dp is None:
            continue
        w = dp.window
        rows = [_axis_coord(a, u, gh, th, w) for a in dp.rows.windows for u in range(th)]
        cols = [_axis_coord(a, u, gw, tw, w) for a in dp.cols.windows for u in range(tw)]
        mark(kv_side, rows, cols)
    return need["local"].reshape(n), need["global"].reshape(n)
