//! One WebSocket signaling session (docs/protocol.md): authenticate the join, relay SDP and
//! candidates to the engine, deliver the engine's events, enforce size and rate limits. Bad
//! input gets an error to this client only; the session ends when the socket closes, on `leave`,
//! or when the engine removes the participant.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use governor::{Quota, RateLimiter};
use serde_json::{Value, json};
use tracing::{Instrument, debug, info, info_span, warn};
use warbler_sfu::api::{JoinRequest, LeaveReason, ParticipantEvent, ParticipantKind, TrackDeclaration, TrackSource};
use warbler_sfu::engine::RemoteCandidate;
use warbler_sfu::ids::{ParticipantId, PeerRole, RoomName, TrackId};
use warbler_sfu::shell::EventReceiver;

use crate::auth::unix_now;
use crate::chat::ChatLink;
use crate::chat::service::Actor;
use crate::protocol::{self, ClientMessage, ErrorCode, PROTOCOL_VERSION, Target};
use crate::state::AppState;

/// A client silent this long (no message, no pong) is gone.
const IDLE_TIMEOUT: Duration = Duration::from_secs(45);
const PING_INTERVAL: Duration = Duration::from_secs(15);
/// A join must arrive this soon after the socket opens.
const JOIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Rate-limit violations tolerated before the connection is closed as a flood.
const MAX_VIOLATIONS: u32 = 200;

struct Joined {
    id: ParticipantId,
    events: EventReceiver,
    chat: ChatLink,
}

/// Why the session loop stopped.
enum End {
    ClientClosed,
    Left,
    Removed,
    Fatal,
}

pub async fn session(socket: WebSocket, state: Arc<AppState>, peer: String) {
    state.metrics.ws_connections.inc();
    let span = info_span!("ws", %peer, room = tracing::field::Empty, participant = tracing::field::Empty);
    run(socket, state.clone()).instrument(span).await;
    state.metrics.ws_connections.dec();
}

async fn run(mut socket: WebSocket, state: Arc<AppState>) {
    let per_second = NonZeroU32::new(state.config.limits.ws_messages_per_second.max(1)).unwrap_or(NonZeroU32::MIN);
    let burst = per_second.saturating_mul(NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN));
    let limiter = RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst));
    let mut violations = 0u32;
    let mut joined: Option<Joined> = None;
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    let mut last_heard = tokio::time::Instant::now();
    let join_deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;

    let end = loop {
        let event = async {
            match joined.as_mut() {
                Some(j) => j.events.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            incoming = socket.recv() => {
                let msg = match incoming {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        debug!(error = %e, "websocket error");
                        break End::ClientClosed;
                    }
                    None => break End::ClientClosed,
                };
                last_heard = tokio::time::Instant::now();
                let text = match msg {
                    Message::Text(t) => t,
                    Message::Binary(_) => {
                        state.metrics.ws_errors(ErrorCode::BadMessage);
                        send(&mut socket, protocol::error(ErrorCode::BadMessage, "binary frames are not part of the protocol", None)).await;
                        continue;
                    }
                    Message::Close(_) => break End::ClientClosed,
                    Message::Ping(_) | Message::Pong(_) => continue,
                };
                if limiter.check().is_err() {
                    violations += 1;
                    state.metrics.ws_errors(ErrorCode::RateLimited);
                    if violations >= MAX_VIOLATIONS {
                        warn!("message flood; closing");
                        send(&mut socket, protocol::error(ErrorCode::RateLimited, "too many messages; closing", None)).await;
                        break End::Fatal;
                    }
                    // One error per burst is enough to tell the client; more would amplify.
                    if violations % 50 == 1 {
                        send(&mut socket, protocol::error(ErrorCode::RateLimited, format!("more than {per_second} messages per second"), None)).await;
                    }
                    continue;
                }
                if text.len() > state.config.limits.max_ws_message_bytes {
                    state.metrics.ws_errors(ErrorCode::MessageTooLarge);
                    let m = format!("message of {} bytes is over the {} byte limit", text.len(), state.config.limits.max_ws_message_bytes);
                    send(&mut socket, protocol::error(ErrorCode::MessageTooLarge, m, None)).await;
                    continue;
                }
                state.metrics.ws_messages_in.inc();
                match handle_text(&mut socket, &state, &mut joined, &text).await {
                    Flow::Continue => {}
                    Flow::Stop(end) => break end,
                }
            }
            ev = event => {
                match ev {
                    Some(ParticipantEvent::Removed { reason }) => {
                        if let Some(v) = protocol::event_json(&ParticipantEvent::Removed { reason }) {
                            send(&mut socket, v).await;
                        }
                        break End::Removed;
                    }
                    Some(ev) => {
                        if joined.as_mut().is_some_and(|j| j.chat.on_event(&ev)) {
                            continue;
                        }
                        if let Some(v) = protocol::event_json(&ev) {
                            send(&mut socket, v).await;
                        }
                    }
                    None => break End::Removed,
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > IDLE_TIMEOUT {
                    info!("client silent; closing");
                    break End::ClientClosed;
                }
                if joined.is_none() && tokio::time::Instant::now() > join_deadline {
                    send(&mut socket, protocol::error(ErrorCode::NotJoined, "no join within 20 s", None)).await;
                    break End::Fatal;
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break End::ClientClosed;
                }
            }
        }
    };

    if let Some(j) = joined {
        match end {
            End::Removed => {}
            End::Left => {
                let _ = state.engine.leave(j.id, LeaveReason::Left).await;
            }
            End::ClientClosed | End::Fatal => {
                let _ = state.engine.leave(j.id, LeaveReason::Disconnected).await;
            }
        }
        info!(participant = %j.id, "signaling session ended");
    }
    let _ = socket.send(Message::Close(Some(CloseFrame { code: 1000, reason: Utf8Bytes::from_static("bye") }))).await;
    linger(&mut socket).await;
}

