//! Starting the SFUs under test as child processes (optionally pinned to a core with
//! `taskset`), waiting until they answer, and stopping them.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::scenario::{Target, TargetKind};

pub struct Server {
    child: Child,
    pub target: Target,
    dir: PathBuf,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(mut self) {
        // SIGTERM lets Warbler drain; Janus exits on it too. Bounded wait, then kill.
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn scratch_dir(what: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("warbler-loadtest-{what}-{}-{:08x}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn command(bin: &str, cpu: Option<usize>) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(bin);
            cmd
        }
        None => Command::new(bin),
    }
}

async fn wait_http(url: &str, within: Duration) -> Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(r) = http.get(url).timeout(Duration::from_secs(2)).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{url} did not answer within {within:?}")
}

/// Starts `warbler serve` on loopback.
pub async fn start_warbler(bin: &Path, http_port: u16, rtc_port: u16, cpu: Option<usize>) -> Result<Server> {
    let dir = scratch_dir("warbler")?;
    let log = std::fs::File::create(dir.join("warbler.log"))?;
    let child = command(&bin.display().to_string(), cpu)
        .args(["serve", "--listen", &format!("127.0.0.1:{http_port}"), "--rtc-port", &rtc_port.to_string(), "--public-ip", "127.0.0.1"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        // Capacity searches put hundreds of subscribers in one room (default limit 100).
        .env("WARBLER_LIMITS__MAX_PARTICIPANTS_PER_ROOM", "10000")
        .env("RUST_LOG", std::env::var("WARBLER_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let base = format!("http://127.0.0.1:{http_port}");
    let target = Target { kind: TargetKind::Warbler, base: base.clone(), pid: Some(child.id()), bind_ip: IpAddr::from([127, 0, 0, 1]) };
    let server = Server { child, target, dir };
    if let Err(e) = wait_http(&format!("{base}/healthz"), Duration::from_secs(20)).await {
        let log = std::fs::read_to_string(server.dir.join("warbler.log")).unwrap_or_default();
        server.stop();
        bail!("{e}; warbler log:\n{log}");
    }
    Ok(server)
}

/// Starts Janus with a generated loopback configuration (VideoRoom and HTTP only).
pub async fn start_janus(bin: &str, http_port: u16, cpu: Option<usize>) -> Result<Server> {
    let dir = scratch_dir("janus")?;
    let args = crate::janus::write_config(&dir, http_port, (20000, 40000))?;
    let child = command(bin, cpu)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("janus.stderr"))?)
        .spawn()
        .with_context(|| format!("starting {bin}"))?;
    let base = format!("http://127.0.0.1:{http_port}");
    let target = Target { kind: TargetKind::Janus, base: base.clone(), pid: Some(child.id()), bind_ip: host_ip() };
    let server = Server { child, target, dir };
    if let Err(e) = wait_http(&format!("{base}/janus/info"), Duration::from_secs(20)).await {
        let log = std::fs::read_to_string(server.dir.join("janus.log")).unwrap_or_default();
        server.stop();
        bail!("{e}; janus log:\n{}", log.lines().rev().take(30).collect::<Vec<_>>().join("\n"));
    }
    Ok(server)
}

/// The host's own non-loopback IPv4 address: Janus does not gather or pair 127.0.0.1, so
/// peers talking to Janus bind here (the traffic still stays on the loopback device).
pub fn host_ip() -> IpAddr {
    if_addrs::get_if_addrs()
        .ok()
        .and_then(|ifs| ifs.into_iter().find(|i| !i.is_loopback() && i.ip().is_ipv4()).map(|i| i.ip()))
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}
