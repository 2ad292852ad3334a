//! The SFU core: rooms, participants, their peer connections, published tracks and the down
//! tracks that carry them to subscribers. Sans-IO: every entry point takes `now`; datagrams to
//! send, events for signaling and the next deadline come out of [`Engine::poll_output`] and
//! [`Engine::poll_timeout`]. One owner, `&mut self`, no locks.
//!
//! Model (after mediasoup): a *room* holds *participants*; a participant has up to two *peers*
//! (webrtc-rs connections): a publisher peer whose incoming streams are *published tracks*, and a
//! subscriber (or WHEP) peer whose outgoing streams are *down tracks*, each fed by one published
//! track through a [`Forwarder`].

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::certificate::RTCCertificate;
use rtc::peer_connection::event::RTCPeerConnectionEvent;
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::RTCIceCandidateInit;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind};
use rtc::rtp_transceiver::{RTCRtpReceiverId, RTCRtpSenderId, RTCRtpTransceiverId};
use rtc::sansio::Protocol;
use rtc::shared::time::SystemInstant;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use tracing::{debug, info, warn};
use warbler_media::vp8::Vp8Rewrite;
use warbler_media::{Codec, MediaKind};

mod congestion;
mod media;
mod rtp_out;

pub use congestion::TrackSettings;

use crate::api::*;
use crate::demux::{DatagramKind, Demux, classify};
use crate::forwarder::{DropReason, Forwarder};
use crate::ids::{ParticipantId, PeerId, PeerRole, RoomName, TrackId};
use crate::metrics::Metrics;
use crate::rtc_setup::{IceCredentials, build_peer_connection, generate_certificate};
use crate::track::{Layer, LayerFacts, order_layers};

/// What the shell must do next.
#[derive(Debug)]
pub enum Output {
    /// Send `data` from the socket bound at `local` to `remote`.
    Transmit { local: SocketAddr, remote: SocketAddr, data: BytesMut },
    /// Tell a participant's signaling connection.
    Event(ParticipantId, ParticipantEvent),
}

/// A remote ICE candidate trickled by a client (`RTCIceCandidateInit` fields).
#[derive(Clone, Debug, Default)]
pub struct RemoteCandidate {
    pub candidate: String,
    pub sdp_mid: Option<String>,
    pub sdp_mline_index: Option<u16>,
}

/// Maps on the per-packet path, keyed by ids the server assigns (or SSRCs, bounded per peer):
/// a fast non-cryptographic hash; nothing here is keyed by attacker-chosen strings.
type FastMap<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;

const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(500);
/// How often each room's active speakers are recomputed (and announced if they changed).
const SPEAKER_EVALUATION_INTERVAL: Duration = Duration::from_millis(300);
/// The sender SSRC the engine puts in the RTCP it originates towards publishers.
const ENGINE_RTCP_SSRC: u32 = 1;

struct Room {
    participants: Vec<ParticipantId>,
    speakers: crate::speaker::SpeakerDetector<ParticipantId>,
}

struct Participant {
    room: RoomName,
    identity: String,
    name: String,
    grants: Grants,
    kind: ParticipantKind,
    publisher: Option<PeerId>,
    subscriber: Option<PeerId>,
    tracks: Vec<TrackId>,
    /// Track declarations from `publish` not yet matched to an m-line.
    declared: HashMap<String, TrackDeclaration>,
}

struct PublishedTrack {
    id: TrackId,
    owner: ParticipantId,
    peer: PeerId,
    receiver: RTCRtpReceiverId,
    kind: MediaKind,
    source: TrackSource,
    name: String,
    codec: Option<Codec>,
    codec_params: Option<RTCRtpCodec>,
    muted: bool,
    /// One per SSRC seen (several with simulcast), in arrival order.
    layers: Vec<Layer>,
    /// Spatial index of each entry of `layers` (0 = lowest quality).
    spatial: Vec<u8>,
    subscribers: Vec<(PeerId, DownTrackId)>,
    /// Id of the RFC 6464 audio level header extension on this (audio) track, once looked up.
    audio_level_ext: Option<Option<u8>>,
}

impl PublishedTrack {
    fn info(&self) -> TrackInfo {
        TrackInfo { id: self.id, kind: self.kind, source: self.source, codec: self.codec, muted: self.muted, name: self.name.clone() }
    }

    /// Recomputes which layer is spatial 0, 1, 2… from what is known about each.
    fn reorder_layers(&mut self, now: Instant) {
        let facts: Vec<LayerFacts> = self
            .layers
            .iter_mut()
            .map(|l| LayerFacts { pixels: l.dims.map(|(w, h)| u32::from(w) * u32::from(h)), bps: l.rate.bps(now) })
            .collect();
        let order = order_layers(&facts);
        self.spatial = vec![0; self.layers.len()];
        for (rank, &i) in order.iter().enumerate() {
            self.spatial[i] = rank as u8;
        }
    }

