//! The chat wire format on the `chat` data channel (docs/protocol.md, "Chat"): parsing client
//! requests (never panics; every refusal names a code) and the JSON of server messages. Replies
//! that carry lists are cut to fit one data channel message.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{ErrorCode, Message, Page, ReadState, SearchHit};

/// Largest JSON reply built from a list (history, sync, search): under the 64 KiB that every
/// WebRTC stack accepts as one data channel message.
pub const REPLY_BUDGET_BYTES: usize = 48 * 1024;
const MAX_REQ_BYTES: usize = 64;

#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Chat {
        id: String,
        text: String,
        #[serde(default)]
        reply_to: Option<u64>,
    },
    History {
        #[serde(default)]
        before: Option<u64>,
        #[serde(default)]
        after: Option<u64>,
        #[serde(default)]
        limit: Option<usize>,
    },
    Sync {
        rev: u64,
        #[serde(default)]
        limit: Option<usize>,
    },
    Edit {
        seq: u64,
        text: String,
    },
    Delete {
        seq: u64,
    },
    React {
        seq: u64,
        emoji: String,
        #[serde(default = "yes")]
        on: bool,
    },
    Typing {
        #[serde(default = "yes")]
        on: bool,
    },
    Read {
        seq: u64,
    },
    Search {
        q: String,
        #[serde(default)]
        limit: Option<usize>,
    },
}

fn yes() -> bool {
    true
}

impl Request {
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Chat { .. } => "chat",
            Request::History { .. } => "history",
            Request::Sync { .. } => "sync",
            Request::Edit { .. } => "edit",
            Request::Delete { .. } => "delete",
            Request::React { .. } => "react",
            Request::Typing { .. } => "typing",
            Request::Read { .. } => "read",
            Request::Search { .. } => "search",
        }
    }
}

/// A parsed request with what a reply must echo: `req` (any number, or a string up to 64
/// bytes) and, for chat, the client's message `id`.
#[derive(Debug, PartialEq)]
pub struct Envelope {
    pub req: Option<Value>,
    pub id: Option<String>,
    pub request: Request,
}

/// A refused parse: what could be read for the error reply, and why.
#[derive(Debug, PartialEq)]
pub struct ParseError {
    pub req: Option<Value>,
    pub id: Option<String>,
    pub why: String,
}

pub fn parse(data: &[u8]) -> Result<Envelope, ParseError> {
    let fail = |req, id, why: String| ParseError { req, id, why };
    let value: Value = serde_json::from_slice(data).map_err(|e| fail(None, None, format!("not JSON: {e}")))?;
    let Value::Object(obj) = &value else { return Err(fail(None, None, "a message must be a JSON object".into())) };
    let req = obj.get("req").filter(|r| r.is_number() || r.as_str().is_some_and(|s| s.len() <= MAX_REQ_BYTES)).cloned();
    let id = obj.get("id").and_then(Value::as_str).filter(|s| s.len() <= super::MAX_CLIENT_ID_BYTES).map(str::to_owned);
    match obj.get("type") {
        Some(Value::String(_)) => {}
        Some(_) => return Err(fail(req, id, "\"type\" must be a string".into())),
        None => return Err(fail(req, id, "missing \"type\"".into())),
    }
    match serde_json::from_value::<Request>(value) {
        Ok(request) => Ok(Envelope { req, id, request }),
        Err(e) => Err(fail(req, id, e.to_string())),
    }
}

fn with(mut v: Value, req: &Option<Value>) -> Value {
    if let Some(r) = req {
        v["req"] = r.clone();
    }
    v
}

pub fn error(code: ErrorCode, message: &str, id: Option<&str>, req: &Option<Value>) -> Value {
    let mut v = json!({ "type": "error", "code": code.as_str(), "message": message });
    if let Some(id) = id {
        v["id"] = json!(id);
    }
    with(v, req)
}

pub fn ack(id: &str, seq: u64, ts: i64, duplicate: bool, req: &Option<Value>) -> Value {
    let mut v = json!({ "type": "ack", "id": id, "seq": seq, "ts": ts });
    if duplicate {
        v["duplicate"] = json!(true);
    }
    with(v, req)
}

