"""The vision front end of each configuration: the ``inf_llava`` recipe (``hrperc.create_encoder``) around a ViT.

``tiny``: a small random timm ``VisionTransformer`` (sub-images of 32 px, 4 x 4 tokens) with a released-
configuration DEM of its width; ``llama3-8b``: CLIP ViT-L/14-336 from a local transformers directory and
the released DEM weights (``spatial_embed.*``) when given. Both: grid 3 x 3, layer -2, thumbnail,
bilinear token reduction, tokens averaged with the thumbnail's (``docs/released.md``).
"""

from __future__ import annotations

from torch import nn

import hrperc

__all__ = ["build_vision"]


def build_vision(cfg, released=None) -> tuple[nn.Module, int]:
    """``(HighResEncoder, token width D)`` for ``cfg``; ``released``: the released INF-LLaVA checkpoint (a file,
    a directory of shards or a state dict), of which :func:`hrperc.pretrained.inf_llava.load_dem` reads the DEM."""
    v = cfg.vision
    if v["kind"] == "timm-tiny":
        from timm.models.vision_transformer import VisionTransformer

        vit = VisionTransformer(num_classes=0, **{k: val for k, val in v.items() if k != "kind"})
        backbone = hrperc.wrap_backbone(vit)
    elif v["kind"] == "hf":
        backbone = hrperc.create_backbone(f"hf:{v['path']}")
    else:
        raise ValueError(f"build_vision: vision kind {v['kind']!r} is not 'timm-tiny' or 'hf'.")
    if released is not None:
        dem = hrperc.pretrained.inf_llava.load_dem(released, heads=cfg.dem.get("heads", 8))
    else:
        dem = hrperc.DualPerspectiveEnhancement(backbone.hidden_size, **cfg.dem)
    encoder = hrperc.create_encoder("inf_llava", backbone, dem=dem, grid=tuple(cfg.grid))
    return encoder, backbone.hidden_size
