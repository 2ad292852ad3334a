"""Interop with an independent WebRTC stack (aiortc): a synthetic camera published through WHIP is
watched through WHEP by another aiortc client, which decodes frames; sessions end with DELETE.

Usage: aiortc_whip_whep.py [--bin PATH_TO_WARBLER]
Exits non-zero on failure; prints what it measured.
"""

import argparse
import asyncio
import fractions
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy
from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.contrib.media import MediaBlackhole  # noqa: F401  (import check: media helpers present)
from av import VideoFrame

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MovingBars(VideoStreamTrack):
    """640x360 synthetic picture with a moving bar, 30 fps."""

    def __init__(self):
        super().__init__()
        self.n = 0

    async def recv(self):
        pts, time_base = await self.next_timestamp()
        img = numpy.zeros((360, 640, 3), numpy.uint8)
        x = (self.n * 8) % 640
        img[:, x : x + 32, :] = 255
        img[:, :, 1] = (numpy.arange(640) % 256).astype(numpy.uint8)
        self.n += 1
        frame = VideoFrame.from_ndarray(img, format="bgr24")
        frame.pts = pts
        frame.time_base = time_base
        return frame


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


async def wait_connected(pc, within=15.0):
    deadline = time.monotonic() + within
    while pc.connectionState != "connected":
        if time.monotonic() > deadline:
            raise AssertionError(f"connection state stayed {pc.connectionState}")
        await asyncio.sleep(0.05)


async def main(binary: str) -> int:
    data = tempfile.mkdtemp(prefix="warbler-aiortc-")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [binary, "serve", "--listen", f"127.0.0.1:{port}", "--rtc-port", "0", "--data-dir", data, "--public-ip", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise AssertionError("server did not become healthy")
            await asyncio.sleep(0.1)

        def token(identity, grants):
            out = subprocess.run(
                [binary, "token", "--room", "interop", "--identity", identity, "--grants", grants, "--data-dir", data],
                check=True, capture_output=True, text=True,
            )
            return out.stdout.strip()

        pub_token = token("aiortc-cam", "publish")
        view_token = token("aiortc-viewer", "subscribe")

        # Publish through WHIP.
        publisher = RTCPeerConnection()
        publisher.addTrack(MovingBars())
        await publisher.setLocalDescription(await publisher.createOffer())
        status, headers, answer = http("POST", f"{base}/whip/interop", pub_token, publisher.localDescription.sdp, "application/sdp")
        assert status == 201, f"WHIP POST: {status} {answer}"
        whip_location = headers.get("Location") or headers.get("location")
        assert whip_location and whip_location.startswith("/whip/interop/"), headers
        await publisher.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await wait_connected(publisher)

        # Watch through WHEP and decode.
        viewer = RTCPeerConnection()
        viewer.addTransceiver("video", direction="recvonly")
        decoded = []
        started = time.monotonic()
        first_frame_at = []

        async def consume(track):
            while len(decoded) < 60:
                frame = await track.recv()
                if not first_frame_at:
                    first_frame_at.append(time.monotonic() - started)
                decoded.append((frame.width, frame.height))

        tasks = []

        @viewer.on("track")
        def on_track(track):
            if track.kind == "video":
                tasks.append(asyncio.ensure_future(consume(track)))

        await viewer.setLocalDescription(await viewer.createOffer())
        status, headers, answer = http("POST", f"{base}/whep/interop/aiortc-cam", view_token, viewer.localDescription.sdp, "application/sdp")
        assert status == 201, f"WHEP POST: {status} {answer}"
        whep_location = headers.get("Location") or headers.get("location")
        assert whep_location and whep_location.startswith("/whep/interop/aiortc-cam/"), headers
        await viewer.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await wait_connected(viewer)

        deadline = time.monotonic() + 30
        while len(decoded) < 60:
            assert time.monotonic() < deadline, f"decoded only {len(decoded)} frames"
            await asyncio.sleep(0.1)
        sizes = set(decoded)
        assert sizes == {(640, 360)}, f"decoded sizes {sizes}"

        # Metrics show the forwarded video.
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            metrics = r.read().decode()
        forwarded = sum(float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines() if l.startswith('warbler_rtp_packets_forwarded_total{kind="video"}'))
        assert forwarded > 0, "server counted forwarded video"

        # End both sessions.
        status, _, body = http("DELETE", base + whep_location, view_token)
        assert status == 200, f"WHEP DELETE {status} {body}"
        status, _, body = http("DELETE", base + whip_location, pub_token)
        assert status == 200, f"WHIP DELETE {status} {body}"
        status, _, _ = http("DELETE", base + whip_location, pub_token)
        assert status == 404, "deleted session is gone"
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
                health = json.loads(r.read())
            if health["participants"] == 0:
                break
            assert time.monotonic() < deadline, f"participants remain: {health}"
            await asyncio.sleep(0.1)

        for t in tasks:
            t.cancel()
        await viewer.close()
        await publisher.close()
        print(f"aiortc WHIP→WHEP: decoded {len(decoded)} frames at 640x360, first frame after {first_frame_at[0]:.2f}s, "
              f"server forwarded {int(forwarded)} video packets")
        return 0
    except BaseException:
        server.terminate()
        try:
            _, err = server.communicate(timeout=5)
            sys.stderr.write(err.decode(errors="replace")[-4000:])
        except subprocess.TimeoutExpired:
            server.kill()
        raise
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "debug", "warbler"))
    args = ap.parse_args()
    sys.exit(asyncio.run(main(args.bin)))
