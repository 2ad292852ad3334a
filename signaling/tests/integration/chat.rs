//! Chat through the real server with native WebRTC clients on their `chat` data channels (over
//! the WebSocket protocol and over WHIP), and the REST API: what users observe — acks, messages
//! of others, history after a reconnect, edits, deletes, reactions, typing, receipts, mentions,
//! search, and every refusal.

use crate::chat_support;
use crate::common;

use chat_support::{ChatClient, T};
use common::TestServer;
use serde_json::{Value, json};

fn seqs(v: &Value) -> Vec<u64> {
    v["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_participants_chat_and_a_reconnecting_one_gets_history() {
    let mut srv = TestServer::start().await;
    let mut alice = ChatClient::connect(&srv.ws_url, &srv.token("lounge", "alice", "chat")).await;
    let hello = alice.wait_type("hello").await;
    assert_eq!((hello["identity"].as_str(), hello["latest_seq"].as_u64(), hello["can_chat"].as_bool()), (Some("alice"), Some(0), Some(true)));
    assert_eq!(alice.wait_type("history").await["messages"], json!([]));
    let mut bob = ChatClient::connect(&srv.ws_url, &srv.token("lounge", "bob", "chat")).await;
    bob.wait_type("history").await;

    // alice → bob
    let ack = alice.chat("a1", "hello bob").await;
    assert_eq!((ack["type"].as_str(), ack["seq"].as_u64()), (Some("ack"), Some(1)), "{ack}");
    assert!(ack["ts"].as_i64().unwrap() > 1_700_000_000_000);
    let got = bob.wait_type("chat").await;
    assert_eq!((got["seq"].as_u64(), got["from"].as_str(), got["name"].as_str(), got["text"].as_str(), got["id"].as_str()), (Some(1), Some("alice"), Some("alice"), Some("hello bob"), Some("a1")));
    assert_eq!(got["ts"], ack["ts"]);

    // bob replies, mentioning alice; alice sees the reply and her unread mention count.
    bob.send(json!({"type":"chat","id":"b1","text":"hi @alice!","reply_to":1})).await;
    assert_eq!(bob.wait_type("ack").await["seq"], 2);
    let reply = alice.wait_type("chat").await;
    assert_eq!((reply["reply_to"].as_u64(), reply["mentions"].clone()), (Some(1), json!(["alice"])));
    assert_eq!(alice.wait_type("read_state").await["unread_mentions"], 1);

    // Typing is relayed, not stored.
    alice.send(json!({"type":"typing"})).await;
    let typing = bob.wait_type("typing").await;
    assert_eq!((typing["from"].as_str(), typing["on"].as_bool()), (Some("alice"), Some(true)));

    // Reaction, edit, delete reach everyone.
    assert_eq!(bob.request(json!({"type":"react","seq":1,"emoji":"👍"}), 10).await["type"], "ok");
    let r = alice.wait_type("reaction").await;
    assert_eq!((r["seq"].as_u64(), r["emoji"].as_str(), r["from"].as_str(), r["on"].as_bool()), (Some(1), Some("👍"), Some("bob"), Some(true)));
    assert_eq!(alice.request(json!({"type":"edit","seq":1,"text":"hello bob (edited)"}), 11).await["type"], "ok");
    let e = bob.wait_type("edit").await;
    assert_eq!((e["seq"].as_u64(), e["text"].as_str()), (Some(1), Some("hello bob (edited)")));
    assert!(e["edited_ts"].as_i64().is_some());
    let refused = bob.request(json!({"type":"edit","seq":1,"text":"not mine"}), 12).await;
    assert_eq!((refused["type"].as_str(), refused["code"].as_str()), (Some("error"), Some("forbidden")));
    let refused = bob.request(json!({"type":"delete","seq":1}), 13).await;
    assert_eq!(refused["code"], "forbidden", "only the author or an admin deletes");
    bob.send(json!({"type":"chat","id":"b2","text":"to be deleted 世界"})).await;
    assert_eq!(bob.wait_type("ack").await["seq"], 3);
    assert_eq!(bob.request(json!({"type":"delete","seq":3}), 14).await["type"], "ok");
    let d = alice.wait_type("delete").await;
    assert_eq!((d["seq"].as_u64(), d["by"].as_str()), (Some(3), Some("bob")));

    // alice reads up to 2: bob (and alice's other devices) hear of it.
    assert_eq!(alice.request(json!({"type":"read","seq":2}), 15).await["type"], "ok");
    let receipt = bob.wait_type("receipt").await;
    assert_eq!((receipt["from"].as_str(), receipt["seq"].as_u64()), (Some("alice"), Some(2)));

    for i in 4..=8 {
        assert_eq!(alice.chat(&format!("a{i}"), &format!("你好世界 number {i}")).await["seq"], i);
    }

    // bob leaves and comes back: the greeting brings the history, in order, with the changes.
    bob.close().await;
    let mut bob = ChatClient::connect(&srv.ws_url, &srv.token("lounge", "bob", "chat")).await;
    let hello = bob.wait_type("hello").await;
    assert_eq!(hello["latest_seq"], 8);
    let history = bob.wait_type("history").await;
    assert_eq!(seqs(&history), (1..=8).collect::<Vec<_>>());
    let m = &history["messages"];
    assert_eq!((m[0]["text"].as_str(), m[0]["reactions"]["👍"].clone()), (Some("hello bob (edited)"), json!(["bob"])));
    assert_eq!((m[2]["deleted"].as_bool(), m[2]["text"].as_str()), (Some(true), Some("")));
    // Paging back, catching up, syncing changes, searching.
    let page = bob.request(json!({"type":"history","before":5,"limit":2}), 20).await;
    assert_eq!((seqs(&page), page["has_more"].as_bool()), (vec![3, 4], Some(true)));
    let page = bob.request(json!({"type":"history","after":6}), 21).await;
    assert_eq!((seqs(&page), page["has_more"].as_bool()), (vec![7, 8], Some(false)));
    let sync = bob.request(json!({"type":"sync","rev":0,"limit":3}), 22).await;
    assert_eq!(sync["messages"].as_array().unwrap().len(), 3);
    let found = bob.request(json!({"type":"search","q":"世界","limit":10}), 23).await;
    assert_eq!(found["type"], "search_results");
    let hits: Vec<u64> = found["results"].as_array().unwrap().iter().map(|h| h["message"]["seq"].as_u64().unwrap()).collect();
    assert_eq!(hits, vec![8, 7, 6, 5, 4], "the deleted message is not found; newest first");
    assert_eq!((found["results"][0]["snippet"].as_str(), found["results"][0]["highlights"].clone()), (Some("你好世界 number 8"), json!([[2, 4]])));
    let found = bob.request(json!({"type":"search","q":"EDITED"}), 24).await;
    assert_eq!(found["results"][0]["snippet"], "hello bob (edited)");
    assert_eq!(found["results"][0]["highlights"], json!([[11, 17]]));

    assert!(srv.metric("warbler_chat_messages_in_total", Some("type=\"chat\"")).await >= 8.0);
    assert!(srv.metric("warbler_chat_messages_out_total", Some("type=\"chat\"")).await >= 1.0);
    assert!(srv.metric("warbler_chat_refusals_total", Some("code=\"forbidden\"")).await >= 2.0);
    assert!(srv.metric("warbler_chat_store_seconds_count", None).await >= 1.0);
    assert!(srv.metric("warbler_chat_search_seconds_count", None).await >= 2.0);

    // alice leaves while typing: bob is told she stopped, not left to wait for the expiry.
    alice.send(json!({"type":"typing","on":true})).await;
    let typing = bob.wait_type("typing").await;
    assert_eq!((typing["from"].as_str(), typing["on"].as_bool()), (Some("alice"), Some(true)));
    alice.close().await;
    let stopped = bob.wait_for(T, |m| m["type"] == "typing" && m["from"] == "alice").await.expect("typing off when alice leaves");
    assert_eq!(stopped["on"], false);
    bob.close().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusals_on_the_data_channel_are_answered_not_dropped() {
    let mut srv = TestServer::start_with(|c| {
        c.chat.max_text_bytes = 64;
        c.chat.messages_per_second = 1;
        c.chat.burst = 5;
        c.limits.max_data_message_bytes = 1024;
    })
    .await;
    let mut alice = ChatClient::connect(&srv.ws_url, &srv.token("strict", "alice", "chat")).await;
    alice.wait_type("history").await;

    let e = alice.chat("big", &"x".repeat(65)).await;
    assert_eq!((e["type"].as_str(), e["code"].as_str(), e["id"].as_str()), (Some("error"), Some("too_long"), Some("big")), "{e}");
    // Over the data channel message limit (here 1 KiB): the engine refuses it unread, and the
    // client still hears why.
    alice.send_raw(&json!({"type":"chat","id":"huge","text":"y".repeat(2000)}).to_string()).await;
    let e = alice.wait_type("error").await;
    assert_eq!(e["code"], "too_long", "{e}");
    assert!(srv.metric("warbler_data_messages_dropped_total", None).await >= 1.0);
    alice.send_raw("this is not json").await;
    assert_eq!(alice.wait_type("error").await["code"], "bad_message");
    alice.send(json!({"type":"chat","text":"no id","req":"r1"})).await;
    let e = alice.wait_type("error").await;
    assert_eq!((e["code"].as_str(), e["req"].as_str()), (Some("bad_message"), Some("r1")));

    // A burst over the limit: every message gets an ack or a rate_limited error, none is lost.
    for i in 0..12 {
        alice.send(json!({"type":"chat","id":format!("r{i}"),"text":"flood"})).await;
    }
    let mut acks = 0;
    let mut limited = 0;
    for i in 0..12 {
        let id = format!("r{i}");
        let v = alice.wait_for(T, |m| m["id"] == id.as_str()).await.expect("every message is answered");
        match v["type"].as_str() {
            Some("ack") => acks += 1,
            Some("error") if v["code"] == "rate_limited" => {
                // Says when to come back: within the limiter's refill time (1/s: 1000 ms).
                let wait = v["retry_after_ms"].as_u64().unwrap_or_else(|| panic!("retry_after_ms: {v}"));
                assert!((1..=1000).contains(&wait), "{v}");
                limited += 1
            }
            _ => panic!("{v}"),
        }
    }
    assert_eq!(acks + limited, 12);
    assert!(limited >= 6, "burst 5 allows at most ~6 of 12: {acks} acks, {limited} refused");
    assert!(srv.metric("warbler_chat_refusals_total", Some("code=\"rate_limited\"")).await >= limited as f64);

    // Without the chat grant: reading works, posting is forbidden.
    let mut viewer = ChatClient::connect(&srv.ws_url, &srv.token("strict", "viewer", "subscribe")).await;
    let hello = viewer.wait_type("hello").await;
    assert_eq!(hello["can_chat"], false);
    assert!(!viewer.wait_type("history").await["messages"].as_array().unwrap().is_empty(), "history is readable");
    let e = viewer.chat("v1", "let me talk").await;
    assert_eq!((e["code"].as_str(), e["id"].as_str()), (Some("forbidden"), Some("v1")));
    alice.close().await;
    viewer.close().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whip_session_chats_with_websocket_participants() {
    let mut srv = TestServer::start().await;
    let mut ws = ChatClient::connect(&srv.ws_url, &srv.token("mixed", "wanda", "chat")).await;
    ws.wait_type("history").await;
    let mut whip = ChatClient::whip(&srv.base, "mixed", &srv.token("mixed", "obs", "publish,chat")).await;
    assert_eq!(whip.wait_type("hello").await["identity"], "obs");
    assert_eq!(whip.chat("w1", "live from WHIP").await["seq"], 1);
    let got = ws.wait_type("chat").await;
    assert_eq!((got["from"].as_str(), got["text"].as_str()), (Some("obs"), Some("live from WHIP")));
    assert_eq!(ws.chat("c1", "welcome").await["seq"], 2);
    assert_eq!(whip.wait_type("chat").await["text"], "welcome");
    ws.close().await;
    whip.peer.close().await;
    srv.stop().await;
}

struct Rest {
    http: reqwest::Client,
    base: String,
}

impl Rest {
    async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<(&str, String)>) -> (u16, Value) {
        let mut r = self.http.request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some((ct, b)) = body {
            r = r.header("Content-Type", ct).body(b);
        }
        let res = r.send().await.unwrap();
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn post(&self, token: &str, body: Value) -> (u16, Value) {
        self.call("POST", "/api/rooms/ops/messages", Some(token), Some(("application/json", body.to_string()))).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_api_posts_pages_searches_and_refuses_clearly() {
    let mut srv = TestServer::start_with(|c| {
        c.chat.max_text_bytes = 100;
        c.chat.burst = 40;
    })
    .await;
    let rest = Rest { http: reqwest::Client::new(), base: srv.base.clone() };
    let bot = srv.token("ops", "deploybot", "chat");
    let reader = srv.token("ops", "auditor", "subscribe");
    // A data channel participant sees what the bot posts.
    let mut carol = ChatClient::connect(&srv.ws_url, &srv.token("ops", "carol", "chat")).await;
    carol.wait_type("history").await;

    let (s, v) = rest.post(&bot, json!({"id":"d1","text":"Deployment finished"})).await;
    assert_eq!((s, v["seq"].as_u64(), v["duplicate"].as_bool()), (201, Some(1), Some(false)), "{v}");
    let (s, v) = rest.post(&bot, json!({"id":"d1","text":"Deployment finished"})).await;
    assert_eq!((s, v["seq"].as_u64(), v["duplicate"].as_bool()), (200, Some(1), Some(true)), "a resend is the same message");
    assert_eq!(carol.wait_type("chat").await["text"], "Deployment finished");
    for i in 2..=12 {
        let (s, _) = rest.post(&bot, json!({"id":format!("d{i}"),"text":format!("你好世界 {i}"),"reply_to":1})).await;
        assert_eq!(s, 201);
    }

    let (s, v) = rest.call("GET", "/api/rooms/ops/messages?limit=5", Some(&reader), None).await;
    assert_eq!((s, seqs(&v), v["has_more"].as_bool(), v["latest_seq"].as_u64()), (200, (8..=12).collect(), Some(true), Some(12)));
    let (_, v) = rest.call("GET", "/api/rooms/ops/messages?before=8&limit=5", Some(&reader), None).await;
    assert_eq!(seqs(&v), (3..=7).collect::<Vec<_>>());
    let (_, v) = rest.call("GET", "/api/rooms/ops/messages?after=10", Some(&reader), None).await;
    assert_eq!((seqs(&v), v["has_more"].as_bool()), (vec![11, 12], Some(false)));
    let (s, v) = rest.call("GET", "/api/rooms/ops/messages/search?q=deploy", Some(&reader), None).await;
    assert_eq!((s, v["results"][0]["message"]["seq"].as_u64(), v["results"][0]["highlights"].clone()), (200, Some(1), json!([[0, 6]])), "{v}");
    let (_, v) = rest.call("GET", "/api/rooms/ops/messages/search?q=%E4%B8%96%E7%95%8C&limit=3", Some(&reader), None).await;
    assert_eq!(v["results"].as_array().unwrap().iter().map(|h| h["message"]["seq"].as_u64().unwrap()).collect::<Vec<_>>(), vec![12, 11, 10]);

    let other_room = srv.token("elsewhere", "deploybot", "chat");
    // (what, path, token, body (content type, text), status, code)
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, Option<(&'a str, String)>, u16, &'a str);
    let cases: Vec<Case<'_>> = vec![
        ("no token", "/api/rooms/ops/messages", None, None, 401, "unauthorized"),
        ("forged token", "/api/rooms/ops/messages", Some("a.b.c"), None, 401, "unauthorized"),
        ("other room", "/api/rooms/ops/messages", Some(&other_room), None, 403, "forbidden"),
        ("post without chat", "/api/rooms/ops/messages", Some(&reader), Some(("application/json", json!({"id":"x","text":"hi"}).to_string())), 403, "forbidden"),
        ("bad room", "/api/rooms/bad%20room/messages", Some(&bot), None, 404, "not_found"),
        ("before and after", "/api/rooms/ops/messages?before=3&after=1", Some(&bot), None, 400, "bad_message"),
        ("limit 0", "/api/rooms/ops/messages?limit=0", Some(&bot), None, 400, "bad_message"),
        ("limit text", "/api/rooms/ops/messages?limit=many", Some(&bot), None, 400, "bad_message"),
        ("search no q", "/api/rooms/ops/messages/search", Some(&bot), None, 400, "bad_message"),
        ("search empty q", "/api/rooms/ops/messages/search?q=%20", Some(&bot), None, 400, "bad_message"),
        ("not json", "/api/rooms/ops/messages", Some(&bot), Some(("application/json", "{".into())), 400, "bad_message"),
        ("missing id", "/api/rooms/ops/messages", Some(&bot), Some(("application/json", json!({"text":"hi"}).to_string())), 400, "bad_message"),
        ("too long", "/api/rooms/ops/messages", Some(&bot), Some(("application/json", json!({"id":"l","text":"x".repeat(101)}).to_string())), 413, "too_long"),
        ("huge body", "/api/rooms/ops/messages", Some(&bot), Some(("application/json", json!({"id":"h","text":"x".repeat(100_000)}).to_string())), 413, "too_long"),
        ("reply to nothing", "/api/rooms/ops/messages", Some(&bot), Some(("application/json", json!({"id":"r","text":"x","reply_to":99}).to_string())), 404, "not_found"),
        ("wrong type", "/api/rooms/ops/messages", Some(&bot), Some(("text/plain", "hi".into())), 415, "bad_message"),
    ];
    for (what, path, token, body, status, code) in cases {
        let method = if body.is_some() { "POST" } else { "GET" };
        let (s, v) = rest.call(method, path, token, body).await;
        assert_eq!((s, v["code"].as_str()), (status, Some(code)), "{what}: {v}");
    }
    // The rate limit answers 429 with Retry-After.
    let mut limited = None;
    for i in 0..100 {
        let (s, v) = rest.post(&bot, json!({"id":format!("f{i}"),"text":"flood"})).await;
        if s == 429 {
            limited = Some(v);
            break;
        }
    }
    let limited = limited.expect("rate limited within 100 posts");
    assert_eq!(limited["code"], "rate_limited");
    assert!(limited["retry_after_ms"].as_u64().is_some_and(|ms| ms >= 1), "{limited}");
    carol.close().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_devices_of_one_identity_converge() {
    let mut srv = TestServer::start().await;
    let token = srv.token("home", "dana", "chat");
    let mut laptop = ChatClient::connect(&srv.ws_url, &token).await;
    laptop.wait_type("history").await;
    let mut phone = ChatClient::connect(&srv.ws_url, &token).await;
    phone.wait_type("history").await;
    // What one device posts, the other receives (same identity, other participant).
    assert_eq!(laptop.chat("l1", "from the laptop").await["seq"], 1);
    assert_eq!(phone.wait_type("chat").await["id"], "l1");
    // The phone goes away; the laptop keeps going, edits and reads.
    let last_seen = phone.request(json!({"type":"history"}), 1).await;
    phone.close().await;
    for i in 2..=4 {
        laptop.chat(&format!("l{i}"), &format!("m{i}")).await;
    }
    laptop.request(json!({"type":"edit","seq":1,"text":"from the laptop, edited"}), 2).await;
    laptop.request(json!({"type":"read","seq":4}), 3).await;
    // The phone comes back and catches up from its last seq and rev.
    let mut phone = ChatClient::connect(&srv.ws_url, &token).await;
    let hello = phone.wait_type("hello").await;
    assert_eq!((hello["last_read"].as_u64(), hello["latest_seq"].as_u64()), (Some(4), Some(4)), "the read position is per identity");
    let after = phone.request(json!({"type":"history","after":last_seen["latest_seq"]}), 4).await;
    assert_eq!(seqs(&after), vec![2, 3, 4]);
    let changed = phone.request(json!({"type":"sync","rev":last_seen["rev"]}), 5).await;
    assert_eq!(seqs(&changed), vec![2, 3, 4, 1], "new messages and the edit, in order of change");
    let mut view: std::collections::BTreeMap<u64, Value> = last_seen["messages"].as_array().unwrap().iter().map(|m| (m["seq"].as_u64().unwrap(), m.clone())).collect();
    for m in changed["messages"].as_array().unwrap() {
        view.insert(m["seq"].as_u64().unwrap(), m.clone());
    }
    let truth = laptop.request(json!({"type":"history"}), 6).await;
    assert_eq!(view.into_values().collect::<Vec<_>>(), *truth["messages"].as_array().unwrap(), "both devices hold the same history");
    laptop.close().await;
    phone.close().await;
    srv.stop().await;
}
