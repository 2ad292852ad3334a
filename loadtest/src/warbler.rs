//! Warbler's WebSocket protocol (docs/protocol.md) for one simulated participant: join, publish
//! on the client-offered publisher connection, answer the server's subscriber offers, leave.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::scenario::{Participant, ParticipantOutcome, publisher_index};
use crate::world::{Kind, StreamInfoMap, WorldHandle};

/// Bound on every signaling wait.
const SIGNALING_TIMEOUT: Duration = Duration::from_secs(20);

pub async fn dev_token(http: &reqwest::Client, base: &str, room: &str, identity: &str) -> Result<String> {
    let v: Value = http
        .get(format!("{base}/dev/token"))
        .query(&[("room", room), ("identity", identity)])
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    v["token"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("no token in {v}"))
}

/// Runs one participant until `stop` turns true. Publishes if `p.publish` is set, and always
/// answers subscriber offers (receiving every other publisher of the room).
pub async fn run_participant(
    world: WorldHandle,
    http: reqwest::Client,
    base: String,
    ip: IpAddr,
    p: Participant,
    mut stop: watch::Receiver<bool>,
    ready: tokio::sync::oneshot::Sender<ParticipantOutcome>,
) -> Result<()> {
    let mut ready = Some(ready);
    let result = async {
        let token = dev_token(&http, &base, &p.room, &p.identity).await.context("dev token")?;
        let ws_url = format!("{}/ws", base.replacen("http", "ws", 1));
        let (mut ws, _) = tokio::time::timeout(SIGNALING_TIMEOUT, tokio_tungstenite::connect_async_with_config(ws_url.as_str(), Some(ws_config()), true))
            .await
            .context("websocket connect timed out")??;
        let joined_at = Instant::now();
        ws.send(Message::text(json!({"type":"join","version":1,"token":token,"req":1}).to_string())).await?;
        let mut identities: HashMap<String, String> = HashMap::new(); // participant sid → identity
        let mut track_owner: HashMap<String, (String, Kind)> = HashMap::new(); // track sid → (participant sid, kind)
        let joined = next_of(&mut ws, "joined").await?;
        for part in joined["participants"].as_array().into_iter().flatten() {
            learn_participant(part, &mut identities, &mut track_owner);
        }
        let mut publisher_key = None;
        let mut pending_answer = false;
        if let Some(spec) = p.publish.clone() {
            let idx = p.publisher_index.expect("publishers have an index");
            let (key, sdp, tracks) = world.call(move |w| w.create_publisher(ip, idx, &spec)).await??;
            publisher_key = Some(key);
            let tracks: Vec<Value> = tracks
                .iter()
                .map(|(id, k)| json!({"track_id": id, "source": if *k == Kind::Audio { "microphone" } else { "camera" }}))
                .collect();
            ws.send(Message::text(json!({"type":"publish","sdp":sdp,"tracks":tracks,"req":2}).to_string())).await?;
            pending_answer = true;
        }
        let mut subscriber_key: Option<usize> = None;
        let deadline = tokio::time::Instant::now() + SIGNALING_TIMEOUT;
        loop {
            let msg = tokio::select! {
                m = ws.next() => m,
                _ = stop.changed() => break,
                _ = tokio::time::sleep_until(deadline), if pending_answer => bail!("no publish_answer within {SIGNALING_TIMEOUT:?}"),
            };
            let Some(msg) = msg else { bail!("server closed the websocket") };
            let msg = msg?;
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(&text)?;
            match v["type"].as_str().unwrap_or("") {
                "publish_answer" => {
                    let key = publisher_key.ok_or_else(|| anyhow!("publish_answer without publishing"))?;
                    let sdp = v["sdp"].as_str().unwrap_or_default().to_owned();
                    world.call(move |w| w.set_answer(key, sdp)).await??;
                    pending_answer = false;
                    if let Some(r) = ready.take() {
                        let _ = r.send(ParticipantOutcome { publisher_peer: publisher_key, janus_feed: None });
                    }
                }
                "subscriber_offer" => {
                    let sdp = v["sdp"].as_str().unwrap_or_default().to_owned();
                    let mut mids = HashMap::new();
                    for (mid, sid) in v["tracks"].as_object().into_iter().flatten() {
                        let Some(sid) = sid.as_str() else { continue };
                        if let Some((owner, kind)) = track_owner.get(sid)
                            && let Some(publisher) = identities.get(owner).and_then(|i| publisher_index(i))
                        {
                            mids.insert(mid.clone(), StreamInfoMap { publisher, kind: *kind });
                        }
                    }
                    let key = match subscriber_key {
                        Some(k) => k,
                        None => {
                            let k = world.call(move |w| w.create_subscriber(ip, joined_at)).await??;
                            subscriber_key = Some(k);
                            k
                        }
                    };
                    let answer = world.call(move |w| w.answer_offer(key, sdp, &mids)).await??;
                    ws.send(Message::text(json!({"type":"subscriber_answer","sdp":answer}).to_string())).await?;
                }
                "participant_joined" => learn_participant(&v["participant"], &mut identities, &mut track_owner),
                "track_published" => {
                    if let (Some(owner), Some(sid)) = (v["participant"].as_str(), v["track"]["sid"].as_str()) {
                        track_owner.insert(sid.to_owned(), (owner.to_owned(), kind_of(&v["track"])));
                    }
                }
                "error" => {
                    tracing::warn!(identity = %p.identity, error = %v, "server error");
                    if pending_answer {
                        bail!("server refused: {v}");
                    }
                }
                "leave" => break,
                _ => {}
            }
            if publisher_key.is_none()
                && let Some(r) = ready.take()
            {
                let _ = r.send(ParticipantOutcome { publisher_peer: None, janus_feed: None });
            }
        }
        let _ = ws.send(Message::text(json!({"type":"leave"}).to_string())).await;
        let _ = ws.close(None).await;
        for key in [publisher_key, subscriber_key].into_iter().flatten() {
            let _ = world.call(move |w| w.close_peer(key)).await;
        }
        Ok(())
    }
    .await;
    if let Err(e) = &result {
        tracing::warn!(identity = %p.identity, error = %e, "participant failed");
    }
    result
}

fn kind_of(track: &Value) -> Kind {
    if track["kind"].as_str() == Some("audio") { Kind::Audio } else { Kind::Video }
}

fn learn_participant(part: &Value, identities: &mut HashMap<String, String>, track_owner: &mut HashMap<String, (String, Kind)>) {
    let (Some(sid), Some(identity)) = (part["sid"].as_str(), part["identity"].as_str()) else { return };
    identities.insert(sid.to_owned(), identity.to_owned());
    for t in part["tracks"].as_array().into_iter().flatten() {
        if let Some(tsid) = t["sid"].as_str() {
            track_owner.insert(tsid.to_owned(), (sid.to_owned(), kind_of(t)));
        }
    }
}

async fn next_of<S>(ws: &mut S, wanted: &str) -> Result<Value>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + SIGNALING_TIMEOUT;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.with_context(|| format!("waiting for {wanted}"))?;
        let Some(msg) = msg else { bail!("server closed the websocket waiting for {wanted}") };
        if let Message::Text(text) = msg? {
            let v: Value = serde_json::from_str(&text)?;
            if v["type"] == wanted {
                return Ok(v);
            }
            if v["type"] == "error" {
                bail!("server error waiting for {wanted}: {v}");
            }
        }
    }
}

/// Signaling messages are small: tungstenite zero-fills its whole free read buffer on every read
/// attempt, so the default 128 KiB would cost the tester CPU per connection and poll.
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(8 * 1024).write_buffer_size(0)
}
