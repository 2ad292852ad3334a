//! What a simulated subscriber measures on one received track, with no I/O and no clock of its
//! own (every entry point takes the receive instant): sequence extension across wraparound and
//! loss from gaps, end-to-end latency from the publisher's recorded send instants, packet delay
//! variation (jitter), and freezes (no complete frame for longer than a threshold).

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Latency and jitter histograms record microseconds from 1 µs up to this.
const HIST_MAX_US: u64 = 60_000_000;
/// A frame gap longer than this is a freeze (the definition).
pub const FREEZE_THRESHOLD: Duration = Duration::from_millis(200);
/// How far back duplicates are recognised (sequence numbers).
const DUP_WINDOW: u64 = 1024;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("static histogram bounds are valid")
}

/// Extends 16-bit RTP sequence numbers to 64 bits. The first value maps to `1 << 16 | seq` so
/// that a reordered packet from just before the first one does not underflow.
#[derive(Clone, Debug, Default)]
pub struct SeqExtender {
    highest: Option<u64>,
}

impl SeqExtender {
    pub fn extend(&mut self, seq: u16) -> u64 {
        let Some(h) = self.highest else {
            let e = (1u64 << 16) | u64::from(seq);
            self.highest = Some(e);
            return e;
        };
        let base = h & !0xffff;
        let mut c = base | u64::from(seq);
        if c > h && c - h > 0x8000 {
            c = c.saturating_sub(0x10000);
        } else if c < h && h - c > 0x8000 {
            c += 0x10000;
        }
        if c > h {
            self.highest = Some(c);
        }
        c
    }

    pub fn highest(&self) -> Option<u64> {
        self.highest
    }
}

/// Counts packets and loss from sequence gaps. Loss is `expected - unique received`, where
/// expected spans the first to the highest extended sequence number seen, so reordered packets
/// are not loss and duplicates (within the last `DUP_WINDOW` numbers) are not counted twice.
#[derive(Clone, Debug, Default)]
pub struct LossCounter {
    ext: SeqExtender,
    first: Option<u64>,
    unique: u64,
    pub duplicates: u64,
    pub reordered: u64,
    seen: Vec<u64>,
}

impl LossCounter {
    /// Records a packet; returns its extended sequence number.
    pub fn on_packet(&mut self, seq: u16) -> u64 {
        if self.seen.is_empty() {
            self.seen = vec![0; (DUP_WINDOW / 64) as usize];
        }
        let prev_high = self.ext.highest();
        let e = self.ext.extend(seq);
        let first = *self.first.get_or_insert(e);
        if e < first {
            // Reordered from before the first packet we saw: widen the span.
            self.first = Some(e);
        }
        if let Some(h) = prev_high {
            if e <= h {
                if h - e >= DUP_WINDOW {
                    // Too old to know; count it as a late arrival.
                    self.unique += 1;
                    self.reordered += 1;
                    return e;
                }
                if self.test_and_set(e) {
                    self.duplicates += 1;
                } else {
                    self.unique += 1;
                    self.reordered += 1;
                }
                return e;
            }
            // Clear the window slots the sequence advanced over.
            let advance = (e - h).min(DUP_WINDOW);
            for k in 0..advance {
                self.clear(e - k);
            }
        }
        self.test_and_set(e);
        self.unique += 1;
        e
    }

    fn slot(e: u64) -> (usize, u64) {
        let i = e % DUP_WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    fn test_and_set(&mut self, e: u64) -> bool {
        let (w, b) = Self::slot(e);
        let was = self.seen[w] & b != 0;
        self.seen[w] |= b;
        was
    }

    fn clear(&mut self, e: u64) {
        let (w, b) = Self::slot(e);
        self.seen[w] &= !b;
    }

    pub fn received(&self) -> u64 {
        self.unique
    }

    pub fn expected(&self) -> u64 {
        match (self.first, self.ext.highest()) {
            (Some(f), Some(h)) => h - f + 1,
            _ => 0,
        }
    }

    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.unique)
    }
}

/// End-to-end latency (receive instant minus the publisher's send instant) and packet delay
/// variation between consecutive packets of a track, both in microseconds.
pub struct LatencyStats {
    pub latency: Histogram<u64>,
    pub jitter: Histogram<u64>,
    last_us: Option<u64>,
    /// The delay variation recorded by the latest packet, if it recorded one.
    pub last_jitter: Option<u64>,
    /// Packets that could not be matched to a send instant.
    pub unmatched: u64,
}

impl Default for LatencyStats {
    fn default() -> Self {
        Self { latency: new_histogram(), jitter: new_histogram(), last_us: None, last_jitter: None, unmatched: 0 }
    }
}

