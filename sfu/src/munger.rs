//! Per-subscriber rewriting of sequence numbers and timestamps ("munging").
//!
//! A subscriber sees one continuous RTP stream per down track even when the packets come from
//! different sources over time (a simulcast layer switch, a publisher that restarted, a WHEP slot
//! rebound to a new track). Each source gets a *segment*: offsets from its extended sequence
//! number and timestamp to the output ones, chosen when the segment starts so that the output
//! continues where the previous segment stopped. The timestamp continues by the capture-time
//! distance between the two packets when both sources have sender reports (so frames captured
//! together keep one timeline across layers), else by wall time.
//!
//! Inside a segment, reordering and gaps are preserved (the subscriber NACKs gaps, and NACKs map
//! back through the same offsets). Packets the forwarder drops on purpose (padding, temporal
//! layers) and packets it inserts (probe padding) shift the offset for everything *newer* only,
//! as a step, so a late packet from before the step keeps its place.

use std::collections::VecDeque;
use std::time::Instant;

/// What identifies a source stream (a publisher track and the SSRC it currently sends on).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceKey {
    pub track: u64,
    pub ssrc: u32,
}

/// Why the munger refused to map a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MungeError {
    /// No segment is open for this source: the caller must start one first.
    NotCurrentSource,
    /// The packet is older than the start of its segment (it belongs to before the switch).
    BeforeSegment,
}

/// Offset steps kept per segment; older steps only matter for very late packets.
const MAX_STEPS: usize = 64;

#[derive(Clone, Debug)]
struct Segment {
    source: SourceKey,
    first_in_seq: u64,
    first_out_seq: u64,
    /// (first input seq the offset applies to, out = in + offset), ascending.
    steps: VecDeque<(u64, u64)>,
    ts_offset: u64,
}

impl Segment {
    fn offset_for(&self, in_seq: u64) -> u64 {
        self.steps.iter().rev().find(|(from, _)| in_seq >= *from).map_or(self.steps[0].1, |s| s.1)
    }

    fn push_step(&mut self, from: u64, offset: u64) {
        if let Some(last) = self.steps.back_mut()
            && last.0 == from
        {
            last.1 = offset;
            return;
        }
        self.steps.push_back((from, offset));
        while self.steps.len() > MAX_STEPS {
            self.steps.pop_front();
        }
    }
}

/// Sequence number and timestamp state of one down track. All values are 64-bit extended.
#[derive(Clone, Debug)]
pub struct Munger {
    clock_rate: u32,
    segment: Option<Segment>,
    /// Highest output sequence number written, with the timestamp, wall time and capture time
    /// of that packet.
    last_out_seq: u64,
    last_out_ts: u64,
    last_out_at: Option<Instant>,
    last_out_capture: Option<f64>,
    /// Highest input sequence number seen in the current segment.
    highest_in_seq: u64,
}

impl Munger {
    /// `initial_seq`/`initial_ts` are the wire values the subscriber's stream starts from
    /// (random in production, fixed in tests).
    pub fn new(clock_rate: u32, initial_seq: u16, initial_ts: u32) -> Self {
        Self {
            clock_rate,
            segment: None,
            // Start in cycle 1 and one below the first value, so the first packet gets exactly
            // `initial_seq`.
            last_out_seq: (1u64 << 16) + u64::from(initial_seq) - 1,
            last_out_ts: (1u64 << 32) + u64::from(initial_ts),
            last_out_at: None,
            last_out_capture: None,
            highest_in_seq: 0,
        }
    }

    pub fn current_source(&self) -> Option<SourceKey> {
        self.segment.as_ref().map(|s| s.source)
    }

    /// Starts a new segment at the packet (`in_seq`, `in_ts`) of `source`, so that it is output
    /// right after the last packet written. `capture` is the packet's capture time (seconds on
    /// the publisher's NTP clock, from its sender reports) when known.
    pub fn start_segment(&mut self, source: SourceKey, in_seq: u64, in_ts: u64, now: Instant, capture: Option<f64>) {
        let out_seq = self.last_out_seq + 1;
        let ticks = match (self.last_out_capture, capture, self.last_out_at) {
            _ if self.last_out_at.is_none() => 0,
            (Some(prev), Some(cur), _) => ((cur - prev) * f64::from(self.clock_rate)).round().max(1.0) as u64,
            (_, _, Some(at)) => ((now.saturating_duration_since(at).as_secs_f64() * f64::from(self.clock_rate)) as u64).max(1),
            _ => 1,
        };
        let out_ts = self.last_out_ts + ticks;
        self.segment = Some(Segment {
            source,
            first_in_seq: in_seq,
            first_out_seq: out_seq,
            steps: VecDeque::from([(in_seq, out_seq.wrapping_sub(in_seq))]),
            ts_offset: out_ts.wrapping_sub(in_ts),
        });
        self.highest_in_seq = in_seq;
    }

