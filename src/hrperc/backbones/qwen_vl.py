"""The vision towers of Qwen2-VL, Qwen2.5-VL and Qwen3-VL, packed: :class:`QwenVisionTower`.

These towers read an image at its own resolution (a multiple of ``patch * merge`` pixels per side), one
sequence of patches per image, and merge each ``merge x merge`` block of patches into one LLM token. The
adapter wraps the model's own tower (``model.model.visual``: its rotary positions, Qwen2.5-VL's window
attention and Qwen3-VL's resampled position table stay the model's) and supplies the packing::

    views: n tensors (3, h_i, w_i), normalized, h_i and w_i multiples of patch * merge
      --pack-->    pixel_values (sum_i gh_i * gw_i, 3 * T * p * p),  grid_thw (n, 3) = [1, gh_i, gw_i]
      --tower-->   tokens[i] (gh_i * gw_i / merge^2, out_size)       (gh_i, gw_i) = (h_i // p, w_i // p)

``pack`` writes exactly what ``Qwen2VLImageProcessor`` (the image processor of all three families) writes:
rows in merge-window order (the ``merge x merge`` patches of one LLM token are consecutive rows; the blocks
in raster order), a still image repeated over the ``T = temporal_patch_size`` frames, each row laid out as
``(3, T, p, p)``. All views go through the tower in one call; its attention is per image (per window
inside an image in Qwen2.5-VL's windowed blocks), so no ``(patches x patches)`` mask is built and no image
sees another. ``tokens[i]`` is what ``model.get_image_features(...).pooler_output[i]`` returns: the
merged tokens in raster order over the ``(gh_i / merge, gw_i / merge)`` grid.

Qwen3-VL also feeds features of intermediate blocks to the LLM ("deepstack"): ``deepstack[k][i]`` has the
shape of ``tokens[i]`` and is added to the output of LLM layer ``k``. ``patches=True`` returns the last
block's patch features before the merger (``(gh_i * gw_i, hidden_size)``, merge-window order; Qwen2.5-VL's
window permutation undone); :meth:`QwenVisionTower.raster` lays one out as ``(hidden_size, gh, gw)``.

Example::

    >>> import torch
    >>> from transformers import Qwen2VLVisionConfig
    >>> from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
    >>> from hrperc.backbones.qwen_vl import QwenVisionTower
    >>> config = Qwen2VLVisionConfig(depth=1, embed_dim=32, hidden_size=48, num_heads=2, patch_size=14)
    >>> tower = QwenVisionTower(Qwen2VisionTransformerPretrainedModel(config).eval())
    >>> tower.family, tower.patch_size, tower.merge_size, tower.hidden_size, tower.out_size
    ('qwen2_vl', 14, 2, 32, 48)
    >>> images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in [(56, 84), (28, 28)]]
    >>> views = [tower.normalize(x) for x in images]
    >>> pixel_values, grid_thw = tower.pack(views)
    >>> tuple(pixel_values.shape), grid_thw.tolist()
    ((28, 1176), [[1, 4, 6], [1, 2, 2]])
    >>> out = tower(views, patches=True)
    >>> [tuple(t.shape) for t in out.tokens], out.deepstack
    ([(6, 48), (1, 48)], None)
    >>> tuple(tower.raster(out.patches[0], out.grids[0]).shape)
    (32, 4, 6)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._errors import public
from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionBackbone, resolve_layer

__all__ = ["QwenVisionTower", "QwenTowerOutput", "QwenBackbone"]

# The tower classes of each family (a subclass is recognised by its bases).
_TOWER_CLASSES = {
    "Qwen2VisionTransformerPretrainedModel": "qwen2_vl",
    "Qwen2_5_VisionTransformerPretrainedModel": "qwen2_5_vl",
    "Qwen3VLVisionModel": "qwen3_vl",
}
# The same families by their vision config's model_type (transformers 5 names, then 4.x names).
_CONFIG_TYPES = {
    "qwen2_vl_vision": "qwen2_vl",
    "qwen2_5_vl_vision": "qwen2_5_vl",
    "qwen3_vl_vision": "qwen3_vl",
}
# The released checkpoints' normalization: Qwen3-VL's preprocessor_config.json says 0.5 / 0.5, although
# transformers' Qwen2VLImageProcessor (the image processor of all three families) defaults to CLIP's.
_NORMALIZATION = {
    "qwen2_vl": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "qwen2_5_vl": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "qwen3_vl": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
_WHAT_TO_PASS = (
    "Pass the vision tower of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model: model.model.visual of a "
    "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration or Qwen3VLForConditionalGeneration "
    "(Qwen2VisionTransformerPretrainedModel, Qwen2_5_VisionTransformerPretrainedModel, Qwen3VLVisionModel)."
)


def _named(member: str):
    """The :func:`~hrperc._errors.public` name of a method: the instance's class and the method."""
    return lambda self, *args, **kwargs: type(self).__name__ + member


