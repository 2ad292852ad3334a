//! The `warbler` binary as an operator uses it: `token` and `serve` sharing a data directory,
//! configuration from file and environment, health, and a graceful drain on SIGINT.

use crate::common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::RawWs;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_warbler");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Serve {
    child: Child,
    base: String,
    port: u16,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(args: &[&str], env: &[(&str, &str)]) -> Serve {
    let port = free_port();
    let mut cmd = Command::new(BIN);
    cmd.arg("serve").args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    if !args.contains(&"--listen") {
        cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("warbler starts");
    common::forward_log(&mut child);
    let port = args.iter().position(|a| *a == "--listen").map(|i| args[i + 1].rsplit(':').next().unwrap().parse().unwrap()).unwrap_or(port);
    let base = format!("http://127.0.0.1:{port}");
    common::wait_healthy(&base, &mut child, Duration::from_secs(20)).await;
    Serve { child, base, port }
}

fn token(data_dir: &str, extra: &[&str]) -> std::process::Output {
    Command::new(BIN).args(["token", "--room", "demo", "--identity", "op", "--data-dir", data_dir]).args(extra).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_serve_share_the_development_key_and_sigint_drains() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    // `token` before `serve` creates the development key; `serve` then uses the same one.
    let out = token(data, &["--grants", "publish,subscribe"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tok = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(tok.split('.').count(), 3, "a JWT");
    let bad = token(data, &["--grants", "root"]);
    assert_eq!(bad.status.code(), Some(2), "unknown grant is refused");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown grant"));

    let mut s = serve(&["--rtc-port", "0", "--data-dir", data, "--public-ip", "127.0.0.1"], &[("WARBLER_DRAIN_TIMEOUT_SECS", "2")]).await;
    let dev = reqwest::get(format!("{}/dev/token?room=demo&identity=x", s.base)).await.unwrap();
    assert_eq!(dev.status().as_u16(), 200, "development endpoint is on with the development key");
    let mut ws = RawWs::connect(&format!("ws://127.0.0.1:{}/ws", s.port)).await;
    ws.send(json!({"type":"join","version":1,"token":tok})).await;
    let joined = ws.recv_type("joined").await.expect("the CLI's token is accepted by the server");
    assert_eq!(joined["participant"]["identity"], "op");
    let metrics = reqwest::get(format!("{}/metrics", s.base)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("warbler_participants 1"), "{metrics}");

    // SIGINT: stop admitting, then after the drain timeout everyone is told and the process exits 0.
    let t0 = Instant::now();
    let kill = Command::new("kill").args(["-INT", &s.child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = reqwest::get(format!("{}/healthz", s.base)).await.unwrap();
        if r.status().as_u16() == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "healthz turns 503 while draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut late = RawWs::connect(&format!("ws://127.0.0.1:{}/ws", s.port)).await;
    late.send(json!({"type":"join","version":1,"token":tok})).await;
    assert_eq!(late.recv_type("error").await.unwrap()["code"], "draining");
    let leave = ws.recv_type("leave").await.expect("remaining participants are told");
    assert_eq!(leave["reason"], "draining");
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "process exits after the drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "clean exit: {status:?}");
    assert!(t0.elapsed() >= Duration::from_secs(2), "waited for the drain timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_keys_disable_the_development_endpoint_and_sign_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let port = free_port();
    let cfg = dir.path().join("warbler.toml");
    std::fs::write(
        &cfg,
        format!("listen = \"127.0.0.1:{port}\"\nrtc_port = 0\npublic_ip = [\"127.0.0.1\"]\napi_key = \"APIprod\"\n[limits]\nmax_participants_per_room = 5\n"),
    )
    .unwrap();
    let secret = "s3cret-s3cret-s3cret-s3cret-s3cret!";
    let listen = format!("127.0.0.1:{port}");
    let s = serve(&["--config", cfg.to_str().unwrap(), "--data-dir", data, "--listen", &listen], &[("WARBLER_API_SECRET", secret)]).await;
    let dev = reqwest::get(format!("{}/dev/token?room=demo&identity=x", s.base)).await.unwrap();
    assert_eq!(dev.status().as_u16(), 404, "no development endpoint with a configured key");
    assert!(!dir.path().join("dev-api-key.json").exists(), "no development key written");
    // `token` with the same configuration signs with the configured key...
    let out = Command::new(BIN)
        .args(["token", "--room", "demo", "--identity", "op", "--config", cfg.to_str().unwrap()])
        .env("WARBLER_API_SECRET", secret)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let good = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    // ... and one signed with another secret is refused.
    let out = Command::new(BIN)
        .args(["token", "--room", "demo", "--identity", "op", "--config", cfg.to_str().unwrap()])
        .env("WARBLER_API_SECRET", "another-secret-another-secret-another")
        .output()
        .unwrap();
    let forged = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    for (tok, want) in [(good, "joined"), (forged, "error")] {
        let mut ws = RawWs::connect(&format!("ws://127.0.0.1:{}/ws", s.port)).await;
        ws.send(json!({"type":"join","version":1,"token":tok})).await;
        let reply = ws.recv().await.unwrap();
        assert_eq!(reply["type"], want, "{reply}");
    }
    // A bad configuration is refused with a message and exit code 2.
    std::fs::write(&cfg, "rtc_port = \"lots\"\n").unwrap();
    let out = Command::new(BIN).args(["serve", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rtc_port"), "{}", String::from_utf8_lossy(&out.stderr));
}
