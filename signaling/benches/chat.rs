//! Chat storage benchmark (not a test; run in release):
//!
//! ```text
//! cargo bench -p warbler-signaling --bench chat -- [--writers 256] [--messages 200000]
//!     [--search-messages 1000000] [--dir PATH] [--skip-write] [--skip-search]
//! ```
//!
//! 1. Durable writes: `--writers` concurrent clients each post in a closed loop (send, wait for
//!    the durable ack, send the next) through `ChatService` — validation, the group-commit writer
//!    and SQLite with `synchronous=FULL` on a real disk — with no network transport. Reports
//!    messages/s and ack latency p50/p99/max.
//! 2. Search: bulk-loads `--search-messages` mixed English/Chinese messages into one room, then
//!    times a set of queries (3+ character terms on the trigram index, 1-2 character terms on the
//!    gram index, multi-term, absent terms). Reports p50/p99 per class and overall.
//!
//! 1b. The same path open loop (`--rates 10000,20000 --seconds 10`): messages arrive at a fixed
//!    rate and ack latency is measured from each message's scheduled time.
//!
//! Goals (issue 4): ≥ 20,000 durable messages/s, ack p99 < 20 ms, search p99 < 50 ms over ≥ 1M.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use warbler_sfu::ids::{ParticipantId, RoomName};
use warbler_signaling::chat::service::Actor;
use warbler_signaling::chat::sqlite::SqliteStore;
use warbler_signaling::chat::store::ChatStore;
use warbler_signaling::chat::text::{SearchQuery, mentions};
use warbler_signaling::chat::transport::{DeliveryFailure, Member, Transport};
use warbler_signaling::chat::writer::system_clock;
use warbler_signaling::chat::{Author, ChatConfig, ChatService, ClientMsgId, WriteOp};

struct NoTransport;

impl Transport for NoTransport {
    fn members(&self, _room: &RoomName) -> BoxFuture<'static, Vec<Member>> {
        Box::pin(async { vec![] })
    }
    fn send(&self, _to: Vec<ParticipantId>, _text: Bytes) -> BoxFuture<'static, Vec<(ParticipantId, DeliveryFailure)>> {
        Box::pin(async { vec![] })
    }
}

struct Args {
    writers: usize,
    messages: usize,
    search_messages: usize,
    dir: Option<std::path::PathBuf>,
    write: bool,
    search: bool,
    /// Open-loop rates (messages/s) to measure ack latency at.
    rates: Vec<u64>,
    seconds: u64,
}

fn args() -> Args {
    let mut a = Args { writers: 256, messages: 200_000, search_messages: 1_000_000, dir: None, write: true, search: true, rates: vec![10_000, 20_000], seconds: 10 };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--writers" => a.writers = it.next().and_then(|v| v.parse().ok()).expect("--writers N"),
            "--messages" => a.messages = it.next().and_then(|v| v.parse().ok()).expect("--messages N"),
            "--search-messages" => a.search_messages = it.next().and_then(|v| v.parse().ok()).expect("--search-messages N"),
            "--dir" => a.dir = it.next().map(Into::into),
            "--skip-write" => a.write = false,
            "--skip-search" => a.search = false,
            "--rates" => a.rates = it.next().map(|v| v.split(',').filter_map(|r| r.parse().ok()).collect()).expect("--rates R1,R2"),
            "--seconds" => a.seconds = it.next().and_then(|v| v.parse().ok()).expect("--seconds N"),
            // cargo bench passes --bench
            _ => {}
        }
    }
    a
}

