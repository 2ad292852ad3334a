//! The chat service: validates requests (grants, sizes, shapes), submits writes to the
//! group-commit writer, runs reads on the blocking pool, and fans committed changes out to the
//! room in commit order. Transport-agnostic: data channel sessions, REST handlers, tests and the
//! benchmark all use it.

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus::Registry;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use warbler_sfu::ids::{ParticipantId, RoomName};

use super::metrics::ChatMetrics;
use super::sqlite::SqliteStore;
use super::store::ChatStore;
use super::text::{self, SearchQuery};
use super::transport::{Member, Transport};
use super::writer::{Clock, Committed, WriteResult, WriterHandle, system_clock};
use super::*;
use crate::auth::AccessToken;

/// Default page size of history requests.
pub const DEFAULT_PAGE: usize = 50;
pub const DEFAULT_SEARCH_LIMIT: usize = 20;
pub const MAX_SEARCH_LIMIT: usize = 50;
/// Committed batches waiting for the fan-out before the writer waits.
const FANOUT_QUEUE: usize = 256;

/// Who acts, from a verified access token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    pub room: RoomName,
    pub identity: String,
    pub name: String,
    /// May post, edit, delete own messages, react and type.
    pub chat: bool,
    /// May delete anyone's message.
    pub admin: bool,
    /// The participant session acting (None for REST).
    pub participant: Option<ParticipantId>,
}

impl Actor {
    pub fn from_token(t: &AccessToken, participant: Option<ParticipantId>) -> Self {
        Self { room: RoomName(t.room.clone()), identity: t.identity.clone(), name: t.name.clone(), chat: t.grants.chat, admin: t.grants.admin, participant }
    }

    fn require_chat(&self) -> Result<(), ChatError> {
        if self.chat { Ok(()) } else { Err(ChatError::Forbidden("the token lacks the chat grant")) }
    }
}

/// A submitted write; resolves when it is durable (or refused).
pub struct Pending(oneshot::Receiver<WriteResult>);

impl Future for Pending {
    type Output = WriteResult;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<WriteResult> {
        Pin::new(&mut self.0).poll(cx).map(|r| r.unwrap_or_else(|_| Err(ChatError::Store("the chat writer has stopped".into()))))
    }
}

pub struct ChatService {
    cfg: ChatConfig,
    store: Arc<dyn ChatStore>,
    writer: WriterHandle,
    pub metrics: ChatMetrics,
    transport: Arc<dyn Transport>,
    rest_limiter: DefaultKeyedRateLimiter<(String, String)>,
}

impl ChatService {
    /// Starts the writer thread and the fan-out task (needs a tokio runtime).
    pub fn start(cfg: ChatConfig, store: Arc<dyn ChatStore>, transport: Arc<dyn Transport>, registry: &Registry, clock: Clock) -> Result<Arc<Self>, ChatError> {
        cfg.validate().map_err(ChatError::BadMessage)?;
        let metrics = ChatMetrics::new(registry).map_err(|e| ChatError::Store(e.to_string()))?;
        let (events_tx, events_rx) = mpsc::channel(FANOUT_QUEUE);
        let writer = WriterHandle::spawn(store.clone(), cfg.max_batch, cfg.max_queue, events_tx, metrics.clone(), clock).map_err(|e| ChatError::Store(e.to_string()))?;
        tokio::spawn(fanout(events_rx, transport.clone(), metrics.clone()));
        let quota = Quota::per_second(NonZeroU32::new(cfg.messages_per_second).unwrap_or(NonZeroU32::MIN)).allow_burst(NonZeroU32::new(cfg.burst).unwrap_or(NonZeroU32::MIN));
        Ok(Arc::new(Self { cfg, store, writer, metrics, transport, rest_limiter: RateLimiter::keyed(quota) }))
    }

    /// The embedded default: SQLite in `data_dir`.
    pub fn open_sqlite(cfg: ChatConfig, data_dir: &Path, transport: Arc<dyn Transport>, registry: &Registry) -> Result<Arc<Self>, ChatError> {
        let store = Arc::new(SqliteStore::open(data_dir)?);
        Self::start(cfg, store, transport, registry, system_clock())
    }

    pub fn config(&self) -> &ChatConfig {
        &self.cfg
    }

    /// Counts a refusal and passes it on.
    pub fn refuse(&self, e: ChatError) -> ChatError {
        self.metrics.refused(e.code());
        e
    }

