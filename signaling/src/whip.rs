//! WHIP ingest (RFC 9725) and WHEP playback over HTTP: a POST with an SDP offer creates a room
//! participant and answers `201 Created` with a `Location`; PATCH trickles candidates; DELETE ends
//! the session. Thin adapters onto the same engine requests the WebSocket protocol uses.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde_json::json;
use tracing::{info, warn};
use warbler_sfu::api::{EngineError, JoinRequest, LeaveReason, ParticipantEvent, ParticipantKind};
use warbler_sfu::engine::RemoteCandidate;
use warbler_sfu::ids::{ParticipantId, PeerRole, RoomName};

use crate::auth::{AccessToken, AuthError, unix_now, valid_room_name};
use crate::chat::ChatLink;
use crate::chat::service::Actor;
use crate::state::AppState;

/// A live WHIP or WHEP session, found by the id in its Location.
pub struct HttpSession {
    pub participant: ParticipantId,
    pub room: String,
    pub role: PeerRole,
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({ "code": code, "message": message.into() }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn auth_error(e: AuthError) -> Response {
    if e.is_forbidden() {
        error(StatusCode::FORBIDDEN, "forbidden", e.to_string())
    } else {
        let mut r = error(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string());
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    }
}

fn engine_error(e: EngineError) -> Response {
    match e {
        EngineError::RoomFull(_) | EngineError::Draining => error(StatusCode::SERVICE_UNAVAILABLE, crate::protocol::ErrorCode::from_engine(&e).as_str(), e.to_string()),
        EngineError::BadSdp(_) => error(StatusCode::BAD_REQUEST, "bad_sdp", e.to_string()),
        EngineError::Forbidden(_) => error(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
        EngineError::UnknownParticipant | EngineError::UnknownTrack => error(StatusCode::NOT_FOUND, "not_found", e.to_string()),
        EngineError::WrongState(_) | EngineError::DataChannel(_) => error(StatusCode::CONFLICT, "invalid_state", e.to_string()),
        EngineError::Internal(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// The bearer token of a request, verified and checked against `room` and `grant`.
pub fn bearer(state: &AppState, headers: &HeaderMap, room: &str, grant: Option<&'static str>) -> Result<AccessToken, Response> {
    let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    // The scheme name is case-insensitive (RFC 9110 §11.1).
    let token = match value.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        _ => "",
    };
    let access = state.keys.verify(token, unix_now()).map_err(auth_error)?;
    access.require(room, grant).map_err(auth_error)?;
    Ok(access)
}

fn check_sdp_body(state: &AppState, headers: &HeaderMap, body: &Bytes, content_type: &str) -> Result<String, Response> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case(content_type) {
        return Err(error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "bad_message", format!("Content-Type must be {content_type}")));
    }
    if body.len() > state.config.limits.max_sdp_bytes {
        return Err(error(StatusCode::PAYLOAD_TOO_LARGE, "bad_sdp", format!("body of {} bytes is over the {} byte limit", body.len(), state.config.limits.max_sdp_bytes)));
    }
    String::from_utf8(body.to_vec()).map_err(|_| error(StatusCode::BAD_REQUEST, "bad_sdp", "body is not UTF-8"))
}

fn session_id() -> String {
    hex::encode(rand::rng().random::<[u8; 16]>())
}

fn created(location: String, answer: String) -> Response {
    let mut r = (StatusCode::CREATED, [(header::CONTENT_TYPE, "application/sdp")], answer).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// Keeps the session registry in step with the engine: when the engine removes the participant
/// (timeout, failure, drain), its session id stops resolving.
/// Also carries the session's chat data channel, if it opens one.
fn watch_session(state: Arc<AppState>, id: String, mut events: warbler_sfu::shell::EventReceiver, mut chat: ChatLink) {
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if chat.on_event(&ev) {
                continue;
            }
            if let ParticipantEvent::Removed { reason } = ev {
                info!(session = %id, reason = reason.as_str(), "HTTP session ended by the server");
                break;
            }
        }
        state.sessions.remove(&id);
    });
}

pub async fn whip_post(State(state): State<Arc<AppState>>, Path(room): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    if !valid_room_name(&room) {
        return error(StatusCode::NOT_FOUND, "not_found", "invalid room name");
    }
    let access = match bearer(&state, &headers, &room, Some("publish")) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let sdp = match check_sdp_body(&state, &headers, &body, "application/sdp") {
        Ok(s) => s,
        Err(r) => return r,
    };
    let req = JoinRequest { room: RoomName(room.clone()), identity: access.identity.clone(), name: access.name.clone(), grants: access.grants, kind: ParticipantKind::Whip };
    let (joined, events) = match state.engine.join(req).await {
        Ok(j) => j,
        Err(e) => return engine_error(e),
    };
    let id = joined.participant.id;
    match state.engine.publish(id, sdp, vec![]).await {
        Ok(answer) => {
            let sid = session_id();
            state.sessions.insert(sid.clone(), HttpSession { participant: id, room: room.clone(), role: PeerRole::Publisher });
            watch_session(state.clone(), sid.clone(), events, ChatLink::new(state.chat.clone(), Actor::from_token(&access, Some(id))));
            info!(room = %room, participant = %id, identity = %access.identity, "WHIP session created");
            created(format!("/whip/{room}/{sid}"), answer.sdp)
        }
        Err(e) => {
            warn!(error = %e, "WHIP offer refused");
            let _ = state.engine.leave(id, LeaveReason::Left).await;
            engine_error(e)
        }
    }
}

pub async fn whep_post(State(state): State<Arc<AppState>>, Path((room, identity)): Path<(String, String)>, headers: HeaderMap, body: Bytes) -> Response {
    if !valid_room_name(&room) || identity.is_empty() || identity.len() > crate::auth::MAX_IDENTITY_LEN {
        return error(StatusCode::NOT_FOUND, "not_found", "invalid room or identity");
    }
    let access = match bearer(&state, &headers, &room, Some("subscribe")) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let sdp = match check_sdp_body(&state, &headers, &body, "application/sdp") {
        Ok(s) => s,
        Err(r) => return r,
    };
    let req = JoinRequest {
        room: RoomName(room.clone()),
        identity: access.identity.clone(),
        name: access.name.clone(),
        grants: access.grants,
        kind: ParticipantKind::Whep { target_identity: identity.clone() },
    };
    let (joined, events) = match state.engine.join(req).await {
        Ok(j) => j,
        Err(e) => return engine_error(e),
    };
    let id = joined.participant.id;
    match state.engine.whep_offer(id, sdp).await {
        Ok(answer) => {
            let sid = session_id();
            state.sessions.insert(sid.clone(), HttpSession { participant: id, room: room.clone(), role: PeerRole::Whep });
            watch_session(state.clone(), sid.clone(), events, ChatLink::new(state.chat.clone(), Actor::from_token(&access, Some(id))));
            info!(room = %room, participant = %id, target = %identity, "WHEP session created");
            created(format!("/whep/{room}/{identity}/{sid}"), answer)
        }
        Err(e) => {
            warn!(error = %e, "WHEP offer refused");
            let _ = state.engine.leave(id, LeaveReason::Left).await;
            engine_error(e)
        }
    }
}

async fn patch(state: Arc<AppState>, room: String, sid: String, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = bearer(&state, &headers, &room, None) {
        return r;
    }
    let Some((participant, role)) = state.sessions.get(&sid).filter(|s| s.room == room).map(|s| (s.participant, s.role)) else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such session");
    };
    let frag = match check_sdp_body(&state, &headers, &body, "application/trickle-ice-sdpfrag") {
        Ok(s) => s,
        Err(r) => return r,
    };
    let mut mid = None;
    for line in frag.lines().map(str::trim) {
        if let Some(m) = line.strip_prefix("a=mid:") {
            mid = Some(m.to_owned());
        } else if let Some(c) = line.strip_prefix("a=") {
            if c.starts_with("candidate:") {
                let cand = RemoteCandidate { candidate: c.to_owned(), sdp_mid: mid.clone(), sdp_mline_index: None };
                if let Err(e) = state.engine.add_candidate(participant, role, Some(cand)).await {
                    return engine_error(e);
                }
            }
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn delete(state: Arc<AppState>, room: String, sid: String, headers: HeaderMap) -> Response {
    if let Err(r) = bearer(&state, &headers, &room, None) {
        return r;
    }
    let Some((_, session)) = state.sessions.remove(&sid).filter(|(_, s)| s.room == room) else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such session");
    };
    let _ = state.engine.leave(session.participant, LeaveReason::Left).await;
    info!(room = %room, participant = %session.participant, "HTTP session deleted");
    StatusCode::OK.into_response()
}

pub async fn whip_patch(State(state): State<Arc<AppState>>, Path((room, sid)): Path<(String, String)>, headers: HeaderMap, body: Bytes) -> Response {
    patch(state, room, sid, headers, body).await
}

pub async fn whip_delete(State(state): State<Arc<AppState>>, Path((room, sid)): Path<(String, String)>, headers: HeaderMap) -> Response {
    delete(state, room, sid, headers).await
}

pub async fn whep_patch(State(state): State<Arc<AppState>>, Path((room, _identity, sid)): Path<(String, String, String)>, headers: HeaderMap, body: Bytes) -> Response {
    patch(state, room, sid, headers, body).await
}

pub async fn whep_delete(State(state): State<Arc<AppState>>, Path((room, _identity, sid)): Path<(String, String, String)>, headers: HeaderMap) -> Response {
    delete(state, room, sid, headers).await
}

/// CORS preflight and capability discovery for WHIP/WHEP endpoints.
pub async fn options() -> Response {
    (
        StatusCode::NO_CONTENT,
        [
            ("Accept-Post", "application/sdp"),
            ("Access-Control-Allow-Methods", "POST, PATCH, DELETE, OPTIONS"),
            ("Access-Control-Allow-Headers", "Authorization, Content-Type, If-Match"),
            ("Access-Control-Expose-Headers", "Location, Link, ETag"),
        ],
    )
        .into_response()
}
