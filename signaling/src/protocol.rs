//! The WebSocket protocol's messages (docs/protocol.md), parsing of client messages and the
//! JSON shape of server messages. Parsing never panics; every refusal names a code.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use warbler_sfu::api::{EngineError, ParticipantEvent, ParticipantInfo, TrackInfo};

pub const PROTOCOL_VERSION: u32 = 1;

#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Join {
        version: u32,
        token: String,
    },
    Publish {
        sdp: String,
        #[serde(default)]
        tracks: Vec<TrackDecl>,
    },
    SubscriberAnswer {
        sdp: String,
    },
    Candidate {
        target: Target,
        candidate: Option<CandidateInit>,
    },
    Mute {
        track: String,
        muted: bool,
    },
    /// How the subscriber shows a track (adaptive stream).
    TrackSettings {
        track: String,
        #[serde(default)]
        width: Option<u32>,
        #[serde(default)]
        height: Option<u32>,
        #[serde(default = "default_true")]
        visible: bool,
        #[serde(default)]
        pinned: bool,
    },
    Leave,
    Ping {
        #[serde(default)]
        id: Option<Value>,
    },
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize, PartialEq)]
pub struct TrackDecl {
    pub track_id: String,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize, PartialEq, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Publisher,
    Subscriber,
}

#[derive(Debug, Deserialize, PartialEq, Clone)]
pub struct CandidateInit {
    pub candidate: String,
    #[serde(rename = "sdpMid", default)]
    pub sdp_mid: Option<String>,
    #[serde(rename = "sdpMLineIndex", default)]
    pub sdp_mline_index: Option<u16>,
}

/// Error codes of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadMessage,
    MessageTooLarge,
    UnsupportedVersion,
    Unauthorized,
    Forbidden,
    NotJoined,
    AlreadyJoined,
    RoomFull,
    BadSdp,
    InvalidState,
    RateLimited,
    NotFound,
    Internal,
    Draining,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::AlreadyJoined => "already_joined",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::BadSdp => "bad_sdp",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Internal => "internal",
            ErrorCode::Draining => "draining",
        }
    }

    pub fn from_engine(e: &EngineError) -> Self {
        match e {
            EngineError::RoomFull(_) => ErrorCode::RoomFull,
            EngineError::Draining => ErrorCode::Draining,
            EngineError::UnknownParticipant => ErrorCode::NotJoined,
            EngineError::UnknownTrack => ErrorCode::NotFound,
            EngineError::Forbidden(_) => ErrorCode::Forbidden,
            EngineError::BadSdp(_) => ErrorCode::BadSdp,
            EngineError::WrongState(_) => ErrorCode::InvalidState,
            EngineError::Internal(_) => ErrorCode::Internal,
            EngineError::DataChannel(_) => ErrorCode::InvalidState,
        }
    }
}

/// A parsed client message with its optional request id.
#[derive(Debug)]
pub struct Request {
    pub req: Option<u64>,
    pub message: ClientMessage,
}

/// Parses one text frame. On failure returns the request id (if one could be read) and a
/// human-readable reason.
pub fn parse(text: &str) -> Result<Request, (Option<u64>, String)> {
    let value: Value = serde_json::from_str(text).map_err(|e| (None, format!("not JSON: {e}")))?;
    let Value::Object(ref obj) = value else {
        return Err((None, "a message must be a JSON object".into()));
    };
    let req = obj.get("req").and_then(Value::as_u64);
    match obj.get("type") {
        Some(Value::String(_)) => {}
        Some(_) => return Err((req, "\"type\" must be a string".into())),
        None => return Err((req, "missing \"type\"".into())),
    }
    let message = serde_json::from_value::<ClientMessage>(value).map_err(|e| (req, e.to_string()))?;
    Ok(Request { req, message })
}

pub fn error(code: ErrorCode, message: impl Into<String>, req: Option<u64>) -> Value {
    let mut v = json!({ "type": "error", "code": code.as_str(), "message": message.into() });
    if let Some(r) = req {
        v["req"] = json!(r);
    }
    v
}

pub fn with_req(mut v: Value, req: Option<u64>) -> Value {
    if let Some(r) = req {
        v["req"] = json!(r);
    }
    v
}

pub fn track_json(t: &TrackInfo) -> Value {
    json!({
        "sid": t.id.to_string(),
        "kind": match t.kind { warbler_media::MediaKind::Audio => "audio", warbler_media::MediaKind::Video => "video" },
        "source": t.source.as_str(),
        "codec": t.codec.map(|c| c.name()),
        "muted": t.muted,
        "name": t.name,
    })
}

pub fn participant_json(p: &ParticipantInfo) -> Value {
    json!({
        "sid": p.id.to_string(),
        "identity": p.identity,
        "name": p.name,
        "tracks": p.tracks.iter().map(track_json).collect::<Vec<_>>(),
    })
}

