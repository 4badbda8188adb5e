#!/usr/bin/env bash
# The test suite: sets up the pinned environment once (tools/setup.sh), then lint + pytest.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -m "not e2e"` or `-k vae`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash tools/setup.sh
bash tools/setup_browser.sh  # Chromium (apt) + playwright-core for the frontend tests; no-op once installed
PY=${QWENPIX_PYTHON:-$ROOT/.venv/bin/python}
"$PY" -m ruff check .
"$PY" -m ruff format --check qwen_image_core nodes tools tests bench
exec "$PY" -m pytest "$@"
