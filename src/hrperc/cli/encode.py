"""``hrperc encode`` and the encoder half of ``hrperc demo``.

``hrperc encode IMAGE [IMAGE ...] [--recipe NAME] [--option KEY=VALUE ...] [--backbone NAME] [--weights PATH]
[--save tokens.safetensors] ...`` runs a recipe's :class:`~hrperc.HighResEncoder` (``--recipe``, default
``inf_llava``: the released INF-LLaVA front end on ``open_clip:ViT-L-14-336-quickgelu``, the config OpenAI's
CLIP weights need) over the images with a progress bar and prints, per image, its plan (geometry, grid, the
views that go through the ViT), the token count and layout, per-stage timings, and at the end the peak
memory. It first says which weights were loaded and from where: the backbone's (random without
``--weights``; an ``hf:<dir>`` backbone's come from its folder) and the DEM's (random without
``--dem-weights``).

Options: ``--option key=value`` sets any option of the recipe (``hrperc recipes`` lists them, read from the
recipe's own declaration: :mod:`hrperc.cli.recipes`); ``--layer`` and ``--max-batch`` are encoder options of
every recipe; ``--grid``, ``--max-tiles``, ``--fit``, ``--combine``, ``--no-dem``, ``--dem-weights`` and
``--encode-all`` are ``inf_llava``'s (``--combine`` defaults to ``mean`` with the DEM and ``concat`` with
``--no-dem``), refused with another recipe. A native-resolution recipe (Qwen2-VL, Pixtral: no fixed view
size) runs on its model's own vision tower, which ``--backbone`` does not build: it is refused, naming what to
use instead. ``--save`` writes the tokens, their masks and each image's layout (:mod:`hrperc.cli.save`).

Every image header, weight file and the ``--save`` folder is checked before the backbone is built, and every
image's canvas before the first is encoded (see :mod:`hrperc.cli.inputs`, :mod:`hrperc.cli.limits`).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..modules.dual_front_end import DualFrontEnd
from .args import (
    parse_device,
    parse_grid,
    parse_max_batch,
    parse_max_canvas_pixels,
    parse_max_image_pixels,
    parse_query,
    positive_int,
    read_image,
)
from .inputs import check_backbone, check_image_file, check_weights
from .limits import check_canvas, check_fixed_grid

if TYPE_CHECKING:
    from ..modules.dual_crop import Fit

__all__ = [
    "add_encode_parser",
    "add_demo_encoder_arguments",
    "run_encode",
    "build_encoder",
    "check_encoder_inputs",
    "demo_encoder",
    "weights_lines",
]

# INF-LLaVA's tower is OpenAI's CLIP ViT-L/14-336, trained with QuickGELU: open_clip's "-quickgelu" config.
DEFAULT_BACKBONE = "open_clip:ViT-L-14-336-quickgelu"
DEMO_BACKBONE = "timm:vit_small_patch14_reg4_dinov2"
DEFAULT_RECIPE = "inf_llava"
#: ``inf_llava``'s flags (``hrperc encode``) and their values when not given: the released settings.
INF_LLAVA_FLAGS = {"grid": (3, 3), "max_tiles": 9, "fit": "resize"}


def _add_encoder_arguments(p: argparse.ArgumentParser, backbone_default: str, layer_default: int | None) -> None:
    p.add_argument(
        "--backbone",
        default=backbone_default,
        metavar="NAME",
        help=f"the ViT, a create_backbone name: timm:<model>, open_clip:<model> or hf:<folder> (default "
        f"{backbone_default})",
    )
    p.add_argument(
        "--weights",
        default=None,
        metavar="PATH",
        help="local checkpoint of the backbone (default: random weights; an hf: folder brings its own)",
    )
    p.add_argument(
        "--dem-weights",
        default=None,
        metavar="PATH",
        help="released INF-LLaVA checkpoint for the DEM: a file or a folder of shards (default: random)",
    )
    p.add_argument(
        "--layer",
        type=int if layer_default is not None else parse_layer,
        default=layer_default,
        help="backbone layer the tokens are read from, negative from the end (default: "
        + (
            f"{layer_default})"
            if layer_default is not None
            else "the recipe's, -2 for inf_llava; a list, --layer=-2,-5,-8, concatenates layers where the recipe "
            "takes one)"
        ),
    )
    p.add_argument(
        "--combine",
        choices=("mean", "concat", "none"),
        default=None,
        help="INF-LLaVA: thumbnail + DEM tokens (default: mean; concat with --no-dem, where there is nothing to "
        "average)",
    )
    p.add_argument("--no-dem", action="store_true", help="INF-LLaVA: no enhancement; return the sub-image tokens")
    p.add_argument(
        "--max-batch",
        type=parse_max_batch,
        default="auto",
        metavar="N",
        help="views per ViT call: a positive integer, or auto (default: 32 tiles' worth on a GPU, about 2048 "
        "tokens on a CPU)",
    )
    p.add_argument("--encode-all", action="store_true", help="INF-LLaVA: also encode sub-images the DEM never reads")
    p.add_argument(
        "--device",
        type=parse_device,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda, cuda:N, mps, ... (default: cuda when there is a GPU, else cpu)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=parse_max_image_pixels,
        default=None,
        metavar="N",
        help="PIL.Image.MAX_IMAGE_PIXELS for this run: PIL refuses images over twice it as possible decompression "
        "bombs (default: PIL's own; 0: no limit, for trusted files only)",
    )
    p.add_argument(
        "--max-canvas-pixels",
        type=parse_max_canvas_pixels,
        default=None,
        metavar="N",
        help="most canvas pixels (grid x tile) an image may get (default: 16x the image's pixels, at least "
        "4194304 and at most 33554432; 0: no limit)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype of the backbone, the DEM and the tokens (default float32; bfloat16 / float16 halve the "
        "memory, on a GPU)",
    )


def parse_layer(text: str) -> int | tuple[int, ...]:
    """``--layer``: ``N`` or ``N,M,...`` (layers concatenated on the channels, where the recipe takes a list)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layer {text!r}: use a layer number, negative from the end, e.g. --layer -2, or a list, -2,-5,-8"
        ) from None
    return values[0] if len(values) == 1 else values


