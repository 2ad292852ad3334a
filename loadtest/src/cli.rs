//! Command line: `run` one scenario against one target, `compare` one scenario against Warbler
//! and Janus one after the other, `capacity` search for the largest subscriber count that holds.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::media::Library;
use crate::report;
use crate::scenario::{self, RunResult, Scenario, Target, TargetKind};
use crate::servers::{self, Server};

#[derive(Parser)]
#[command(name = "warbler-loadtest", about = "Real media at scale against Warbler and Janus")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one scenario against one target.
    Run(RunArgs),
    /// Run one scenario against Warbler, then Janus, and print the ratios.
    Compare(CompareArgs),
    /// Raise the subscriber count until loss or latency p99 exceed their limits.
    Capacity(CapacityArgs),
    /// List the scenario presets.
    Scenarios,
}

#[derive(Args, Clone, Debug)]
pub struct ScenarioArgs {
    /// Preset: smoke, audio, video, simulcast, livestream, chat, churn.
    #[arg(long, default_value = "video")]
    pub scenario: String,
    #[arg(long)]
    pub rooms: Option<usize>,
    /// Publishers per room.
    #[arg(long)]
    pub publishers: Option<usize>,
    /// Subscribers per room.
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// Seconds measured (after joining and warm-up).
    #[arg(long)]
    pub duration: Option<f64>,
    #[arg(long)]
    pub warmup: Option<f64>,
    /// Participants joining per second.
    #[arg(long)]
    pub join_rate: Option<f64>,
    /// Subscribers replaced per second.
    #[arg(long)]
    pub churn: Option<f64>,
    /// Chat messages per publisher per second.
    #[arg(long)]
    pub chat_rate: Option<f64>,
    /// Video bitrate of a single-layer scenario, kbps.
    #[arg(long)]
    pub video_kbps: Option<u32>,
    /// Audio only (no video).
    #[arg(long)]
    pub audio_only: bool,
}

impl ScenarioArgs {
    pub fn build(&self) -> Result<Scenario> {
        let mut s = Scenario::preset(&self.scenario)?;
        if let Some(v) = self.rooms {
            s.rooms = v;
        }
        if let Some(v) = self.publishers {
            s.publishers = v;
        }
        if let Some(v) = self.subscribers {
            s.subscribers = v;
        }
        if let Some(v) = self.duration {
            s.duration_s = v;
        }
        if let Some(v) = self.warmup {
            s.warmup_s = v;
        }
        if let Some(v) = self.join_rate {
            s.join_rate = v;
        }
        if let Some(v) = self.churn {
            s.churn_rate = v;
        }
        if let Some(v) = self.chat_rate {
            s.chat_rate = v;
        }
        if let Some(k) = self.video_kbps
            && s.video.len() == 1
        {
            s.video[0].kbps = k;
        }
        if self.audio_only {
            s.video.clear();
        }
        anyhow::ensure!(s.rooms >= 1 && s.rooms <= 1000, "rooms must be 1..=1000");
        anyhow::ensure!(s.publishers >= 1 && s.publishers <= 100, "publishers must be 1..=100 per room");
        anyhow::ensure!(s.subscribers <= 5000, "at most 5000 subscribers per room");
        anyhow::ensure!(s.duration_s > 0.0 && s.duration_s <= 3600.0, "duration must be in (0, 3600] s");
        Ok(s)
    }
}

#[derive(Args, Clone, Debug)]
pub struct ServerArgs {
    /// Use a running Warbler at this URL instead of starting one.
    #[arg(long)]
    pub warbler_url: Option<String>,
    /// Its process id (for CPU and memory).
    #[arg(long)]
    pub warbler_pid: Option<u32>,
    /// The warbler binary to start (default: `warbler` next to this binary).
    #[arg(long)]
    pub warbler_bin: Option<PathBuf>,
    /// Use a running Janus (HTTP transport) at this URL instead of starting one.
    #[arg(long)]
    pub janus_url: Option<String>,
    #[arg(long)]
    pub janus_pid: Option<u32>,
    #[arg(long, default_value = "janus")]
    pub janus_bin: String,
    /// Pin the started SFU to this CPU (taskset).
    #[arg(long)]
    pub sfu_cpu: Option<usize>,
    /// HTTP port for a started SFU (Warbler's RTC port is this + 1).
    #[arg(long, default_value_t = 18080)]
    pub port: u16,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[arg(long, value_enum, default_value = "warbler")]
    target: TargetKind,
    #[command(flatten)]
    scenario: ScenarioArgs,
    #[command(flatten)]
    server: ServerArgs,
    /// Directory for the JSON and HTML results.
    #[arg(long, default_value = "loadtest-results")]
    out: PathBuf,
    #[arg(long)]
    no_progress: bool,
    /// Exit non-zero if loss exceeds this percentage.
    #[arg(long)]
    expect_max_loss: Option<f64>,
    /// Exit non-zero if fewer packets than this were delivered to subscribers.
    #[arg(long)]
    expect_min_delivered: Option<u64>,
}

