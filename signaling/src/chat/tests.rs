//! Table and scenario tests of the chat store (SQLite) and service (with an in-memory transport).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde_json::Value;
use warbler_sfu::ids::{ParticipantId, RoomName};

use super::service::{Actor, deliveries};
use super::sqlite::{self, SqliteStore};
use super::store::ChatStore;
use super::text::SearchQuery;
use super::transport::{DeliveryFailure, Member, Transport};
use super::writer::Committed;
use super::*;

fn room(n: &str) -> RoomName {
    RoomName(n.into())
}

fn author(id: &str) -> Author {
    Author { identity: id.into(), name: id.to_uppercase() }
}

fn post(r: &str, who: &str, cid: &str, text: &str) -> WriteOp {
    WriteOp::Post {
        room: room(r),
        author: author(who),
        client_id: ClientMsgId::parse(cid).unwrap(),
        text: text.into(),
        reply_to: None,
        mentions: text::mentions(text, who),
    }
}

fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(dir.path()).unwrap();
    (dir, s)
}

/// Applies one op in its own batch and returns its outcome.
fn one(s: &SqliteStore, op: WriteOp) -> Result<WriteOutcome, ChatError> {
    s.apply(1_000, &[op]).unwrap().pop().unwrap()
}

fn posted(o: Result<WriteOutcome, ChatError>) -> (u64, bool) {
    match o {
        Ok(WriteOutcome::Posted { message, duplicate, .. }) => (message.seq.0, duplicate),
        other => panic!("not posted: {other:?}"),
    }
}

fn seqs(p: &Page) -> Vec<u64> {
    p.messages.iter().map(|m| m.seq.0).collect()
}

#[test]
fn seq_is_per_room_increasing_and_gapless_across_batches() {
    let (_d, s) = store();
    let batch: Vec<WriteOp> = (0..5).map(|i| post(if i % 2 == 0 { "a" } else { "b" }, "alice", &format!("m{i}"), "x")).collect();
    let out: Vec<(u64, bool)> = s.apply(1, &batch).unwrap().into_iter().map(posted).collect();
    assert_eq!(out, vec![(1, false), (1, false), (2, false), (2, false), (3, false)]);
    for i in 5..10 {
        posted(one(&s, post("a", "alice", &format!("m{i}"), "y")));
    }
    let p = s.history(&room("a"), HistoryQuery::Latest { limit: 100 }).unwrap();
    assert_eq!(seqs(&p), (1..=8).collect::<Vec<_>>());
    assert_eq!(p.latest_seq, Seq(8));
    assert_eq!(s.history(&room("nobody-here"), HistoryQuery::Latest { limit: 10 }).unwrap(), Page::default());
}

#[test]
fn resend_with_the_same_id_is_the_same_message() {
    let (_d, s) = store();
    assert_eq!(posted(one(&s, post("r", "alice", "c1", "hello"))), (1, false));
    // Same batch twice, and again later.
    let out: Vec<(u64, bool)> = s.apply(2, &[post("r", "alice", "c1", "hello"), post("r", "alice", "c2", "two"), post("r", "alice", "c2", "two")]).unwrap().into_iter().map(posted).collect();
    assert_eq!(out, vec![(1, true), (2, false), (2, true)]);
    // The id is per identity: bob's c1 is another message.
    assert_eq!(posted(one(&s, post("r", "bob", "c1", "hi"))), (3, false));
    // The original is returned, with its timestamp.
    match one(&s, post("r", "alice", "c1", "changed text")).unwrap() {
        WriteOutcome::Posted { message, duplicate: true, .. } => assert_eq!((message.text.as_str(), message.ts), ("hello", 1_000)),
        o => panic!("{o:?}"),
    }
    assert_eq!(seqs(&s.history(&room("r"), HistoryQuery::Latest { limit: 10 }).unwrap()), vec![1, 2, 3]);
}