@dataclass
class QwenTowerOutput:
    """What :meth:`QwenVisionTower.encode` returns for ``n`` views.

    Attributes:
        tokens: ``n`` tensors ``(gh_i * gw_i / merge^2, out_size)``, the LLM tokens of each view (the
            model's ``get_image_features(...).pooler_output``), raster order over ``(gh_i / merge, gw_i / merge)``.
        deepstack: Qwen3-VL: one list per deepstack level (``QwenVisionTower.deepstack_layers``) of ``n``
            tensors shaped like ``tokens``; ``None`` for the other families.
        patches: with ``patches=True``: ``n`` tensors ``(gh_i * gw_i, hidden_size)``, the last block's output
            before the merger, in merge-window order (rows of ``pixel_values``); else ``None``.
        grids: ``n`` patch grids ``(gh_i, gw_i)``.
        grid_thw: ``(n, 3)`` long, ``[1, gh_i, gw_i]`` per view (the model's ``image_grid_thw``).
    """

    tokens: list[torch.Tensor]
    deepstack: list[list[torch.Tensor]] | None
    patches: list[torch.Tensor] | None
    grids: list[tuple[int, int]]
    grid_thw: torch.Tensor


def _family(tower) -> str | None:
    for cls in type(tower).__mro__:
        if cls.__name__ in _TOWER_CLASSES:
            return _TOWER_CLASSES[cls.__name__]
    config = getattr(tower, "config", None)
    model_type = getattr(config, "model_type", None)
    # A config type alone also names the full model's config in transformers 4.x: ask for the tower's parts too.
    if model_type in _CONFIG_TYPES and all(hasattr(tower, a) for a in ("patch_embed", "blocks", "merger")):
        return _CONFIG_TYPES[model_type]
    return None


