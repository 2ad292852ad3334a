//! Chat over HTTP for bots and clients without a data channel:
//! `GET /api/rooms/{room}/messages`, `POST /api/rooms/{room}/messages` and
//! `GET /api/rooms/{room}/messages/search`, with the same bearer tokens as everything else.
//! Errors are JSON `{"code","message"}` with 400/401/403/404/413/415/429/5xx.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use warbler_sfu::ids::RoomName;

use super::service::Actor;
use super::{ChatError, ErrorCode, WriteOutcome, wire};
use crate::auth::valid_room_name;
use crate::state::AppState;

/// Largest POST body: the text limit with room for JSON escaping and the other fields.
fn max_body(state: &AppState) -> usize {
    state.chat.config().max_text_bytes * 6 + 1024
}

fn error(code: ErrorCode, message: impl Into<String>, id: Option<&str>) -> Response {
    error_retry(code, message, id, None)
}

/// An error response; `retry_after_ms` adds the `retry_after_ms` field and a `Retry-After`
/// header (whole seconds, rounded up, as HTTP wants).
fn error_retry(code: ErrorCode, message: impl Into<String>, id: Option<&str>, retry_after_ms: Option<u64>) -> Response {
    let mut body = json!({ "code": code.as_str(), "message": message.into() });
    if let Some(id) = id {
        body["id"] = json!(id);
    }
    if let Some(ms) = retry_after_ms {
        body["retry_after_ms"] = json!(ms);
    }
    let status = StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, Json(body)).into_response();
    if let Some(ms) = retry_after_ms {
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(ms.div_ceil(1000).max(1)));
    }
    r
}

fn refuse(state: &AppState, e: ChatError, id: Option<&str>) -> Response {
    let e = state.chat.refuse(e);
    error_retry(e.code(), e.to_string(), id, e.retry_after_ms())
}

/// Room name, token (room match, grant), rate limit.
#[allow(clippy::result_large_err)] // the error is the finished response, built once per refusal
fn admit(state: &AppState, room: &str, headers: &HeaderMap, grant: Option<&'static str>, kind: &str) -> Result<Actor, Response> {
    state.chat.metrics.messages_in.with_label_values(&[kind, "rest"]).inc();
    if !valid_room_name(room) {
        return Err(refuse(state, ChatError::NotFound("invalid room name".into()), None));
    }
    let access = crate::whip::bearer(state, headers, room, grant).inspect_err(|r| {
        state.chat.metrics.refused(if r.status() == StatusCode::FORBIDDEN { ErrorCode::Forbidden } else { ErrorCode::Unauthorized });
    })?;
    let actor = Actor::from_token(&access, None);
    state.chat.check_rest_rate(&actor.room, &actor.identity).map_err(|e| refuse(state, e, None))?;
    Ok(actor)
}

fn number(q: &HashMap<String, String>, key: &str) -> Result<Option<u64>, ChatError> {
    q.get(key).map(|v| v.parse::<u64>().map_err(|_| ChatError::BadMessage(format!("{key} must be a non-negative integer")))).transpose()
}

fn query(q: Result<Query<HashMap<String, String>>, QueryRejection>) -> Result<HashMap<String, String>, ChatError> {
    q.map(|Query(q)| q).map_err(|e| ChatError::BadMessage(format!("bad query string: {e}")))
}

/// `GET /api/rooms/{room}/messages?before=SEQ|after=SEQ&limit=N`
pub async fn list(State(state): State<Arc<AppState>>, Path(room): Path<String>, headers: HeaderMap, q: Result<Query<HashMap<String, String>>, QueryRejection>) -> Response {
    let actor = match admit(&state, &room, &headers, None, "history") {
        Ok(a) => a,
        Err(r) => return r,
    };
    let hq = query(q).and_then(|q| {
        let limit = number(&q, "limit")?.map(|l| l.min(usize::MAX as u64) as usize);
        state.chat.history_query(number(&q, "before")?, number(&q, "after")?, limit)
    });
    let hq = match hq {
        Ok(h) => h,
        Err(e) => return refuse(&state, e, None),
    };
    let after = matches!(hq, super::HistoryQuery::After { .. });
    match state.chat.history(&actor.room, hq).await {
        Ok(page) => {
            let mut v = wire::page("history", &page, !after, None, &None);
            if let Value::Object(o) = &mut v {
                o.remove("type");
            }
            Json(v).into_response()
        }
        Err(e) => refuse(&state, e, None),
    }
}

