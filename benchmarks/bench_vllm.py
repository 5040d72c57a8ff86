"""Benchmark: serving an upgraded LLaVA-NeXT with vLLM's OpenAI server and the hrperc plugin, on this CPU.

16 chat requests with one image each (16 different images of 180-700 px, a few words of text, greedy,
``--max-tokens`` new tokens, EOS ignored), sent at once and streamed from a plain HTTP client, against:

* ``vllm_upgraded`` -- the model with INF-LLaVA's dual perspectives and a trained-looking DEM (``dcm=True``,
  random DEM weights) saved with its front-end files: vLLM with the plugin, the front end's image path;
* ``vllm_identity`` -- the same model with its own front end saved as front-end files (the plugin's image path
  without the upgrade: transformers' tower and projector run by the plugin);
* ``vllm_plain``    -- the same model without front-end files: vLLM's own LLaVA-NeXT (what people serve today);
* ``hf_upgraded`` / ``hf_plain`` -- transformers' ``generate`` on the same prompts (the attached model / the
  plain one), one request after the other (sequential, batch 1), as if all 16 arrived at once.

Per row: requests per second (16 / wall time from sending the first request to the last answer), time to
first token (from sending to the first streamed token; for transformers, from the start of the sequential
run, so the queueing shows as in the server), the median latency. All servers are up at once and the rounds
interleave the rows (server rows, transformers rows, the front-end timings), so a load that drifts during
the run touches every row alike. Threads: vLLM's CPU worker binds its
compute to one core and leaves the other to the API server (``VLLM_CPU_OMP_THREADS_BIND=auto`` on 2 cores:
"Reducing Torch threads from 2 to 1"); the transformers rows and the front-end timings run with ``--threads``
(1 by default, the same one core; on a loaded machine two OpenMP threads wait on each other for milliseconds
per operator). Each row: a warm-up round, then ``--rounds``
timed rounds (each with its own images: no prefix or multimodal cache hits; the servers run with those
caches off besides); the medians over the rounds. The front end's share: ``get_image_features`` of the attached
transformers model on the 16 images (one at a time, the attached processor's output as input) over the
upgraded server's wall time for the 16 requests, and the processor's time the same way.

The model is random (the weights do not change the time): ``--size small`` (default) is a LLaVA-NeXT of a
ViT-S-like CLIP tower (384 wide, 6 layers, 112 px tiles of 8 x 8 patches, pinpoints up to 3 tiles) and a
Llama LLM (512 wide, 4 layers, head size 64, word-level vocabulary); ``--size tiny`` is the tests' model
(``tests_vllm/_tiny.py``). float32 throughout. Writes ``benchmarks/results/bench_vllm.json`` and prints a table.

Run in vLLM's environment (``make vllm-env``), serialised with other benchmarks::

    flock /tmp/hrperc-bench.lock nice -n 5 .venv-vllm/bin/python benchmarks/bench_vllm.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests_vllm"))

N_REQUESTS = 16
TEXTS = ["what is in the image", "describe it", "what is it", "is it red or blue", "describe the image"]


def _env(tmp: Path) -> None:
    """vLLM's caches and temporary files under ``tmp``, offline, a 1 GiB KV cache per server (as the tests)."""
    for var, sub in (("VLLM_CACHE_ROOT", "vllm"), ("TMPDIR", "tmp"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(tmp / sub)
    tempfile.tempdir = None
    os.environ.update(
        VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )


def build(size: str, seed: int = 0):
    """``(model, processor)``: a random LLaVA-NeXT of ``size`` (``"tiny"``: the tests'; ``"small"``: see above)."""
    import _tiny
    import torch
    import transformers as tf

    if size == "tiny":
        return _tiny.build(seed)
    tile, patch = 112, 14
    pinpoints = [[112, 224], [224, 112], [224, 224], [336, 112], [112, 336]]
    tok = _tiny.tokenizer()
    torch.manual_seed(seed)
    text = tf.LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=len(tok),
        max_position_embeddings=4096,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    vision = tf.CLIPVisionConfig(
        image_size=tile,
        patch_size=patch,
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=6,
    )
    cfg = tf.LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
    )
    model = tf.LlavaNextForConditionalGeneration(cfg)
    ip = tf.LlavaNextImageProcessor(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints
    )
    proc = tf.LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=patch,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
    )
    return model.eval(), proc


