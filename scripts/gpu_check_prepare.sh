#!/usr/bin/env bash
# Prepare what scripts/gpu_check.py needs on a lent GPU machine whose image lacks it, into .gpu/ (gitignored):
#   .gpu/wheels/      the packages the device image lacks or has too old (Python 3.12, x86-64, no dependencies):
#                     trl, datasets (+ dill, multiprocess), rouge-score (+ nltk, defusedxml), gguf, liger-kernel,
#                     bitsandbytes, and transformers 5.24 / peft 0.21.2 / regex (the image has transformers 5.17)
#   .gpu/assets.tar.xz the TinyLlama tokenizer and config and the Dolly sample, from $TINYLLAMA_ASSETS
# Together with the working tree they must stay under the device's 64 MiB a call (this script checks).
set -euo pipefail
cd "$(dirname "$0")/.."
assets="${TINYLLAMA_ASSETS:-$(cd .. && pwd)/shared/assets}"
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/stage/assets
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
  -d .gpu/wheels trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 nltk==3.10.4 defusedxml==0.7.1 \
  gguf==0.19.0 liger-kernel==0.8.5 bitsandbytes==0.50.2 peft==0.21.2 transformers==5.24.0 regex==2026.11.19
python -m pip wheel -q --no-deps -w .gpu/wheels rouge-score==0.1.2  # an sdist only: built here (pure Python)
cp -r "$assets/tinyllama-tokenizer" "$assets/tinyllama-1.1b-config" "$assets/dolly" .gpu/stage/assets/
tar -C .gpu/stage -cJf .gpu/assets.tar.xz assets && rm -rf .gpu/stage
size=$(( $(du -sb .gpu | cut -f1) + $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) ))
echo "gpu_check_prepare: .gpu + tracked files = $((size / 1048576)) MiB (the device takes 64 MiB a call)"
[ "$size" -lt $((64 * 1048576)) ] || { echo "error: over 64 MiB: carry fewer wheels" >&2; exit 1; }
