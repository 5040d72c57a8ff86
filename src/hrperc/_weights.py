"""Reading one weight file safely, routed by its content (its first bytes), never by its name.

Shared by ``pretrained/`` (released checkpoints) and ``backbones/`` (ViT checkpoints); imports nothing
of hrperc. Each format is recognised by a complete test, in this order (:func:`sniff`):

=================================================  =================================================
content                                            read as
=================================================  =================================================
8-byte little-endian header length ``n`` that      safetensors (the header is checked before any
fits in the file, then ``n`` bytes of a JSON       tensor is read: its length against the file size,
object ``{...}`` of well-formed tensor entries     every tensor's byte range against the data that is
                                                   really there)
``PK\\x03\\x04``                                   a torch zip file, ``torch.load(weights_only=True)``
``0x80 <2..5>`` (pickle PROTO opcode)             a legacy torch file, ``torch.load(weights_only=True)``
``{`` after 8 bytes, failing the test above        a broken safetensors file: refused, saying why
anything else, or an empty file                    refused, naming the file
=================================================  =================================================

The safetensors test comes first because its length prefix may begin with any byte: a header of
``0xb80`` bytes starts the file with ``0x80``, the pickle opcode, and is still safetensors.

A torch file that ``weights_only=True`` cannot read holds pickled objects other than tensors; hrperc does
not execute them, and the message says how to convert the file to safetensors in a trusted environment.
Every error is a ``ValueError`` (``IsADirectoryError`` for a directory, ``FileNotFoundError`` for a
missing path) whose message names the file.

A checkpoint wrapped in a dict (Lightning's ``{"state_dict": ...}``, ``{"model": ...}``, DeepSpeed's
``{"module": ...}``, ``{"model_state_dict": ...}``) is unwrapped by :func:`unwrap`.

Example::

    >>> import pathlib, tempfile
    >>> from safetensors.torch import save_file
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "weights.bin"          # a safetensors file, named .bin
    >>> save_file({"w": torch.zeros(2)}, str(path))
    >>> sniff(path), list(read_weights(path))
    ('safetensors', ['w'])
    >>> list(unwrap({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}))   # a Lightning checkpoint
    ['w']
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

__all__ = ["read_weights", "sniff", "safetensors_header", "unwrap", "WRAPPER_KEYS", "MAX_HEADER_BYTES"]

#: Keys whose value is the real state dict in a wrapped checkpoint, in order of preference.
WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")
#: Largest safetensors header accepted (the safetensors library's own limit).
MAX_HEADER_BYTES = 100_000_000

_REFETCH = "Check the download and fetch the file again."
_CONVERT = (
    "hrperc does not execute pickled code. If you trust the file, convert it to safetensors in a trusted "
    'environment: python -c "import torch; from safetensors.torch import save_file; '
    "sd = torch.load('{path}', weights_only=False); save_file({{k: v.contiguous() for k, v in sd.items()}}, "
    "'{out}')\", then pass the .safetensors file."
)


def sniff(path: Path) -> str:
    """``"safetensors"``, ``"torch-zip"`` or ``"torch-pickle"`` from the file's content; refuse anything else.

    Each format is recognised by a complete test, in this order: a **safetensors** file is one whose
    first 8 bytes (little-endian) declare a header length ``n`` that fits in the file and whose next
    ``n`` bytes are a JSON object of well-formed tensor entries (as :func:`safetensors_header` checks);
    a **torch zip** file (``torch.save``'s default) starts with the zip magic ``PK\\x03\\x04``; a
    **pickle** (legacy ``torch.save``) is what is left when it starts with the pickle opcode ``PROTO``
    (``0x80``, then a protocol number from 2 up).
    The header length is never mistaken for an opcode: a valid safetensors file whose length has the
    low byte ``0x80`` (one in 32 of them) is safetensors. A file with ``{`` after its first 8 bytes that
    fails the safetensors test (truncated, corrupt) is still routed to ``"safetensors"``, so that
    :func:`safetensors_header` says what is wrong with it.
    """
    return _route(path)[0]


def _route(path: Path) -> tuple[str, dict | None]:
    """:func:`sniff`'s answer, with the checked header ``{key: (dtype, shape)}`` of a valid safetensors file
    (``None`` for other kinds and for a broken safetensors file)."""
    if path.is_dir():
        raise IsADirectoryError(
            f"{str(path)!r} is a directory, not a weight file. Pass the weight file inside it (e.g. "
            f"{str(path / 'model.safetensors')!r}) or, where a directory of shards is accepted, the folder itself."
        )
    if not path.exists():
        raise FileNotFoundError(f"weight file {str(path)!r} does not exist. Check the path.")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"weight file {str(path)!r} is empty (0 bytes). " + _REFETCH)
    with open(path, "rb") as f:
        head = f.read(9)
        f.seek(0)
        try:  # the complete safetensors test first: its length prefix may start with any byte (0x80, 'P', ...)
            return "safetensors", _read_header(f, size, path)
        except ValueError:
            pass
    if head[:4] == b"PK\x03\x04":
        return "torch-zip", None
    if head[8:9] == b"{" or size == 8:  # a broken safetensors file: safetensors_header says what is wrong
        return "safetensors", None
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:
        return "torch-pickle", None  # PROTO <n>: how every pickle of protocol 2+ (legacy torch.save) starts
    raise ValueError(
        f"{str(path)!r} ({size} bytes, starting {head[:8]!r}) is neither a safetensors file (8-byte header "
        "length, then a JSON header '{...}') nor a torch file (zip 'PK' or pickle 0x80 <protocol>). Check that it is "
        "a weight file (not an HTML error page or an unfinished download) and pass a .safetensors file."
    )


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{key: (dtype, shape)}`` from a safetensors file's header, without reading any tensor.

    The header length is checked against the file size (a truncated file, a file holding only the 8-byte
    length, a length of ``2**62`` are refused), the header must be a JSON object (``{...}``, padding
    spaces allowed) whose entries each have a ``dtype`` string, a ``shape`` list of non-negative ints and
    ``data_offsets`` ``[begin, end]`` inside the data that is really there (``__metadata__`` a mapping of
    strings). Anything else is a ``ValueError`` naming the file.
    """
    with open(path, "rb") as f:
        return _read_header(f, path.stat().st_size, path)


def _read_header(f, size: int, path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """:func:`safetensors_header` on an open file at offset 0 (``ValueError`` naming ``path`` when it is not one)."""
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError(
            f"safetensors file {str(path)!r} has {size} bytes, fewer than the 8-byte header length: it is "
            "truncated. " + _REFETCH
        )
    n = int.from_bytes(raw, "little")
    if size == 8:
        raise ValueError(
            f"safetensors file {str(path)!r} holds only its 8-byte header length ({n}) and no header: it "
            "is truncated. " + _REFETCH
        )
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise ValueError(
            f"safetensors file {str(path)!r} declares a {n}-byte header, but the file has {size} bytes "
            f"(the limit is {MAX_HEADER_BYTES}): it is truncated or corrupt. " + _REFETCH
        )
    if n < 2:  # the shortest JSON object, '{}'
        raise ValueError(
            f"safetensors file {str(path)!r} declares a {n}-byte header, too short for a JSON object: it is "
            "corrupt. " + _REFETCH
        )
    if f.read(1) != b"{":  # checked before the (up to MAX_HEADER_BYTES) header is read
        raise ValueError(
            f"safetensors file {str(path)!r} declares a {n}-byte header that does not start with '{{' (a JSON "
            "object). Check that it is a safetensors file, or fetch it again."
        )
    try:
        header = json.loads(b"{" + f.read(n - 1))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(
            f"safetensors file {str(path)!r} has an unreadable {n}-byte header ({exc}). Check that it is a "
            "safetensors file, or fetch it again."
        ) from exc
    if not isinstance(header, dict):
        raise ValueError(f"safetensors file {str(path)!r} has a header that is not a JSON object. " + _REFETCH)
    data = size - 8 - n
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            if not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise ValueError(
                    f"safetensors file {str(path)!r}: its '__metadata__' ({info!r:.80}) is not a mapping of "
                    "strings. " + _REFETCH
                )
            continue
        entry = _tensor_entry(info)
        if entry is None:
            raise ValueError(
                f"safetensors file {str(path)!r}: the header entry of {key!r} is malformed ({info!r:.80}); "
                "each needs 'dtype' (a string), 'shape' (non-negative ints) and 'data_offsets' [begin, end]. "
                + _REFETCH
            )
        dtype, shape, (begin, end) = entry
        if not 0 <= begin <= end <= data:
            raise ValueError(
                f"safetensors file {str(path)!r}: tensor {key!r} {shape} needs bytes {begin}..{end} of the data, "
                f"but the file holds {data} data bytes: it is truncated or corrupt. " + _REFETCH
            )
        out[key] = (dtype, shape)
    return out


def _tensor_entry(info) -> tuple[str, tuple[int, ...], tuple[int, int]] | None:
    """``(dtype, shape, (begin, end))`` of a well-formed header entry, else None."""

    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not isinstance(info, dict):
        return None
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list):
        return None
    if not all(is_int(s) and s >= 0 for s in shape) or len(offsets) != 2 or not all(map(is_int, offsets)):
        return None
    return dtype, tuple(shape), (offsets[0], offsets[1])


def read_weights(path: Path, *, keep: Callable[[str], bool] | None = None, allow_pickle: bool = False) -> dict:
    """Read one weight file (routed by :func:`sniff`); from safetensors only the ``keep`` keys are read.

    Returns what the file holds: a safetensors file gives ``{key: tensor}``; a torch file gives the
    loaded object (a dict, possibly wrapped: see :func:`unwrap`).
    """
    kind, header = _route(path)
    if kind == "safetensors":
        if header is None:  # not a valid one: this names what is wrong (truncated, not JSON, ...)
            header = safetensors_header(path)
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in header if keep is None or keep(k)}
        except Exception as exc:  # SafetensorError and friends: name the file
            raise ValueError(
                f"safetensors file {str(path)!r} could not be read ({exc}). It is corrupt or truncated. " + _REFETCH
            ) from exc
    if kind == "torch-zip":
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ValueError(
                f"{str(path)!r} starts like a zip (torch) file but is truncated or corrupt ({exc}). " + _REFETCH
            ) from exc
        if not any(n.endswith("data.pkl") for n in names):
            raise ValueError(
                f"{str(path)!r} is a zip file but not a torch checkpoint (no data.pkl; it holds "
                f"{names[:3]}, e.g. a NumPy .npz). Convert it to a safetensors state dict and pass that file."
            )
    try:
        with open(path, "rb") as f:  # a file object: torch.load itself would route a '*.safetensors' name
            obj = torch.load(f, map_location="cpu", weights_only=not allow_pickle)
    except Exception as exc:  # torch raises UnpicklingError subclasses that vary by version
        if allow_pickle:
            raise
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) or "magic number" in text:
            # torch's own text advises weights_only=False; keep only the line that says what was refused
            lines = [ln.strip() for ln in text.splitlines() if "Unsupported" in ln or "Unpickler error" in ln]
            what = lines[0].split(" Please")[0][:200] if lines else type(exc).__name__  # not torch's advice
            what = "not a torch file" if "magic number" in text else what
            raise ValueError(
                f"{str(path)!r} is a pickle that torch.load(weights_only=True) cannot read ({what}): it holds "
                "objects other than tensors, or is not a torch file. "
                + _CONVERT.format(path=path, out=_converted_name(path))
            ) from exc
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        raise ValueError(
            f"torch file {str(path)!r} is truncated or corrupt ({type(exc).__name__}: {first}). " + _REFETCH
        ) from exc
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"{str(path)!r} holds a {type(obj).__name__}, not a state dict (a dict of name -> tensor). Save "
            "model.state_dict() instead and pass that file."
        )
    return dict(obj)