/// How long a closing session keeps reading (and discarding) what the client still sends.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Reads until the client's close (or end of stream, or [`CLOSE_LINGER`]): a socket closed with
/// unread input is reset by the kernel, and a reset makes the client drop what it has not read
/// yet, such as the error that says why it is being closed (a flooding client has plenty unread).
async fn linger(socket: &mut WebSocket) {
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

enum Flow {
    Continue,
    Stop(End),
}

async fn send(socket: &mut WebSocket, v: Value) {
    let _ = socket.send(Message::Text(v.to_string().into())).await;
}

async fn handle_text(socket: &mut WebSocket, state: &Arc<AppState>, joined: &mut Option<Joined>, text: &str) -> Flow {
    let request = match protocol::parse(text) {
        Ok(r) => r,
        Err((req, why)) => {
            state.metrics.ws_errors(ErrorCode::BadMessage);
            debug!(why, "bad message");
            send(socket, protocol::error(ErrorCode::BadMessage, why, req)).await;
            return Flow::Continue;
        }
    };
    let req = request.req;
    let fail = |code: ErrorCode, msg: String| {
        state.metrics.ws_errors(code);
        protocol::error(code, msg, req)
    };
    match (request.message, joined.as_ref()) {
        (ClientMessage::Join { .. }, Some(_)) => {
            send(socket, fail(ErrorCode::AlreadyJoined, "already joined".into())).await;
        }
        (ClientMessage::Join { version, token }, None) => {
            if version != PROTOCOL_VERSION {
                send(socket, fail(ErrorCode::UnsupportedVersion, format!("protocol version {version} is not supported; use {PROTOCOL_VERSION}"))).await;
                return Flow::Stop(End::Fatal);
            }
            let access = match state.keys.verify(&token, unix_now()) {
                Ok(a) => a,
                Err(e) => {
                    info!(error = %e, "join refused");
                    send(socket, fail(ErrorCode::Unauthorized, e.to_string())).await;
                    return Flow::Stop(End::Fatal);
                }
            };
            let kind = ParticipantKind::WebSocket;
            let request = JoinRequest { room: RoomName(access.room.clone()), identity: access.identity.clone(), name: access.name.clone(), grants: access.grants, kind };
            match state.engine.join(request).await {
                Ok((j, events)) => {
                    let span = tracing::Span::current();
                    span.record("room", access.room.as_str());
                    span.record("participant", j.participant.id.to_string());
                    info!(identity = %access.identity, "joined");
                    let reply = json!({
                        "type": "joined",
                        "version": PROTOCOL_VERSION,
                        "room": access.room,
                        "participant": protocol::participant_json(&j.participant),
                        "grants": crate::auth::grant_names(access.grants),
                        "participants": j.others.iter().map(protocol::participant_json).collect::<Vec<_>>(),
                    });
                    send(socket, protocol::with_req(reply, req)).await;
                    let chat = ChatLink::new(state.chat.clone(), Actor::from_token(&access, Some(j.participant.id)));
                    *joined = Some(Joined { id: j.participant.id, events, chat });
                }
                Err(e) => {
                    send(socket, fail(ErrorCode::from_engine(&e), e.to_string())).await;
                    return Flow::Stop(End::Fatal);
                }
            }
        }
        (ClientMessage::Leave, Some(_)) => return Flow::Stop(End::Left),
        (ClientMessage::Leave, None) => return Flow::Stop(End::ClientClosed),
        (ClientMessage::Ping { id }, _) => {
            send(socket, protocol::with_req(json!({ "type": "pong", "id": id }), req)).await;
        }
        (_, None) => {
            send(socket, fail(ErrorCode::NotJoined, "send join first".into())).await;
        }
        (ClientMessage::Publish { sdp, tracks }, Some(j)) => {
            let mut decls = Vec::new();
            for t in tracks {
                let source = match t.source.as_deref().map(TrackSource::parse) {
                    None => TrackSource::Unknown,
                    Some(Some(s)) => s,
                    Some(None) => {
                        send(socket, fail(ErrorCode::BadMessage, format!("unknown track source {:?}", t.source))).await;
                        return Flow::Continue;
                    }
                };
                if t.track_id.len() > 256 || t.name.as_ref().is_some_and(|n| n.len() > 256) {
                    send(socket, fail(ErrorCode::BadMessage, "track id or name longer than 256 bytes".into())).await;
                    return Flow::Continue;
                }
                decls.push(TrackDeclaration { client_track_id: t.track_id, source, name: t.name.unwrap_or_default() });
            }
            match state.engine.publish(j.id, sdp, decls).await {
                Ok(answer) => {
                    let tracks: Vec<Value> = answer.tracks.iter().map(|(client, sid)| json!({ "track_id": client, "sid": sid.to_string() })).collect();
                    send(socket, protocol::with_req(json!({ "type": "publish_answer", "sdp": answer.sdp, "tracks": tracks }), req)).await;
                }
                Err(e) => send(socket, fail(ErrorCode::from_engine(&e), e.to_string())).await,
            }
        }
        (ClientMessage::SubscriberAnswer { sdp }, Some(j)) => {
            if let Err(e) = state.engine.subscriber_answer(j.id, sdp).await {
                send(socket, fail(ErrorCode::from_engine(&e), e.to_string())).await;
            }
        }
        (ClientMessage::Candidate { target, candidate }, Some(j)) => {
            let role = match target {
                Target::Publisher => PeerRole::Publisher,
                Target::Subscriber => PeerRole::Subscriber,
            };
            if candidate.as_ref().is_some_and(|c| c.candidate.len() > 1024) {
                send(socket, fail(ErrorCode::BadMessage, "candidate longer than 1024 bytes".into())).await;
                return Flow::Continue;
            }
            let c = candidate.map(|c| RemoteCandidate { candidate: c.candidate, sdp_mid: c.sdp_mid, sdp_mline_index: c.sdp_mline_index });
            if let Err(e) = state.engine.add_candidate(j.id, role, c).await {
                send(socket, fail(ErrorCode::from_engine(&e), e.to_string())).await;
            }
        }
        (ClientMessage::TrackSettings { track, width, height, visible, pinned }, Some(j)) => {
            let Some(track) = TrackId::parse(&track) else {
                send(socket, fail(ErrorCode::NotFound, format!("no track {track:?}"))).await;
                return Flow::Continue;
            };
            let dim = |v: Option<u32>| v.map(|x| x.min(16_384) as u16);
            let display = match (dim(width), dim(height)) {
                (Some(w), Some(h)) if w > 0 && h > 0 => Some((w, h)),
                _ => None,
            };
            let settings = warbler_sfu::engine::TrackSettings { display, visible, pinned };
            if let Err(e) = state.engine.set_track_settings(j.id, track, settings).await {
                send(socket, fail(ErrorCode::from_engine(&e), e.to_string())).await;
            }
        }
        (ClientMessage::Mute { track, muted }, Some(j)) => {
            let Some(track) = TrackId::parse(&track) else {
                send(socket, fail(ErrorCode::NotFound, format!("no track {track:?}"))).await;
                return Flow::Continue;
            };
            if let Err(e) = state.engine.set_muted(j.id, track, muted).await {
                send(socket, fail(ErrorCode::from_engine(&e), e.to_string())).await;
            }
        }
    }
    Flow::Continue
}
