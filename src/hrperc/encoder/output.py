"""What :class:`hrperc.HighResEncoder` returns, and the two pieces of its last stage: the ragged batch padded
once (rows of image groups put back in batch order) and the stage clock of ``forward(timings=True)``.

Example::

    >>> import torch
    >>> from hrperc.encoder.output import in_batch_order
    >>> groups = [([0, 2], torch.ones(2, 3, 4)), ([1], torch.full((1, 1, 4), 2.0))]  # images 0 and 2, then 1
    >>> in_batch_order(groups, 3)[:, :, 0]
    tensor([[1., 1., 1.],
            [2., 0., 0.],
            [1., 1., 1.]])
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..modules.frontend import TokenSegment, ViewPlan, slot_mask
from ..ops.canvas import CropGeometry

__all__ = ["EncoderOutput", "in_batch_order", "StageClock"]


@dataclass
class EncoderOutput:
    """What :class:`HighResEncoder` returns.

    ``tokens``: ``(B, T, D)``, images with fewer tokens zero-padded at the end; ``token_mask``:
    ``(B, T)`` bool, True on real tokens (all True unless the batch is ragged); ``geometries``:
    :class:`~hrperc.ops.canvas.CropGeometry` per image (``grids`` reads them); ``layout``: per image, the
    :class:`TokenSegment` runs that make up its tokens (``num_tokens``, ``T_b`` per image, is where the
    last one stops); ``valid_masks``: per image, ``(gh*ht, gw*wt)`` bool, True where a canvas token covers
    image pixels (False on padding from ``fit="pad"/"resize_pad"``); ``thumbnail_tokens``: ``(B, ht*wt, D)``,
    the INF-LLaVA thumbnail's ViT tokens, or ``None`` when none was encoded (``thumbnail=False``,
    ``combine="none"``, or another front end); ``encoded``: how many views went through the ViT and how
    many were skipped; ``timings``: seconds per stage (``views``, ``backbone``, ``assemble``, ``combine``)
    when ``forward(..., timings=True)``; ``plans``: the front end's plan of each image; ``extras``: the front
    end's other side outputs, ``name -> (B, ...)`` in batch order, zero-padded like ``tokens`` (Qwen3-VL's
    ``"deepstack.0"``, ``"deepstack.1"``, ...: features of intermediate tower blocks, the shape of ``tokens``).
    """

    tokens: torch.Tensor
    token_mask: torch.Tensor
    geometries: list[CropGeometry]
    layout: list[tuple[TokenSegment, ...]]
    valid_masks: list[torch.Tensor]
    thumbnail_tokens: torch.Tensor | None = None
    encoded: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    plans: list[ViewPlan] | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> list[int]:
        """``T_b``: real tokens of each image (the end of its last segment)."""
        return [segments[-1].stop for segments in self.layout]

    @property
    def slot_mask(self) -> torch.Tensor:
        """``(B, T)`` bool, True on newline slots (zeros in ``tokens`` unless ``forward(newline=)`` filled
        them): the positions a LLaVA-NeXT-style model fills with its learned ``image_newline``."""
        T = self.tokens.shape[1]
        return torch.stack([slot_mask(segs, T) for segs in self.layout]).to(self.tokens.device)

    @property
    def grids(self) -> list[tuple[int, int]]:
        """``(gh, gw)`` of each image."""
        return [geo.grid for geo in self.geometries]


def in_batch_order(groups, B: int) -> torch.Tensor:
    """``[(members, (b, n, ...))]`` -> ``(B, max n, ...)``: each image's rows at its index, zero-padded at the
    end (the ragged padding; a loop over groups, not images)."""
    if len(groups) == 1:
        return groups[0][1]
    first = groups[0][1]
    out = first.new_zeros(B, max(r.shape[1] for _, r in groups), *first.shape[2:])
    for members, r in groups:
        out[torch.tensor(members, device=out.device), : r.shape[1]] = r
    return out


class StageClock:
    """Stage timings for ``forward(timings=True)``; synchronizes CUDA so the numbers mean something."""

    def __init__(self, enabled: bool, device) -> None:
        self.enabled, self.device, self.times = enabled, torch.device(device), dict[str, float]()
        self._last = self._now() if enabled else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        if self.enabled:
            now = self._now()
            self.times[name] = self.times.get(name, 0.0) + now - self._last
            self._last = now
