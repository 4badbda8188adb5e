#!/usr/bin/env bash
# Idempotent install of what the browser tests (tests/test_e2e_frontend.py) need:
#  - Debian's chromium (apt-get), skipped when /usr/bin/chromium exists; no browser build is ever downloaded;
#  - playwright-core, pinned in tests/frontend/package.json + package-lock.json, installed with npm into the
#    ignored folder .comfyui/browser/node_modules (the Node script loads it from there).
# A second run only compares a stamp and returns. If something cannot be installed (no apt-get, not root, no
# Node.js >= 20), it says why on stderr, records the reason in .comfyui/browser/UNAVAILABLE and exits 0: the browser
# tests then skip with that reason and the rest of the suite still runs.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST="$ROOT/.comfyui/browser"
SPEC="$ROOT/tests/frontend"
CHROMIUM=${QWENPIX_CHROMIUM:-/usr/bin/chromium}
STAMP="$DEST/.stamp-$(cat "$SPEC/package.json" "$SPEC/package-lock.json" | sha256sum | cut -c1-16)"
mkdir -p "$DEST"

unavailable() {
  echo "[setup_browser] browser tests unavailable: $1" >&2
  echo "$1" > "$DEST/UNAVAILABLE"
  exit 0
}

if [ -x "$CHROMIUM" ] && [ -f "$STAMP" ] && [ -f "$DEST/node_modules/playwright-core/package.json" ]; then
  rm -f "$DEST/UNAVAILABLE"
  exit 0
fi

if [ ! -x "$CHROMIUM" ]; then
  command -v apt-get > /dev/null || unavailable "$CHROMIUM is missing and apt-get is not available"
  SUDO=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo > /dev/null && sudo -n true 2> /dev/null || unavailable "$CHROMIUM is missing; installing it needs root"
    SUDO=(sudo -n)
  fi
  echo "[setup_browser] installing Debian chromium (one time, about 30 s)" >&2
  "${SUDO[@]}" apt-get update -qq || unavailable "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium > /dev/null \
    || unavailable "apt-get install chromium failed"
  [ -x "$CHROMIUM" ] || unavailable "the chromium package did not provide $CHROMIUM"
fi

if [ ! -f "$STAMP" ] || [ ! -f "$DEST/node_modules/playwright-core/package.json" ]; then
  command -v npm > /dev/null || unavailable "npm (Node.js >= 20) is not installed"
  [ "$(node -p 'process.versions.node.split(".")[0]' 2> /dev/null || echo 0)" -ge 20 ] \
    || unavailable "playwright-core needs Node.js >= 20, found $(node --version 2> /dev/null || echo none)"
  echo "[setup_browser] installing playwright-core into $DEST (no browser download)" >&2
  cp "$SPEC/package.json" "$SPEC/package-lock.json" "$DEST/"
  (cd "$DEST" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error > /dev/null) \
    || unavailable "npm ci playwright-core failed"
  rm -f "$DEST"/.stamp-*
  touch "$STAMP"
fi
rm -f "$DEST/UNAVAILABLE"