#[derive(Deserialize)]
struct PostBody {
    id: String,
    text: String,
    #[serde(default)]
    reply_to: Option<u64>,
}

/// `POST /api/rooms/{room}/messages` with `{"id","text","reply_to"?}` → `201 {"id","seq","ts"}`
/// once durable (`200` with `"duplicate":true` for a resend of a stored id).
pub async fn post(State(state): State<Arc<AppState>>, Path(room): Path<String>, headers: HeaderMap, body: Body) -> Response {
    let actor = match admit(&state, &room, &headers, Some("chat"), "chat") {
        Ok(a) => a,
        Err(r) => return r,
    };
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json") {
        state.chat.metrics.refused(ErrorCode::BadMessage);
        let mut r = error(ErrorCode::BadMessage, "Content-Type must be application/json", None);
        *r.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return r;
    }
    let limit = max_body(&state);
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => return refuse(&state, ChatError::TooLong { len: limit + 1, max: state.chat.config().max_text_bytes }, None),
    };
    let body: PostBody = match serde_json::from_slice(&bytes) {
        Ok(b) => b,
        Err(e) => return refuse(&state, ChatError::BadMessage(format!("body: {e}")), None),
    };
    let pending = match state.chat.post(&actor, &body.id, &body.text, body.reply_to) {
        Ok(p) => p,
        Err(e) => return refuse(&state, e, Some(&body.id)),
    };
    match pending.await {
        Ok(WriteOutcome::Posted { message, duplicate, .. }) => {
            let status = if duplicate { StatusCode::OK } else { StatusCode::CREATED };
            (status, Json(json!({ "id": body.id, "seq": message.seq.0, "ts": message.ts, "duplicate": duplicate }))).into_response()
        }
        Ok(_) => error(ErrorCode::Internal, "unexpected outcome", Some(&body.id)),
        Err(e) => refuse(&state, e, Some(&body.id)),
    }
}

/// `GET /api/rooms/{room}/messages/search?q=TEXT&limit=N`
pub async fn search(State(state): State<Arc<AppState>>, Path(room): Path<String>, headers: HeaderMap, q: Result<Query<HashMap<String, String>>, QueryRejection>) -> Response {
    let actor = match admit(&state, &room, &headers, None, "search") {
        Ok(a) => a,
        Err(r) => return r,
    };
    let q = match query(q) {
        Ok(q) => q,
        Err(e) => return refuse(&state, e, None),
    };
    let Some(text) = q.get("q") else { return refuse(&state, ChatError::BadMessage("missing q".into()), None) };
    let limit = match number(&q, "limit") {
        Ok(l) => l.map(|l| l.min(usize::MAX as u64) as usize),
        Err(e) => return refuse(&state, e, None),
    };
    match state.chat.search(&RoomName(actor.room.0.clone()), text, limit).await {
        Ok(hits) => {
            let mut v = wire::search_results(text, &hits, None, &None);
            if let Value::Object(o) = &mut v {
                o.remove("type");
                o.remove("truncated");
            }
            Json(v).into_response()
        }
        Err(e) => refuse(&state, e, None),
    }
}

/// CORS preflight for the chat API.
pub async fn options() -> Response {
    (
        StatusCode::NO_CONTENT,
        [("Access-Control-Allow-Methods", "GET, POST, OPTIONS"), ("Access-Control-Allow-Headers", "Authorization, Content-Type")],
    )
        .into_response()
}