    /// Index into `layers` of the layer at spatial index `s` (the highest if `s` is beyond).
    fn layer_at_spatial(&self, s: u8) -> Option<usize> {
        let top = self.layers.len().checked_sub(1)? as u8;
        let want = s.min(top);
        self.spatial.iter().position(|&x| x == want)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct DownTrackId(u64);

struct DownTrack {
    sender: RTCRtpSenderId,
    out_ssrc: u32,
    /// RTX stream of this down track (video): SSRC, negotiated payload type, next sequence number.
    rtx_ssrc: u32,
    rtx_pt: Option<u8>,
    rtx_seq: u16,
    kind: MediaKind,
    codec: Codec,
    codec_params: RTCRtpCodec,
    /// Payload type negotiated with the subscriber; `None` until the answer, or if refused.
    out_pt: Option<u8>,
    forwarder: Forwarder,
    source_track: Option<TrackId>,
    /// How the subscriber shows it (size, visibility, pin).
    settings: TrackSettings,
    /// Why the allocator paused it, as last told to the subscriber.
    pause: Option<crate::allocator::PauseReason>,
    /// The VP8 descriptor values each recent output packet carried, so a retransmission carries
    /// the same (indexed by output sequence number; allocated on the first VP8 packet).
    vp8_history: Vec<Option<(u16, Vp8Rewrite)>>,
    /// Recent retransmissions per output sequence number: (seq, when, how many times).
    rtx_log: Vec<(u16, Instant, u8)>,
    /// What this stream's sender reports say (media SSRC only; RTX gets none).
    sender_stats: rtp_out::SenderStats,
}

const VP8_HISTORY: usize = 512;
const RTX_LOG: usize = 256;
/// A packet is resent at most this often and this many times: a receiver repeats its NACK until
/// the packet arrives, and answering every repeat on a congested link only deepens the queue.
const RTX_MIN_INTERVAL: Duration = Duration::from_millis(100);
const RTX_MAX_TIMES: u8 = 2;

impl DownTrack {
    #[allow(clippy::too_many_arguments)]
    fn new(sender: RTCRtpSenderId, out_ssrc: u32, rtx_ssrc: u32, kind: MediaKind, codec: Codec, codec_params: RTCRtpCodec, forwarder: Forwarder, source_track: Option<TrackId>) -> Self {
        Self { sender, out_ssrc, rtx_ssrc, rtx_pt: None, rtx_seq: rand::random(), kind, codec, codec_params, out_pt: None, forwarder, source_track, settings: TrackSettings::default(), pause: None, vp8_history: Vec::new(), rtx_log: Vec::new(), sender_stats: Default::default() }
    }

    fn remember_vp8(&mut self, ext_seq: u64, r: Vp8Rewrite) {
        if self.vp8_history.is_empty() {
            self.vp8_history = vec![None; VP8_HISTORY];
        }
        let seq = ext_seq as u16;
        self.vp8_history[usize::from(seq) % VP8_HISTORY] = Some((seq, r));
    }

    /// Whether `seq` was not asked for before (as far as the recent log knows).
    fn first_nack(&self, seq: u16) -> bool {
        self.rtx_log.get(usize::from(seq) % RTX_LOG).is_none_or(|slot| slot.0 != seq || slot.2 == 0)
    }

    /// Whether a NACK for output `seq` may be answered now (and records that it is).
    fn allow_retransmission(&mut self, seq: u16, now: Instant) -> bool {
        if self.rtx_log.is_empty() {
            self.rtx_log = vec![(0, now, 0); RTX_LOG];
        }
        let slot = &mut self.rtx_log[usize::from(seq) % RTX_LOG];
        if slot.0 == seq && slot.2 > 0 {
            if slot.2 >= RTX_MAX_TIMES || now.saturating_duration_since(slot.1) < RTX_MIN_INTERVAL {
                return false;
            }
            *slot = (seq, now, slot.2 + 1);
        } else {
            *slot = (seq, now, 1);
        }
        true
    }

    /// Wraps a packet for the RTX stream (RFC 4588): original sequence number first, own SSRC,
    /// payload type and numbering. `None` if the subscriber did not accept RTX.
    fn rtx_packet(&mut self, original: rtc::rtp::Packet) -> Option<rtc::rtp::Packet> {
        let pt = self.rtx_pt?;
        let mut payload = bytes::BytesMut::with_capacity(original.payload.len() + 2);
        payload.extend_from_slice(&original.header.sequence_number.to_be_bytes());
        payload.extend_from_slice(&original.payload);
        let seq = self.rtx_seq;
        self.rtx_seq = self.rtx_seq.wrapping_add(1);
        Some(rtc::rtp::Packet {
            header: rtc::rtp::header::Header { version: 2, marker: original.header.marker, payload_type: pt, sequence_number: seq, timestamp: original.header.timestamp, ssrc: self.rtx_ssrc, ..Default::default() },
            payload: payload.freeze(),
        })
    }

    /// The payload to send again as output packet `seq`, from the cached source payload: VP8
    /// carries the picture ids it was first sent with (a copy with the publisher's own ids would
    /// reach the receiver as a different frame, and an old keyframe that way resets its
    /// decoder's reference tracking); `None` when that is no longer known.
    fn resend_payload(&self, seq: u16, cached: &bytes::Bytes) -> Option<bytes::Bytes> {
        if self.codec != Codec::Vp8 {
            return Some(cached.clone());
        }
        warbler_media::vp8::rewrite_descriptor(cached, self.vp8_sent(seq)?).map(bytes::Bytes::from)
    }

    fn vp8_sent(&self, seq: u16) -> Option<Vp8Rewrite> {
        match self.vp8_history.get(usize::from(seq) % VP8_HISTORY)? {
            Some((s, r)) if *s == seq => Some(*r),
            _ => None,
        }
    }
}

struct Peer {
    id: PeerId,
    participant: ParticipantId,
    role: PeerRole,
    pc: RTCPeerConnection,
    state: ConnectionState,
    connected_once: bool,
    created_at: Instant,
    last_rx: Instant,
    deadline: Option<Instant>,
    dirty: bool,
    // Publisher side.
    published: HashMap<String, TrackId>,
    ssrc_tracks: FastMap<u32, TrackId>,
    pt_codecs: HashMap<u8, Codec>,
    // Subscriber side.
    down: FastMap<DownTrackId, DownTrack>,
    down_by_ssrc: FastMap<u32, DownTrackId>,
    offer_in_flight: bool,
    negotiation_needed: bool,
    /// Open data channels: label → id (the client opens them; a label is unique per peer).
    data_channels: HashMap<String, rtc::data_channel::RTCDataChannelId>,
    /// Bandwidth estimation and allocation (subscriber and WHEP connections).
    cc: Option<congestion::SubscriberCc>,
}

/// The media engine. See the module documentation.
pub struct Engine {
    cfg: EngineConfig,
    advertised: Vec<SocketAddr>,
    certificate: RTCCertificate,
    rng: StdRng,
    next_id: u64,
    rooms: HashMap<RoomName, Room>,
    participants: FastMap<ParticipantId, Participant>,
    peers: FastMap<PeerId, Peer>,
    tracks: FastMap<TrackId, PublishedTrack>,
    demux: Demux,
    deadlines: BTreeSet<(Instant, PeerId)>,
    dirty: Vec<PeerId>,
    to_negotiate: Vec<PeerId>,
    outputs: VecDeque<Output>,
    metrics: Metrics,
    next_housekeeping: Instant,
    next_speaker_evaluation: Instant,
    next_media_tick: Instant,
    next_allocation: Instant,
    draining: bool,
    /// Datagram buffers the shell gave back after sending ([`Engine::recycle`]): RTP to
    /// subscribers is marshalled and encrypted in one of them, so a forwarded copy costs no
    /// allocation.
    buffers: Vec<BytesMut>,
    /// Wall-clock time at an instant, for the NTP time of sender reports.
    wall: SystemInstant,
}

/// Runs a call into the WebRTC stack, turning a panic inside it into an error so that one
/// misbehaving peer cannot take the engine (and everyone else's media) down.
fn guarded<T>(metrics: &Metrics, what: &str, f: impl FnOnce() -> T) -> Option<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(_) => {
            metrics.engine_panics_caught.inc();
            warn!(what, "panic inside the WebRTC stack caught; the peer will be removed");
            None
        }
    }
}

