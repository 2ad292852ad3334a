//! Access tokens: HMAC-SHA256 JWTs naming an API key (`kid`), a room, an identity and grants.
//! Issuing ([`KeyStore::issue`]) and checking ([`KeyStore::verify`]) are pure given the clock
//! value passed in; the development key pair lives in the data directory.

use std::collections::HashMap;
use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;
use serde::{Deserialize, Serialize};
use warbler_sfu::api::Grants;

/// Seconds of clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;
pub const MAX_IDENTITY_LEN: usize = 128;
pub const MAX_NAME_LEN: usize = 128;
pub const MAX_ROOM_LEN: usize = 128;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// API key id (informational; the header's `kid` is what selects the secret).
    pub iss: String,
    /// Identity.
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub room: String,
    #[serde(default)]
    pub grants: Vec<String>,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
}

/// A verified token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessToken {
    pub room: String,
    pub identity: String,
    pub name: String,
    pub grants: Grants,
}

/// Why a token was refused. `Unauthorized` means "who are you?", `Forbidden` "not this".
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing access token")]
    Missing,
    #[error("malformed access token: {0}")]
    Malformed(String),
    #[error("unknown API key")]
    UnknownKey,
    #[error("invalid token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("token is for room {token_room:?}, not {wanted:?}")]
    WrongRoom { token_room: String, wanted: String },
    #[error("token lacks the {0} grant")]
    MissingGrant(&'static str),
}

impl AuthError {
    /// 401 vs 403.
    pub fn is_forbidden(&self) -> bool {
        matches!(self, AuthError::WrongRoom { .. } | AuthError::MissingGrant(_))
    }
}

pub fn parse_grants(list: &[String]) -> Result<Grants, String> {
    let mut g = Grants::default();
    for s in list {
        match s.trim() {
            "publish" => g.publish = true,
            "subscribe" => g.subscribe = true,
            "chat" => g.chat = true,
            "admin" => g.admin = true,
            "" => {}
            other => return Err(format!("unknown grant {other:?}")),
        }
    }
    Ok(g)
}

pub fn grant_names(g: Grants) -> Vec<String> {
    let mut v = Vec::new();
    for (on, name) in [(g.publish, "publish"), (g.subscribe, "subscribe"), (g.chat, "chat"), (g.admin, "admin")] {
        if on {
            v.push(name.to_owned());
        }
    }
    v
}

