//! Chat vocabulary shared by the store, the service and the wire format: ids, messages, the
//! writes the group-commit writer applies and what each produced, and read queries.

use std::collections::BTreeMap;

use serde::Serialize;
use warbler_sfu::ids::RoomName;

use super::ChatError;

/// A message's position in its room: assigned by the server, strictly increasing, no gaps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Seq(pub u64);

/// A room's change counter: every stored change (post, edit, delete, reaction) takes the next
/// value, and the message it touched remembers it, so a device can ask "what changed since R".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Rev(pub u64);

/// The id a client gives its message; unique per (room, identity). A resend with the same id is
/// the same message.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ClientMsgId(String);

pub const MAX_CLIENT_ID_BYTES: usize = 64;
pub const MAX_EMOJI_BYTES: usize = 32;
/// Distinct reactions one message may carry.
pub const MAX_REACTIONS_PER_MESSAGE: usize = 32;

impl ClientMsgId {
    pub fn parse(s: &str) -> Result<Self, ChatError> {
        if s.is_empty() || s.len() > MAX_CLIENT_ID_BYTES || s.chars().any(char::is_control) {
            return Err(ChatError::BadMessage(format!("id must be 1-{MAX_CLIENT_ID_BYTES} bytes without control characters")));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A reaction: a short string without whitespace (an emoji, or a shortcode like `:+1:`).
pub fn check_emoji(e: &str) -> Result<(), ChatError> {
    if e.is_empty() || e.len() > MAX_EMOJI_BYTES || e.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ChatError::BadMessage(format!("emoji must be 1-{MAX_EMOJI_BYTES} bytes without whitespace")));
    }
    Ok(())
}

/// Who performs a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Author {
    pub identity: String,
    pub name: String,
}

/// A stored message as clients see it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Message {
    pub seq: Seq,
    pub rev: Rev,
    /// The client's id of the message.
    pub id: String,
    pub from: String,
    pub name: String,
    /// Empty once deleted.
    pub text: String,
    /// Unix milliseconds, assigned when the message became durable.
    pub ts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<Seq>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edited_ts: Option<i64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted_by: Option<String>,
    /// emoji → identities that reacted with it, in the order they did.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub reactions: BTreeMap<String, Vec<String>>,
}

/// One identity's read position in a room.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReadState {
    pub last_read: Seq,
    /// Messages after `last_read` that mention the identity.
    pub unread_mentions: u64,
    pub latest_seq: Seq,
}

/// A change the writer applies. Validation of shapes and sizes happens before (service); the
/// store decides what needs the stored state (existence, authorship, idempotency).
#[derive(Clone, Debug, PartialEq)]
pub enum WriteOp {
    Post { room: RoomName, author: Author, client_id: ClientMsgId, text: String, reply_to: Option<Seq>, mentions: Vec<String> },
    Edit { room: RoomName, identity: String, seq: Seq, text: String, mentions: Vec<String> },
    /// `admin`: the actor holds the admin grant and may delete anyone's message.
    Delete { room: RoomName, identity: String, admin: bool, seq: Seq },
    React { room: RoomName, identity: String, seq: Seq, emoji: String, on: bool },
    /// Moves the identity's read position forward to `seq` (never back).
    Read { room: RoomName, identity: String, seq: Seq },
}

impl WriteOp {
    pub fn room(&self) -> &RoomName {
        match self {
            WriteOp::Post { room, .. }
            | WriteOp::Edit { room, .. }
            | WriteOp::Delete { room, .. }
            | WriteOp::React { room, .. }
            | WriteOp::Read { room, .. } => room,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            WriteOp::Post { .. } => "chat",
            WriteOp::Edit { .. } => "edit",
            WriteOp::Delete { .. } => "delete",
            WriteOp::React { .. } => "react",
            WriteOp::Read { .. } => "read",
        }
    }
}

/// What a durable write produced.
#[derive(Clone, Debug, PartialEq)]
pub enum WriteOutcome {
    /// `duplicate`: the id was already stored; `message` is the original.
    Posted { message: Message, duplicate: bool, mentioned: Vec<(String, ReadState)> },
    Edited { message: Message, mentioned: Vec<(String, ReadState)> },
    Deleted { seq: Seq, rev: Rev, by: String },
    /// `changed`: false when the reaction was already there (or already absent).
    Reacted { seq: Seq, rev: Rev, emoji: String, identity: String, on: bool, changed: bool },
    Read { identity: String, state: ReadState, changed: bool },
}

/// Which slice of a room's history to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryQuery {
    /// The newest `limit` messages.
    Latest { limit: usize },
    /// The `limit` messages just before `seq` (paging back).
    Before { seq: Seq, limit: usize },
    /// The `limit` messages just after `seq` (catching up).
    After { seq: Seq, limit: usize },
    /// Messages changed (posted, edited, deleted, reacted to) after `rev`, by rev.
    ChangedSince { rev: Rev, limit: usize },
}

/// A page of history. Messages are in ascending seq order (by rev for `ChangedSince`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Page {
    pub messages: Vec<Message>,
    /// More messages exist beyond the page in the direction asked.
    pub has_more: bool,
    pub latest_seq: Seq,
    pub rev: Rev,
}

/// One search result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SearchHit {
    pub message: Message,
    /// bm25 relevance (higher is better); 0 for 1-2 character queries, which rank by recency.
    pub score: f64,
    /// A window of the text around the first match ("…" where cut).
    pub snippet: String,
    /// `[start, end)` ranges of matches in `snippet`, in Unicode code points.
    pub highlights: Vec<(usize, usize)>,
}