impl Engine {
    /// `advertised` are the addresses clients can reach the RTC port at (one host candidate
    /// each); the shell receives on them and reports them back as each datagram's `local`.
    /// `wall` pairs an instant with the wall-clock time (sender reports carry NTP time).
    pub fn new(cfg: EngineConfig, advertised: Vec<SocketAddr>, metrics: Metrics, seed: u64, now: Instant, wall: SystemInstant) -> Result<Self, EngineError> {
        Ok(Self {
            certificate: generate_certificate()?,
            cfg,
            advertised,
            rng: StdRng::seed_from_u64(seed),
            next_id: 1,
            rooms: HashMap::new(),
            participants: FastMap::default(),
            peers: FastMap::default(),
            tracks: FastMap::default(),
            demux: Demux::default(),
            deadlines: BTreeSet::new(),
            dirty: Vec::new(),
            to_negotiate: Vec::new(),
            outputs: VecDeque::new(),
            metrics,
            next_housekeeping: now + HOUSEKEEPING_INTERVAL,
            next_speaker_evaluation: now + SPEAKER_EVALUATION_INTERVAL,
            next_media_tick: now + congestion::ALLOCATION_INTERVAL,
            next_allocation: now + congestion::ALLOCATION_INTERVAL,
            draining: false,
            buffers: Vec::new(),
            wall,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Random, unguessable ids: sids reach clients and must not be enumerable.
    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.rng.random::<u64>() ^ self.next_id
    }

    // ----------------------------------------------------------------------------------------
    // Requests from signaling.

    pub fn join(&mut self, now: Instant, req: JoinRequest) -> Result<Joined, EngineError> {
        if self.draining {
            return Err(EngineError::Draining);
        }
        let count = self.rooms.get(&req.room).map_or(0, |r| r.participants.len());
        if count >= self.cfg.max_participants_per_room {
            return Err(EngineError::RoomFull(self.cfg.max_participants_per_room));
        }
        let id = ParticipantId(self.new_id());
        let participant = Participant {
            room: req.room.clone(),
            identity: req.identity,
            name: req.name,
            grants: req.grants,
            kind: req.kind,
            publisher: None,
            subscriber: None,
            tracks: Vec::new(),
            declared: HashMap::new(),
        };
        let info = ParticipantInfo { id, identity: participant.identity.clone(), name: participant.name.clone(), tracks: vec![] };
        let room = self.rooms.entry(req.room.clone()).or_insert_with(|| Room { participants: Vec::new(), speakers: Default::default() });
        let others: Vec<ParticipantId> = room.participants.clone();
        room.participants.push(id);
        let visible = participant.kind == ParticipantKind::WebSocket || participant.kind == ParticipantKind::Whip;
        let wants_media = participant.kind == ParticipantKind::WebSocket && participant.grants.subscribe;
        self.participants.insert(id, participant);
        info!(room = %req.room, participant = %id, identity = %info.identity, "participant joined");
        if visible {
            for other in &others {
                self.emit(*other, ParticipantEvent::ParticipantJoined(info.clone()));
            }
        }
        let others_info = others.iter().filter_map(|o| self.participant_info(*o)).collect();
        // Whoever is already speaking: announcements only go out on changes.
        let speaking = self.rooms.get(&req.room).map(|r| r.speakers.active().to_vec()).unwrap_or_default();
        if self.participants[&id].kind == ParticipantKind::WebSocket && !speaking.is_empty() {
            self.emit(id, ParticipantEvent::ActiveSpeakers { speakers: speaking });
        }
        if wants_media {
            let existing: Vec<TrackId> = others.iter().flat_map(|o| self.participants[o].tracks.clone()).collect();
            for t in existing {
                self.subscribe(now, id, t);
            }
        }
        self.update_gauges();
        self.flush(now);
        Ok(Joined { participant: info, others: others_info })
    }

    fn participant_info(&self, id: ParticipantId) -> Option<ParticipantInfo> {
        let p = self.participants.get(&id)?;
        if matches!(p.kind, ParticipantKind::Whep { .. }) {
            return None;
        }
        Some(ParticipantInfo {
            id,
            identity: p.identity.clone(),
            name: p.name.clone(),
            tracks: p.tracks.iter().filter_map(|t| self.tracks.get(t)).map(|t| t.info()).collect(),
        })
    }

    /// Removes a participant (its tracks, subscriptions and connections).
    pub fn leave(&mut self, now: Instant, id: ParticipantId, reason: LeaveReason) {
        self.remove_participant(now, id, reason);
        self.flush(now);
    }

    /// Applies a publisher's offer (WebSocket `publish`, or a WHIP POST) and returns the answer.
    pub fn publish(&mut self, now: Instant, id: ParticipantId, offer_sdp: String, declarations: Vec<TrackDeclaration>) -> Result<PublishAnswer, EngineError> {
        let result = self.publish_inner(now, id, offer_sdp, declarations);
        self.flush(now);
        result
    }

    fn publish_inner(&mut self, now: Instant, id: ParticipantId, offer_sdp: String, declarations: Vec<TrackDeclaration>) -> Result<PublishAnswer, EngineError> {
        self.check_sdp_size(&offer_sdp)?;
        let p = self.participants.get_mut(&id).ok_or(EngineError::UnknownParticipant)?;
        if matches!(p.kind, ParticipantKind::Whep { .. }) {
            return Err(EngineError::WrongState("a WHEP session cannot publish"));
        }
        if !p.grants.publish && sdp_sends_media(&offer_sdp) {
            return Err(EngineError::Forbidden("publishing needs the publish grant"));
        }
        for d in declarations {
            p.declared.insert(d.client_track_id.clone(), d);
        }
        let peer_id = match p.publisher {
            Some(peer) => peer,
            None => {
                let peer = self.create_peer(now, id, PeerRole::Publisher)?;
                if let Some(p) = self.participants.get_mut(&id) {
                    p.publisher = Some(peer);
                }
                peer
            }
        };
        let offer = RTCSessionDescription::offer(offer_sdp).map_err(|e| EngineError::BadSdp(e.to_string()))?;
        let peer = self.peers.get_mut(&peer_id).ok_or(EngineError::UnknownParticipant)?;
        let answer = guarded(&self.metrics, "publish", || -> Result<String, EngineError> {
            peer.pc.set_remote_description(now, offer).map_err(|e| EngineError::BadSdp(e.to_string()))?;
            let answer = peer.pc.create_answer(None).map_err(|e| EngineError::BadSdp(e.to_string()))?;
            let sdp = answer.sdp.clone();
            peer.pc.set_local_description(now, answer).map_err(|e| EngineError::BadSdp(e.to_string()))?;
            Ok(sdp)
        })
        .unwrap_or_else(|| Err(EngineError::Internal("WebRTC stack failure".into())))?;
        self.process_peer(now, peer_id);
        self.mark_dirty(peer_id);
        let tracks = self.sync_published_tracks(now, peer_id);
        Ok(PublishAnswer { sdp: answer, tracks })
    }

    /// The client's answer to the latest subscriber offer.
    pub fn subscriber_answer(&mut self, now: Instant, id: ParticipantId, answer_sdp: String) -> Result<(), EngineError> {
        let result = self.subscriber_answer_inner(now, id, answer_sdp);
        self.flush(now);
        result
    }

    fn subscriber_answer_inner(&mut self, now: Instant, id: ParticipantId, answer_sdp: String) -> Result<(), EngineError> {
        self.check_sdp_size(&answer_sdp)?;
        let p = self.participants.get(&id).ok_or(EngineError::UnknownParticipant)?;
        let peer_id = p.subscriber.ok_or(EngineError::WrongState("no subscriber offer was made"))?;
        let peer = self.peers.get_mut(&peer_id).ok_or(EngineError::UnknownParticipant)?;
        if !peer.offer_in_flight {
            return Err(EngineError::WrongState("no subscriber offer is outstanding"));
        }
        let answer = RTCSessionDescription::answer(answer_sdp).map_err(|e| EngineError::BadSdp(e.to_string()))?;
        guarded(&self.metrics, "subscriber answer", || peer.pc.set_remote_description(now, answer))
            .unwrap_or_else(|| Err(rtc::shared::error::Error::Other("WebRTC stack failure".into())))
            .map_err(|e| EngineError::BadSdp(e.to_string()))?;
        peer.offer_in_flight = false;
        refresh_payload_types(peer);
        peer.refresh_extension_ids();
        if peer.negotiation_needed {
            self.to_negotiate.push(peer_id);
        }
        self.process_peer(now, peer_id);
        self.mark_dirty(peer_id);
        Ok(())
    }

    /// A WHEP client's receive-only offer: answers with the tracks of the watched identity.
    pub fn whep_offer(&mut self, now: Instant, id: ParticipantId, offer_sdp: String) -> Result<String, EngineError> {
        let result = self.whep_offer_inner(now, id, offer_sdp);
        self.flush(now);
        result
    }

    fn whep_offer_inner(&mut self, now: Instant, id: ParticipantId, offer_sdp: String) -> Result<String, EngineError> {
        self.check_sdp_size(&offer_sdp)?;
        let p = self.participants.get(&id).ok_or(EngineError::UnknownParticipant)?;
        let ParticipantKind::Whep { target_identity } = p.kind.clone() else {
            return Err(EngineError::WrongState("not a WHEP session"));
        };
        if !p.grants.subscribe {
            return Err(EngineError::Forbidden("playback needs the subscribe grant"));
        }
        if p.subscriber.is_some() {
            return Err(EngineError::WrongState("the WHEP session already has an offer"));
        }
        let room = p.room.clone();
        let peer_id = self.create_peer(now, id, PeerRole::Whep)?;
        if let Some(p) = self.participants.get_mut(&id) {
            p.subscriber = Some(peer_id);
        }
        let kinds = receive_kinds(&offer_sdp);
        let offer = RTCSessionDescription::offer(offer_sdp).map_err(|e| EngineError::BadSdp(e.to_string()))?;
        // Codec per m-line: the watched participant's current track's codec if the player offers
        // it, else our first preference among what the player offers.
        let codec_for = |kind: MediaKind, offered: &[Codec]| -> Result<(Codec, RTCRtpCodec), EngineError> {
            let existing = self.room_tracks(&room).into_iter().find_map(|t| {
                let t = &self.tracks[&t];
                let owner = &self.participants[&t.owner];
                (owner.identity == target_identity && t.kind == kind).then(|| t.codec.zip(t.codec_params.clone())).flatten()
            });
            if let Some((c, params)) = existing
                && offered.contains(&c)
            {
                return Ok((c, params));
            }
            let ours: &[Codec] = if kind == MediaKind::Audio { &[Codec::Opus] } else { &self.cfg.video_codecs };
            let c = ours.iter().copied().find(|c| offered.contains(c)).ok_or_else(|| {
                EngineError::BadSdp(format!("no codec in common for {}: offered {offered:?}, supported {ours:?}", if kind == MediaKind::Audio { "audio" } else { "video" }))
            })?;
            Ok((c, crate::rtc_setup::codec_parameters(c, false).remove(0).rtp_codec))
        };
        let mut planned = Vec::new();
        for (kind, offered) in &kinds {
            planned.push((*kind, codec_for(*kind, offered)?));
        }
        let mut slots: Vec<(MediaKind, u32, u32, (Codec, RTCRtpCodec))> = Vec::new();
        let stream_id = format!("whep-{target_identity}");
        let peer = self.peers.get_mut(&peer_id).ok_or(EngineError::UnknownParticipant)?;
        let rng = &mut self.rng;
        let sdp = guarded(&self.metrics, "whep offer", || -> Result<(String, Vec<RTCRtpSenderId>), EngineError> {
            peer.pc.set_remote_description(now, offer).map_err(|e| EngineError::BadSdp(e.to_string()))?;
            let mut senders = Vec::new();
            for (mk, codec) in planned {
                let kind = if mk == MediaKind::Audio { RtpCodecKind::Audio } else { RtpCodecKind::Video };
                let ssrc = rng.random::<u32>();
                let rtx_ssrc = (mk == MediaKind::Video).then(|| rng.random::<u32>());
                let track = media_stream_track(&stream_id, &format!("{stream_id}-{}", slots.len()), kind, ssrc, rtx_ssrc, &codec.1);
                let sender = peer.pc.add_track(track).map_err(|e| EngineError::BadSdp(format!("cannot send {kind}: {e}")))?;
                senders.push(sender);
                slots.push((mk, ssrc, rtx_ssrc.unwrap_or_default(), codec));
            }
            let answer = peer.pc.create_answer(None).map_err(|e| EngineError::BadSdp(e.to_string()))?;
            let sdp = answer.sdp.clone();
            peer.pc.set_local_description(now, answer).map_err(|e| EngineError::BadSdp(e.to_string()))?;
            Ok((sdp, senders))
        })
        .unwrap_or_else(|| Err(EngineError::Internal("WebRTC stack failure".into())))?;
        let (answer, senders) = sdp;
        if slots.is_empty() {
            return Err(EngineError::BadSdp("the offer has no audio or video to receive".into()));
        }
        for ((kind, ssrc, rtx_ssrc, (codec, params)), sender) in slots.into_iter().zip(senders) {
            let dt_id = DownTrackId(self.new_id());
            let forwarder = Forwarder::new(kind, codec.clock_rate(), self.rng.random(), self.rng.random());
            let peer = self.peers.get_mut(&peer_id).ok_or(EngineError::UnknownParticipant)?;
            peer.down.insert(dt_id, DownTrack::new(sender, ssrc, rtx_ssrc, kind, codec, params, forwarder, None));
            peer.down_by_ssrc.insert(ssrc, dt_id);
            peer.down_by_ssrc.insert(rtx_ssrc, dt_id);
        }
        if let Some(peer) = self.peers.get_mut(&peer_id) {
            refresh_payload_types(peer);
            peer.refresh_extension_ids();
        }
        self.bind_whep_slots(&room);
        self.process_peer(now, peer_id);
        self.mark_dirty(peer_id);
        self.update_gauges();
        Ok(answer)
    }

    /// A trickled remote candidate (`None`: end of candidates).
    pub fn add_candidate(&mut self, now: Instant, id: ParticipantId, role: PeerRole, candidate: Option<RemoteCandidate>) -> Result<(), EngineError> {
        let p = self.participants.get(&id).ok_or(EngineError::UnknownParticipant)?;
        let peer_id = match role {
            PeerRole::Publisher => p.publisher,
            PeerRole::Subscriber | PeerRole::Whep => p.subscriber,
        }
        .ok_or(EngineError::WrongState("no such connection yet"))?;
        let Some(c) = candidate else { return Ok(()) };
        if c.candidate.is_empty() {
            return Ok(());
        }
        let peer = self.peers.get_mut(&peer_id).ok_or(EngineError::UnknownParticipant)?;
        let init = RTCIceCandidateInit { candidate: c.candidate, sdp_mid: c.sdp_mid, sdp_mline_index: c.sdp_mline_index, ..Default::default() };
        guarded(&self.metrics, "add candidate", || peer.pc.add_remote_candidate(init))
            .unwrap_or_else(|| Err(rtc::shared::error::Error::Other("WebRTC stack failure".into())))
            .map_err(|e| EngineError::BadSdp(format!("bad candidate: {e}")))?;
        self.mark_dirty(peer_id);
        self.flush(now);
        Ok(())
    }

    /// Mutes or unmutes one of the participant's own tracks.
    pub fn set_muted(&mut self, now: Instant, id: ParticipantId, track: TrackId, muted: bool) -> Result<(), EngineError> {
        let t = self.tracks.get_mut(&track).ok_or(EngineError::UnknownTrack)?;
        if t.owner != id {
            return Err(EngineError::UnknownTrack);
        }
        if t.muted == muted {
            return Ok(());
        }
        t.muted = muted;
        for (peer, dt) in t.subscribers.clone() {
            if let Some(d) = self.peers.get_mut(&peer).and_then(|p| p.down.get_mut(&dt)) {
                d.forwarder.set_muted(muted);
            }
        }
        let room = self.participants[&id].room.clone();
        self.broadcast(&room, None, ParticipantEvent::TrackMuted { participant: id, track, muted });
        self.flush(now);
        Ok(())
    }

    /// Stops admitting participants (graceful shutdown); existing ones keep their media.
    pub fn start_draining(&mut self) {
        self.draining = true;
    }

    /// Removes everyone (end of a drain).
    pub fn remove_all(&mut self, now: Instant, reason: LeaveReason) {
        let ids: Vec<ParticipantId> = self.participants.keys().copied().collect();
        for id in ids {
            self.remove_participant(now, id, reason);
        }
        self.flush(now);
    }

    pub fn participant_count(&self) -> usize {
        self.participants.len()
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Everyone in a room, for REST and tests.
    pub fn room_participants(&self, room: &RoomName) -> Vec<ParticipantInfo> {
        self.rooms
            .get(room)
            .map(|r| r.participants.iter().filter_map(|p| self.participant_info(*p)).collect())
            .unwrap_or_default()
    }

    /// Every participant id in a room, in join order (WHEP viewers included).
    pub fn room_participant_ids(&self, room: &RoomName) -> Vec<ParticipantId> {
        self.rooms.get(room).map(|r| r.participants.clone()).unwrap_or_default()
    }

    /// Whether a participant with this identity is in the room (WHEP target check).
    pub fn identity_present(&self, room: &RoomName, identity: &str) -> bool {
        self.rooms.get(room).is_some_and(|r| r.participants.iter().any(|p| self.participants[p].identity == identity && !matches!(self.participants[p].kind, ParticipantKind::Whep { .. })))
    }

    // ----------------------------------------------------------------------------------------
    // Network input and time.

    /// A datagram received on the RTC port at `local` from `remote`.
    pub fn handle_datagram(&mut self, now: Instant, local: SocketAddr, remote: SocketAddr, data: &[u8]) {
        self.metrics.udp_datagrams_in.inc();
        self.metrics.udp_bytes_in.inc_by(data.len() as u64);
        if classify(data) == DatagramKind::Unknown {
            self.metrics.dropped(DropReason::Malformed).inc();
            return;
        }
        let Some(peer_id) = self.demux.route(local, remote, data) else {
            self.metrics.dropped(DropReason::UnknownPeer).inc();
            return;
        };
        let Some(peer) = self.peers.get_mut(&peer_id) else {
            self.metrics.dropped(DropReason::UnknownPeer).inc();
            return;
        };
        peer.last_rx = now;
        let msg = TaggedBytesMut {
            now,
            transport: TransportContext { local_addr: local, peer_addr: remote, ecn: None, transport_protocol: TransportProtocol::UDP },
            message: BytesMut::from(data),
        };
        match guarded(&self.metrics, "handle_read", || peer.pc.handle_read(msg)) {
            Some(Ok(())) => {}
            Some(Err(e)) => debug!(peer = peer_id.0, error = %e, "datagram refused by the WebRTC stack"),
            None => {
                self.fail_peer(now, peer_id);
                self.flush(now);
                return;
            }
        }
        self.process_peer(now, peer_id);
        self.mark_dirty(peer_id);
        self.flush(now);
    }

    /// Timers: the WebRTC stacks' own (retransmissions, keepalives, RTCP) and the engine's
    /// housekeeping (consent and connect timeouts).
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, peer_id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(peer) = self.peers.get_mut(&peer_id) else { continue };
            peer.deadline = None;
            match guarded(&self.metrics, "handle_timeout", || peer.pc.handle_timeout(now)) {
                Some(_) => {
                    self.process_peer(now, peer_id);
                    self.mark_dirty(peer_id);
                }
                None => self.fail_peer(now, peer_id),
            }
        }
        if now >= self.next_housekeeping {
            self.next_housekeeping = now + HOUSEKEEPING_INTERVAL;
            self.housekeeping(now);
        }
        if now >= self.next_speaker_evaluation {
            self.next_speaker_evaluation = now + SPEAKER_EVALUATION_INTERVAL;
            self.evaluate_speakers(now);
        }
        if now >= self.next_media_tick {
            self.media_tick(now);
        }
        self.flush(now);
    }

    /// The next instant `handle_timeout` must be called at.
    pub fn poll_timeout(&self) -> Instant {
        let own = self.next_housekeeping.min(self.next_media_tick).min(self.next_speaker_evaluation);
        match self.deadlines.first() {
            Some(&(at, _)) if at < own => at,
            _ => own,
        }
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Takes back the buffer of a sent [`Output::Transmit`] for reuse (a bounded pool of
    /// datagram-sized buffers; others are dropped).
    pub fn recycle(&mut self, data: BytesMut) {
        rtp_out::recycle(&mut self.buffers, data);
    }

    fn housekeeping(&mut self, now: Instant) {
        let mut gone = Vec::new();
        for peer in self.peers.values() {
            let silent = now.saturating_duration_since(peer.last_rx);
            if peer.connected_once && silent > self.cfg.consent_timeout {
                gone.push((peer.participant, peer.id, "no packets (consent lost)"));
            } else if !peer.connected_once && now.saturating_duration_since(peer.created_at) > self.cfg.connect_timeout {
                gone.push((peer.participant, peer.id, "never connected"));
            }
        }
        for (participant, peer, why) in gone {
            info!(participant = %participant, peer = peer.0, why, "peer timed out");
            self.metrics.peers_timed_out.inc();
            self.remove_participant(now, participant, LeaveReason::Timeout);
        }
    }

    /// Recomputes every room's active speakers and tells its participants when they changed.
    fn evaluate_speakers(&mut self, now: Instant) {
        let mut changed: Vec<(RoomName, Vec<(ParticipantId, f32)>)> = Vec::new();
        for (name, room) in &mut self.rooms {
            if let Some(active) = room.speakers.evaluate(now) {
                changed.push((name.clone(), active.to_vec()));
            }
        }
        for (room, speakers) in changed {
            self.metrics.active_speaker_changes.inc();
            debug!(room = %room, speakers = ?speakers, "active speakers");
            self.broadcast(&room, None, ParticipantEvent::ActiveSpeakers { speakers });
        }
    }

    // ----------------------------------------------------------------------------------------
    // Internals.

    fn check_sdp_size(&self, sdp: &str) -> Result<(), EngineError> {
        if sdp.len() > self.cfg.max_sdp_bytes {
            return Err(EngineError::BadSdp(format!("SDP of {} bytes is over the {} byte limit", sdp.len(), self.cfg.max_sdp_bytes)));
        }
        if sdp.is_empty() {
            return Err(EngineError::BadSdp("empty SDP".into()));
        }
        Ok(())
    }

    fn create_peer(&mut self, now: Instant, participant: ParticipantId, role: PeerRole) -> Result<PeerId, EngineError> {
        let creds = IceCredentials::random(&mut self.rng);
        let pc = build_peer_connection(role, &self.cfg.video_codecs, &self.certificate, &creds, &self.advertised, now)?;
        let id = PeerId(self.new_id());
        self.demux.add_peer(id, creds.ufrag);
        self.peers.insert(
            id,
            Peer {
                id,
                participant,
                role,
                pc,
                state: ConnectionState::Connecting,
                connected_once: false,
                created_at: now,
                last_rx: now,
                deadline: None,
                dirty: false,
                published: HashMap::new(),
                ssrc_tracks: FastMap::default(),
                pt_codecs: HashMap::new(),
                down: FastMap::default(),
                down_by_ssrc: FastMap::default(),
                offer_in_flight: false,
                negotiation_needed: false,
                data_channels: HashMap::new(),
                cc: congestion::is_subscriber_role(role).then(|| congestion::SubscriberCc::new(now)),
            },
        );
        self.update_gauges();
        Ok(id)
    }

    fn mark_dirty(&mut self, peer_id: PeerId) {
        if let Some(p) = self.peers.get_mut(&peer_id)
            && !p.dirty
        {
            p.dirty = true;
            self.dirty.push(peer_id);
        }
    }

    fn emit(&mut self, to: ParticipantId, event: ParticipantEvent) {
        self.outputs.push_back(Output::Event(to, event));
    }

    /// Sends an event to every participant of a room (except `except`) that has signaling.
    fn broadcast(&mut self, room: &RoomName, except: Option<ParticipantId>, event: ParticipantEvent) {
        let Some(r) = self.rooms.get(room) else { return };
        let targets: Vec<ParticipantId> = r
            .participants
            .iter()
            .copied()
            .filter(|p| Some(*p) != except && self.participants.get(p).is_some_and(|p| p.kind == ParticipantKind::WebSocket))
            .collect();
        for t in targets {
            self.emit(t, event.clone());
        }
    }

    fn room_tracks(&self, room: &RoomName) -> Vec<TrackId> {
        self.rooms
            .get(room)
            .map(|r| r.participants.iter().flat_map(|p| self.participants[p].tracks.clone()).collect())
            .unwrap_or_default()
    }

    /// Drains events and application messages a peer connection produced.
    fn process_peer(&mut self, now: Instant, peer_id: PeerId) {
        loop {
            let Some(peer) = self.peers.get_mut(&peer_id) else { return };
            let event = match guarded(&self.metrics, "poll_event", || peer.pc.poll_event()) {
                Some(e) => e,
                None => return self.fail_peer(now, peer_id),
            };
            match event {
                Some(e) => self.on_peer_event(now, peer_id, e),
                None => break,
            }
        }
        loop {
            let Some(peer) = self.peers.get_mut(&peer_id) else { return };
            let msg = match guarded(&self.metrics, "poll_read", || peer.pc.poll_read()) {
                Some(m) => m,
                None => return self.fail_peer(now, peer_id),
            };
            let Some(TaggedRTCMessage { message, .. }) = msg else { break };
            match message {
                RTCMessage::RtpPacket(track_id, packet) => self.on_publisher_rtp(now, peer_id, &track_id, packet),
                RTCMessage::RtcpPacket(_, packets) => self.on_rtcp(now, peer_id, packets),
                RTCMessage::DataChannelMessage(channel, msg) => self.on_data_message(peer_id, channel, msg),
                _ => {}
            }
        }
    }

    fn on_peer_event(&mut self, now: Instant, peer_id: PeerId, event: RTCPeerConnectionEvent) {
        let state = match event {
            RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => state,
            RTCPeerConnectionEvent::OnDataChannel(dc) => return self.on_data_channel_event(peer_id, dc),
            _ => return,
        };
        let Some(peer) = self.peers.get_mut(&peer_id) else { return };
        let state = match state {
            RTCPeerConnectionState::Connected => ConnectionState::Connected,
            RTCPeerConnectionState::Disconnected => ConnectionState::Disconnected,
            RTCPeerConnectionState::Failed => ConnectionState::Failed,
            RTCPeerConnectionState::Closed => ConnectionState::Closed,
            _ => ConnectionState::Connecting,
        };
        if peer.state == state {
            return;
        }
        peer.state = state;
        let (participant, role) = (peer.participant, peer.role);
        if state == ConnectionState::Connected {
            peer.connected_once = true;
            peer.last_rx = now;
        }
        debug!(participant = %participant, role = role.as_str(), state = state.as_str(), "connection state");
        self.emit(participant, ParticipantEvent::ConnectionState { role, state });
        if state == ConnectionState::Failed {
            self.metrics.peers_timed_out.inc();
            self.remove_participant(now, participant, LeaveReason::Disconnected);
        }
    }

    fn on_data_channel_event(&mut self, peer_id: PeerId, event: rtc::peer_connection::event::RTCDataChannelEvent) {
        use rtc::peer_connection::event::RTCDataChannelEvent as E;
        let Some(peer) = self.peers.get_mut(&peer_id) else { return };
        let participant = peer.participant;
        match event {
            E::OnOpen(id) => {
                let Some(label) = peer.pc.data_channel(id).map(|dc| dc.label().to_owned()) else { return };
                if label.len() > 128 {
                    return;
                }
                peer.data_channels.insert(label.clone(), id);
                debug!(participant = %participant, label, "data channel open");
                self.emit(participant, ParticipantEvent::DataChannelOpen { label });
            }
            E::OnClose(id) => {
                let label = peer.data_channels.iter().find(|(_, v)| **v == id).map(|(k, _)| k.clone());
                if let Some(label) = label {
                    peer.data_channels.remove(&label);
                    self.emit(participant, ParticipantEvent::DataChannelClosed { label });
                }
            }
            _ => {}
        }
    }

    fn on_data_message(&mut self, peer_id: PeerId, channel: rtc::data_channel::RTCDataChannelId, msg: rtc::data_channel::RTCDataChannelMessage) {
        let Some(peer) = self.peers.get(&peer_id) else { return };
        let participant = peer.participant;
        let Some(label) = peer.data_channels.iter().find(|(_, v)| **v == channel).map(|(k, _)| k.clone()) else {
            self.metrics.data_messages_dropped.inc();
            return;
        };
        if msg.data.len() > self.cfg.max_data_message_bytes {
            self.metrics.data_messages_dropped.inc();
            info!(participant = %participant, label = %label, len = msg.data.len(), "oversized data channel message refused");
            self.emit(participant, ParticipantEvent::DataMessageRefused { label, len: msg.data.len(), limit: self.cfg.max_data_message_bytes });
            return;
        }
        self.metrics.data_messages_in.inc();
        self.emit(participant, ParticipantEvent::DataMessage { label, data: msg.data.freeze(), is_text: msg.is_string });
    }

    /// Sends a message on each listed participant's data channel `label` (whichever of its
    /// connections carries it). Returns the participants it could not be sent to.
    pub fn send_data(&mut self, now: Instant, to: &[ParticipantId], label: &str, data: &[u8], is_text: bool) -> Vec<(ParticipantId, EngineError)> {
        let mut failed = Vec::new();
        for &pid in to {
            match self.send_data_one(now, pid, label, data, is_text) {
                Ok(peer) => self.mark_dirty(peer),
                Err(e) => failed.push((pid, e)),
            }
        }
        self.flush(now);
        failed
    }

    fn send_data_one(&mut self, now: Instant, pid: ParticipantId, label: &str, data: &[u8], is_text: bool) -> Result<PeerId, EngineError> {
        let p = self.participants.get(&pid).ok_or(EngineError::UnknownParticipant)?;
        let peer_id = [p.publisher, p.subscriber]
            .into_iter()
            .flatten()
            .find(|peer| self.peers.get(peer).is_some_and(|x| x.data_channels.contains_key(label)))
            .ok_or(EngineError::DataChannel(DataChannelError::NotOpen))?;
        let backlog_limit = self.cfg.max_data_channel_backlog_bytes;
        let peer = self.peers.get_mut(&peer_id).ok_or(EngineError::UnknownParticipant)?;
        let id = peer.data_channels[label];
        let result = guarded(&self.metrics, "data send", || -> Result<(), EngineError> {
            let mut dc = peer.pc.data_channel(id).ok_or(EngineError::DataChannel(DataChannelError::NotOpen))?;
            if dc.outstanding_bytes() + data.len() > backlog_limit {
                return Err(EngineError::DataChannel(DataChannelError::Backpressure));
            }
            let sent = if is_text {
                dc.send_text(now, String::from_utf8_lossy(data).into_owned())
            } else {
                dc.send(now, BytesMut::from(data))
            };
            sent.map_err(|e| EngineError::DataChannel(DataChannelError::Failed(e.to_string())))
        })
        .unwrap_or_else(|| Err(EngineError::Internal("WebRTC stack failure".into())));
        match result {
            Ok(()) => {
                self.metrics.data_messages_out.inc();
                Ok(peer_id)
            }
            Err(e) => {
                self.metrics.data_messages_dropped.inc();
                Err(e)
            }
        }
    }

    /// Reconciles the publisher peer's receiving transceivers with the published tracks.
    fn sync_published_tracks(&mut self, now: Instant, peer_id: PeerId) -> Vec<(String, TrackId)> {
        let Some(peer) = self.peers.get_mut(&peer_id) else { return vec![] };
        let participant = peer.participant;
        // (rtc track id, receiver, kind, codec params, pt→codec)
        let mut live: Vec<(String, RTCRtpReceiverId, MediaKind, Option<(Codec, RTCRtpCodec)>)> = Vec::new();
        let transceivers: Vec<RTCRtpTransceiverId> = peer.pc.get_transceivers().collect();
        for t in transceivers {
            let Some(tr) = peer.pc.rtp_transceiver(t) else { continue };
            if !tr.current_direction().has_recv() {
                continue;
            }
            let Some(receiver_id) = tr.receiver() else { continue };
            let Some(mut receiver) = peer.pc.rtp_receiver(receiver_id) else { continue };
            let kind = match receiver.track().kind() {
                RtpCodecKind::Audio => MediaKind::Audio,
                RtpCodecKind::Video => MediaKind::Video,
                _ => continue,
            };
            let track_id = receiver.track().track_id().clone();
            let mut codec = None;
            for c in &receiver.get_parameters().rtp_parameters.codecs {
                if let Some(known) = Codec::from_mime(&c.rtp_codec.mime_type) {
                    peer.pt_codecs.insert(c.payload_type, known);
                    if codec.is_none() && known.kind() == kind {
                        codec = Some((known, c.rtp_codec.clone()));
                    }
                }
            }
            live.push((track_id, receiver_id, kind, codec));
        }
        let gone: Vec<TrackId> = peer.published.iter().filter(|(rid, _)| !live.iter().any(|l| &l.0 == *rid)).map(|(_, t)| *t).collect();
        let mut result = Vec::new();
        let mut added = Vec::new();
        for (rtc_id, receiver, kind, codec) in live {
            if let Some(existing) = self.peers[&peer_id].published.get(&rtc_id) {
                result.push((rtc_id, *existing));
                continue;
            }
            let id = TrackId(self.new_id());
            let decl = self.participants.get_mut(&participant).and_then(|p| p.declared.remove(&rtc_id));
            let source = decl.as_ref().map(|d| d.source).unwrap_or(match kind {
                MediaKind::Audio => TrackSource::Microphone,
                MediaKind::Video => TrackSource::Camera,
            });
            let name = decl.map(|d| d.name).unwrap_or_default();
            let (codec, codec_params) = match codec {
                Some((c, p)) => (Some(c), Some(p)),
                None => (None, None),
            };
            self.tracks.insert(
                id,
                PublishedTrack {
                    id,
                    owner: participant,
                    peer: peer_id,
                    receiver,
                    kind,
                    source,
                    name,
                    codec,
                    codec_params,
                    muted: false,
                    layers: Vec::new(),
                    spatial: Vec::new(),
                    subscribers: Vec::new(),
                    audio_level_ext: None,
                },
            );
            if let Some(peer) = self.peers.get_mut(&peer_id) {
                peer.published.insert(rtc_id.clone(), id);
            }
            if let Some(p) = self.participants.get_mut(&participant) {
                p.tracks.push(id);
            }
            result.push((rtc_id, id));
            added.push(id);
        }
        for t in gone {
            self.unpublish(now, t);
        }
        if let Some(room) = self.participants.get(&participant).map(|p| p.room.clone()) {
            for &t in &added {
                let info = self.tracks[&t].info();
                info!(room = %room, participant = %participant, track = %t, kind = ?info.kind, codec = ?info.codec, "track published");
                self.broadcast(&room, None, ParticipantEvent::TrackPublished { participant, track: info });
                let subscribers: Vec<ParticipantId> = self.rooms[&room]
                    .participants
                    .iter()
                    .copied()
                    .filter(|p| *p != participant && self.participants[p].kind == ParticipantKind::WebSocket && self.participants[p].grants.subscribe)
                    .collect();
                for s in subscribers {
                    self.subscribe(now, s, t);
                }
            }
            if !added.is_empty() {
                self.bind_whep_slots(&room);
            }
        }
        self.update_gauges();
        result
    }

    /// Adds a down track for `track` to `subscriber`'s subscriber connection.
    fn subscribe(&mut self, now: Instant, subscriber: ParticipantId, track: TrackId) {
        let Some(t) = self.tracks.get(&track) else { return };
        let (Some(codec), Some(params)) = (t.codec, t.codec_params.clone()) else {
            warn!(track = %track, "track has no forwardable codec; not subscribing");
            return;
        };
        let (kind, owner) = (t.kind, t.owner);
        let peer_id = match self.participants.get(&subscriber).and_then(|p| p.subscriber) {
            Some(p) => p,
            None => match self.create_peer(now, subscriber, PeerRole::Subscriber) {
                Ok(p) => {
                    if let Some(s) = self.participants.get_mut(&subscriber) {
                        s.subscriber = Some(p);
                    }
                    p
                }
                Err(e) => {
                    warn!(error = %e, "cannot create subscriber connection");
                    return;
                }
            },
        };
        let ssrc = self.rng.random::<u32>();
        let rtx_ssrc = self.rng.random::<u32>();
        let dt_id = DownTrackId(self.new_id());
        let mut forwarder = Forwarder::new(kind, codec.clock_rate(), self.rng.random(), self.rng.random());
        let muted = self.tracks[&track].muted;
        forwarder.set_muted(muted);
        let rtc_kind = if kind == MediaKind::Audio { RtpCodecKind::Audio } else { RtpCodecKind::Video };
        let mst = media_stream_track(&owner.to_string(), &track.to_string(), rtc_kind, ssrc, (kind == MediaKind::Video).then_some(rtx_ssrc), &params);
        let Some(peer) = self.peers.get_mut(&peer_id) else { return };
        // The server only sends on subscriber connections: sendonly, not the sendrecv add_track
        // would leave (it reuses an m-line freed by an earlier removal when it can).
        let sender = match guarded(&self.metrics, "add_track", || {
            let sender = peer.pc.add_track(mst)?;
            if let Some(mut t) = peer.pc.rtp_transceiver(RTCRtpTransceiverId::from(sender)) {
                t.set_direction(rtc::rtp_transceiver::RTCRtpTransceiverDirection::Sendonly);
            }
            Ok::<_, rtc::shared::error::Error>(sender)
        }) {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                warn!(track = %track, error = %e, "subscriber connection refused the track");
                return;
            }
            None => return self.fail_peer(now, peer_id),
        };
        peer.down.insert(dt_id, DownTrack::new(sender, ssrc, rtx_ssrc, kind, codec, params, forwarder, Some(track)));
        peer.down_by_ssrc.insert(ssrc, dt_id);
        peer.down_by_ssrc.insert(rtx_ssrc, dt_id);
        peer.negotiation_needed = true;
        self.to_negotiate.push(peer_id);
        if let Some(t) = self.tracks.get_mut(&track) {
            t.subscribers.push((peer_id, dt_id));
        }
        self.update_gauges();
    }

    /// Binds free WHEP slots in `room` to the watched identity's tracks.
    fn bind_whep_slots(&mut self, room: &RoomName) {
        let Some(r) = self.rooms.get(room) else { return };
        let viewers: Vec<(PeerId, String)> = r
            .participants
            .iter()
            .filter_map(|p| {
                let p = &self.participants[p];
                match (&p.kind, p.subscriber) {
                    (ParticipantKind::Whep { target_identity }, Some(peer)) => Some((peer, target_identity.clone())),
                    _ => None,
                }
            })
            .collect();
        let tracks = self.room_tracks(room);
        for (peer_id, target) in viewers {
            let Some(peer) = self.peers.get(&peer_id) else { continue };
            let mut free: Vec<(DownTrackId, MediaKind)> = peer.down.iter().filter(|(_, d)| d.source_track.is_none()).map(|(id, d)| (*id, d.kind)).collect();
            free.sort_by_key(|(id, _)| *id);
            let bound: Vec<TrackId> = peer.down.values().filter_map(|d| d.source_track).collect();
            for (dt_id, kind) in free {
                let candidate = tracks.iter().copied().find(|t| {
                    let tr = &self.tracks[t];
                    tr.kind == kind && !bound.contains(t) && self.participants[&tr.owner].identity == target
                });
                let Some(track) = candidate else { continue };
                let muted = self.tracks[&track].muted;
                if let Some(d) = self.peers.get_mut(&peer_id).and_then(|p| p.down.get_mut(&dt_id)) {
                    d.source_track = Some(track);
                    d.forwarder.reset_source();
                    d.forwarder.set_muted(muted);
                }
                if let Some(t) = self.tracks.get_mut(&track) {
                    t.subscribers.push((peer_id, dt_id));
                }
                debug!(track = %track, "WHEP slot bound");
            }
        }
    }

    fn unpublish(&mut self, now: Instant, track: TrackId) {
        let Some(t) = self.tracks.remove(&track) else { return };
        if let Some(peer) = self.peers.get_mut(&t.peer) {
            peer.published.retain(|_, id| *id != track);
            peer.ssrc_tracks.retain(|_, id| *id != track);
        }
        if let Some(p) = self.participants.get_mut(&t.owner) {
            p.tracks.retain(|id| *id != track);
        }
        let mut rebinding = false;
        for (peer_id, dt_id) in t.subscribers {
            let Some(peer) = self.peers.get_mut(&peer_id) else { continue };
            if peer.role == PeerRole::Whep {
                // The slot stays negotiated; it waits for the next track of the identity.
                if let Some(d) = peer.down.get_mut(&dt_id) {
                    self.metrics.forget_down_track(&peer.participant.to_string(), &track.to_string());
                    d.source_track = None;
                    d.forwarder.reset_source();
                }
                rebinding = true;
                continue;
            }
            if let Some(d) = peer.down.remove(&dt_id) {
                self.metrics.forget_down_track(&peer.participant.to_string(), &track.to_string());
                peer.down_by_ssrc.remove(&d.out_ssrc);
                peer.down_by_ssrc.remove(&d.rtx_ssrc);
                let _ = guarded(&self.metrics, "remove_track", || {
                    let removed = peer.pc.remove_track(d.sender);
                    // A freed m-line is inactive (nothing flows either way) until reused.
                    if let Some(mut t) = peer.pc.rtp_transceiver(RTCRtpTransceiverId::from(d.sender)) {
                        t.set_direction(rtc::rtp_transceiver::RTCRtpTransceiverDirection::Inactive);
                    }
                    removed
                });
                peer.negotiation_needed = true;
                self.to_negotiate.push(peer_id);
            }
        }
        if let Some(room) = self.participants.get(&t.owner).map(|p| p.room.clone()) {
            info!(room = %room, track = %track, "track unpublished");
            self.broadcast(&room, None, ParticipantEvent::TrackUnpublished { participant: t.owner, track });
            if rebinding {
                self.bind_whep_slots(&room);
            }
        }
        let _ = now;
        self.update_gauges();
    }

    fn remove_participant(&mut self, now: Instant, id: ParticipantId, reason: LeaveReason) {
        let Some(p) = self.participants.get(&id) else { return };
        let (room, tracks, peers, kind) = (p.room.clone(), p.tracks.clone(), [p.publisher, p.subscriber], p.kind.clone());
        for t in tracks {
            self.unpublish(now, t);
        }
        for peer_id in peers.into_iter().flatten() {
            self.close_peer(now, peer_id);
        }
        self.participants.remove(&id);
        if let Some(r) = self.rooms.get_mut(&room) {
            r.participants.retain(|p| *p != id);
            r.speakers.remove(id);
            if r.participants.is_empty() {
                self.rooms.remove(&room);
            }
        }
        info!(room = %room, participant = %id, reason = reason.as_str(), "participant left");
        if !matches!(kind, ParticipantKind::Whep { .. }) {
            self.broadcast(&room, None, ParticipantEvent::ParticipantLeft { participant: id, reason });
        }
        if reason != LeaveReason::Left {
            self.emit(id, ParticipantEvent::Removed { reason });
        }
        self.update_gauges();
    }

    fn close_peer(&mut self, now: Instant, peer_id: PeerId) {
        let Some(mut peer) = self.peers.remove(&peer_id) else { return };
        // Detach its down tracks from their sources.
        for (dt_id, d) in &peer.down {
            if let Some(track) = d.source_track {
                self.metrics.forget_down_track(&peer.participant.to_string(), &track.to_string());
            }
            if let Some(t) = d.source_track.and_then(|t| self.tracks.get_mut(&t)) {
                t.subscribers.retain(|(p, id)| !(*p == peer_id && id == dt_id));
            }
        }
        if let Some(at) = peer.deadline {
            self.deadlines.remove(&(at, peer_id));
        }
        self.demux.remove_peer(peer_id);
        // Let the stack say goodbye (DTLS close_notify) before it is dropped.
        if guarded(&self.metrics, "close", || peer.pc.close()).is_some() {
            while let Some(Some(out)) = guarded(&self.metrics, "poll_write", || peer.pc.poll_write()) {
                self.push_transmit(out);
            }
        }
        let _ = now;
        self.update_gauges();
    }

    /// A peer whose stack panicked or failed: its participant goes.
    fn fail_peer(&mut self, now: Instant, peer_id: PeerId) {
        let Some(participant) = self.peers.get(&peer_id).map(|p| p.participant) else { return };
        // Do not try to talk to a stack that just panicked.
        if let Some(peer) = self.peers.get_mut(&peer_id) {
            peer.down.clear();
        }
        self.remove_participant(now, participant, LeaveReason::Disconnected);
    }

    fn push_transmit(&mut self, out: TaggedBytesMut) {
        self.metrics.udp_datagrams_out.inc();
        self.metrics.udp_bytes_out.inc_by(out.message.len() as u64);
        self.outputs.push_back(Output::Transmit { local: out.transport.local_addr, remote: out.transport.peer_addr, data: out.message });
    }

    /// Renegotiates pending subscriber connections, collects every datagram the touched peers
    /// want to send, and refreshes their deadlines.
    fn flush(&mut self, now: Instant) {
        let pending = std::mem::take(&mut self.to_negotiate);
        for peer_id in pending {
            self.negotiate(now, peer_id);
        }
        let dirty = std::mem::take(&mut self.dirty);
        for peer_id in dirty {
            let Some(peer) = self.peers.get_mut(&peer_id) else { continue };
            peer.dirty = false;
            let mut outs = Vec::new();
            let ok = loop {
                match guarded(&self.metrics, "poll_write", || peer.pc.poll_write()) {
                    Some(Some(out)) => outs.push(out),
                    Some(None) => break true,
                    None => break false,
                }
            };
            let next = if ok { guarded(&self.metrics, "poll_timeout", || peer.pc.poll_timeout()) } else { None };
            let old = peer.deadline;
            let new = next.flatten();
            peer.deadline = new;
            for out in outs {
                self.push_transmit(out);
            }
            if old != new {
                if let Some(at) = old {
                    self.deadlines.remove(&(at, peer_id));
                }
                if let Some(at) = new {
                    self.deadlines.insert((at, peer_id));
                }
            }
            if !ok {
                self.fail_peer(now, peer_id);
            }
        }
    }

    /// Sends a new offer on a subscriber connection if one is needed and none is outstanding.
    fn negotiate(&mut self, now: Instant, peer_id: PeerId) {
        let Some(peer) = self.peers.get_mut(&peer_id) else { return };
        if peer.role != PeerRole::Subscriber || peer.offer_in_flight || !peer.negotiation_needed {
            return;
        }
        let result = guarded(&self.metrics, "create_offer", || -> Result<String, rtc::shared::error::Error> {
            let offer = peer.pc.create_offer(None)?;
            let sdp = offer.sdp.clone();
            peer.pc.set_local_description(now, offer)?;
            Ok(sdp)
        });
        let sdp = match result {
            Some(Ok(sdp)) => sdp,
            Some(Err(e)) => {
                warn!(peer = peer_id.0, error = %e, "cannot create subscriber offer");
                return;
            }
            None => return self.fail_peer(now, peer_id),
        };
        peer.offer_in_flight = true;
        peer.negotiation_needed = false;
        let mut tracks = Vec::new();
        for d in peer.down.values() {
            let Some(track) = d.source_track else { continue };
            let tid: RTCRtpTransceiverId = d.sender.into();
            if let Some(mid) = peer.pc.rtp_transceiver(tid).and_then(|t| t.mid().clone()) {
                tracks.push((mid, track));
            }
        }
        let participant = peer.participant;
        self.mark_dirty(peer_id);
        self.emit(participant, ParticipantEvent::SubscriberOffer { sdp, tracks });
    }

    fn update_gauges(&self) {
        self.metrics.rooms.set(self.rooms.len() as i64);
        self.metrics.participants.set(self.participants.len() as i64);
        self.metrics.peers.set(self.peers.len() as i64);
        let audio = self.tracks.values().filter(|t| t.kind == MediaKind::Audio).count();
        self.metrics.tracks_audio.set(audio as i64);
        self.metrics.tracks_video.set((self.tracks.len() - audio) as i64);
        self.metrics.down_tracks.set(self.peers.values().map(|p| p.down.len()).sum::<usize>() as i64);
    }
}

/// After an answer, learns the payload type each down track must carry.
fn refresh_payload_types(peer: &mut Peer) {
    for d in peer.down.values_mut() {
        let Some(codecs) = peer.pc.rtp_sender(d.sender).map(|mut s| s.get_parameters().rtp_parameters.codecs.clone()) else {
            d.out_pt = None;
            continue;
        };
        let same_mime = |c: &&rtc::rtp_transceiver::rtp_sender::RTCRtpCodecParameters| c.rtp_codec.mime_type.eq_ignore_ascii_case(&d.codec_params.mime_type);
        let pt = codecs
            .iter()
            .filter(same_mime)
            .find(|c| d.codec != Codec::H264 || same_h264_profile(&c.rtp_codec.sdp_fmtp_line, &d.codec_params.sdp_fmtp_line))
            .or_else(|| codecs.iter().find(same_mime))
            .map(|c| c.payload_type);
        d.rtx_pt = pt.and_then(|pt| {
            codecs
                .iter()
                .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case("video/rtx") && c.rtp_codec.sdp_fmtp_line.split(';').any(|kv| kv.trim() == format!("apt={pt}")))
                .map(|c| c.payload_type)
        });
        d.out_pt = pt;
    }
}

fn same_h264_profile(a: &str, b: &str) -> bool {
    fn profile(fmtp: &str) -> Option<String> {
        fmtp.split(';').find_map(|kv| kv.trim().strip_prefix("profile-level-id=")).map(|v| v[..v.len().min(4)].to_ascii_lowercase())
    }
    profile(a) == profile(b)
}

fn media_stream_track(stream_id: &str, track_id: &str, kind: RtpCodecKind, ssrc: u32, rtx_ssrc: Option<u32>, codec: &RTCRtpCodec) -> MediaStreamTrack {
    MediaStreamTrack::new(
        stream_id.to_owned(),
        track_id.to_owned(),
        track_id.to_owned(),
        kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                rtx: rtx_ssrc.map(|ssrc| rtc::rtp_transceiver::rtp_sender::RTCRtpRtxParameters { ssrc }),
                ..Default::default()
            },
            codec: codec.clone(),
            ..Default::default()
        }],
    )
}

