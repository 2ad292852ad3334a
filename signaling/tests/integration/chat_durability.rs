//! Durability of acknowledged chat: a client sends a burst of messages with many in flight, the
//! `warbler` process is killed with SIGKILL mid-burst and restarted on the same data directory,
//! the client reconnects and resends everything that was not acknowledged (and some that were).
//! Every acknowledged message must be there exactly once with its acknowledged seq, every resend
//! must be stored once, and the room's seqs must be gapless.

use crate::chat_support;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chat_support::{ChatClient, T};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_warbler");
const N: usize = 2000;
/// Kill once this many acks arrived (the rest are in flight or not sent yet).
const KILL_AFTER_ACKS: usize = 300;
const ROOM: &str = "durable";

struct Serve {
    child: Child,
    base: String,
    ws_url: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(data: &Path) -> Serve {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--rtc-port", "0", "--public-ip", "127.0.0.1", "--data-dir"])
        .arg(data)
        .env("WARBLER_CHAT__MESSAGES_PER_SECOND", "1000000")
        .env("WARBLER_CHAT__BURST", "1000000")
        .env("WARBLER_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("warbler starts");
    crate::common::forward_log(&mut child);
    let base = format!("http://127.0.0.1:{port}");
    crate::common::wait_healthy(&base, &mut child, Duration::from_secs(30)).await;
    Serve { child, ws_url: format!("ws://127.0.0.1:{port}/ws"), base }
}

async fn token(base: &str) -> String {
    let v: Value = reqwest::get(format!("{base}/dev/token?room={ROOM}&identity=writer")).await.unwrap().json().await.unwrap();
    v["token"].as_str().unwrap().to_owned()
}

fn index(id: &str) -> usize {
    id.strip_prefix('m').and_then(|i| i.parse().ok()).unwrap_or_else(|| panic!("unexpected id {id}"))
}

fn text(i: usize) -> String {
    format!("burst message {i} 消息")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_messages_survive_sigkill_and_resends_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = serve(dir.path()).await;
    let mut client = ChatClient::connect(&srv.ws_url, &token(&srv.base).await).await;
    client.wait_type("history").await;

    // Send everything as fast as the channel takes it, while acks come back.
    let dc = client.dc.dc.clone();
    let sent = Arc::new(AtomicUsize::new(0));
    let sent2 = sent.clone();
    let sender = tokio::spawn(async move {
        for i in 0..N {
            let m = json!({"type":"chat","id":format!("m{i}"),"text":text(i)}).to_string();
            if dc.send_text(&m).await.is_err() {
                break;
            }
            sent2.fetch_add(1, Ordering::SeqCst);
        }
    });
    let mut acked: BTreeMap<usize, u64> = BTreeMap::new();
    while acked.len() < KILL_AFTER_ACKS {
        let v = client.wait_for(T, |m| m["type"] == "ack" || m["type"] == "error").await.expect("acks keep coming");
        assert_eq!(v["type"], "ack", "{v}");
        acked.insert(index(v["id"].as_str().unwrap()), v["seq"].as_u64().unwrap());
    }
    srv.child.kill().expect("SIGKILL");
    srv.child.wait().unwrap();
    let sent_at_kill = sent.load(Ordering::SeqCst);
    let acked_at_kill = acked.len();
    // Acks already on their way count as acknowledgements too.
    while let Some(v) = client.wait_for(Duration::from_millis(500), |m| m["type"] == "ack").await {
        acked.insert(index(v["id"].as_str().unwrap()), v["seq"].as_u64().unwrap());
    }
    sender.abort();
    assert!(sent_at_kill > acked_at_kill, "killed with messages in flight ({sent_at_kill} sent, {acked_at_kill} acked)");
    eprintln!("killed after {acked_at_kill} acks with {sent_at_kill} sent; {} acks were on their way", acked.len() - acked_at_kill);
    // Acks arrived in send order with increasing seqs.
    let pre: Vec<(usize, u64)> = acked.iter().map(|(i, s)| (*i, *s)).collect();
    assert!(pre.windows(2).all(|w| w[1].1 > w[0].1), "acked seqs increase with send order");
    client.peer.vanish();
    drop(client);

    // Restart on the same data directory and resend what was not acknowledged, plus a sample of
    // acknowledged messages (a client that lost the ack).
    let srv = serve(dir.path()).await;
    let mut client = ChatClient::connect(&srv.ws_url, &token(&srv.base).await).await;
    let hello = client.wait_type("hello").await;
    let stored_before_resend = hello["latest_seq"].as_u64().unwrap();
    assert!(stored_before_resend >= acked.len() as u64, "every ack is on disk: {stored_before_resend} < {}", acked.len());
    let resend: Vec<usize> = (0..N).filter(|i| !acked.contains_key(i) || i % 10 == 0).collect();
    for &i in &resend {
        client.send(json!({"type":"chat","id":format!("m{i}"),"text":text(i)})).await;
    }
    let mut after: HashMap<usize, (u64, bool)> = HashMap::new();
    while after.len() < resend.len() {
        let v = client.wait_for(T, |m| m["type"] == "ack" || m["type"] == "error").await.expect("every resend is acked");
        assert_eq!(v["type"], "ack", "{v}");
        after.insert(index(v["id"].as_str().unwrap()), (v["seq"].as_u64().unwrap(), v["duplicate"] == true));
    }
    for (i, seq) in &acked {
        if let Some((s, dup)) = after.get(i) {
            assert_eq!((s, *dup), (seq, true), "m{i}: a resend of an acknowledged message is the same message");
        }
    }

    // The stored room: every message exactly once, seqs 1..=N, acknowledged seqs unchanged.
    let http = reqwest::Client::new();
    let tok = token(&srv.base).await;
    let mut stored: Vec<Value> = Vec::new();
    loop {
        let last = stored.last().map_or(0, |m| m["seq"].as_u64().unwrap());
        let page: Value = http.get(format!("{}/api/rooms/{ROOM}/messages?after={last}&limit=200", srv.base)).bearer_auth(&tok).send().await.unwrap().json().await.unwrap();
        stored.extend(page["messages"].as_array().unwrap().iter().cloned());
        if page["has_more"] != true {
            break;
        }
    }
    assert_eq!(stored.len(), N, "every message stored once");
    let seqs: Vec<u64> = stored.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=N as u64).collect::<Vec<_>>(), "gapless");
    let mut by_id: HashMap<usize, u64> = HashMap::new();
    for m in &stored {
        let i = index(m["id"].as_str().unwrap());
        assert_eq!(m["text"].as_str().unwrap(), text(i));
        assert!(by_id.insert(i, m["seq"].as_u64().unwrap()).is_none(), "m{i} stored twice");
    }
    for (i, seq) in &acked {
        assert_eq!(by_id.get(i), Some(seq), "acknowledged m{i} kept its seq");
    }
    for (i, (seq, _)) in &after {
        assert_eq!(by_id.get(i), Some(seq), "resent m{i} is stored under its acked seq");
    }
    eprintln!("{} acked before the kill, {} on disk at restart, {} resent", acked.len(), stored_before_resend, resend.len());
}