#[derive(Args, Debug)]
struct CompareArgs {
    #[command(flatten)]
    scenario: ScenarioArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[arg(long, default_value = "loadtest-results")]
    out: PathBuf,
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args, Debug)]
struct CapacityArgs {
    /// Targets to search (both by default, one after the other).
    #[arg(long, value_enum, num_args = 1.., default_values = ["warbler", "janus"])]
    targets: Vec<TargetKind>,
    #[command(flatten)]
    scenario: ScenarioArgs,
    #[command(flatten)]
    server: ServerArgs,
    /// First subscriber count per room.
    #[arg(long, default_value_t = 10)]
    start: usize,
    /// Multiply the subscriber count by this each step.
    #[arg(long, default_value_t = 1.5)]
    factor: f64,
    #[arg(long, default_value_t = 2000)]
    max_subscribers: usize,
    #[arg(long, default_value_t = 12)]
    max_steps: usize,
    /// Loss limit, percent.
    #[arg(long, default_value_t = 1.0)]
    loss_limit: f64,
    /// Latency p99 limit, ms.
    #[arg(long, default_value_t = 50.0)]
    p99_limit: f64,
    /// Stop (tester-bound) when the tester uses more than this share of a core.
    #[arg(long, default_value_t = 0.9)]
    tester_limit: f64,
    #[arg(long, default_value = "loadtest-results")]
    out: PathBuf,
    #[arg(long)]
    no_progress: bool,
}

