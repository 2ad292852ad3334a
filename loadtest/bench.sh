#!/usr/bin/env bash
# Warbler vs Janus on this machine, in one sitting: the standard scenarios (compare mode),
# a capacity search for both, the per-packet CPU floor (../shared/tools/floor), and a profile
# of Warbler. The SFU under test is pinned to one core and the tester to the other.
#
# Usage: loadtest/bench.sh [--quick] [--skip-floor] [--skip-profile] [--skip-capacity]
# Env:   BENCH_OUT (default bench/), SCENARIOS (default "audio video livestream simulcast churn chat"),
#        DURATION (s, default 20), MAX_LOAD (wait until the 1-min load average is below, default 0.7),
#        FLOOR_DIR (default ../shared/tools/floor relative to the repo).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${BENCH_OUT:-$ROOT/bench}
SCENARIOS=${SCENARIOS:-"audio video livestream simulcast churn chat"}
DURATION=${DURATION:-20}
MAX_LOAD=${MAX_LOAD:-0.7}
FLOOR_DIR=${FLOOR_DIR:-$ROOT/../shared/tools/floor}
QUICK=0 SKIP_FLOOR=0 SKIP_PROFILE=0 SKIP_CAPACITY=0
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1; DURATION=8 ;;
    --skip-floor) SKIP_FLOOR=1 ;;
    --skip-profile) SKIP_PROFILE=1 ;;
    --skip-capacity) SKIP_CAPACITY=1 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT/raw"
LOG="$OUT/bench.log"
: > "$LOG"
say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# --- Tools -------------------------------------------------------------------------------
if ! command -v janus >/dev/null; then
  say "installing janus (Debian)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends janus >>"$LOG" 2>&1
fi
for t in taskset cmake nasm; do
  command -v "$t" >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends util-linux cmake nasm >>"$LOG" 2>&1; break; }
done
say "building release binaries"
cargo build --release -p warbler-signaling -p warbler-loadtest >>"$LOG" 2>&1
LT="$ROOT/target/release/warbler-loadtest"
WARBLER="$ROOT/target/release/warbler"
CPUS=$(nproc)
SFU_CPU=0
TESTER_CPU=$(( CPUS > 1 ? 1 : 0 ))
PIN="taskset -c $TESTER_CPU"

# --- Quiet machine -----------------------------------------------------------------------
wait_quiet() {
  # Bounded: at most $1 × 10 s (default 30: 5 minutes); the load is recorded either way.
  local i
  for i in $(seq 1 "${1:-30}"); do
    local l; l=$(cut -d' ' -f1 /proc/loadavg)
    if awk -v l="$l" -v m="$MAX_LOAD" 'BEGIN{exit !(l < m)}'; then return 0; fi
    [ "$i" = 1 ] && say "waiting for the load average ($l) to fall below $MAX_LOAD"
    sleep 10
  done
  say "load still $(cut -d' ' -f1 /proc/loadavg): measuring anyway"
}
wait_quiet 12
say "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)" > "$OUT/environment.txt"
{ echo "cores=$CPUS sfu_cpu=$SFU_CPU tester_cpu=$TESTER_CPU"; uname -a; grep -m1 'model name' /proc/cpuinfo;
  (janus --version 2>/dev/null || true) | head -2; git -C "$ROOT" log -1 --format='warbler commit %H %s'; } >> "$OUT/environment.txt" || true

# --- Floor -------------------------------------------------------------------------------
if [ "$SKIP_FLOOR" = 0 ] && [ -d "$FLOOR_DIR" ]; then
  say "floor (per-packet CPU floor of SRTP + UDP send on this machine)"
  FLOOR_ARGS="--subs 10,100 --reps 3"
  [ "$QUICK" = 1 ] && FLOOR_ARGS="--subs 10 --quick"
  CARGO_TARGET_DIR="$ROOT/target/floor" cargo run --release --manifest-path "$FLOOR_DIR/Cargo.toml" -- $FLOOR_ARGS \
    > "$OUT/floor.txt" 2>>"$LOG" || say "floor failed (see bench.log)"
fi

# --- Scenarios, both targets -------------------------------------------------------------
for sc in $SCENARIOS; do
  wait_quiet 6
  say "compare $sc"
  $PIN "$LT" compare --scenario "$sc" --duration "$DURATION" --sfu-cpu "$SFU_CPU" --warbler-bin "$WARBLER" \
    --out "$OUT/raw" --no-progress 2>>"$LOG" | tee -a "$LOG" || say "compare $sc failed"
done

