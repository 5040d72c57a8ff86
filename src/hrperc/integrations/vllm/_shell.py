"""The transformers side of a served front end: the model's image path restored from the front-end files.

vLLM's own LLaVA classes hold vLLM's tower and projector; hrperc's front ends run around transformers'
(``docs/transformers.md``). The plugin builds the checkpoint's transformers class on the ``meta`` device
(no memory; the LLM stays there), makes its image parts real -- the vision tower, the projector, the
newline embedding -- and restores the saved front end around them with
:func:`~hrperc.integrations.transformers.load_front_end`, which checks the files whole. vLLM's LLM then
takes the features the attached ``get_image_features`` returns: the same code as the attached
transformers model, so the same tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..transformers._model import inner_model, projector_of, tower_of
from ..transformers._save import load_front_end

__all__ = ["build_shell", "restore", "load_image_weights", "IMAGE_PARTS"]


def _family_parts(family) -> tuple[str, ...]:
    return tuple(p for p in (family.tower, family.projector, family.newline) if p is not None)


#: What the plugin loads into the shell: the inner model's attributes the image path reads.
IMAGE_PARTS = ("vision_tower", "multi_modal_projector", "image_newline")


def build_shell(hf_config, *, real: bool, dtype: torch.dtype | None = None, device=None) -> nn.Module:
    """The checkpoint's transformers model (its config's ``architectures[0]``) on ``meta``; ``real=True``: its
    image parts (tower, projector, newline) rebuilt on ``device`` in ``dtype``, their weights still to load."""
    import transformers

    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    cls = getattr(transformers, str(arch), None)
    if cls is None:
        raise ValueError(
            f"the checkpoint's config names the architecture {arch!r}, which this transformers "
            f"({transformers.__version__}) does not have; hrperc's front end runs around transformers' model class."
        )
    with torch.device("meta"):
        model = cls(hf_config)
    inner, family = inner_model(model)
    if real:
        device = torch.device("cpu") if device is None else torch.device(device)
        with torch.device(device):
            tower = tower_of(inner, family)
            setattr(inner, family.tower, type(tower)(tower.config).to(dtype=dtype))
            projector = projector_of(inner, family)
            if projector is not None and family.projector is not None:
                setattr(inner, family.projector, type(projector)(hf_config).to(dtype=dtype))
            if family.newline is not None:
                meta = getattr(inner, family.newline)
                setattr(inner, family.newline, nn.Parameter(torch.zeros(meta.shape, dtype=dtype)))
    return model.eval()


def restore(hf_config, processor, directory, *, real: bool, dtype=None, device=None):
    """``(shell, attached processor or None)``: :func:`build_shell` with the front end of ``directory``'s files
    attached (every refusal of :func:`load_front_end` names the file and the fix)."""
    shell = build_shell(hf_config, real=real, dtype=dtype, device=device)
    return load_front_end(shell, processor, Path(str(directory)))


def _candidates(name: str) -> tuple[str, ...]:
    """The shell's names a checkpoint's tower weight may have: with and without the ``vision_model.`` level
    (transformers 5 saves ``vision_tower.embeddings.*``; the hub's LLaVA checkpoints have
    ``vision_tower.vision_model.*``)."""
    head, _, rest = name.partition(".")
    if head != "vision_tower":
        return (name,)
    if rest.startswith("vision_model."):
        return name, f"vision_tower.{rest[len('vision_model.') :]}"
    return name, f"vision_tower.vision_model.{rest}"


def load_image_weights(shell: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy the checkpoint's image-part weights (names without the ``model.`` prefix) into the shell's image
    parts; refuses a missing or unexpected weight, or a shape that differs, naming it."""
    inner, family = inner_model(shell)
    params = {}
    for part in _family_parts(family):
        value = getattr(inner, part)
        if isinstance(value, nn.Parameter):
            params[part] = value
        else:
            params.update({f"{part}.{k}": v for k, v in value.state_dict(keep_vars=True).items()})
    done = set()
    for name, tensor in weights.items():
        target = next((c for c in _candidates(name) if c in params), None)
        if target is None:
            raise ValueError(
                f"the checkpoint's weight {name!r} has no place in the {type(shell).__name__}'s image parts "
                f"{_family_parts(family)}; the checkpoint and its config.json disagree. Save the model again."
            )
        param = params[target]
        if tuple(param.shape) != tuple(tensor.shape):
            raise ValueError(
                f"the checkpoint's weight {name!r} has shape {list(tensor.shape)}, the model's config gives "
                f"{list(param.shape)}; the checkpoint and its config.json disagree. Save the model again."
            )
        with torch.no_grad():
            param.copy_(tensor)
        done.add(target)
    missing = sorted(k for k in set(params) - done if not k.endswith("position_ids"))
    if missing:
        raise ValueError(
            f"the checkpoint lacks the image weights {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            f"save the model again with save_pretrained."
        )
