//! The forwarding decision for one down track (one published track → one subscriber): forward
//! with rewritten sequence number and timestamp, or drop with a reason. Pure: the caller passes
//! the packet's facts and `now`, and acts on the verdict.

use std::time::Instant;

use warbler_media::MediaKind;

use crate::munger::{MungeError, Munger, SourceKey};

/// Why a packet was not forwarded. Every drop in the engine has one; each has a counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Video down track (re)starting: waiting for a keyframe of the source.
    WaitingForKeyframe,
    /// The packet belongs to before the current source segment started.
    BeforeSwitch,
    /// From a source that is not the one this down track currently forwards.
    NotCurrentSource,
    /// The publisher muted the track.
    Muted,
    /// The subscriber's connection is not negotiated or not connected yet.
    NotReady,
    /// The subscriber did not accept the track's codec.
    CodecUnsupported,
    /// Padding-only packet (probing); not useful to subscribers.
    PaddingOnly,
    /// The packet arrived on a publisher stream the engine does not know.
    UnknownTrack,
    /// The SRTP/ICE stack refused the write.
    WriteFailed,
    /// A NACK asked for a packet no longer (or never) in the cache.
    NotInCache,
    /// A datagram no peer claims (unknown ufrag or remote address).
    UnknownPeer,
    /// A datagram that is not STUN, DTLS, RTP or RTCP.
    Malformed,
}

impl DropReason {
    pub const ALL: [DropReason; 12] = [
        DropReason::WaitingForKeyframe,
        DropReason::BeforeSwitch,
        DropReason::NotCurrentSource,
        DropReason::Muted,
        DropReason::NotReady,
        DropReason::CodecUnsupported,
        DropReason::PaddingOnly,
        DropReason::UnknownTrack,
        DropReason::WriteFailed,
        DropReason::NotInCache,
        DropReason::UnknownPeer,
        DropReason::Malformed,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::WaitingForKeyframe => "waiting_for_keyframe",
            DropReason::BeforeSwitch => "before_switch",
            DropReason::NotCurrentSource => "not_current_source",
            DropReason::Muted => "muted",
            DropReason::NotReady => "not_ready",
            DropReason::CodecUnsupported => "codec_unsupported",
            DropReason::PaddingOnly => "padding_only",
            DropReason::UnknownTrack => "unknown_track",
            DropReason::WriteFailed => "write_failed",
            DropReason::NotInCache => "not_in_cache",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::Malformed => "malformed",
        }
    }
}

/// The facts about one incoming packet that forwarding needs.
#[derive(Clone, Copy, Debug)]
pub struct PacketMeta {
    pub source: SourceKey,
    pub ext_seq: u64,
    pub ext_ts: u64,
    pub marker: bool,
    pub keyframe_start: bool,
    /// Payload is empty (padding only).
    pub padding_only: bool,
}

/// The decision for one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Forward { ext_seq: u64, ext_ts: u64, marker: bool },
    Drop(DropReason),
}

/// Forwarding state of one down track.
#[derive(Clone, Debug)]
pub struct Forwarder {
    kind: MediaKind,
    munger: Munger,
    /// Set when the next forwarded packet must start a new segment (start, source change, unmute).
    resync: bool,
    muted: bool,
    /// The source this down track should forward; packets of other sources are dropped.
    wanted_source: Option<SourceKey>,
}

impl Forwarder {
    pub fn new(kind: MediaKind, clock_rate: u32, initial_seq: u16, initial_ts: u32) -> Self {
        Self {
            kind,
            munger: Munger::new(clock_rate, initial_seq, initial_ts),
            resync: true,
            muted: false,
            wanted_source: None,
        }
    }

    /// Chooses the source to forward from now on. A change takes effect at the next decodable
    /// packet of the new source (a keyframe for video).
    pub fn set_source(&mut self, source: Option<SourceKey>) {
        if self.wanted_source != source {
            self.wanted_source = source;
            self.resync = true;
        }
    }

    pub fn source(&self) -> Option<SourceKey> {
        self.wanted_source
    }

    pub fn set_muted(&mut self, muted: bool) {
        if muted && !self.muted {
            self.munger.end_segment();
        }
        if !muted && self.muted {
            self.resync = true;
        }
        self.muted = muted;
    }

