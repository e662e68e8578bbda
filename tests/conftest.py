"""Shared fixtures: a real Jarvis server on 127.0.0.1 and the official OpenAI client.

`jarvis_server(**env)` starts `python -m jarvis serve` in a subprocess on a free
port, waits until it answers, and stops it at the end of the test module.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    base_url: str  # http://127.0.0.1:PORT
    log_path: Path

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict:
        return httpx.get(f"{self.base_url}/health", timeout=10).json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def assert_same_until_a_near_tie(expected, actual, gap: float = 0.3) -> None:
    """`actual` has `expected`'s tokens, or parts from them once, where `expected`'s two likeliest were close
    and `actual` took the second (completion logprobs, `logprobs=2` or more). Greedy text of sequences
    decoded together in one batch may part there from the text of one decoded alone: the batched matmuls
    round differently (llama.cpp: a mean 0.04, at most 0.25 nats of logprob)."""
    for i, (want, got) in enumerate(zip(expected.tokens, actual.tokens, strict=True)):
        if want != got:
            (first, p1), (second, p2) = sorted(expected.top_logprobs[i].items(), key=lambda kv: -kv[1])[:2]
            assert got == second and p1 - p2 < gap, (i, expected.tokens, actual.tokens, expected.top_logprobs[i])
            return


def start_server(tmp_dir: Path, wait_ready: bool = True, extra_pythonpath: str | None = None,
                 ready_within: float = 120, port: int | None = None, **env: str) -> RunningServer:
    """`port`: None = a free one; a given port serves a restart at the same address."""
    port = port or free_port()
    environ = {**os.environ, "JARVIS_HOST": "127.0.0.1", "JARVIS_PORT": str(port),
               "JARVIS_LOG_LEVEL": "warning", "JARVIS_STATE_DIR": str(tmp_dir / "state"), **env}
    if extra_pythonpath:
        environ["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_pythonpath, environ.get("PYTHONPATH")]))
    log_path = tmp_dir / f"server-{port}.log"
    process = subprocess.Popen([sys.executable, "-m", "jarvis", "serve"], env=environ, cwd=tmp_dir,
                               stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    server = RunningServer(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + ready_within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            status = server.health().get("status", "protected")  # JARVIS_PROTECT_HEALTH answers 401
            if not wait_ready or status in ("ready", "failed", "protected"):
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server did not become ready:\n{server.log()}")


@pytest.fixture(scope="module")
def jarvis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RunningServer]]:
    started: list[RunningServer] = []

    def start(**env: str) -> RunningServer:
        server = start_server(tmp_path_factory.mktemp("server"), **env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


ENGINE_IDS = lambda engine: "upstream" if engine == "openai" else engine  # noqa: E731


def serve_engine(request: pytest.FixtureRequest, jarvis_server: Callable[..., RunningServer], engine: str,
                 max_model_len: str = "1024") -> RunningServer:
    """A server of the embedded model on `engine`: the session's vLLM server, an `openai` engine in front
    of a llama.cpp Jarvis, or a fresh server (hf's model converted before its start is timed)."""
    if engine == "vllm":
        return request.getfixturevalue("vllm_server")
    if engine == "openai":
        upstream = jarvis_server(JARVIS_INFERENCE_ENGINE="llama_cpp", JARVIS_MAX_MODEL_LEN=max_model_len)
        return jarvis_server(JARVIS_INFERENCE_ENGINE="openai", JARVIS_UPSTREAM_URL=upstream.v1)
    if engine == "hf":
        request.getfixturevalue("hf_folder")
    return jarvis_server(JARVIS_INFERENCE_ENGINE=engine, JARVIS_MAX_MODEL_LEN=max_model_len)


@pytest.fixture(scope="session")
def shared_engine_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                         ) -> Iterator[Callable[[str], RunningServer]]:
    """`shared_engine_server(engine)`: one server of the embedded model per engine with default settings, started
    on first use and shared by every module that only reads from it (no adapters loaded, no counters asserted),
    so a new surface's tests cost no new server starts."""
    started: dict[str, RunningServer] = {}
    mine: list[RunningServer] = []

    def start(**env: str) -> RunningServer:
        server = start_server(tmp_path_factory.mktemp("shared"), **env)
        mine.append(server)
        return server

    def get(engine: str) -> RunningServer:
        if engine not in started:
            started[engine] = serve_engine(request, lambda **env: start(**env), engine)
        return started[engine]

    yield get
    for server in mine:
        server.stop()


