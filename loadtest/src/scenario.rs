//! Scenarios (N rooms × P publishers × S subscribers, with presets), and one run of a scenario
//! against one target: join at a bounded rate, wait until media flows, warm up, measure for the
//! configured duration (sampling the SFU's and the tester's CPU from `/proc` once a second),
//! then leave and collect the results.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::media::{LayerSpec, Library};
use crate::sysmon::{self, ProcSample};
use crate::world::{Percentiles, PublishSpec, Snapshot, TrackResult, World, WorldHandle};

/// Bound on waiting for everyone to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(45);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scenario {
    pub name: String,
    pub rooms: usize,
    pub publishers: usize,
    pub subscribers: usize,
    pub audio: bool,
    /// Video layers each publisher sends (empty: audio only; three: simulcast).
    pub video: Vec<Layer>,
    /// Chat messages per publisher per second on the `chat` data channel (0: none).
    pub chat_rate: f64,
    /// Subscribers leaving and a new one joining, per second (0: none).
    pub churn_rate: f64,
    pub duration_s: f64,
    pub warmup_s: f64,
    /// Participants joining per second.
    pub join_rate: f64,
    pub loop_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Layer {
    pub rid: String,
    pub width: usize,
    pub height: usize,
    pub fps: u32,
    pub kbps: u32,
}

impl Layer {
    fn new(rid: &str, width: usize, height: usize, kbps: u32) -> Self {
        Self { rid: rid.into(), width, height, fps: 30, kbps }
    }
}

pub const PRESETS: &[&str] = &["smoke", "audio", "video", "simulcast", "livestream", "chat", "churn"];

impl Scenario {
    pub fn preset(name: &str) -> Result<Self> {
        let base = Scenario {
            name: name.into(),
            rooms: 1,
            publishers: 2,
            subscribers: 6,
            audio: true,
            video: vec![Layer::new("f", 640, 360, 500)],
            chat_rate: 0.0,
            churn_rate: 0.0,
            duration_s: 30.0,
            warmup_s: 3.0,
            join_rate: 20.0,
            loop_s: 4.0,
        };
        Ok(match name {
            "smoke" => Scenario { video: vec![Layer::new("f", 320, 180, 300)], duration_s: 10.0, warmup_s: 2.0, ..base },
            "audio" => Scenario { rooms: 4, publishers: 4, subscribers: 16, video: vec![], ..base },
            "video" => Scenario { rooms: 2, publishers: 2, subscribers: 20, ..base },
            "simulcast" => Scenario {
                rooms: 2,
                publishers: 2,
                subscribers: 10,
                video: vec![Layer::new("q", 320, 180, 150), Layer::new("h", 640, 360, 500), Layer::new("f", 1280, 720, 1500)],
                ..base
            },
            "livestream" => Scenario { rooms: 1, publishers: 1, subscribers: 100, video: vec![Layer::new("f", 640, 360, 800)], ..base },
            "chat" => Scenario { rooms: 1, publishers: 10, subscribers: 10, video: vec![], chat_rate: 10.0, ..base },
            "churn" => Scenario { rooms: 1, publishers: 2, subscribers: 20, churn_rate: 2.0, ..base },
            other => bail!("unknown scenario {other:?} (known: {})", PRESETS.join(", ")),
        })
    }

    pub fn layer_specs(&self) -> Vec<LayerSpec> {
        let simulcast = self.video.len() > 1;
        self.video
            .iter()
            .map(|l| LayerSpec {
                rid: simulcast.then(|| l.rid.clone()),
                width: l.width,
                height: l.height,
                fps: l.fps,
                bitrate_bps: l.kbps * 1000,
            })
            .collect()
    }

    pub fn describe(&self) -> String {
        let video = match self.video.len() {
            0 => "audio only".to_string(),
            1 => format!("{}x{} {} kbps", self.video[0].width, self.video[0].height, self.video[0].kbps),
            n => format!("{n}-layer simulcast up to {}x{}", self.video[n - 1].width, self.video[n - 1].height),
        };
        let mut s = format!("{} rooms × {} publishers × {} subscribers, {video}", self.rooms, self.publishers, self.subscribers);
        if self.chat_rate > 0.0 {
            s += &format!(", chat {}/s per publisher", self.chat_rate);
        }
        if self.churn_rate > 0.0 {
            s += &format!(", churn {}/s", self.churn_rate);
        }
        s
    }
}

