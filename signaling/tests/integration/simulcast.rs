//! Simulcast end to end with native clients: a publisher sends three H.264 layers; subscribers
//! get the layer that fits what they display and what their link carries, switching only at
//! keyframes with one continuous stream; hidden tracks pause; unneeded layers are paused at the
//! publisher. Adapting to a capped link is shown with real browsers behind `tc tbf`
//! (web-demo/tests, test F) and an aiortc REMB viewer (test G).

use crate::common;

use std::time::{Duration, Instant};

use common::native::SimulcastLayer;
use common::{Client, NativePeer, TestServer};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

const LAYERS: [SimulcastLayer; 3] = [
    SimulcastLayer { rid: "f", width: 640, height: 360, bps: 700_000 },
    SimulcastLayer { rid: "q", width: 160, height: 90, bps: 80_000 },
    SimulcastLayer { rid: "h", width: 320, height: 180, bps: 250_000 },
];

async fn publish_simulcast(c: &mut Client) -> String {
    let mut p = NativePeer::new().await;
    let track_id = p.add_simulcast_camera(&LAYERS).await;
    let offer = p.offer().await;
    assert!(offer.contains("a=simulcast:send"), "{offer}");
    c.send(json!({"type":"publish","sdp":offer,"tracks":[{"track_id":track_id,"source":"camera"}]}));
    let answer = c.wait_for(T, |m| m["type"] == "publish_answer" || m["type"] == "error").await.unwrap();
    assert_eq!(answer["type"], "publish_answer", "{answer}");
    let sdp = answer["sdp"].as_str().unwrap().to_owned();
    assert!(sdp.contains("a=simulcast:recv"), "the answer accepts simulcast: {sdp}");
    p.accept_answer(sdp).await;
    assert!(p.wait_connected(T).await);
    c.publisher = Some(p);
    answer["tracks"][0]["sid"].as_str().unwrap().to_owned()
}

/// Waits until the subscriber's decoded size of `track` is `want`; returns how long it took.
async fn wait_size(c: &Client, track: &str, want: (usize, usize), within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let r = c.received().await;
        if r.get(track).and_then(|s| s.last_frame_size) == Some(want) {
            return Some(t0.elapsed());
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `/metrics` until the series of `name` matching `label` sums to `want`.
async fn metric_reaches(srv: &TestServer, name: &str, label: &str, want: f64) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if srv.metric(name, Some(label)).await == want {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribers_get_the_layer_they_display_with_one_continuous_stream() {
    let mut srv = TestServer::start().await;
    let mut alice = Client::join(&srv.ws_url, &srv.token("s", "alice", "publish"), None).await;
    let mut bob = Client::join(&srv.ws_url, &srv.token("s", "bob", "subscribe"), None).await;
    let track = publish_simulcast(&mut alice).await;

    // No display size given: the top layer (ordered by picture size, not by rid name).
    assert!(wait_size(&bob, &track, (640, 360), T).await.is_some(), "top layer first: {:#?}", bob.received().await);

    // A small tile: the smallest layer that covers it.
    bob.send(json!({"type":"track_settings","track":track,"width":160,"height":90}));
    let took = wait_size(&bob, &track, (160, 90), T).await;
    assert!(took.is_some(), "switches down: {:#?}", bob.received().await);
    // /metrics shows target and current layer of this subscriber's track.
    assert!(metric_reaches(&srv, "warbler_subscriber_track_layer", "which=\"current\"", 0.0).await, "current layer 0 in /metrics");
    assert!(metric_reaches(&srv, "warbler_subscriber_track_layer", "which=\"target\"", 0.0).await, "target layer 0 in /metrics");
    let mid = bob.received().await[&track].clone();
    bob.send(json!({"type":"track_settings","track":track,"width":300,"height":170}));
    assert!(wait_size(&bob, &track, (320, 180), T).await.is_some(), "middle layer");
    bob.send(json!({"type":"track_settings","track":track,"width":1280,"height":720}));
    let up = wait_size(&bob, &track, (640, 360), T).await;
    assert!(up.is_some(), "back up");
    let s = bob.received().await[&track].clone();
    assert!(s.frames_decoded > mid.frames_decoded, "decoding continued across the switches");
    assert_eq!(s.ssrcs.len(), 1, "one SSRC across all switches");
    assert_eq!(s.seq_discontinuities, 0, "sequence numbers continue across switches: {s:?}");
    assert_eq!(s.ts_backwards, 0, "one timeline: {s:?}");
    assert_eq!(s.decode_errors, 0, "every switch lands on a keyframe: {s:?}");
    eprintln!("switch down took {took:?}, up {up:?}; {} frames decoded", s.frames_decoded);

    // Hidden → paused with a reason, nothing flows; shown → resumed.
    bob.send(json!({"type":"track_settings","track":track,"visible":false}));
    let paused = bob.wait_for(T, |m| m["type"] == "track_paused").await.expect("track_paused");
    assert_eq!((paused["track"].as_str(), paused["reason"].as_str()), (Some(track.as_str()), Some("hidden")));
    assert!(metric_reaches(&srv, "warbler_subscriber_track_paused", "reason=\"hidden\"", 1.0).await, "pause reason in /metrics");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = bob.received().await[&track].packets;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(bob.received().await[&track].packets, stopped, "nothing sent while hidden");
    bob.send(json!({"type":"track_settings","track":track,"visible":true,"width":160,"height":90}));
    assert!(bob.wait_for(T, |m| m["type"] == "track_resumed").await.is_some());
    assert!(wait_size(&bob, &track, (160, 90), T).await.is_some());
    let after = bob.received().await[&track].clone();
    assert_eq!(after.seq_discontinuities, 0, "resumes right after the last packet: {after:?}");

    // Only the lowest layer is needed now: after the grace period the publisher is told to
    // pause the others, and to resume them when someone wants them again.
    // (Layers left unneeded at different times may be paused by separate messages.)
    let layers = alice
        .wait_for(Duration::from_secs(15), |m| m["type"] == "layers" && m["active"]["f"] == false && m["active"]["h"] == false)
        .await
        .expect("layers message pausing f and h");
    assert_eq!(layers["track"], track.as_str());
    assert_eq!(layers["active"], json!({"f": false, "q": true, "h": false}), "{layers}");
    bob.send(json!({"type":"track_settings","track":track,"width":640,"height":360}));
    let layers = alice.wait_for(T, |m| m["type"] == "layers").await.expect("resume message");
    assert_eq!(layers["active"]["f"], true, "{layers}");
    assert!(wait_size(&bob, &track, (640, 360), T).await.is_some());
    let switches = srv.metric("warbler_subscriber_track_layer_switches", None).await;
    assert!(switches >= 3.0, "switches counted: {switches}");
    assert!(srv.metric("warbler_track_pauses_total", Some("reason=\"hidden\"")).await >= 1.0);
    srv.stop().await;
}
