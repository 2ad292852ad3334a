//! Smoke scenario against a real Warbler (started in-process on loopback): 2 publishers with
//! H.264 + Opus, 6 subscribers, a few seconds of media; everyone connects, every track delivers,
//! and loss is near zero. The long benchmarks live in `bench.sh`, not here.

use std::time::Duration;

use warbler_loadtest::cli::build_library;
use warbler_loadtest::scenario::{self, Scenario, Target, TargetKind};
use warbler_loadtest::world::Kind;
use warbler_signaling::config::Config;
use warbler_signaling::server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_two_publishers_six_subscribers_on_warbler() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        rtc_port: 0,
        public_ip: vec!["127.0.0.1".parse().unwrap()],
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let server = server::start(cfg).await.expect("warbler starts");
    let target = Target { kind: TargetKind::Warbler, base: format!("http://{}", server.http_addr), pid: None, bind_ip: [127, 0, 0, 1].into() };
    let sc = Scenario { duration_s: 8.0, ..Scenario::preset("smoke").unwrap() };
    let lib = build_library(&sc).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(90), scenario::run(&sc, &target, lib, "smoke", 1000, false))
        .await
        .expect("scenario finishes in time")
        .expect("scenario runs");
    server.stop().await;

    assert_eq!(r.failed_participants, 0, "{r:#?}");
    // 6 subscribers × 2 publishers, and each publisher receives the other: 14 of each kind.
    assert_eq!((r.audio_tracks, r.video_tracks), (14, 14), "tracks: {:#?}", r.tracks);
    for t in &r.tracks {
        assert!(t.packets > 0, "a track delivered nothing: {t:#?}");
    }
    // Audio alone is 50 packets/s per track: 14 tracks for 8 s is 5600.
    assert!(r.delivered_packets > 5_000, "delivered {}", r.delivered_packets);
    assert!(r.loss_pct < 1.0, "loss {}% ({} of {})", r.loss_pct, r.lost_packets, r.expected_packets);
    assert!(r.latency_ms.count > r.delivered_packets / 2, "latency matched for {} of {}", r.latency_ms.count, r.delivered_packets);
    assert!(r.latency_ms.p50 < 200.0, "latency p50 {} ms", r.latency_ms.p50);
    assert!(r.tracks.iter().filter(|t| t.kind == Kind::Video).all(|t| t.frames > 0), "video frames completed");
    assert!(r.time_to_first_packet_ms.count >= 28);
}
