//! The forwarding decision for one down track (one published track → one subscriber): forward
//! with rewritten sequence number, timestamp (and VP8 picture ids), or drop with a reason. Pure:
//! the caller passes the packet's facts and `now`, and acts on the verdict.
//!
//! Simulcast: a down track receives one spatial layer at a time. The allocator sets a *target*
//! (spatial, temporal); the forwarder keeps sending the *current* layer until a keyframe of a
//! layer closer to the target arrives, then switches there (a new munger segment, so the output
//! stays one continuous stream). Temporal layers above the target are dropped frame by frame and
//! their sequence numbers and picture ids closed up.

use std::time::Instant;

use warbler_media::MediaKind;
use warbler_media::vp8::Vp8Rewrite;

use crate::munger::{MungeError, Munger, SourceKey};

/// Why a packet was not forwarded. Every drop in the engine has one; each has a counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Video down track (re)starting: waiting for a keyframe of the source.
    WaitingForKeyframe,
    /// The packet belongs to before the current source segment started.
    BeforeSwitch,
    /// From a layer or source that is not the one this down track currently forwards.
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
    /// A temporal layer above the down track's target.
    TemporalLayer,
    /// The allocator paused the down track (no bandwidth, not visible).
    Paused,
}

impl DropReason {
    /// In declaration order (the discriminant indexes this array).
    pub const ALL: [DropReason; 14] = [
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
        DropReason::TemporalLayer,
        DropReason::Paused,
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
            DropReason::TemporalLayer => "temporal_layer",
            DropReason::Paused => "paused",
        }
    }
}

/// VP8 descriptor fields of a packet (when present).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vp8Fields {
    pub picture_id: u16,
    pub picture_id_15bit: bool,
    pub tl0_pic_idx: Option<u8>,
    pub key_idx: Option<u8>,
}

/// The facts about one incoming packet that forwarding needs.
#[derive(Clone, Copy, Debug)]
pub struct PacketMeta {
    pub source: SourceKey,
    /// Spatial index of the packet's layer among the track's layers (0 = lowest).
    pub spatial: u8,
    pub temporal: u8,
    pub ext_seq: u64,
    pub ext_ts: u64,
    pub marker: bool,
    pub keyframe_start: bool,
    pub frame_start: bool,
    /// VP8 layer sync (Y bit): safe point to switch up to this temporal layer.
    pub layer_sync: bool,
    /// Padding only (empty payload).
    pub padding_only: bool,
    /// Capture time on the publisher's NTP clock (seconds), from the layer's sender reports.
    pub capture: Option<f64>,
    pub vp8: Option<Vp8Fields>,
}

/// The decision for one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Forward { ext_seq: u64, ext_ts: u64, marker: bool, vp8: Option<Vp8Rewrite> },
    Drop(DropReason),
}

/// The layer a down track should receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub spatial: u8,
    pub temporal: u8,
}

impl Target {
    /// Everything (non-simulcast tracks, audio).
    pub const FULL: Target = Target { spatial: u8::MAX, temporal: u8::MAX };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Current {
    source: SourceKey,
    spatial: u8,
}

/// Renumbering of VP8 picture ids, TL0PICIDX and KEYIDX so they stay continuous across layer
/// switches and dropped temporal-layer frames (receivers use them to find references).
#[derive(Clone, Copy, Debug, Default)]
struct Vp8Munger {
    /// out = in + offset (15-bit, 8-bit, 5-bit arithmetic).
    pid_offset: u16,
    tl0_offset: u8,
    keyidx_offset: u8,
    highest_in_pid: Option<u16>,
    last_out: Option<Vp8Rewrite>,
}

const PID_MASK: u16 = 0x7fff;

impl Vp8Munger {
    /// A new segment starts at a keyframe with these input fields.
    fn start(&mut self, f: &Vp8Fields) {
        let (next_pid, next_tl0, next_key) = match self.last_out {
            Some(l) => (l.picture_id.wrapping_add(1) & PID_MASK, l.tl0_pic_idx.wrapping_add(1), (l.key_idx + 1) & 0x1f),
            None => (f.picture_id, f.tl0_pic_idx.unwrap_or(0), f.key_idx.unwrap_or(0)),
        };
        self.pid_offset = next_pid.wrapping_sub(f.picture_id) & PID_MASK;
        self.tl0_offset = next_tl0.wrapping_sub(f.tl0_pic_idx.unwrap_or(0));
        self.keyidx_offset = next_key.wrapping_sub(f.key_idx.unwrap_or(0)) & 0x1f;
        self.highest_in_pid = Some(f.picture_id);
    }