parse_layer.__name__ = "layer"  # argparse names the type in its messages


def _recipe_name(text: str) -> str:
    """``--recipe``: a registered recipe's name."""
    from ..recipes import list_recipes

    if text not in list_recipes():
        raise argparse.ArgumentTypeError(f"--recipe {text!r} is not a recipe; pass one of {', '.join(list_recipes())}")
    return text


_recipe_name.__name__ = "recipe"  # argparse names the type in its messages


def add_encode_parser(sub) -> argparse.ArgumentParser:
    from ..recipes import list_recipes

    p = sub.add_parser(
        "encode",
        help="encode images with a recipe's front end; print each plan, the tokens and timings",
        description="Encode images with a recipe's high-resolution front end around a ViT, print each image's "
        "plan (views, grid, token count), the token layout and timings; --save writes the tokens.",
    )
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument(
        "--recipe",
        type=_recipe_name,
        default=DEFAULT_RECIPE,
        metavar="NAME",
        help=f"the front end: one of {', '.join(list_recipes())} (default {DEFAULT_RECIPE}; hrperc recipes "
        "lists their options)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the recipe, repeatable: bools true/false, ints, strings, none, lists as JSON or 1,2,3 "
        "(e.g. --option max_tiles=6 --option dcm=true; hrperc recipes lists each recipe's)",
    )
    p.add_argument(
        "--save",
        default=None,
        metavar="FILE.safetensors",
        help="write the tokens (B, T, D), token_mask, slot_mask and each image's plan and layout (metadata "
        "JSON) to this file",
    )
    p.add_argument(
        "--grid",
        type=parse_grid,
        default=None,
        help="INF-LLaVA: 3x3 (released, default), auto (the grid the image needs within --max-tiles), floor or "
        "ROWSxCOLS",
    )
    p.add_argument(
        "--max-tiles",
        type=positive_int("--max-tiles"),
        default=None,
        help=f"INF-LLaVA: tile budget for --grid auto (default {INF_LLAVA_FLAGS['max_tiles']})",
    )
    p.add_argument(
        "--fit",
        choices=("resize", "pad", "resize_pad"),
        default=None,
        help="INF-LLaVA: how the image meets the grid's canvas: resize (stretch to it, the released default), "
        "pad (no resampling: the image at the top-left, the rest filled) or resize_pad (scaled keeping its "
        "aspect ratio, centred, padded)",
    )
    _add_encoder_arguments(p, DEFAULT_BACKBONE, None)
    p.set_defaults(func=run_encode)
    return p


