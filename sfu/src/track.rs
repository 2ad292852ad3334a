//! The ingest side of a published track: its layers (one per SSRC; several with simulcast), each
//! with 64-bit sequence/timestamp extension, a packet cache for NACKs, a measured bitrate, the
//! picture size seen in keyframes and the timing from sender reports; and the ordering of layers
//! by quality, which decides what "spatial layer 0, 1, 2" means — by resolution, then bitrate,
//! never by rid name (browsers name layers differently).

use std::time::{Duration, Instant};

use warbler_media::{Codec, MediaKind};

use crate::packet_cache::PacketCache;
use crate::seq::{SeqExtender, TsExtender};

/// Bits per second over the last second, in 100 ms buckets.
#[derive(Clone, Debug, Default)]
pub struct RateMeter {
    buckets: [u64; 10],
    /// Index of the 100 ms slot the newest bucket belongs to.
    head_slot: u64,
    epoch: Option<Instant>,
}

const BUCKET: Duration = Duration::from_millis(100);

impl RateMeter {
    fn slot(&mut self, now: Instant) -> u64 {
        let epoch = *self.epoch.get_or_insert(now);
        (now.saturating_duration_since(epoch).as_millis() / BUCKET.as_millis()) as u64
    }

    fn advance(&mut self, slot: u64) {
        if slot > self.head_slot {
            let n = (slot - self.head_slot).min(10);
            for i in 1..=n {
                self.buckets[((self.head_slot + i) % 10) as usize] = 0;
            }
            self.head_slot = slot;
        }
    }

    pub fn add(&mut self, now: Instant, bytes: usize) {
        let slot = self.slot(now);
        self.advance(slot);
        self.buckets[(slot % 10) as usize] += bytes as u64;
    }

    pub fn bps(&mut self, now: Instant) -> u64 {
        if self.epoch.is_none() {
            return 0;
        }
        let slot = self.slot(now);
        self.advance(slot);
        self.buckets.iter().sum::<u64>() * 8
    }
}

/// Sender-report timing of one layer: capture time (NTP seconds) of an extended RTP timestamp.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SrTiming {
    pub ntp_secs: f64,
    pub rtp_ext: u64,
}

pub fn ntp_to_secs(ntp: u64) -> f64 {
    (ntp >> 32) as f64 + (ntp & 0xffff_ffff) as f64 / 4_294_967_296.0
}

/// One encoding of a track (one SSRC).
#[derive(Debug)]
pub struct Layer {
    pub rid: Option<String>,
    pub ssrc: u32,
    pub seq: SeqExtender,
    pub ts: TsExtender,
    pub cache: Option<PacketCache>,
    pub dims: Option<(u16, u16)>,
    pub rate: RateMeter,
    pub first_packet_at: Instant,
    pub last_packet_at: Instant,
    pub sr: Option<SrTiming>,
    pub max_temporal: u8,
    pub last_keyframe_request: Option<Instant>,
    pub last_keyframe_at: Option<Instant>,
    /// The bitrate the allocator plans with (see `planning_bps`); kept while the layer pauses.
    pub known_bps: u64,
    known_at: Option<Instant>,
    /// Since when the layer has been flowing without a pause.
    pub flowing_since: Instant,
    /// The engine told the publisher to stop sending this layer.
    pub paused_by_us: bool,
    pub last_needed_at: Instant,
}

const PLANNING_HALF_LIFE: Duration = Duration::from_secs(4);

/// A layer not heard from for this long is inactive (paused by the publisher or its uplink).
pub const LAYER_IDLE: Duration = Duration::from_millis(1500);

impl Layer {
    pub fn new(rid: Option<String>, ssrc: u32, kind: MediaKind, cache_size: usize, now: Instant) -> Self {
        Self {
            rid,
            ssrc,
            seq: SeqExtender::new(),
            ts: TsExtender::new(),
            cache: (kind == MediaKind::Video).then(|| PacketCache::new(cache_size)),
            dims: None,
            rate: RateMeter::default(),
            first_packet_at: now,
            last_packet_at: now,
            sr: None,
            max_temporal: 0,
            last_keyframe_request: None,
            last_keyframe_at: None,
            known_bps: 0,
            known_at: None,
            flowing_since: now,
            paused_by_us: false,
            last_needed_at: now,
        }
    }

