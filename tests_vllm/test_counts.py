"""The plugin's token counts without an engine: vLLM's processing info for each directory, over many sizes."""

from __future__ import annotations

import pytest

SIZES = [(h, w) for h in range(14, 420, 29) for w in range(14, 420, 31)]  # wide, tall, tiny, past the pinpoints


def info_of(directory):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from hrperc.integrations.vllm import register

    register()
    return MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=str(directory))).info


def counts(info) -> list[int]:
    return [info.get_num_image_tokens(image_width=w, image_height=h) for h, w in SIZES]


def test_the_model_own_front_end_counts_as_vllm(dirs):
    from vllm.model_executor.models.llava_next import LlavaNextProcessingInfo

    from hrperc.integrations.vllm._llava_next import HrpercLlavaNextProcessingInfo

    plain, identity = info_of(dirs["llava_next"][None]), info_of(dirs["llava_next"]["identity"])
    assert type(plain) is LlavaNextProcessingInfo  # no front-end files: vLLM's own
    assert isinstance(identity, HrpercLlavaNextProcessingInfo)
    assert counts(identity) == counts(plain)


@pytest.mark.parametrize("kind", ["identity", "upgraded"])
def test_counts_are_the_encoders(dirs, kind):
    import transformers as tf

    from hrperc.integrations.transformers import load_front_end

    model = tf.LlavaNextForConditionalGeneration.from_pretrained(dirs["llava_next"][kind])
    _, attached = load_front_end(
        model, tf.AutoProcessor.from_pretrained(dirs["llava_next"][kind]), dirs["llava_next"][kind]
    )
    info = info_of(dirs["llava_next"][kind])
    assert counts(info) == [attached.encoder.num_tokens(s) for s in SIZES]
    size = info.get_image_size_with_most_features()
    assert info.get_max_image_tokens() == max(
        attached.encoder.num_tokens(p) for p in info.get_hf_config().image_grid_pinpoints
    )
    assert info.get_max_image_tokens() == attached.encoder.num_tokens((size.height, size.width))
