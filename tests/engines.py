"""Real inference engines for the tests: llama.cpp's llama-server serving Gemma 3 270M, started
in a temp dir on an ephemeral 127.0.0.1 port. `.ci/llama-server.sh` builds both into a cache.

Import the fixture where it is used (`from .engines import llama_server`). Without the binary or
the model a test skips, saying how to get them; with CI=true it fails instead.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .missing import missing

# The one version .ci/llama-server.sh builds; its cache directory is named after it.
LLAMA_PKG_VERSION = "11434.0.0"
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
MODEL_ALIAS = "gemma-3-270m"  # the name llama-server answers to (`--alias`)
START_TIMEOUT_S = 120.0
# Sampling is fixed so the same request yields the same tokens: direct and proxied streams can
# then be compared byte for byte (modulo the ids and times llama-server makes per request).
SEED = 42

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


@dataclass(frozen=True)
class LlamaFiles:
    server: Path
    model: Path


def cache_dir(environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    """Where .ci/llama-server.sh puts its build (the same rule, in the same order)."""
    root = environ.get("MP_LLAMA_CACHE")
    if not root:
        xdg = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "meterproxy")
    return Path(root) / f"llama-{LLAMA_PKG_VERSION}"


def find_llama() -> LlamaFiles | str:
    """The binary and model, or why they are missing."""
    cache = cache_dir()
    server = Path(os.environ.get("MP_LLAMA_SERVER") or cache / "bin" / "llama-server")
    model = Path(os.environ.get("MP_LLAMA_MODEL") or cache / MODEL_FILE)
    missing = [str(p) for p in (server, model) if not p.is_file()]
    if missing:
        return (
            f"llama-server or its model is missing ({', '.join(missing)}); "
            "build them once with `bash .ci/llama-server.sh` (about 10 minutes on 2 cores), "
            "or point MP_LLAMA_SERVER and MP_LLAMA_MODEL at existing files"
        )
    return LlamaFiles(server, model)


def require_llama() -> LlamaFiles:
    found = find_llama()
    if isinstance(found, str):
        missing(found)
    return found


@dataclass
class LlamaServer:
    """A running llama-server; `url` is its root, `base_url` its OpenAI /v1 base."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    model: str = MODEL_ALIAS
    args: tuple[str, ...] = field(default=())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def metrics(self) -> dict[str, float]:
        """llama-server's own Prometheus counters (`--metrics`), unlabelled samples by name."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        return parse_metrics(text)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def parse_metrics(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not match.group(2):
            samples[match.group(1)] = float(match.group(3))
    return samples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_llama_server(
    files: LlamaFiles, workdir: Path, *, parallel: int = 2, ctx_size: int = 4096
) -> LlamaServer:
    """Start llama-server and wait until /health answers 200 (the model is loaded)."""
    args = (
        "--model", str(files.model),
        "--alias", MODEL_ALIAS,
        "--host", "127.0.0.1",
        "--metrics",
        "--jinja",  # the model's own chat template, which is what makes tools work
        "--parallel", str(parallel),  # n=2 runs its two choices side by side
        "--ctx-size", str(ctx_size),
        "--threads", "2",
        "--seed", str(SEED),
        "--no-webui",
        "--no-warmup",
    )  # fmt: skip
    last_error = ""
    for _attempt in range(3):  # the port may be taken between choosing and binding it
        port = _free_port()
        log_path = workdir / f"llama-server-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(files.server), *args, "--port", str(port)],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = LlamaServer(process, port, log_path, args=args)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return server
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                last_error = str(exc)  # 503 while the model loads, refused before it listens
            time.sleep(0.2)
        server.stop()
        last_error = f"{last_error}\n{server.log()[-4000:]}"
    raise RuntimeError(f"llama-server did not become healthy: {last_error}")


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """One llama-server for the session (the model loads once); tests compare counter deltas."""
    files = require_llama()
    server = start_llama_server(files, tmp_path_factory.mktemp("llama"))
    try:
        yield server
    finally:
        server.stop()
