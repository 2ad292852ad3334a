#!/usr/bin/env bash
# Installs what building and testing Warbler needs on a fresh Debian machine. Idempotent: each
# step checks first and does nothing when the tool is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)            # bundled libopus build
command -v nasm >/dev/null || need_apt+=(nasm)              # OpenH264 assembly (fast encoder)
command -v cc >/dev/null || need_apt+=(build-essential)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
if [ "${1:-}" != "--build-only" ]; then
  command -v chromium >/dev/null || need_apt+=(chromium fonts-liberation)
  command -v firefox-esr >/dev/null || need_apt+=(firefox-esr)
  command -v node >/dev/null || need_apt+=(nodejs npm)
  python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust (https://rustup.rs) first" >&2
  exit 1
fi

[ "${1:-}" = "--build-only" ] && exit 0

# Python: aiortc, an independent WebRTC stack for interop tests.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import aiortc, numpy' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r signaling/tests/interop/requirements.txt
fi

# Node: playwright-core and puppeteer-core drive Debian's Chromium and Firefox (no browser downloads).
if [ ! -d web-demo/node_modules/playwright-core ] || [ ! -d web-demo/node_modules/puppeteer-core ]; then
  (cd web-demo && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
fi