    fn check_text(&self, text: &str) -> Result<(), ChatError> {
        if text.len() > self.cfg.max_text_bytes {
            return Err(ChatError::TooLong { len: text.len(), max: self.cfg.max_text_bytes });
        }
        if text.trim().is_empty() {
            return Err(ChatError::BadMessage("empty text".into()));
        }
        if text.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t')) {
            return Err(ChatError::BadMessage("text contains control characters".into()));
        }
        Ok(())
    }

    fn submit(&self, op: WriteOp, origin: Option<ParticipantId>) -> Result<Pending, ChatError> {
        self.writer.submit(op, origin).map(Pending)
    }

    /// Posts a message; the result (seq, ts) arrives once it is durable. Queued before this
    /// returns, so posts of one caller keep their order.
    pub fn post(&self, a: &Actor, id: &str, text: &str, reply_to: Option<u64>) -> Result<Pending, ChatError> {
        a.require_chat()?;
        let client_id = ClientMsgId::parse(id)?;
        self.check_text(text)?;
        if reply_to == Some(0) {
            return Err(ChatError::NotFound("no message 0 to reply to".into()));
        }
        let op = WriteOp::Post {
            room: a.room.clone(),
            author: Author { identity: a.identity.clone(), name: a.name.clone() },
            client_id,
            text: text.to_owned(),
            reply_to: reply_to.map(Seq),
            mentions: text::mentions(text, &a.identity),
        };
        self.submit(op, a.participant)
    }

    pub fn edit(&self, a: &Actor, seq: u64, text: &str) -> Result<Pending, ChatError> {
        a.require_chat()?;
        self.check_text(text)?;
        let op = WriteOp::Edit { room: a.room.clone(), identity: a.identity.clone(), seq: Seq(seq), text: text.to_owned(), mentions: text::mentions(text, &a.identity) };
        self.submit(op, a.participant)
    }

    pub fn delete(&self, a: &Actor, seq: u64) -> Result<Pending, ChatError> {
        a.require_chat()?;
        self.submit(WriteOp::Delete { room: a.room.clone(), identity: a.identity.clone(), admin: a.admin, seq: Seq(seq) }, a.participant)
    }

    pub fn react(&self, a: &Actor, seq: u64, emoji: &str, on: bool) -> Result<Pending, ChatError> {
        a.require_chat()?;
        check_emoji(emoji)?;
        self.submit(WriteOp::React { room: a.room.clone(), identity: a.identity.clone(), seq: Seq(seq), emoji: emoji.to_owned(), on }, a.participant)
    }

    /// Moves the actor's read position forward (no chat grant needed: reading is not posting).
    pub fn read(&self, a: &Actor, seq: u64) -> Result<Pending, ChatError> {
        self.submit(WriteOp::Read { room: a.room.clone(), identity: a.identity.clone(), seq: Seq(seq) }, a.participant)
    }

    /// Relays a typing indicator to the rest of the room (not stored).
    pub async fn typing(&self, a: &Actor, on: bool) -> Result<(), ChatError> {
        a.require_chat()?;
        let members = self.transport.members(&a.room).await;
        let to: Vec<ParticipantId> = members.iter().map(|m| m.participant).filter(|p| Some(*p) != a.participant).collect();
        deliver(&*self.transport, &self.metrics, to, wire::typing(&a.identity, &a.name, on), "typing").await;
        Ok(())
    }

    /// Validates a history request's paging arguments.
    pub fn history_query(&self, before: Option<u64>, after: Option<u64>, limit: Option<usize>) -> Result<HistoryQuery, ChatError> {
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if limit == 0 || limit > self.cfg.max_page {
            return Err(ChatError::BadMessage(format!("limit must be 1-{}", self.cfg.max_page)));
        }
        Ok(match (before, after) {
            (Some(_), Some(_)) => return Err(ChatError::BadMessage("give before or after, not both".into())),
            (Some(b), None) => HistoryQuery::Before { seq: Seq(b), limit },
            (None, Some(a)) => HistoryQuery::After { seq: Seq(a), limit },
            (None, None) => HistoryQuery::Latest { limit },
        })
    }

    pub fn sync_query(&self, rev: u64, limit: Option<usize>) -> Result<HistoryQuery, ChatError> {
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if limit == 0 || limit > self.cfg.max_page {
            return Err(ChatError::BadMessage(format!("limit must be 1-{}", self.cfg.max_page)));
        }
        Ok(HistoryQuery::ChangedSince { rev: Rev(rev), limit })
    }

    pub async fn history(&self, room: &RoomName, q: HistoryQuery) -> Result<Page, ChatError> {
        let store = self.store.clone();
        let room = room.clone();
        blocking(move || store.history(&room, q)).await
    }

    pub async fn read_state(&self, room: &RoomName, identity: &str) -> Result<ReadState, ChatError> {
        let store = self.store.clone();
        let (room, identity) = (room.clone(), identity.to_owned());
        blocking(move || store.read_state(&room, &identity)).await
    }

    /// Full-text search in a room (see `ChatStore::search`).
    pub async fn search(&self, room: &RoomName, q: &str, limit: Option<usize>) -> Result<Vec<SearchHit>, ChatError> {
        let query = SearchQuery::parse(q)?;
        let limit = limit.unwrap_or(DEFAULT_SEARCH_LIMIT);
        if limit == 0 || limit > MAX_SEARCH_LIMIT {
            return Err(ChatError::BadMessage(format!("limit must be 1-{MAX_SEARCH_LIMIT}")));
        }
        let store = self.store.clone();
        let room = room.clone();
        let window = self.cfg.search_window;
        let started = Instant::now();
        let r = blocking(move || store.search(&room, &query, limit, window)).await;
        self.metrics.search_seconds.observe(started.elapsed().as_secs_f64());
        r
    }

    /// REST requests are limited per identity and room (there is no session to hang a limiter on).
    pub fn check_rest_rate(&self, room: &RoomName, identity: &str) -> Result<(), ChatError> {
        if self.rest_limiter.len() > 100_000 {
            self.rest_limiter.retain_recent();
        }
        self.rest_limiter.check_key(&(room.0.clone(), identity.to_owned())).map_err(|not_until| ChatError::rate_limited(self.cfg.messages_per_second, &not_until))
    }

    /// Sends one message to one participant's chat channel.
    pub async fn send_to(&self, to: ParticipantId, v: Value, kind: &'static str) -> bool {
        deliver(&*self.transport, &self.metrics, vec![to], v, kind).await
    }
}