/// One simulated participant as signaling sees it.
#[derive(Clone, Debug)]
pub struct Participant {
    pub room: String,
    pub janus_room: u64,
    pub identity: String,
    pub publish: Option<PublishSpec>,
    pub publisher_index: Option<usize>,
}

#[derive(Clone, Debug)]
pub struct ParticipantOutcome {
    pub publisher_peer: Option<usize>,
    pub janus_feed: Option<u64>,
}

/// `p12` → 12: publishers are named by their global index.
pub fn publisher_index(identity: &str) -> Option<usize> {
    identity.strip_prefix('p')?.parse().ok()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Warbler,
    Janus,
}

/// Where the SFU under test is.
#[derive(Clone, Debug)]
pub struct Target {
    pub kind: TargetKind,
    /// `http://host:port` of Warbler, or Janus's HTTP transport.
    pub base: String,
    /// The SFU's process, for CPU and memory.
    pub pid: Option<u32>,
    /// The address the simulated peers bind to.
    pub bind_ip: IpAddr,
}

#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub t: f64,
    pub rx_pps: f64,
    pub rx_kbps: f64,
    pub tx_pps: f64,
    pub loss_pct: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub sfu_cpu_pct: f64,
    pub tester_cpu_pct: f64,
    pub sfu_rss_mb: f64,
    pub subscribers_connected: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub target: TargetKind,
    pub scenario: Scenario,
    pub description: String,
    pub started_unix: u64,
    pub measured_s: f64,
    pub load_average: String,
    pub publishers: usize,
    pub subscribers: usize,
    pub failed_participants: usize,
    pub failed_peers: u64,
    pub sfu_pid: Option<u32>,
    pub sfu_cpu_s: f64,
    /// SFU CPU as a fraction of one core over the measurement.
    pub sfu_cores: f64,
    pub sfu_rss_mb_end: f64,
    pub sfu_rss_mb_max: f64,
    pub tester_cpu_s: f64,
    pub tester_cores: f64,
    pub sent_packets: u64,
    pub delivered_packets: u64,
    pub delivered_pps: f64,
    pub delivered_kbps: f64,
    pub lost_packets: u64,
    pub expected_packets: u64,
    pub loss_pct: f64,
    /// SFU CPU µs per packet delivered to a subscriber.
    pub sfu_us_per_forwarded_packet: f64,
    /// Delivered packets per second per core of SFU CPU.
    pub forwarded_pps_per_core: f64,
    /// Tester CPU µs per packet it received or sent.
    pub tester_us_per_packet: f64,
    pub latency_ms: Percentiles,
    pub jitter_ms: Percentiles,
    pub time_to_first_packet_ms: Percentiles,
    pub freezes: u64,
    pub frozen_ms: f64,
    pub video_tracks: usize,
    /// Video tracks by the highest layer they received (simulcast): count per layer index.
    pub video_layers_received: BTreeMap<u8, usize>,
    pub audio_tracks: usize,
    pub chat_sent: u64,
    pub chat_received: u64,
    pub ambiguous_payloads: usize,
    /// SRTP protection profiles the connections negotiated.
    pub srtp_ciphers: BTreeMap<String, usize>,
    pub unmatched_packets: u64,
    /// The server's own count of forwarded RTP packets (Warbler `/metrics`), when available.
    pub server_forwarded_packets: Option<f64>,
    pub metrics_delta: BTreeMap<String, f64>,
    pub timeseries: Vec<Sample>,
    /// Per track results (left out above 400 tracks to keep the file small).
    pub tracks: Vec<TrackResult>,
}

struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<()>>,
}

struct Ctx {
    world: WorldHandle,
    http: reqwest::Client,
    target: Target,
    feeds: Vec<watch::Sender<Option<Vec<(u64, String)>>>>,
}

