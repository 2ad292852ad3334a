"""A WHEP viewer on aiortc (REMB only: aiortc has no transport-cc, it offers abs-send-time and
answers with REMB), for the shaped-link tests. It watches one participant's video, decodes it and
prints one JSON line per sample to stdout: {"t", "width", "height", "frames", "state"} (t in
seconds since start, frames decoded so far). It stops on SIGTERM/SIGINT, on stdin EOF, or after
--duration seconds, ending the WHEP session with DELETE.

Usage: aiortc_whep_viewer.py --base http://HOST:PORT --room R --identity PUBLISHER --token T
"""

import argparse
import asyncio
import json
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

from aiortc import RTCPeerConnection, RTCSessionDescription


def http(method, url, token, body=None, content_type=None):
    req = urllib.request.Request(url, data=body.encode() if body is not None else None, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return res.status, dict(res.headers), res.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(args) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # stdin EOF (the test closed its end) also stops us; a daemon thread, so exit never waits on it.
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()

    started = time.monotonic()
    latest = {"width": 0, "height": 0, "frames": 0}
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    tasks = []

    async def consume(track):
        while True:
            frame = await track.recv()
            latest["width"], latest["height"] = frame.width, frame.height
            latest["frames"] += 1

    @pc.on("track")
    def on_track(track):
        if track.kind == "video":
            tasks.append(asyncio.ensure_future(consume(track)))

    await pc.setLocalDescription(await pc.createOffer())
    url = f"{args.base}/whep/{args.room}/{args.identity}"
    status, headers, answer = await loop.run_in_executor(
        None, lambda: http("POST", url, args.token, pc.localDescription.sdp, "application/sdp"))
    if status != 201:
        emit({"error": f"WHEP POST {status}: {answer}"})
        return 1
    location = headers.get("Location") or headers.get("location")
    emit({"event": "answer", "abs_send_time": "abs-send-time" in answer, "transport_cc": "transport-cc" in answer,
          "remb": "goog-remb" in answer})
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    deadline = started + args.duration
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            emit({"t": round(time.monotonic() - started, 3), **latest, "state": pc.connectionState})
            try:
                await asyncio.wait_for(stop.wait(), timeout=args.interval)
            except asyncio.TimeoutError:
                pass
    finally:
        for t in tasks:
            t.cancel()
        if location:
            await loop.run_in_executor(None, lambda: http("DELETE", args.base + location, args.token))
        await pc.close()
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--room", required=True)
    ap.add_argument("--identity", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--duration", type=float, default=180.0)
    ap.add_argument("--interval", type=float, default=0.25)
    sys.exit(asyncio.run(main(ap.parse_args())))