    /// True while a video down track waits for a keyframe (the engine asks the publisher).
    pub fn needs_keyframe(&self) -> bool {
        self.kind == MediaKind::Video && self.resync && self.wanted_source.is_some() && !self.muted
    }

    pub fn on_packet(&mut self, now: Instant, p: &PacketMeta) -> Verdict {
        if self.wanted_source != Some(p.source) {
            return Verdict::Drop(DropReason::NotCurrentSource);
        }
        if self.muted {
            return Verdict::Drop(DropReason::Muted);
        }
        if self.resync {
            if p.padding_only {
                return Verdict::Drop(DropReason::PaddingOnly);
            }
            if self.kind == MediaKind::Video && !p.keyframe_start {
                return Verdict::Drop(DropReason::WaitingForKeyframe);
            }
            self.munger.start_segment(p.source, p.ext_seq, p.ext_ts, now);
            self.resync = false;
        } else if p.padding_only {
            self.munger.skip(p.source, p.ext_seq);
            return Verdict::Drop(DropReason::PaddingOnly);
        }
        match self.munger.munge(p.source, p.ext_seq, p.ext_ts, now) {
            Ok((ext_seq, ext_ts)) => Verdict::Forward { ext_seq, ext_ts, marker: p.marker },
            Err(MungeError::BeforeSegment) => Verdict::Drop(DropReason::BeforeSwitch),
            Err(MungeError::NotCurrentSource) => Verdict::Drop(DropReason::NotCurrentSource),
        }
    }

    /// Maps a NACKed output sequence number to the source packet to resend, and the output
    /// (seq, ts) it must carry.
    pub fn retransmission(&self, out_wire_seq: u16, in_ext_ts: impl FnOnce(SourceKey, u64) -> Option<u64>) -> Option<Retransmit> {
        let (source, in_seq) = self.munger.unmunge_seq(out_wire_seq)?;
        let in_ts = in_ext_ts(source, in_seq)?;
        let out_ts = self.munger.ts_for(source, in_ts)?;
        Some(Retransmit { source, in_ext_seq: in_seq, out_ext_ts: out_ts, out_wire_seq })
    }
}