async fn blocking<R: Send + 'static>(f: impl FnOnce() -> Result<R, ChatError> + Send + 'static) -> Result<R, ChatError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(ChatError::Store(format!("storage task failed: {e}"))))
}

/// Sends `v` to `to`; true when every delivery succeeded.
async fn deliver(t: &dyn Transport, metrics: &ChatMetrics, to: Vec<ParticipantId>, v: Value, kind: &'static str) -> bool {
    if to.is_empty() {
        return true;
    }
    let n = to.len();
    let failed = t.send(to, Bytes::from(v.to_string())).await;
    metrics.messages_out.with_label_values(&[kind]).inc_by((n - failed.len()) as u64);
    for (_, why) in &failed {
        metrics.delivery_failures.with_label_values(&[why.as_str()]).inc();
    }
    failed.is_empty()
}

/// One delivery: recipients, message, its type (for metrics).
pub type Delivery = (Vec<ParticipantId>, Value, &'static str);

/// Who is told what about one committed change (pure).
pub fn deliveries(c: &Committed, members: &[Member]) -> Vec<Delivery> {
    let all = || members.iter().map(|m| m.participant).collect::<Vec<_>>();
    let of = |identity: &str| members.iter().filter(|m| m.identity == identity).map(|m| m.participant).collect::<Vec<_>>();
    let mention_updates = |mentioned: &[(String, ReadState)]| mentioned.iter().map(|(who, s)| (of(who), wire::read_state(s), "read_state")).collect::<Vec<Delivery>>();
    match &c.outcome {
        WriteOutcome::Posted { duplicate: true, .. } => vec![],
        WriteOutcome::Posted { message, mentioned, .. } => {
            let others = members.iter().map(|m| m.participant).filter(|p| Some(*p) != c.origin).collect();
            let mut out = vec![(others, wire::message("chat", message), "chat")];
            out.extend(mention_updates(mentioned));
            out
        }
        WriteOutcome::Edited { message, mentioned } => {
            let mut out = vec![(all(), wire::message("edit", message), "edit")];
            out.extend(mention_updates(mentioned));
            out
        }
        WriteOutcome::Deleted { seq, rev, by } => vec![(all(), wire::deleted(seq.0, rev.0, by), "delete")],
        WriteOutcome::Reacted { changed: false, .. } | WriteOutcome::Read { changed: false, .. } => vec![],
        WriteOutcome::Reacted { seq, rev, emoji, identity, on, .. } => vec![(all(), wire::reaction(seq.0, rev.0, emoji, identity, *on), "reaction")],
        WriteOutcome::Read { identity, state, .. } => {
            let others = members.iter().filter(|m| m.identity != *identity).map(|m| m.participant).collect();
            vec![(others, wire::receipt(identity, state.last_read.0), "receipt"), (of(identity), wire::read_state(state), "read_state")]
        }
    }
}

/// Delivers committed batches in commit order (one task, sequential sends: the engine handles
/// commands in the order they are queued, so every participant sees seqs in order).
async fn fanout(mut rx: mpsc::Receiver<Vec<Committed>>, transport: Arc<dyn Transport>, metrics: ChatMetrics) {
    while let Some(batch) = rx.recv().await {
        let mut members: HashMap<RoomName, Vec<Member>> = HashMap::new();
        for c in batch {
            let room = c.op.room();
            if !members.contains_key(room) {
                let m = transport.members(room).await;
                members.insert(room.clone(), m);
            }
            for (to, v, kind) in deliveries(&c, &members[room]) {
                deliver(&*transport, &metrics, to, v, kind).await;
            }
        }
    }
}