def _converted_name(path: Path) -> Path:
    out = path.with_suffix(".safetensors")
    return out if out != path else path.with_name(path.stem + ".converted.safetensors")


def unwrap(sd: Mapping, *, where: str = "the checkpoint", keep: Callable[[str], bool] | None = None) -> dict:
    """Return the state dict inside a wrapped checkpoint, or ``sd`` itself when it is one already.

    A dict with entries other than tensors whose ``"state_dict"`` / ``"model"`` / ``"module"`` /
    ``"model_state_dict"`` entry is a dict of tensors is unwrapped (the first of those keys present).
    ``keep(key)`` then selects keys; entries that are not tensors among those left are refused, naming
    the keys to use.
    """
    sd = dict(sd)
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        for key in WRAPPER_KEYS:
            inner = sd.get(key)
            if isinstance(inner, Mapping) and inner and any(isinstance(v, torch.Tensor) for v in inner.values()):
                sd = dict(inner)
                break
    if keep is not None:
        sd = {k: v for k, v in sd.items() if keep(k)}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        nested = [k for k in bad if isinstance(sd[k], Mapping)]
        hint = (
            f"Its entries {nested[:5]} are dicts: if one of them holds the weights, pass ckpt[{nested[0]!r}] "
            f"(hrperc unwraps {list(WRAPPER_KEYS)} itself). "
            if nested
            else "Pass model.state_dict(), or drop the non-tensor entries first. "
        )
        raise TypeError(
            f"{where} is not a state dict: entries {bad[:5]} are not tensors ({type(sd[bad[0]]).__name__} for "
            f"{bad[0]!r}); a state dict maps names to tensors. {hint}".rstrip()
        )
    return sd