def add_demo_encoder_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the encoder half of ``hrperc demo``."""
    _add_encoder_arguments(p, DEMO_BACKBONE, -2)
    p.add_argument(
        "--query",
        type=parse_query,
        default=None,
        metavar="ROW,COL",
        help="ROW,COL of the DEM query token to draw (default: centre)",
    )
    p.add_argument(
        "--no-encode", action="store_true", help="only crop; skip the ViT, the DEM and the attention picture"
    )


def resolve_combine(args) -> str:
    """``--combine``, or its default: ``"mean"`` with a DEM, ``"concat"`` with ``--no-dem``."""
    if args.combine is not None:
        return args.combine
    return "concat" if args.no_dem else "mean"


def check_encoder_inputs(args) -> None:
    """The encoder's flags that contradict each other, and every file it reads (an ``hf:<dir>`` backbone,
    ``--weights``, ``--dem-weights``: see :mod:`hrperc.cli.inputs`), checked before anything is built."""
    if args.no_dem and args.dem_weights:
        raise ValueError("--no-dem and --dem-weights contradict each other; pass one of them.")
    if args.no_dem and args.combine == "mean":
        raise ValueError(
            "--combine mean averages the DEM's tokens with the thumbnail's, but --no-dem turns the DEM off; "
            "use --combine concat (the default with --no-dem) or none."
        )
    check_backbone(args.backbone, weights=not args.weights)  # --weights replaces the folder's
    if args.weights:
        hf = args.backbone.partition(":")[0] in ("hf", "transformers")
        check_weights(args.weights, "--weights", folder="hf" if hf else "checkpoint")
    if args.dem_weights:
        check_weights(args.dem_weights, getattr(args, "dem_flag", "--dem-weights"), folder="shards")


def build_encoder(args, grid, max_tiles: int, fit: Fit = "resize", tile_size: int | None = None):
    """A :class:`HighResEncoder` from CLI flags; released INF-LLaVA resampling (bicubic, no antialias).

    The inputs are checked first (:func:`check_encoder_inputs`)."""
    from ..backbones import create_backbone
    from ..encoder import HighResEncoder
    from ..modules.dual_crop import DualPerspectiveCrop
    from ..pretrained.inf_llava import load_dem

    check_encoder_inputs(args)
    kw: dict[str, Any] = {}
    if tile_size is not None and args.backbone.startswith("timm:"):
        kw["img_size"] = tile_size  # timm ViTs are built at the tile size the crops use
    backbone = create_backbone(args.backbone, pretrained=args.weights, layer=args.layer, **kw)
    dem = None
    if not args.no_dem:
        dem = load_dem(args.dem_weights) if args.dem_weights else "default"
    crop = DualPerspectiveCrop(
        grid=grid, tile_size=backbone.image_size, max_tiles=max_tiles, fit=fit, mode="bicubic", antialias=False
    )
    enc = HighResEncoder(
        backbone,
        crop,
        dem=dem,
        combine=resolve_combine(args),
        max_batch=args.max_batch,
        encode_all=args.encode_all,
    )
    dtype = getattr(torch, args.dtype)
    return enc.to(device=args.device, dtype=dtype)


def _peak_memory(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (CUDA, torch.cuda.max_memory_allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process peak RSS)"


def weights_lines(args, enc) -> list[str]:
    """What was loaded, and from where: the backbone's weights (random, or the file or folder they came from,
    ``backbone.source``) and the DEM's (none, random, or the ``--dem-weights`` file)."""
    source = enc.backbone.source
    lines = [
        f"backbone     {args.backbone}: pretrained weights loaded from {source}"
        if source is not None
        else f"backbone     {args.backbone}: RANDOM weights (pass --weights PATH for meaningful features)"
    ]
    recipe = getattr(args, "recipe", DEFAULT_RECIPE)
    if enc.dem is None and recipe == DEFAULT_RECIPE:
        lines.append("DEM          none (--no-dem)")
    elif enc.dem is None:
        from .recipes import describe_recipe

        dcm = "dcm" in describe_recipe(recipe).names
        hint = " (--option dcm=true adds INF-LLaVA's strided views and DEM)" if dcm else ""
        lines.append(f"DEM          none{hint}")
    elif args.dem_weights:
        n = sum(p.numel() for p in enc.dem.parameters())
        lines.append(f"DEM          weights loaded from {args.dem_weights} ({n:,} parameters, width {enc.dem.dim})")
    elif recipe == DEFAULT_RECIPE:
        lines.append("DEM          RANDOM weights (pass --dem-weights PATH for the released INF-LLaVA DEM)")
    else:
        lines.append(f"DEM          RANDOM weights (dcm=True: a fresh DEM of width {enc.dem.dim}, to be trained)")
    return lines