/// The audio/video m-lines an offer wants to receive on, in order, with the codecs each offers
/// (WHEP).
fn receive_kinds(sdp: &str) -> Vec<(MediaKind, Vec<Codec>)> {
    let mut out = Vec::new();
    let mut current: Option<(MediaKind, bool, Vec<Codec>)> = None;
    let mut close = |current: &mut Option<(MediaKind, bool, Vec<Codec>)>| {
        if let Some((kind, true, codecs)) = current.take() {
            out.push((kind, codecs));
        }
    };
    for line in sdp.lines().map(str::trim) {
        if let Some(m) = line.strip_prefix("m=") {
            close(&mut current);
            let mut parts = m.split_whitespace();
            let kind = match parts.next() {
                Some("audio") => Some(MediaKind::Audio),
                Some("video") => Some(MediaKind::Video),
                _ => None,
            };
            let port_open = parts.next().is_some_and(|p| p != "0");
            current = kind.map(|k| (k, port_open, Vec::new()));
        } else if let Some((_, receives, codecs)) = current.as_mut() {
            if line == "a=sendonly" || line == "a=inactive" {
                *receives = false;
            } else if let Some(map) = line.strip_prefix("a=rtpmap:") {
                // a=rtpmap:<pt> <name>/<clock>[/<channels>]
                if let Some(c) = map.split_whitespace().nth(1).and_then(|n| n.split('/').next()).and_then(Codec::from_mime)
                    && !codecs.contains(&c)
                {
                    codecs.push(c);
                }
            }
        }
    }
    close(&mut current);
    out
}

