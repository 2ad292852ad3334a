//! `warbler`: `serve` runs the server; `token` prints an access token.

use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use warbler_signaling::auth::{parse_grants, unix_now};
use warbler_signaling::config::{Config, ServeFlags};
use warbler_signaling::server;

#[derive(Parser)]
#[command(name = "warbler", version, about = "Warbler: a WebRTC SFU with signaling, WHIP/WHEP and a web demo")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeFlags),
    /// Print an access token signed with the configured (or development) key.
    Token {
        #[arg(long)]
        room: String,
        #[arg(long)]
        identity: String,
        #[arg(long)]
        name: Option<String>,
        /// Comma-separated: publish, subscribe, chat, admin.
        #[arg(long, default_value = "publish,subscribe,chat")]
        grants: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 6 * 3600)]
        ttl: u64,
        #[command(flatten)]
        flags: ServeFlags,
    },
}

fn init_logging(cfg: &Config) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.log_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cfg.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Token { room, identity, name, grants, ttl, flags } => {
            let result = (|| -> anyhow::Result<String> {
                let cfg = Config::load(&flags).map_err(anyhow::Error::msg)?;
                let keys = server::load_keys(&cfg)?;
                let list: Vec<String> = grants.split(',').map(str::to_owned).collect();
                let grants = parse_grants(&list).map_err(anyhow::Error::msg)?;
                keys.issue(&room, &identity, name.as_deref(), grants, ttl, unix_now()).map_err(anyhow::Error::msg)
            })();
            match result {
                Ok(token) => {
                    println!("{token}");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("warbler token: {e}");
                    std::process::ExitCode::from(2)
                }
            }
        }
        Command::Serve(flags) => {
            let cfg = match Config::load(&flags) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("warbler serve: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            init_logging(&cfg);
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("warbler serve: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            rt.block_on(async move {
                let drain = Duration::from_secs(cfg.drain_timeout_secs);
                let server = match server::start(cfg).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start");
                        return std::process::ExitCode::FAILURE;
                    }
                };
                shutdown_signal().await;
                tracing::info!("shutdown requested (send it again to skip the drain)");
                server.drain_and_stop(drain, shutdown_signal()).await;
                std::process::ExitCode::SUCCESS
            })
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