#[test]
fn paging_table() {
    let (_d, s) = store();
    let batch: Vec<WriteOp> = (1..=25).map(|i| post("r", "alice", &format!("c{i}"), &format!("message {i}"))).collect();
    s.apply(1, &batch).unwrap();
    let cases: &[(HistoryQuery, std::ops::RangeInclusive<u64>, bool)] = &[
        (HistoryQuery::Latest { limit: 10 }, 16..=25, true),
        (HistoryQuery::Before { seq: Seq(16), limit: 10 }, 6..=15, true),
        (HistoryQuery::Before { seq: Seq(6), limit: 10 }, 1..=5, false),
        (HistoryQuery::After { seq: Seq(20), limit: 10 }, 21..=25, false),
        (HistoryQuery::After { seq: Seq(0), limit: 10 }, 1..=10, true),
        (HistoryQuery::After { seq: Seq(15), limit: 10 }, 16..=25, false),
        (HistoryQuery::Latest { limit: 25 }, 1..=25, false),
    ];
    for (q, want, more) in cases {
        let p = s.history(&room("r"), *q).unwrap();
        assert_eq!(seqs(&p), want.clone().collect::<Vec<_>>(), "{q:?}");
        assert_eq!(p.has_more, *more, "{q:?}");
    }
    assert!(s.history(&room("r"), HistoryQuery::Before { seq: Seq(1), limit: 5 }).unwrap().messages.is_empty());
    assert!(s.history(&room("r"), HistoryQuery::After { seq: Seq(25), limit: 5 }).unwrap().messages.is_empty());
}

#[test]
fn edits_and_their_refusals() {
    let (_d, s) = store();
    posted(one(&s, post("r", "alice", "c1", "Deploy started")));
    let edit = |who: &str, seq: u64, text: &str| WriteOp::Edit { room: room("r"), identity: who.into(), seq: Seq(seq), text: text.into(), mentions: vec![] };
    match s.apply(5_000, &[edit("alice", 1, "Deployment finished")]).unwrap().pop().unwrap().unwrap() {
        WriteOutcome::Edited { message, .. } => {
            assert_eq!((message.text.as_str(), message.edited_ts, message.ts), ("Deployment finished", Some(5_000), 1_000));
        }
        o => panic!("{o:?}"),
    }
    assert!(matches!(one(&s, edit("bob", 1, "hijack")), Err(ChatError::Forbidden(_))));
    assert!(matches!(one(&s, edit("alice", 9, "x")), Err(ChatError::NotFound(_))));
    assert!(matches!(one(&s, WriteOp::Edit { room: room("elsewhere"), identity: "alice".into(), seq: Seq(1), text: "x".into(), mentions: vec![] }), Err(ChatError::NotFound(_))));
    let found = |q: &str| s.search(&room("r"), &SearchQuery::parse(q).unwrap(), 10, 100).unwrap().len();
    assert_eq!((found("finished"), found("started")), (1, 0), "the index follows the edit");
    assert_eq!(s.history(&room("r"), HistoryQuery::Latest { limit: 5 }).unwrap().messages[0].text, "Deployment finished");
}

#[test]
fn delete_table_author_admin_other() {
    let (_d, s) = store();
    for i in 1..=3 {
        posted(one(&s, post("r", "alice", &format!("c{i}"), &format!("secret number {i}"))));
    }
    let del = |who: &str, admin: bool, seq: u64| WriteOp::Delete { room: room("r"), identity: who.into(), admin, seq: Seq(seq) };
    let cases: &[(&str, bool, u64, Result<(), ErrorCode>)] = &[
        ("bob", false, 1, Err(ErrorCode::Forbidden)),
        ("alice", false, 1, Ok(())),
        ("alice", false, 1, Err(ErrorCode::NotFound)),
        ("carol", true, 2, Ok(())),
        ("alice", false, 42, Err(ErrorCode::NotFound)),
    ];
    for (who, admin, seq, want) in cases {
        let got = one(&s, del(who, *admin, *seq)).map(|_| ()).map_err(|e| e.code());
        assert_eq!(&got, want, "{who} admin={admin} deletes {seq}");
    }
    let p = s.history(&room("r"), HistoryQuery::Latest { limit: 5 }).unwrap();
    assert_eq!(seqs(&p), vec![1, 2, 3], "deleted messages keep their seq (no gaps)");
    assert!(p.messages[0].deleted && p.messages[0].text.is_empty() && p.messages[0].deleted_by.as_deref() == Some("alice"));
    assert_eq!(p.messages[1].deleted_by.as_deref(), Some("carol"));
    assert!(!p.messages[2].deleted);
    let hits = s.search(&room("r"), &SearchQuery::parse("secret").unwrap(), 10, 100).unwrap();
    assert_eq!(hits.iter().map(|h| h.message.seq.0).collect::<Vec<_>>(), vec![3], "deleted text is not searchable");
    assert!(s.search(&room("r"), &SearchQuery::parse("1").unwrap(), 10, 100).unwrap().is_empty(), "nor by a short term");
    assert!(matches!(one(&s, WriteOp::React { room: room("r"), identity: "bob".into(), seq: Seq(1), emoji: "👍".into(), on: true }), Err(ChatError::NotFound(_))));
}

