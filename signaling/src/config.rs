//! Server configuration: built-in defaults, then the TOML file, then `WARBLER_*` environment
//! variables, then command-line flags (each later source wins).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// HTTP/WebSocket listen address.
    pub listen: SocketAddr,
    /// The one UDP port all peers share (0: pick a free one).
    pub rtc_port: u16,
    /// Addresses to advertise in ICE candidates; empty: every IPv4 address of the host.
    /// A list, or one string of comma-separated addresses (handy in the environment).
    #[serde(deserialize_with = "one_or_many_ips")]
    pub public_ip: Vec<IpAddr>,
    /// Where state lives (development key, later chat history).
    pub data_dir: PathBuf,
    /// Serve the web demo from this folder instead of the copy embedded in the binary.
    pub web_root: Option<PathBuf>,
    /// API key id and secret that sign access tokens. Unset: a development key pair is
    /// generated in `data_dir` and `/dev/token` is enabled.
    pub api_key: Option<String>,
    pub api_secret: Option<String>,
    /// `text` or `json`.
    pub log_format: String,
    /// tracing filter, e.g. `info,warbler_sfu=debug`.
    pub log_level: String,
    /// Seconds to wait for rooms to empty on shutdown before everyone is removed.
    pub drain_timeout_secs: u64,
    pub limits: Limits,
    #[serde(default)]
    pub chat: crate::chat::ChatConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_participants_per_room: usize,
    /// Largest WebSocket message answered with an error rather than a closed socket.
    pub max_ws_message_bytes: usize,
    pub max_sdp_bytes: usize,
    /// Sustained WebSocket messages per second per connection (bursts of twice this pass).
    pub ws_messages_per_second: u32,
    /// Concurrent WebSocket connections for the whole server.
    pub max_ws_connections: usize,
    /// Largest data channel message accepted (larger ones are refused with an error on that
    /// channel's protocol, e.g. chat's `too_long`).
    pub max_data_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_participants_per_room: 100,
            max_ws_message_bytes: 128 * 1024,
            max_sdp_bytes: 64 * 1024,
            ws_messages_per_second: 50,
            max_ws_connections: 10_000,
            max_data_message_bytes: 64 * 1024,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("literal address"),
            rtc_port: 50000,
            public_ip: Vec::new(),
            data_dir: PathBuf::from("./warbler-data"),
            web_root: None,
            api_key: None,
            api_secret: None,
            log_format: "text".into(),
            log_level: "info".into(),
            drain_timeout_secs: 10,
            limits: Limits::default(),
            chat: Default::default(),
        }
    }
}

/// Flags that override the file and environment (only those given).
#[derive(Clone, Debug, Default, Serialize, clap::Args)]
pub struct ServeFlags {
    /// Configuration file (TOML).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// HTTP/WebSocket listen address [default: 127.0.0.1:8080].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// UDP port shared by all WebRTC peers [default: 50000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtc_port: Option<u16>,
    /// Address to advertise to clients (repeatable) [default: the host's addresses].
    #[arg(long)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub public_ip: Vec<IpAddr>,
    /// Data directory [default: ./warbler-data].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Serve the web demo from this folder (development).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub web_root: Option<PathBuf>,
    /// API key id.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// API secret.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_secret: Option<String>,
    /// Log format: text or json.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
}

impl Config {
    /// Merges defaults ← file ← environment ← flags.
    pub fn load(flags: &ServeFlags) -> Result<Config, String> {
        Self::load_from(flags, Env::prefixed("WARBLER_").split("__"))
    }