/// A message as pushed to the room: `{"type":"chat", seq, id, from, name, text, ts, ...}`;
/// `type` `edit` carries the whole message after an edit.
pub fn message(typ: &str, m: &Message) -> Value {
    let mut v = serde_json::to_value(m).unwrap_or_else(|_| json!({}));
    v["type"] = json!(typ);
    v
}

pub fn deleted(seq: u64, rev: u64, by: &str) -> Value {
    json!({ "type": "delete", "seq": seq, "rev": rev, "by": by })
}

pub fn reaction(seq: u64, rev: u64, emoji: &str, from: &str, on: bool) -> Value {
    json!({ "type": "reaction", "seq": seq, "rev": rev, "emoji": emoji, "from": from, "on": on })
}

pub fn typing(from: &str, name: &str, on: bool) -> Value {
    json!({ "type": "typing", "from": from, "name": name, "on": on })
}

pub fn receipt(from: &str, seq: u64) -> Value {
    json!({ "type": "receipt", "from": from, "seq": seq })
}

pub fn read_state(s: &ReadState) -> Value {
    json!({ "type": "read_state", "last_read": s.last_read.0, "unread_mentions": s.unread_mentions, "latest_seq": s.latest_seq.0 })
}

pub fn ok(op: &str, seq: Option<u64>, req: &Option<Value>) -> Value {
    let mut v = json!({ "type": "ok", "op": op });
    if let Some(s) = seq {
        v["seq"] = json!(s);
    }
    with(v, req)
}

/// Keeps as many messages as fit `budget` bytes, dropping from the oldest end (`keep_newest`)
/// or the newest end; returns whether any were dropped.
fn fit(items: &mut Vec<Value>, keep_newest: bool, budget: usize) -> bool {
    let sizes: Vec<usize> = items.iter().map(|v| v.to_string().len() + 1).collect();
    let mut total = 0;
    let mut keep = 0;
    let order: Box<dyn Iterator<Item = &usize>> = if keep_newest { Box::new(sizes.iter().rev()) } else { Box::new(sizes.iter()) };
    for s in order {
        if total + s > budget && keep > 0 {
            break;
        }
        total += s;
        keep += 1;
    }
    let cut = keep < items.len();
    if keep_newest {
        items.drain(..items.len() - keep);
    } else {
        items.truncate(keep);
    }
    cut
}

/// A history (`typ` = `history`) or sync (`sync`) reply. `keep_newest`: the page was asked
/// backwards (latest, before), so a cut keeps its newest messages.
pub fn page(typ: &str, p: &Page, keep_newest: bool, budget: Option<usize>, req: &Option<Value>) -> Value {
    let mut items: Vec<Value> = p.messages.iter().map(|m| message("chat", m)).collect();
    for v in &mut items {
        if let Value::Object(o) = v {
            o.remove("type");
        }
    }
    let cut = budget.is_some_and(|b| fit(&mut items, keep_newest, b));
    with(json!({ "type": typ, "messages": items, "has_more": p.has_more || cut, "latest_seq": p.latest_seq.0, "rev": p.rev.0 }), req)
}

pub fn hit(h: &SearchHit) -> Value {
    let mut m = serde_json::to_value(&h.message).unwrap_or_else(|_| json!({}));
    if let Value::Object(o) = &mut m {
        o.remove("type");
    }
    json!({ "message": m, "score": h.score, "snippet": h.snippet, "highlights": h.highlights })
}