#[test]
fn reactions_add_remove_and_limit() {
    let (_d, s) = store();
    posted(one(&s, post("r", "alice", "c1", "hi")));
    let react = |who: &str, emoji: &str, on: bool| WriteOp::React { room: room("r"), identity: who.into(), seq: Seq(1), emoji: emoji.into(), on };
    let changed = |o: Result<WriteOutcome, ChatError>| match o.unwrap() {
        WriteOutcome::Reacted { changed, .. } => changed,
        o => panic!("{o:?}"),
    };
    assert!(changed(one(&s, react("bob", "👍", true))));
    assert!(!changed(one(&s, react("bob", "👍", true))), "twice is once");
    assert!(changed(one(&s, react("carol", "👍", true))));
    assert!(changed(one(&s, react("carol", "🎉", true))));
    assert!(changed(one(&s, react("carol", "🎉", false))));
    assert!(!changed(one(&s, react("carol", "🎉", false))));
    let m = &s.history(&room("r"), HistoryQuery::Latest { limit: 1 }).unwrap().messages[0];
    assert_eq!(m.reactions.len(), 1);
    assert_eq!(m.reactions["👍"], vec!["bob".to_string(), "carol".to_string()]);
    for i in 1..MAX_REACTIONS_PER_MESSAGE {
        assert!(changed(one(&s, react("dave", &format!(":e{i}:"), true))));
    }
    assert!(matches!(one(&s, react("dave", ":one-too-many:", true)), Err(ChatError::BadMessage(_))));
    assert!(!changed(one(&s, react("erin", "👍", false))), "removing what is not there changes nothing");
    assert!(changed(one(&s, react("erin", "👍", true))), "an existing emoji takes more people");
}

#[test]
fn receipts_and_mentions() {
    let (_d, s) = store();
    let out = s.apply(1, &[post("r", "alice", "c1", "@bob look"), post("r", "alice", "c2", "nothing"), post("r", "carol", "c3", "@bob @alice again")]).unwrap();
    match &out[2] {
        Ok(WriteOutcome::Posted { mentioned, .. }) => {
            let bob = mentioned.iter().find(|(w, _)| w == "bob").unwrap();
            assert_eq!(bob.1.unread_mentions, 2, "the writer reports the mentioned person's count");
        }
        o => panic!("{o:?}"),
    }
    let state = |who: &str| s.read_state(&room("r"), who).unwrap();
    assert_eq!(state("bob"), ReadState { last_read: Seq(0), unread_mentions: 2, latest_seq: Seq(3) });
    assert_eq!(state("alice").unread_mentions, 1);
    let read = |who: &str, seq: u64| match one(&s, WriteOp::Read { room: room("r"), identity: who.into(), seq: Seq(seq) }).unwrap() {
        WriteOutcome::Read { state, changed, .. } => (state.last_read.0, state.unread_mentions, changed),
        o => panic!("{o:?}"),
    };
    assert_eq!(read("bob", 2), (2, 1, true));
    assert_eq!(read("bob", 1), (2, 1, false), "a read position never goes back");
    assert_eq!(read("bob", 99), (3, 0, true), "clamped to the latest message");
    assert_eq!(state("carol").unread_mentions, 0, "own mentions are not counted");
    assert!(matches!(one(&s, WriteOp::Read { room: room("empty"), identity: "bob".into(), seq: Seq(1) }), Err(ChatError::NotFound(_))));
    // An edit that removes a mention removes it from the count.
    posted(one(&s, post("r", "alice", "c4", "@dave hi")));
    assert_eq!(state("dave").unread_mentions, 1);
    one(&s, WriteOp::Edit { room: room("r"), identity: "alice".into(), seq: Seq(4), text: "hi all".into(), mentions: vec![] }).unwrap();
    assert_eq!(state("dave").unread_mentions, 0);
}

