#!/usr/bin/env bash
# Runs the web demo's browser end-to-end tests: installs the pinned node packages, then node --test.
# Expects the server binary at $WARBLER_BIN (default target/debug/warbler); never downloads browsers.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
web="$(dirname "$here")"
repo="$(dirname "$web")"
export PUPPETEER_SKIP_DOWNLOAD=1 PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
cd "$web"
if [ -f package-lock.json ]; then npm ci --no-audit --no-fund; else npm install --no-audit --no-fund; fi
cd "$repo"
exec node --test --test-concurrency=1 web-demo/tests/
