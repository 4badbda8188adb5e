#!/usr/bin/env bash
# The main job: start the pinned ComfyUI with this pack, queue the example workflows over the HTTP API and
# write the images to ./out. Real weights are used when they are in ./models (ComfyUI's folder layout);
# otherwise tiny random smoke-test weights in the real formats are generated (the images are then noise).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash tools/setup.sh
PY=${QWENPIX_PYTHON:-$ROOT/.venv/bin/python}
exec "$PY" -m tools.run_workflows "$@"