    fn newer(a: u16, b: u16) -> bool {
        a != b && (a.wrapping_sub(b) & PID_MASK) < 0x4000
    }

    /// A whole frame (its first packet) is dropped: close the picture id gap if it is the newest.
    fn drop_frame(&mut self, f: &Vp8Fields) {
        if self.highest_in_pid.is_none_or(|h| Self::newer(f.picture_id, h)) {
            self.pid_offset = self.pid_offset.wrapping_sub(1) & PID_MASK;
            self.highest_in_pid = Some(f.picture_id);
        }
    }

    fn rewrite(&mut self, f: &Vp8Fields) -> Vp8Rewrite {
        if self.highest_in_pid.is_none_or(|h| Self::newer(f.picture_id, h)) {
            self.highest_in_pid = Some(f.picture_id);
        }
        let mask = if f.picture_id_15bit { PID_MASK } else { 0x7f };
        let r = Vp8Rewrite {
            picture_id: f.picture_id.wrapping_add(self.pid_offset) & mask,
            tl0_pic_idx: f.tl0_pic_idx.unwrap_or(0).wrapping_add(self.tl0_offset),
            key_idx: (f.key_idx.unwrap_or(0) + self.keyidx_offset) & 0x1f,
        };
        let newest = self.last_out.is_none_or(|l| Self::newer(r.picture_id, l.picture_id) || r.picture_id == l.picture_id);
        if newest {
            self.last_out = Some(r);
        }
        r
    }
}

/// Forwarding state of one down track.
#[derive(Clone, Debug)]
pub struct Forwarder {
    kind: MediaKind,
    munger: Munger,
    muted: bool,
    /// `None`: paused by the allocator.
    target: Option<Target>,
    current: Option<Current>,
    /// Highest temporal layer forwarded right now (≤ target.temporal).
    temporal: u8,
    vp8: Vp8Munger,
    switches: u64,
}

impl Forwarder {
    pub fn new(kind: MediaKind, clock_rate: u32, initial_seq: u16, initial_ts: u32) -> Self {
        Self {
            kind,
            munger: Munger::new(clock_rate, initial_seq, initial_ts),
            muted: false,
            target: Some(Target::FULL),
            current: None,
            temporal: u8::MAX,
            vp8: Vp8Munger::default(),
            switches: 0,
        }
    }

    /// Sets the layer to receive (`None` pauses). A higher or lower spatial layer takes effect at
    /// its next keyframe; the current layer keeps flowing until then.
    pub fn set_target(&mut self, target: Option<Target>) {
        // A lower temporal target takes effect at the next frame (see `on_packet`): cutting a
        // frame short would leave the receiver waiting for it before it decodes anything newer.
        if target.is_none() && self.target.is_some() {
            self.munger.end_segment();
            self.current = None;
        }
        self.target = target;
    }

    pub fn target(&self) -> Option<Target> {
        self.target
    }

    /// The spatial layer being forwarded now, if any.
    pub fn current_spatial(&self) -> Option<u8> {
        self.current.map(|c| c.spatial)
    }

    pub fn current_temporal(&self) -> u8 {
        self.temporal
    }

    /// Layer switches so far.
    pub fn switches(&self) -> u64 {
        self.switches
    }

    /// Forgets the current source: the next packet must be a keyframe (a WHEP slot rebound to
    /// another track, a publisher restart on the same layer is handled by `on_packet` itself).
    pub fn reset_source(&mut self) {
        self.current = None;
        self.munger.end_segment();
    }