def _describe(enc, out, b: int) -> list[str]:
    """INF-LLaVA's lines of image ``b``: its geometry, the sub-images encoded of ``2N+1``, the token layout."""
    geo = out.geometries[b]
    gh, gw = geo.grid
    n = gh * gw
    lines = [
        f"  geometry   {geo.input_size[1]}x{geo.input_size[0]} (W x H) -> grid {gh}x{gw} (N={n}), canvas "
        f"{geo.canvas_size[1]}x{geo.canvas_size[0]}, tiles {geo.tile_size[1]}x{geo.tile_size[0]}, "
        f"valid box {geo.valid_box}",
        f"  ViT passes {enc.num_backbone_passes(geo.input_size)} of {2 * n + int(enc.thumbnail)} "
        f"({n} local + {n} strided + {int(enc.thumbnail)} thumbnail; the rest never reach the tokens)",
        f"  tokens     {out.num_tokens[b]} x {out.tokens.shape[-1]}: " + _layout_text(out.layout[b]),
    ]
    return lines


def _layout_text(layout) -> str:
    parts = []
    for s in layout:
        text = f"{s.source} {s.length}"
        if s.shape:
            text += f" ({s.shape[0]}x{s.shape[1]}" + (f" + {s.shape[0]} newline slots)" if s.newline else ")")
        parts.append(text)
    return ", ".join(parts)


def describe_plan(enc, out, b: int) -> list[str]:
    """A recipe's lines of image ``b``: its plan (geometry, grid, the views through the ViT) and token layout."""
    if isinstance(enc.front_end, DualFrontEnd):
        return _describe(enc, out, b)
    geo, plan = out.geometries[b], (out.plans[b] if out.plans else enc.plan(out.geometries[b].input_size))
    (H, W), (gh, gw), (ch, cw) = geo.input_size, geo.grid, geo.canvas_size
    tiles = f", tiles {geo.tile_size[1]}x{geo.tile_size[0]}" if geo.tile_size else ""
    return [
        f"  plan       {W}x{H} (W x H) -> grid {gh}x{gw}, canvas {cw}x{ch}{tiles}, valid box {geo.valid_box}; "
        f"{plan.views} views through the ViT",
        f"  tokens     {out.num_tokens[b]} x {out.tokens.shape[-1]}: " + _layout_text(out.layout[b]),
    ]