/// A packet to resend from the cache in answer to a NACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retransmit {
    pub source: SourceKey,
    pub in_ext_seq: u64,
    pub out_ext_ts: u64,
    pub out_wire_seq: u16,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const A: SourceKey = SourceKey { track: 1, ssrc: 10 };
    const B: SourceKey = SourceKey { track: 2, ssrc: 20 };
    const C16: u64 = 1 << 16;
    const C32: u64 = 1 << 32;

    fn pkt(source: SourceKey, seq: u64, ts: u64, key: bool) -> PacketMeta {
        PacketMeta { source, ext_seq: C16 + seq, ext_ts: C32 + ts, marker: false, keyframe_start: key, padding_only: false }
    }

    fn fwd(seq: u16, ts: u32) -> (u16, u32) {
        (seq, ts)
    }

    fn wire(v: Verdict) -> Result<(u16, u32), DropReason> {
        match v {
            Verdict::Forward { ext_seq, ext_ts, .. } => Ok((ext_seq as u16, ext_ts as u32)),
            Verdict::Drop(r) => Err(r),
        }
    }

    #[test]
    fn video_waits_for_keyframe_then_forwards_contiguously() {
        let t = Instant::now();
        let mut f = Forwarder::new(MediaKind::Video, 90_000, 500, 0);
        assert!(!f.needs_keyframe(), "no source yet");
        f.set_source(Some(A));
        assert!(f.needs_keyframe());
        let rows = [
            (pkt(A, 1, 0, false), Err(DropReason::WaitingForKeyframe)),
            (pkt(A, 2, 0, false), Err(DropReason::WaitingForKeyframe)),
            (pkt(B, 3, 3000, true), Err(DropReason::NotCurrentSource)),
            (pkt(A, 3, 3000, true), Ok(fwd(500, 0))),
            (pkt(A, 4, 3000, false), Ok(fwd(501, 0))),
            (pkt(A, 2, 0, false), Err(DropReason::BeforeSwitch)),
            (pkt(A, 5, 6000, false), Ok(fwd(502, 3000))),
        ];
        for (i, (p, want)) in rows.iter().enumerate() {
            assert_eq!(wire(f.on_packet(t, p)), *want, "row {i}");
        }
        assert!(!f.needs_keyframe());
    }

    #[test]
    fn audio_starts_on_any_packet() {
        let t = Instant::now();
        let mut f = Forwarder::new(MediaKind::Audio, 48_000, 7, 100);
        f.set_source(Some(A));
        assert!(!f.needs_keyframe());
        assert_eq!(wire(f.on_packet(t, &pkt(A, 9, 960, false))), Ok((7, 100)));
        assert_eq!(wire(f.on_packet(t, &pkt(A, 10, 1920, false))), Ok((8, 1060)));
    }

    #[test]
    fn source_switch_is_continuous_across_keyframe() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(MediaKind::Video, 90_000, 65535, 0);
        f.set_source(Some(A));
        assert_eq!(wire(f.on_packet(t0, &pkt(A, 100, 0, true))), Ok((65535, 0)));
        assert_eq!(wire(f.on_packet(t0, &pkt(A, 101, 0, false))), Ok((0, 0)));
        f.set_source(Some(B));
        let t1 = t0 + Duration::from_millis(50);
        assert_eq!(wire(f.on_packet(t1, &pkt(A, 102, 3000, false))), Err(DropReason::NotCurrentSource));
        assert_eq!(wire(f.on_packet(t1, &pkt(B, 9000, 55, false))), Err(DropReason::WaitingForKeyframe));
        assert_eq!(wire(f.on_packet(t1, &pkt(B, 9001, 3055, true))), Ok((1, 4500)));
        assert_eq!(wire(f.on_packet(t1, &pkt(B, 9002, 3055, false))), Ok((2, 4500)));
    }

    #[test]
    fn mute_drops_and_unmute_resumes_without_gap() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(MediaKind::Video, 90_000, 0, 0);
        f.set_source(Some(A));
        assert_eq!(wire(f.on_packet(t0, &pkt(A, 1, 0, true))), Ok((0, 0)));
        f.set_muted(true);
        assert!(!f.needs_keyframe());
        assert_eq!(wire(f.on_packet(t0, &pkt(A, 2, 0, false))), Err(DropReason::Muted));
        assert_eq!(wire(f.on_packet(t0, &pkt(A, 3, 0, true))), Err(DropReason::Muted));
        f.set_muted(false);
        assert!(f.needs_keyframe());
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(wire(f.on_packet(t1, &pkt(A, 50, 90_000, false))), Err(DropReason::WaitingForKeyframe));
        assert_eq!(wire(f.on_packet(t1, &pkt(A, 51, 90_000, true))), Ok((1, 90_000)));
    }

    #[test]
    fn padding_is_dropped_without_a_gap() {
        let t = Instant::now();
        let mut f = Forwarder::new(MediaKind::Video, 90_000, 0, 0);
        f.set_source(Some(A));
        let mut pad = pkt(A, 1, 0, false);
        pad.padding_only = true;
        assert_eq!(wire(f.on_packet(t, &pad)), Err(DropReason::PaddingOnly));
        assert_eq!(wire(f.on_packet(t, &pkt(A, 2, 0, true))), Ok((0, 0)));
        let mut pad = pkt(A, 3, 0, false);
        pad.padding_only = true;
        assert_eq!(wire(f.on_packet(t, &pad)), Err(DropReason::PaddingOnly));
        assert_eq!(wire(f.on_packet(t, &pkt(A, 4, 0, false))), Ok((1, 0)));
    }

    #[test]
    fn nack_maps_to_cached_source_packet() {
        let t = Instant::now();
        let mut f = Forwarder::new(MediaKind::Video, 90_000, 10, 1000);
        f.set_source(Some(A));
        f.on_packet(t, &pkt(A, 200, 0, true));
        f.on_packet(t, &pkt(A, 201, 3000, false));
        let r = f.retransmission(11, |src, seq| (src == A && seq == C16 + 201).then_some(C32 + 3000)).unwrap();
        assert_eq!(r.in_ext_seq, C16 + 201);
        assert_eq!(r.out_ext_ts as u32, 4000);
        assert!(f.retransmission(12, |_, _| Some(0)).is_none());
    }
}