#[test]
fn search_table_english_and_cjk() {
    let (_d, s) = store();
    let corpus = [
        "Deployment finished",
        "你好世界",
        "世界很大",
        "the deploy is red again",
        "東京で会いましょう",
        "안녕하세요 세계",
        "ok, see you",
        "rust rust rust",
        "I like rust and many other languages that have long names and features",
        "界",
    ];
    let batch: Vec<WriteOp> = corpus.iter().enumerate().map(|(i, t)| post("r", "alice", &format!("c{i}"), t)).collect();
    s.apply(1, &batch).unwrap();
    posted(one(&s, post("other", "alice", "x", "deploy elsewhere 世界")));
    let cases: &[(&str, &[u64])] = &[
        ("deploy", &[1, 4]),
        ("DEPLOY", &[1, 4]),
        ("Deployment finished", &[1]),
        ("世界", &[2, 3]),
        ("界", &[2, 3, 10]),
        ("東京", &[5]),
        ("会いまし", &[5]),
        ("세계", &[6]),
        ("ok", &[7]),
        ("o", &[1, 4, 7, 9]),
        ("deploy red", &[4]),
        ("red 世界", &[]),
        ("zzz", &[]),
        ("nowhere", &[]),
    ];
    for (q, want) in cases {
        let hits = s.search(&room("r"), &SearchQuery::parse(q).unwrap(), 20, 1000).unwrap();
        let mut got: Vec<u64> = hits.iter().map(|h| h.message.seq.0).collect();
        got.sort_unstable();
        assert_eq!(&got, want, "query {q:?}");
        for h in &hits {
            let c: Vec<char> = h.snippet.chars().collect();
            assert!(!h.highlights.is_empty(), "{q:?}: highlighted");
            for &(a, b) in &h.highlights {
                let marked: String = c[a..b].iter().collect::<String>().to_lowercase();
                assert!(SearchQuery::parse(q).unwrap().terms.iter().any(|t| marked.contains(t.as_str())), "{q:?}: {marked:?}");
            }
        }
    }
    let hits = s.search(&room("r"), &SearchQuery::parse("rust").unwrap(), 20, 1000).unwrap();
    assert_eq!(hits[0].message.seq, Seq(8), "bm25: the denser match ranks first");
    assert!(hits[0].score > hits[1].score);
    let hits = s.search(&room("r"), &SearchQuery::parse("世界").unwrap(), 20, 1000).unwrap();
    assert_eq!(hits[0].message.seq, Seq(3), "short queries rank newest first");
    assert_eq!(s.search(&room("r"), &SearchQuery::parse("o").unwrap(), 2, 1000).unwrap().len(), 2, "limit");
    assert!(s.search(&room("missing"), &SearchQuery::parse("deploy").unwrap(), 5, 100).unwrap().is_empty());
}

#[test]
fn changes_since_a_rev_bring_edits_deletes_and_reactions() {
    let (_d, s) = store();
    for i in 1..=4 {
        posted(one(&s, post("r", "alice", &format!("c{i}"), "text")));
    }
    let base = s.history(&room("r"), HistoryQuery::Latest { limit: 10 }).unwrap().rev;
    one(&s, WriteOp::Edit { room: room("r"), identity: "alice".into(), seq: Seq(2), text: "edited".into(), mentions: vec![] }).unwrap();
    one(&s, WriteOp::React { room: room("r"), identity: "bob".into(), seq: Seq(1), emoji: "👍".into(), on: true }).unwrap();
    one(&s, WriteOp::Delete { room: room("r"), identity: "alice".into(), admin: false, seq: Seq(4) }).unwrap();
    posted(one(&s, post("r", "bob", "b1", "new")));
    let p = s.history(&room("r"), HistoryQuery::ChangedSince { rev: base, limit: 10 }).unwrap();
    assert_eq!(seqs(&p), vec![2, 1, 4, 5], "in order of change");
    assert_eq!(p.messages[0].text, "edited");
    assert!(p.messages[2].deleted);
    assert_eq!(p.rev.0, base.0 + 4);
    assert!(s.history(&room("r"), HistoryQuery::ChangedSince { rev: p.rev, limit: 10 }).unwrap().messages.is_empty());
}

