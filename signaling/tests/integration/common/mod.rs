//! Test harness: a real server started in-process on loopback, and a client that speaks the
//! WebSocket protocol with native WebRTC peers (answers subscriber offers by itself).

#![allow(dead_code)]

#[path = "../../../../sfu/tests/support/mod.rs"]
pub mod native;

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};
use tokio_tungstenite::tungstenite::Message;
use warbler_signaling::auth::unix_now;
use warbler_signaling::config::Config;
use warbler_signaling::server::{self, Server};
use warbler_sfu::api::Grants;

#[allow(unused_imports)] // each test binary uses a different subset
pub use native::{NativePeer, TrackStats, eventually};

pub struct TestServer {
    pub server: Option<Server>,
    pub base: String,
    pub ws_url: String,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            rtc_port: 0,
            public_ip: vec!["127.0.0.1".parse().unwrap()],
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        tweak(&mut cfg);
        let server = server::start(cfg).await.expect("server starts");
        let addr = server.http_addr;
        Self { server: Some(server), base: format!("http://{addr}"), ws_url: format!("ws://{addr}/ws"), _dir: dir }
    }

    pub fn token(&self, room: &str, identity: &str, grants: &str) -> String {
        let s = self.server.as_ref().unwrap();
        let list: Vec<String> = grants.split(',').map(str::to_owned).collect();
        let g = warbler_signaling::auth::parse_grants(&list).unwrap();
        s.state.keys.issue(room, identity, Some(identity), g, 3600, unix_now()).unwrap()
    }

    pub fn all_grants() -> Grants {
        Grants { publish: true, subscribe: true, chat: true, admin: false }
    }

    /// One metric's value from `/metrics` (sum over label sets when `label` is None).
    pub async fn metric(&self, name: &str, label: Option<&str>) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.base)).await.unwrap().text().await.unwrap();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .filter(|l| label.is_none_or(|lab| l.contains(lab)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
    }
}

/// A raw WebSocket connection (for protocol-level tests).
pub struct RawWs {
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
}

