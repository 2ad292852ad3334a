//! The engine's vocabulary towards signaling: requests it accepts, replies and events it produces.
//! Plain data; signaling turns it into JSON for clients.

use std::time::Duration;

use warbler_media::{Codec, MediaKind};

use crate::ids::{ParticipantId, PeerRole, RoomName, TrackId};

/// What a participant may do, from its access token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    pub publish: bool,
    pub subscribe: bool,
    pub chat: bool,
    pub admin: bool,
}

/// How a participant is connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParticipantKind {
    /// The WebSocket protocol: a publisher and a subscriber peer connection.
    WebSocket,
    /// WHIP ingest: one client-offered connection that publishes.
    Whip,
    /// WHEP playback of the participant(s) with this identity.
    Whep { target_identity: String },
}

#[derive(Clone, Debug)]
pub struct JoinRequest {
    pub room: RoomName,
    pub identity: String,
    pub name: String,
    pub grants: Grants,
    pub kind: ParticipantKind,
}

/// Where a published track comes from, as the publisher declares it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TrackSource {
    Camera,
    Microphone,
    ScreenShare,
    ScreenShareAudio,
    #[default]
    Unknown,
}

impl TrackSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TrackSource::Camera => "camera",
            TrackSource::Microphone => "microphone",
            TrackSource::ScreenShare => "screen_share",
            TrackSource::ScreenShareAudio => "screen_share_audio",
            TrackSource::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "camera" => TrackSource::Camera,
            "microphone" => TrackSource::Microphone,
            "screen_share" => TrackSource::ScreenShare,
            "screen_share_audio" => TrackSource::ScreenShareAudio,
            "unknown" => TrackSource::Unknown,
            _ => return None,
        })
    }
}

/// A track the publisher declares alongside its offer (keyed by the msid track id).
#[derive(Clone, Debug)]
pub struct TrackDeclaration {
    pub client_track_id: String,
    pub source: TrackSource,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackInfo {
    pub id: TrackId,
    pub kind: MediaKind,
    pub source: TrackSource,
    pub codec: Option<Codec>,
    pub muted: bool,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParticipantInfo {
    pub id: ParticipantId,
    pub identity: String,
    pub name: String,
    pub tracks: Vec<TrackInfo>,
}

#[derive(Clone, Debug)]
pub struct Joined {
    pub participant: ParticipantInfo,
    /// Everyone else in the room, in join order.
    pub others: Vec<ParticipantInfo>,
}

#[derive(Clone, Debug)]
pub struct PublishAnswer {
    pub sdp: String,
    /// (client track id, server track id) for every track the offer publishes.
    pub tracks: Vec<(String, TrackId)>,
}

/// Why a participant left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaveReason {
    Left,
    Timeout,
    Disconnected,
    Removed,
    Draining,
}

impl LeaveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaveReason::Left => "left",
            LeaveReason::Timeout => "timeout",
            LeaveReason::Disconnected => "disconnected",
            LeaveReason::Removed => "removed",
            LeaveReason::Draining => "draining",
        }
    }
}

/// Connection state of one peer connection, as the server sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    Connecting,
    Connected,
    Disconnected,
    Failed,
    Closed,
}

impl ConnectionState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Connecting => "connecting",
            ConnectionState::Connected => "connected",
            ConnectionState::Disconnected => "disconnected",
            ConnectionState::Failed => "failed",
            ConnectionState::Closed => "closed",
        }
    }
}