    pub fn set_muted(&mut self, muted: bool) {
        if muted && !self.muted {
            self.munger.end_segment();
            self.current = None;
        }
        self.muted = muted;
    }

    /// The spatial layer a keyframe is needed on, if any: nothing is being forwarded, or a switch
    /// towards the target is pending.
    pub fn keyframe_wanted(&self) -> Option<u8> {
        if self.kind != MediaKind::Video || self.muted {
            return None;
        }
        let t = self.target?;
        match self.current {
            None => Some(t.spatial),
            Some(c) if c.spatial != t.spatial && t.spatial != u8::MAX => Some(t.spatial),
            Some(_) => None,
        }
    }

    fn start_segment(&mut self, now: Instant, p: &PacketMeta, target: Target) {
        if self.current.is_some() {
            self.switches += 1;
        }
        self.munger.start_segment(p.source, p.ext_seq, p.ext_ts, now, p.capture);
        self.current = Some(Current { source: p.source, spatial: p.spatial });
        self.temporal = target.temporal;
        if let Some(f) = &p.vp8 {
            self.vp8.start(f);
        }
    }

    pub fn on_packet(&mut self, now: Instant, p: &PacketMeta) -> Verdict {
        if self.muted {
            return Verdict::Drop(DropReason::Muted);
        }
        let Some(target) = self.target else {
            return Verdict::Drop(DropReason::Paused);
        };
        let is_audio = self.kind == MediaKind::Audio;
        match self.current {
            Some(c) if c.source == p.source => {}
            Some(c) => {
                // Another layer (or a restarted source): switch if it is a decodable start and
                // brings us closer to the target (or replaces our layer after a restart).
                let closer = if c.spatial < target.spatial {
                    p.spatial > c.spatial && p.spatial <= target.spatial
                } else if c.spatial > target.spatial {
                    p.spatial < c.spatial && p.spatial >= target.spatial
                } else {
                    false
                };
                let restarted = p.spatial == c.spatial;
                if p.padding_only || !(closer || restarted) || !(p.keyframe_start || is_audio) {
                    return Verdict::Drop(DropReason::NotCurrentSource);
                }
                self.start_segment(now, p, target);
            }
            None => {
                if p.padding_only {
                    return Verdict::Drop(DropReason::PaddingOnly);
                }
                if !is_audio && (!p.keyframe_start || p.spatial > target.spatial) {
                    return Verdict::Drop(DropReason::WaitingForKeyframe);
                }
                self.start_segment(now, p, target);
            }
        }
        if p.padding_only {
            self.munger.skip(p.source, p.ext_seq);
            return Verdict::Drop(DropReason::PaddingOnly);
        }
        // Temporal layers: down at any frame start, up only at a sync point; whole frames above
        // are dropped. (A frame cut short would block decoding: libwebrtc's VP8 reference finder
        // holds every later frame until each skipped picture id is accounted for.)
        if p.frame_start && target.temporal < self.temporal {
            self.temporal = target.temporal;
        }
        if p.frame_start && p.temporal > self.temporal && p.temporal <= target.temporal && (p.layer_sync || p.keyframe_start) {
            self.temporal = p.temporal;
        }
        if p.temporal > self.temporal {
            self.munger.skip(p.source, p.ext_seq);
            if p.frame_start
                && let Some(f) = &p.vp8
            {
                self.vp8.drop_frame(f);
            }
            return Verdict::Drop(DropReason::TemporalLayer);
        }
        match self.munger.munge(p.source, p.ext_seq, p.ext_ts, now, p.capture) {
            Ok((ext_seq, ext_ts)) => Verdict::Forward { ext_seq, ext_ts, marker: p.marker, vp8: p.vp8.map(|f| self.vp8.rewrite(&f)) },
            Err(MungeError::BeforeSegment) => Verdict::Drop(DropReason::BeforeSwitch),
            Err(MungeError::NotCurrentSource) => Verdict::Drop(DropReason::NotCurrentSource),
        }
    }

    /// The highest output sequence number sent so far.
    pub fn last_out_seq(&self) -> u64 {
        self.munger.last_out_seq()
    }