impl RawWs {
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws connects");
        Self { ws }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::Text(v.to_string().into())).await.unwrap();
    }

    pub async fn send_text(&mut self, t: &str) {
        self.ws.send(Message::Text(t.to_owned().into())).await.unwrap();
    }

    pub async fn send_binary(&mut self, b: Vec<u8>) {
        self.ws.send(Message::Binary(b.into())).await.unwrap();
    }

    /// Next JSON message, or None when the socket closed (or nothing came within 10 s).
    pub async fn recv(&mut self) -> Option<Value> {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), self.ws.next()).await.ok()??.ok()?;
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).ok(),
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Waits for a message of `typ`, skipping others.
    pub async fn recv_type(&mut self, typ: &str) -> Option<Value> {
        loop {
            let v = self.recv().await?;
            if v["type"] == typ {
                return Some(v);
            }
        }
    }

    /// True when the server closed the socket.
    pub async fn closed(&mut self) -> bool {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.ws.next()).await {
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return true,
                Ok(Some(Ok(_))) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// A participant: WebSocket signaling plus native publisher/subscriber peer connections.
pub struct Client {
    pub sid: String,
    pub joined: Value,
    out: mpsc::UnboundedSender<Value>,
    inbox: mpsc::UnboundedReceiver<Value>,
    pub subscriber: Arc<Mutex<Option<NativePeer>>>,
    pub publisher: Option<NativePeer>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Connects and joins. `subscriber_rt` runs the subscriber connection on another runtime
    /// (so a test can make it vanish by dropping that runtime).
    pub async fn join(url: &str, token: &str, subscriber_rt: Option<tokio::runtime::Handle>) -> Client {
        Self::join_with(url, token, subscriber_rt, None).await
    }

    /// As `join`, with every subscriber offer passed through `rewrite` first (e.g. to point the
    /// subscriber at a lossy relay instead of the server).
    pub async fn join_with(url: &str, token: &str, subscriber_rt: Option<tokio::runtime::Handle>, rewrite: Option<Arc<dyn Fn(String) -> String + Send + Sync>>) -> Client {
        let mut raw = RawWs::connect(url).await;
        raw.send(json!({"type":"join","version":1,"token":token})).await;
        let joined = raw.recv().await.expect("reply to join");
        assert_eq!(joined["type"], "joined", "join refused: {joined}");
        let sid = joined["participant"]["sid"].as_str().unwrap().to_owned();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Value>();
        let (in_tx, in_rx) = mpsc::unbounded_channel::<Value>();
        let subscriber: Arc<Mutex<Option<NativePeer>>> = Arc::new(Mutex::new(None));
        let sub = subscriber.clone();
        let mut ws = raw.ws;
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    m = ws.next() => {
                        let Some(Ok(m)) = m else { break };
                        let Message::Text(t) = m else { continue };
                        let Ok(v) = serde_json::from_str::<Value>(&t) else { continue };
                        if v["type"] == "subscriber_offer" {
                            let mut offer = v["sdp"].as_str().unwrap_or_default().to_owned();
                            if let Some(f) = &rewrite {
                                offer = f(offer);
                            }
                            let sub = sub.clone();
                            let rt = subscriber_rt.clone();
                            let answer = async move {
                                let mut guard = sub.lock().await;
                                if guard.is_none() {
                                    *guard = Some(NativePeer::new().await);
                                }
                                guard.as_mut().unwrap().answer(offer).await
                            };
                            let answer = match rt {
                                Some(h) => h.spawn(answer).await.unwrap(),
                                None => answer.await,
                            };
                            let _ = ws.send(Message::Text(json!({"type":"subscriber_answer","sdp":answer}).to_string().into())).await;
                        }
                        let _ = in_tx.send(v);
                    }
                    o = out_rx.recv() => {
                        let Some(o) = o else { break };
                        if ws.send(Message::Text(o.to_string().into())).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Client { sid, joined, out: out_tx, inbox: in_rx, subscriber, publisher: None, task }
    }

    pub fn send(&self, v: Value) {
        let _ = self.out.send(v);
    }

    /// Waits for a message matching `pred`, skipping others; None on timeout or close.
    pub async fn wait_for(&mut self, within: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let v = tokio::time::timeout_at(deadline, self.inbox.recv()).await.ok()??;
            if pred(&v) {
                return Some(v);
            }
        }
    }

    /// Publishes an H.264 camera and an Opus microphone; returns the server track sids.
    pub async fn publish_camera(&mut self) -> Vec<String> {
        let mut p = NativePeer::new().await;
        let (v, a) = p.add_camera_and_mic().await;
        let offer = p.offer().await;
        self.send(json!({"type":"publish","req":1,"sdp":offer,"tracks":[
            {"track_id":v,"source":"camera"},{"track_id":a,"source":"microphone"}]}));
        let answer = self.wait_for(Duration::from_secs(10), |m| m["type"] == "publish_answer" || m["type"] == "error").await.expect("publish answer");
        assert_eq!(answer["type"], "publish_answer", "{answer}");
        p.accept_answer(answer["sdp"].as_str().unwrap().to_owned()).await;
        assert!(p.wait_connected(Duration::from_secs(10)).await, "publisher connects");
        self.publisher = Some(p);
        answer["tracks"].as_array().unwrap().iter().map(|t| t["sid"].as_str().unwrap().to_owned()).collect()
    }

    /// Stats of received tracks, keyed by server track sid.
    pub async fn received(&self) -> std::collections::HashMap<String, TrackStats> {
        self.subscriber.lock().await.as_ref().map(|p| p.tracks()).unwrap_or_default()
    }

    /// Waits until every listed track decoded at least `frames` video frames / audio frames.
    pub async fn wait_decoding(&self, tracks: &[String], frames: u64, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let r = self.received().await;
            let ok = tracks.iter().all(|t| r.get(t).is_some_and(|s| s.frames_decoded >= frames || s.audio_frames_decoded >= frames));
            if ok {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn leave(mut self) {
        self.send(json!({"type":"leave"}));
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        if let Some(mut p) = self.publisher.take() {
            p.close().await;
        }
        if let Some(mut p) = self.subscriber.lock().await.take() {
            p.close().await;
        }
    }
}

/// Forwards a spawned `warbler` process's log to the test output (shown when a test fails).
pub fn forward_log(child: &mut std::process::Child) {
    use std::io::{BufRead, BufReader};
    let stderr = child.stderr.take().expect("stderr piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[warbler] {line}");
        }
    });
}

/// Waits until `{base}/healthz` answers 200; fails the test if `child` exits first or `within`
/// passes.
pub async fn wait_healthy(base: &str, child: &mut std::process::Child, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Ok(r) = reqwest::get(format!("{base}/healthz")).await
            && r.status().as_u16() == 200
        {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "server did not become healthy");
        assert!(child.try_wait().unwrap().is_none(), "server exited early");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
