"""The installed llama.cpp build decodes on this machine.

Some native builds load a model and then die with SIGSEGV inside `llama_decode`
(AVX-512/AMX code paths on some x86-64 hosts). Decoding in a child process
turns such a crash into a failing test with the cause, instead of a dead
server or a dead test run.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

DECODE = """
import sys
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=256, verbose=False)
out = llm.create_completion("The capital of France is", max_tokens=8, temperature=0)
print(out["choices"][0]["text"])
"""

FIX = ("rebuild llama-cpp-python with portable flags: remove .venv/.llama-cpp-* and rerun ./run.sh "
       "(it builds with -DGGML_NATIVE=OFF -DGGML_AVX2=ON and AVX-512/AMX off)")


def test_a_fresh_process_decodes_the_embedded_model(embedded_gguf):
    done = subprocess.run([sys.executable, "-c", DECODE, str(embedded_gguf)], capture_output=True, text=True,
                          timeout=300)
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        pytest.fail(f"llama.cpp crashed with {name} while decoding: {FIX}\n{done.stderr[-2000:]}")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip()) > 0


@pytest.mark.skipif(platform.machine() != "x86_64" or bool(os.environ.get("JARVIS_LLAMA_CMAKE_ARGS")),
                    reason="the portable-flags build applies to x86-64 with run.sh's default flags")
def test_the_build_has_no_avx512_or_amx_kernels():
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    assert "AVX2 = 1" in info, info
    for feature in ("AVX512 = 1", "AMX_INT8 = 1"):
        assert feature not in info, f"{feature} in a build meant to be portable: {FIX}\n{info}"


def test_the_build_leaves_out_what_the_bindings_never_load():
    """run.sh builds without llama.cpp's multimodal library (LLAVA_BUILD=OFF) and its common library
    (cmake/llama-cpp-no-common.cmake): the bindings load libllama and libggml only, and neither of the two is
    compiled or shipped."""
    from pathlib import Path

    import llama_cpp

    libs = sorted(p.name for p in (Path(llama_cpp.__file__).parent / "lib").iterdir())
    assert any(name.startswith("libllama.") for name in libs), libs
    assert not [name for name in libs if "common" in name or "mtmd" in name or "llava" in name], libs