pub fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LOADTEST_LOG").unwrap_or_else(|_| "warn,rtc_dtls=error,rtc=error,rtc_ice=error".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Run(a) => run_cmd(a).await,
        Cmd::Compare(a) => compare_cmd(a).await,
        Cmd::Capacity(a) => capacity_cmd(a).await,
        Cmd::Scenarios => {
            for p in scenario::PRESETS {
                let s = Scenario::preset(p)?;
                println!("{p:11} {} ({} s)", s.describe(), s.duration_s);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn build_library(sc: &Scenario) -> Result<Arc<Library>> {
    let layers = sc.layer_specs();
    let loop_d = Duration::from_secs_f64(sc.loop_s);
    let lib = tokio::task::spawn_blocking(move || Library::build(&layers, loop_d)).await??;
    Ok(Arc::new(lib))
}

/// The target to test: a running server given by URL, or one we start (and stop).
async fn acquire(kind: TargetKind, a: &ServerArgs) -> Result<(Target, Option<Server>)> {
    match kind {
        TargetKind::Warbler => {
            if let Some(url) = &a.warbler_url {
                return Ok((Target { kind, base: url.trim_end_matches('/').to_owned(), pid: a.warbler_pid, bind_ip: [127, 0, 0, 1].into() }, None));
            }
            let bin = match &a.warbler_bin {
                Some(b) => b.clone(),
                None => std::env::current_exe()?.parent().context("exe dir")?.join("warbler"),
            };
            let s = servers::start_warbler(&bin, a.port, a.port + 1, a.sfu_cpu).await?;
            Ok((s.target.clone(), Some(s)))
        }
        TargetKind::Janus => {
            if let Some(url) = &a.janus_url {
                return Ok((Target { kind, base: url.trim_end_matches('/').to_owned(), pid: a.janus_pid, bind_ip: servers::host_ip() }, None));
            }
            let s = servers::start_janus(&a.janus_bin, a.port + 8, a.sfu_cpu).await?;
            Ok((s.target.clone(), Some(s)))
        }
    }
}

fn tag() -> String {
    format!("lt{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// Runs a scenario against a target kind, starting and stopping the server if needed.
async fn run_one(kind: TargetKind, sc: &Scenario, lib: Arc<Library>, a: &ServerArgs, progress: bool) -> Result<RunResult> {
    let (target, server) = acquire(kind, a).await?;
    let r = scenario::run(sc, &target, lib, &tag(), 1000 + u64::from(rand::random::<u16>() % 50_000), progress).await;
    if let Some(s) = server {
        tokio::task::spawn_blocking(move || s.stop()).await?;
    }
    r
}

fn file_stem(kind: TargetKind, sc: &Scenario) -> String {
    format!("{}-{}", sc.name, format!("{kind:?}").to_lowercase())
}

async fn run_cmd(a: RunArgs) -> Result<ExitCode> {
    let sc = a.scenario.build()?;
    eprintln!("{:?} {}: {}", a.target, sc.name, sc.describe());
    let lib = build_library(&sc).await?;
    let r = run_one(a.target, &sc, lib, &a.server, !a.no_progress).await?;
    let stem = file_stem(a.target, &sc);
    report::write_json(&a.out.join(format!("{stem}.json")), &r)?;
    std::fs::write(a.out.join(format!("{stem}.html")), report::html(&format!("warbler-loadtest: {stem}"), &[&r], ""))?;
    println!("{}", report::summary(&r));
    let mut ok = true;
    if let Some(max) = a.expect_max_loss
        && (r.loss_pct > max || r.expected_packets == 0)
    {
        eprintln!("FAIL: loss {:.3}% > {max}% (expected {} packets)", r.loss_pct, r.expected_packets);
        ok = false;
    }
    if let Some(min) = a.expect_min_delivered
        && r.delivered_packets < min
    {
        eprintln!("FAIL: delivered {} < {min} packets", r.delivered_packets);
        ok = false;
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

#[derive(Serialize)]
struct Comparison<'a> {
    scenario: &'a Scenario,
    warbler: &'a RunResult,
    janus: &'a RunResult,
    table: String,
}

async fn compare_cmd(a: CompareArgs) -> Result<ExitCode> {
    let sc = a.scenario.build()?;
    eprintln!("compare {}: {}", sc.name, sc.describe());
    let lib = build_library(&sc).await?;
    let w = run_one(TargetKind::Warbler, &sc, lib.clone(), &a.server, !a.no_progress).await.context("Warbler run")?;
    println!("{}", report::summary(&w));
    let j = run_one(TargetKind::Janus, &sc, lib, &a.server, !a.no_progress).await.context("Janus run")?;
    println!("{}", report::summary(&j));
    let table = report::compare_table(&w, &j);
    println!("\n{table}");
    let stem = format!("compare-{}", sc.name);
    report::write_json(&a.out.join(format!("{stem}.json")), &Comparison { scenario: &sc, warbler: &w, janus: &j, table: table.clone() })?;
    std::fs::write(a.out.join(format!("{stem}.html")), report::html(&format!("Warbler vs Janus: {}", sc.name), &[&w, &j], &table))?;
    std::fs::write(a.out.join(format!("{stem}.md")), &table)?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Clone, Debug, Serialize)]
pub struct CapacityStep {
    pub subscribers_per_room: usize,
    pub delivered_pps: f64,
    pub loss_pct: f64,
    pub latency_p99_ms: f64,
    pub sfu_cores: f64,
    pub tester_cores: f64,
    pub sfu_us_per_forwarded_packet: f64,
    pub held: bool,
    pub why: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct CapacityResult {
    pub target: TargetKind,
    pub scenario: Scenario,
    pub largest_that_held: Option<usize>,
    pub stopped_because: String,
    pub steps: Vec<CapacityStep>,
}

async fn capacity_cmd(a: CapacityArgs) -> Result<ExitCode> {
    let base = a.scenario.build()?;
    if a.factor <= 1.0 {
        bail!("--factor must be > 1");
    }
    let lib = build_library(&base).await?;
    let mut results = Vec::new();
    for &kind in &a.targets {
        let (target, server) = acquire(kind, &a.server).await?;
        let mut steps = Vec::new();
        let mut largest = None;
        let mut subs = a.start.max(1);
        let mut stopped = format!("reached the step limit ({})", a.max_steps);
        for step in 0..a.max_steps {
            if subs > a.max_subscribers {
                stopped = format!("reached --max-subscribers {}", a.max_subscribers);
                break;
            }
            let sc = Scenario { subscribers: subs, name: format!("{}-cap{subs}", base.name), ..base.clone() };
            eprintln!("{kind:?} capacity step {step}: {}", sc.describe());
            let r = scenario::run(&sc, &target, lib.clone(), &tag(), 1000 + step as u64 * 100, !a.no_progress).await?;
            println!("{}", report::summary(&r));
            let mut why = Vec::new();
            if r.loss_pct > a.loss_limit {
                why.push(format!("loss {:.2}% > {}%", r.loss_pct, a.loss_limit));
            }
            if r.latency_ms.p99 > a.p99_limit {
                why.push(format!("p99 {:.1} ms > {} ms", r.latency_ms.p99, a.p99_limit));
            }
            if r.delivered_packets == 0 {
                why.push("no media delivered".into());
            }
            if r.failed_participants > 0 {
                why.push(format!("{} participants failed to join or connect", r.failed_participants));
            }
            let held = why.is_empty();
            let tester_bound = r.tester_cores > a.tester_limit;
            if tester_bound {
                why.push(format!("tester used {:.0}% of a core", r.tester_cores * 100.0));
            }
            steps.push(CapacityStep {
                subscribers_per_room: subs,
                delivered_pps: r.delivered_pps,
                loss_pct: r.loss_pct,
                latency_p99_ms: r.latency_ms.p99,
                sfu_cores: r.sfu_cores,
                tester_cores: r.tester_cores,
                sfu_us_per_forwarded_packet: r.sfu_us_per_forwarded_packet,
                held,
                why: why.join("; "),
            });
            report::write_json(&a.out.join(format!("capacity-{}-{}-{subs}.json", base.name, format!("{kind:?}").to_lowercase())), &r)?;
            if !held {
                stopped = format!("{} subscribers per room: {}", subs, why.join("; "));
                break;
            }
            largest = Some(subs);
            if tester_bound {
                stopped = format!("the tester saturated at {} subscribers per room ({:.0}% of a core): the SFU's limit is higher", subs, r.tester_cores * 100.0);
                break;
            }
            subs = ((subs as f64) * a.factor).ceil() as usize;
            // Let the server settle (departed peers are cleaned up) before the next step.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        if let Some(s) = server {
            tokio::task::spawn_blocking(move || s.stop()).await?;
        }
        println!("{kind:?}: largest subscriber count per room that held: {} (stopped: {stopped})", held_text(largest));
        results.push(CapacityResult { target: kind, scenario: base.clone(), largest_that_held: largest, stopped_because: stopped, steps });
    }
    report::write_json(&a.out.join(format!("capacity-{}.json", base.name)), &results)?;
    let mut md = format!("Capacity search, scenario `{}` ({}), limits: loss ≤ {}%, p99 ≤ {} ms\n\n", base.name, base.describe(), a.loss_limit, a.p99_limit);
    md += "| target | subscribers/room | delivered pkt/s | loss % | p99 ms | SFU core % | tester core % | SFU µs/pkt | held |\n|---|---|---|---|---|---|---|---|---|\n";
    for r in &results {
        for s in &r.steps {
            md += &format!(
                "| {:?} | {} | {:.0} | {:.3} | {:.1} | {:.0} | {:.0} | {:.2} | {} |\n",
                r.target,
                s.subscribers_per_room,
                s.delivered_pps,
                s.loss_pct,
                s.latency_p99_ms,
                s.sfu_cores * 100.0,
                s.tester_cores * 100.0,
                s.sfu_us_per_forwarded_packet,
                if s.held { "yes".to_string() } else { format!("no ({})", s.why) }
            );
        }
    }
    md += "\n";
    for r in &results {
        md += &format!("- {:?}: largest that held: {} subscribers per room — stopped: {}\n", r.target, held_text(r.largest_that_held), r.stopped_because);
    }
    std::fs::write(a.out.join(format!("capacity-{}.md", base.name)), &md)?;
    println!("\n{md}");
    Ok(ExitCode::SUCCESS)
}

/// The capacity found, for people: a count, or "none" when not even the first step held.
fn held_text(largest: Option<usize>) -> String {
    largest.map_or_else(|| "none".to_string(), |n| n.to_string())
}
