"""Bit-for-bit guard for refactors: run a fixed set of inputs through hrperc and save (or compare) every output.

Covers every recipe (several sizes, a ragged batch, uint8 and float pixels, DCM+DEM upgrades), the INF-LLaVA
front end (released DEM configuration, footprint skipping counts, combines), ``num_tokens`` over many sizes,
the window-attention kernel (forward and gradients; under ``TRITON_INTERPRET=1`` on a CPU) and the
transformers integration's logits (tiny random models of the four families).

Usage, comparing an older tree with the working tree::

    git worktree add /tmp/old <commit>
    PYTHONPATH=/tmp/old/src TRITON_INTERPRET=1 python benchmarks/snapshot_outputs.py --save /tmp/old.pt
    TRITON_INTERPRET=1 python benchmarks/snapshot_outputs.py --compare /tmp/old.pt

``--compare`` prints how many outputs are ``torch.equal`` (and names every one that is not) and exits 1 on
any difference. Only public names are used, so the script runs on trees before and after a refactor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny transformers models

SIZES = [(1, 1), (5, 300), (37, 53), (64, 64), (90, 80), (100, 33), (180, 400), (333, 111), (7, 900), (256, 250)]


def _vit(img: int, patch: int, seed: int, depth: int = 2, width: int = 32):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=img, patch_size=patch, embed_dim=width, depth=depth, num_heads=2, num_classes=0)


def _images(sizes, seed: int, uint8: bool):
    g = torch.Generator().manual_seed(seed)
    if uint8:
        return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def _attempt(tag: str, fn) -> None:
    """Run one case; a case that raises is reported and left out (an older tree may refuse or crash where a
    newer one answers: ``--compare`` lists such outputs as new, never as equal)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        print(f"{tag}: raised {type(e).__name__}: {str(e)[:100]}")


def _encoder_outputs(name: str, enc, out: dict) -> None:
    def ragged(uint8: bool) -> None:
        res = enc(_images(SIZES, 1, uint8))
        tag = f"{name}/ragged/{'u8' if uint8 else 'f32'}"
        out[f"{tag}/tokens"] = res.tokens.detach()
        out[f"{tag}/mask"] = res.token_mask
        out[f"{tag}/counts"] = torch.tensor(res.num_tokens)
        out[f"{tag}/encoded"] = torch.tensor([res.encoded.get("encoded", -1), res.encoded.get("skipped", -1)])

    def single() -> None:
        out[f"{name}/single/tokens"] = enc(_images([(90, 80)], 2, True)[0]).tokens.detach()

    def batch() -> None:
        out[f"{name}/batch/tokens"] = enc(torch.stack(_images([(70, 120)] * 3, 3, False))).tokens.detach()

    def counts() -> None:
        out[f"{name}/num_tokens"] = torch.tensor(
            [enc.num_tokens((h, w)) for h in (1, 7, 28, 50, 99, 200, 640) for w in (1, 9, 28, 61, 140, 333, 1000)]
        )

    _attempt(f"{name}/ragged/u8", lambda: ragged(True))
    _attempt(f"{name}/ragged/f32", lambda: ragged(False))
    for case in (single, batch, counts):
        _attempt(f"{name}/{case.__name__}", case)


TILED_RECIPES = ("inf_llava", "infimm_hd", "internvl", "llava15", "llava_next", "llava_onevision", "s2")


def recipes(out: dict) -> None:
    import hrperc

    for tile, patch in ((28, 7), (32, 8)):
        for recipe in TILED_RECIPES:  # the native-resolution recipes run their models' own towers, not a ViT
            vit = _vit(tile, patch, seed=0)
            enc = hrperc.create_encoder(recipe, vit, layer=-1)
            torch.manual_seed(1)
            _encoder_outputs(f"recipe/{recipe}/{tile}", enc, out)
        for recipe in ("llava_next", "llava_onevision", "internvl"):
            vit = _vit(tile, patch, seed=0)
            torch.manual_seed(5)
            enc = hrperc.create_encoder(recipe, vit, layer=-1, dcm=True)
            _encoder_outputs(f"recipe/{recipe}+dcm/{tile}", enc, out)
    vit = _vit(28, 7, seed=0)
    torch.manual_seed(1)
    enc = hrperc.create_encoder("llava_next", vit, layer=-1)
    res = enc(_images(SIZES[:4], 4, True), project=torch.nn.Linear(32, 16), newline=torch.arange(16.0))
    out["recipe/llava_next/project+newline"] = res.tokens.detach()