/// The JSON for an engine event; `None` for events that are not signaling messages (data
/// channel traffic, which the chat service handles).
pub fn event_json(ev: &ParticipantEvent) -> Option<Value> {
    Some(match ev {
        ParticipantEvent::ParticipantJoined(p) => json!({ "type": "participant_joined", "participant": participant_json(p) }),
        ParticipantEvent::ParticipantLeft { participant, reason } => {
            json!({ "type": "participant_left", "sid": participant.to_string(), "reason": reason.as_str() })
        }
        ParticipantEvent::TrackPublished { participant, track } => {
            json!({ "type": "track_published", "participant": participant.to_string(), "track": track_json(track) })
        }
        ParticipantEvent::TrackUnpublished { participant, track } => {
            json!({ "type": "track_unpublished", "participant": participant.to_string(), "track": track.to_string() })
        }
        ParticipantEvent::TrackMuted { participant, track, muted } => {
            json!({ "type": "track_muted", "participant": participant.to_string(), "track": track.to_string(), "muted": muted })
        }
        ParticipantEvent::SubscriberOffer { sdp, tracks } => {
            let map: serde_json::Map<String, Value> = tracks.iter().map(|(mid, t)| (mid.clone(), json!(t.to_string()))).collect();
            json!({ "type": "subscriber_offer", "sdp": sdp, "tracks": map })
        }
        ParticipantEvent::ConnectionState { role, state } => {
            let target = match role {
                warbler_sfu::ids::PeerRole::Publisher => "publisher",
                _ => "subscriber",
            };
            json!({ "type": "connection_state", "target": target, "state": state.as_str() })
        }
        ParticipantEvent::Removed { reason } => json!({ "type": "leave", "reason": reason.as_str() }),
        ParticipantEvent::TrackPaused { track, reason } => json!({ "type": "track_paused", "track": track.to_string(), "reason": reason.as_str() }),
        ParticipantEvent::TrackResumed { track } => json!({ "type": "track_resumed", "track": track.to_string() }),
        ParticipantEvent::ActiveSpeakers { speakers } => {
            let list: Vec<Value> = speakers.iter().map(|(p, level)| json!({ "sid": p.to_string(), "level": (f64::from(*level) * 100.0).round() / 100.0 })).collect();
            json!({ "type": "active_speakers", "speakers": list })
        }
        ParticipantEvent::LayerActivity { track, layers } => {
            let map: serde_json::Map<String, Value> = layers.iter().map(|(rid, on)| (rid.clone(), json!(on))).collect();
            json!({ "type": "layers", "track": track.to_string(), "active": map })
        }
        ParticipantEvent::DataChannelOpen { .. } | ParticipantEvent::DataChannelClosed { .. } | ParticipantEvent::DataMessage { .. } | ParticipantEvent::DataMessageRefused { .. } => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let ok: &[(&str, ClientMessage)] = &[
            (r#"{"type":"join","version":1,"token":"t"}"#, ClientMessage::Join { version: 1, token: "t".into() }),
            (r#"{"type":"leave","req":3}"#, ClientMessage::Leave),
            (r#"{"type":"ping"}"#, ClientMessage::Ping { id: None }),
            (r#"{"type":"mute","track":"TR_1","muted":true}"#, ClientMessage::Mute { track: "TR_1".into(), muted: true }),
            (
                r#"{"type":"candidate","target":"subscriber","candidate":null}"#,
                ClientMessage::Candidate { target: Target::Subscriber, candidate: None },
            ),
            (
                r#"{"type":"candidate","target":"publisher","candidate":{"candidate":"candidate:1 1 udp 1 1.2.3.4 5 typ host","sdpMid":"0","sdpMLineIndex":0}}"#,
                ClientMessage::Candidate {
                    target: Target::Publisher,
                    candidate: Some(CandidateInit { candidate: "candidate:1 1 udp 1 1.2.3.4 5 typ host".into(), sdp_mid: Some("0".into()), sdp_mline_index: Some(0) }),
                },
            ),
            (r#"{"type":"publish","sdp":"v=0"}"#, ClientMessage::Publish { sdp: "v=0".into(), tracks: vec![] }),
        ];
        for (text, want) in ok {
            assert_eq!(&parse(text).unwrap().message, want, "{text}");
        }
        assert_eq!(parse(r#"{"type":"leave","req":3}"#).unwrap().req, Some(3));
        let bad = [
            "",
            "nonsense",
            "[1,2]",
            "42",
            r#"{"no":"type"}"#,
            r#"{"type":7}"#,
            r#"{"type":"fly"}"#,
            r#"{"type":"join","version":"1","token":"t"}"#,
            r#"{"type":"join","token":"t"}"#,
            r#"{"type":"candidate","target":"sideways","candidate":null}"#,
            r#"{"type":"mute","track":"TR_1"}"#,
            "{\"type\":\"publish\",\"sdp\":\"\u{0}\"",
        ];
        for text in bad {
            assert!(parse(text).is_err(), "{text:?} must be refused");
        }
        assert_eq!(parse(r#"{"type":"fly","req":9}"#).unwrap_err().0, Some(9), "req survives a bad message");
    }

    #[test]
    fn active_speakers_shape() {
        use warbler_sfu::ids::ParticipantId;
        let ev = ParticipantEvent::ActiveSpeakers { speakers: vec![(ParticipantId(7), 0.8312), (ParticipantId(9), 0.2)] };
        let v = event_json(&ev).unwrap();
        assert_eq!(v["type"], "active_speakers");
        assert_eq!(v["speakers"][0], json!({"sid": ParticipantId(7).to_string(), "level": 0.83}));
        assert_eq!(v["speakers"][1]["sid"], ParticipantId(9).to_string());
        let none = event_json(&ParticipantEvent::ActiveSpeakers { speakers: vec![] }).unwrap();
        assert_eq!(none, json!({"type": "active_speakers", "speakers": []}));
    }

    #[test]
    fn error_shape() {
        let e = error(ErrorCode::RoomFull, "full", Some(4));
        assert_eq!(e, json!({"type":"error","code":"room_full","message":"full","req":4}));
    }
}
