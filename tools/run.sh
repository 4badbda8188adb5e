#!/usr/bin/env bash
# The main job: start the pinned ComfyUI with this pack, queue the example workflows over the HTTP API and
# write the images to ./out. Real weights are used when they are in ./models (ComfyUI's folder layout);
# otherwise tiny random smoke-test weights in the real formats are generated (the images are then noise).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash tools/setup.sh
PY=${QWENPIX_PYTHON:-$ROOT/.venv/bin/python}
if [[ "${1:-}" == "--bench" ]]; then  # `bash tools/run.sh --bench [options]`: time the DiT on this machine's device
  shift
  exec "$PY" -m qwen_image_core bench "$@"
fi
exec "$PY" -m tools.run_workflows "$@"
