//! The engine end to end with native WebRTC peers on loopback, driven through the engine handle
//! (no signaling): real H.264 and Opus in, decoded frames out.

mod support;

use std::time::Duration;

use support::{NativePeer, eventually};
use warbler_sfu::api::{EngineConfig, Grants, JoinRequest, ParticipantEvent, ParticipantKind};
use warbler_sfu::ids::RoomName;
use warbler_sfu::metrics::Metrics;
use warbler_sfu::shell::{EngineHandle, EventReceiver, RtcNetConfig, spawn};

fn engine() -> EngineHandle {
    let net = RtcNetConfig { port: 0, public_ips: vec!["127.0.0.1".parse().unwrap()] };
    let (handle, _thread) = spawn(EngineConfig::default(), net, Metrics::unregistered()).unwrap();
    handle
}

fn join_req(room: &str, identity: &str) -> JoinRequest {
    JoinRequest {
        room: RoomName(room.into()),
        identity: identity.into(),
        name: identity.into(),
        grants: Grants { publish: true, subscribe: true, chat: true, admin: false },
        kind: ParticipantKind::WebSocket,
    }
}

/// Answers subscriber offers for one participant until the test ends.
fn serve_subscriber(engine: EngineHandle, id: warbler_sfu::ids::ParticipantId, mut events: EventReceiver) -> tokio::sync::watch::Receiver<Option<std::sync::Arc<tokio::sync::Mutex<NativePeer>>>> {
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        let mut peer: Option<std::sync::Arc<tokio::sync::Mutex<NativePeer>>> = None;
        while let Some(ev) = events.recv().await {
            if let ParticipantEvent::SubscriberOffer { sdp, .. } = ev {
                let p = match &peer {
                    Some(p) => p.clone(),
                    None => {
                        let p = std::sync::Arc::new(tokio::sync::Mutex::new(NativePeer::new().await));
                        peer = Some(p.clone());
                        let _ = tx.send(Some(p.clone()));
                        p
                    }
                };
                let answer = p.lock().await.answer(sdp).await;
                engine.subscriber_answer(id, answer).await.unwrap();
            }
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publisher_to_two_subscribers_decodes() {
    let engine = engine();
    let (alice, _alice_events) = engine.join(join_req("r1", "alice")).await.unwrap();
    let (bob, bob_events) = engine.join(join_req("r1", "bob")).await.unwrap();
    let bob_peer = serve_subscriber(engine.clone(), bob.participant.id, bob_events);

    let mut publisher = NativePeer::new().await;
    publisher.add_camera_and_mic().await;
    let offer = publisher.offer().await;
    let answer = engine.publish(alice.participant.id, offer, vec![]).await.unwrap();
    assert_eq!(answer.tracks.len(), 2, "{:?}", answer.tracks);
    publisher.accept_answer(answer.sdp).await;
    assert!(publisher.wait_connected(Duration::from_secs(10)).await, "publisher connects");

    let mut rx = bob_peer.clone();
    let peer = tokio::time::timeout(Duration::from_secs(10), async { rx.wait_for(|p| p.is_some()).await.unwrap().clone().unwrap() }).await.unwrap();
    let ok = eventually(Duration::from_secs(15), || {
        let t = peer.try_lock().map(|p| p.tracks()).unwrap_or_default();
        t.values().any(|s| s.frames_decoded >= 30) && t.values().any(|s| s.audio_frames_decoded >= 50)
    })
    .await;
    let tracks = peer.lock().await.tracks();
    assert!(ok, "bob decodes video and audio: {tracks:#?}");

    // Sender reports (made by the engine, which writes RTP past the stack's interceptors): one a
    // second per stream, counting what was sent, with an RTP clock that runs with NTP time
    // (receivers align audio and video by them).
    let ok = eventually(Duration::from_secs(5), || {
        let srs = peer.try_lock().map(|p| p.sender_reports()).unwrap_or_default();
        tracks.values().all(|t| t.ssrcs.iter().any(|s| srs.get(s).is_some_and(|v| v.len() >= 2)))
    })
    .await;
    let (srs, tracks) = {
        let p = peer.lock().await;
        (p.sender_reports(), p.tracks())
    };
    assert!(ok, "two sender reports for every stream: {srs:#?}");
    for t in tracks.values() {
        let clock = if t.kind == Some(rtc::rtp_transceiver::rtp_sender::RtpCodecKind::Audio) { 48_000.0 } else { 90_000.0 };
        let v = &srs[&t.ssrcs[0]];
        let (a, b) = (v[v.len() - 2], v[v.len() - 1]);
        let count = b.1;
        assert!(count > 0 && u64::from(count) <= t.packets + 100, "SR packet count {count} vs {} received", t.packets);
        assert!(b.1 > a.1 && b.2 > a.2, "counts grow: {a:?} {b:?}");
        let ntp_secs = |ntp: u64| (ntp >> 32) as f64 + (ntp & 0xffff_ffff) as f64 / 4_294_967_296.0;
        let dntp = ntp_secs(b.3) - ntp_secs(a.3);
        let drtp = f64::from(b.4.wrapping_sub(a.4)) / clock;
        assert!((0.8..2.5).contains(&dntp), "about a second between reports: {dntp}");
        assert!((drtp - dntp).abs() < 0.1, "RTP time runs with NTP time: {drtp} vs {dntp}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_channel_messages_reach_the_engine_and_back() {
    let engine = engine();
    let (carl, mut events) = engine.join(join_req("dc", "carl")).await.unwrap();
    let mut peer = NativePeer::new().await;
    let mut chat = peer.open_data_channel("chat").await;
    let offer = peer.offer().await;
    // A data-channel-only offer needs no publish grant and publishes no track.
    let answer = engine.publish(carl.participant.id, offer, vec![]).await.unwrap();
    assert!(answer.tracks.is_empty());
    peer.accept_answer(answer.sdp).await;
    assert!(chat.wait_open(Duration::from_secs(10)).await, "data channel opens");
    chat.send("hello engine").await;
    let mut got = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.is_none() && tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(ParticipantEvent::DataMessage { label, data, is_text })) => got = Some((label, data, is_text)),
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let (label, data, is_text) = got.expect("the engine surfaces the message");
    assert_eq!((label.as_str(), &data[..], is_text), ("chat", &b"hello engine"[..], true));
    let failed = engine.send_data(vec![carl.participant.id], "chat".into(), bytes::Bytes::from_static(b"hello client"), true).await.unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(chat.recv(Duration::from_secs(10)).await.as_deref(), Some("hello client"));
    let failed = engine.send_data(vec![carl.participant.id], "nope".into(), bytes::Bytes::from_static(b"x"), true).await.unwrap();
    assert_eq!(failed.len(), 1, "unknown label is reported");
}
