//! Chat: text messages on each participant's `chat` data channel (and a REST API for bots), with
//! server-assigned per-room sequence numbers, durable history acknowledged only after fsync,
//! multi-device sync, edits, deletes, reactions, typing, read receipts, mentions and full-text
//! search (CJK included). The protocol is in `docs/protocol.md`, section "Chat".
//!
//! ```text
//! data channel / REST ──▶ session (parse, rate limit, validate) ──▶ ChatService::submit
//!                                                                    │ bounded queue
//!                              writer thread: group commit ◀─────────┘
//!                              (one transaction + fsync per batch, via ChatStore)
//!                                 │ replies (ack)        │ committed events, in commit order
//!                                 ▼                      ▼
//!                              the submitter          fan-out task ──▶ Transport (engine data channels)
//! ```
//! Reads (history, search, read state) run on tokio's blocking pool against reader connections.

pub mod metrics;
pub mod model;
pub mod rest;
pub mod service;
pub mod session;
pub mod sqlite;
pub mod store;
pub mod text;
pub mod transport;
pub mod wire;
pub mod writer;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use model::*;
pub use service::ChatService;
pub use session::ChatLink;
pub use store::ChatStore;

/// The data channel label chat travels on.
pub const CHAT_LABEL: &str = "chat";

/// The `[chat]` table of the configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ChatConfig {
    /// Largest message text, in UTF-8 bytes.
    pub max_text_bytes: usize,
    /// Sustained chat requests per second per participant (data channel) or per identity and
    /// room (REST); bursts of `burst` pass.
    pub messages_per_second: u32,
    pub burst: u32,
    /// Messages pushed when a participant's chat channel opens.
    pub history_on_open: usize,
    /// Largest page a history or sync request may ask for.
    pub max_page: usize,
    /// Most writes committed in one transaction (group commit).
    pub max_batch: usize,
    /// Writes waiting for the writer beyond this are refused with `unavailable`.
    pub max_queue: usize,
    /// Search ranks (bm25) the newest this many matches of a query.
    pub search_window: usize,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            max_text_bytes: 4096,
            messages_per_second: 10,
            burst: 20,
            history_on_open: 50,
            max_page: 200,
            max_batch: 1024,
            max_queue: 65_536,
            search_window: 2000,
        }
    }
}

impl ChatConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_text_bytes == 0 || self.max_text_bytes > 60 * 1024 {
            return Err("chat.max_text_bytes must be 1..=61440 (a data channel message is at most 64 KiB)".into());
        }
        if self.messages_per_second == 0 || self.burst == 0 {
            return Err("chat.messages_per_second and chat.burst must be at least 1".into());
        }
        if self.max_page == 0 || self.max_batch == 0 || self.max_queue == 0 || self.search_window == 0 {
            return Err("chat.max_page, max_batch, max_queue and search_window must be at least 1".into());
        }
        Ok(())
    }
}

/// Machine codes of chat refusals (data channel `error.code`, REST `code`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadMessage,
    Unauthorized,
    TooLong,
    RateLimited,
    Forbidden,
    NotFound,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::BadMessage,
        ErrorCode::Unauthorized,
        ErrorCode::TooLong, ErrorCode::RateLimited, ErrorCode::Forbidden, ErrorCode::NotFound,         ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TooLong => "too_long",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadMessage => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::TooLong => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

/// Everything that can go wrong in chat: refusals of one request and storage failures.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    #[error("{0}")]
    BadMessage(String),
    #[error("text of {len} bytes is over the {max} byte limit")]
    TooLong { len: usize, max: usize },
    #[error("more than {per_second} chat messages per second; retry in {retry_after_ms} ms")]
    RateLimited { per_second: u32, retry_after_ms: u64 },
    #[error("not allowed: {0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    NotFound(String),
    #[error("chat storage is overloaded; retry")]
    Overloaded,
    #[error("chat storage failed: {0}")]
    Store(String),
}

impl ChatError {
    /// A rate-limit refusal from a governor verdict: how long until one more message passes.
    pub fn rate_limited(per_second: u32, not_until: &governor::NotUntil<governor::clock::QuantaInstant>) -> Self {
        use governor::clock::{Clock, DefaultClock};
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        // Rounded up, at least 1 ms: a client that waits this long is let through.
        let retry_after_ms = (wait.as_micros().div_ceil(1000) as u64).max(1);
        ChatError::RateLimited { per_second, retry_after_ms }
    }

    /// For refusals a client should retry later: after how many milliseconds.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            ChatError::RateLimited { retry_after_ms, .. } => Some(*retry_after_ms),
            _ => None,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ChatError::BadMessage(_) => ErrorCode::BadMessage,
            ChatError::TooLong { .. } => ErrorCode::TooLong,
            ChatError::RateLimited { .. } => ErrorCode::RateLimited,
            ChatError::Forbidden(_) => ErrorCode::Forbidden,
            ChatError::NotFound(_) => ErrorCode::NotFound,
            ChatError::Overloaded => ErrorCode::Unavailable,
            ChatError::Store(_) => ErrorCode::Internal,
        }
    }
}

impl From<rusqlite::Error> for ChatError {
    fn from(e: rusqlite::Error) -> Self {
        ChatError::Store(e.to_string())
    }
}