impl Ctx {
    fn spawn(&self, p: Participant, room_idx: usize) -> (Running, oneshot::Receiver<ParticipantOutcome>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = oneshot::channel();
        let world = self.world.clone();
        let http = self.http.clone();
        let base = self.target.base.clone();
        let ip = self.target.bind_ip;
        let task = match self.target.kind {
            TargetKind::Warbler => tokio::spawn(crate::warbler::run_participant(world, http, base, ip, p, stop_rx, ready_tx)),
            TargetKind::Janus => {
                let feeds = self.feeds[room_idx].subscribe();
                tokio::spawn(crate::janus::run_participant(world, http, base, ip, p, feeds, stop_rx, ready_tx))
            }
        };
        (Running { stop: stop_tx, task }, ready_rx)
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

/// Runs `sc` against `target`. `tag` makes room names unique across runs against one server.
pub async fn run(sc: &Scenario, target: &Target, lib: Arc<Library>, tag: &str, janus_room_base: u64, progress: bool) -> Result<RunResult> {
    let total_pubs = sc.rooms * sc.publishers;
    let (world, world_thread) = World::spawn(lib.clone(), total_pubs.max(1), false)?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    let mut feeds = Vec::new();
    for _ in 0..sc.rooms {
        feeds.push(watch::channel(None).0);
    }
    let ctx = Ctx { world: world.clone(), http: http.clone(), target: target.clone(), feeds };
    if target.kind == TargetKind::Janus {
        for r in 0..sc.rooms {
            crate::janus::create_room(&http, &target.base, janus_room_base + r as u64, sc.publishers + 1).await.context("creating Janus room")?;
        }
    }
    if sc.chat_rate > 0.0 {
        let rate = sc.chat_rate;
        world.call(move |w| w.set_chat_rate(rate)).await?;
    }
    let join_gap = Duration::from_secs_f64(1.0 / sc.join_rate.max(0.1));
    let spec = PublishSpec {
        audio: sc.audio,
        video_layers: (0..sc.video.len()).collect(),
        data_channel: (sc.chat_rate > 0.0).then(|| "chat".to_string()),
    };
    let room_name = |r: usize| format!("{tag}-r{r}");

    // Publishers first (Janus requires them to be up before anyone subscribes).
    let mut running: Vec<Running> = Vec::new();
    let mut pub_ready = Vec::new();
    for r in 0..sc.rooms {
        for i in 0..sc.publishers {
            let idx = r * sc.publishers + i;
            let p = Participant {
                room: room_name(r),
                janus_room: janus_room_base + r as u64,
                identity: format!("p{idx}"),
                publish: Some(spec.clone()),
                publisher_index: Some(idx),
            };
            let (run, ready) = ctx.spawn(p, r);
            running.push(run);
            pub_ready.push((r, format!("p{idx}"), ready));
            tokio::time::sleep(join_gap).await;
        }
    }
    let mut failed = 0usize;
    let mut pub_keys = Vec::new();
    let mut room_feeds: Vec<Vec<(u64, String)>> = vec![Vec::new(); sc.rooms];
    for (r, ident, ready) in pub_ready {
        match tokio::time::timeout(CONNECT_TIMEOUT, ready).await {
            Ok(Ok(o)) => {
                if let Some(k) = o.publisher_peer {
                    pub_keys.push(k);
                }
                if let Some(f) = o.janus_feed {
                    room_feeds[r].push((f, ident));
                }
            }
            _ => failed += 1,
        }
    }
    wait_connected(&world, &pub_keys).await;
    for (r, f) in room_feeds.into_iter().enumerate() {
        let _ = ctx.feeds[r].send(Some(f));
    }

    // Subscribers.
    let mut subs: Vec<(usize, Running)> = Vec::new();
    let mut next_sub = 0usize;
    for r in 0..sc.rooms {
        for _ in 0..sc.subscribers {
            let p = Participant { room: room_name(r), janus_room: janus_room_base + r as u64, identity: format!("s{next_sub}"), publish: None, publisher_index: None };
            next_sub += 1;
            let (run, _) = ctx.spawn(p, r);
            subs.push((r, run));
            tokio::time::sleep(join_gap).await;
        }
    }
    // Wait until every receiving connection is up (bounded).
    let expected_subs = sc.rooms * sc.subscribers + if sc.publishers > 1 { total_pubs } else { 0 };
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        let s = world.call(|w| w.snapshot()).await?;
        if s.subscribers_connected >= expected_subs || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs_f64(sc.warmup_s)).await;

    // Measure.
    world.call(|w| w.reset_measurements()).await?;
    let _ = world.call(|w| w.snapshot()).await?;
    let metrics_url = (target.kind == TargetKind::Warbler).then(|| format!("{}/metrics", target.base));
    let metrics_before = scrape(&http, metrics_url.as_deref()).await;
    let sfu_pid = target.pid.map(|p| p.to_string());
    let sfu0 = sfu_pid.as_deref().and_then(sysmon::sample);
    let me0 = sysmon::sample("self");
    let t0 = Instant::now();
    let started_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new(sc.duration_s.ceil() as u64);
        b.set_style(indicatif::ProgressStyle::with_template("{prefix} [{bar:20}] {pos}/{len}s {msg}").expect("static template"));
        b.set_prefix(format!("{:?} {}", target.kind, sc.name));
        b
    });
    let mut series = Vec::new();
    let mut prev: (Snapshot, Option<ProcSample>, Option<ProcSample>, Instant) = (Snapshot::default(), sfu0, me0, t0);
    let mut rss_max = sfu0.map_or(0, |s| s.rss_bytes);
    let churn_gap = (sc.churn_rate > 0.0).then(|| Duration::from_secs_f64(1.0 / sc.churn_rate));
    let mut next_churn = churn_gap.map(|g| t0 + g);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
    let end = t0 + Duration::from_secs_f64(sc.duration_s);
    let mut retired: Vec<Running> = Vec::new();
    while Instant::now() < end {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(next_churn.map_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600), tokio::time::Instant::from_std)) => {
                // Churn: the oldest subscriber leaves, a new one joins the same room.
                if !subs.is_empty() {
                    let (r, old) = subs.remove(0);
                    let _ = old.stop.send(true);
                    retired.push(old);
                    let p = Participant { room: room_name(r), janus_room: janus_room_base + r as u64, identity: format!("s{next_sub}"), publish: None, publisher_index: None };
                    next_sub += 1;
                    let (run, _) = ctx.spawn(p, r);
                    subs.push((r, run));
                }
                next_churn = next_churn.zip(churn_gap).map(|(t, g)| t + g);
                continue;
            }
        }
        let now = Instant::now();
        let snap = world.call(|w| w.snapshot()).await?;
        let sfu = sfu_pid.as_deref().and_then(sysmon::sample);
        let me = sysmon::sample("self");
        let dt = now.duration_since(prev.3).as_secs_f64().max(1e-3);
        let cpu_pct = |a: Option<ProcSample>, b: Option<ProcSample>| match (a, b) {
            (Some(a), Some(b)) => (b.cpu_seconds - a.cpu_seconds) / dt * 100.0,
            _ => 0.0,
        };
        let d_exp = snap.expected.saturating_sub(prev.0.expected);
        let d_lost = snap.lost.saturating_sub(prev.0.lost);
        let sample = Sample {
            t: now.duration_since(t0).as_secs_f64(),
            rx_pps: (snap.rx_packets - prev.0.rx_packets) as f64 / dt,
            rx_kbps: (snap.rx_bytes - prev.0.rx_bytes) as f64 * 8.0 / dt / 1000.0,
            tx_pps: (snap.tx_packets - prev.0.tx_packets) as f64 / dt,
            loss_pct: if d_exp > 0 { d_lost as f64 * 100.0 / d_exp as f64 } else { 0.0 },
            latency_p50_ms: snap.interval_latency.p50,
            latency_p99_ms: snap.interval_latency.p99,
            sfu_cpu_pct: cpu_pct(prev.1, sfu),
            tester_cpu_pct: cpu_pct(prev.2, me),
            sfu_rss_mb: sfu.map_or(0.0, |s| s.rss_bytes as f64 / 1e6),
            subscribers_connected: snap.subscribers_connected,
        };
        rss_max = rss_max.max(sfu.map_or(0, |s| s.rss_bytes));
        if let Some(b) = &bar {
            b.set_position(sample.t.round() as u64);
            b.set_message(format!(
                "subs {} rx {:.0} pps {:.1} Mbps loss {:.2}% p99 {:.1} ms sfu {:.0}% tester {:.0}%",
                sample.subscribers_connected,
                sample.rx_pps,
                sample.rx_kbps / 1000.0,
                sample.loss_pct,
                sample.latency_p99_ms,
                sample.sfu_cpu_pct,
                sample.tester_cpu_pct
            ));
        }
        series.push(sample);
        prev = (snap, sfu, me, now);
    }
    let measured = t0.elapsed().as_secs_f64();
    let sfu1 = sfu_pid.as_deref().and_then(sysmon::sample);
    let me1 = sysmon::sample("self");
    let metrics_after = scrape(&http, metrics_url.as_deref()).await;
    let snap = world.call(|w| w.snapshot()).await?;
    let (tracks, latency, jitter) = world.call(|w| w.results()).await?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }

    // Leave (bounded), then stop the media thread.
    for r in running.iter().chain(subs.iter().map(|(_, r)| r)).chain(retired.iter()) {
        let _ = r.stop.send(true);
    }
    let leave_deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for r in running.into_iter().chain(subs.into_iter().map(|(_, r)| r)).chain(retired) {
        match tokio::time::timeout_at(leave_deadline, r.task).await {
            Ok(Ok(Err(_))) => failed += 1,
            Ok(_) => {}
            Err(_) => {}
        }
    }
    let _ = world.call(|w| w.stop()).await;
    let _ = tokio::task::spawn_blocking(move || world_thread.join()).await;

    let sfu_cpu = match (sfu0, sfu1) {
        (Some(a), Some(b)) => b.cpu_seconds - a.cpu_seconds,
        _ => 0.0,
    };
    let tester_cpu = match (me0, me1) {
        (Some(a), Some(b)) => b.cpu_seconds - a.cpu_seconds,
        _ => 0.0,
    };
    let delivered = snap.rx_packets;
    let mut ttfp = crate::measure::new_histogram();
    for t in &tracks {
        if let Some(ms) = t.time_to_first_packet_ms {
            ttfp.saturating_record((ms * 1000.0).max(1.0) as u64);
        }
    }
    let metrics_delta = match (&metrics_before, &metrics_after) {
        (Some(a), Some(b)) => sysmon::metrics_delta(a, b),
        _ => BTreeMap::new(),
    };
    let server_forwarded = (!metrics_delta.is_empty()).then(|| sysmon::metric_sum(&metrics_delta, "warbler_rtp_packets_forwarded_total"));
    Ok(RunResult {
        target: target.kind,
        scenario: sc.clone(),
        description: sc.describe(),
        started_unix,
        measured_s: measured,
        load_average: load_average(),
        publishers: total_pubs,
        subscribers: sc.rooms * sc.subscribers,
        failed_participants: failed,
        failed_peers: snap.failed_peers,
        sfu_pid: target.pid,
        sfu_cpu_s: sfu_cpu,
        sfu_cores: sfu_cpu / measured,
        sfu_rss_mb_end: sfu1.map_or(0.0, |s| s.rss_bytes as f64 / 1e6),
        sfu_rss_mb_max: rss_max as f64 / 1e6,
        tester_cpu_s: tester_cpu,
        tester_cores: tester_cpu / measured,
        sent_packets: snap.tx_packets,
        delivered_packets: delivered,
        delivered_pps: delivered as f64 / measured,
        delivered_kbps: snap.rx_bytes as f64 * 8.0 / measured / 1000.0,
        lost_packets: snap.lost,
        expected_packets: snap.expected,
        loss_pct: if snap.expected > 0 { snap.lost as f64 * 100.0 / snap.expected as f64 } else { 0.0 },
        sfu_us_per_forwarded_packet: if delivered > 0 { sfu_cpu * 1e6 / delivered as f64 } else { 0.0 },
        forwarded_pps_per_core: if sfu_cpu > 0.0 { delivered as f64 / sfu_cpu } else { 0.0 },
        tester_us_per_packet: if delivered + snap.tx_packets > 0 { tester_cpu * 1e6 / (delivered + snap.tx_packets) as f64 } else { 0.0 },
        latency_ms: latency,
        jitter_ms: jitter,
        time_to_first_packet_ms: Percentiles::from_us(&ttfp),
        freezes: tracks.iter().map(|t| t.freezes).sum(),
        frozen_ms: tracks.iter().map(|t| t.frozen_ms).sum(),
        video_tracks: tracks.iter().filter(|t| t.kind == crate::world::Kind::Video).count(),
        video_layers_received: tracks.iter().filter_map(|t| t.layers.iter().max().copied()).fold(BTreeMap::new(), |mut m, l| {
            *m.entry(l).or_insert(0) += 1;
            m
        }),
        audio_tracks: tracks.iter().filter(|t| t.kind == crate::world::Kind::Audio).count(),
        chat_sent: snap.chat_sent,
        chat_received: snap.chat_received,
        ambiguous_payloads: lib.ambiguous,
        srtp_ciphers: snap.srtp_ciphers.clone(),
        unmatched_packets: tracks.iter().map(|t| t.unmatched).sum(),
        server_forwarded_packets: server_forwarded,
        metrics_delta,
        timeseries: series,
        tracks: if tracks.len() <= 400 { tracks } else { Vec::new() },
    })
}

async fn wait_connected(world: &WorldHandle, keys: &[usize]) {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    while Instant::now() < deadline {
        let keys = keys.to_vec();
        let all = world.call(move |w| keys.iter().all(|k| w.is_connected(*k) || w.is_failed(*k))).await.unwrap_or(true);
        if all {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn scrape(http: &reqwest::Client, url: Option<&str>) -> Option<BTreeMap<String, f64>> {
    let text = http.get(url?).send().await.ok()?.text().await.ok()?;
    Some(sysmon::parse_prometheus(&text))
}
