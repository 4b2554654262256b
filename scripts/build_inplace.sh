#!/usr/bin/env bash
# Builds the C++ module into the source tree, for working with PYTHONPATH=.
# (pip install . is the way to install; this is the fast edit-compile loop).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
cmake -S . -B build/inplace -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$("$python" -c 'import sys; print(sys.executable)')" -Wno-dev >/dev/null
cmake --build build/inplace
# Copied, then renamed into place: a running process keeps the module it loaded.
for module in build/inplace/_core*.so; do
  name=$(basename "$module")
  cp "$module" "jax_vattention/.$name" && mv "jax_vattention/.$name" "jax_vattention/$name"
done
if [ -f build/inplace/_core.pyi ]; then cp build/inplace/_core.pyi jax_vattention/; fi
# The wheel installs models/ as jax_vattention.models; in the tree a link stands in for it.
ln -sfn ../models jax_vattention/models