    fn load_from(flags: &ServeFlags, env: Env) -> Result<Config, String> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &flags.config {
            if !path.exists() {
                return Err(format!("config file {} does not exist", path.display()));
            }
            fig = fig.merge(Toml::file(path));
        }
        // Only keys that name settings: other WARBLER_* variables (tools, tests) are not config.
        let env = env.filter(|k| {
            let top = k.as_str().split('.').next().unwrap_or_default();
            TOP_LEVEL_KEYS.iter().any(|known| known.eq_ignore_ascii_case(top))
        });
        let cfg: Config = fig
            .merge(env)
            .merge(Serialized::defaults(flags))
            .extract()
            .map_err(|e| format!("configuration: {e}"))?;
        if cfg.api_key.is_some() != cfg.api_secret.is_some() {
            return Err("api_key and api_secret must be set together".into());
        }
        if cfg.log_format != "text" && cfg.log_format != "json" {
            return Err(format!("log_format must be text or json, not {:?}", cfg.log_format));
        }
        if cfg.limits.max_participants_per_room == 0 {
            return Err("limits.max_participants_per_room must be at least 1".into());
        }
        cfg.chat.validate()?;
        Ok(cfg)
    }
}

const TOP_LEVEL_KEYS: &[&str] = &[
    "listen", "rtc_port", "public_ip", "data_dir", "web_root", "api_key", "api_secret", "log_format", "log_level",
    "drain_timeout_secs", "limits", "chat",
];

fn one_or_many_ips<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<IpAddr>),
        One(String),
    }
    match OneOrMany::deserialize(d)? {
        OneOrMany::Many(v) => Ok(v),
        OneOrMany::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().map_err(|e| serde::de::Error::custom(format!("public_ip {s:?}: {e}"))))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn precedence_is_defaults_file_env_flags() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "w.toml",
                r#"
                listen = "127.0.0.1:9000"
                rtc_port = 41000
                data_dir = "/from/file"
                [limits]
                max_participants_per_room = 7
                "#,
            )?;
            jail.set_env("WARBLER_RTC_PORT", "42000");
            jail.set_env("WARBLER_LIMITS__MAX_SDP_BYTES", "1000");
            jail.set_env("WARBLER_PUBLIC_IP", "10.0.0.5");
            jail.set_env("WARBLER_BIN", "/not/a/setting");
            let flags = ServeFlags { config: Some("w.toml".into()), data_dir: Some("/from/flag".into()), ..Default::default() };
            let c = Config::load(&flags).map_err(figment::Error::from)?;
            assert_eq!(c.listen, "127.0.0.1:9000".parse::<SocketAddr>().unwrap(), "file beats default");
            assert_eq!(c.rtc_port, 42000, "env beats file");
            assert_eq!(c.data_dir, PathBuf::from("/from/flag"), "flag beats file");
            assert_eq!(c.limits.max_participants_per_room, 7);
            assert_eq!(c.limits.max_sdp_bytes, 1000, "nested env");
            assert_eq!(c.limits.max_ws_message_bytes, Limits::default().max_ws_message_bytes, "untouched default");
            assert_eq!(c.public_ip, vec!["10.0.0.5".parse::<IpAddr>().unwrap()]);
            Ok(())
        });
    }

    #[test]
    fn flag_beats_env() {
        Jail::expect_with(|jail| {
            jail.set_env("WARBLER_LISTEN", "127.0.0.1:1111");
            let flags = ServeFlags { listen: Some("127.0.0.1:2222".parse().unwrap()), ..Default::default() };
            let c = Config::load(&flags).map_err(figment::Error::from)?;
            assert_eq!(c.listen.port(), 2222);
            Ok(())
        });
    }

    #[test]
    fn bad_configurations_are_refused() {
        Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "rtc_port = \"many\"\n")?;
            assert!(Config::load(&ServeFlags { config: Some("bad.toml".into()), ..Default::default() }).is_err());
            jail.create_file("typo.toml", "listne = \"127.0.0.1:1\"\n")?;
            assert!(Config::load(&ServeFlags { config: Some("typo.toml".into()), ..Default::default() }).is_err(), "unknown keys are errors");
            assert!(Config::load(&ServeFlags { config: Some("missing.toml".into()), ..Default::default() }).is_err());
            jail.set_env("WARBLER_API_KEY", "k");
            assert!(Config::load(&ServeFlags::default()).is_err(), "key without secret");
            Ok(())
        });
    }
}