#[test]
fn reopening_keeps_everything_and_seq_continues() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = SqliteStore::open(dir.path()).unwrap();
        s.apply(1, &[post("r", "alice", "c1", "one"), post("r", "alice", "c2", "two")]).unwrap();
    }
    let s = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(posted(one(&s, post("r", "alice", "c2", "two"))), (2, true));
    assert_eq!(posted(one(&s, post("r", "alice", "c3", "three"))), (3, false));
    let mode: String = rusqlite::Connection::open(s.path()).unwrap().query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
}

// ---- service ----

#[derive(Default)]
struct Recorder {
    members: Mutex<Vec<Member>>,
    sent: Mutex<Vec<(ParticipantId, Value)>>,
}

impl Recorder {
    fn to(&self, p: ParticipantId) -> Vec<Value> {
        self.sent.lock().unwrap().iter().filter(|(to, _)| *to == p).map(|(_, v)| v.clone()).collect()
    }
}

struct RecTransport(Arc<Recorder>);

impl Transport for RecTransport {
    fn members(&self, _room: &RoomName) -> BoxFuture<'static, Vec<Member>> {
        let m = self.0.members.lock().unwrap().clone();
        Box::pin(async move { m })
    }
    fn send(&self, to: Vec<ParticipantId>, text: Bytes) -> BoxFuture<'static, Vec<(ParticipantId, DeliveryFailure)>> {
        let v: Value = serde_json::from_slice(&text).unwrap();
        let mut sent = self.0.sent.lock().unwrap();
        for p in to {
            sent.push((p, v.clone()));
        }
        Box::pin(async { vec![] })
    }
}

fn actor(who: &str, participant: u64, chat: bool, admin: bool) -> Actor {
    Actor { room: room("r"), identity: who.into(), name: who.to_uppercase(), chat, admin, participant: Some(ParticipantId(participant)) }
}

fn service(cfg: ChatConfig) -> (tempfile::TempDir, Arc<ChatService>, Arc<Recorder>, prometheus::Registry) {
    let dir = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder::default());
    *rec.members.lock().unwrap() = vec![
        Member { participant: ParticipantId(1), identity: "alice".into() },
        Member { participant: ParticipantId(2), identity: "bob".into() },
        Member { participant: ParticipantId(3), identity: "bob".into() },
    ];
    let registry = prometheus::Registry::new();
    let svc = ChatService::open_sqlite(cfg, dir.path(), Arc::new(RecTransport(rec.clone())), &registry).unwrap();
    (dir, svc, rec, registry)
}

async fn until(mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "condition not reached in 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn post_is_acked_when_durable_and_reaches_the_others() {
    let (_d, svc, rec, _) = service(ChatConfig::default());
    let alice = actor("alice", 1, true, false);
    let o = svc.post(&alice, "c1", "hello @bob", None).unwrap().await.unwrap();
    let WriteOutcome::Posted { message, duplicate: false, .. } = o else { panic!("{o:?}") };
    assert_eq!(message.seq, Seq(1));
    // Durable: visible to a reader right after the ack.
    assert_eq!(seqs(&svc.history(&room("r"), HistoryQuery::Latest { limit: 5 }).await.unwrap()), vec![1]);
    until(|| rec.to(ParticipantId(3)).len() >= 2).await;
    for bob in [ParticipantId(2), ParticipantId(3)] {
        let got = rec.to(bob);
        assert_eq!(got[0]["type"], "chat");
        assert_eq!((got[0]["seq"].as_u64(), got[0]["from"].as_str(), got[0]["mentions"][0].as_str()), (Some(1), Some("alice"), Some("bob")));
        assert_eq!((got[1]["type"].as_str(), got[1]["unread_mentions"].as_u64()), (Some("read_state"), Some(1)), "both of bob's devices are told");
    }
    assert!(rec.to(ParticipantId(1)).is_empty(), "the sender gets its ack, not its own message back");
    // The resend is acked with the same seq and not delivered again.
    let o = svc.post(&alice, "c1", "hello @bob", None).unwrap().await.unwrap();
    assert!(matches!(o, WriteOutcome::Posted { duplicate: true, ref message, .. } if message.seq == Seq(1)));
}

