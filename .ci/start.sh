#!/usr/bin/env bash
# Builds Warbler (release) and starts it with embedded defaults: web demo on http://127.0.0.1:8080/,
# all WebRTC peers on UDP port 50000, state in ./warbler-data. Extra arguments go to `warbler serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps.sh --build-only
cargo build --release --locked -p warbler-signaling
exec target/release/warbler serve "$@"