pub fn search_results(q: &str, hits: &[SearchHit], budget: Option<usize>, req: &Option<Value>) -> Value {
    let mut items: Vec<Value> = hits.iter().map(hit).collect();
    let cut = budget.is_some_and(|b| fit(&mut items, false, b));
    with(json!({ "type": "search_results", "q": q, "results": items, "truncated": cut }), req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Rev, Seq};

    #[test]
    fn parse_table() {
        let ok: &[(&str, Request)] = &[
            (r#"{"type":"chat","id":"c1","text":"hi"}"#, Request::Chat { id: "c1".into(), text: "hi".into(), reply_to: None }),
            (r#"{"type":"chat","id":"c1","text":"hi","reply_to":3,"extra":1}"#, Request::Chat { id: "c1".into(), text: "hi".into(), reply_to: Some(3) }),
            (r#"{"type":"history","before":10,"limit":5}"#, Request::History { before: Some(10), after: None, limit: Some(5) }),
            (r#"{"type":"history"}"#, Request::History { before: None, after: None, limit: None }),
            (r#"{"type":"sync","rev":7}"#, Request::Sync { rev: 7, limit: None }),
            (r#"{"type":"edit","seq":2,"text":"x"}"#, Request::Edit { seq: 2, text: "x".into() }),
            (r#"{"type":"delete","seq":2}"#, Request::Delete { seq: 2 }),
            (r#"{"type":"react","seq":2,"emoji":"👍"}"#, Request::React { seq: 2, emoji: "👍".into(), on: true }),
            (r#"{"type":"react","seq":2,"emoji":"👍","on":false}"#, Request::React { seq: 2, emoji: "👍".into(), on: false }),
            (r#"{"type":"typing"}"#, Request::Typing { on: true }),
            (r#"{"type":"read","seq":9}"#, Request::Read { seq: 9 }),
            (r#"{"type":"search","q":"世界","limit":3}"#, Request::Search { q: "世界".into(), limit: Some(3) }),
        ];
        for (text, want) in ok {
            assert_eq!(&parse(text.as_bytes()).expect(text).request, want, "{text}");
        }
        let e = parse(br#"{"type":"chat","id":"c9","req":4}"#).unwrap_err();
        assert_eq!((e.req, e.id.as_deref()), (Some(json!(4)), Some("c9")), "req and id survive a bad message");
        let bad: &[&[u8]] = &[
            b"",
            b"nope",
            b"[1]",
            br#"{"no":"type"}"#,
            br#"{"type":5}"#,
            br#"{"type":"fly"}"#,
            br#"{"type":"chat","text":"no id"}"#,
            br#"{"type":"chat","id":"a","text":7}"#,
            br#"{"type":"history","before":-1}"#,
            br#"{"type":"react","seq":1}"#,
            &[0xff, 0xfe],
        ];
        for b in bad {
            assert!(parse(b).is_err(), "{:?} must be refused", String::from_utf8_lossy(b));
        }
        assert_eq!(parse(br#"{"type":"typing","req":{"x":1}}"#).unwrap().req, None, "only scalar req is echoed");
    }

    fn msg(seq: u64, text: &str) -> Message {
        Message {
            seq: Seq(seq),
            rev: Rev(seq),
            id: format!("c{seq}"),
            from: "alice".into(),
            name: "Alice".into(),
            text: text.into(),
            ts: 1,
            reply_to: None,
            mentions: vec![],
            edited_ts: None,
            deleted: false,
            deleted_by: None,
            reactions: Default::default(),
        }
    }

    #[test]
    fn shapes() {
        assert_eq!(ack("c1", 5, 77, false, &Some(json!("r"))), json!({"type":"ack","id":"c1","seq":5,"ts":77,"req":"r"}));
        assert_eq!(error(ErrorCode::TooLong, "big", Some("c1"), &None), json!({"type":"error","code":"too_long","message":"big","id":"c1"}));
        let m = message("chat", &msg(3, "hi"));
        assert_eq!(m, json!({"type":"chat","seq":3,"rev":3,"id":"c3","from":"alice","name":"Alice","text":"hi","ts":1}));
    }

    #[test]
    fn pages_fit_the_budget() {
        let big = "x".repeat(1000);
        let p = Page { messages: (1..=100).map(|s| msg(s, &big)).collect(), has_more: false, latest_seq: Seq(100), rev: Rev(100) };
        let v = page("history", &p, true, Some(REPLY_BUDGET_BYTES), &None);
        assert!(v.to_string().len() <= REPLY_BUDGET_BYTES + 200);
        let seqs: Vec<u64> = v["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        assert_eq!(*seqs.last().unwrap(), 100, "a backwards page keeps the newest");
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
        assert_eq!(v["has_more"], true);
        let v = page("history", &p, false, Some(REPLY_BUDGET_BYTES), &None);
        assert_eq!(v["messages"][0]["seq"], 1, "a forward page keeps the oldest");
        let small = Page { messages: vec![msg(1, "a")], has_more: false, latest_seq: Seq(1), rev: Rev(1) };
        assert_eq!(page("history", &small, true, Some(REPLY_BUDGET_BYTES), &None)["has_more"], false);
    }
}
