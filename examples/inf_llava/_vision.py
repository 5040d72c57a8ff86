"""The vision front end of each configuration (hrperc.HighResEncoder)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import hrperc


@dataclass
class _Out:
    tokens: torch.Tensor
    token_mask: torch.Tensor | None = None


class _StandInEncoder(nn.Module):
    """TEMPORARY stand-in with HighResEncoder's contract until it lands: local crops + thumbnail."""

    def __init__(self, backbone: nn.Module, grid, dim: int):
        super().__init__()
        self.backbone = backbone
        self.grid = tuple(grid)
        self.dem = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, images):
        B, N = images.shape[0], self.grid[0] * self.grid[1]
        tiles = hrperc.local_crop(images, self.grid)
        thumb = F.interpolate(images, size=tiles.shape[-2:], mode="bicubic", align_corners=False)
        feats = self.backbone.forward_features(torch.cat([tiles, thumb]))[
            :, self.backbone.num_prefix_tokens :
        ]
        loc = feats[: B * N].unflatten(0, (B, N)).mean(1)
        return _Out((loc + self.dem(loc) + feats[B * N :]) / 2)


def build_vision(cfg) -> tuple[nn.Module, int]:
    v = cfg.vision
    if v["kind"] == "timm-tiny":
        from timm.models.vision_transformer import VisionTransformer

        kwargs = {k: val for k, val in v.items() if k != "kind"}
        vit = VisionTransformer(num_classes=0, **kwargs)
        return _StandInEncoder(vit, cfg.grid, v["embed_dim"]), v["embed_dim"]
    raise NotImplementedError("llama3-8b vision front end: waiting for hrperc.HighResEncoder")
