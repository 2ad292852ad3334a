//! Active speaker end to end: native publishers put RFC 6464 audio levels on real Opus packets,
//! and a subscriber is told who speaks, in order, and when nobody does.

use crate::common;

use std::time::{Duration, Instant};

use common::{Client, TestServer};
use serde_json::Value;

const T: Duration = Duration::from_secs(10);

fn sids(m: &Value) -> Vec<String> {
    m["speakers"].as_array().map(|a| a.iter().filter_map(|s| s["sid"].as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

/// Waits for an `active_speakers` message naming exactly `want` (in order); prints how long.
async fn expect_speakers(c: &mut Client, want: &[&str], what: &str) -> Value {
    let start = Instant::now();
    let m = c
        .wait_for(T, |m| m["type"] == "active_speakers" && sids(m) == want)
        .await
        .unwrap_or_else(|| panic!("{what}: no active_speakers {want:?} within {T:?}"));
    println!("{what}: announced after {} ms: {m}", start.elapsed().as_millis());
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loudest_publisher_is_announced_and_silence_ends_it() {
    let mut srv = TestServer::start().await;
    let room = "speakers";
    let mut alice = Client::join(&srv.ws_url, &srv.token(room, "alice", "publish,subscribe"), None).await;
    let mut bob = Client::join(&srv.ws_url, &srv.token(room, "bob", "publish,subscribe"), None).await;
    let mut carol = Client::join(&srv.ws_url, &srv.token(room, "carol", "subscribe"), None).await;
    alice.publish_camera().await;
    // [camera, microphone], as declared.
    let bob_tracks = bob.publish_camera().await;
    let (a, b) = (alice.sid.clone(), bob.sid.clone());

    // Without any level extension nobody is a speaker: no announcement.
    let quiet = carol.wait_for(Duration::from_secs(2), |m| m["type"] == "active_speakers").await;
    assert!(quiet.is_none(), "nobody speaks yet: {quiet:?}");

    alice.publisher.as_ref().unwrap().set_audio_level(Some(10));
    bob.publisher.as_ref().unwrap().set_audio_level(Some(127));
    let m = expect_speakers(&mut carol, &[&a], "alice speaks (-10 dBov), bob silent").await;
    let level = m["speakers"][0]["level"].as_f64().unwrap();
    assert!((0.7..=0.9).contains(&level), "level of -10 dBov speech: {level}");
    // Every participant is told, the speaker included.
    expect_speakers(&mut alice, &[&a], "alice's own page").await;

    // Bob joins in quieter: both speak, alice stays first.
    bob.publisher.as_ref().unwrap().set_audio_level(Some(30));
    expect_speakers(&mut carol, &[&a, &b], "both speak, alice louder").await;

    // Alice goes quiet (muted mic: level 127); bob alone.
    alice.publisher.as_ref().unwrap().set_audio_level(Some(127));
    expect_speakers(&mut carol, &[&b], "alice silent").await;

    // Muting the track (signaling `mute`) counts as silence whatever the packets say.
    bob.send(serde_json::json!({"type":"mute","track":bob_tracks[1],"muted":true}));
    expect_speakers(&mut carol, &[], "bob muted his microphone").await;

    assert!(srv.metric("warbler_active_speaker_changes_total", None).await >= 4.0);

    // A speaker who leaves is dropped at once.
    alice.publisher.as_ref().unwrap().set_audio_level(Some(5));
    expect_speakers(&mut carol, &[&a], "alice again").await;
    // Someone joining now is told who is speaking (announcements otherwise only on changes).
    let mut dave = Client::join(&srv.ws_url, &srv.token(room, "dave", "subscribe"), None).await;
    expect_speakers(&mut dave, &[&a], "dave joins while alice speaks").await;
    alice.leave().await;
    expect_speakers(&mut carol, &[], "alice left").await;
    srv.stop().await;
}