const EN: &[&str] = &[
    "the", "a", "to", "and", "is", "it", "we", "you", "that", "for", "on", "with", "this", "be", "are", "have", "not", "at", "can", "will", "just",
    "so", "but", "what", "all", "do", "if", "about", "get", "one", "now", "time", "there", "some", "out", "up", "when", "how", "think", "know",
    "good", "new", "today", "tomorrow", "meeting", "call", "video", "audio", "server", "client", "deploy", "deployment", "finished", "started",
    "build", "green", "red", "release", "latency", "packet", "loss", "bandwidth", "camera", "microphone", "screen", "share", "room", "chat",
    "message", "search", "index", "database", "commit", "review", "merge", "branch", "test", "failed", "passed", "bug", "fix", "issue", "ticket",
    "lunch", "coffee", "weekend", "thanks", "please", "sorry", "great", "nice", "cool", "okay", "yes", "no", "maybe", "later", "soon", "rust",
    "python", "browser", "firefox", "chromium", "network", "router", "simulcast", "layer", "keyframe", "codec", "opus", "h264", "vp8", "metrics",
    "dashboard", "alert", "pager", "incident", "rollback", "hotfix", "staging", "production", "customer", "demo", "slides", "agenda", "notes",
];
const ZH: &[&str] = &[
    "你好", "世界", "今天", "明天", "昨天", "会议", "部署", "完成", "开始", "服务器", "客户端", "视频", "音频", "网络", "延迟", "丢包", "带宽",
    "摄像头", "麦克风", "屏幕", "共享", "房间", "聊天", "消息", "搜索", "数据库", "提交", "代码", "审查", "合并", "测试", "失败", "通过", "问题",
    "修复", "发布", "版本", "午饭", "咖啡", "周末", "谢谢", "请", "对不起", "很好", "不错", "可以", "是的", "也许", "稍后", "马上", "我们", "你们",
    "他们", "这个", "那个", "什么", "怎么", "为什么", "因为", "所以", "但是", "已经", "还是", "一起", "项目", "计划", "时间", "上午", "下午", "晚上",
    "北京", "上海", "深圳", "东京", "用户", "产品", "设计", "文档", "报告", "数据", "分析", "结果", "性能", "优化", "监控", "告警", "事故", "回滚",
];

/// Zipf-like pick: low indices are much more frequent.
fn pick<'a>(rng: &mut StdRng, words: &[&'a str]) -> &'a str {
    let u: f64 = rng.random();
    let i = ((words.len() as f64).powf(u) - 1.0) as usize;
    words[i.min(words.len() - 1)]
}

fn message(rng: &mut StdRng) -> String {
    let kind: f64 = rng.random();
    if kind < 0.5 {
        let n = rng.random_range(4..20);
        (0..n).map(|_| pick(rng, EN)).collect::<Vec<_>>().join(" ")
    } else if kind < 0.9 {
        let n = rng.random_range(3..12);
        (0..n).map(|_| pick(rng, ZH)).collect::<String>()
    } else {
        let n = rng.random_range(3..10);
        (0..n).map(|i| if i % 2 == 0 { pick(rng, EN).to_owned() } else { pick(rng, ZH).to_owned() }).collect::<Vec<_>>().join(" ")
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn bench_writes(a: &Args, dir: &std::path::Path) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let registry = prometheus::Registry::new();
        let store = Arc::new(SqliteStore::open(dir).unwrap());
        let cfg = ChatConfig { messages_per_second: u32::MAX, burst: u32::MAX, ..ChatConfig::default() };
        let svc = ChatService::start(cfg, store, Arc::new(NoTransport), &registry, system_clock()).unwrap();
        let per_writer = a.messages / a.writers;
        // Warm-up: create the rooms.
        for r in 0..8 {
            let actor = Actor { room: RoomName(format!("room{r}")), identity: "warmup".into(), name: "w".into(), chat: true, admin: false, participant: None };
            svc.post(&actor, "warmup", "warm up", None).unwrap().await.unwrap();
        }
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..a.writers {
            let svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(w as u64);
                let actor = Actor { room: RoomName(format!("room{}", w % 8)), identity: format!("writer{w}"), name: format!("Writer {w}"), chat: true, admin: false, participant: None };
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                for i in 0..per_writer {
                    let text = message(&mut rng);
                    let t = Instant::now();
                    svc.post(&actor, &format!("{w}-{i}"), &text, None).unwrap().await.unwrap();
                    h.record(t.elapsed().as_micros().max(1) as u64).unwrap();
                }
                h
            }));
        }
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for t in tasks {
            h.add(t.await.unwrap()).unwrap();
        }
        let elapsed = started.elapsed();
        let n = (per_writer * a.writers) as f64;
        let batches = registry.gather().into_iter().find(|f| f.name() == "warbler_chat_batch_size").map(|f| {
            let hist = f.get_metric()[0].get_histogram();
            (hist.get_sample_count(), hist.get_sample_sum())
        });
        let commit = registry.gather().into_iter().find(|f| f.name() == "warbler_chat_store_seconds").map(|f| {
            let hist = f.get_metric()[0].get_histogram();
            hist.get_sample_sum() / hist.get_sample_count().max(1) as f64 * 1000.0
        });
        println!("== durable writes: {} writers × {} messages, 8 rooms, closed loop, synchronous=FULL", a.writers, per_writer);
        println!("   {:.0} durable messages/s ({} in {:.2} s)", n / elapsed.as_secs_f64(), n, elapsed.as_secs_f64());
        println!("   ack latency p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms", ms(h.value_at_quantile(0.5)), ms(h.value_at_quantile(0.9)), ms(h.value_at_quantile(0.99)), ms(h.max()));
        if let (Some((count, sum)), Some(commit_ms)) = (batches, commit) {
            println!("   {count} group commits, mean batch {:.0} writes, mean commit (incl. fsync) {commit_ms:.2} ms", sum / count.max(1) as f64);
        }
    });
}

