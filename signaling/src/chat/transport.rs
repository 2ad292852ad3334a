//! How chat reaches participants: who is in a room, and sending one text message to some of them
//! on their `chat` data channel. The engine implements it in the server; tests and the benchmark
//! use in-memory ones.

use bytes::Bytes;
use futures::future::BoxFuture;
use warbler_sfu::api::{DataChannelError, EngineError};
use warbler_sfu::ids::{ParticipantId, RoomName};
use warbler_sfu::shell::EngineHandle;

use super::CHAT_LABEL;

/// A participant of a room, as chat needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub participant: ParticipantId,
    pub identity: String,
}

/// Why a delivery failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryFailure {
    /// The participant has no open chat channel (it never opened one, or it is gone).
    NoChannel,
    /// Its channel has too much unsent data; it catches up through history (seq has no gaps).
    Slow,
    Other,
}

impl DeliveryFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryFailure::NoChannel => "no_channel",
            DeliveryFailure::Slow => "slow",
            DeliveryFailure::Other => "other",
        }
    }
}

pub trait Transport: Send + Sync + 'static {
    fn members(&self, room: &RoomName) -> BoxFuture<'static, Vec<Member>>;
    /// Sends `text` to each of `to`; returns the failures.
    fn send(&self, to: Vec<ParticipantId>, text: Bytes) -> BoxFuture<'static, Vec<(ParticipantId, DeliveryFailure)>>;
}

/// Chat over the media engine's data channels.
pub struct EngineTransport(pub EngineHandle);

impl Transport for EngineTransport {
    fn members(&self, room: &RoomName) -> BoxFuture<'static, Vec<Member>> {
        let engine = self.0.clone();
        let room = room.clone();
        Box::pin(async move {
            engine
                .room_participants(room)
                .await
                .map(|ps| ps.into_iter().map(|p| Member { participant: p.id, identity: p.identity }).collect())
                .unwrap_or_default()
        })
    }

    fn send(&self, to: Vec<ParticipantId>, text: Bytes) -> BoxFuture<'static, Vec<(ParticipantId, DeliveryFailure)>> {
        let engine = self.0.clone();
        Box::pin(async move {
            let everyone = to.clone();
            match engine.send_data(to, CHAT_LABEL.to_owned(), text, true).await {
                Ok(failed) => failed.into_iter().map(|(p, e)| (p, classify(&e))).collect(),
                Err(_) => everyone.into_iter().map(|p| (p, DeliveryFailure::Other)).collect(),
            }
        })
    }
}

fn classify(e: &EngineError) -> DeliveryFailure {
    match e {
        EngineError::UnknownParticipant | EngineError::DataChannel(DataChannelError::NotOpen) => DeliveryFailure::NoChannel,
        EngineError::DataChannel(DataChannelError::Backpressure) => DeliveryFailure::Slow,
        _ => DeliveryFailure::Other,
    }
}