    /// Output (seq, ts) for a probe padding packet inserted now, if a stream is flowing.
    pub fn insert_padding(&mut self) -> Option<(u64, u64)> {
        self.current?;
        self.munger.insert()
    }

    /// Output (seq, ts) for a padding packet sent while nothing is forwarded (a paused track
    /// probing for bandwidth); the stream continues after it when the track resumes.
    pub fn insert_padding_paused(&mut self) -> (u64, u64) {
        self.munger.insert_unanchored()
    }

    /// Maps a NACKed output sequence number to the source packet to resend, and the output
    /// timestamp it must carry.
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

    const C16: u64 = 1 << 16;
    const C32: u64 = 1 << 32;

    fn src(layer: u8) -> SourceKey {
        SourceKey { track: 1, ssrc: 100 + u32::from(layer) }
    }

    /// A packet of layer `spatial`: (seq, ts) in that layer's own numbering.
    fn pkt(spatial: u8, seq: u64, ts: u64, key: bool) -> PacketMeta {
        PacketMeta {
            source: src(spatial),
            spatial,
            temporal: 0,
            ext_seq: C16 + seq,
            ext_ts: C32 + ts,
            marker: true,
            keyframe_start: key,
            frame_start: true,
            layer_sync: false,
            padding_only: false,
            capture: None,
            vp8: None,
        }
    }

    fn wire(v: Verdict) -> Result<(u16, u32), DropReason> {
        match v {
            Verdict::Forward { ext_seq, ext_ts, .. } => Ok((ext_seq as u16, ext_ts as u32)),
            Verdict::Drop(r) => Err(r),
        }
    }

    fn video() -> Forwarder {
        Forwarder::new(MediaKind::Video, 90_000, 500, 0)
    }

    #[test]
    fn video_waits_for_keyframe_then_forwards_contiguously() {
        let t = Instant::now();
        let mut f = video();
        assert_eq!(f.keyframe_wanted(), Some(u8::MAX));
        let rows = [
            (pkt(0, 1, 0, false), Err(DropReason::WaitingForKeyframe)),
            (pkt(0, 2, 0, false), Err(DropReason::WaitingForKeyframe)),
            (pkt(0, 3, 3000, true), Ok((500, 0))),
            (pkt(0, 4, 3000, false), Ok((501, 0))),
            (pkt(0, 2, 0, false), Err(DropReason::BeforeSwitch)),
            (pkt(0, 5, 6000, false), Ok((502, 3000))),
        ];
        for (i, (p, want)) in rows.iter().enumerate() {
            assert_eq!(wire(f.on_packet(t, p)), *want, "row {i}");
        }
        assert_eq!(f.keyframe_wanted(), None);
    }

    #[test]
    fn audio_starts_on_any_packet() {
        let t = Instant::now();
        let mut f = Forwarder::new(MediaKind::Audio, 48_000, 7, 100);
        assert_eq!(f.keyframe_wanted(), None);
        assert_eq!(wire(f.on_packet(t, &pkt(0, 9, 960, false))), Ok((7, 100)));
        assert_eq!(wire(f.on_packet(t, &pkt(0, 10, 1920, false))), Ok((8, 1060)));
    }

