//! Identifier newtypes. Ids that clients see (participant and track sids) render as a prefix
//! and random hex, so they are unguessable and never reused across server restarts.

use std::fmt;

macro_rules! sid_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u64);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// Parses the `PREFIX_hex` form produced by `Display`.
            pub fn parse(s: &str) -> Option<Self> {
                let hex = s.strip_prefix($prefix)?.strip_prefix('_')?;
                if hex.len() != 16 {
                    return None;
                }
                u64::from_str_radix(hex, 16).ok().map($name)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}_{:016x}", $prefix, self.0)
            }
        }
    };
}

sid_type!(
    /// One participant's session in a room (an identity may have several, e.g. two devices).
    ParticipantId,
    "PA"
);
sid_type!(
    /// One published track (all its simulcast layers).
    TrackId,
    "TR"
);

/// One peer connection inside the engine. Not shown to clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

/// RTP synchronisation source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ssrc(pub u32);

/// A room name as given in the token (validated at the edge).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(pub String);

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which of a participant's connections something refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerRole {
    /// Client offers, server receives the client's tracks (WebSocket publisher PC, WHIP).
    Publisher,
    /// Server offers the tracks the client receives (WebSocket subscriber PC).
    Subscriber,
    /// Client offers receive-only, server answers and sends (WHEP).
    Whep,
}

impl PeerRole {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerRole::Publisher => "publisher",
            PeerRole::Subscriber => "subscriber",
            PeerRole::Whep => "whep",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sids_round_trip_and_reject_garbage() {
        let p = ParticipantId(0x1234_5678_9abc_def0);
        assert_eq!(p.to_string(), "PA_123456789abcdef0");
        assert_eq!(ParticipantId::parse(&p.to_string()), Some(p));
        for bad in ["", "PA_", "TR_123456789abcdef0", "PA_123", "PA_zz3456789abcdef0", "PA123456789abcdef0"] {
            assert_eq!(ParticipantId::parse(bad), None, "{bad}");
        }
        assert_eq!(TrackId::parse("TR_0000000000000001"), Some(TrackId(1)));
    }
}