def recipe_options(args, info) -> dict[str, Any]:
    """The options ``hrperc encode`` builds recipe ``info`` with: ``--option`` values (parsed by the recipe's
    option types), ``--layer`` / ``--max-batch``, and with ``inf_llava`` its flags (``--grid`` ... ``--dem-weights``;
    unset ones at the released values). An option given both as a flag and as ``--option``, or an inf_llava
    flag with another recipe, is a ``ValueError`` naming both."""
    from .recipes import parse_options

    options = parse_options(info, args.option)
    typed = set(options)  # the names given with --option (the flags are added below)
    flags: dict[str, tuple[str, Any]] = {}  # option -> (the flag, its value), for the flags that were given
    if args.layer is not None:
        flags["layer"] = ("--layer", args.layer)
    if args.max_batch != "auto":
        flags["max_batch"] = ("--max-batch", args.max_batch)
    inf_llava = {
        "grid": ("--grid", args.grid),
        "max_tiles": ("--max-tiles", args.max_tiles),
        "fit": ("--fit", args.fit),
        "combine": ("--combine", args.combine),
        "encode_all": ("--encode-all", args.encode_all or None),
        "dem": ("--no-dem" if args.no_dem else "--dem-weights", None if args.no_dem else args.dem_weights),
    }
    given = {k: v for k, v in inf_llava.items() if v[1] is not None or (k == "dem" and args.no_dem)}
    if info.name != DEFAULT_RECIPE:
        for key, (flag, value) in given.items():
            text = "none" if value is None else f"{value[0]}x{value[1]}" if key == "grid" else value
            same = (
                f"--option {key}={str(text).lower() if isinstance(value, bool) else text} if {info.name}'s {key} is "
                f"what you mean"
                if key in info.names
                else f"the recipe's own options ({', '.join(info.names)})"
            )
            raise ValueError(
                f"{flag} is an inf_llava flag, but --recipe is {info.name!r}. Drop {flag}; use {same} "
                f"(hrperc recipes lists them)."
            )
    flags.update(given)
    for key, (flag, value) in flags.items():
        if key in options:
            raise ValueError(f"{flag} and --option {key}={options[key]!r} both set {key}; pass one of them.")
        options[key] = value
    if info.name == DEFAULT_RECIPE:
        for key, value in INF_LLAVA_FLAGS.items():
            options.setdefault(key, value)
        options.setdefault("layer", -2)
        no_dem = "dem" in options and options["dem"] is None
        options.setdefault("combine", "concat" if no_dem else "mean")
        dem = options.get("dem")
        if "dem" in typed and isinstance(dem, str) and dem != "default":  # checked and reported as --dem-weights
            args.dem_weights, args.dem_flag = dem, "--option dem"
        args.no_dem = no_dem
        # the canvas checks and their messages read the grid the encoder will use
        args.grid, args.max_tiles, args.fit = options["grid"], options["max_tiles"], options["fit"]
    return options


def refuse_native(info) -> None:
    """A native-resolution recipe runs on its model's own vision tower: refused, naming what to use."""
    if not info.native:
        return
    from .. import recipes
    from .recipes import describe_recipe

    tiling = [n for n in recipes.list_recipes() if not describe_recipe(n).native]
    raise ValueError(
        f"--recipe {info.name}: a native-resolution recipe (each image at its own size, {info.front_end}) that runs "
        f"on its model's own vision tower, which hrperc encode does not build from --backbone. In Python, pass the "
        f"model's vision tower, hrperc.create_encoder({info.name!r}, tower), or use "
        f"hrperc.integrations.transformers.encoder_from_model(model, processor); on the command line use a tiling "
        f"recipe ({', '.join(tiling)})."
    )


def build_recipe_encoder(args, info, options: dict[str, Any]):
    """Recipe ``info``'s encoder around ``--backbone`` (``--weights``), on ``--device`` in ``--dtype``."""
    from ..backbones import create_backbone
    from ..recipes import create_encoder

    layer = options.get("layer", -2)  # the backbone's default layer; the recipe's encoder reads its own
    backbone = create_backbone(args.backbone, pretrained=args.weights, layer=layer if isinstance(layer, int) else -2)
    enc = create_encoder(info.name, backbone, **options)
    return enc.to(device=args.device, dtype=getattr(torch, args.dtype))


