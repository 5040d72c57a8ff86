"""The command line's input files, checked before any model is built.

Every path a command reads is checked first, cheaply: it exists, it is a file (or, where a folder is
accepted, a folder that holds what is needed), it is readable, and its header says what it should be:
an image's header opens in PIL (with ``verify()``, and PIL's decompression-bomb limit), a weight file's
first bytes are a format hrperc reads (``hrperc._weights.sniff``; a safetensors header is parsed
against the file size). Only then is the backbone built, which can take a while. Each refusal is an
``OSError`` or ``ValueError`` naming the flag and the file, with the fix; the command line prints it as one
line with exit code 2.

Example::

    >>> import pathlib, tempfile
    >>> from PIL import Image
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> Image.new("RGB", (90, 60)).save(folder / "img.png")
    >>> check_image_file(folder / "img.png")                        # (H, W), from the header
    (60, 90)
    >>> (folder / "page.safetensors").write_text("<html>rate limited</html>")
    25
    >>> check_weights(folder / "page.safetensors", "--dem-weights", folder="shards")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: --dem-weights: ...page.safetensors...
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

__all__ = [
    "pil_pixel_limit",
    "bomb_error",
    "check_image_file",
    "check_weights",
    "check_backbone",
    "check_out_dir",
]

# EXIF orientations that turn the picture a quarter (read_image applies them: height and width swap).
_QUARTER_TURNS = {5, 6, 7, 8}
_HF_FOLDER = ("config.json",)
_WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
    "model.pth",
)


@contextlib.contextmanager
def pil_pixel_limit(max_pixels: int | None):
    """``PIL.Image.MAX_IMAGE_PIXELS`` set to ``max_pixels`` inside (``None``: PIL's own, ``0``: no limit)."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels or None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def bomb_error(path, exc: Exception) -> ValueError:
    """PIL's decompression-bomb refusal of ``path`` as a ``ValueError`` naming the file, the limit and the flag."""
    from PIL import Image

    found = re.search(r"\((\d+) pixels\)", str(exc))
    count = found.group(1) if found else "N"
    return ValueError(
        f"image file {str(path)!r}: PIL refused it as a possible decompression bomb ({str(exc).rstrip('.')}). "
        f"The limit is twice PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}; if you trust the file, pass "
        f"--max-image-pixels {count} (its pixel count; 0 for no limit)."
    )


def _readable_file(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist. Check the path.")
    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a directory, not a file. Pass the file inside it.")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{what} {str(path)!r} is not readable (permission denied). Check its permissions.")


def check_image_file(path, max_pixels: int | None = None) -> tuple[int, int]:
    """``(H, W)`` of the image at ``path`` as :func:`~hrperc.cli.args.read_image` will return it (EXIF
    orientation applied), from its header; nothing is decoded.

    Refuses a missing path (``FileNotFoundError``), a folder (``IsADirectoryError``), an unreadable file
    (``PermissionError``), a file PIL does not recognise or whose structure is broken (``OSError``) and
    a decompression bomb under ``max_pixels`` (``ValueError``, as ``read_image``), each naming the file.
    """
    from PIL import Image

    path = Path(path)
    _readable_file(path, "image file")
    with pil_pixel_limit(max_pixels):  # the message of a refusal names the limit of this run
        try:
            with Image.open(path) as im:  # the structure (PNG: every chunk and its checksum), without decoding
                im.verify()  # (PIL allows it only directly after open)
            with Image.open(path) as im:  # reads the header; PIL's decompression-bomb check is here
                W, H = im.size
                try:
                    orientation = im.getexif().get(0x0112)
                except Exception:  # an unreadable EXIF block: read_image ignores it too
                    orientation = None
        except Image.DecompressionBombError as exc:
            raise bomb_error(path, exc) from exc
        except (OSError, SyntaxError, EOFError, ValueError) as exc:  # UnidentifiedImageError is an OSError
            raise OSError(
                f"image file {str(path)!r} cannot be read as an image ({type(exc).__name__}: {exc}): it is "
                f"truncated, corrupt or not an image format PIL reads. Check the file (re-download or re-export "
                f"it), or pass another image."
            ) from exc
    return (W, H) if orientation in _QUARTER_TURNS else (H, W)


def _sniff_file(path: Path, flag: str) -> None:
    """The weight reader's own check of a file's first bytes (and of a safetensors header), naming ``flag``."""
    from .._errors import add_context
    from .._weights import safetensors_header, sniff

    try:
        if sniff(path) == "safetensors":
            safetensors_header(path)
    except (OSError, ValueError) as err:  # the reader names the file; the flag it came from is named here, once
        add_context(err, flag)
        raise


def _sniff_hf_folder(folder: Path, flag: str) -> None:
    """The safetensors files of a ``save_pretrained`` folder (``model.safetensors`` or its shards), each
    header checked against its file size: transformers' loader would stop on a truncated or foreign one
    with a message that names no file."""
    for f in sorted(folder.glob("*.safetensors")):
        if f.is_file():
            _sniff_file(f, flag)


def check_weights(path, flag: str, *, folder: str) -> None:
    """Check the weights named by ``flag`` (``--weights``, ``--dem-weights``) before any model is built.

    ``folder``: what a folder must hold to be accepted: ``"shards"`` (``*.safetensors`` / ``*.bin`` /
    ``*.pt`` / ``*.pth`` or a shard index, as ``load_dem`` reads), ``"checkpoint"`` (one of the file
    names the timm / open_clip loaders look for), ``"hf"`` (a ``save_pretrained`` folder, ``config.json``).
    A file is checked by the weight reader's header sniffing; with ``folder="hf"`` a file is refused.
    """
    p = Path(path).expanduser()
    drop = f"Check the path, or drop {flag} for random weights."
    if not p.exists():
        raise FileNotFoundError(f"{flag} {str(path)!r} does not exist. {drop}")
    if not os.access(p, os.R_OK):
        raise PermissionError(f"{flag} {str(path)!r} is not readable (permission denied). Check its permissions.")
    if p.is_dir():
        if folder == "hf":
            if not (p / "config.json").is_file():
                raise FileNotFoundError(
                    f"{flag} {str(path)!r} is a folder without config.json; an hf: backbone loads a save_pretrained "
                    f"folder (config.json and model.safetensors). Pass that folder. {drop}"
                )
            _sniff_hf_folder(p, flag)
            return
        if folder == "checkpoint":
            found = [p / n for n in _WEIGHT_NAMES if (p / n).is_file()]
            if not found:
                raise FileNotFoundError(
                    f"{flag} {str(path)!r} is a folder without a checkpoint ({', '.join(_WEIGHT_NAMES)}). Pass the "
                    f"weight file itself."
                )
            _sniff_file(found[0], flag)
            return
        indexes = [p / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json") if (p / n).is_file()]
        shards = sorted(f for ext in ("safetensors", "bin", "pt", "pth") for f in p.glob(f"*.{ext}") if f.is_file())
        if not indexes and not shards:
            raise FileNotFoundError(
                f"{flag} {str(path)!r} is a folder without weights (no *.safetensors, *.bin, *.pt, *.pth or "
                f"*.index.json). Pass the weight file, or the folder of checkpoint shards. {drop}"
            )
        for shard in shards if not indexes else []:
            _sniff_file(shard, flag)
        return
    if folder == "hf":
        raise NotADirectoryError(
            f"{flag} {str(path)!r} is a file; an hf: backbone loads a save_pretrained folder (config.json and "
            f"model.safetensors). Pass that folder."
        )
    _sniff_file(p, flag)


def check_backbone(name: str, *, weights: bool = True) -> None:
    """Check the folder of an ``hf:<dir>`` backbone that names a local path (a hub id in the local cache
    is left to transformers), before anything is built: ``config.json``, and with ``weights`` (the folder's
    weights are loaded: no ``--weights``) the header of each ``*.safetensors`` file in it."""
    family, _, rest = name.partition(":")
    if family not in ("hf", "transformers") or not rest:
        return
    p = Path(rest).expanduser()
    looks_local = p.is_absolute() or rest.startswith((".", "~")) or p.exists()
    if not looks_local:
        return
    if not p.exists():
        raise FileNotFoundError(
            f"--backbone {name!r}: the folder {rest!r} does not exist. Check the path (an hf: backbone is a "
            f"save_pretrained folder with config.json)."
        )
    if not p.is_dir():
        raise NotADirectoryError(
            f"--backbone {name!r}: {rest!r} is a file; an hf: backbone is a save_pretrained folder (config.json and "
            f"model.safetensors). Pass that folder."
        )
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"--backbone {name!r}: the folder {rest!r} has no config.json. Pass the folder save_pretrained wrote."
        )
    if weights:
        _sniff_hf_folder(p, f"--backbone {name!r}")


def check_out_dir(path) -> None:
    """``--out``: a folder, or a path where one can be created (no file in the way; a writable parent)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(f"--out {str(path)!r} is a file, not a folder. Pass a folder for the pictures.")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(
            f"--out {str(path)!r}: {str(existing)!r} is a file, so the folder cannot be created. Pass another --out."
        )
    if not os.access(existing, os.W_OK):
        raise PermissionError(
            f"--out {str(path)!r}: {str(existing)!r} is not writable (permission denied). Pass another --out."
        )