/// Open loop: messages arrive at a fixed `rate` whatever the server does (from 256 identities in 8
/// rooms); latency is measured from each message's scheduled send time, so queueing behind a slow
/// commit is counted (no coordinated omission).
fn bench_open_loop(rate: u64, seconds: u64, dir: &std::path::Path) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let registry = prometheus::Registry::new();
        let store = Arc::new(SqliteStore::open(dir).unwrap());
        let cfg = ChatConfig { messages_per_second: u32::MAX, burst: u32::MAX, ..ChatConfig::default() };
        let svc = ChatService::start(cfg, store, Arc::new(NoTransport), &registry, system_clock()).unwrap();
        let actors: Vec<Actor> = (0..256)
            .map(|w| Actor { room: RoomName(format!("room{}", w % 8)), identity: format!("writer{w}"), name: format!("Writer {w}"), chat: true, admin: false, participant: None })
            .collect();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let total = rate * seconds;
        let mut rng = StdRng::seed_from_u64(rate);
        let start = tokio::time::Instant::now();
        let mut sent = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        while sent < total {
            tick.tick().await;
            let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
            while sent < due {
                let scheduled = start + Duration::from_secs_f64(sent as f64 / rate as f64);
                let actor = &actors[(sent % 256) as usize];
                let pending = svc.post(actor, &format!("o{sent}"), &message(&mut rng), None).unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    pending.await.unwrap();
                    let _ = tx.send(scheduled.elapsed().as_micros().max(1) as u64);
                });
                sent += 1;
            }
        }
        drop(tx);
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        while let Some(us) = rx.recv().await {
            h.record(us).unwrap();
        }
        let elapsed = start.elapsed().as_secs_f64();
        let commits = registry.gather().into_iter().find(|f| f.name() == "warbler_chat_batch_size").map(|f| f.get_metric()[0].get_histogram().get_sample_count()).unwrap_or(0);
        let slow_commits = registry
            .gather()
            .into_iter()
            .find(|f| f.name() == "warbler_chat_store_seconds")
            .map(|f| {
                let hist = f.get_metric()[0].get_histogram();
                let under = |le: f64| hist.get_bucket().iter().find(|b| (b.upper_bound() - le).abs() < 1e-9).map_or(0, |b| b.cumulative_count());
                (hist.get_sample_count() - under(0.02), hist.get_sample_count() - under(0.1))
            })
            .unwrap_or_default();
        println!(
            "== open loop at {rate} msgs/s for {seconds} s: {} durable in {elapsed:.2} s; ack latency p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms; {commits} commits (mean batch {:.0}; {} over 20 ms, {} over 100 ms)",
            h.len(),
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.9)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max()),
            h.len() as f64 / commits.max(1) as f64,
            slow_commits.0,
            slow_commits.1
        );
    });
}