    pub fn active(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_packet_at) < LAYER_IDLE
    }

    /// Records a packet of `bytes` arriving at `now`.
    pub fn on_packet(&mut self, now: Instant, bytes: usize) {
        if !self.active(now) {
            self.flowing_since = now;
        }
        self.last_packet_at = now;
        self.rate.add(now, bytes);
    }

    /// The bitrate to plan with: the highest one-second rate seen lately, decaying with a
    /// half-life of `PLANNING_HALF_LIFE`. Encoders swing 2-4x with content and keyframes;
    /// planning on the instantaneous rate would pick a layer in a quiet second that does not fit
    /// in the next. The first second after a layer (re)starts is not measured (its window is
    /// partial), and a paused layer keeps its last value.
    pub fn planning_bps(&mut self, now: Instant) -> u64 {
        let live = self.rate.bps(now);
        if self.active(now) && now.saturating_duration_since(self.flowing_since) >= Duration::from_secs(1) && live > 0 {
            let decayed = match self.known_at {
                Some(at) => {
                    let dt = now.saturating_duration_since(at).as_secs_f64();
                    (self.known_bps as f64 * 0.5f64.powf(dt / PLANNING_HALF_LIFE.as_secs_f64())) as u64
                }
                None => 0,
            };
            self.known_bps = live.max(decayed);
            self.known_at = Some(now);
        }
        self.known_bps
    }

    /// Capture time of a packet with extended timestamp `ext_ts`, from the last sender report.
    pub fn capture_time(&self, ext_ts: u64, clock_rate: u32) -> Option<f64> {
        let sr = self.sr?;
        Some(sr.ntp_secs + (ext_ts as f64 - sr.rtp_ext as f64) / f64::from(clock_rate))
    }
}

/// What the ordering knows about a layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerFacts {
    pub pixels: Option<u32>,
    pub bps: u64,
}

/// Orders layers from lowest to highest quality: by picture size when every layer's is known,
/// else by bitrate when every layer has one, else in arrival order. Returns indices.
pub fn order_layers(facts: &[LayerFacts]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..facts.len()).collect();
    if facts.iter().all(|f| f.pixels.is_some()) {
        idx.sort_by_key(|&i| (facts[i].pixels, facts[i].bps, i));
    } else if facts.iter().all(|f| f.bps > 0) {
        idx.sort_by_key(|&i| (facts[i].bps, i));
    }
    idx
}

/// Whether the ordering rests on picture sizes (every layer has shown a keyframe).
pub fn order_is_by_size(facts: &[LayerFacts]) -> bool {
    facts.iter().all(|f| f.pixels.is_some())
}

/// Per-layer summary for the allocator.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerInfo {
    pub spatial: u8,
    pub dims: Option<(u16, u16)>,
    pub bps: u64,
    pub active: bool,
    pub temporal_layers: u8,
}

/// The codec a track carries and its negotiated parameters.
#[derive(Clone, Debug)]
pub struct TrackCodec {
    pub codec: Codec,
    pub params: rtc::rtp_transceiver::rtp_sender::RTCRtpCodec,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(pixels: Option<u32>, bps: u64) -> LayerFacts {
        LayerFacts { pixels, bps }
    }

