"""How much work a command takes on, bounded before anything is allocated.

The work of ``hrperc demo`` / ``hrperc encode`` grows with the canvas, ``grid x tile`` pixels: the resized
image, the ``2N + 1`` sub-images cut from it and the ViT tokens all scale with it. A canvas is bounded by
what the image needs: it may upsample the image 4x a side (:data:`UPSAMPLE_AREA` times its pixels), any
image may use :data:`CANVAS_FLOOR` pixels (a 2048 x 2048 canvas holds every usual grid of usual tiles), and
no canvas is larger than :data:`MAX_CANVAS_PIXELS` (about 1.6 GB of float32 crops). ``--max-canvas-pixels N``
replaces that limit for a run (0: no limit). ``--tile-size`` is at most :data:`MAX_TILE_SIZE` (a timm ViT is
built at that size; real ViT tiles are 224 to 1024 pixels). Each refusal is one line naming the flag, the
value, the limit and the fix; the command line prints it with exit code 2.

Example::

    >>> from hrperc.cli.limits import canvas_limit
    >>> canvas_limit((1008, 1344)), canvas_limit((60, 90)), canvas_limit((9000, 9000))
    (21676032, 4194304, 33554432)
    >>> canvas_limit((60, 90), max_canvas_pixels=0) is None                  # --max-canvas-pixels 0: no limit
    True
"""

from __future__ import annotations

__all__ = [
    "MAX_TILE_SIZE",
    "MAX_CANVAS_PIXELS",
    "CANVAS_FLOOR",
    "UPSAMPLE_AREA",
    "MAX_DRAWN_TILES",
    "canvas_limit",
    "check_canvas",
    "check_fixed_grid",
    "check_query",
]

#: Largest ``--tile-size`` (pixels a side).
MAX_TILE_SIZE = 2048
#: Largest canvas (pixels) for any image, unless ``--max-canvas-pixels`` says otherwise.
MAX_CANVAS_PIXELS = 1 << 25
#: Canvas pixels any image may use, however small it is.
CANVAS_FLOOR = 1 << 22
#: Canvas pixels per image pixel allowed above the floor (4x upsampling a side).
UPSAMPLE_AREA = 16
#: Most tiles per view that ``crops.png`` draws (one small picture each); larger grids skip the picture.
MAX_DRAWN_TILES = 64


def canvas_limit(image_size, max_canvas_pixels: int | None = None) -> int | None:
    """Most canvas pixels for an ``(H, W)`` image; ``None`` for no limit (``max_canvas_pixels=0``).

    ``max_canvas_pixels`` (``--max-canvas-pixels``): ``None`` for the default
    ``min(MAX_CANVAS_PIXELS, max(CANVAS_FLOOR, UPSAMPLE_AREA * H * W))``, else that many pixels.
    """
    if max_canvas_pixels is not None:
        return max_canvas_pixels or None
    H, W = image_size
    return min(MAX_CANVAS_PIXELS, max(CANVAS_FLOOR, UPSAMPLE_AREA * H * W))


def _grid_text(grid) -> str:
    return grid if isinstance(grid, str) else f"{grid[0]}x{grid[1]}"


def check_canvas(crop, image_size, source: str, args, *, tile_flag: bool, flags: bool = True) -> None:
    """Refuse (``ValueError``) an image whose canvas under ``crop`` is over :func:`canvas_limit`.

    ``crop``: the :class:`~hrperc.DualPerspectiveCrop` that will cut it, or a recipe's front end (only its
    ``plan`` runs: no pixel is touched); ``image_size``: ``(H, W)``; ``source``: the image's name for the
    message; ``args``: the parsed flags (``grid``, ``max_tiles``, ``max_canvas_pixels``, and ``fit`` where
    the command has it);
    ``tile_flag``: whether ``--tile-size`` sets the tile (then the fix names it); ``flags``: whether
    ``--grid`` / ``--max-tiles`` / ``--fit`` set the grid (INF-LLaVA's crop; else a recipe's front end, whose
    options do, and ``crop`` is that front end).
    """
    H, W = image_size
    geo = crop.plan((H, W))
    geo = getattr(geo, "geometry", geo)  # a front end's plan holds its CropGeometry
    (gh, gw), (th, tw), (ch, cw) = geo.grid, geo.tile_size, geo.canvas_size
    pixels = ch * cw
    limit = canvas_limit((H, W), args.max_canvas_pixels)
    if limit is None or pixels <= limit:
        return
    if args.max_canvas_pixels is not None:
        why = f"--max-canvas-pixels {args.max_canvas_pixels}"
    elif limit == MAX_CANVAS_PIXELS:
        why = f"the cap for any image, {MAX_CANVAS_PIXELS:,}"
    else:
        why = f"{UPSAMPLE_AREA}x the image's {H * W:,} pixels, at least {CANVAS_FLOOR:,}: 4x upsampling a side"
    fit = getattr(args, "fit", "resize")
    if not flags:
        fix = "recipe options that give a smaller canvas (fewer or smaller tiles; hrperc recipes lists them)"
    elif args.grid == "auto" and fit != "pad":
        fix = "a smaller --max-tiles"
    elif fit == "pad":
        fix = "--fit resize (it scales the image to a grid within --max-tiles)"
    else:
        fix = "a smaller --grid (or --grid auto, which picks the grid the image needs)"
    if tile_flag:
        fix += " or a smaller --tile-size"
    setting = f" with --grid {_grid_text(args.grid)}" if flags else ""
    raise ValueError(
        f"{source} ({W}x{H}, W x H){setting} gets a {gh}x{gw} grid of {tw}x{th} tiles: "
        f"a {cw}x{ch} canvas of {pixels:,} pixels, over the limit of {limit:,} for this image ({why}). Use {fix}; "
        f"if you have the memory, pass --max-canvas-pixels {pixels} (0: no limit)."
    )


def check_fixed_grid(args) -> None:
    """Refuse a fixed ``--grid`` with more tiles than ``--max-tiles``, naming both flags (before any model)."""
    if isinstance(args.grid, str):
        return
    gh, gw = args.grid
    if gh * gw > args.max_tiles:
        raise ValueError(
            f"--grid {gh}x{gw} has {gh * gw} tiles, over --max-tiles {args.max_tiles}. Use a smaller --grid, or "
            f"pass --max-tiles {gh * gw} to allow it."
        )


def check_query(query, grid, tokens_per_tile) -> None:
    """Refuse a ``--query ROW,COL`` outside the ``(gh*ht, gw*wt)`` token map, before the encoder runs."""
    if query is None:
        return
    (gh, gw), (th, tw) = grid, tokens_per_tile
    rows, cols = gh * th, gw * tw
    r, c = query
    if not (0 <= r < rows and 0 <= c < cols):
        raise ValueError(
            f"--query {r},{c} is outside the {rows}x{cols} token map of this image (grid {gh}x{gw}, {th}x{tw} "
            f"tokens a tile). Pass --query ROW,COL with 0 <= ROW < {rows} and 0 <= COL < {cols}, e.g. "
            f"--query {rows // 2},{cols // 2}."
        )
