"""hrperc front ends served by vLLM: a ``vllm.general_plugins`` plugin (``docs/serving.md``).

vLLM calls :func:`register` in each of its processes (the entry point ``hrperc`` of the group
``vllm.general_plugins``, installed with hrperc). It registers, for each supported family, a model class under
the family's own architecture name (``LlavaForConditionalGeneration``: LLaVA-1.5,
``LlavaNextForConditionalGeneration``: LLaVA-NeXT, ``LlavaOnevisionForConditionalGeneration``:
LLaVA-OneVision, images only), so a checkpoint directory is served as it is:

* a directory with hrperc's front-end files (``hrperc_front_end.json`` and ``hrperc_front_end.safetensors``,
  written by :func:`hrperc.integrations.transformers.save_front_end` next to ``save_pretrained``) is
  served with that front end as the image path: the image placeholders are expanded to the encoder's
  ``num_tokens`` of each image, the images reach the model unresized (the encoder plans its own views), and
  the features are those of the attached transformers model (the same tower, front end and projector code);
* a directory without them is served by vLLM's own class and processor, unchanged.

Nothing here imports vLLM until vLLM asks for a model class: importing :mod:`hrperc` never loads this
package, and :func:`register` only records names.

Example::

    >>> from hrperc.integrations.vllm import FRONT_END_FILES, has_front_end
    >>> FRONT_END_FILES
    ('hrperc_front_end.json', 'hrperc_front_end.safetensors')
    >>> has_front_end("/nonexistent")
    False
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["register", "has_front_end", "FRONT_END_FILES", "ARCHITECTURES"]

#: The files ``save_front_end`` writes (the same names as :mod:`hrperc.integrations.transformers._save`'s).
FRONT_END_FILES = ("hrperc_front_end.json", "hrperc_front_end.safetensors")

#: vLLM architecture name -> the plugin's class for it (``module:class``, imported by vLLM when needed).
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "hrperc.integrations.vllm._llava:HrpercLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "hrperc.integrations.vllm._llava_next:HrpercLlavaNextForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration": (
        "hrperc.integrations.vllm._llava_onevision:HrpercLlavaOnevisionForConditionalGeneration"
    ),
}


def has_front_end(directory) -> bool:
    """Whether ``directory`` (a local checkpoint directory) holds either of hrperc's front-end files; a
    directory with only one of them is refused when the model is built (the message names the missing one)."""
    if directory is None:
        return False
    path = Path(str(directory))
    return path.is_dir() and any((path / name).is_file() for name in FRONT_END_FILES)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the plugin's model classes with vLLM (lazily, by name)."""
    from vllm import ModelRegistry

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
