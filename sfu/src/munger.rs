//! Per-subscriber rewriting of sequence numbers and timestamps ("munging").
//!
//! A subscriber sees one continuous RTP stream per down track even when the packets come from
//! different sources over time (a publisher that restarted, a WHEP slot rebound to a new track, a
//! simulcast layer switch). Each source gets a *segment*: a constant offset from its extended
//! sequence number and timestamp to the output ones, chosen when the segment starts so that the
//! output continues from where the previous segment stopped. Within a segment, reordering and
//! gaps are preserved (the subscriber NACKs gaps, and NACKs are mapped back through the segment).

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

#[derive(Clone, Copy, Debug)]
struct Segment {
    source: SourceKey,
    first_in_seq: u64,
    first_out_seq: u64,
    /// out = in + offset (wrapping arithmetic; offsets may be "negative").
    seq_offset: u64,
    ts_offset: u64,
}

/// Sequence number and timestamp state of one down track. All values are 64-bit extended.
#[derive(Clone, Debug)]
pub struct Munger {
    clock_rate: u32,
    segment: Option<Segment>,
    /// Highest output sequence number written, and the timestamp and time it was written at.
    last_out_seq: u64,
    last_out_ts: u64,
    last_out_at: Option<Instant>,
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
            highest_in_seq: 0,
        }
    }

    pub fn current_source(&self) -> Option<SourceKey> {
        self.segment.map(|s| s.source)
    }

    /// Starts a new segment at the packet (`in_seq`, `in_ts`) of `source`, so that it is output
    /// right after the last packet written. The timestamp advances by the wall time since that
    /// packet (at least one tick, so a new frame never reuses the previous timestamp).
    pub fn start_segment(&mut self, source: SourceKey, in_seq: u64, in_ts: u64, now: Instant) {
        let out_seq = self.last_out_seq + 1;
        let out_ts = match self.last_out_at {
            None => self.last_out_ts,
            Some(at) => {
                let elapsed = now.saturating_duration_since(at);
                let ticks = (elapsed.as_secs_f64() * f64::from(self.clock_rate)) as u64;
                self.last_out_ts + ticks.max(1)
            }
        };
        self.segment = Some(Segment {
            source,
            first_in_seq: in_seq,
            first_out_seq: out_seq,
            seq_offset: out_seq.wrapping_sub(in_seq),
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
    pub fn munge(
        &mut self,
        source: SourceKey,
        in_seq: u64,
        in_ts: u64,
        now: Instant,
    ) -> Result<(u64, u64), MungeError> {
        let seg = match self.segment {
            Some(s) if s.source == source => s,
            _ => return Err(MungeError::NotCurrentSource),
        };
        if in_seq < seg.first_in_seq {
            return Err(MungeError::BeforeSegment);
        }
        let out_seq = in_seq.wrapping_add(seg.seq_offset);
        let out_ts = in_ts.wrapping_add(seg.ts_offset);
        if in_seq > self.highest_in_seq {
            self.highest_in_seq = in_seq;
        }
        if out_seq > self.last_out_seq {
            self.last_out_seq = out_seq;
            self.last_out_ts = out_ts;
            self.last_out_at = Some(now);
        }
        Ok((out_seq, out_ts))
    }

    /// Drops the newest packet of the segment without leaving a gap in the output (e.g. a
    /// padding-only packet). Older packets cannot be closed up and are left as a gap.
    pub fn skip(&mut self, source: SourceKey, in_seq: u64) {
        if let Some(seg) = self.segment.as_mut()
            && seg.source == source
            && in_seq > self.highest_in_seq
        {
            // Every packet after this one moves down by one.
            seg.seq_offset = seg.seq_offset.wrapping_sub(1);
            self.highest_in_seq = in_seq;
        }
    }

    /// Maps an output sequence number (wire width, as NACKed by the subscriber) back to the
    /// input sequence number of the current segment, if it belongs to it.
    pub fn unmunge_seq(&self, out_wire_seq: u16) -> Option<(SourceKey, u64)> {
        let seg = self.segment?;
        let out = crate::seq::extend_near(self.last_out_seq, u64::from(out_wire_seq), 16);
        if out < seg.first_out_seq || out > self.last_out_seq {
            return None;
        }
        Some((seg.source, out.wrapping_sub(seg.seq_offset)))
    }

    /// Output timestamp offset of the current segment (for retransmissions).
    pub fn ts_for(&self, source: SourceKey, in_ts: u64) -> Option<u64> {
        let seg = self.segment?;
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
        /// Start a segment at (source, in_seq, in_ts) at time t_ms.
        Start(SourceKey, u64, u64, u64),
        /// Munge (source, in_seq, in_ts) at t_ms → expected wire (seq, ts) or error.
        Pkt(SourceKey, u64, u64, u64, Result<(u16, u32), MungeError>),
        Skip(SourceKey, u64),
    }
    use Step::*;

    fn run(initial_seq: u16, initial_ts: u32, clock: u32, steps: &[Step]) {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut m = Munger::new(clock, initial_seq, initial_ts);
        for (i, step) in steps.iter().enumerate() {
            match *step {
                Start(src, s, ts, t) => m.start_segment(src, s, ts, at(t)),
                Skip(src, s) => m.skip(src, s),
                Pkt(src, s, ts, t, want) => {
                    let got = m.munge(src, s, ts, at(t)).map(|(s, ts)| (s as u16, ts as u32));
                    assert_eq!(got, want, "step {i}");
                }
            }
        }
    }

    const C16: u64 = 1 << 16;
    const C32: u64 = 1 << 32;

    #[test]
    fn first_segment_starts_at_the_initial_values() {
        run(1000, 5000, 90_000, &[
            Start(A, C16 + 7, C32 + 90, 0),
            Pkt(A, C16 + 7, C32 + 90, 0, Ok((1000, 5000))),
            Pkt(A, C16 + 8, C32 + 90, 0, Ok((1001, 5000))),
            Pkt(A, C16 + 9, C32 + 3090, 33, Ok((1002, 8000))),
            // reordered packet keeps its place
            Pkt(A, C16 + 11, C32 + 6090, 66, Ok((1004, 11000))),
            Pkt(A, C16 + 10, C32 + 3090, 67, Ok((1003, 8000))),
            // before the segment → refused
            Pkt(A, C16 + 6, C32 + 0, 68, Err(MungeError::BeforeSegment)),
            // other source → refused
            Pkt(B, C16 + 12, C32 + 0, 68, Err(MungeError::NotCurrentSource)),
        ]);
    }

    #[test]
    fn output_wraps_while_input_does_not() {
        run(65534, u32::MAX - 1000, 90_000, &[
            Start(A, C16 + 100, C32 + 0, 0),
            Pkt(A, C16 + 100, C32 + 0, 0, Ok((65534, u32::MAX - 1000))),
            Pkt(A, C16 + 101, C32 + 0, 0, Ok((65535, u32::MAX - 1000))),
            Pkt(A, C16 + 102, C32 + 3000, 33, Ok((0, 1999))),
            Pkt(A, C16 + 103, C32 + 3000, 33, Ok((1, 1999))),
        ]);
    }

    #[test]
    fn input_wrap_is_invisible_in_output() {
        // Extended input crosses from cycle 1 to cycle 2 — output simply continues.
        run(10, 0, 48_000, &[
            Start(A, C16 + 65534, C32 + 0, 0),
            Pkt(A, C16 + 65534, C32 + 0, 0, Ok((10, 0))),
            Pkt(A, C16 + 65535, C32 + 960, 20, Ok((11, 960))),
            Pkt(A, 2 * C16, C32 + 1920, 40, Ok((12, 1920))),
            Pkt(A, 2 * C16 + 1, C32 + 2880, 60, Ok((13, 2880))),
        ]);
    }

    #[test]
    fn switching_source_continues_seq_and_advances_ts_by_wall_time() {
        run(100, 0, 90_000, &[
            Start(A, C16 + 50, C32 + 1000, 0),
            Pkt(A, C16 + 50, C32 + 1000, 0, Ok((100, 0))),
            Pkt(A, C16 + 51, C32 + 4000, 33, Ok((101, 3000))),
            // New source with unrelated numbering, 100 ms after the last packet.
            Start(B, C16 + 40000, C32 + 777_777, 133),
            Pkt(B, C16 + 40000, C32 + 777_777, 133, Ok((102, 3000 + 9000))),
            Pkt(B, C16 + 40001, C32 + 780_777, 166, Ok((103, 15000))),
            // The old source is no longer mapped.
            Pkt(A, C16 + 52, C32 + 7000, 167, Err(MungeError::NotCurrentSource)),
        ]);
    }

    #[test]
    fn switch_without_elapsed_time_still_moves_timestamp_forward() {
        run(0, 0, 90_000, &[
            Start(A, C16, C32, 0),
            Pkt(A, C16, C32, 0, Ok((0, 0))),
            Start(B, C16 + 9, C32 + 5, 0),
            Pkt(B, C16 + 9, C32 + 5, 0, Ok((1, 1))),
        ]);
    }

    #[test]
    fn skipping_the_newest_packet_leaves_no_gap() {
        run(0, 0, 90_000, &[
            Start(A, C16 + 1, C32, 0),
            Pkt(A, C16 + 1, C32, 0, Ok((0, 0))),
            Skip(A, C16 + 2),
            Pkt(A, C16 + 3, C32, 0, Ok((1, 0))),
            // skipping an old packet changes nothing
            Skip(A, C16 + 2),
            Pkt(A, C16 + 4, C32, 0, Ok((2, 0))),
        ]);
    }

    #[test]
    fn nacked_output_maps_back_to_input() {
        let t = Instant::now();
        let mut m = Munger::new(90_000, 65535, 0);
        m.start_segment(A, C16 + 500, C32, t);
        for i in 0..4 {
            m.munge(A, C16 + 500 + i, C32, t).unwrap();
        }
        // outputs were 65535, 0, 1, 2
        assert_eq!(m.unmunge_seq(65535), Some((A, C16 + 500)));
        assert_eq!(m.unmunge_seq(1), Some((A, C16 + 502)));
        assert_eq!(m.unmunge_seq(3), None, "not sent yet");
        assert_eq!(m.unmunge_seq(65000), None, "before the segment");
        m.start_segment(B, C16, C32, t);
        assert_eq!(m.unmunge_seq(1), None, "previous segment is gone");
    }
}