#[tokio::test]
async fn refusal_table() {
    let cfg = ChatConfig { max_text_bytes: 16, ..ChatConfig::default() };
    let (_d, svc, _rec, registry) = service(cfg);
    let alice = actor("alice", 1, true, false);
    let viewer = actor("vic", 9, false, false);
    svc.post(&alice, "first", "hi", None).unwrap().await.unwrap();
    let cases: Vec<(&str, Result<super::service::Pending, ChatError>, ErrorCode)> = vec![
        ("no chat grant", svc.post(&viewer, "c", "hi", None), ErrorCode::Forbidden),
        ("too long", svc.post(&alice, "c", &"x".repeat(17), None), ErrorCode::TooLong),
        ("empty", svc.post(&alice, "c", "  \n ", None), ErrorCode::BadMessage),
        ("control chars", svc.post(&alice, "c", "a\u{7}b", None), ErrorCode::BadMessage),
        ("empty id", svc.post(&alice, "", "hi", None), ErrorCode::BadMessage),
        ("long id", svc.post(&alice, &"i".repeat(65), "hi", None), ErrorCode::BadMessage),
        ("reply to 0", svc.post(&alice, "c", "hi", Some(0)), ErrorCode::NotFound),
        ("bad emoji", svc.react(&alice, 1, "two words", true), ErrorCode::BadMessage),
        ("viewer reacts", svc.react(&viewer, 1, "👍", true), ErrorCode::Forbidden),
        ("edit too long", svc.edit(&alice, 1, &"y".repeat(17)), ErrorCode::TooLong),
    ];
    for (what, r, code) in cases {
        assert_eq!(r.err().map(|e| e.code()), Some(code), "{what}");
    }
    let durable: Vec<(&str, Result<super::service::Pending, ChatError>, ErrorCode)> = vec![
        ("reply to the future", svc.post(&alice, "c", "hi", Some(7)), ErrorCode::NotFound),
        ("edit unknown", svc.edit(&alice, 5, "x"), ErrorCode::NotFound),
        ("bob edits alice", svc.edit(&actor("bob", 2, true, false), 1, "x"), ErrorCode::Forbidden),
        ("bob deletes alice", svc.delete(&actor("bob", 2, true, false), 1), ErrorCode::Forbidden),
    ];
    for (what, r, code) in durable {
        assert_eq!(r.unwrap().await.err().map(|e| e.code()), Some(code), "{what}");
    }
    assert!(svc.read(&viewer, 1).unwrap().await.is_ok(), "reading needs no chat grant");
    for (b, a, l) in [(Some(1), Some(2), None), (None, None, Some(0)), (None, None, Some(10_000))] {
        assert_eq!(svc.history_query(b, a, l).err().map(|e| e.code()), Some(ErrorCode::BadMessage), "{b:?} {a:?} {l:?}");
    }
    for (q, l) in [("", None), ("x", Some(0)), ("x", Some(51))] {
        assert_eq!(svc.search(&room("r"), q, l).await.err().map(|e| e.code()), Some(ErrorCode::BadMessage), "{q:?}");
    }
    assert_eq!(svc.typing(&viewer, true).await.err().map(|e| e.code()), Some(ErrorCode::Forbidden));
    // REST rate limit: burst then refusal.
    let burst = svc.config().burst;
    let refused = (0..burst + 5).filter(|_| svc.check_rest_rate(&room("r"), "alice").is_err()).count();
    assert!(refused >= 5, "{refused}");
    assert!(svc.check_rest_rate(&room("r"), "bob").is_ok(), "per identity");
    let _ = registry;
}

#[tokio::test]
async fn a_second_device_converges_by_after_and_sync() {
    let (_d, svc, _rec, _) = service(ChatConfig::default());
    let alice = actor("alice", 1, true, false);
    for i in 1..=5 {
        svc.post(&alice, &format!("c{i}"), &format!("m{i}"), None).unwrap().await.unwrap();
    }
    // The second device has everything up to here (seq 5, rev 5), then goes offline.
    let seen = svc.history(&room("r"), HistoryQuery::Latest { limit: 50 }).await.unwrap();
    let device2_last = seen.latest_seq;
    let phone = actor("alice", 4, true, false);
    svc.edit(&alice, 2, "m2 edited").unwrap().await.unwrap();
    svc.react(&actor("bob", 2, true, false), 3, "👍", true).unwrap().await.unwrap();
    svc.post(&phone, "p1", "from the phone", None).unwrap().await.unwrap();
    // Device 2 catches up: new messages after its last seq, changes after its last rev.
    let after = svc.history(&room("r"), HistoryQuery::After { seq: device2_last, limit: 50 }).await.unwrap();
    assert_eq!(seqs(&after), vec![6]);
    let changed = svc.history(&room("r"), svc.sync_query(seen.rev.0, None).unwrap()).await.unwrap();
    assert_eq!(seqs(&changed), vec![2, 3, 6]);
    // Applying them to its stale copy gives exactly the first device's view.
    let mut copy: std::collections::BTreeMap<u64, Message> = seen.messages.into_iter().map(|m| (m.seq.0, m)).collect();
    for m in after.messages.into_iter().chain(changed.messages) {
        copy.insert(m.seq.0, m);
    }
    let truth = svc.history(&room("r"), HistoryQuery::Latest { limit: 50 }).await.unwrap().messages;
    assert_eq!(copy.into_values().collect::<Vec<_>>(), truth);
}

