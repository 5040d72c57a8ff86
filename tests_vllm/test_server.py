"""vLLM's OpenAI-compatible server with the plugin, on a tiny upgraded LLaVA-NeXT (``dcm=True``, a random DEM):
8 chat completions with images sent at once from a plain HTTP client give the greedy tokens and prompt ids of
the attached transformers model with the same chat template; bad requests are refused with a 4xx naming the
value and the server keeps serving; stopping it leaves no process behind. One server for the module
(``python -m vllm.entrypoints.openai.api_server``, about 30-60 s to start here)."""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

import _tiny
import pytest
import torch
from _harness import load_hf
from _server import CHAT_TEMPLATE, Server, image_part, text_part

pytestmark = pytest.mark.server

MAX_MODEL_LEN = 80  # the context the server is given: what "an image over the model's limits" runs into
MAX_TOKENS = 8
# (height, width, seed, text): wide, tall, square, 1 px, a large image (downscaled by the front end's plan);
# every prompt fits MAX_MODEL_LEN with its MAX_TOKENS (checked below), the answers differ among them.
GOOD = [
    (40, 90, 1, "what is in the image"),
    (90, 40, 2, "describe it"),
    (130, 70, 3, "what is it"),
    (30, 200, 4, "a red square or a blue circle"),
    (200, 30, 5, "is it red"),
    (1, 1, 6, "what is in the image"),
    (56, 56, 7, "describe the image"),
    (120, 500, 8, "yes or no"),
]
# 88 image tokens (the most this front end writes for any size): 94 prompt tokens > MAX_MODEL_LEN.
OVER = (300, 300, 9, "what is in the image")
# A template that leaves the images out: an image the prompt has no placeholder for.
TEXT_ONLY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% for p in m['content'] %}"
    "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endfor %}"
)


def _content(h, w, seed, text) -> list[dict]:
    return [image_part(_tiny.image(h, w, seed)), text_part(text)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _tiny.save(tmp_path_factory.mktemp("server") / "upgraded", "upgraded", family="llava_next")


@pytest.fixture(scope="module")
def reference(model_dir):
    """The attached transformers model's answers to GOOD and OVER: ``{request: (prompt ids, greedy tokens)}``,
    the prompt rendered with the server's chat template."""
    return _generate(*load_hf(model_dir, attached=True), [*GOOD, OVER])


def _generate(model, processor, requests) -> dict:
    model.generation_config.eos_token_id = None  # the server's requests ignore EOS too
    out = {}
    for h, w, seed, text in requests:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = processor.tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False)
        inputs = processor(images=[_tiny.image(h, w, seed)], text=prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        n = inputs["input_ids"].shape[1]
        out[(h, w, seed, text)] = (inputs["input_ids"][0].tolist(), ids[0, n:].tolist())
    return out


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    env = dict(os.environ, VLLM_PLUGINS="hrperc")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as users run it: the engine in its own process
    args = [
        "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8", "--limit-mm-per-prompt", '{"image": 1}',
        "--trust-request-chat-template",  # lets a request bring the template that drops its image
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    srv = Server(model_dir, log, args, env=env, start_timeout=600, stop_timeout=30)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_concurrent_chats_match_the_attached_model(server, reference, model_dir):
    refs = [reference[r] for r in GOOD]
    assert all(len(ids) + MAX_TOKENS <= MAX_MODEL_LEN for ids, _ in refs), "a GOOD prompt does not fit the context"
    assert len({tuple(tokens) for _, tokens in refs}) >= 5  # answers mixed up between requests would show
    # the same model without its upgrade (the checkpoint's own image path) answers otherwise: a server that
    # ignored the front-end files would show
    plain = _generate(*load_hf(model_dir, attached=False), GOOD)
    assert sum(plain[r] != reference[r] for r in GOOD) >= 4
    with ThreadPoolExecutor(len(GOOD)) as pool:
        answers = list(pool.map(lambda r: server.chat(_content(*r), max_tokens=MAX_TOKENS), GOOD))
    for request, (status, body), (prompt_ids, tokens) in zip(GOOD, answers, refs):
        assert status == 200, (request, body)
        assert body["prompt_token_ids"] == prompt_ids, request  # the attached processor's placeholders
        assert body["choices"][0]["token_ids"] == tokens, request
        assert body["usage"]["completion_tokens"] == MAX_TOKENS


def _names(message: str, *values: int) -> bool:
    return all(re.search(rf"(?<![\d.]){v}(?![\d.])", message) for v in values)


def _refused(answer, status=400) -> str:
    code, body = answer
    assert code == status, body
    return body["error"]["message"]


def test_bad_requests_are_refused_and_the_server_keeps_serving(server, reference):
    # an image over the model's limits: its placeholders take the prompt past the context the server was given;
    # the message names the prompt's tokens, the image's and max_model_len
    prompt_ids, _ = reference[OVER]
    image_tokens = prompt_ids.count(prompt_ids[1])  # the template puts the image right after BOS
    assert image_tokens == 88 and len(prompt_ids) > MAX_MODEL_LEN
    message = _refused(server.chat(_content(*OVER), max_tokens=MAX_TOKENS))
    assert _names(message, len(prompt_ids), image_tokens, MAX_MODEL_LEN), message
    # payloads that never reach the front end: bytes that are no image, a part type, a model that do not exist
    garbage = {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}
    assert "Failed to load image" in _refused(server.chat([garbage, text_part("what")]))
    assert "'imagez'" in _refused(server.chat([{"type": "imagez", "imagez": "x"}, text_part("what")]))
    assert "no-such-model" in _refused(server.chat(_content(*GOOD[0]), model="no-such-model"), status=404)
    # still serving, with the same answer
    status, body = server.chat(_content(*GOOD[1]), max_tokens=MAX_TOKENS)
    assert status == 200, body
    assert body["choices"][0]["token_ids"] == reference[GOOD[1]][1]


def test_more_images_than_placeholders_is_refused(server, reference):
    # the request's template drops the image: one image, no placeholder; both counts named
    message = _refused(server.chat(_content(*GOOD[2]), chat_template=TEXT_ONLY_TEMPLATE))
    assert "image" in message and _names(message, 1, 0), message
    # the refused request's image again, now with its placeholder: vLLM's caches did not keep it half-way
    status, body = server.chat(_content(*GOOD[2]), max_tokens=MAX_TOKENS)
    assert status == 200, body
    assert body["choices"][0]["token_ids"] == reference[GOOD[2]][1]


def test_the_server_stops_and_leaves_no_process(server):
    assert server.group_alive()
    server.stop()
    assert server.proc.returncode is not None
    assert not server.group_alive(), f"processes of the server's group outlived it:\n{server.log_tail(2000)}"