    /// Closes the current segment: the next packet must start a new one (used on mute/pause so
    /// the output does not carry a gap of everything that was not forwarded).
    pub fn end_segment(&mut self) {
        self.segment = None;
    }

    /// Maps a packet of the current segment to output (seq, ts).
    pub fn munge(&mut self, source: SourceKey, in_seq: u64, in_ts: u64, now: Instant, capture: Option<f64>) -> Result<(u64, u64), MungeError> {
        let seg = match &self.segment {
            Some(s) if s.source == source => s,
            _ => return Err(MungeError::NotCurrentSource),
        };
        if in_seq < seg.first_in_seq {
            return Err(MungeError::BeforeSegment);
        }
        let out_seq = in_seq.wrapping_add(seg.offset_for(in_seq));
        let out_ts = in_ts.wrapping_add(seg.ts_offset);
        if in_seq > self.highest_in_seq {
            self.highest_in_seq = in_seq;
        }
        if out_seq > self.last_out_seq {
            self.last_out_seq = out_seq;
            self.last_out_ts = out_ts;
            self.last_out_at = Some(now);
            self.last_out_capture = capture;
        }
        Ok((out_seq, out_ts))
    }

    /// Drops the newest packet of the segment without leaving a gap in the output (padding, a
    /// dropped temporal layer). Older packets cannot be closed up and stay a gap.
    pub fn skip(&mut self, source: SourceKey, in_seq: u64) {
        let highest = self.highest_in_seq;
        if let Some(seg) = self.segment.as_mut()
            && seg.source == source
            && in_seq > highest
        {
            // Every packet after this one moves down by one.
            let offset = seg.offset_for(in_seq).wrapping_sub(1);
            seg.push_step(in_seq + 1, offset);
            self.highest_in_seq = in_seq;
        }
    }

    /// Takes the next output sequence number for a packet the forwarder inserts (probe padding);
    /// newer source packets move up by one. Returns (seq, ts) for it, or `None` with no segment.
    pub fn insert(&mut self) -> Option<(u64, u64)> {
        let seg = self.segment.as_mut()?;
        let out_seq = self.last_out_seq + 1;
        // The next new source packet (highest_in + 1) must come out after this one.
        seg.push_step(self.highest_in_seq + 1, (out_seq + 1).wrapping_sub(self.highest_in_seq + 1));
        self.last_out_seq = out_seq;
        Some((out_seq, self.last_out_ts))
    }

    /// Takes the next output sequence number with or without an open segment (padding while
    /// paused); with a segment, newer source packets move up by one as for [`Self::insert`].
    pub fn insert_unanchored(&mut self) -> (u64, u64) {
        if let Some(r) = self.insert() {
            return r;
        }
        self.last_out_seq += 1;
        (self.last_out_seq, self.last_out_ts)
    }

    /// Maps an output sequence number (wire width, as NACKed by the subscriber) back to the
    /// input sequence number of the current segment, if it belongs to it.
    pub fn unmunge_seq(&self, out_wire_seq: u16) -> Option<(SourceKey, u64)> {
        let seg = self.segment.as_ref()?;
        let out = crate::seq::extend_near(self.last_out_seq, u64::from(out_wire_seq), 16);
        if out < seg.first_out_seq || out > self.last_out_seq {
            return None;
        }
        // The step whose range of inputs contains out - offset.
        for (i, &(from, offset)) in seg.steps.iter().enumerate().rev() {
            let in_seq = out.wrapping_sub(offset);
            let until = seg.steps.get(i + 1).map_or(u64::MAX, |s| s.0);
            if in_seq >= from && in_seq < until {
                return Some((seg.source, in_seq));
            }
        }
        None
    }

    /// Output timestamp for a source timestamp of the current segment (for retransmissions).
    pub fn ts_for(&self, source: SourceKey, in_ts: u64) -> Option<u64> {
        let seg = self.segment.as_ref()?;
        (seg.source == source).then(|| in_ts.wrapping_add(seg.ts_offset))
    }

