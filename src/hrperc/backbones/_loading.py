"""Strict loading of a backbone checkpoint, for every family: where the file is, reading it, fitting it.

The family modules (``timm_vit``, ``open_clip_vit``, ``hf_vit``) decide how a checkpoint is converted
for their models; whether it then fits is decided here, once:

- :func:`checkpoint_path`: ``pretrained=`` as a local file (a folder: the checkpoint inside it); a
  missing path says how to fetch the weights, since hrperc never downloads;
- :func:`read_checkpoint`: the state dict in a file, read by hrperc's safe reader (``hrperc._weights``:
  the format from the file's content, torch files with ``weights_only=True``, wrappers removed), without
  a DistributedDataParallel ``module.`` prefix;
- :func:`load_strict`: ``model.load_state_dict`` after checking missing keys, unexpected keys, shape
  mismatches, integer weights for float parameters and NaN / Inf, all listed in one ``ValueError``
  naming the file (``strict=False``: the tensors that fit load, a ``UserWarning`` lists the rest);
- :func:`check_loading_info`: the same rule applied to what ``from_pretrained(output_loading_info=True)``
  reports (transformers loads the file itself).

Example::

    >>> import torch
    >>> model = torch.nn.Linear(2, 3)
    >>> load_strict(model, {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}, "demo.safetensors",
    ...             strict=True, what="a Linear")
    True
    >>> load_strict(model, {"weight": torch.ones(3, 3)}, "demo.safetensors", strict=True,
    ...             what="a Linear")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the checkpoint 'demo.safetensors' does not fit a Linear (1 of 2 model keys match): 1 missing ...
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .._weights import read_weights, unwrap

__all__ = ["missing_package", "checkpoint_path", "read_checkpoint", "load_strict", "check_loading_info", "short"]

# Errors get the public function's name at its boundary (hrperc._errors.public); warnings pass no boundary, and
# every checkpoint these helpers warn about was handed to this one public function.
_WARNED_BY = "create_backbone"

# What ``pretrained=<folder>`` loads: the first of these the folder holds.
_FOLDER_CHECKPOINTS = (
    "open_clip_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
    "model.pth",
)


def missing_package(package: str, pip: str) -> ImportError:
    """The error for a family whose library is not installed, with the command that installs it."""
    return ImportError(f"this backbone needs the '{package}' package, which is not installed. Run: pip install {pip}")


def short(keys: Iterable, n: int = 6) -> str:
    """The first ``n`` of ``keys`` as a list, and how many more there are."""
    keys = list(keys)
    return str(keys[:n])[:-1] + (f", ... (+{len(keys) - n} more)]" if len(keys) > n else "]")


def checkpoint_path(pretrained, what: str) -> str | None:
    """``pretrained=`` as the path of a local checkpoint file (``None`` stays ``None``: random weights).

    A folder gives the first of ``open_clip_model.safetensors``, ``model.safetensors``,
    ``open_clip_pytorch_model.bin``, ``pytorch_model.bin``, ``model.pth`` in it. ``what`` names the
    model in the messages (``"timm model 'vit_large_patch14_clip_336'"``).
    """
    if pretrained is None:
        return None
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"pretrained={pretrained!r}; expected None or a local file path (str or Path).")
    path = Path(pretrained).expanduser()
    if path.is_dir():
        for name in _FOLDER_CHECKPOINTS:
            if (path / name).is_file():
                return str(path / name)
        raise FileNotFoundError(
            f"pretrained={str(pretrained)!r} is a folder without a checkpoint (model.safetensors, "
            f"pytorch_model.bin, ...). Point pretrained= at the weights file of {what}."
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained={str(pretrained)!r} does not exist. hrperc never downloads weights: fetch the "
            f"checkpoint of {what} yourself (e.g. `huggingface-cli download <repo> --local-dir DIR`) and pass "
            f"its local path, or pretrained=None for random weights."
        )
    return str(path)


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: content-routed, unwrapped, without a DistributedDataParallel ``module.`` prefix."""
    sd = unwrap(read_weights(Path(path)), where=repr(path))
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_strict(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    path: str,
    *,
    strict: bool,
    what: str,
    stacklevel: int = 5,
) -> bool:
    """Load ``sd`` (already converted by the family) into ``model``. Strict: refuse any misfit in one ``ValueError``
    naming ``path`` and ``what``; ``strict=False``: load what fits and warn (``UserWarning``) about the rest.

    Returns whether any tensor was loaded. ``stacklevel`` points the warning at the code that called
    ``create_backbone`` (the default: past this function, the family's ``create``, ``create_backbone`` and its
    public boundary).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    common = [k for k in own if k in sd]
    mismatched = [k for k in common if tuple(sd[k].shape) != tuple(own[k].shape)]
    not_float = [
        k for k in common if k not in mismatched and own[k].is_floating_point() and not sd[k].is_floating_point()
    ]
    nonfinite = [
        k
        for k in common
        if k not in mismatched and k not in not_float and sd[k].is_floating_point() and not torch.isfinite(sd[k]).all()
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys {short(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys {short(unexpected)}")
    if mismatched:
        shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:4]]
        problems.append(f"{len(mismatched)} shape mismatches [{'; '.join(shapes)}]")
    if not_float:
        problems.append(f"{len(not_float)} integer/bool tensors for float weights {short(not_float)}")
    if nonfinite:
        problems.append(f"{len(nonfinite)} tensors holding NaN or Inf {short(nonfinite)}")
    if problems and strict:
        raise ValueError(
            f"the checkpoint {path!r} does not fit {what} ({len(common)} of {len(own)} model keys match): "
            f"{', '.join(problems)}. Check that the file holds the weights of this model (same architecture and "
            "size) and pick the matching model name; pass strict=False only to load the keys that fit and leave "
            "the rest random."
        )
    skip = set(mismatched) | set(not_float) | set(nonfinite)
    fit = {k: v for k, v in sd.items() if k in own and k not in skip}
    if problems:
        random = sorted(set(missing) | skip)
        warnings.warn(
            f"{_WARNED_BY}: strict=False: loaded {len(fit)} of {len(own)} tensors of {what} from {path!r}; "
            f"{len(random)} stayed random {short(random)}; {len(unexpected)} checkpoint keys were ignored "
            f"{short(unexpected)}. Use the checkpoint of this model for all of them.",
            UserWarning,
            stacklevel=stacklevel,
        )
    model.load_state_dict(fit, strict=False)
    return bool(fit)


def check_loading_info(
    info: Mapping,
    where: str,
    cls_name: str,
    *,
    strict: bool,
    ignore: tuple[str, ...] = (),
    stacklevel: int = 5,
) -> None:
    """The strict rule for a model that loaded its own checkpoint: ``info`` is transformers' loading info
    (``missing_keys``, ``unexpected_keys``, ``mismatched_keys``); unexpected keys starting with ``ignore``
    are expected (another tower of a full checkpoint). Strict: any misfit is a ``ValueError`` naming
    ``where``; ``strict=False``: a ``UserWarning`` lists the tensors that stayed random."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [
        f"{m[0]}: checkpoint {tuple(m[1])} vs model {tuple(m[2])}" if isinstance(m, tuple) and len(m) == 3 else str(m)
        for m in info.get("mismatched_keys") or []
    ]
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not k.startswith(ignore))
    if not (missing or mismatched or unexpected):
        return
    parts = [f"{len(missing)} missing keys {short(missing)}"] if missing else []
    parts += [f"{len(unexpected)} unexpected keys {short(unexpected)}"] if unexpected else []
    parts += [f"{len(mismatched)} shape mismatches [{'; '.join(mismatched[:4])}]"] if mismatched else []
    what = ", ".join(parts)
    if strict:
        raise ValueError(
            f"the checkpoint in {where!r} does not fit its {cls_name}: {what}. Check that the folder "
            "holds the weights its config.json describes; pass strict=False only to keep those tensors random."
        )
    random = missing + [m.split(":")[0] for m in mismatched]
    warnings.warn(
        f"{_WARNED_BY}: strict=False: loaded the checkpoint in {where!r} into its {cls_name}; {len(random)} tensors "
        f"stayed random {short(random)}; {len(unexpected)} checkpoint keys were ignored {short(unexpected)}. "
        "Use a checkpoint that fits its config for all of them.",
        UserWarning,
        stacklevel=stacklevel,
    )


_QUICKGELU_MSG = (
    "{who}: loading {path!r} into {family} config {name!r}, which uses GELU, but {why}. OpenAI's CLIP "
    "weights (what LLaVA and INF-LLaVA use) were trained with QuickGELU and give wrong features under GELU: "
    "use {fix} instead. Ignore this if the weights really were trained with GELU."
)


def warn_quickgelu(*, path: str, family: str, name: str, why: str, fix: str, stacklevel: int = 5) -> None:
    """The warning for OpenAI-looking weights going into a GELU config (each family says when, and ``why``)."""
    warnings.warn(
        _QUICKGELU_MSG.format(who=_WARNED_BY, path=path, family=family, name=name, why=why, fix=fix),
        UserWarning,
        stacklevel=stacklevel,
    )