    #[test]
    fn layer_order_table() {
        let q = 320 * 180;
        let h = 640 * 360;
        let full = 1280 * 720;
        let cases: Vec<(Vec<LayerFacts>, Vec<usize>)> = vec![
            // arrival order f, h, q (names never matter): sorted by size
            (vec![f(Some(full), 2_000_000), f(Some(h), 600_000), f(Some(q), 150_000)], vec![2, 1, 0]),
            // sizes unknown for one layer: by bitrate
            (vec![f(Some(full), 2_000_000), f(None, 600_000), f(Some(q), 150_000)], vec![2, 1, 0]),
            // a layer without bitrate or size yet: arrival order
            (vec![f(None, 0), f(None, 600_000)], vec![0, 1]),
            // equal sizes: bitrate breaks the tie
            (vec![f(Some(h), 900_000), f(Some(h), 300_000)], vec![1, 0]),
            // one layer
            (vec![f(None, 0)], vec![0]),
            (vec![], vec![]),
        ];
        for (i, (facts, want)) in cases.iter().enumerate() {
            assert_eq!(order_layers(facts), *want, "case {i}");
        }
        assert!(order_is_by_size(&[f(Some(1), 0)]));
        assert!(!order_is_by_size(&[f(Some(1), 0), f(None, 5)]));
    }

    #[test]
    fn rate_meter_counts_the_last_second() {
        let t0 = Instant::now();
        let mut m = RateMeter::default();
        assert_eq!(m.bps(t0), 0);
        for i in 0..20 {
            m.add(t0 + Duration::from_millis(i * 50), 1000);
        }
        // at 950 ms: all 20 packets (20 kB) are in the window → 160 kbit/s
        assert_eq!(m.bps(t0 + Duration::from_millis(950)), 160_000);
        // 2.5 s later everything aged out
        assert_eq!(m.bps(t0 + Duration::from_millis(3500)), 0);
        m.add(t0 + Duration::from_millis(3500), 500);
        assert_eq!(m.bps(t0 + Duration::from_millis(3550)), 4000);
    }

    #[test]
    fn planning_rate_holds_peaks_ignores_restarts_and_survives_pauses() {
        let t0 = Instant::now();
        let mut l = Layer::new(None, 1, MediaKind::Video, 8, t0);
        // `kbps` for `ms` milliseconds, one packet every 50 ms, starting at `from`; the planning
        // rate sampled every 200 ms (like the allocation tick) is returned at the end.
        let run = |l: &mut Layer, from: u64, ms: u64, kbps: u64| {
            let mut at = 0;
            let mut planned = 0;
            while at < ms {
                let now = t0 + Duration::from_millis(from + at);
                l.on_packet(now, (kbps * 1000 / 8 / 20) as usize);
                if at % 200 == 0 {
                    planned = l.planning_bps(now);
                }
                at += 50;
            }
            planned
        };
        assert_eq!(run(&mut l, 0, 800, 500), 0, "nothing planned in the first second");
        let steady = run(&mut l, 800, 2200, 500);
        assert!((450_000..=525_000).contains(&steady), "{steady}");
        // A quiet second: the plan stays near the peak rather than following it down.
        let quiet = run(&mut l, 3000, 1000, 150);
        assert!(quiet > 350_000, "{quiet}");
        // Quiet for long: it decays towards the new rate.
        let later = run(&mut l, 4000, 12_000, 150);
        assert!(later < 200_000, "{later}");
        // Paused (no packets) for 10 s: the last value is kept; on resume, a second of grace.
        let kept = l.planning_bps(t0 + Duration::from_millis(26_000));
        assert_eq!(kept, later);
        let resumed = run(&mut l, 26_000, 600, 40);
        assert_eq!(resumed, later, "the partial first second after a resume is not measured");
    }

    #[test]
    fn capture_time_from_sender_report() {
        let mut l = Layer::new(None, 1, MediaKind::Video, 8, Instant::now());
        assert_eq!(l.capture_time(1000, 90_000), None);
        l.sr = Some(SrTiming { ntp_secs: 100.0, rtp_ext: 90_000 });
        assert_eq!(l.capture_time(180_000, 90_000), Some(101.0));
        assert_eq!(l.capture_time(45_000, 90_000), Some(99.5));
        assert!((ntp_to_secs((5u64 << 32) | 0x8000_0000) - 5.5).abs() < 1e-9);
    }
}
