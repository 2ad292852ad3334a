//! One participant's chat session on its `chat` data channel. [`ChatLink`] sits in the signaling
//! session (WebSocket or WHIP/WHEP) and routes the participant's chat data channel events to a
//! task, which greets the client (`hello` and the latest history), rate-limits and parses its
//! requests, and sends replies in request order while many writes are in flight.

use std::num::NonZeroU32;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use warbler_sfu::api::ParticipantEvent;
use warbler_sfu::ids::ParticipantId;

use super::service::{Actor, Pending};
use super::wire::{self, Request};
use super::*;

/// Requests of one session whose replies are still outstanding; beyond this the session stops
/// reading (the data channel then backs up to the client).
const MAX_IN_FLIGHT: usize = 4096;

type Out = Vec<(Value, &'static str)>;

/// Routes one participant's `chat` data channel to its chat session.
pub struct ChatLink {
    service: Arc<ChatService>,
    actor: Actor,
    inbox: Option<mpsc::UnboundedSender<Inbound>>,
}

impl ChatLink {
    /// `actor.participant` must be set: replies go to that participant.
    pub fn new(service: Arc<ChatService>, actor: Actor) -> Self {
        Self { service, actor, inbox: None }
    }

    fn start(&mut self) -> &mpsc::UnboundedSender<Inbound> {
        self.inbox.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(self.service.clone(), self.actor.clone(), rx));
            tx
        })
    }

    /// Takes the chat data channel's events; returns false for every other event.
    pub fn on_event(&mut self, ev: &ParticipantEvent) -> bool {
        match ev {
            ParticipantEvent::DataChannelOpen { label } if label == CHAT_LABEL => {
                // A reopened channel starts a new session (and a new greeting).
                self.inbox = None;
                self.start();
                true
            }
            ParticipantEvent::DataChannelClosed { label } if label == CHAT_LABEL => {
                self.inbox = None;
                true
            }
            ParticipantEvent::DataMessage { label, data, is_text } if label == CHAT_LABEL => {
                let _ = self.start().send(Inbound::Message(data.clone(), *is_text));
                true
            }
            ParticipantEvent::DataMessageRefused { label, len, limit } if label == CHAT_LABEL => {
                let _ = self.start().send(Inbound::TooLarge { len: *len, limit: *limit });
                true
            }
            _ => false,
        }
    }
}

/// What arrives on a chat data channel.
enum Inbound {
    Message(Bytes, bool),
    /// A message the engine refused for its size (never parsed: its id is unknown).
    TooLarge { len: usize, limit: usize },
}

async fn run(service: Arc<ChatService>, actor: Actor, mut inbox: mpsc::UnboundedReceiver<Inbound>) {
    let Some(me) = actor.participant else { return };
    greet(&service, &actor, me).await;
    let cfg = service.config();
    let quota = Quota::per_second(NonZeroU32::new(cfg.messages_per_second).unwrap_or(NonZeroU32::MIN)).allow_burst(NonZeroU32::new(cfg.burst).unwrap_or(NonZeroU32::MIN));
    let limiter = RateLimiter::direct(quota);
    let mut pending: FuturesOrdered<BoxFuture<'static, Out>> = FuturesOrdered::new();
    // When this session last said it is typing (and has not said it stopped).
    let mut typing_since: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            m = inbox.recv(), if pending.len() < MAX_IN_FLIGHT => match m {
                Some(Inbound::Message(data, is_text)) => pending.push_back(handle(&service, &actor, &limiter, &mut typing_since, &data, is_text)),
                Some(Inbound::TooLarge { len, limit }) => {
                    service.metrics.messages_in.with_label_values(&["invalid", "data_channel"]).inc();
                    pending.push_back(ready(refusal(&service, ChatError::TooLong { len, max: limit }, None, &None)));
                }
                None => break,
            },
            Some(out) = pending.next(), if !pending.is_empty() => {
                for (v, kind) in out {
                    service.send_to(me, v, kind).await;
                }
            }
        }
    }
    // The channel closed: writes already queued still become durable; tell what can be told.
    while let Some(out) = pending.next().await {
        for (v, kind) in out {
            service.send_to(me, v, kind).await;
        }
    }
    // Gone while typing: others' indicators stop now rather than when they expire.
    if typing_since.is_some_and(|t| t.elapsed() < TYPING_RELEVANT) {
        let _ = service.typing(&actor, false).await;
    }
}

/// How long after a `typing` on:true others may still show the indicator (clients expire it
/// after 6.5 s without a refresh).
const TYPING_RELEVANT: std::time::Duration = std::time::Duration::from_secs(7);

/// `hello` (who you are, where the room is, your read state, the limits) and the latest page.
async fn greet(service: &Arc<ChatService>, actor: &Actor, me: ParticipantId) {
    let cfg = service.config();
    let state = service.read_state(&actor.room, &actor.identity).await.unwrap_or_default();
    let page = service.history(&actor.room, HistoryQuery::Latest { limit: cfg.history_on_open.max(1) }).await.ok();
    let hello = json!({
        "type": "hello",
        "room": actor.room.0,
        "identity": actor.identity,
        "name": actor.name,
        "can_chat": actor.chat,
        "admin": actor.admin,
        "latest_seq": state.latest_seq.0,
        "rev": page.as_ref().map_or(0, |p| p.rev.0),
        "last_read": state.last_read.0,
        "unread_mentions": state.unread_mentions,
        "limits": { "max_text_bytes": cfg.max_text_bytes, "messages_per_second": cfg.messages_per_second, "burst": cfg.burst, "max_page": cfg.max_page },
    });
    service.send_to(me, hello, "hello").await;
    if let Some(p) = page.filter(|_| cfg.history_on_open > 0) {
        service.send_to(me, wire::page("history", &p, true, Some(wire::REPLY_BUDGET_BYTES), &None), "history").await;
    }
}