def save(directory: Path, size: str, kind: str | None) -> Path:
    """The model of ``size`` saved plain (``kind=None``), with its own front end (``"identity"``) or upgraded
    (``"upgraded"``) as front-end files; the same base weights in all three (seed 0)."""
    import _tiny

    from hrperc.integrations.transformers import attach, encoder_from_model, save_front_end

    model, proc = build(size)
    if kind == "identity":
        model, _ = attach(model, proc, encoder_from_model(model, proc))
    elif kind == "upgraded":
        model, _ = _tiny.upgrade(model, proc)
    model.save_pretrained(directory)
    _tiny.hub_layout(directory)
    proc.save_pretrained(directory)
    if kind is not None:
        save_front_end(model, directory)
    return directory


def requests_for(round_: int) -> list[tuple[int, int, int, str]]:
    """16 requests ``(height, width, seed, text)``: sizes from 180 to 700 px, wide and tall, new images each round."""
    import random

    rng = random.Random(round_)
    out = []
    for i in range(N_REQUESTS):
        h, w = rng.randint(180, 700), rng.randint(180, 700)
        out.append((h, w, 1000 * round_ + i, TEXTS[i % len(TEXTS)]))
    return out


class ServedRow:
    """A row served by vLLM's OpenAI server with the plugin (``VLLM_PLUGINS=hrperc``; the plain directory is
    served by vLLM's own class), the engine in its own process."""

    def __init__(self, name: str, directory: Path, max_tokens: int, log_dir: Path) -> None:
        from _server import Server

        env = dict(os.environ, VLLM_PLUGINS="hrperc")
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        args = [
            "--max-model-len", "1024", "--max-num-seqs", str(N_REQUESTS), "--limit-mm-per-prompt", '{"image": 1}',
            "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0",
        ]  # fmt: skip
        self.name, self.max_tokens = name, max_tokens
        self.server = Server(directory, log_dir / f"{name}.log", args, env=env, start_timeout=900)
        t0 = time.perf_counter()
        self.server.start()
        self.extra = {"startup_s": time.perf_counter() - t0}

    def round(self, round_: int) -> dict:
        import _tiny
        from _server import image_part, text_part

        contents = [[image_part(_tiny.image(h, w, s)), text_part(t)] for h, w, s, t in requests_for(round_)]
        start = time.perf_counter()
        with ThreadPoolExecutor(N_REQUESTS) as pool:
            outs = list(pool.map(lambda c: self.server.stream_chat(c, max_tokens=self.max_tokens), contents))
        wall = time.perf_counter() - start
        assert all(len(o["token_ids"]) == self.max_tokens for o in outs), outs
        return {
            "wall_s": wall,
            "ttft_s": [o["ttft"] for o in outs],
            "latency_s": [o["total"] for o in outs],
            "tokens": [o["token_ids"] for o in outs],
        }

    def close(self) -> None:
        self.server.stop()


class GenerateRow:
    """transformers' ``generate`` on the same requests, one after the other (batch 1), in this process;
    TTFT and latency counted from the round's start (all 16 requests waiting from then on)."""

    def __init__(self, name: str, directory: Path, attached: bool, max_tokens: int) -> None:
        from _harness import load_hf

        self.name, self.max_tokens, self.extra = name, max_tokens, {}
        self.model, self.processor = load_hf(directory, attached=attached)
        self.model.generation_config.eos_token_id = None

    def round(self, round_: int) -> dict:
        import _tiny
        import torch
        from _server import CHAT_TEMPLATE
        from transformers.generation.streamers import BaseStreamer

        class FirstToken(BaseStreamer):
            def __init__(self):
                self.calls, self.first = 0, None

            def put(self, value):
                self.calls += 1
                if self.calls == 2:  # the first call holds the prompt
                    self.first = time.perf_counter()

            def end(self):
                pass

        start = time.perf_counter()
        ttft, lat, tokens = [], [], []
        for h, w, seed, text in requests_for(round_):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            tok = self.processor.tokenizer
            prompt = tok.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False)
            inputs = self.processor(
                images=[_tiny.image(h, w, seed)], text=prompt, add_special_tokens=False, return_tensors="pt"
            )
            streamer = FirstToken()
            with torch.no_grad():
                out = self.model.generate(
                    **inputs, max_new_tokens=self.max_tokens, do_sample=False, pad_token_id=0, streamer=streamer
                )
            ttft.append(streamer.first - start)
            lat.append(time.perf_counter() - start)
            tokens.append(out[0, inputs["input_ids"].shape[1] :].tolist())
        return {"wall_s": time.perf_counter() - start, "ttft_s": ttft, "latency_s": lat, "tokens": tokens}

    def close(self) -> None:
        pass


