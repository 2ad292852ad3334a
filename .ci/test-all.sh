#!/usr/bin/env bash
# Runs every test of Warbler: unit and integration tests (Rust, native WebRTC peers), interop with
# aiortc over WHIP/WHEP, and end-to-end tests of the web demo in headless Chromium and Firefox.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps.sh

echo "== build"
cargo build --workspace --all-targets --locked
echo "== unit and integration tests"
cargo test --workspace --locked
echo "== interop: aiortc over WHIP/WHEP (media) and WHIP data channels (chat)"
.venv/bin/python signaling/tests/interop/aiortc_whip_whep.py --bin target/debug/warbler
.venv/bin/python signaling/tests/interop/aiortc_chat_whip.py --bin target/debug/warbler
echo "== web demo in real browsers"
WARBLER_BIN="$PWD/target/debug/warbler" bash web-demo/tests/run.sh
echo "== all tests passed"