def inf_llava(out: dict) -> None:
    import hrperc

    for combine in ("mean", "concat", "none"):
        for grid in ((3, 3), "auto"):
            vit = _vit(28, 7, seed=0)
            torch.manual_seed(2)
            crop = hrperc.DualPerspectiveCrop(grid=grid, tile_size=28)
            enc = hrperc.HighResEncoder(vit, crop, dem="default", combine=combine)
            _encoder_outputs(f"inf_llava/{combine}/{grid}", enc, out)
    vit = _vit(28, 7, seed=0)
    enc = hrperc.HighResEncoder(vit, hrperc.DualPerspectiveCrop(grid=(2, 3), tile_size=28), dem=None, combine="concat")
    _encoder_outputs("inf_llava/no-dem", enc, out)
    vit = _vit(28, 7, seed=0)
    torch.manual_seed(3)
    enc = hrperc.HighResEncoder(
        vit, hrperc.DualPerspectiveCrop(grid=(3, 3), tile_size=28), dem="default", encode_all=True
    )
    _encoder_outputs("inf_llava/encode_all", enc, out)


def kernel(out: dict) -> None:
    import hrperc

    for dtype in (torch.float32, torch.bfloat16):
        for grid, tile, heads, dim in (((2, 2), (3, 3), 2, 16), ((2, 3), (3, 4), 1, 32)):
            g = torch.Generator().manual_seed(7)
            n = grid[0] * grid[1]
            q, k, v = (
                torch.randn(2 * n, tile[0] * tile[1], heads, dim, generator=g).to(dtype).requires_grad_()
                for _ in range(3)
            )
            for backend in ("triton", "sdpa", "reference"):
                try:
                    o = hrperc.window_attention(
                        q,
                        k,
                        v,
                        grid,
                        backend=backend,
                        tile_size=tile,
                        window="strided",
                        q_order="contiguous",
                        kv_order="strided",
                    )
                except Exception as e:  # noqa: BLE001 -- a backend unavailable here is skipped on both trees
                    print(f"kernel: {backend} {dtype} skipped ({type(e).__name__}: {str(e)[:80]})")
                    continue
                o.float().square().sum().backward()
                tag = f"kernel/{backend}/{dtype}/{grid}"
                out[f"{tag}/out"] = o.detach()
                for name, t in (("dq", q), ("dk", k), ("dv", v)):
                    out[f"{tag}/{name}"] = t.grad.detach().clone()
                    t.grad = None


def integration(out: dict) -> None:
    try:
        from _hf_tiny import _images as hf_images
        from _hf_tiny import build

        from hrperc.integrations.transformers import attach, encoder_from_model
    except ImportError as e:
        print(f"integration skipped ({e})")
        return
    for family in ("llava", "llava_next", "llava_onevision", "internvl"):
        model, proc, texts = build(family)
        model.eval()
        images = hf_images([(300, 500), (411, 207)])
        model, attached = attach(model, proc, encoder_from_model(model, proc))
        ids = attached(images=images, text=texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out[f"integration/{family}/logits"] = model(**ids).logits
        out[f"integration/{family}/input_ids"] = ids["input_ids"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", type=Path, help="write the outputs to this file")
    mode.add_argument("--compare", type=Path, help="compare the outputs with this file (torch.equal)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out: dict[str, torch.Tensor] = {}
    for part in (recipes, inf_llava, kernel, integration):
        part(out)
    if args.save:
        torch.save(out, args.save)
        print(f"{len(out)} outputs written to {args.save}")
        return 0
    ref = torch.load(args.compare)
    missing, extra = sorted(set(ref) - set(out)), sorted(set(out) - set(ref))
    differ = [k for k in sorted(set(ref) & set(out)) if not torch.equal(ref[k], out[k])]
    equal = len(set(ref) & set(out)) - len(differ)
    print(
        f"{equal} of {len(ref)} outputs bit-for-bit equal; {len(differ)} differ, {len(missing)} missing, "
        f"{len(extra)} new"
    )
    for k in differ:
        a, b = ref[k], out[k]
        gap = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else f"{a.shape} vs {b.shape}"
        print(f"  differs: {k} ({gap})")
    for k in missing:
        print(f"  missing: {k}")
    return 1 if differ or missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