fn bench_search(a: &Args, dir: &std::path::Path) {
    let store = SqliteStore::open(dir).unwrap();
    let room = RoomName("big".into());
    let mut rng = StdRng::seed_from_u64(42);
    let started = Instant::now();
    let batch = 20_000;
    let mut loaded = 0;
    while loaded < a.search_messages {
        let n = batch.min(a.search_messages - loaded);
        let ops: Vec<WriteOp> = (0..n)
            .map(|i| {
                let text = message(&mut rng);
                let who = format!("user{}", rng.random_range(0..50));
                WriteOp::Post {
                    room: room.clone(),
                    mentions: mentions(&text, &who),
                    author: Author { identity: who.clone(), name: who },
                    client_id: ClientMsgId::parse(&format!("load-{}", loaded + i)).unwrap(),
                    text,
                    reply_to: None,
                }
            })
            .collect();
        store.apply(1_764_000_000_000, &ops).unwrap();
        loaded += n;
    }
    let stored_s = started.elapsed().as_secs_f64();
    assert!(store.wait_for_index(Duration::from_secs(1800)), "indexing finishes");
    let load_s = started.elapsed().as_secs_f64();
    let db_mb = std::fs::metadata(store.path()).map(|m| m.len()).unwrap_or(0) as f64 / 1e6;
    let index_mb = std::fs::metadata(store.path().with_file_name(warbler_signaling::chat::sqlite::INDEX_FILE)).map(|m| m.len()).unwrap_or(0) as f64 / 1e6;
    println!(
        "== search over {loaded} messages in one room (stored in {stored_s:.0} s, indexed after {load_s:.0} s: {:.0} msgs/s bulk; messages {db_mb:.0} MB, index {index_mb:.0} MB)",
        loaded as f64 / load_s
    );
    let classes: &[(&str, &[&str])] = &[
        ("english 3+ chars", &["deploy", "latency", "finished", "simulcast", "rollback", "the"]),
        ("chinese 3+ chars", &["服务器", "摄像头", "为什么", "数据库"]),
        ("chinese 1-2 chars", &["世界", "部署", "东京", "会", "请"]),
        ("english 1-2 chars", &["ok", "a", "up"]),
        ("multi-term", &["deploy finished", "部署 完成", "server 世界", "camera 丢包 share"]),
        ("absent", &["xyzzy", "不存在的词"]),
    ];
    let rounds = 30;
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for (class, queries) in classes {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        let mut hits = 0;
        for q in *queries {
            let parsed = SearchQuery::parse(q).unwrap();
            for _ in 0..rounds {
                let t = Instant::now();
                let r = store.search(&room, &parsed, 20, 2000).unwrap();
                let us = t.elapsed().as_micros().max(1) as u64;
                h.record(us).unwrap();
                all.record(us).unwrap();
                hits = hits.max(r.len());
            }
        }
        println!(
            "   {class:<18} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  ({} queries × {rounds})",
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max()),
            queries.len()
        );
        let _ = hits;
    }
    println!("   all queries        p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms", ms(all.value_at_quantile(0.5)), ms(all.value_at_quantile(0.99)), ms(all.max()));
}

fn main() {
    let a = args();
    let base = a.dir.clone().unwrap_or_else(std::env::temp_dir).join(format!("warbler-chat-bench-{}", std::process::id()));
    if a.write {
        let d = base.join("write");
        bench_writes(&a, &d);
        let _ = std::fs::remove_dir_all(&d);
        for &rate in &a.rates {
            let d = base.join(format!("open-{rate}"));
            bench_open_loop(rate, a.seconds, &d);
            let _ = std::fs::remove_dir_all(&d);
        }
    }
    if a.search {
        let d = base.join("search");
        bench_search(&a, &d);
        let _ = std::fs::remove_dir_all(&d);
    }
    let _ = std::fs::remove_dir_all(&base);
}