/// Room names travel in URLs and logs: keep them to a safe alphabet.
pub fn valid_room_name(room: &str) -> bool {
    !room.is_empty() && room.len() <= MAX_ROOM_LEN && room.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// The API keys the server accepts, and the one it signs with.
#[derive(Clone)]
pub struct KeyStore {
    keys: HashMap<String, String>,
    signing: (String, String),
    development: bool,
}

#[derive(Serialize, Deserialize)]
struct DevKeyFile {
    api_key: String,
    api_secret: String,
}

pub const DEV_KEY_FILE: &str = "dev-api-key.json";

impl KeyStore {
    pub fn new(api_key: String, api_secret: String) -> Result<Self, String> {
        if api_key.is_empty() {
            return Err("API key id is empty".into());
        }
        if api_secret.len() < 32 {
            return Err("API secret must be at least 32 characters".into());
        }
        let mut keys = HashMap::new();
        keys.insert(api_key.clone(), api_secret.clone());
        Ok(Self { keys, signing: (api_key, api_secret), development: false })
    }

    /// The development key pair of `data_dir`, created on first use.
    pub fn development(data_dir: &Path) -> std::io::Result<(Self, bool)> {
        let path = data_dir.join(DEV_KEY_FILE);
        let (file, created) = match std::fs::read_to_string(&path) {
            Ok(s) => (serde_json::from_str::<DevKeyFile>(&s).map_err(std::io::Error::other)?, false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir)?;
                let mut rng = rand::rng();
                let file = DevKeyFile {
                    api_key: format!("APIdev{}", hex::encode(rng.random::<[u8; 6]>())),
                    api_secret: hex::encode(rng.random::<[u8; 32]>()),
                };
                write_private(&path, &serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?)?;
                (file, true)
            }
            Err(e) => return Err(e),
        };
        let mut store = Self::new(file.api_key, file.api_secret).map_err(std::io::Error::other)?;
        store.development = true;
        Ok((store, created))
    }

    pub fn is_development(&self) -> bool {
        self.development
    }

    pub fn signing_key_id(&self) -> &str {
        &self.signing.0
    }

    pub fn issue(&self, room: &str, identity: &str, name: Option<&str>, grants: Grants, ttl_secs: u64, now_secs: u64) -> Result<String, String> {
        if !valid_room_name(room) {
            return Err(format!("invalid room name {room:?} (1-{MAX_ROOM_LEN} of A-Z a-z 0-9 _ . -)"));
        }
        if identity.is_empty() || identity.len() > MAX_IDENTITY_LEN {
            return Err(format!("identity must be 1-{MAX_IDENTITY_LEN} bytes"));
        }
        let claims = Claims {
            iss: self.signing.0.clone(),
            sub: identity.to_owned(),
            name: name.map(str::to_owned),
            room: room.to_owned(),
            grants: grant_names(grants),
            iat: now_secs,
            nbf: now_secs,
            exp: now_secs + ttl_secs,
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.signing.0.clone());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(self.signing.1.as_bytes())).map_err(|e| e.to_string())
    }

    /// Checks signature, key, times and shape. Room and grants are the caller's to check.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<AccessToken, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > 8192 {
            return Err(AuthError::Malformed("token too long".into()));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        if header.alg != Algorithm::HS256 {
            return Err(AuthError::Malformed(format!("algorithm {:?} is not accepted", header.alg)));
        }
        let kid = header.kid.ok_or_else(|| AuthError::Malformed("no key id (kid)".into()))?;
        let secret = self.keys.get(&kid).ok_or(AuthError::UnknownKey)?;
        let mut validation = Validation::new(Algorithm::HS256);
        // Times are checked below against the caller's clock, so the library does not read one.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims = ["exp", "sub"].iter().map(|s| s.to_string()).collect();
        let data = jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret.as_bytes()), &validation).map_err(|e| {
            match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => AuthError::BadSignature,
                _ => AuthError::Malformed(e.to_string()),
            }
        })?;
        let c = data.claims;
        if now_secs > c.exp + LEEWAY_SECS {
            return Err(AuthError::Expired);
        }
        if c.nbf > now_secs + LEEWAY_SECS {
            return Err(AuthError::NotYetValid);
        }
        if c.sub.is_empty() || c.sub.len() > MAX_IDENTITY_LEN {
            return Err(AuthError::Malformed("identity must be 1-128 bytes".into()));
        }
        if !valid_room_name(&c.room) {
            return Err(AuthError::Malformed("invalid room name".into()));
        }
        let name = c.name.filter(|n| !n.trim().is_empty()).unwrap_or_else(|| c.sub.clone());
        if name.len() > MAX_NAME_LEN {
            return Err(AuthError::Malformed("name longer than 128 bytes".into()));
        }
        let grants = parse_grants(&c.grants).map_err(AuthError::Malformed)?;
        Ok(AccessToken { room: c.room, identity: c.sub, name, grants })
    }
}