    /// Simulcast: (target change?, packet, expected) rows. Layers number their packets
    /// independently; the output is one stream.
    #[test]
    fn layer_switches_happen_only_at_keyframes_and_keep_the_stream_continuous() {
        let t0 = Instant::now();
        let mut f = video();
        f.set_target(Some(Target { spatial: 0, temporal: 2 }));
        type Row = (Option<Target>, PacketMeta, Result<(u16, u32), DropReason>);
        let up = Some(Target { spatial: 2, temporal: 2 });
        let down = Some(Target { spatial: 0, temporal: 2 });
        let rows: Vec<Row> = vec![
            (None, pkt(2, 10, 0, true), Err(DropReason::WaitingForKeyframe)), // above target
            (None, pkt(0, 70, 0, true), Ok((500, 0))),
            (None, pkt(0, 71, 3000, false), Ok((501, 3000))),
            (None, pkt(2, 11, 3000, false), Err(DropReason::NotCurrentSource)),
            // target up: layer 0 keeps flowing until a keyframe of a higher layer
            (up, pkt(0, 72, 6000, false), Ok((502, 6000))),
            (None, pkt(2, 12, 6000, false), Err(DropReason::NotCurrentSource)),
            // keyframe on the middle layer: closer to the target, so take it
            // (without sender reports or elapsed wall time, a switch advances the timestamp by
            // one tick: the new segment's timeline starts right after the last packet)
            (None, pkt(1, 40, 9000, true), Ok((503, 6001))),
            (None, pkt(0, 73, 9000, false), Err(DropReason::NotCurrentSource)),
            (None, pkt(1, 41, 12000, false), Ok((504, 9001))),
            // a keyframe on layer 0 is not closer: ignored
            (None, pkt(0, 74, 12000, true), Err(DropReason::NotCurrentSource)),
            (None, pkt(2, 13, 12000, true), Ok((505, 9002))),
            (None, pkt(2, 14, 15000, false), Ok((506, 12002))),
            // down again: wait for a low keyframe, keep the high layer meanwhile
            (down, pkt(2, 15, 18000, false), Ok((507, 15002))),
            (None, pkt(1, 42, 18000, true), Ok((508, 15003))),
            (None, pkt(0, 75, 21000, true), Ok((509, 15004))),
            (None, pkt(0, 76, 24000, false), Ok((510, 18004))),
        ];
        for (i, (target, p, want)) in rows.iter().enumerate() {
            if let Some(tg) = target {
                f.set_target(Some(*tg));
            }
            assert_eq!(wire(f.on_packet(t0, p)), *want, "row {i}");
        }
        assert_eq!(f.switches(), 4, "0→1→2→1→0");
        assert_eq!(f.current_spatial(), Some(0));
    }

    #[test]
    fn sequence_stays_continuous_across_switches_and_output_wraparound() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(MediaKind::Video, 90_000, 65533, u32::MAX - 2000);
        f.set_target(Some(Target { spatial: 0, temporal: 0 }));
        let mut out = Vec::new();
        let mut ts = Vec::new();
        let mut push = |v: Verdict| {
            if let Verdict::Forward { ext_seq, ext_ts, .. } = v {
                out.push(ext_seq as u16);
                ts.push(ext_ts);
            }
        };
        push(f.on_packet(t0, &pkt(0, 65534, 0, true)));
        push(f.on_packet(t0, &pkt(0, 65535, 3000, false)));
        f.set_target(Some(Target { spatial: 1, temporal: 0 }));
        let t1 = t0 + Duration::from_millis(33);
        push(f.on_packet(t1, &PacketMeta { ext_seq: 2 * C16 + 3, ..pkt(1, 0, 6000, true) }));
        push(f.on_packet(t1, &PacketMeta { ext_seq: 2 * C16 + 4, ..pkt(1, 0, 9000, false) }));
        assert_eq!(out, vec![65533, 65534, 65535, 0]);
        assert!(ts.windows(2).all(|w| w[1] >= w[0]), "{ts:?}");
    }

