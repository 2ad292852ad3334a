//! WHIP ingest and WHEP playback with native WebRTC clients: a player that waits for its
//! publisher, sees the same continuous stream across a publisher restart, and trickle/DELETE.

use crate::common;

use std::time::Duration;

use common::{Client, NativePeer, TestServer};

const T: Duration = Duration::from_secs(20);

struct Session {
    location: String,
    answer: String,
}

async fn post(url: &str, token: &str, offer: String) -> Result<Session, (u16, String)> {
    let res = reqwest::Client::new().post(url).bearer_auth(token).header("Content-Type", "application/sdp").body(offer).send().await.unwrap();
    let status = res.status().as_u16();
    let location = res.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let ct = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let body = res.text().await.unwrap();
    if status != 201 {
        return Err((status, body));
    }
    assert_eq!(ct, "application/sdp");
    Ok(Session { location: location.expect("201 carries a Location"), answer: body })
}

async fn whip_publish(srv: &TestServer, room: &str, identity: &str) -> (NativePeer, Session) {
    let mut p = NativePeer::new().await;
    p.add_camera_and_mic().await;
    let offer = p.offer().await;
    let s = post(&format!("{}/whip/{room}", srv.base), &srv.token(room, identity, "publish"), offer).await.expect("WHIP accepted");
    assert!(s.location.starts_with(&format!("/whip/{room}/")), "{}", s.location);
    p.accept_answer(s.answer.clone()).await;
    assert!(p.wait_connected(T).await, "WHIP publisher connects");
    (p, s)
}

fn video(p: &NativePeer) -> Option<common::TrackStats> {
    p.tracks().into_values().find(|t| t.kind == Some(rtc::rtp_transceiver::rtp_sender::RtpCodecKind::Video))
}

fn audio(p: &NativePeer) -> Option<common::TrackStats> {
    p.tracks().into_values().find(|t| t.kind == Some(rtc::rtp_transceiver::rtp_sender::RtpCodecKind::Audio))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whep_player_waits_for_publisher_and_survives_a_restart() {
    let mut srv = TestServer::start().await;
    let http = reqwest::Client::new();
    let mut watcher = Client::join(&srv.ws_url, &srv.token("live", "watcher", "subscribe"), None).await;

    // The player comes first: its session waits for "cam".
    let mut player = NativePeer::new().await;
    player.add_receive_only().await;
    let offer = player.offer().await;
    let whep = post(&format!("{}/whep/live/cam", srv.base), &srv.token("live", "viewer", "subscribe"), offer).await.expect("WHEP accepted");
    assert!(whep.location.starts_with("/whep/live/cam/"), "{}", whep.location);
    player.accept_answer(whep.answer.clone()).await;
    assert!(player.wait_connected(T).await, "WHEP player connects before anyone publishes");

    // Trickle to the WHEP session.
    let frag = "a=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\n";
    let res = http
        .patch(format!("{}{}", srv.base, whep.location))
        .bearer_auth(srv.token("live", "viewer", "subscribe"))
        .header("Content-Type", "application/trickle-ice-sdpfrag")
        .body(frag)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 204);

    // The WHIP publisher arrives; the player decodes; WebSocket participants see it as a peer.
    let (mut cam, cam_session) = whip_publish(&srv, "live", "cam").await;
    let joined = watcher.wait_for(T, |m| m["type"] == "participant_joined").await.expect("WHIP publisher is a room participant");
    assert_eq!(joined["participant"]["identity"], "cam");
    let ok = common::eventually(T, || video(&player).is_some_and(|v| v.frames_decoded >= 30) && audio(&player).is_some_and(|a| a.audio_frames_decoded >= 50)).await;
    assert!(ok, "player decodes: {:#?}", player.tracks());
    let first = video(&player).unwrap();

    // The publisher goes away (DELETE) and a new one with the same identity takes over: the
    // player's stream continues on the same SSRC with no sequence gap.
    let res = http.delete(format!("{}{}", srv.base, cam_session.location)).bearer_auth(srv.token("live", "cam", "publish")).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 200);
    cam.close().await;
    let res = http.delete(format!("{}{}", srv.base, cam_session.location)).bearer_auth(srv.token("live", "cam", "publish")).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 404, "a deleted session is gone");
    let paused_at = video(&player).unwrap().frames_decoded;
    let (_cam2, _s2) = whip_publish(&srv, "live", "cam").await;
    let ok = common::eventually(T, || video(&player).is_some_and(|v| v.frames_decoded >= paused_at + 30)).await;
    let after = video(&player).unwrap();
    assert!(ok, "player decodes the new publisher: {after:?}");
    assert_eq!(after.ssrcs, first.ssrcs, "same SSRC across the publisher restart");
    assert_eq!(after.seq_discontinuities, 0, "sequence numbers continue: {after:?}");
    assert_eq!(after.ts_backwards, 0, "timestamps never go back: {after:?}");
    assert_eq!(after.decode_errors, 0);

    let res = http.delete(format!("{}{}", srv.base, whep.location)).bearer_auth(srv.token("live", "viewer", "subscribe")).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let gone = {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            if srv.metric("warbler_participants", None).await == 2.0 {
                break true;
            }
            if tokio::time::Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert!(gone, "WHEP session removed (watcher and cam remain)");
    srv.stop().await;
}