def summarize(name: str, runs: list[dict], **extra) -> dict:
    walls = [r["wall_s"] for r in runs]
    ttft = [t for r in runs for t in r["ttft_s"]]
    lat = [t for r in runs for t in r["latency_s"]]
    return {
        "name": name,
        "rps": N_REQUESTS / statistics.median(walls),
        "wall_s": statistics.median(walls),
        "wall_s_all": walls,
        "ttft_median_s": statistics.median(ttft),
        "ttft_max_s": max(ttft),
        "latency_median_s": statistics.median(lat),
        "tokens_round0": runs[0]["tokens"],
        **extra,
    }


class FrontEndTimes:
    """Seconds per round of 16 images: the attached processor (pixels and prompt) and ``get_image_features``
    (the image path the plugin runs: tower, front end, projector), one image at a time."""

    def __init__(self, directory: Path, attached: bool) -> None:
        from _harness import load_hf

        self.model, self.processor = load_hf(directory, attached=attached)

    def round(self, round_: int) -> dict:
        import _tiny
        import torch

        p_total = f_total = 0.0
        tokens = []
        for h, w, seed, text in requests_for(round_):
            t0 = time.perf_counter()
            inputs = self.processor(images=[_tiny.image(h, w, seed)], text="<image> " + text, return_tensors="pt")
            t1 = time.perf_counter()
            with torch.no_grad():
                feats = self.model.model.get_image_features(inputs["pixel_values"], image_sizes=inputs["image_sizes"])
            t2 = time.perf_counter()
            p_total, f_total = p_total + t1 - t0, f_total + t2 - t1
            tokens.append(int(feats.pooler_output[0].shape[0]))
        return {"processor_s": p_total, "image_features_s": f_total, "image_tokens": tokens}


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("small", "tiny"), default="small")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the transformers rows (vLLM: see above)")
    ap.add_argument("--rows", default="vllm_upgraded,vllm_identity,vllm_plain,hf_upgraded,hf_plain")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_vllm.json"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hrperc-bench-vllm-"))
    try:
        _env(tmp)
        import torch
        import transformers
        import vllm

        torch.set_num_threads(a.threads)
        uptime_before = _uptime()
        t_start = time.perf_counter()
        dirs = {k: save(tmp / "models" / str(k), a.size, k) for k in (None, "identity", "upgraded")}
        names = a.rows.split(",")
        rows: list = []
        try:  # every server up at once, the rounds interleaved: a load that drifts touches every row alike
            for name in names:
                kind = {"upgraded": "upgraded", "identity": "identity", "plain": None}[name.split("_", 1)[1]]
                if name.startswith("vllm_"):
                    rows.append(ServedRow(name, dirs[kind], a.max_tokens, tmp))
                else:
                    rows.append(GenerateRow(name, dirs[kind], kind is not None, a.max_tokens))
            fe = {"upgraded": FrontEndTimes(dirs["upgraded"], True), "plain": FrontEndTimes(dirs[None], False)}
            runs: dict = {r.name: [] for r in rows}
            fe_runs: dict = {k: [] for k in fe}
            for round_ in [99, *range(a.rounds)]:  # round 99: the warm-up, not counted
                for row in rows:
                    out = row.round(round_)
                    if round_ != 99:
                        runs[row.name].append(out)
                for k, timer in fe.items():
                    out = timer.round(round_)
                    if round_ != 99:
                        fe_runs[k].append(out)
                print(f"round {round_} done", flush=True)
        finally:
            for row in rows:
                row.close()
        results = [summarize(r.name, runs[r.name], **r.extra) for r in rows]
        front_end: dict = {
            k: {
                "processor_s": statistics.median(o["processor_s"] for o in v),
                "image_features_s": statistics.median(o["image_features_s"] for o in v),
                "image_tokens_round0": v[0]["image_tokens"],
            }
            for k, v in fe_runs.items()
        }
        by_name = {r["name"]: r for r in results}
        if "vllm_upgraded" in by_name:
            wall = by_name["vllm_upgraded"]["wall_s"]
            front_end["upgraded_share_of_server_wall"] = front_end["upgraded"]["image_features_s"] / wall
            front_end["processor_share_of_server_wall"] = front_end["upgraded"]["processor_s"] / wall
            if "vllm_identity" in by_name:  # the same server with the model's own front end
                front_end["upgrade_extra_share_of_server_wall"] = 1 - by_name["vllm_identity"]["wall_s"] / wall
        if "vllm_upgraded" in by_name and "hf_upgraded" in by_name:
            same = by_name["vllm_upgraded"]["tokens_round0"] == by_name["hf_upgraded"]["tokens_round0"]
            front_end["upgraded_tokens_equal_hf"] = same
        if "vllm_plain" in by_name and "hf_plain" in by_name:
            same = by_name["vllm_plain"]["tokens_round0"] == by_name["hf_plain"]["tokens_round0"]
            front_end["plain_tokens_equal_hf"] = same
        res = {
            "bench": "bench_vllm",
            "size": a.size,
            "requests": N_REQUESTS,
            "max_tokens": a.max_tokens,
            "rounds": a.rounds,
            "dtype": "float32",
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads_transformers": a.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "vllm": vllm.__version__,
            "uptime_before": uptime_before,
            "uptime_after": _uptime(),
            "total_s": time.perf_counter() - t_start,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "rows": results,
            "front_end": front_end,
        }
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
        print(table(res))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def table(res: dict) -> str:
    rows = {r["name"]: r for r in res["rows"]}
    base = rows.get("vllm_upgraded")
    lines = [
        "| row | req/s | x vllm_upgraded | wall per 16 (s), rounds | TTFT median (s) | TTFT max (s) "
        "| latency median (s) | server start (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        ratio = f"{r['rps'] / base['rps']:.2f}" if base else "-"
        start = f"{r['startup_s']:.0f}" if "startup_s" in r else "-"
        lines.append(
            f"| {name} | {r['rps']:.2f} | {ratio} | {min(r['wall_s_all']):.2f}-{max(r['wall_s_all']):.2f} | "
            f"{r['ttft_median_s']:.2f} | {r['ttft_max_s']:.2f} | "
            f"{r['latency_median_s']:.2f} | {start} |"
        )
    fe = res["front_end"]
    lines.append("")
    lines.append(
        f"front end (attached get_image_features, 16 images one at a time): upgraded "
        f"{fe['upgraded']['image_features_s']:.2f} s, plain {fe['plain']['image_features_s']:.2f} s; "
        f"attached processor {fe['upgraded']['processor_s']:.2f} s"
    )
    if "upgraded_share_of_server_wall" in fe:
        lines.append(
            f"share of vllm_upgraded's wall time for 16 requests: image features "
            f"{fe['upgraded_share_of_server_wall']:.0%}, processor {fe['processor_share_of_server_wall']:.0%}"
        )
    if "upgrade_extra_share_of_server_wall" in fe:
        lines.append(
            f"vllm_upgraded's wall time beyond vllm_identity's (the upgrade's own cost): "
            f"{fe['upgrade_extra_share_of_server_wall']:.0%}"
        )
    if "upgraded_tokens_equal_hf" in fe:
        lines.append(f"vllm_upgraded tokens == hf_upgraded tokens (round 0): {fe['upgraded_tokens_equal_hf']}")
    if "plain_tokens_equal_hf" in fe:
        lines.append(f"vllm_plain tokens == hf_plain tokens (round 0): {fe['plain_tokens_equal_hf']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
