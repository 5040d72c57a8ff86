"""The vision front end of each configuration: the ``inf_llava`` recipe (``hrperc.create_encoder``) around a ViT.

``tiny``: a small random timm ``VisionTransformer`` (sub-images of 32 px, 4 x 4 tokens) with a released-
configuration DEM of its width; ``llama3-8b``: CLIP ViT-L/14-336 from a local transformers directory and
the released DEM weights (``spatial_embed.*``) when given. Both: grid 3 x 3, layer -2, thumbnail,
bilinear token reduction, tokens averaged with the thumbnail's (``docs/released.md``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import hrperc

__all__ = ["build_vision", "released_weights"]


def released_weights(path, prefixes=("spatial_embed.", "mm_projector.")) -> dict[str, torch.Tensor]:
    """The DEM and projector tensors of a released INF-LLaVA checkpoint: one file, or a directory of
    (sharded) ``*.safetensors`` / ``*.bin`` files; only keys containing one of ``prefixes`` are read."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    else:
        files = [path]
    if not files:
        raise FileNotFoundError(f"released_weights: no *.safetensors or *.bin files in {path}.")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), "pt") as sf:
                out.update({k: sf.get_tensor(k) for k in sf.keys() if any(p in k for p in prefixes)})
        else:
            sd = torch.load(f, map_location="cpu", weights_only=True)
            out.update({k: v for k, v in sd.items() if any(p in k for p in prefixes)})
    if not any("spatial_embed." in k for k in out) and "spatial_embed." in prefixes:
        raise ValueError(
            f"released_weights: {path} holds no 'spatial_embed.*' (DEM) tensors; point --weights at the released "
            "INF-LLaVA checkpoint (the one with spatial_embed.* and mm_projector.* keys)."
        )
    return out


def build_vision(cfg, released: dict | None = None) -> tuple[nn.Module, int]:
    """``(HighResEncoder, token width D)`` for ``cfg``; ``released``: tensors from :func:`released_weights`."""
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