@pytest.fixture(scope="session")
def embedded_gguf() -> Path:
    from jarvis.embedded_model import embedded_model_path
    from jarvis.settings import load_settings

    return embedded_model_path(load_settings().data_dir)


def run_jarvis_cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """`python -m jarvis ARGS` with no inherited JARVIS_* settings but the data dir, plus `env`; wide output."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("JARVIS_") or k == "JARVIS_DATA_DIR"}
    return subprocess.run([sys.executable, "-m", "jarvis", *args], cwd=cwd,
                          env={**environ, "COLUMNS": "200", **env}, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def jarvis_cli() -> Callable[..., subprocess.CompletedProcess]:
    return run_jarvis_cli


@pytest.fixture(scope="session")
def start_jarvis() -> Callable[..., RunningServer]:
    """`start_jarvis(tmp_dir, **env)` for tests that manage a server's lifetime themselves."""
    return start_server


# --- a real LoRA adapter for the served model, shared by the engine tests ------------------------------

LORA_PROMPT = "The best thing about Jarvis is"


@pytest.fixture(scope="session")
def hf_folder():
    from jarvis.backends.model_tools.convert import embedded_hf_model
    from jarvis.settings import load_settings

    return embedded_hf_model(load_settings().data_dir)


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
def trained_lora(hf_folder, adapter_root):
    """A LoRA trained for a few steps, and the base's and the adapter's greedy answers from PEFT offline."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    inputs = tokenizer(LORA_PROMPT, return_tensors="pt")

    def greedy(m) -> str:
        with torch.inference_mode():
            out = m.generate(**inputs, max_new_tokens=12, do_sample=False)
        return tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)

    base_text = greedy(model)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0))
    batch = tokenizer(LORA_PROMPT + " that it answers every question with pirate talk, arr!", return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    peft_model.train()
    for _ in range(4):
        loss = peft_model(**batch, labels=batch.input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    path = adapter_root / "pirate"
    peft_model.save_pretrained(path)
    return {"path": path, "prompt": LORA_PROMPT, "base_text": base_text, "adapter_text": greedy(peft_model)}


# --- one vLLM server for the whole session: it takes about a minute to start -----------------------------

VLLM_ENV = {"JARVIS_INFERENCE_ENGINE": "vllm", "JARVIS_MAX_MODEL_LEN": "512", "JARVIS_VLLM_CPU_KVCACHE_SPACE": "1",
            "JARVIS_VLLM_MAX_LORAS": "2"}


def require_vllm() -> None:
    """Skip where vLLM is not installed, except in CI, where `./run.sh test` installs it and its absence is a bug."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI"):
            pytest.fail("vllm is not installed, but ./run.sh test installs it in CI")
        pytest.skip("vllm is not installed (./run.sh test installs vllm-cpu)")


@pytest.fixture
def vllm_installed() -> None:
    require_vllm()


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory, hf_folder, adapter_root) -> Iterator[RunningServer]:
    """The embedded model served by the real vLLM engine (CPU build in CI), LoRA enabled."""
    require_vllm()
    server = start_server(tmp_path_factory.mktemp("vllm"), ready_within=600, JARVIS_ADAPTER_ROOT=str(adapter_root),
                          **VLLM_ENV)
    assert server.health()["status"] == "ready", server.log()[-3000:]
    yield server
    server.stop()