    pub fn last_out_seq(&self) -> u64 {
        self.last_out_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const A: SourceKey = SourceKey { track: 1, ssrc: 111 };
    const B: SourceKey = SourceKey { track: 1, ssrc: 222 };

    /// One step of a munging scenario.
    enum Step {
        /// Start a segment at (source, in_seq, in_ts) at time t_ms with capture time.
        Start(SourceKey, u64, u64, u64, Option<f64>),
        /// Munge (source, in_seq, in_ts) at t_ms → expected wire (seq, ts) or error.
        Pkt(SourceKey, u64, u64, u64, Result<(u16, u32), MungeError>),
        /// Munge with a capture time.
        PktC(SourceKey, u64, u64, u64, f64, Result<(u16, u32), MungeError>),
        Skip(SourceKey, u64),
        /// Insert a packet → expected wire seq.
        Insert(u16),
    }
    use Step::*;

    fn run(initial_seq: u16, initial_ts: u32, clock: u32, steps: &[Step]) -> Munger {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut m = Munger::new(clock, initial_seq, initial_ts);
        for (i, step) in steps.iter().enumerate() {
            match *step {
                Start(src, s, ts, t, c) => m.start_segment(src, s, ts, at(t), c),
                Skip(src, s) => m.skip(src, s),
                Insert(want) => assert_eq!(m.insert().map(|(s, _)| s as u16), Some(want), "step {i}"),
                Pkt(src, s, ts, t, want) => {
                    let got = m.munge(src, s, ts, at(t), None).map(|(s, ts)| (s as u16, ts as u32));
                    assert_eq!(got, want, "step {i}");
                }
                PktC(src, s, ts, t, c, want) => {
                    let got = m.munge(src, s, ts, at(t), Some(c)).map(|(s, ts)| (s as u16, ts as u32));
                    assert_eq!(got, want, "step {i}");
                }
            }
        }
        m
    }

    const C16: u64 = 1 << 16;
    const C32: u64 = 1 << 32;

    #[test]
    fn first_segment_starts_at_the_initial_values() {
        run(1000, 5000, 90_000, &[
            Start(A, C16 + 7, C32 + 90, 0, None),
            Pkt(A, C16 + 7, C32 + 90, 0, Ok((1000, 5000))),
            Pkt(A, C16 + 8, C32 + 90, 0, Ok((1001, 5000))),
            Pkt(A, C16 + 9, C32 + 3090, 33, Ok((1002, 8000))),
            // reordered packet keeps its place
            Pkt(A, C16 + 11, C32 + 6090, 66, Ok((1004, 11000))),
            Pkt(A, C16 + 10, C32 + 3090, 67, Ok((1003, 8000))),
            // before the segment → refused
            Pkt(A, C16 + 6, C32, 68, Err(MungeError::BeforeSegment)),
            // other source → refused
            Pkt(B, C16 + 12, C32, 68, Err(MungeError::NotCurrentSource)),
        ]);
    }

    #[test]
    fn output_wraps_while_input_does_not() {
        run(65534, u32::MAX - 1000, 90_000, &[
            Start(A, C16 + 100, C32, 0, None),
            Pkt(A, C16 + 100, C32, 0, Ok((65534, u32::MAX - 1000))),
            Pkt(A, C16 + 101, C32, 0, Ok((65535, u32::MAX - 1000))),
            Pkt(A, C16 + 102, C32 + 3000, 33, Ok((0, 1999))),
            Pkt(A, C16 + 103, C32 + 3000, 33, Ok((1, 1999))),
        ]);
    }

    #[test]
    fn input_wrap_is_invisible_in_output() {
        run(10, 0, 48_000, &[
            Start(A, C16 + 65534, C32, 0, None),
            Pkt(A, C16 + 65534, C32, 0, Ok((10, 0))),
            Pkt(A, C16 + 65535, C32 + 960, 20, Ok((11, 960))),
            Pkt(A, 2 * C16, C32 + 1920, 40, Ok((12, 1920))),
            Pkt(A, 2 * C16 + 1, C32 + 2880, 60, Ok((13, 2880))),
        ]);
    }

    #[test]
    fn switching_source_continues_seq_and_advances_ts_by_wall_time() {
        run(100, 0, 90_000, &[
            Start(A, C16 + 50, C32 + 1000, 0, None),
            Pkt(A, C16 + 50, C32 + 1000, 0, Ok((100, 0))),
            Pkt(A, C16 + 51, C32 + 4000, 33, Ok((101, 3000))),
            // New source with unrelated numbering, 100 ms after the last packet.
            Start(B, C16 + 40000, C32 + 777_777, 133, None),
            Pkt(B, C16 + 40000, C32 + 777_777, 133, Ok((102, 3000 + 9000))),
            Pkt(B, C16 + 40001, C32 + 780_777, 166, Ok((103, 15000))),
            // The old source is no longer mapped.
            Pkt(A, C16 + 52, C32 + 7000, 167, Err(MungeError::NotCurrentSource)),
        ]);
    }

    #[test]
    fn switching_with_capture_times_keeps_one_timeline() {
        // Layer B's frame was captured 33.3 ms after the last frame of A that went out, although
        // it is forwarded 80 ms later: the timestamp follows the capture time, not the wall.
        run(0, 0, 90_000, &[
            Start(A, C16, C32, 0, Some(10.0)),
            PktC(A, C16, C32, 0, 10.0, Ok((0, 0))),
            PktC(A, C16 + 1, C32 + 3000, 33, 10.0 + 3000.0 / 90_000.0, Ok((1, 3000))),
            Start(B, C16 + 900, C32 + 123_456, 113, Some(10.0 + 6000.0 / 90_000.0)),
            PktC(B, C16 + 900, C32 + 123_456, 113, 10.0 + 6000.0 / 90_000.0, Ok((2, 6000))),
        ]);
    }

    #[test]
    fn switch_without_elapsed_time_still_moves_timestamp_forward() {
        run(0, 0, 90_000, &[
            Start(A, C16, C32, 0, None),
            Pkt(A, C16, C32, 0, Ok((0, 0))),
            Start(B, C16 + 9, C32 + 5, 0, None),
            Pkt(B, C16 + 9, C32 + 5, 0, Ok((1, 1))),
        ]);
    }

    #[test]
    fn skipping_the_newest_packet_leaves_no_gap_and_late_packets_keep_their_place() {
        run(0, 0, 90_000, &[
            Start(A, C16 + 1, C32, 0, None),
            Pkt(A, C16 + 1, C32, 0, Ok((0, 0))),
            // 2 is late; 3 arrives and goes out as 2 + 1
            Pkt(A, C16 + 3, C32, 0, Ok((2, 0))),
            Skip(A, C16 + 4),
            Pkt(A, C16 + 5, C32, 0, Ok((3, 0))),
            // the late packet still gets its own place, not the skipped one's
            Pkt(A, C16 + 2, C32, 0, Ok((1, 0))),
            // skipping an old packet changes nothing
            Skip(A, C16 + 2),
            Pkt(A, C16 + 6, C32, 0, Ok((4, 0))),
        ]);
    }

    #[test]
    fn inserted_packets_take_the_next_number() {
        let m = run(0, 0, 90_000, &[
            Start(A, C16 + 10, C32, 0, None),
            Pkt(A, C16 + 10, C32, 0, Ok((0, 0))),
            Pkt(A, C16 + 12, C32, 0, Ok((2, 0))),
            Insert(3),
            Insert(4),
            Pkt(A, C16 + 13, C32, 0, Ok((5, 0))),
            // late packet from before the inserts keeps its place
            Pkt(A, C16 + 11, C32, 0, Ok((1, 0))),
        ]);
        // NACKs map back through the steps; inserted numbers have no source packet.
        assert_eq!(m.unmunge_seq(1), Some((A, C16 + 11)));
        assert_eq!(m.unmunge_seq(5), Some((A, C16 + 13)));
        assert_eq!(m.unmunge_seq(3), None);
        assert_eq!(m.unmunge_seq(4), None);
    }

    #[test]
    fn nacked_output_maps_back_to_input() {
        let t = Instant::now();
        let mut m = Munger::new(90_000, 65535, 0);
        m.start_segment(A, C16 + 500, C32, t, None);
        for i in 0..4 {
            m.munge(A, C16 + 500 + i, C32, t, None).unwrap();
        }
        // outputs were 65535, 0, 1, 2
        assert_eq!(m.unmunge_seq(65535), Some((A, C16 + 500)));
        assert_eq!(m.unmunge_seq(1), Some((A, C16 + 502)));
        assert_eq!(m.unmunge_seq(3), None, "not sent yet");
        assert_eq!(m.unmunge_seq(65000), None, "before the segment");
        m.start_segment(B, C16, C32, t, None);
        assert_eq!(m.unmunge_seq(1), None, "previous segment is gone");
    }
}