def _triple(value, name: str, family: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3:
        raise ValueError(
            f"{name}={value!r}; expected three per-channel floats (R, G, B). Pass e.g. "
            f"{name}={_NORMALIZATION[family][name == 'std']} (the released {family} checkpoints' value), or None."
        )
    if name == "std" and min(out) <= 0:
        raise ValueError(f"std={value!r}; every entry must be > 0. Pass e.g. std={_NORMALIZATION[family][1]}.")
    return out[0], out[1], out[2]


def _read_output(out) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
    """``(merged, last_hidden_state, deepstack)`` from the tower's output: a ModelOutput (transformers 5),
    a plain tuple (``return_dict=False``), or transformers 4.x's merged tensor / ``(merged, deepstack)``."""
    if isinstance(out, torch.Tensor):
        return out, None, None
    if hasattr(out, "pooler_output"):
        return out.pooler_output, out.last_hidden_state, getattr(out, "deepstack_features", None)
    if len(out) == 2 and isinstance(out[1], (list, tuple)):
        return out[0], None, list(out[1])
    return out[1], out[0], (list(out[2]) if len(out) > 2 else None)


def _release(seen: torch.Tensor, own: torch.Tensor) -> None:
    """Frees ``own``'s memory (its storage shrunk to nothing) when ``seen`` is it: the patch embedding's input,
    read once; anything else (a tower that copied or reshaped it first) is left as it is."""
    if seen is own:
        own.untyped_storage().resize_(0)


class QwenVisionTower(nn.Module):
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower run on packed views (see the module docs).

    Args:
        tower: the model's vision tower, ``model.model.visual``.
        mean, std: per-channel normalization of ``[0, 1]`` RGB; ``None`` = the released checkpoints'
            (CLIP's for Qwen2-VL and Qwen2.5-VL, 0.5 / 0.5 for Qwen3-VL).

    Attributes:
        family: ``"qwen2_vl"``, ``"qwen2_5_vl"`` or ``"qwen3_vl"``.
        patch_size, merge_size, temporal_patch_size: ``p``, ``m`` and ``T`` of the tower's config.
        factor: ``p * m``, what every view side must be a multiple of.
        hidden_size: the tower's width (patch features); out_size: the LLM's width (merged tokens).
        num_layers: blocks of the tower. window_size: Qwen2.5-VL's attention window in pixels, else ``None``.
        deepstack_layers: Qwen3-VL's blocks (0-based) whose outputs feed the LLM, else ``()``.
    """

    tower: Any  # a transformers module: its attributes are the model's, not nn.Module's

    @public(name=_named(""))
    def __init__(self, tower: nn.Module, *, mean=None, std=None) -> None:
        super().__init__()
        family = _family(tower)
        if family is None or not isinstance(tower, nn.Module):
            hint = ""
            inner = getattr(getattr(tower, "model", None), "visual", None)
            inner = getattr(tower, "visual", None) if inner is None else inner
            if inner is not None and _family(inner) is not None:
                hint = f" It holds one: pass its .visual ({type(inner).__name__})."
            raise TypeError(f"tower={type(tower).__name__} is not a Qwen vision tower.{hint} {_WHAT_TO_PASS}")
        config: Any = tower.config
        self.tower = tower
        self.family = family
        self.patch_size = int(config.patch_size)
        self.merge_size = int(config.spatial_merge_size)
        self.temporal_patch_size = int(config.temporal_patch_size)
        self.factor = self.patch_size * self.merge_size
        if family == "qwen2_vl":  # Qwen2-VL names the tower's width embed_dim and the LLM's hidden_size
            self.hidden_size, self.out_size = int(config.embed_dim), int(config.hidden_size)
        else:
            self.hidden_size, self.out_size = int(config.hidden_size), int(config.out_hidden_size)
        self.num_layers = len(self.tower.blocks)
        self.window_size = int(config.window_size) if family == "qwen2_5_vl" else None
        self.deepstack_layers = tuple(int(k) for k in config.deepstack_visual_indexes) if family == "qwen3_vl" else ()
        default_mean, default_std = _NORMALIZATION[family]
        self.mean = default_mean if mean is None else _triple(mean, "mean", family)
        self.std = default_std if std is None else _triple(std, "std", family)

    @property
    def dtype(self) -> torch.dtype:
        """The tower's dtype (what ``get_image_features`` casts pixels to)."""
        dtype = getattr(self.tower, "dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else next(self.tower.parameters()).dtype

    @property
    def device(self) -> torch.device:
        device = getattr(self.tower, "device", None)
        return device if isinstance(device, torch.device) else next(self.tower.parameters()).device

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(family={self.family!r}, patch_size={self.patch_size}, "
            f"merge_size={self.merge_size}, hidden_size={self.hidden_size}, out_size={self.out_size}, "
            f"num_layers={self.num_layers})"
        )

    # ------------------------------------------------------------------------------------------- pixels

    @public(name=_named(".normalize"))
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., 3, h, w)`` RGB -> normalized float32 (uint8) or ``x``'s float dtype (``[0, 1]`` floats).

        uint8 is normalized as ``(x.float() - 255 * mean) / (255 * std)``, the image processor's fused
        rescale-and-normalize, so that a view resized like the processor (torchvision's uint8 antialiased
        bicubic on CPU) gives its ``pixel_values`` bit for bit.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x={type(x).__name__}; expected a tensor (..., 3, h, w). Pass e.g. torch.as_tensor(x).")
        if x.dim() < 3 or x.shape[-3] != 3:
            raise ValueError(
                f"x has shape {tuple(x.shape)}; expected (..., 3, h, w), RGB channels first. "
                "Convert the image to RGB and pass it channels first (x.permute(2, 0, 1) for (h, w, 3))."
            )
        if x.dtype == torch.uint8:
            # transformers fuses rescale into normalize: float32 mean * (1 / (1/255)) == mean * 255.0
            mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device) * 255.0
            std = torch.tensor(self.std, dtype=torch.float32, device=x.device) * 255.0
            return x.float().sub_(mean[:, None, None]).div_(std[:, None, None])  # one new tensor, same values
        if not x.is_floating_point():
            raise TypeError(
                f"x has dtype {x.dtype}; expected uint8 (0..255) or a float tensor in [0, 1]. "
                "Pass x.to(torch.uint8) or x.float() / 255."
            )
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)
        return (x - mean[:, None, None]).div_(std[:, None, None])

    def _views(self, views, raw: bool = False) -> list[torch.Tensor]:
        """``views`` as a non-empty list of float ``(3, h, w)`` tensors whose sides are multiples of ``factor``
        (``raw=True``: pixels, uint8 too, of any dtype mix; :meth:`_pack_stacks` normalizes them)."""
        if isinstance(views, torch.Tensor):
            if views.dim() != 4:
                raise ValueError(
                    f"views has shape {tuple(views.shape)}; expected a list of (3, h, w) tensors or one "
                    "(n, 3, h, w) tensor. Pass e.g. views=[x] for a single (3, h, w) view."
                )
            views = list(views.unbind(0))
        elif not isinstance(views, Sequence) or isinstance(views, str):
            raise TypeError(f"views={type(views).__name__}; expected a list of (3, h, w) tensors. Pass views=[x, ...].")
        if len(views) == 0:
            raise ValueError("views=[] (empty); pass at least one (3, h, w) view.")
        f = self.factor
        for i, v in enumerate(views):
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"views[{i}]={type(v).__name__}; expected a tensor (3, h, w). Pass tensors only.")
            if not v.is_floating_point() and not (raw and v.dtype == torch.uint8):
                raise TypeError(
                    f"views[{i}] has dtype {v.dtype}; expected normalized float pixels. "
                    f"Pass tower.normalize(x) (uint8 or [0, 1] floats in, normalized floats out)."
                )
            if v.dim() != 3 or v.shape[0] != 3:
                raise ValueError(
                    f"views[{i}] has shape {tuple(v.shape)}; expected (3, h, w), RGB channels first. "
                    "Convert the image to RGB and pass it channels first."
                )
            h, w = int(v.shape[1]), int(v.shape[2])
            if h < f or w < f or h % f or w % f:
                fix = (max(f, round(h / f) * f), max(f, round(w / f) * f))
                raise ValueError(
                    f"views[{i}] is {h}x{w} pixels; both sides must be positive multiples of patch_size * "
                    f"merge_size = {self.patch_size} * {self.merge_size} = {f}. Resize it first, e.g. to "
                    f"{fix[0]}x{fix[1]} (transformers' smart_resize gives the processor's size)."
                )
            if v.device != views[0].device or (v.dtype != views[0].dtype and not raw):
                raise ValueError(
                    f"views[{i}] is {v.dtype} on {v.device}, views[0] is {views[0].dtype} on {views[0].device}; "
                    "all views must share one dtype and device. Convert them with .to(...) first."
                )
        return list(views)

    @staticmethod
    def _groups(grids: list[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
        """The views' indices grouped by grid, in order of first appearance."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(grids):
            groups.setdefault(g, []).append(i)
        return groups

    @staticmethod
    def _rows(starts: torch.Tensor, length: int) -> torch.Tensor:
        """The row indices ``start + 0..length-1`` of each start, concatenated."""
        return (starts[:, None] + torch.arange(length, device=starts.device)[None]).flatten()

    def _pack(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalized views -> ``(pixel_values, grids)``: views of one size are reshaped together."""
        grids = [(int(v.shape[1]) // self.patch_size, int(v.shape[2]) // self.patch_size) for v in views]
        groups = self._groups(grids)
        if len(groups) == 1 or all(idx == list(range(idx[0], idx[0] + len(idx))) for idx in groups.values()):
            # each size's views are consecutive (every view of a ragged batch): written in place, as stacks
            # (groups are in order of first appearance: here the views' order); a single view is not copied
            stacks = [
                torch.stack([views[i] for i in idx]) if len(idx) > 1 else views[idx[0]][None] for idx in groups.values()
            ]
            return self._pack_stacks(stacks)
        p, t = self.patch_size, self.temporal_patch_size
        counts = torch.tensor([gh * gw for gh, gw in grids])
        starts = counts.cumsum(0) - counts
        out = views[0].new_empty((int(counts.sum()), 3 * t * p * p))
        for (gh, gw), idx in groups.items():  # one reshape per distinct size, scattered to its views' rows
            x = torch.stack([views[i] for i in idx])
            out[self._rows(starts[idx], gh * gw).to(out.device)] = self._patches(x).reshape(-1, out.shape[1])
        return out, grids

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, 3, h, w)`` -> ``(b, h/(p m), w/(p m), m, m, 3, T, p, p)``: the processor's row layout, a view
        (the still image repeated over the ``T`` frames by ``expand``, no copy)."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        b, _, h, w = x.shape
        x = x.reshape(b, 3, h // (p * m), m, p, w // (p * m), m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        return x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)

    def _pack_stacks(
        self, stacks: list[torch.Tensor], *, normalize: bool = False, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Stacks ``[(S_i, 3, h_i, w_i)]`` of one size each -> ``(pixel_values, grids)``, views in stack order.

        One copy per stack, straight into its rows of ``pixel_values`` (a stack's views are consecutive
        rows): no per-size intermediate, no scatter. ``normalize=True``: the stacks are pixels (uint8 or
        ``[0, 1]`` floats), normalized per stack by :meth:`normalize` (the processor's float32 arithmetic,
        so the values are the same bit for bit) and written in ``dtype`` (default float32 / the stacks')."""
        p, t = self.patch_size, self.temporal_patch_size
        grids = [(int(s.shape[-2]) // p, int(s.shape[-1]) // p) for s in stacks for _ in range(s.shape[0])]
        rows = [s.shape[0] * (s.shape[-2] // p) * (s.shape[-1] // p) for s in stacks]
        if dtype is None:
            dtype = torch.float32 if normalize and not stacks[0].is_floating_point() else stacks[0].dtype
        out = torch.empty((sum(rows), 3 * t * p * p), dtype=dtype, device=stacks[0].device)
        start = 0
        for s, n in zip(stacks, rows):
            x = self.normalize(s) if normalize else s  # float32 for uint8, of the stack's own size (not T times)
            src = self._patches(x)
            out[start : start + n].view(src.shape).copy_(src)  # permute, repeat over T and cast in one copy
            start += n
        return out, grids

    @public(name=_named(".pack"))
    def pack(self, views) -> tuple[torch.Tensor, torch.Tensor]:
        """Views -> the tower's input, laid out exactly as ``Qwen2VLImageProcessor`` lays it out.

        Args:
            views: ``n`` normalized float tensors ``(3, h_i, w_i)`` (or one ``(n, 3, h, w)`` tensor), sides
                multiples of ``factor``.

        Returns:
            ``pixel_values`` ``(sum_i gh_i * gw_i, 3 * T * p * p)`` in the views' dtype, rows in merge-window
            order, and ``grid_thw`` ``(n, 3)`` long ``[1, gh_i, gw_i]``, both on the views' device.
        """
        views = self._views(views)
        pixel_values, grids = self._pack(views)
        grid_thw = torch.tensor([[1, gh, gw] for gh, gw in grids], dtype=torch.long, device=views[0].device)
        return pixel_values, grid_thw

    @public(name=_named(".unpack"))
    def unpack(self, pixel_values: torch.Tensor, grid_thw) -> list[torch.Tensor]:
        """The inverse of :meth:`pack`: ``pixel_values`` ``(N, 3 * T * p * p)`` of still images (``t == 1``)
        and their ``grid_thw`` ``(n, 3)`` -> ``n`` views ``(3, gh_i * p, gw_i * p)`` (the first frame)."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        thw = torch.as_tensor(grid_thw).tolist()
        if not thw or any(len(r) != 3 or r[0] != 1 or r[1] % m or r[2] % m or min(r) < 1 for r in thw):
            raise ValueError(
                f"grid_thw={thw}; expected rows [1, gh, gw] of still images, gh and gw positive multiples of "
                f"merge_size={m}. Pass the image_grid_thw that came with pixel_values."
            )
        grids = [(int(r[1]), int(r[2])) for r in thw]
        total = sum(gh * gw for gh, gw in grids)
        if not isinstance(pixel_values, torch.Tensor) or tuple(pixel_values.shape) != (total, 3 * t * p * p):
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(
                f"pixel_values has shape {shape}; grid_thw={thw} needs ({total}, {3 * t * p * p}). "
                "Pass the pixel_values and image_grid_thw of one processor call."
            )
        counts = torch.tensor([gh * gw for gh, gw in grids])
        starts = counts.cumsum(0) - counts
        views: list[torch.Tensor] = [pixel_values] * len(grids)  # placeholders, each replaced below
        for (gh, gw), idx in self._groups(grids).items():
            rows = self._rows(starts[idx], gh * gw).to(pixel_values.device)
            x = pixel_values[rows].view(len(idx), gh // m, gw // m, m, m, 3, t, p, p)[:, :, :, :, :, :, 0]
            x = x.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(len(idx), 3, gh * p, gw * p)
            for j, i in enumerate(idx):
                views[i] = x[j]
        return views

    @public(name=_named(".raster"))
    def raster(self, x: torch.Tensor, grid) -> torch.Tensor:
        """Patch features of one view in merge-window order ``(gh * gw, D)`` -> ``(D, gh, gw)``, raster.

        (Merged ``tokens`` are raster already: ``tokens[i].T.reshape(D, gh // merge, gw // merge)``.)
        """
        m = self.merge_size
        gh, gw = (int(v) for v in grid)
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != gh * gw or gh % m or gw % m:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"x has shape {shape} with grid={(gh, gw)}; expected (gh * gw, D) = ({gh * gw}, D), gh and gw "
                f"multiples of merge_size={m}. Pass one view's patches with its grid: "
                "raster(out.patches[i], out.grids[i])."
            )
        d = x.shape[1]
        return x.view(gh // m, gw // m, m, m, d).permute(4, 0, 2, 1, 3).reshape(d, gh, gw)

    # ------------------------------------------------------------------------------------------- tower

    def _unwindow(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """Qwen2.5-VL keeps its blocks' output in window order; back to merge-window order.

        The tower permutes whole merge units (``m * m`` rows) into windows of ``ws x ws`` units
        (``ws = window_size // merge // patch``), windows in raster order, units in raster order inside a
        window, image after image (transformers' ``get_vision_window_index``)."""
        m = self.merge_size
        ws = int(self.window_size or 0) // m // self.patch_size
        counts = torch.tensor([gh * gw // (m * m) for gh, gw in grids])
        starts = counts.cumsum(0) - counts
        inverse = torch.empty(int(counts.sum()), dtype=torch.long)
        for (gh, gw), idx in self._groups(grids).items():
            hm, wm = gh // m, gw // m
            unit = torch.arange(hm * wm).view(hm, wm)
            unit = nn.functional.pad(unit, (0, -wm % ws, 0, -hm % ws), value=-1)
            order = unit.view(unit.shape[0] // ws, ws, unit.shape[1] // ws, ws).permute(0, 2, 1, 3).flatten()
            local = torch.argsort(order[order >= 0])  # unit j of the image sits at window position local[j]
            inverse[self._rows(starts[idx], hm * wm)] = (starts[idx][:, None] + local[None]).flatten()
        units = x.view(-1, m * m, x.shape[-1])
        return units[inverse.to(x.device)].view(x.shape)

    @public(name=_named(".forward"))
    def forward(self, views, *, patches: bool = False) -> QwenTowerOutput:
        """Views -> per-view LLM tokens (and Qwen3-VL's deepstack features) in one call of the tower.

        Args:
            views: ``n`` normalized float views ``(3, h_i, w_i)`` (or ``(n, 3, h, w)``), sides multiples of
                ``factor``; cast to the tower's dtype and device.
            patches: also return the last block's patch features (see :class:`QwenTowerOutput`).
        """
        if not isinstance(patches, bool):
            raise TypeError(f"patches={patches!r}; expected True or False. Pass patches=True or patches=False.")
        views = self._views(views)
        pixel_values, grids = self._pack(views)
        return self._run(pixel_values, grids, patches)

    def _call(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]], release: bool = False):
        """The tower, once, on packed ``pixel_values`` of views with these patch ``grids``: ``(grid_thw, merged,
        last_hidden_state, deepstack)`` (see :func:`_read_output`).

        ``release=True`` (``pixel_values`` is the caller's own, not used after this call): without autograd,
        its memory is returned as soon as the patch embedding has read it, instead of staying allocated
        through every block (the tower's forward cannot drop the caller's reference; at the released
        budgets this is tens to hundreds of MiB, about a tenth of a block's activations)."""
        device = self.device
        grid_thw = torch.tensor([[1, gh, gw] for gh, gw in grids], dtype=torch.long, device=device)
        x = pixel_values.to(device, self.dtype)
        embed = getattr(self.tower, "patch_embed", None)
        hook = None
        if release and x is pixel_values and isinstance(embed, nn.Module) and not torch.is_grad_enabled():
            hook = embed.register_forward_hook(lambda module, args, out: _release(args[0], x))
        try:
            out = self.tower(x, grid_thw=grid_thw)
        finally:
            if hook is not None:
                hook.remove()
        return grid_thw, *_read_output(out)

    def _run(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]], patches: bool = False) -> QwenTowerOutput:
        """The tower on packed ``pixel_values`` of views with these patch ``grids``, split per view."""
        grid_thw, merged, last, deep = self._call(pixel_values, grids)
        sizes = [gh * gw // self.merge_size**2 for gh, gw in grids]
        tokens = list(merged.split(sizes))
        deepstack = [list(d.split(sizes)) for d in deep] if self.family == "qwen3_vl" and deep is not None else None
        patch_list = None
        if patches:
            if last is None:
                raise ValueError(
                    "patches=True needs the tower's last_hidden_state, which this transformers version does not "
                    "return. Use transformers >= 5, or pass patches=False."
                )
            if self.family == "qwen2_5_vl":
                last = self._unwindow(last, grids)
            patch_list = list(last.split([gh * gw for gh, gw in grids]))
        return QwenTowerOutput(tokens, deepstack, patch_list, grids, grid_thw)

    def encode(self, views, *, patches: bool = False) -> QwenTowerOutput:
        """Same as calling the module: :meth:`forward`."""
        return self(views, patches=patches)


class QwenBackbone(VisionBackbone):
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL tower as an hrperc backbone: views of any size (multiples of
    ``patch * merge``), every view of a batch in one packed call of the tower (``packs_views``).

    The tower merges ``merge x merge`` patches into one LLM token, so here ``patch_size`` is the pixels of one
    output token, ``(p * m, p * m)``, and ``hidden_size`` the width of those tokens (the LLM's): a
    ``(3, h, w)`` view gives ``(h // (p m)) * (w // (p m))`` tokens, ``get_image_features``' output. Qwen3-VL's
    deepstack features follow on the channels: :meth:`features` returns ``(N, t, hidden_size * (1 + L))``,
    the tokens then each of the ``L`` levels (``deepstack_levels``). The tower reads its last block
    (``layer=-1``, the only layer its merger takes).

    Args:
        tower: the model's vision tower (``model.model.visual``) or a :class:`QwenVisionTower`.
        mean, std: ``None`` = the released checkpoints' normalization (see :class:`QwenVisionTower`).
    """

    family = "qwen_vl"
    dynamic_size = True
    packs_views = True
    packs_pixels = True  # features_packed(..., pixels=True): normalizes while packing (the runner's path)
    qwen: QwenVisionTower

    @public(name="QwenBackbone")
    def __init__(self, tower, *, layer: int = -1, mean=None, std=None) -> None:
        qwen = tower if isinstance(tower, QwenVisionTower) else QwenVisionTower(tower, mean=mean, std=std)
        f = qwen.factor
        super().__init__(
            qwen.tower,
            image_size=(f, f),
            patch_size=(f, f),
            hidden_size=qwen.out_size,
            num_layers=qwen.num_layers,
            num_prefix_tokens=0,
            mean=qwen.mean,
            std=qwen.std,
            layer=layer,
        )
        if resolve_layer(layer, qwen.num_layers) != qwen.num_layers:
            raise ValueError(
                f"layer={layer}; a Qwen tower's merger reads its last block, so its tokens come from layer=-1 only. "
                f"Pass layer=-1 (the default)."
            )
        object.__setattr__(self, "qwen", qwen)  # not a second submodule: the tower is registered once, as .model
        self.deepstack_levels = len(qwen.deepstack_layers)

    def _patch_tokens(self, pixels: torch.Tensor, k: int) -> torch.Tensor:
        return torch.cat(self._tokens(list(pixels.unbind(0))), 0)

    def _set_grad_checkpointing(self, enable: bool) -> None:
        tower = self.qwen.tower
        if hasattr(tower, "activation_checkpointing_enable"):  # transformers 5's name; the older one warns there
            if enable:
                tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                tower.activation_checkpointing_disable()
        elif enable:
            tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            tower.gradient_checkpointing_disable()

    def _tokens(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per view ``(1, t_i, D')``: the tokens, then Qwen3-VL's deepstack levels on the channels."""
        out = self.qwen(views)
        per_view = (
            out.tokens
            if out.deepstack is None
            else [
                torch.cat([tokens, *(level[i] for level in out.deepstack)], -1) for i, tokens in enumerate(out.tokens)
            ]
        )
        return [t[None] for t in per_view]

    def features_packed(
        self, stacks: list[torch.Tensor], layer: int | None = None, *, pixels: bool = False
    ) -> list[torch.Tensor]:
        """Every view of every stack ``[(S_i, 3, h_i, w_i)]`` in ONE call of the tower (its attention is per
        image: no image sees another) -> ``[(S_i, t_i, D')]``.

        The stacks hold normalized float views; ``pixels=True``: pixels (uint8 ``[0, 255]`` or ``[0, 1]``
        floats), normalized stack by stack as they are written into the tower's input (the runner's path: one
        float copy of the views, in the tower's dtype, instead of a normalized copy and a packed one; the
        same values bit for bit)."""
        if layer is not None:
            resolve_layer(layer, self.num_layers)
        q = self.qwen
        q._views([v for stack in stacks for v in stack.unbind(0)], raw=pixels)  # the checks only
        dtype = q.dtype if pixels else None
        pixel_values, grids = q._pack_stacks(list(stacks), normalize=pixels, dtype=dtype)
        _, merged, _, deep = q._call(pixel_values, grids, release=True)
        del pixel_values
        levels = [merged, *deep] if q.family == "qwen3_vl" and deep is not None else [merged]
        out, start = [], 0
        for stack in stacks:  # a stack's views are consecutive rows of the tower's output: views, no copy
            n = stack.shape[0]
            t = (stack.shape[-2] // self.patch_size[0]) * (stack.shape[-1] // self.patch_size[1])
            parts = [level[start : start + n * t] for level in levels]
            out.append((parts[0] if len(parts) == 1 else torch.cat(parts, -1)).view(n, t, -1))
            start += n * t
        return out

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """The image processor's normalization (uint8: its fused form, bit for bit)."""
        return self.qwen.normalize(images)