impl LatencyStats {
    /// `sent` is the publisher's send instant for this packet, when it could be matched.
    /// Returns the latency in µs when recorded.
    pub fn on_packet(&mut self, sent: Option<Instant>, received: Instant) -> Option<u64> {
        let Some(sent) = sent.filter(|s| *s <= received) else {
            self.unmatched += 1;
            return None;
        };
        let us = (received - sent).as_micros().clamp(1, u128::from(HIST_MAX_US)) as u64;
        self.latency.saturating_record(us);
        self.last_jitter = self.last_us.map(|prev| us.abs_diff(prev).max(1));
        if let Some(j) = self.last_jitter {
            self.jitter.saturating_record(j);
        }
        self.last_us = Some(us);
        Some(us)
    }
}

/// Detects freezes: a video frame counts when its last packet (marker bit) arrives and every
/// packet of the frame arrived; an audio "frame" is every packet. A gap between consecutive
/// frames longer than [`FREEZE_THRESHOLD`] is one freeze of that duration. Nothing counts before
/// the first frame (that is time to first packet's business).
#[derive(Clone, Debug, Default)]
pub struct FreezeDetector {
    last_frame: Option<Instant>,
    /// Extended sequence number the current frame started at (after the previous marker).
    frame_start: Option<u64>,
    frame_packets: u64,
    pub frames: u64,
    pub incomplete_frames: u64,
    pub freezes: u64,
    pub frozen: Duration,
}

impl FreezeDetector {
    pub fn on_packet(&mut self, ext_seq: u64, marker: bool, every_packet_is_frame: bool, now: Instant) {
        if every_packet_is_frame {
            self.on_frame(now);
            return;
        }
        let start = *self.frame_start.get_or_insert(ext_seq);
        if ext_seq < start {
            return; // a straggler of an earlier frame
        }
        self.frame_packets += 1;
        if marker {
            if self.frame_packets == ext_seq - start + 1 {
                self.on_frame(now);
            } else {
                self.incomplete_frames += 1;
            }
            self.frame_start = Some(ext_seq + 1);
            self.frame_packets = 0;
        }
    }

    fn on_frame(&mut self, now: Instant) {
        if let Some(last) = self.last_frame {
            let gap = now.saturating_duration_since(last);
            if gap > FREEZE_THRESHOLD {
                self.freezes += 1;
                self.frozen += gap;
            }
        }
        self.frames += 1;
        self.last_frame = Some(now);
    }

    /// Closes the measurement at `now`: a freeze still going on counts.
    pub fn finish(&mut self, now: Instant) {
        if let Some(last) = self.last_frame {
            let gap = now.saturating_duration_since(last);
            if gap > FREEZE_THRESHOLD {
                self.freezes += 1;
                self.frozen += gap;
                self.last_frame = Some(now);
            }
        }
    }
}

