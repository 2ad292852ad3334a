//! A chat client for tests: a native WebRTC peer whose only content is the `chat` data channel,
//! joined either over the WebSocket protocol (data-channel-only publish) or as a WHIP session.
//! Messages it skips while waiting for something stay buffered for later waits.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::native::DataChannelHandle;
use crate::common::{Client, NativePeer};

pub const T: Duration = Duration::from_secs(20);

pub struct ChatClient {
    pub ws: Option<Client>,
    pub peer: NativePeer,
    pub dc: DataChannelHandle,
    backlog: VecDeque<Value>,
}

impl ChatClient {
    /// Joins over WebSocket and opens `chat` on the publisher connection.
    pub async fn connect(ws_url: &str, token: &str) -> ChatClient {
        let mut ws = Client::join(ws_url, token, None).await;
        let mut peer = NativePeer::new().await;
        let mut dc = peer.open_data_channel("chat").await;
        let offer = peer.offer().await;
        ws.send(json!({"type":"publish","req":1,"sdp":offer,"tracks":[]}));
        let answer = ws.wait_for(T, |m| m["type"] == "publish_answer" || m["type"] == "error").await.expect("publish answer");
        assert_eq!(answer["type"], "publish_answer", "{answer}");
        peer.accept_answer(answer["sdp"].as_str().unwrap().to_owned()).await;
        assert!(dc.wait_open(T).await, "chat channel opens");
        ChatClient { ws: Some(ws), peer, dc, backlog: VecDeque::new() }
    }

    /// A WHIP session (`POST /whip/{room}`) whose offer carries only the chat channel.
    pub async fn whip(base: &str, room: &str, token: &str) -> ChatClient {
        let mut peer = NativePeer::new().await;
        let mut dc = peer.open_data_channel("chat").await;
        let offer = peer.offer().await;
        let res = reqwest::Client::new()
            .post(format!("{base}/whip/{room}"))
            .bearer_auth(token)
            .header("Content-Type", "application/sdp")
            .body(offer)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 201, "WHIP accepted");
        peer.accept_answer(res.text().await.unwrap()).await;
        assert!(dc.wait_open(T).await, "chat channel opens");
        ChatClient { ws: None, peer, dc, backlog: VecDeque::new() }
    }

    pub async fn send(&self, v: Value) {
        self.dc.send(&v.to_string()).await;
    }

    pub async fn send_raw(&self, s: &str) {
        self.dc.send(s).await;
    }

    async fn next(&mut self, deadline: tokio::time::Instant) -> Option<Value> {
        loop {
            let text = tokio::time::timeout_at(deadline, self.dc.incoming.recv()).await.ok()??;
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                return Some(v);
            }
        }
    }

    /// The first message (buffered or new) matching `pred`; others stay buffered.
    pub async fn wait_for(&mut self, within: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i);
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let v = self.next(deadline).await?;
            if pred(&v) {
                return Some(v);
            }
            self.backlog.push_back(v);
        }
    }

    pub async fn wait_type(&mut self, typ: &str) -> Value {
        let t = typ.to_owned();
        self.wait_for(T, move |m| m["type"] == t.as_str()).await.unwrap_or_else(|| panic!("no {typ} within {T:?}"))
    }

    /// Sends a chat message and returns its ack (or the error for it).
    pub async fn chat(&mut self, id: &str, text: &str) -> Value {
        self.send(json!({"type":"chat","id":id,"text":text})).await;
        let id = id.to_owned();
        self.wait_for(T, move |m| (m["type"] == "ack" || m["type"] == "error") && m["id"] == id.as_str()).await.expect("ack or error")
    }

    /// Sends a request with `req` and returns the reply carrying it.
    pub async fn request(&mut self, mut v: Value, req: u64) -> Value {
        v["req"] = json!(req);
        self.send(v).await;
        self.wait_for(T, move |m| m["req"] == req).await.expect("reply")
    }

    /// Everything already buffered or arriving within `quiet` of the last message.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Value> {
        let mut out: Vec<Value> = self.backlog.drain(..).collect();
        while let Some(v) = self.next(tokio::time::Instant::now() + quiet).await {
            out.push(v);
        }
        out
    }

    pub async fn close(mut self) {
        if let Some(ws) = self.ws.take() {
            ws.leave().await;
        }
        self.peer.close().await;
    }
}
