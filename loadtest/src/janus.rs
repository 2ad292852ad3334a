//! Janus VideoRoom over Janus's HTTP API for one simulated participant, and room creation.
//! Janus answers plugin requests asynchronously: each session runs a long-poll task that hands
//! events to whoever waits for that transaction. Janus is half-trickle: our SDP carries our
//! (single host) candidate, and we then send `completed`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

use crate::scenario::{Participant, ParticipantOutcome, publisher_index};
use crate::world::{Kind, StreamInfoMap, WorldHandle};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>;

pub struct Session {
    http: reqwest::Client,
    base: String,
    id: u64,
    pending: Pending,
    poller: tokio::task::JoinHandle<()>,
}

fn transaction() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Session {
    pub async fn create(http: reqwest::Client, base: &str) -> Result<Self> {
        let v: Value = http
            .post(format!("{base}/janus"))
            .json(&json!({"janus":"create","transaction":transaction()}))
            .send()
            .await?
            .json()
            .await?;
        let id = v["data"]["id"].as_u64().ok_or_else(|| anyhow!("janus create: {v}"))?;
        let pending: Pending = Arc::default();
        let poller = tokio::spawn(long_poll(http.clone(), format!("{base}/janus/{id}"), pending.clone()));
        Ok(Self { http, base: base.to_owned(), id, pending, poller })
    }

    pub async fn attach(&self) -> Result<u64> {
        let v: Value = self
            .http
            .post(format!("{}/janus/{}", self.base, self.id))
            .json(&json!({"janus":"attach","plugin":"janus.plugin.videoroom","transaction":transaction()}))
            .send()
            .await?
            .json()
            .await?;
        v["data"]["id"].as_u64().ok_or_else(|| anyhow!("janus attach: {v}"))
    }

    /// A plugin message; returns the synchronous reply, or the asynchronous event for it.
    pub async fn message(&self, handle: u64, body: Value, jsep: Option<Value>) -> Result<Value> {
        let tx = transaction();
        let (etx, erx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(tx.clone(), etx);
        let mut req = json!({"janus":"message","body":body,"transaction":tx});
        if let Some(j) = jsep {
            req["jsep"] = j;
        }
        let v: Value = self.http.post(format!("{}/janus/{}/{}", self.base, self.id, handle)).json(&req).send().await?.json().await?;
        match v["janus"].as_str() {
            Some("success") => {
                self.pending.lock().expect("pending lock").remove(&tx);
                Ok(v)
            }
            Some("ack") => tokio::time::timeout(REQUEST_TIMEOUT, erx)
                .await
                .context("janus event timed out")?
                .map_err(|_| anyhow!("janus session poller ended")),
            _ => {
                self.pending.lock().expect("pending lock").remove(&tx);
                bail!("janus error: {v}")
            }
        }
    }

    pub async fn trickle_completed(&self, handle: u64) -> Result<()> {
        self.http
            .post(format!("{}/janus/{}/{}", self.base, self.id, handle))
            .json(&json!({"janus":"trickle","candidate":{"completed":true},"transaction":transaction()}))
            .send()
            .await?;
        Ok(())
    }

    pub async fn destroy(self) {
        let _ = self
            .http
            .post(format!("{}/janus/{}", self.base, self.id))
            .json(&json!({"janus":"destroy","transaction":transaction()}))
            .send()
            .await;
        self.poller.abort();
    }
}

async fn long_poll(http: reqwest::Client, url: String, pending: Pending) {
    // Bounded by the session: the task is aborted on destroy; a failing server ends it.
    let mut failures = 0;
    while failures < 10 {
        let r = http.get(format!("{url}?maxev=10")).timeout(Duration::from_secs(40)).send().await;
        let v: Value = match r {
            Ok(resp) => match resp.json().await {
                Ok(v) => v,
                Err(_) => {
                    failures += 1;
                    continue;
                }
            },
            Err(_) => {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        failures = 0;
        let events = match v {
            Value::Array(a) => a,
            other => vec![other],
        };
        for e in events {
            if let Some(tx) = e["transaction"].as_str()
                && e["janus"] == "event"
                && let Some(w) = pending.lock().expect("pending lock").remove(tx)
            {
                let _ = w.send(e);
            }
        }
    }
}

/// Creates the VideoRoom `room` (H.264 + Opus, no bitrate cap), tolerating "already exists".
pub async fn create_room(http: &reqwest::Client, base: &str, room: u64, publishers: usize) -> Result<()> {
    let s = Session::create(http.clone(), base).await?;
    let h = s.attach().await?;
    let body = json!({
        "request":"create","room":room,"publishers":publishers.max(1) + 1,"bitrate":20_000_000,
        "videocodec":"h264","audiocodec":"opus","h264_profile":"42e01f","fir_freq":0,
        "notify_joining":false,"is_private":false,"permanent":false
    });
    let v = s.message(h, body, None).await?;
    let data = &v["plugindata"]["data"];
    s.destroy().await;
    if data["videoroom"] == "created" || data["error_code"] == 427 {
        Ok(())
    } else {
        bail!("janus create room: {v}")
    }
}

/// Runs one participant until `stop`: publishes (if asked), then subscribes to `feeds` (Janus
/// publisher ids with their identities) — the caller starts subscriptions only once those
/// publishers are connected, as Janus requires.
#[allow(clippy::too_many_arguments)]
pub async fn run_participant(
    world: WorldHandle,
    http: reqwest::Client,
    base: String,
    ip: IpAddr,
    p: Participant,
    feeds: watch::Receiver<Option<Vec<(u64, String)>>>,
    mut stop: watch::Receiver<bool>,
    ready: oneshot::Sender<ParticipantOutcome>,
) -> Result<()> {
    let room = p.janus_room;
    let session = Session::create(http, &base).await.context("janus session")?;
    let mut keys = Vec::new();
    let result: Result<()> = async {
        let joined_at = Instant::now();
        let mut outcome = ParticipantOutcome { publisher_peer: None, janus_feed: None };
        if let Some(spec) = p.publish.clone() {
            let h = session.attach().await?;
            let v = session.message(h, json!({"request":"join","ptype":"publisher","room":room,"display":p.identity}), None).await?;
            let feed = v["plugindata"]["data"]["id"].as_u64().ok_or_else(|| anyhow!("janus publisher join: {v}"))?;
            let idx = p.publisher_index.expect("publishers have an index");
            let (key, sdp, _) = world.call(move |w| w.create_publisher(ip, idx, &spec)).await??;
            keys.push(key);
            let v = session
                .message(h, json!({"request":"publish","audio":true,"video":true}), Some(json!({"type":"offer","sdp":sdp})))
                .await?;
            let answer = v["jsep"]["sdp"].as_str().ok_or_else(|| anyhow!("janus publish: no answer: {v}"))?.to_owned();
            world.call(move |w| w.set_answer(key, answer)).await??;
            session.trickle_completed(h).await?;
            outcome = ParticipantOutcome { publisher_peer: Some(key), janus_feed: Some(feed) };
        }
        let _ = ready.send(outcome);
        // Subscribe once the room's publishers are known to be up.
        let mut feeds = feeds;
        let list = loop {
            if let Some(l) = feeds.borrow().clone() {
                break l;
            }
            tokio::select! {
                r = feeds.changed() => if r.is_err() { return Ok(()) },
                _ = stop.changed() => return Ok(()),
            }
        };
        let list: Vec<(u64, String)> = list.into_iter().filter(|(_, ident)| *ident != p.identity).collect();
        if !list.is_empty() {
            let h = session.attach().await?;
            let streams: Vec<Value> = list.iter().map(|(f, _)| json!({"feed": f})).collect();
            let v = session.message(h, json!({"request":"join","ptype":"subscriber","room":room,"streams":streams}), None).await?;
            let offer = v["jsep"]["sdp"].as_str().ok_or_else(|| anyhow!("janus subscribe: no offer: {v}"))?.to_owned();
            let mut mids = HashMap::new();
            for s in v["plugindata"]["data"]["streams"].as_array().into_iter().flatten() {
                let (Some(mid), Some(display)) = (s["mid"].as_str(), s["feed_display"].as_str()) else { continue };
                let kind = if s["type"] == "audio" { Kind::Audio } else { Kind::Video };
                if let Some(publisher) = publisher_index(display) {
                    mids.insert(mid.to_owned(), StreamInfoMap { publisher, kind });
                }
            }
            let key = world.call(move |w| w.create_subscriber(ip, joined_at)).await??;
            keys.push(key);
            let answer = world.call(move |w| w.answer_offer(key, offer, &mids)).await??;
            session.message(h, json!({"request":"start"}), Some(json!({"type":"answer","sdp":answer}))).await?;
            session.trickle_completed(h).await?;
        }
        let _ = stop.changed().await;
        Ok(())
    }
    .await;
    if let Err(e) = &result {
        tracing::warn!(identity = %p.identity, error = %e, "janus participant failed");
    }
    for key in keys {
        let _ = world.call(move |w| w.close_peer(key)).await;
    }
    session.destroy().await;
    result
}

/// Writes a Janus configuration for a loopback benchmark into `dir` and returns the command
/// line arguments to start Janus with it.
pub fn write_config(dir: &std::path::Path, http_port: u16, rtp_ports: (u16, u16)) -> Result<Vec<String>> {
    let lib = ["/usr/lib/x86_64-linux-gnu/janus", "/usr/lib/janus", "/usr/local/lib/janus", "/opt/janus/lib/janus"]
        .into_iter()
        .find(|p| std::path::Path::new(p).join("plugins").exists())
        .ok_or_else(|| anyhow!("Janus plugins folder not found (is janus installed?)"))?;
    let others = |sub: &str, keep: &str| -> String {
        std::fs::read_dir(format!("{lib}/{sub}"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".so") && n != keep)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    std::fs::create_dir_all(dir)?;
    let d = dir.display();
    std::fs::write(
        dir.join("janus.jcfg"),
        format!(
            r#"general: {{
    configs_folder = "{d}"
    plugins_folder = "{lib}/plugins"
    transports_folder = "{lib}/transports"
    events_folder = "{lib}/events"
    loggers_folder = "{lib}/loggers"
    debug_level = 3
    session_timeout = 120
}}
certificates: {{
}}
media: {{
    rtp_port_range = "{}-{}"
}}
nat: {{
    nice_debug = false
    ice_ignore_list = "vmnet"
}}
plugins: {{
    disable = "{}"
}}
transports: {{
    disable = "{}"
}}
loggers: {{
    disable = "{}"
}}
events: {{
    broadcast = false
}}
"#,
            rtp_ports.0,
            rtp_ports.1,
            others("plugins", "libjanus_videoroom.so"),
            others("transports", "libjanus_http.so"),
            others("loggers", "")
        ),
    )?;
    std::fs::write(
        dir.join("janus.transport.http.jcfg"),
        format!(
            r#"general: {{
    json = "plain"
    base_path = "/janus"
    http = true
    port = {http_port}
    ip = "127.0.0.1"
    https = false
}}
admin: {{
    admin_http = false
}}
"#
        ),
    )?;
    std::fs::write(dir.join("janus.plugin.videoroom.jcfg"), "general: {\n}\n")?;
    Ok(vec![
        "-F".into(),
        dir.display().to_string(),
        "-C".into(),
        dir.join("janus.jcfg").display().to_string(),
        "-o".into(),
        "-N".into(),
        "-L".into(),
        dir.join("janus.log").display().to_string(),
    ])
}