# --- Capacity ----------------------------------------------------------------------------
if [ "$SKIP_CAPACITY" = 0 ]; then
  wait_quiet 6
  say "capacity search (livestream: one publisher, subscribers raised until loss > 1% or p99 > 50 ms)"
  CAP_ARGS="--start 50 --factor 1.6 --max-steps 8 --join-rate 50"
  [ "$QUICK" = 1 ] && CAP_ARGS="--start 10 --factor 2 --max-steps 3"
  $PIN "$LT" capacity --scenario livestream --duration "$DURATION" --sfu-cpu "$SFU_CPU" --warbler-bin "$WARBLER" \
    $CAP_ARGS --out "$OUT/raw" --no-progress 2>>"$LOG" | tee -a "$LOG" || say "capacity failed"
fi

# --- Profile of Warbler under the video scenario -----------------------------------------
if [ "$SKIP_PROFILE" = 0 ]; then
  wait_quiet 6
  PORT=18200
  if command -v perf >/dev/null && perf record -e cpu-clock -o /dev/null true >/dev/null 2>&1; then
    say "profile: perf record (cpu-clock, DWARF call graphs) of warbler during livestream with 300 subscribers"
    WARBLER_LIMITS__MAX_PARTICIPANTS_PER_ROOM=10000 taskset -c "$SFU_CPU" "$WARBLER" serve --listen 127.0.0.1:$PORT --rtc-port $((PORT+1)) --public-ip 127.0.0.1 \
      --data-dir "$(mktemp -d)" 2>>"$LOG" &
    WPID=$!
    sleep 2
    perf record -e cpu-clock -F 999 --call-graph dwarf,16384 -p "$WPID" -o "$OUT/raw/perf.data" -- sleep $((DURATION + 30)) >>"$LOG" 2>&1 &
    PPID_=$!
    $PIN "$LT" run --target warbler --scenario livestream --subscribers 300 --join-rate 50 --duration "$DURATION" \
      --warbler-url http://127.0.0.1:$PORT --warbler-pid "$WPID" --out "$OUT/raw/profile" --no-progress 2>>"$LOG" | tee -a "$LOG" || true
    wait "$PPID_" || true
    kill -TERM "$WPID" 2>/dev/null || true; wait "$WPID" 2>/dev/null || true
    perf report -i "$OUT/raw/perf.data" --no-children --percent-limit 0.5 --stdio --sort symbol -g none 2>/dev/null \
      | grep '%' | sed 's/ *$//' | cut -c1-200 > "$OUT/profile-warbler.txt" || true
    perf report -i "$OUT/raw/perf.data" --children --percent-limit 1 --stdio --sort symbol -g none 2>/dev/null \
      | grep '%' | sed 's/ *$//' | cut -c1-200 > "$OUT/profile-warbler-inclusive.txt" || true
  elif command -v valgrind >/dev/null; then
    say "profile: valgrind callgrind of warbler (small load: it runs ~50x slower)"
    WARBLER_LIMITS__MAX_PARTICIPANTS_PER_ROOM=10000 valgrind --tool=callgrind --callgrind-out-file="$OUT/raw/callgrind.out" "$WARBLER" serve --listen 127.0.0.1:$PORT \
      --rtc-port $((PORT+1)) --public-ip 127.0.0.1 --data-dir "$(mktemp -d)" 2>>"$LOG" &
    WPID=$!
    sleep 8
    $PIN "$LT" run --target warbler --scenario smoke --duration "$DURATION" --warbler-url http://127.0.0.1:$PORT \
      --out "$OUT/raw/profile" --no-progress 2>>"$LOG" | tee -a "$LOG" || true
    kill -TERM "$WPID" 2>/dev/null || true; wait "$WPID" 2>/dev/null || true
    callgrind_annotate "$OUT/raw/callgrind.out" 2>/dev/null | head -80 > "$OUT/profile-warbler.txt" || true
  fi
fi

echo "load_at_end=$(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/environment.txt"

# --- Summary -----------------------------------------------------------------------------
{
  echo "# Warbler vs Janus — benchmark of $(date -u +%Y-%m-%d)"
  echo
  echo '```'; cat "$OUT/environment.txt"; echo '```'
  for f in "$OUT"/raw/compare-*.md; do [ -f "$f" ] && { echo; cat "$f"; }; done
  for f in "$OUT"/raw/capacity-*.md; do [ -f "$f" ] && { echo; cat "$f"; }; done
  if [ -f "$OUT/floor.txt" ]; then echo; echo "## Floor (../shared/tools/floor, same sitting)"; echo '```'; cat "$OUT/floor.txt"; echo '```'; fi
  if [ -f "$OUT/profile-warbler.txt" ]; then echo; echo "## Warbler profile (livestream, 300 subscribers; self time)"; echo '```'; head -60 "$OUT/profile-warbler.txt"; echo '```'; fi
} > "$OUT/summary.md"
# Keep the committed results small: the JSON and HTML per run, not perf.data.
rm -f "$OUT/raw/perf.data" "$OUT/raw/perf.data.old"
say "done: $OUT/summary.md"