    #[test]
    fn a_lower_temporal_target_waits_for_the_next_frame() {
        let t = Instant::now();
        let mut f = video();
        f.set_target(Some(Target { spatial: 0, temporal: 2 }));
        let p = |seq: u64, tid: u8, start: bool, end: bool, key: bool, pid: u16| PacketMeta {
            temporal: tid,
            frame_start: start,
            marker: end,
            vp8: Some(Vp8Fields { picture_id: pid, picture_id_15bit: true, tl0_pic_idx: Some(0), key_idx: Some(0) }),
            ..pkt(0, seq, 3000 * u64::from(pid), key)
        };
        assert!(matches!(f.on_packet(t, &p(0, 0, true, true, true, 10)), Verdict::Forward { .. }));
        // A two-packet layer-2 frame; the target drops to layer 0 between its packets.
        assert!(matches!(f.on_packet(t, &p(1, 2, true, false, false, 11)), Verdict::Forward { .. }));
        f.set_target(Some(Target { spatial: 0, temporal: 0 }));
        let last = f.on_packet(t, &p(2, 2, false, true, false, 11));
        assert!(matches!(last, Verdict::Forward { marker: true, .. }), "the frame is finished: {last:?}");
        assert_eq!(f.on_packet(t, &p(3, 1, true, true, false, 12)), Verdict::Drop(DropReason::TemporalLayer), "the next frame above is dropped");
        match f.on_packet(t, &p(4, 0, true, true, false, 13)) {
            Verdict::Forward { vp8, .. } => assert_eq!(vp8.unwrap().picture_id, 12, "picture ids stay contiguous"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn temporal_layers_above_target_are_dropped_without_gaps() {
        let t = Instant::now();
        let mut f = video();
        f.set_target(Some(Target { spatial: 0, temporal: 0 }));
        let tl = |seq: u64, tid: u8, sync: bool, key: bool, pid: u16| PacketMeta {
            temporal: tid,
            layer_sync: sync,
            vp8: Some(Vp8Fields { picture_id: pid, picture_id_15bit: true, tl0_pic_idx: Some(0), key_idx: Some(0) }),
            ..pkt(0, seq, seq * 3000, key)
        };
        // L1T3 pattern: 0 2 1 2 0 2 1 2
        let mut got = Vec::new();
        for (i, tid) in [0u8, 2, 1, 2, 0, 2, 1, 2].iter().enumerate() {
            let v = f.on_packet(t, &tl(i as u64, *tid, *tid > 0, i == 0, 1000 + i as u16));
            if let Verdict::Forward { ext_seq, vp8, .. } = v {
                got.push((ext_seq as u16, vp8.unwrap().picture_id));
            }
        }
        assert_eq!(got, vec![(500, 1000), (501, 1001)], "base layer only, seq and picture ids contiguous");
        // Raise the target: the next sync frame of layer 1 lets it in, then layer 2.
        f.set_target(Some(Target { spatial: 0, temporal: 2 }));
        let mut got = Vec::new();
        for (i, tid) in [0u8, 2, 1, 2].iter().enumerate() {
            let n = 8 + i as u64;
            let v = f.on_packet(t, &tl(n, *tid, *tid > 0, false, 1000 + n as u16));
            if let Verdict::Forward { ext_seq, vp8, .. } = v {
                got.push((ext_seq as u16, vp8.unwrap().picture_id));
            }
        }
        assert_eq!(got, vec![(502, 1002), (503, 1003), (504, 1004), (505, 1005)]);
    }

    #[test]
    fn vp8_picture_ids_continue_across_a_layer_switch() {
        let t = Instant::now();
        let mut f = video();
        f.set_target(Some(Target { spatial: 0, temporal: 0 }));
        let v = |spatial: u8, seq: u64, key: bool, pid: u16, tl0: u8| PacketMeta {
            vp8: Some(Vp8Fields { picture_id: pid, picture_id_15bit: true, tl0_pic_idx: Some(tl0), key_idx: Some(3) }),
            ..pkt(spatial, seq, seq * 3000, key)
        };
        let fwd = |r: Verdict| match r {
            Verdict::Forward { vp8, .. } => vp8.unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(fwd(f.on_packet(t, &v(0, 1, true, 32766, 200))).picture_id, 32766);
        assert_eq!(fwd(f.on_packet(t, &v(0, 2, false, 32767, 201))).picture_id, 32767);
        f.set_target(Some(Target { spatial: 1, temporal: 0 }));
        let r = fwd(f.on_packet(t, &v(1, 900, true, 5, 17)));
        assert_eq!((r.picture_id, r.tl0_pic_idx, r.key_idx), (0, 202, 4), "continues after the last output");
        assert_eq!(fwd(f.on_packet(t, &v(1, 901, false, 6, 18))).picture_id, 1);
    }

    #[test]
    fn pause_and_resume_by_the_allocator() {
        let t = Instant::now();
        let mut f = video();
        assert_eq!(wire(f.on_packet(t, &pkt(0, 1, 0, true))), Ok((500, 0)));
        f.set_target(None);
        assert_eq!(f.keyframe_wanted(), None, "paused tracks need nothing");
        assert_eq!(wire(f.on_packet(t, &pkt(0, 2, 3000, true))), Err(DropReason::Paused));
        f.set_target(Some(Target::FULL));
        assert_eq!(f.keyframe_wanted(), Some(u8::MAX));
        assert_eq!(wire(f.on_packet(t, &pkt(0, 3, 6000, false))), Err(DropReason::WaitingForKeyframe));
        let t1 = t + Duration::from_secs(1);
        assert_eq!(wire(f.on_packet(t1, &pkt(0, 4, 90_000, true))), Ok((501, 90_000)));
    }

    #[test]
    fn mute_drops_and_unmute_resumes_without_gap() {
        let t0 = Instant::now();
        let mut f = video();
        assert_eq!(wire(f.on_packet(t0, &pkt(0, 1, 0, true))), Ok((500, 0)));
        f.set_muted(true);
        assert_eq!(f.keyframe_wanted(), None);
        assert_eq!(wire(f.on_packet(t0, &pkt(0, 2, 0, false))), Err(DropReason::Muted));
        assert_eq!(wire(f.on_packet(t0, &pkt(0, 3, 0, true))), Err(DropReason::Muted));
        f.set_muted(false);
        assert!(f.keyframe_wanted().is_some());
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(wire(f.on_packet(t1, &pkt(0, 50, 90_000, false))), Err(DropReason::WaitingForKeyframe));
        assert_eq!(wire(f.on_packet(t1, &pkt(0, 51, 90_000, true))), Ok((501, 90_000)));
    }

    #[test]
    fn a_restarted_source_on_the_same_layer_takes_over_at_its_keyframe() {
        let t = Instant::now();
        let mut f = video();
        assert_eq!(wire(f.on_packet(t, &pkt(0, 1, 0, true))), Ok((500, 0)));
        let restarted = PacketMeta { source: SourceKey { track: 1, ssrc: 999 }, ..pkt(0, 7777, 5, false) };
        assert_eq!(wire(f.on_packet(t, &restarted)), Err(DropReason::NotCurrentSource));
        let restarted_key = PacketMeta { source: SourceKey { track: 1, ssrc: 999 }, ..pkt(0, 7778, 5, true) };
        assert_eq!(wire(f.on_packet(t, &restarted_key)), Ok((501, 1)));
    }

    #[test]
    fn padding_is_dropped_without_a_gap_and_probes_take_numbers() {
        let t = Instant::now();
        let mut f = video();
        let mut pad = pkt(0, 1, 0, false);
        pad.padding_only = true;
        assert_eq!(f.insert_padding(), None, "nothing flowing yet");
        assert_eq!(wire(f.on_packet(t, &pad)), Err(DropReason::PaddingOnly));
        assert_eq!(wire(f.on_packet(t, &pkt(0, 2, 0, true))), Ok((500, 0)));
        let mut pad = pkt(0, 3, 0, false);
        pad.padding_only = true;
        assert_eq!(wire(f.on_packet(t, &pad)), Err(DropReason::PaddingOnly));
        assert_eq!(wire(f.on_packet(t, &pkt(0, 4, 0, false))), Ok((501, 0)));
        assert_eq!(f.insert_padding().map(|(s, _)| s as u16), Some(502));
        assert_eq!(wire(f.on_packet(t, &pkt(0, 5, 0, false))), Ok((503, 0)));
    }

    #[test]
    fn nack_maps_to_cached_source_packet() {
        let t = Instant::now();
        let mut f = Forwarder::new(MediaKind::Video, 90_000, 10, 1000);
        let a = src(0);
        f.on_packet(t, &pkt(0, 200, 0, true));
        f.on_packet(t, &pkt(0, 201, 3000, false));
        let r = f.retransmission(11, |s, seq| (s == a && seq == C16 + 201).then_some(C32 + 3000)).unwrap();
        assert_eq!(r.in_ext_seq, C16 + 201);
        assert_eq!(r.out_ext_ts as u32, 4000);
        assert!(f.retransmission(12, |_, _| Some(0)).is_none());
    }
}