/// Whether an offer has an audio/video m-line the client sends on (cheap textual check used only
/// for the publish-grant decision; the stack parses the SDP for real).
fn sdp_sends_media(sdp: &str) -> bool {
    let mut in_media = false;
    let mut direction_sends = true;
    let mut any = false;
    for line in sdp.lines() {
        let line = line.trim();
        if let Some(m) = line.strip_prefix("m=") {
            if in_media && direction_sends {
                any = true;
            }
            in_media = m.starts_with("audio") || m.starts_with("video");
            direction_sends = true;
        } else if line == "a=recvonly" || line == "a=inactive" {
            direction_sends = false;
        }
    }
    any || (in_media && direction_sends)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_media_table() {
        let cases = [
            ("v=0\r\nm=audio 9 UDP 111\r\na=sendrecv\r\n", true),
            ("v=0\r\nm=audio 9 UDP 111\r\na=recvonly\r\n", false),
            ("v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n", false),
            ("v=0\r\nm=video 9 UDP 96\r\na=inactive\r\nm=audio 9 UDP 111\r\na=sendonly\r\n", true),
            ("v=0\r\nm=video 9 UDP 96\r\na=sendonly\r\nm=application 9 UDP/DTLS/SCTP x\r\n", true),
            ("", false),
        ];
        for (sdp, want) in cases {
            assert_eq!(sdp_sends_media(sdp), want, "{sdp:?}");
        }
    }

    #[test]
    fn receive_kinds_table() {
        let a = MediaKind::Audio;
        let v = MediaKind::Video;
        let cases: Vec<(&str, Vec<(MediaKind, Vec<Codec>)>)> = vec![
            (
                "m=audio 9 UDP 111\r\na=rtpmap:111 opus/48000/2\r\na=recvonly\r\nm=video 9 UDP 96 102\r\na=recvonly\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:97 rtx/90000\r\na=rtpmap:102 H264/90000\r\n",
                vec![(a, vec![Codec::Opus]), (v, vec![Codec::Vp8, Codec::H264])],
            ),
            ("m=video 9 UDP 96\r\na=sendrecv\r\n", vec![(v, vec![])]),
            ("m=video 9 UDP 96\r\na=sendonly\r\nm=audio 9 UDP 111\r\n", vec![(a, vec![])]),
            ("m=video 0 UDP 96\r\na=recvonly\r\n", vec![]),
            ("m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n", vec![]),
            ("m=audio 9 UDP 111\r\na=inactive\r\n", vec![]),
            ("", vec![]),
        ];
        for (sdp, want) in cases {
            assert_eq!(receive_kinds(sdp), want, "{sdp:?}");
        }
    }

    #[test]
    fn h264_profiles_compare_by_profile_idc_and_iop() {
        assert!(same_h264_profile("packetization-mode=1;profile-level-id=42e01f", "profile-level-id=42E034;packetization-mode=1"));
        assert!(!same_h264_profile("profile-level-id=42e01f", "profile-level-id=42001f"));
        assert!(same_h264_profile("", ""));
    }
}