#[tokio::test]
async fn concurrent_posts_share_commits_and_stay_gapless() {
    let (_d, svc, _rec, registry) = service(ChatConfig::default());
    let mut pending = Vec::new();
    for w in 0..20 {
        let a = actor(&format!("w{w}"), 100 + w, true, false);
        for i in 0..25 {
            pending.push((w, i, svc.post(&a, &format!("{i}"), &format!("writer {w} message {i}"), None).unwrap()));
        }
    }
    let mut acked = Vec::new();
    for (w, i, p) in pending {
        match p.await.unwrap() {
            WriteOutcome::Posted { message, .. } => acked.push((message.seq.0, w, i)),
            o => panic!("{o:?}"),
        }
    }
    acked.sort_unstable();
    assert_eq!(acked.iter().map(|a| a.0).collect::<Vec<_>>(), (1..=500).collect::<Vec<_>>());
    // Each writer's messages got increasing seqs in its own order.
    for w in 0..20 {
        let mine: Vec<u64> = acked.iter().filter(|a| a.1 == w).map(|a| a.2).collect();
        assert_eq!(mine, (0..25).collect::<Vec<_>>());
    }
    let batches = registry.gather().into_iter().find(|f| f.name() == "warbler_chat_batch_size").unwrap().get_metric()[0].get_histogram().get_sample_count();
    assert!(batches < 500, "group commit batched writes ({batches} commits for 500 writes)");
}

