//! Media behaviour seen by a subscriber: NACKs answered from the server's cache over a lossy
//! link, mute/unmute without a sequence gap, and the room size limit.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Client, RawWs, TestServer};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

/// A UDP relay between one client and the server that drops every `nth` server→client RTP
/// packet of any payload type but `keep_pt` (SRTP leaves the RTP header readable). Returns its
/// address and the drop counter.
async fn lossy_relay(server: SocketAddr, nth: u64, keep_pt: u8) -> (SocketAddr, Arc<AtomicU64>) {
    let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    let dropped = Arc::new(AtomicU64::new(0));
    let client: Arc<tokio::sync::Mutex<Option<SocketAddr>>> = Default::default();
    {
        let (front, back, client) = (front.clone(), back.clone(), client.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().await = Some(from);
                let _ = back.send_to(&buf[..n], server).await;
            }
        });
    }
    {
        let dropped = dropped.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut count = 0u64;
            while let Ok((n, _)) = back.recv_from(&mut buf).await {
                let rtp = n > 12 && (128..192).contains(&buf[0]) && !(200..=206).contains(&buf[1]) && buf[1] & 0x7f != keep_pt;
                if rtp {
                    count += 1;
                    if count % nth == 0 {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
                if let Some(c) = *client.lock().await {
                    let _ = front.send_to(&buf[..n], c).await;
                }
            }
        });
    }
    (addr, dropped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nacks_are_answered_from_the_cache_over_a_lossy_link() {
    let mut srv = TestServer::start().await;
    let rtc = srv.server.as_ref().unwrap().state.engine.advertised()[0];
    // Opus is payload type 111 in the server's offers; everything else RTP is video.
    let (relay, dropped) = lossy_relay(rtc, 10, 111).await;
    let needle = format!(" {} {} typ host", rtc.ip(), rtc.port());
    let replacement = format!(" {} {} typ host", relay.ip(), relay.port());
    let rewrite: Arc<dyn Fn(String) -> String + Send + Sync> = Arc::new(move |sdp: String| sdp.replace(&needle, &replacement));
    let mut alice = Client::join(&srv.ws_url, &srv.token("n", "alice", "publish"), None).await;
    let bob = Client::join_with(&srv.ws_url, &srv.token("n", "bob", "subscribe"), None, Some(rewrite)).await;
    let tracks = alice.publish_camera().await;
    assert!(bob.wait_decoding(&tracks, 60, T).await, "bob receives through the relay: {:#?}", bob.received().await);
    let video = bob.received().await.into_values().find(|t| t.frames_decoded > 0).unwrap();
    let lost_on_link = dropped.load(Ordering::Relaxed);
    let sent = video.seqs.len() as u64 + lost_on_link;
    assert!(lost_on_link * 100 >= sent * 5, "the relay dropped {lost_on_link} of ~{sent} video packets");
    let missing = video.missing(30);
    assert!(missing * 100 <= video.seqs.len() as u64, "after retransmissions {missing} of {} packets are still missing", video.seqs.len());
    assert_eq!(video.decode_errors, 0, "the repaired stream decodes cleanly: {video:?}");
    let served = srv.metric("warbler_nacks_served_total", None).await;
    assert!(served >= lost_on_link as f64 * 0.5, "NACKs answered by the server: {served} (link dropped {lost_on_link})");
    eprintln!("lossy link: dropped {lost_on_link}, retransmitted {served}, still missing {missing} of {}", video.seqs.len());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mute_stops_media_and_unmute_resumes_without_a_gap() {
    let mut srv = TestServer::start().await;
    let mut alice = Client::join(&srv.ws_url, &srv.token("m", "alice", "publish"), None).await;
    let mut bob = Client::join(&srv.ws_url, &srv.token("m", "bob", "subscribe"), None).await;
    let tracks = alice.publish_camera().await;
    assert!(bob.wait_decoding(&tracks, 20, T).await);
    let video_sid = {
        let r = bob.received().await;
        tracks.iter().find(|t| r[*t].frames_decoded > 0).unwrap().clone()
    };
    alice.send(json!({"type":"mute","track":video_sid,"muted":true}));
    let m = bob.wait_for(T, |m| m["type"] == "track_muted").await.unwrap();
    assert_eq!((m["track"].as_str(), m["muted"].as_bool()), (Some(video_sid.as_str()), Some(true)));
    // Let in-flight packets land, then nothing more arrives while muted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let muted_at = bob.received().await[&video_sid].packets;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(bob.received().await[&video_sid].packets, muted_at, "no video while muted");
    assert!(srv.metric("warbler_packets_dropped_total", Some("reason=\"muted\"")).await > 0.0);

    alice.send(json!({"type":"mute","track":video_sid,"muted":false}));
    let m = bob.wait_for(T, |m| m["type"] == "track_muted").await.unwrap();
    assert_eq!(m["muted"], false);
    let frames = bob.received().await[&video_sid].frames_decoded;
    let deadline = tokio::time::Instant::now() + T;
    let after = loop {
        let s = bob.received().await[&video_sid].clone();
        if s.frames_decoded >= frames + 20 {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "video resumes after unmute: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(after.seq_discontinuities, 0, "the stream resumes right after the last packet before the mute");
    assert_eq!(after.ts_backwards, 0);
    assert_eq!(after.decode_errors, 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_room_refuses_the_next_participant() {
    let mut srv = TestServer::start_with(|c| c.limits.max_participants_per_room = 2).await;
    let _a = Client::join(&srv.ws_url, &srv.token("f", "a", "subscribe"), None).await;
    let _b = Client::join(&srv.ws_url, &srv.token("f", "b", "subscribe"), None).await;
    let mut c = RawWs::connect(&srv.ws_url).await;
    c.send(json!({"type":"join","version":1,"token":srv.token("f","c","subscribe")})).await;
    let e = c.recv_type("error").await.unwrap();
    assert_eq!(e["code"], "room_full", "{e}");
    assert!(c.closed().await);
    let res = reqwest::Client::new()
        .post(format!("{}/whip/f", srv.base))
        .bearer_auth(srv.token("f", "w", "publish"))
        .header("Content-Type", "application/sdp")
        .body("v=0\r\n")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 503, "WHIP into a full room");
    // Another room is unaffected.
    let _d = Client::join(&srv.ws_url, &srv.token("g", "d", "subscribe"), None).await;
    srv.stop().await;
}
