#!/usr/bin/env python3
"""Builds the results table (markdown) from a bench directory: compare-*.json, capacity-*.json
and floor.txt. Usage: table.py BENCH_DIR"""
import glob, json, os, re, sys

d = sys.argv[1] if len(sys.argv) > 1 else "bench"
floor = {}
try:
    for line in open(os.path.join(d, "floor.txt")):
        m = re.match(r"\s*(AES128_GCM|CM_SHA1_80)\s+rtc-srtp\s+(\d+)\s+([\d.]+)\s+([\d.]+)", line)
        if m:
            floor[(m.group(1), int(m.group(2)))] = float(m.group(4)) / 1000.0
except OSError:
    pass
f10 = floor.get(("AES128_GCM", 10))
order = ["audio", "video", "livestream", "simulcast", "churn", "chat"]
rows = []
for path in glob.glob(os.path.join(d, "raw", "compare-*.json")):
    c = json.load(open(path))
    rows.append(c)
rows.sort(key=lambda c: order.index(c["scenario"]["name"]) if c["scenario"]["name"] in order else 99)
print("| scenario | delivered pkt/s | SFU µs per forwarded packet (Warbler / Janus) | Warbler ÷ Janus | pkt/s per core (Warbler / Janus) | latency p99 ms (W / J) | loss % (W / J) | Warbler ÷ floor | load avg |")
print("|---|---|---|---|---|---|---|---|---|")
for c in rows:
    w, j = c["warbler"], c["janus"]
    ratio = w["sfu_us_per_forwarded_packet"] / j["sfu_us_per_forwarded_packet"] if j["sfu_us_per_forwarded_packet"] else float("nan")
    fl = f"{w['sfu_us_per_forwarded_packet'] / f10:.1f}×" if f10 else "—"
    print(f"| {c['scenario']['name']} ({w['description']}) | {w['delivered_pps']:.0f} | {w['sfu_us_per_forwarded_packet']:.2f} / {j['sfu_us_per_forwarded_packet']:.2f} | {ratio:.2f} | "
          f"{w['forwarded_pps_per_core']:.0f} / {j['forwarded_pps_per_core']:.0f} | {w['latency_ms']['p99']:.1f} / {j['latency_ms']['p99']:.1f} | "
          f"{w['loss_pct']:.3f} / {j['loss_pct']:.3f} | {fl} | {w['load_average'].split()[0]} / {j['load_average'].split()[0]} |")
if f10:
    print(f"\nFloor (same sitting, `floor` fan-out over loopback, AES128_GCM, rtc-srtp, N=10, median): {f10:.2f} µs per forwarded packet"
          + (f"; N=100: {floor[('AES128_GCM', 100)]:.2f} µs" if ("AES128_GCM", 100) in floor else ""))
for path in glob.glob(os.path.join(d, "raw", "capacity-*.json")):
    data = json.load(open(path))
    if not isinstance(data, list):
        continue
    print()
    for r in data:
        held = r["largest_that_held"]
        print(f"- capacity {r['scenario']['name']} on {r['target']}: largest subscriber count that held = {held}; stopped: {r['stopped_because']}")
