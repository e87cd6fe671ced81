#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` from the llama.cpp source that the llama-cpp-python sdist vendors, so the
# server speaks for the same llama.cpp as the Python bindings the tests use. The binary is cached under
# .cache/llama-server/<version>/ (gitignored); a second call with the same version only prints its path.
#   scripts/build_llama_server.sh            # builds (2 jobs) if missing, prints the binary's path last
#   JOBS=4 scripts/build_llama_server.sh     # more parallel compile jobs
# About 1,250 CPU-seconds of compiling (from a partial build on a loaded 2-core VM): see docs/EXPORT.md.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cmake >/dev/null || python -m pip install -q cmake  # CMake >= 3.14; the PyPI wheel where there is none

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"  # keep equal to the llama-cpp-python pin in .ci/run
out=".cache/llama-server/$version"
if [[ -x "$out/llama-server" ]]; then
    echo "$PWD/$out/llama-server"
    exit 0
fi

work="$(mktemp -d)"
trap 'status=$?; [[ $status -ne 0 ]] && tail -n 30 "$work"/*.log >&2; rm -rf "$work"' EXIT
python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
# CPU only, no web UI (its prebuilt assets come from the hub), no HTTPS, one static binary.
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON >"$work/cmake.log"
cmake --build "$work/build" --target llama-server -j "${JOBS:-2}" >"$work/build.log"
mkdir -p "$out"
cp "$work/build/bin/llama-server" "$out/llama-server.tmp"
mv "$out/llama-server.tmp" "$out/llama-server"  # never a half-copied binary at the cached path
echo "$PWD/$out/llama-server"
