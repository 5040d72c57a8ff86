"""The plugin's token counts without an engine: vLLM's processing info for each directory, over many sizes."""

from __future__ import annotations

import pytest

SIZES = [(h, w) for h in range(14, 420, 29) for w in range(14, 420, 31)]  # wide, tall, tiny, past the pinpoints
# OneVision past its anyres_max_9 shrink and around it: every third size up to 400 px a side
DENSE = [(h, w) for h in range(1, 400, 3) for w in range(1, 400, 3)]
INFO = {
    "llava_next": ("vllm.model_executor.models.llava_next", "LlavaNextProcessingInfo", "HrpercLlavaNextProcessingInfo"),
    "llava_onevision": (
        "vllm.model_executor.models.llava_onevision",
        "LlavaOnevisionProcessingInfo",
        "HrpercLlavaOnevisionProcessingInfo",
    ),
}


def info_of(directory):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from hrperc.integrations.vllm import register

    register()
    return MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=str(directory))).info


def counts(info, sizes=SIZES) -> list[int]:
    return [info.get_num_image_tokens(image_width=w, image_height=h) for h, w in sizes]


def attached_of(directory):
    import transformers as tf

    from hrperc.integrations.transformers import load_front_end

    config = tf.AutoConfig.from_pretrained(directory)
    model = getattr(tf, config.architectures[0]).from_pretrained(directory)
    return load_front_end(model, tf.AutoProcessor.from_pretrained(directory), directory)[1]


@pytest.mark.parametrize("family", sorted(INFO))
def test_the_model_own_front_end_counts_as_vllm(dirs, family):
    import importlib

    module, plain_cls, plugin_cls = INFO[family]
    plain, identity = info_of(dirs[family][None]), info_of(dirs[family]["identity"])
    assert type(plain) is getattr(importlib.import_module(module), plain_cls)  # no front-end files: vLLM's own
    assert type(identity).__name__ == plugin_cls
    sizes = SIZES if family == "llava_next" else DENSE[::7]
    assert counts(identity, sizes) == counts(plain, sizes)


@pytest.mark.parametrize("family", sorted(INFO))
@pytest.mark.parametrize("kind", ["identity", "upgraded"])
def test_counts_are_the_encoders(dirs, family, kind):
    attached = attached_of(dirs[family][kind])
    info = info_of(dirs[family][kind])
    assert counts(info) == [attached.encoder.num_tokens(s) for s in SIZES]


@pytest.mark.parametrize("family", sorted(INFO))
def test_the_declared_most_tokens_bound_every_image(dirs, family):
    """vLLM sizes its memory profiling and encoder cache by ``get_max_image_tokens``: no image counts more.
    OneVision's most is an image between pinpoints (a map just under the shrink), more than any pinpoint's."""
    attached = attached_of(dirs[family]["upgraded"])
    info = info_of(dirs[family]["upgraded"])
    size = info.get_image_size_with_most_features()
    most = info.get_max_image_tokens()
    assert most == attached.encoder.num_tokens((size.height, size.width))
    assert most == max(attached.encoder.num_tokens(s) for s in DENSE)
    at_pinpoints = max(attached.encoder.num_tokens(tuple(p)) for p in info.get_hf_config().image_grid_pinpoints)
    if family == "llava_onevision":
        assert most > at_pinpoints
    else:
        assert most == at_pinpoints
