"""Bad input through vLLM's engine with the plugin, in one vLLM process (this file run as a script): checkpoint
directories whose front-end files do not fit the model are refused when the engine is built, naming the
file; then one engine (the tiny upgraded LLaVA-OneVision) refuses bad requests, naming the values, and
serves good requests after them (one sends an image of a refused request again), the last as the attached
transformers model does.

    python tests_vllm/test_bad_input.py SPEC.json OUT.json
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

MAX_MODEL_LEN = 256  # the engine's: two of the tiny OneVision's largest images (198 tokens each) do not fit
GOOD = {"prompt": "<image> what is in the image", "images": [[40, 90, 1]]}
REQUESTS = {
    # 198 + 198 image tokens and the text: past max_model_len
    "too_long": {"prompt": "<image> <image> describe it", "images": [[182, 168, 4], [182, 168, 5]]},
    # the same image again in a prompt that fits: served (a refusal must leave vLLM's caches consistent)
    "after_too_long": {"prompt": "<image> describe it", "images": [[182, 168, 4]]},
    # one placeholder, two images
    "more_images": {"prompt": "<image> what is in the image", "images": [[40, 90, 1], [60, 60, 3]]},
    # two placeholders, one image (vLLM alone serves the second placeholder as a text token)
    "fewer_images": {"prompt": "<image> <image> what is in the image", "images": [[40, 90, 1]]},
    # a video to a OneVision served with front-end files
    "video": {"prompt": "<video> describe it", "video": [4, 56, 56]},
    "good": GOOD,
}


# --- the worker ---------------------------------------------------------------------------------------------
def _prompt(request) -> dict:
    import numpy as np
    from _tiny import image

    entry: dict = {"prompt": request["prompt"]}
    if request.get("images"):
        images = [image(h, w, s) for h, w, s in request["images"]]
        entry["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
    if request.get("video"):
        frames = np.random.default_rng(0).integers(0, 256, (*request["video"], 3), dtype=np.uint8)
        entry["multi_modal_data"] = {"video": frames}
    return entry


def _engine(model: str):
    from vllm import LLM

    return LLM(
        model=model,
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=4,
        enforce_eager=True,
        seed=0,
        limit_mm_per_prompt={"image": 2},
        disable_log_stats=True,
    )


def main(spec_path: str, out_path: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from vllm import SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    spec = json.loads(Path(spec_path).read_text())
    out: dict = {"build": {}, "requests": {}}
    for name, directory in spec["broken"].items():  # each refused while the engine is built
        try:
            llm = _engine(directory)
        except Exception as e:  # noqa: BLE001 -- the test reads the type and the message
            out["build"][name] = {"type": type(e).__name__, "message": str(e)}
        else:
            out["build"][name] = {"type": None, "message": "built"}
            del llm
        gc.collect()
        cleanup_dist_env_and_memory()
    llm = _engine(spec["model"])
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for name, request in REQUESTS.items():  # one at a time: a refusal must not stop the engine
        try:
            (result,) = llm.generate([_prompt(request)], params, use_tqdm=False)
        except Exception as e:  # noqa: BLE001
            out["requests"][name] = {"type": type(e).__name__, "message": str(e)}
        else:
            out["requests"][name] = {
                "tokens": list(result.outputs[0].token_ids),
                "prompt_ids": list(result.prompt_token_ids),
            }
    Path(out_path).write_text(json.dumps(out))


# --- the test -----------------------------------------------------------------------------------------------
def _broken(dirs, root: Path) -> dict[str, str]:
    """Copies of the upgraded OneVision directory with front-end files that do not fit it."""
    good = dirs["llava_onevision"]["upgraded"]

    def copy(name: str) -> Path:
        target = root / name
        shutil.copytree(good, target)
        return target

    other = copy("other_family")  # LLaVA-NeXT's files in a OneVision directory
    for f in ("hrperc_front_end.json", "hrperc_front_end.safetensors"):
        shutil.copy(dirs["llava_next"]["upgraded"] / f, other / f)
    width = copy("width")  # a DEM width the tower does not have
    config = json.loads((width / "hrperc_front_end.json").read_text())
    config["dem"]["dim"] = 48
    (width / "hrperc_front_end.json").write_text(json.dumps(config))
    missing = copy("missing")
    (missing / "hrperc_front_end.safetensors").unlink()
    truncated = copy("truncated")
    data = (truncated / "hrperc_front_end.safetensors").read_bytes()
    (truncated / "hrperc_front_end.safetensors").write_bytes(data[: len(data) // 2])
    return {p.name: str(p) for p in (other, width, missing, truncated)}


def test_bad_input_is_refused_and_the_engine_keeps_serving(dirs, tmp_path):
    import pytest
    from _harness import hf_generate, load_hf

    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    broken = _broken(dirs, tmp_path / "broken")
    spec.write_text(json.dumps({"broken": broken, "model": str(dirs["llava_onevision"]["upgraded"])}))
    run = subprocess.run(
        [sys.executable, __file__, str(spec), str(out)],
        env=dict(os.environ, VLLM_PLUGINS="hrperc"),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if run.returncode != 0:
        pytest.fail(f"the bad-input worker failed:\n{run.stderr[-4000:]}")
    result = json.loads(out.read_text())
    build, requests = result["build"], result["requests"]

    # refused when the engine is built, naming the file (and what in it does not fit)
    other = build["other_family"]
    assert "hrperc_front_end.json" in other["message"]
    assert "llava_next" in other["message"] and "llava_onevision" in other["message"]
    assert "hrperc_front_end" in build["width"]["message"] and "48" in build["width"]["message"]
    assert build["missing"]["type"] == "FileNotFoundError"
    assert "hrperc_front_end.safetensors" in build["missing"]["message"]
    assert "hrperc_front_end.safetensors" in build["truncated"]["message"]

    # bad requests refused, naming the values; before vLLM's processor cache takes their images
    too_long = requests["too_long"]["message"]
    assert str(MAX_MODEL_LEN) in too_long and "399" in too_long and "[198, 198]" in too_long
    again = requests["after_too_long"]  # the same image in a prompt that fits: served
    assert "message" not in again, again
    assert len(again["prompt_ids"]) == 1 + 198 + 2 and len(again["tokens"]) == 8
    more = requests["more_images"]["message"]
    assert "2 image(s)" in more and "1 image placeholder(s)" in more
    fewer = requests["fewer_images"]["message"]
    assert "1 image(s)" in fewer and "2 image placeholder(s)" in fewer
    video = requests["video"]["message"]
    assert "1 video" in video and "hrperc's vLLM plugin" in video and "hrperc_front_end.json" in video

    # and the engine still serves, as the attached transformers model does
    good = requests["good"]
    assert "message" not in good, good
    model, attached = load_hf(dirs["llava_onevision"]["upgraded"], attached=True)
    assert good == {k: v[0] for k, v in hf_generate(model, attached, requests=[GOOD]).items()}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