def run_encode(args) -> int:
    from tqdm import tqdm

    from .recipes import describe_recipe
    from .save import check_save_path, image_record, save_tokens

    # Every input before the backbone is built (which can take a while): the images' headers, the recipe's
    # options, the --save folder, the weight files.
    sizes = [check_image_file(path, args.max_image_pixels) for path in args.images]
    info = describe_recipe(args.recipe)
    refuse_native(info)
    options = recipe_options(args, info)
    if args.save:
        check_save_path(args.save)
    inf_llava = info.name == DEFAULT_RECIPE
    if inf_llava:
        check_fixed_grid(args)
    check_encoder_inputs(args)
    enc = build_recipe_encoder(args, info, options)
    for path, size in zip(args.images, sizes):  # the canvas of every image, before any is encoded
        check_canvas(enc.crop, size, f"image file {path!r}", args, tile_flag=False, flags=inf_llava)
    for line in weights_lines(args, enc):
        print(line)
    if inf_llava:
        print(f"encoder      {enc.extra_repr()}; dem={'none' if enc.dem is None else 'released configuration'}")
    else:
        print(
            f"recipe       {info.name}: {type(enc.front_end).__name__}({enc.front_end.extra_repr()}), layer {enc.layer}"
        )
    totals: dict[str, float] = {}
    rows = []
    # The bar only on a terminal (disable=None), and closed on an error, so the error is one line of its own.
    with torch.inference_mode(), tqdm(args.images, desc="encode", unit="image", disable=None) as bar:
        for path in bar:
            image = read_image(path, args.max_image_pixels).to(args.device)
            t0 = time.perf_counter()
            out = enc(image, timings=True)
            wall = time.perf_counter() - t0
            tqdm.write(f"{path}")
            for line in describe_plan(enc, out, 0):
                tqdm.write(line)
            stages = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in out.timings.items())
            tqdm.write(f"  time (ms)  {stages}; total {wall * 1e3:.1f}")
            for k, v in out.timings.items():
                totals[k] = totals.get(k, 0.0) + v
            if args.save:
                rows.append(image_record(path, out))
    total = sum(totals.values()) or 1.0
    shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in totals.items())
    print(f"share        {shares}")
    print(f"peak memory  {_peak_memory(args.device)}")
    if args.save:
        meta = {"recipe": info.name, "options": options, "backbone": args.backbone, "weights": args.weights or ""}
        save_tokens(args.save, rows, meta)
        T = max(r["tokens"].shape[0] for r in rows)
        print(f"wrote        {args.save}: tokens ({len(rows)}, {T}, {enc.token_width}), token_mask, slot_mask, layout")
    return 0


def demo_encoder(args, image: torch.Tensor, out_dir: Path, enc=None) -> None:
    """The encoder half of ``hrperc demo``: run the whole front end, print it, draw the DEM attention.

    ``enc``: the encoder built from ``args`` (built here when not given)."""
    from ..ops.crop import local_merge
    from .attention_plot import dem_attention, plot_dem_attention
    from .plots import has_matplotlib

    if enc is None:
        enc = build_encoder(args, args.grid, args.max_tiles, tile_size=args.tile_size)
    backbone_line, *dem_lines = weights_lines(args, enc)
    bb = enc.backbone
    print(backbone_line)
    print(
        f"             patch {bb.patch_size[0]}, width {bb.hidden_size}, {bb.num_layers} layers, "
        f"{bb.num_prefix_tokens} prefix tokens (read off the model), layer {enc.layer}"
    )
    for line in dem_lines:
        print(line)
    with torch.inference_mode():
        out = enc(image.to(args.device), timings=True)
        for line in _describe(enc, out, 0):
            print(line)
        stages = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in out.timings.items())
        print(f"  time (ms)  {stages}")
        directions = [d for d in ("global", "local") if getattr(enc.dem, "directions", "both") in ("both", d)]
        if enc.dem is None or not directions:
            return
        # The picture needs every sub-image's tokens (skipped ones are zeros in the fast path).
        sub = enc.subimage_features(image.to(args.device), encode_all=True)
    geo = sub.crops.geometries[0]
    gh, gw = geo.grid
    n = gh * gw
    th, tw = bb.grid_size
    query = args.query or (gh * th // 2, gw * tw // 2)
    atts = [
        dem_attention(enc.dem, sub.local[:n].cpu(), sub.strided[:n].cpu(), geo.grid, (th, tw), query, d)
        for d in directions
    ]
    if not has_matplotlib():  # run_demo has said so, with the extra to install
        return
    canvas = local_merge(sub.crops.local[:n].float().cpu(), geo.grid)[0]
    path = out_dir / "attention.png"
    plot_dem_attention(canvas, atts, bb.patch_size, path=path)
    print(f"wrote        {path} (DEM attention of token {query}; random weights give diffuse maps)")
