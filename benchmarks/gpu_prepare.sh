#!/usr/bin/env bash
# Prepare, on this (CPU) machine, what benchmarks/gpu_check.py needs on the GPU machine, whose python 3.12
# has torch with CUDA, numpy, scipy, scikit-image, pandas, matplotlib, rich and typer but no SimpleITK,
# nibabel or batchgenerators, and which reaches no package registry (docs/gpu-check.md):
#   .whl/batchgenerators-*.whl           the one missing package on the check's path (pure Python)
#   .gpu_data/hippocampus.tar.gz         Dataset004_Hippocampus planned and preprocessed (3d_fullres)
# Both folders are git-ignored; the `run` tool's carry sends them along with the checkout. At the end
# it prints what would travel (tracked and untracked-not-ignored files + the two folders): at most 64 MiB.
#
# Usage: benchmarks/gpu_prepare.sh [RAW_ROOT]   (RAW_ROOT holds Dataset004_Hippocampus; default ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
raw="$(cd "${1:-${AUTOSEG_RAW:-../shared/data}}" && pwd)"
limit=$((64 * 1024 * 1024))

for folder in .whl .gpu_data; do
    git check-ignore -q "$folder/x" || { echo "$folder/ is not git-ignored: add /$folder/ to .gitignore" >&2; exit 1; }
done

# the same batchgenerators version as here, as a python 3.12 wheel (it is pure Python: py3-none-any)
version="$(python -c 'import importlib.metadata as m; print(m.version("batchgenerators"))')"
rm -rf .whl && mkdir -p .whl
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "batchgenerators==$version"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
AUTOSEG_RAW="$raw" AUTOSEG_PREPROCESSED="$scratch" autoseg plan 4
AUTOSEG_RAW="$raw" AUTOSEG_PREPROCESSED="$scratch" autoseg preprocess 4 -c 3d_fullres
rm -rf .gpu_data && mkdir -p .gpu_data
tar -C "$scratch" -czf .gpu_data/hippocampus.tar.gz Dataset004_Hippocampus

checkout=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r stat -c %s -- 2>/dev/null \
    | awk '{s += $1} END {print s + 0}')
carried=$(find .whl .gpu_data -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
total=$((checkout + carried))
awk -v a="$checkout" -v b="$carried" -v t="$total" \
    'BEGIN {printf "checkout %.1f MiB + carried %.1f MiB = %.1f MiB of 64 MiB\n", a / 2^20, b / 2^20, t / 2^20}'
ls -l .whl .gpu_data
if [ "$total" -gt "$limit" ]; then
    echo "too large for the device machine's 64 MiB" >&2
    exit 1
fi