fn ready(out: Out) -> BoxFuture<'static, Out> {
    Box::pin(futures::future::ready(out))
}

fn refusal(service: &ChatService, e: ChatError, id: Option<&str>, req: &Option<Value>) -> Out {
    let e = service.refuse(e);
    let mut v = wire::error(e.code(), &e.to_string(), id, req);
    if let Some(ms) = e.retry_after_ms() {
        v["retry_after_ms"] = serde_json::json!(ms);
    }
    vec![(v, "error")]
}

/// Does everything that must happen in arrival order now (parse, rate limit, validate, queue the
/// write) and returns the future of the replies.
fn handle(service: &Arc<ChatService>, actor: &Actor, limiter: &DefaultDirectRateLimiter, typing_since: &mut Option<std::time::Instant>, data: &[u8], is_text: bool) -> BoxFuture<'static, Out> {
    if !is_text {
        service.metrics.messages_in.with_label_values(&["invalid", "data_channel"]).inc();
        return ready(refusal(service, ChatError::BadMessage("chat messages are JSON text, not binary".into()), None, &None));
    }
    let env = match wire::parse(data) {
        Ok(e) => e,
        Err(pe) => {
            service.metrics.messages_in.with_label_values(&["invalid", "data_channel"]).inc();
            return ready(refusal(service, ChatError::BadMessage(pe.why), pe.id.as_deref(), &pe.req));
        }
    };
    service.metrics.messages_in.with_label_values(&[env.request.kind(), "data_channel"]).inc();
    let req = env.req;
    let id = env.id;
    if let Err(not_until) = limiter.check() {
        return ready(refusal(service, ChatError::rate_limited(service.config().messages_per_second, &not_until), id.as_deref(), &req));
    }
    match env.request {
        Request::Chat { id: cid, text, reply_to } => {
            finish(service, service.post(actor, &cid, &text, reply_to), id, req, move |o, req| match o {
                WriteOutcome::Posted { message, duplicate, .. } => vec![(wire::ack(&cid, message.seq.0, message.ts, duplicate, req), "ack")],
                _ => vec![],
            })
        }
        Request::Edit { seq, text } => finish(service, service.edit(actor, seq, &text), id, req, move |_, req| vec![(wire::ok("edit", Some(seq), req), "ok")]),
        Request::Delete { seq } => finish(service, service.delete(actor, seq), id, req, move |_, req| vec![(wire::ok("delete", Some(seq), req), "ok")]),
        Request::React { seq, emoji, on } => finish(service, service.react(actor, seq, &emoji, on), id, req, move |_, req| vec![(wire::ok("react", Some(seq), req), "ok")]),
        Request::Read { seq } => finish(service, service.read(actor, seq), id, req, move |_, req| vec![(wire::ok("read", Some(seq), req), "ok")]),
        Request::History { before, after, limit } => {
            let q = match service.history_query(before, after, limit) {
                Ok(q) => q,
                Err(e) => return ready(refusal(service, e, None, &req)),
            };
            let (svc, room) = (service.clone(), actor.room.clone());
            Box::pin(async move {
                match svc.history(&room, q).await {
                    Ok(p) => vec![(wire::page("history", &p, after.is_none(), Some(wire::REPLY_BUDGET_BYTES), &req), "history")],
                    Err(e) => refusal(&svc, e, None, &req),
                }
            })
        }
        Request::Sync { rev, limit } => {
            let q = match service.sync_query(rev, limit) {
                Ok(q) => q,
                Err(e) => return ready(refusal(service, e, None, &req)),
            };
            let (svc, room) = (service.clone(), actor.room.clone());
            Box::pin(async move {
                match svc.history(&room, q).await {
                    Ok(p) => vec![(wire::page("sync", &p, false, Some(wire::REPLY_BUDGET_BYTES), &req), "sync")],
                    Err(e) => refusal(&svc, e, None, &req),
                }
            })
        }
        Request::Search { q, limit } => {
            let (svc, room) = (service.clone(), actor.room.clone());
            Box::pin(async move {
                match svc.search(&room, &q, limit).await {
                    Ok(hits) => vec![(wire::search_results(&q, &hits, Some(wire::REPLY_BUDGET_BYTES), &req), "search_results")],
                    Err(e) => refusal(&svc, e, None, &req),
                }
            })
        }
        Request::Typing { on } => {
            *typing_since = on.then(std::time::Instant::now);
            let (svc, actor) = (service.clone(), actor.clone());
            Box::pin(async move {
                match svc.typing(&actor, on).await {
                    Ok(()) => vec![],
                    Err(e) => refusal(&svc, e, None, &req),
                }
            })
        }
    }
}

/// The reply future of a submitted write: `reply` once durable, or the refusal.
fn finish(
    service: &Arc<ChatService>,
    p: Result<Pending, ChatError>,
    id: Option<String>,
    req: Option<Value>,
    reply: impl FnOnce(WriteOutcome, &Option<Value>) -> Out + Send + 'static,
) -> BoxFuture<'static, Out> {
    match p {
        Err(e) => ready(refusal(service, e, id.as_deref(), &req)),
        Ok(p) => {
            let svc = service.clone();
            Box::pin(async move {
                match p.await {
                    Ok(o) => reply(o, &req),
                    Err(e) => refusal(&svc, e, id.as_deref(), &req),
                }
            })
        }
    }
}
