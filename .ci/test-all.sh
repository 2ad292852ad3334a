#!/usr/bin/env bash
# Runs every test of Warbler: unit and integration tests (Rust, native WebRTC peers), interop with
# aiortc over WHIP/WHEP, and end-to-end tests of the web demo in headless Chromium and Firefox.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps.sh

# Honour a shared CARGO_TARGET_DIR (reusing a build across clones); default ./target.
BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/debug"
# A one-shot build gains nothing from incremental state, which is as large as the build itself.
if [ "${CI:-}" = "true" ]; then export CARGO_INCREMENTAL=0; fi
echo "== build"
cargo build --workspace --all-targets --locked
du -sh "${CARGO_TARGET_DIR:-$PWD/target}" 2>/dev/null || true
df -h . | tail -1
echo "== unit and integration tests"
cargo test --workspace --locked
echo "== interop: aiortc over WHIP/WHEP (media) and WHIP data channels (chat)"
.venv/bin/python signaling/tests/interop/aiortc_whip_whep.py --bin "$BIN_DIR/warbler"
.venv/bin/python signaling/tests/interop/aiortc_chat_whip.py --bin "$BIN_DIR/warbler"
echo "== web demo in real browsers"
WARBLER_BIN="$BIN_DIR/warbler" bash web-demo/tests/run.sh
echo "== all tests passed"