/// A cheap fingerprint of an RTP payload: its length and up to 48 bytes from each end. The
/// forwarded payload is byte-identical to the published one, so this finds the packet's place in
/// the publisher's loop of pre-encoded packets.
pub fn fingerprint(payload: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET ^ payload.len() as u64;
    let head = &payload[..payload.len().min(48)];
    let tail = &payload[payload.len().saturating_sub(48)..];
    for &b in head.iter().chain(tail) {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_extension_table() {
        // (input sequence, expected extended values)
        let cases: &[(&[u16], &[u64])] = &[
            (&[0, 1, 2], &[65536, 65537, 65538]),
            (&[65534, 65535, 0, 1], &[131070, 131071, 131072, 131073]),
            // reordered across the wrap
            (&[65535, 1, 0, 2], &[131071, 131073, 131072, 131074]),
            // reordered back across the wrap
            (&[1, 65535, 2], &[65537, 65535, 65538]),
            // a big forward jump within half the space
            (&[10, 30000, 60000, 100], &[65546, 95536, 125536, 131172]),
        ];
        for (input, want) in cases {
            let mut x = SeqExtender::default();
            let got: Vec<u64> = input.iter().map(|&s| x.extend(s)).collect();
            assert_eq!(&got, want, "input {input:?}");
        }
    }

    fn run_loss(seqs: impl IntoIterator<Item = u16>) -> LossCounter {
        let mut l = LossCounter::default();
        for s in seqs {
            l.on_packet(s);
        }
        l
    }

    #[test]
    fn loss_from_gaps_across_wraparound() {
        // 65000..=65535, 0..=999 with every 100th number missing: 2536 numbers, 26 lost.
        let seqs = (65000u32..65536 + 1000).map(|s| (s % 65536) as u16).filter(|s| s % 100 != 7);
        let l = run_loss(seqs);
        let all = 65536 + 1000 - 65000;
        let missing = (65000u32..65536 + 1000).filter(|s| (s % 65536) % 100 == 7).count() as u64;
        assert_eq!(l.expected(), all);
        assert_eq!(l.lost(), missing);
        assert_eq!(l.received(), all - missing);
    }

    #[test]
    fn loss_counts_wrap_several_times() {
        // Three full wraps, no loss.
        let l = run_loss((0u32..3 * 65536 + 5).map(|s| s as u16));
        assert_eq!(l.lost(), 0);
        assert_eq!(l.expected(), 3 * 65536 + 5);
    }

    #[test]
    fn reordering_and_duplicates_are_not_loss() {
        let l = run_loss([65534, 0, 65535, 1, 1, 2, 65535, 3]);
        assert_eq!(l.expected(), 6);
        assert_eq!(l.lost(), 0);
        assert_eq!(l.duplicates, 2);
        assert_eq!(l.reordered, 1);
        // A hole that is never filled is loss.
        let l = run_loss([10, 11, 13, 14, 17]);
        assert_eq!((l.expected(), l.lost()), (8, 3));
    }

    #[test]
    fn reorder_before_first_packet_widens_the_span() {
        let l = run_loss([5, 3, 4, 6]);
        assert_eq!((l.expected(), l.lost()), (4, 0));
    }

    #[test]
    fn latency_from_send_instants() {
        let t0 = Instant::now();
        let mut s = LatencyStats::default();
        // 100 packets: latency 1 ms for 98, 40 ms for two.
        for i in 0..100u64 {
            let sent = t0 + Duration::from_millis(20 * i);
            let lat = if i == 50 || i == 51 { 40_000 } else { 1_000 };
            let got = s.on_packet(Some(sent), sent + Duration::from_micros(lat));
            assert_eq!(got, Some(lat));
        }
        assert_eq!(s.latency.len(), 100);
        let p50 = s.latency.value_at_quantile(0.50);
        let p99 = s.latency.value_at_quantile(0.99);
        assert!((999..=1001).contains(&p50), "p50 {p50}");
        assert!((39_900..=40_100).contains(&p99), "p99 {p99}");
        // Delay variation: 0 everywhere except entering (49→50) and leaving (51→52) the spike.
        assert_eq!(s.jitter.len(), 99);
        assert!(s.jitter.max() >= 38_900 && s.jitter.max() <= 39_100);
        assert_eq!(s.jitter.count_between(38_000, 40_000), 2);
        // Unmatched packets and impossible (future) send instants are not latency.
        assert_eq!(s.on_packet(None, t0), None);
        assert_eq!(s.on_packet(Some(t0 + Duration::from_secs(1)), t0), None);
        assert_eq!(s.unmatched, 2);
    }

    #[test]
    fn freeze_detection_video() {
        let t0 = Instant::now();
        let mut f = FreezeDetector::default();
        let mut seq = 100u64;
        let mut t = t0;
        // 30 fps, 3 packets per frame; frames 10..=19 never arrive. Frame 20 cannot be known
        // complete (its first packet is not identifiable after the hole), so the picture moves
        // again with frame 21: one freeze of 300 → 700 ms.
        for frame in 0..40u64 {
            t = t0 + Duration::from_micros(33_333 * frame);
            for p in 0..3 {
                if (10..20).contains(&frame) {
                    seq += 1;
                    continue;
                }
                f.on_packet(seq, p == 2, false, t);
                seq += 1;
            }
        }
        f.finish(t + Duration::from_millis(10));
        assert_eq!(f.freezes, 1);
        let frozen = f.frozen.as_millis();
        assert!((395..=405).contains(&frozen), "frozen {frozen} ms");
        assert_eq!((f.frames, f.incomplete_frames), (29, 1));
    }

    #[test]
    fn incomplete_frames_do_not_count_and_a_trailing_freeze_does() {
        let t0 = Instant::now();
        let mut f = FreezeDetector::default();
        // frame 1: seq 1,2,3(marker) complete; frame 2: seq 5(marker) with 4 missing.
        f.on_packet(1, false, false, t0);
        f.on_packet(2, false, false, t0);
        f.on_packet(3, true, false, t0);
        f.on_packet(5, true, false, t0 + Duration::from_millis(33));
        assert_eq!((f.frames, f.incomplete_frames), (1, 1));
        f.finish(t0 + Duration::from_millis(500));
        assert_eq!(f.freezes, 1);
        assert_eq!(f.frozen, Duration::from_millis(500));
    }

    #[test]
    fn audio_freezes_on_packet_gaps() {
        let t0 = Instant::now();
        let mut f = FreezeDetector::default();
        for i in [0u64, 1, 2, 3, 20, 21] {
            f.on_packet(i, false, true, t0 + Duration::from_millis(20 * i));
        }
        assert_eq!(f.freezes, 1);
        assert_eq!(f.frozen, Duration::from_millis(340));
    }

    #[test]
    fn fingerprints_differ_for_different_payloads() {
        let a = vec![1u8; 1200];
        let mut b = a.clone();
        b[3] = 2;
        let mut c = a.clone();
        c[1190] = 2;
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
        assert_ne!(fingerprint(&a), fingerprint(&a[..1199]));
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
    }
}