impl AccessToken {
    /// The token must be for `room` and carry `grant`.
    pub fn require(&self, room: &str, grant: Option<&'static str>) -> Result<(), AuthError> {
        if self.room != room {
            return Err(AuthError::WrongRoom { token_room: self.room.clone(), wanted: room.to_owned() });
        }
        let ok = match grant {
            None => true,
            Some("publish") => self.grants.publish,
            Some("subscribe") => self.grants.subscribe,
            Some("chat") => self.grants.chat,
            Some("admin") => self.grants.admin,
            Some(_) => false,
        };
        if ok { Ok(()) } else { Err(AuthError::MissingGrant(grant.unwrap_or("?"))) }
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn store() -> KeyStore {
        KeyStore::new("APIkey1".into(), "s".repeat(40)).unwrap()
    }

    fn all() -> Grants {
        Grants { publish: true, subscribe: true, chat: true, admin: false }
    }

    fn b64(s: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    fn forge(header: &str, claims: &str, sig: &str) -> String {
        format!("{}.{}.{}", b64(header), b64(claims), sig)
    }

    #[test]
    fn issued_token_verifies() {
        let s = store();
        let t = s.issue("demo", "alice", Some("Alice"), all(), 3600, NOW).unwrap();
        let a = s.verify(&t, NOW + 10).unwrap();
        assert_eq!(a, AccessToken { room: "demo".into(), identity: "alice".into(), name: "Alice".into(), grants: all() });
        assert!(a.require("demo", Some("publish")).is_ok());
        assert_eq!(a.require("other", None), Err(AuthError::WrongRoom { token_room: "demo".into(), wanted: "other".into() }));
        assert_eq!(a.require("demo", Some("admin")), Err(AuthError::MissingGrant("admin")));
    }

    #[test]
    fn refusal_table() {
        let s = store();
        let other = KeyStore::new("APIkey1".into(), "t".repeat(40)).unwrap();
        let unknown = KeyStore::new("APIkey2".into(), "s".repeat(40)).unwrap();
        let good = s.issue("demo", "alice", None, all(), 60, NOW).unwrap();
        let mut parts: Vec<&str> = good.split('.').collect();
        let tampered_claims = b64(&format!(
            r#"{{"iss":"APIkey1","sub":"mallory","room":"demo","grants":["admin"],"iat":{NOW},"nbf":{NOW},"exp":{}}}"#,
            NOW + 60
        ));
        parts[1] = &tampered_claims;
        let tampered = parts.join(".");
        let cases: Vec<(String, u64, fn(&AuthError) -> bool)> = vec![
            ("".into(), NOW, |e| *e == AuthError::Missing),
            ("not-a-jwt".into(), NOW, |e| matches!(e, AuthError::Malformed(_))),
            (other.issue("demo", "a", None, all(), 60, NOW).unwrap(), NOW, |e| *e == AuthError::BadSignature),
            (unknown.issue("demo", "a", None, all(), 60, NOW).unwrap(), NOW, |e| *e == AuthError::UnknownKey),
            (tampered, NOW, |e| *e == AuthError::BadSignature),
            (good.clone(), NOW + 60 + LEEWAY_SECS + 1, |e| *e == AuthError::Expired),
            (s.issue("demo", "a", None, all(), 60, NOW + 1000).unwrap(), NOW, |e| *e == AuthError::NotYetValid),
            // alg=none with no signature
            (forge(r#"{"alg":"none","kid":"APIkey1"}"#, r#"{"sub":"a","room":"demo","exp":9999999999}"#, ""), NOW, |e| matches!(e, AuthError::Malformed(_))),
            // HS256 without kid
            (forge(r#"{"alg":"HS256","typ":"JWT"}"#, r#"{"sub":"a","room":"demo","exp":9999999999}"#, "xx"), NOW, |e| matches!(e, AuthError::Malformed(_))),
            ("a".repeat(9000), NOW, |e| matches!(e, AuthError::Malformed(_))),
        ];
        for (i, (token, now, check)) in cases.iter().enumerate() {
            let err = s.verify(token, *now).expect_err(&format!("case {i} must be refused"));
            assert!(check(&err), "case {i}: {err:?}");
        }
    }

    #[test]
    fn within_leeway_is_accepted() {
        let s = store();
        let t = s.issue("demo", "alice", None, all(), 60, NOW).unwrap();
        assert!(s.verify(&t, NOW + 60 + LEEWAY_SECS).is_ok());
    }

    #[test]
    fn bad_inputs_to_issue() {
        let s = store();
        assert!(s.issue("bad room", "a", None, all(), 60, NOW).is_err());
        assert!(s.issue("", "a", None, all(), 60, NOW).is_err());
        assert!(s.issue("demo", "", None, all(), 60, NOW).is_err());
        assert!(s.issue("demo", &"x".repeat(129), None, all(), 60, NOW).is_err());
    }

    #[test]
    fn grants_parse() {
        assert_eq!(parse_grants(&["publish".into(), " chat".into()]).unwrap(), Grants { publish: true, chat: true, ..Default::default() });
        assert!(parse_grants(&["root".into()]).is_err());
        assert_eq!(grant_names(all()), vec!["publish", "subscribe", "chat"]);
    }

    #[test]
    fn short_secret_is_refused() {
        assert!(KeyStore::new("k".into(), "short".into()).is_err());
    }

    #[test]
    fn development_key_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = KeyStore::development(dir.path()).unwrap();
        assert!(created && a.is_development());
        let (b, created) = KeyStore::development(dir.path()).unwrap();
        assert!(!created);
        let t = a.issue("demo", "x", None, all(), 60, NOW).unwrap();
        assert!(b.verify(&t, NOW).is_ok(), "a token from the first store verifies with the reloaded key");
    }
}
