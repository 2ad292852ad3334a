"""Chat interop with an independent WebRTC stack (aiortc): two aiortc clients, each a WHIP session
whose offer carries only a `chat` data channel, chat with each other through the server; one of
them also receives a message a bot posts over REST, pages history and searches (Chinese and
English). No media, no numpy.

Usage: aiortc_chat_whip.py [--bin PATH_TO_WARBLER]
Exits non-zero on failure; prints what it observed.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from aiortc import RTCPeerConnection, RTCSessionDescription

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
ROOM = "aiortc-chat"
TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class ChatPeer:
    """One WHIP session with a `chat` data channel; incoming JSON messages are queued."""

    def __init__(self, name):
        self.name = name
        self.pc = RTCPeerConnection()
        self.channel = self.pc.createDataChannel("chat")  # reliable and ordered by default
        self.inbox = asyncio.Queue()
        self.backlog = []
        self.opened = asyncio.Event()
        self.location = None

        @self.channel.on("open")
        def on_open():
            self.opened.set()

        @self.channel.on("message")
        def on_message(message):
            self.inbox.put_nowait(json.loads(message))

    async def connect(self, base, token):
        await self.pc.setLocalDescription(await self.pc.createOffer())
        status, headers, answer = http("POST", f"{base}/whip/{ROOM}", token, self.pc.localDescription.sdp, "application/sdp")
        assert status == 201, f"{self.name}: WHIP POST {status} {answer}"
        self.location = headers.get("Location") or headers.get("location")
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await asyncio.wait_for(self.opened.wait(), TIMEOUT)

    def send(self, msg):
        self.channel.send(json.dumps(msg))

    async def wait_for(self, pred, what):
        for i, m in enumerate(self.backlog):
            if pred(m):
                return self.backlog.pop(i)
        deadline = time.monotonic() + TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: no {what} within {TIMEOUT}s; got {self.backlog[-5:]}")
            try:
                m = await asyncio.wait_for(self.inbox.get(), left)
            except asyncio.TimeoutError:
                continue
            if pred(m):
                return m
            self.backlog.append(m)

    async def wait_type(self, typ):
        return await self.wait_for(lambda m: m.get("type") == typ, typ)

    async def request(self, msg, req):
        msg = dict(msg, req=req)
        self.send(msg)
        return await self.wait_for(lambda m: m.get("req") == req, f"reply to {msg}")


async def main(binary: str) -> int:
    data = tempfile.mkdtemp(prefix="warbler-aiortc-chat-")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [binary, "serve", "--listen", f"127.0.0.1:{port}", "--rtc-port", "0", "--data-dir", data, "--public-ip", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    peers = []
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
                [binary, "token", "--room", ROOM, "--identity", identity, "--grants", grants, "--data-dir", data],
                check=True, capture_output=True, text=True,
            )
            return out.stdout.strip()

        ann_token = token("aiortc-ann", "publish,chat")
        ben_token = token("aiortc-ben", "publish,chat")
        bot_token = token("bot", "chat")

        ann = ChatPeer("ann")
        ben = ChatPeer("ben")
        peers += [ann, ben]
        await ann.connect(base, ann_token)
        hello = await ann.wait_type("hello")
        assert hello["identity"] == "aiortc-ann" and hello["latest_seq"] == 0, hello
        assert (await ann.wait_type("history"))["messages"] == []
        await ben.connect(base, ben_token)
        await ben.wait_type("history")

        # ann sends; she gets the durable ack, ben gets the message.
        ann.send({"type": "chat", "id": "ann-1", "text": "hello from aiortc 你好世界"})
        ack = await ann.wait_for(lambda m: m.get("type") == "ack" and m.get("id") == "ann-1", "ack")
        assert ack["seq"] == 1 and ack["ts"] > 0, ack
        got = await ben.wait_type("chat")
        assert (got["seq"], got["from"], got["text"]) == (1, "aiortc-ann", "hello from aiortc 你好世界"), got

        # ben replies, mentioning ann; ann receives it and her unread mention count.
        ben.send({"type": "chat", "id": "ben-1", "text": "hi @aiortc-ann, deployment finished", "reply_to": 1})
        assert (await ben.wait_for(lambda m: m.get("type") == "ack", "ack"))["seq"] == 2
        reply = await ann.wait_type("chat")
        assert reply["reply_to"] == 1 and reply["mentions"] == ["aiortc-ann"], reply
        assert (await ann.wait_type("read_state"))["unread_mentions"] == 1

        # A resend of the same id is the same message.
        ann.send({"type": "chat", "id": "ann-1", "text": "hello from aiortc 你好世界"})
        dup = await ann.wait_for(lambda m: m.get("type") == "ack" and m.get("id") == "ann-1", "ack of the resend")
        assert dup["seq"] == 1 and dup.get("duplicate") is True, dup

        # A bot posts over REST; ann receives it on her channel.
        status, _, body = http("POST", f"{base}/api/rooms/{ROOM}/messages", bot_token, json.dumps({"id": "b1", "text": "build 42 is green"}), "application/json")
        assert status == 201, f"REST post {status} {body}"
        bot_msg = await ann.wait_for(lambda m: m.get("type") == "chat" and m.get("from") == "bot", "bot message")
        assert bot_msg["seq"] == 3, bot_msg

        # Reactions and typing reach the other side.
        ben.send({"type": "typing"})
        assert (await ann.wait_type("typing"))["from"] == "aiortc-ben"
        assert (await ann.request({"type": "react", "seq": 2, "emoji": "🎉"}, 1))["type"] == "ok"
        reaction = await ben.wait_type("reaction")
        assert (reaction["seq"], reaction["emoji"], reaction["from"]) == (2, "🎉", "aiortc-ann"), reaction

        # History paging and search over the channel.
        page = await ann.request({"type": "history", "before": 3, "limit": 1}, 2)
        assert [m["seq"] for m in page["messages"]] == [2] and page["has_more"] is True, page
        found = await ann.request({"type": "search", "q": "世界"}, 3)
        assert [h["message"]["seq"] for h in found["results"]] == [1], found
        found = await ann.request({"type": "search", "q": "deploy"}, 4)
        assert [h["message"]["seq"] for h in found["results"]] == [2], found
        hl = found["results"][0]["highlights"][0]
        assert found["results"][0]["snippet"][hl[0]:hl[1]].lower() == "deploy", found

        # A refusal is an error, not silence.
        err = await ann.request({"type": "chat", "id": "too-big", "text": "x" * 5000}, 5)
        assert (err["type"], err["code"], err["id"]) == ("error", "too_long", "too-big"), err

        # REST history agrees.
        status, _, body = http("GET", f"{base}/api/rooms/{ROOM}/messages?after=0", bot_token)
        history = json.loads(body)
        assert status == 200 and [m["seq"] for m in history["messages"]] == [1, 2, 3], body

        for p in peers:
            status, _, _ = http("DELETE", base + p.location, ann_token if p is ann else ben_token)
            assert status == 200, f"WHIP DELETE {status}"
        print(f"aiortc chat over WHIP: 3 messages stored and relayed, ack seq {ack['seq']} at ts {ack['ts']}, "
              f"mention/reaction/typing/history/search ok, too_long refused")
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
        for p in peers:
            await p.pc.close()
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "debug", "warbler"))
    args = ap.parse_args()
    sys.exit(asyncio.run(main(args.bin)))
