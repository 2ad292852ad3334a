//! A room end to end through the real server: WebSocket signaling, the engine on one UDP port,
//! and native WebRTC clients that decode what they receive.

use crate::common;

use std::time::Duration;

use common::{Client, TestServer};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publisher_two_subscribers_late_joiner_and_departure() {
    let mut srv = TestServer::start().await;
    let mut alice = Client::join(&srv.ws_url, &srv.token("room1", "alice", "publish,subscribe"), None).await;
    let mut bob = Client::join(&srv.ws_url, &srv.token("room1", "bob", "subscribe"), None).await;
    let carol = Client::join(&srv.ws_url, &srv.token("room1", "carol", "subscribe"), None).await;
    assert_eq!(bob.joined["participants"].as_array().unwrap().len(), 1, "bob sees alice: {}", bob.joined);

    let tracks = alice.publish_camera().await;
    assert_eq!(tracks.len(), 2);
    let published = bob.wait_for(T, |m| m["type"] == "track_published").await.expect("bob is told about alice's track");
    assert_eq!(published["participant"], alice.sid.as_str());
    // The server only sends on the subscriber connection.
    let offer = bob.wait_for(T, |m| m["type"] == "subscriber_offer" && m["tracks"].as_object().is_some_and(|t| t.len() == 2)).await.expect("offer with both tracks");
    let sdp = offer["sdp"].as_str().unwrap();
    assert_eq!(sdp.matches("a=sendonly").count(), 2, "{sdp}");
    assert!(!sdp.contains("a=sendrecv"), "{sdp}");

    assert!(bob.wait_decoding(&tracks, 30, T).await, "bob decodes: {:#?}", bob.received().await);
    assert!(carol.wait_decoding(&tracks, 30, T).await, "carol decodes: {:#?}", carol.received().await);

    // Rewriting: every subscriber gets its own SSRCs, one per track, never the publisher's, and
    // continuous sequence numbers with timestamps that never go back.
    let pub_ssrcs: Vec<u32> = {
        let p = alice.publisher.as_ref().unwrap();
        let mut v = Vec::new();
        for s in p.pc.get_senders().await {
            if let Ok(params) = s.get_parameters().await {
                v.extend(params.encodings.iter().filter_map(|e| e.rtp_coding_parameters.ssrc));
            }
        }
        v
    };
    assert_eq!(pub_ssrcs.len(), 2);
    let b = bob.received().await;
    let c = carol.received().await;
    for t in &tracks {
        let (bs, cs) = (&b[t], &c[t]);
        assert_eq!(bs.stream_id, alice.sid, "msid stream is the publisher's sid");
        assert_eq!(bs.ssrcs.len(), 1, "{bs:?}");
        assert_eq!(cs.ssrcs.len(), 1);
        assert_ne!(bs.ssrcs[0], cs.ssrcs[0], "each subscriber has its own SSRC");
        assert!(!pub_ssrcs.contains(&bs.ssrcs[0]), "SSRC is rewritten");
        assert_eq!(bs.seq_discontinuities, 0, "{t}: {bs:?}");
        assert_eq!(bs.ts_backwards, 0, "{t}: {bs:?}");
        assert_eq!(bs.decode_errors, 0);
    }

    // A late joiner gets the existing tracks.
    let dave = Client::join(&srv.ws_url, &srv.token("room1", "dave", "subscribe"), None).await;
    assert_eq!(dave.joined["participants"].as_array().unwrap().len(), 3);
    let alice_info = dave.joined["participants"].as_array().unwrap().iter().find(|p| p["identity"] == "alice").unwrap().clone();
    assert_eq!(alice_info["tracks"].as_array().unwrap().len(), 2, "{alice_info}");
    assert!(dave.wait_decoding(&tracks, 30, T).await, "dave decodes: {:#?}", dave.received().await);
    // Dave's video needed a keyframe: the server asked the publisher (PLI), which the
    // publisher's own statistics show.
    assert!(srv.metric("warbler_plis_sent_total", None).await >= 1.0);
    let pli_seen = alice.publisher.as_ref().unwrap().keyframe_requests();
    assert!(pli_seen >= 1, "publisher received a PLI");

    // The publisher leaves: everyone is told, the tracks are withdrawn and stop.
    let alice_sid = alice.sid.clone();
    alice.send(json!({"type":"leave"}));
    let mut unpublished = Vec::new();
    loop {
        let m = bob.wait_for(T, |_| true).await.expect("bob sees alice leave");
        if m["type"] == "track_unpublished" {
            assert_eq!(m["participant"], alice_sid.as_str());
            unpublished.push(m["track"].as_str().unwrap().to_owned());
        }
        if m["type"] == "participant_left" && m["sid"] == alice_sid.as_str() {
            break;
        }
    }
    unpublished.sort();
    let mut want = tracks.clone();
    want.sort();
    assert_eq!(unpublished, want, "both tracks withdrawn");
    let offer = bob.wait_for(T, |m| m["type"] == "subscriber_offer").await.expect("renegotiation after the tracks went away");
    let sdp = offer["sdp"].as_str().unwrap();
    assert_eq!(sdp.matches("a=inactive").count(), 2, "freed m-lines are inactive: {sdp}");
    let settled = wait_metric(&srv, &["warbler_down_tracks", "warbler_tracks_video", "warbler_tracks_audio"], 0.0).await;
    assert!(settled, "no tracks and no down tracks remain after the publisher left");
    let after = bob.received().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = bob.received().await;
    for t in &tracks {
        assert!(after[t].packets > 0);
        assert_eq!(after[t].packets, later[t].packets, "no packets after the publisher left");
    }
    srv.stop().await;
}

/// Polls `/metrics` until the named metrics sum to `want`.
async fn wait_metric(srv: &TestServer, names: &[&str], want: f64) -> bool {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let mut sum = 0.0;
        for n in names {
            sum += srv.metric(n, None).await;
        }
        if sum == want {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