/// Something a participant's signaling connection should be told.
#[derive(Clone, Debug, PartialEq)]
pub enum ParticipantEvent {
    ParticipantJoined(ParticipantInfo),
    ParticipantLeft { participant: ParticipantId, reason: LeaveReason },
    TrackPublished { participant: ParticipantId, track: TrackInfo },
    TrackUnpublished { participant: ParticipantId, track: TrackId },
    TrackMuted { participant: ParticipantId, track: TrackId, muted: bool },
    /// A new offer for the subscriber connection; `tracks` maps each m-line's mid to its track.
    SubscriberOffer { sdp: String, tracks: Vec<(String, TrackId)> },
    ConnectionState { role: PeerRole, state: ConnectionState },
    /// The engine removed this participant (timeout, failure, drain); signaling closes its side.
    Removed { reason: LeaveReason },
    /// The allocator stopped sending this track to the participant, and why.
    TrackPaused { track: TrackId, reason: crate::allocator::PauseReason },
    TrackResumed { track: TrackId },
    /// The room's active speakers changed: loudest first (the first is the dominant speaker),
    /// with a score in 0..=1; empty when nobody speaks.
    ActiveSpeakers { speakers: Vec<(ParticipantId, f32)> },
    /// To a publisher: which simulcast layers (by rid) to send; the others nobody needs.
    LayerActivity { track: TrackId, layers: Vec<(String, bool)> },
    /// A data channel the client opened (on any of its connections) is ready.
    DataChannelOpen { label: String },
    DataChannelClosed { label: String },
    /// A message on one of the participant's data channels.
    DataMessage { label: String, data: bytes::Bytes, is_text: bool },
    /// A message on a data channel over the size limit, not delivered (the client is owed an
    /// error by whoever speaks that channel's protocol).
    DataMessageRefused { label: String, len: usize, limit: usize },
}

/// Errors a request can get. Each maps to one protocol error code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("room is full ({0} participants)")]
    RoomFull(usize),
    #[error("the server is shutting down")]
    Draining,
    #[error("no such participant")]
    UnknownParticipant,
    #[error("no such track")]
    UnknownTrack,
    #[error("not allowed: {0}")]
    Forbidden(&'static str),
    #[error("bad SDP: {0}")]
    BadSdp(String),
    #[error("wrong state: {0}")]
    WrongState(&'static str),
    #[error("internal: {0}")]
    Internal(String),
    /// The data channel is missing, not open, or its reader is too slow.
    #[error("data channel unavailable: {0}")]
    DataChannel(DataChannelError),
}

/// Why a data channel message could not be sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DataChannelError {
    /// The participant has no open channel with that label.
    #[error("no open channel with that label")]
    NotOpen,
    /// More than the backlog limit is waiting for the receiver: it reads too slowly.
    #[error("the receiver is too slow")]
    Backpressure,
    /// The WebRTC stack refused the message.
    #[error("send failed: {0}")]
    Failed(String),
}

/// Engine tunables.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_participants_per_room: usize,
    /// No packet from a connected peer for this long → it is gone (ICE consent freshness,
    /// RFC 7675, uses 30 s; browsers check every ~5 s, so 10 s means two missed checks).
    pub consent_timeout: Duration,
    /// A peer connection that never connects is dropped after this long.
    pub connect_timeout: Duration,
    /// At most one keyframe request per published track per this interval.
    pub keyframe_request_interval: Duration,
    /// Video codecs accepted from publishers, in order of preference.
    pub video_codecs: Vec<Codec>,
    /// Packets kept per published video stream for NACK answers.
    pub packet_cache_size: usize,
    /// Largest SDP accepted.
    pub max_sdp_bytes: usize,
    /// Largest data channel message accepted from a client (larger ones are dropped, counted).
    pub max_data_message_bytes: usize,
    /// A data channel with more unacknowledged bytes than this is not written to (slow reader).
    pub max_data_channel_backlog_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_participants_per_room: 100,
            consent_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(30),
            keyframe_request_interval: Duration::from_millis(500),
            video_codecs: vec![Codec::Vp8, Codec::H264],
            packet_cache_size: 512,
            max_sdp_bytes: 64 * 1024,
            max_data_message_bytes: 64 * 1024,
            max_data_channel_backlog_bytes: 4 * 1024 * 1024,
        }
    }
}
