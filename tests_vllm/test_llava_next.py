"""The vLLM plugin on a tiny random LLaVA-NeXT: vLLM with the plugin against vLLM without it and against
transformers (plain, and attached with an upgraded front end). Greedy tokens compared exactly."""

from __future__ import annotations

import shutil

import pytest
import torch
from _harness import hf_generate, load_hf

FAMILY = "llava_next"


def test_identity_front_end_serves_as_vllm_and_transformers(dirs, served):
    plain, identity = served[FAMILY]["plain"], served[FAMILY]["identity"]
    reference = hf_generate(*load_hf(dirs[FAMILY][None], attached=False))
    assert plain["tokens"] == reference["tokens"]
    assert plain["prompt_ids"] == reference["prompt_ids"]
    # the model's own front end through the plugin: the same placeholders and the same tokens
    assert identity["prompt_ids"] == plain["prompt_ids"]
    assert identity["tokens"] == plain["tokens"]


def test_directory_without_front_end_is_served_by_vllm_itself(served):
    assert served[FAMILY]["base"] == served[FAMILY]["plain"]


def test_upgraded_front_end_serves_as_the_attached_model(dirs, served):
    upgraded, plain = served[FAMILY]["upgraded"], served[FAMILY]["plain"]
    reference = hf_generate(*load_hf(dirs[FAMILY]["upgraded"], attached=True))
    assert upgraded["prompt_ids"] == reference["prompt_ids"]  # the attached processor's placeholders
    assert upgraded["tokens"] == reference["tokens"]
    # the upgrade shows: INF-LLaVA's views add no token here (the same layout), but the tokens differ
    assert upgraded["prompt_ids"] == plain["prompt_ids"]
    assert upgraded["tokens"] != plain["tokens"]


def test_bfloat16_serves_as_transformers(dirs, served):
    bf16 = torch.bfloat16
    plain = hf_generate(*load_hf(dirs[FAMILY][None], attached=False, dtype=bf16), dtype=bf16)
    assert served[FAMILY]["identity_bf16"] == plain
    upgraded = hf_generate(*load_hf(dirs[FAMILY]["upgraded"], attached=True, dtype=bf16), dtype=bf16)
    assert served[FAMILY]["upgraded_bf16"] == upgraded


def test_front_end_files_are_checked_when_the_model_is_built(dirs, tmp_path):
    import transformers as tf

    from hrperc.integrations.vllm._shell import restore

    broken = tmp_path / "broken"
    shutil.copytree(dirs[FAMILY]["upgraded"], broken)
    (broken / "hrperc_front_end.safetensors").unlink()
    config = tf.AutoConfig.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match="hrperc_front_end.safetensors"):
        restore(config, None, broken, real=False)
    (broken / "hrperc_front_end.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="hrperc_front_end.safetensors"):
        restore(config, None, broken, real=False)
