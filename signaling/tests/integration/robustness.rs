//! Bad input and vanishing peers: every refusal reaches only the offending client with a code,
//! the process keeps running, and a working room keeps its media.

use crate::common;

use std::time::{Duration, Instant};

use common::{Client, RawWs, TestServer};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

async fn expect_error(ws: &mut RawWs, code: &str) -> Value {
    let v = ws.recv_type("error").await.unwrap_or_else(|| panic!("expected error {code}, socket closed or silent"));
    assert_eq!(v["code"], code, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "errors carry a human message: {v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_tokens_and_malformed_messages_are_refused_while_the_room_keeps_working() {
    let mut srv = TestServer::start_with(|c| {
        c.limits.max_ws_message_bytes = 16 * 1024;
        c.limits.max_sdp_bytes = 8 * 1024;
        c.limits.ws_messages_per_second = 20;
    })
    .await;
    let mut alice = Client::join(&srv.ws_url, &srv.token("r", "alice", "publish,subscribe"), None).await;
    let bob = Client::join(&srv.ws_url, &srv.token("r", "bob", "subscribe"), None).await;
    let tracks = alice.publish_camera().await;
    assert!(bob.wait_decoding(&tracks, 10, T).await, "room works before the abuse");
    let frames_before: u64 = bob.received().await.values().map(|s| s.frames_decoded).sum();

    // Tokens: garbage, forged (other secret), expired, wrong protocol version.
    let forged = {
        let other = warbler_signaling::auth::KeyStore::new(srv.server.as_ref().unwrap().state.keys.signing_key_id().into(), "x".repeat(40)).unwrap();
        other.issue("r", "mallory", None, TestServer::all_grants(), 60, warbler_signaling::auth::unix_now()).unwrap()
    };
    let expired = srv.server.as_ref().unwrap().state.keys.issue("r", "old", None, TestServer::all_grants(), 1, warbler_signaling::auth::unix_now() - 3600).unwrap();
    for (token, why) in [("garbage".to_owned(), "malformed"), (forged, "signature"), (expired, "expired"), (String::new(), "missing")] {
        let mut ws = RawWs::connect(&srv.ws_url).await;
        ws.send(json!({"type":"join","version":1,"token":token})).await;
        let e = expect_error(&mut ws, "unauthorized").await;
        assert!(e["message"].as_str().unwrap().contains(why), "{why}: {e}");
        assert!(ws.closed().await, "a refused join closes the socket");
    }
    let mut ws = RawWs::connect(&srv.ws_url).await;
    ws.send(json!({"type":"join","version":99,"token":srv.token("r","v","subscribe")})).await;
    expect_error(&mut ws, "unsupported_version").await;

    // Messages before join, garbage, wrong shapes, binary, oversized: errors, socket stays open.
    let mut ws = RawWs::connect(&srv.ws_url).await;
    ws.send(json!({"type":"publish","sdp":"v=0"})).await;
    expect_error(&mut ws, "not_joined").await;
    ws.send(json!({"type":"join","version":1,"token":srv.token("r","carol","subscribe")})).await;
    assert_eq!(ws.recv_type("joined").await.unwrap()["type"], "joined");
    for bad in ["{", "[]", "null", r#"{"type":"teleport"}"#, r#"{"type":"mute","track":5,"muted":"yes"}"#, "\u{0}\u{1}"] {
        ws.send_text(bad).await;
        expect_error(&mut ws, "bad_message").await;
    }
    ws.send_binary(vec![0xde, 0xad]).await;
    expect_error(&mut ws, "bad_message").await;
    ws.send_text(&format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(20_000))).await;
    expect_error(&mut ws, "message_too_large").await;
    // Under the limit but larger than the server's 8 KiB socket read buffer: read whole.
    ws.send_text(&format!(r#"{{"type":"ping","id":12,"pad":"{}"}}"#, "x".repeat(12_000))).await;
    assert_eq!(ws.recv_type("pong").await.unwrap()["id"], 12, "a message larger than the read buffer is answered");
    ws.send(json!({"type":"join","version":1,"token":"again"})).await;
    expect_error(&mut ws, "already_joined").await;
    // Publishing without the grant; SDP that is garbage or too big; unknown track.
    ws.send(json!({"type":"publish","req":7,"sdp":"v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendonly\r\n"})).await;
    let e = expect_error(&mut ws, "forbidden").await;
    assert_eq!(e["req"], 7, "the error answers the request");
    ws.send(json!({"type":"mute","track":"TR_0000000000000001","muted":true})).await;
    expect_error(&mut ws, "not_found").await;
    // Carol was offered alice's tracks on joining (that offer went by above); a garbage answer
    // to it is refused.
    ws.send(json!({"type":"subscriber_answer","sdp":"v=0"})).await;
    expect_error(&mut ws, "bad_sdp").await;
    ws.send(json!({"type":"candidate","target":"publisher","candidate":{"candidate":"candidate:garbage"}})).await;
    expect_error(&mut ws, "invalid_state").await;
    ws.send(json!({"type":"ping","id":1})).await;
    assert_eq!(ws.recv_type("pong").await.unwrap()["id"], 1, "still served after all that");

    // A publisher-granted client sending garbage SDP and oversized SDP.
    let mut dan = RawWs::connect(&srv.ws_url).await;
    dan.send(json!({"type":"join","version":1,"token":srv.token("r","dan","publish")})).await;
    dan.recv_type("joined").await.unwrap();
    dan.send(json!({"type":"publish","sdp":"this is not sdp"})).await;
    expect_error(&mut dan, "bad_sdp").await;
    dan.send(json!({"type":"publish","sdp":format!("v=0\r\n{}", "a=x\r\n".repeat(2000))})).await;
    let e = expect_error(&mut dan, "bad_sdp").await;
    assert!(e["message"].as_str().unwrap().contains("limit"), "{e}");

    // A flood is rate limited, then closed.
    let mut flood = RawWs::connect(&srv.ws_url).await;
    for _ in 0..400 {
        flood.send(json!({"type":"ping"})).await;
    }
    expect_error(&mut flood, "rate_limited").await;
    assert!(flood.closed().await, "a persistent flood is disconnected");

    // WHIP refusals.
    let http = reqwest::Client::new();
    let url = format!("{}/whip/r", srv.base);
    let offer = "v=0\r\n";
    let cases: Vec<(Option<String>, &str, String, u16)> = vec![
        (None, "application/sdp", offer.into(), 401),
        (Some("garbage".into()), "application/sdp", offer.into(), 401),
        (Some(srv.token("other-room", "w", "publish")), "application/sdp", offer.into(), 403),
        (Some(srv.token("r", "w", "subscribe")), "application/sdp", offer.into(), 403),
        (Some(srv.token("r", "w", "publish")), "text/plain", offer.into(), 415),
        (Some(srv.token("r", "w", "publish")), "application/sdp", "nonsense".into(), 400),
        (Some(srv.token("r", "w", "publish")), "application/sdp", "v=0\r\n".repeat(3000), 413),
    ];
    for (i, (token, ct, body, status)) in cases.into_iter().enumerate() {
        let mut req = http.post(&url).header("Content-Type", ct).body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status().as_u16(), status, "WHIP case {i}");
    }
    let res = http.delete(format!("{}/whip/r/nosuchsession", srv.base)).bearer_auth(srv.token("r", "w", "publish")).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 404);
    // The auth scheme is case-insensitive: the token is read (and checked) whatever its case.
    let res = http.delete(format!("{}/whip/r/nosuchsession", srv.base)).header("Authorization", format!("BEARER {}", srv.token("r", "w", "publish"))).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 404, "BEARER accepted");
    let res = http.delete(format!("{}/whip/r/nosuchsession", srv.base)).header("Authorization", format!("Basic {}", srv.token("r", "w", "publish"))).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 401, "another scheme is not");
    let res = http.post(format!("{}/whep/r/alice", srv.base)).header("Content-Type", "application/sdp").body("v=0").send().await.unwrap();
    assert_eq!(res.status().as_u16(), 401);

    // Garbage datagrams at the RTC port are dropped and counted.
    let rtc = srv.server.as_ref().unwrap().state.engine.advertised()[0];
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for payload in [vec![0u8; 0], vec![0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42], vec![0x80; 1200], vec![22; 300], vec![0xff; 50]] {
        let _ = sock.send_to(&payload, rtc);
    }

    // The room never noticed.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let now: u64 = bob.received().await.values().map(|s| s.frames_decoded).sum();
        if now >= frames_before + 30 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "bob's video kept decoding ({frames_before} → {now})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health = reqwest::get(format!("{}/healthz", srv.base)).await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert!(srv.metric("warbler_signaling_errors_total", Some("code=\"bad_message\"")).await >= 7.0);
    assert!(srv.metric("warbler_packets_dropped_total", Some("reason=\"unknown_peer\"")).await + srv.metric("warbler_packets_dropped_total", Some("reason=\"malformed\"")).await >= 3.0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vanished_subscriber_is_detected_and_cleaned_up_within_15_seconds() {
    let mut srv = TestServer::start().await;
    let mut alice = Client::join(&srv.ws_url, &srv.token("v", "alice", "publish,subscribe"), None).await;
    let tracks = alice.publish_camera().await;
    // Erin's media runs on its own runtime; dropping it silences her connection without a
    // goodbye while her WebSocket stays open (a laptop lid closing, a network gone).
    let erin_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let mut erin = Client::join(&srv.ws_url, &srv.token("v", "erin", "subscribe"), Some(erin_rt.handle().clone())).await;
    assert!(erin.wait_decoding(&tracks, 10, T).await, "erin receives before vanishing");
    assert_eq!(srv.metric("warbler_participants", None).await, 2.0);
    assert_eq!(srv.metric("warbler_peer_connections", None).await, 2.0);

    let vanished = Instant::now();
    erin_rt.shutdown_background();
    let leave = erin.wait_for(Duration::from_secs(20), |m| m["type"] == "leave").await.expect("the server ends erin's session");
    let took = vanished.elapsed();
    assert_eq!(leave["reason"], "timeout", "{leave}");
    assert!(took <= Duration::from_secs(15), "detected after {took:?}");
    let left = alice.wait_for(T, |m| m["type"] == "participant_left").await.unwrap();
    assert_eq!(left["sid"], erin.sid.as_str());
    assert_eq!(left["reason"], "timeout");
    // Her connection, down tracks and session are gone; alice is untouched.
    assert_eq!(srv.metric("warbler_participants", None).await, 1.0);
    assert_eq!(srv.metric("warbler_peer_connections", None).await, 1.0);
    assert_eq!(srv.metric("warbler_down_tracks", None).await, 0.0);
    assert!(srv.metric("warbler_peers_timed_out_total", None).await >= 1.0);
    eprintln!("vanished subscriber detected after {took:?}");
    srv.stop().await;
}
