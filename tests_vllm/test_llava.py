"""The vLLM plugin on a tiny random LLaVA-1.5: with the plugin as without it and as transformers; INF-LLaVA's
front end (the ``inf_llava`` recipe, a random DEM) as the attached transformers model. Greedy tokens, float32."""

from __future__ import annotations

from _harness import hf_generate, load_hf

FAMILY = "llava"


def test_identity_front_end_serves_as_vllm_and_transformers(dirs, served):
    plain, identity = served[FAMILY]["plain"], served[FAMILY]["identity"]
    reference = hf_generate(*load_hf(dirs[FAMILY][None], attached=False))
    assert plain == reference
    assert identity == plain
    assert served[FAMILY]["base"] == plain


def test_inf_llava_front_end_serves_as_the_attached_model(dirs, served):
    upgraded = served[FAMILY]["upgraded"]
    reference = hf_generate(*load_hf(dirs[FAMILY]["upgraded"], attached=True))
    assert upgraded == reference
    assert upgraded["prompt_ids"] == served[FAMILY]["plain"]["prompt_ids"]  # one tile's count, as LLaVA-1.5
    assert upgraded["tokens"] != served[FAMILY]["plain"]["tokens"]