#[test]
fn delivery_table() {
    let members = vec![
        Member { participant: ParticipantId(1), identity: "alice".into() },
        Member { participant: ParticipantId(2), identity: "bob".into() },
        Member { participant: ParticipantId(3), identity: "bob".into() },
    ];
    let msg = Message {
        seq: Seq(1),
        rev: Rev(1),
        id: "c".into(),
        from: "alice".into(),
        name: "A".into(),
        text: "t".into(),
        ts: 0,
        reply_to: None,
        mentions: vec![],
        edited_ts: None,
        deleted: false,
        deleted_by: None,
        reactions: Default::default(),
    };
    let rs = ReadState { last_read: Seq(1), unread_mentions: 0, latest_seq: Seq(1) };
    let c = |outcome: WriteOutcome| Committed { op: post("r", "alice", "c", "t"), outcome, origin: Some(ParticipantId(1)) };
    let p = |ids: &[u64]| ids.iter().map(|&i| ParticipantId(i)).collect::<Vec<_>>();
    type Expected = Vec<(Vec<ParticipantId>, &'static str)>;
    let cases: Vec<(WriteOutcome, Expected)> = vec![
        (WriteOutcome::Posted { message: msg.clone(), duplicate: false, mentioned: vec![] }, vec![(p(&[2, 3]), "chat")]),
        (WriteOutcome::Posted { message: msg.clone(), duplicate: true, mentioned: vec![] }, vec![]),
        (WriteOutcome::Posted { message: msg.clone(), duplicate: false, mentioned: vec![("bob".into(), rs)] }, vec![(p(&[2, 3]), "chat"), (p(&[2, 3]), "read_state")]),
        (WriteOutcome::Edited { message: msg.clone(), mentioned: vec![] }, vec![(p(&[1, 2, 3]), "edit")]),
        (WriteOutcome::Deleted { seq: Seq(1), rev: Rev(2), by: "alice".into() }, vec![(p(&[1, 2, 3]), "delete")]),
        (WriteOutcome::Reacted { seq: Seq(1), rev: Rev(2), emoji: "x".into(), identity: "bob".into(), on: true, changed: true }, vec![(p(&[1, 2, 3]), "reaction")]),
        (WriteOutcome::Reacted { seq: Seq(1), rev: Rev(2), emoji: "x".into(), identity: "bob".into(), on: true, changed: false }, vec![]),
        (WriteOutcome::Read { identity: "bob".into(), state: rs, changed: true }, vec![(p(&[1]), "receipt"), (p(&[2, 3]), "read_state")]),
        (WriteOutcome::Read { identity: "bob".into(), state: rs, changed: false }, vec![]),
    ];
    for (outcome, want) in cases {
        let got: Vec<(Vec<ParticipantId>, &str)> = deliveries(&c(outcome.clone()), &members).into_iter().map(|(to, v, kind)| {
            assert_eq!(v["type"], kind);
            (to, kind)
        }).collect();
        assert_eq!(got, want, "{outcome:?}");
    }
}

#[test]
fn search_index_catches_up_after_restart_and_is_rebuilt_when_lost() {
    let dir = tempfile::tempdir().unwrap();
    let q = |s: &SqliteStore, text: &str| {
        let mut v: Vec<u64> = s.search(&room("r"), &SearchQuery::parse(text).unwrap(), 50, 1000).unwrap().iter().map(|h| h.message.seq.0).collect();
        v.sort_unstable();
        v
    };
    {
        let s = SqliteStore::open(dir.path()).unwrap();
        let batch: Vec<WriteOp> = (1..=40).map(|i| post("r", "alice", &format!("c{i}"), &format!("needle {i} 世界"))).collect();
        s.apply(1, &batch).unwrap();
        s.apply(2, &[WriteOp::Edit { room: room("r"), identity: "alice".into(), seq: Seq(2), text: "changed".into(), mentions: vec![] }]).unwrap();
        s.apply(3, &[WriteOp::Delete { room: room("r"), identity: "alice".into(), admin: false, seq: Seq(3) }]).unwrap();
        // Dropped at once: the indexer may not have indexed any of it.
    }
    let want: Vec<u64> = (1..=40).filter(|s| *s != 2 && *s != 3).collect();
    {
        let s = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(q(&s, "needle"), want, "the index caught up after the restart");
        assert_eq!(q(&s, "世界"), want);
        assert_eq!(q(&s, "changed"), vec![2]);
    }
    for f in [sqlite::INDEX_FILE, "chat-index.sqlite3-wal", "chat-index.sqlite3-shm"] {
        let _ = std::fs::remove_file(dir.path().join(f));
    }
    let s = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(q(&s, "needle"), want, "a lost index is rebuilt from the messages");
    assert_eq!(q(&s, "changed"), vec![2]);
    assert!(s.wait_for_index(Duration::from_secs(5)));
}

#[test]
fn a_version_1_database_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    {
        let c = rusqlite::Connection::open(dir.path().join(sqlite::DB_FILE)).unwrap();
        c.execute_batch(
            "CREATE TABLE rooms (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, last_seq INTEGER NOT NULL DEFAULT 0, rev INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE messages (id INTEGER PRIMARY KEY, room_id INTEGER NOT NULL, seq INTEGER NOT NULL, rev INTEGER NOT NULL, client_id TEXT NOT NULL,
                 author TEXT NOT NULL, name TEXT NOT NULL, text TEXT NOT NULL, ts INTEGER NOT NULL, reply_to INTEGER, mentions TEXT, edited_ts INTEGER,
                 deleted_by TEXT, UNIQUE (room_id, seq), UNIQUE (room_id, author, client_id));
             CREATE VIRTUAL TABLE messages_fts USING fts5(text, content='messages', content_rowid='id', tokenize='trigram');
             INSERT INTO rooms VALUES (1, 'r', 1, 1);
             INSERT INTO messages (room_id, seq, rev, client_id, author, name, text, ts) VALUES (1, 1, 1, 'c1', 'alice', 'A', 'old deployment', 5);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let s = SqliteStore::open(dir.path()).unwrap();
    let hits = s.search(&room("r"), &SearchQuery::parse("deploy").unwrap(), 5, 100).unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(posted(one(&s, post("r", "alice", "c2", "new deployment"))), (2, false));
    assert_eq!(s.search(&room("r"), &SearchQuery::parse("deploy").unwrap(), 5, 100).unwrap().len(), 2);
}
