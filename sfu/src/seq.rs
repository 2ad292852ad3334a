//! Extension of wrapping RTP counters (16-bit sequence numbers, 32-bit timestamps) to 64 bits.
//!
//! Inside the engine every sequence number and timestamp is 64-bit and never wraps; they are cut
//! to wire width only when a packet is written. The first value lands in cycle 1 (not 0) so that a
//! packet reordered from just before a wrap still extends to a positive value.

/// Extends a wrapping counter of `BITS` bits (16 for sequence numbers, 32 for timestamps).
#[derive(Clone, Copy, Debug, Default)]
pub struct Extender<const BITS: u32> {
    highest: Option<u64>,
}

/// Extends RTP sequence numbers.
pub type SeqExtender = Extender<16>;
/// Extends RTP timestamps.
pub type TsExtender = Extender<32>;

impl<const BITS: u32> Extender<BITS> {
    const RANGE: u64 = 1 << BITS;
    const HALF: u64 = 1 << (BITS - 1);
    const MASK: u64 = Self::RANGE - 1;

    pub fn new() -> Self {
        Self { highest: None }
    }

    /// Returns the extended value of `value` (wire-width, upper bits ignored): the candidate
    /// closest to the highest value seen so far. Only moves `highest` forward.
    pub fn extend(&mut self, value: u64) -> u64 {
        let value = value & Self::MASK;
        let Some(highest) = self.highest else {
            let ext = Self::RANGE + value;
            self.highest = Some(ext);
            return ext;
        };
        let ext = extend_near(highest, value, BITS);
        if ext > highest {
            self.highest = Some(ext);
        }
        ext
    }

    /// Extends without updating state (for lookups such as NACKed sequence numbers).
    pub fn peek(&self, value: u64) -> Option<u64> {
        self.highest.map(|h| extend_near(h, value & Self::MASK, BITS))
    }

    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    /// Forgets history (a new source with an unrelated counter).
    pub fn reset(&mut self) {
        self.highest = None;
    }

    #[doc(hidden)]
    pub const fn half() -> u64 {
        Self::HALF
    }
}

/// The extension of the `bits`-wide `value` closest to `reference`.
pub fn extend_near(reference: u64, value: u64, bits: u32) -> u64 {
    let range = 1u64 << bits;
    let half = range >> 1;
    let mask = range - 1;
    let base = reference & !mask;
    let candidate = base | (value & mask);
    if candidate > reference && candidate - reference > half {
        // Closer to the previous cycle (a late packet from before the last wrap).
        candidate.checked_sub(range).unwrap_or(candidate)
    } else if candidate < reference && reference - candidate >= half {
        candidate + range
    } else {
        candidate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each row: wire values fed in order → expected extended values.
    #[test]
    fn sequence_extension_table() {
        let c = 1u64 << 16; // first cycle
        let rows: &[(&[u64], &[u64])] = &[
            (&[0, 1, 2], &[c, c + 1, c + 2]),
            // forward wrap
            (&[65534, 65535, 0, 1], &[c + 65534, c + 65535, 2 * c, 2 * c + 1]),
            // reordering across the wrap: 0 arrives before 65535
            (&[65534, 0, 65535, 1], &[c + 65534, 2 * c, c + 65535, 2 * c + 1]),
            // a late packet from before the first one
            (&[10, 9, 11], &[c + 10, c + 9, c + 11]),
            // late packet from before a wrap at the very start
            (&[1, 65535, 2], &[c + 1, c - 1, c + 2]),
            // jump just under half a cycle forward is forward
            (&[0, 32767], &[c, c + 32767]),
            // exactly half a cycle away is ambiguous; it resolves forward (as libwebrtc does)
            (&[32768, 0], &[c + 32768, 2 * c]),
            // just under half a cycle back is backward
            (&[32768, 1], &[c + 32768, c + 1]),
            // two full wraps
            (&[0, 30000, 60000, 24464, 54464, 18928], &[c, c + 30000, c + 60000, 2 * c + 24464, 2 * c + 54464, 3 * c + 18928]),
        ];
        for (i, (input, want)) in rows.iter().enumerate() {
            let mut e = SeqExtender::new();
            let got: Vec<u64> = input.iter().map(|&v| e.extend(v)).collect();
            assert_eq!(&got[..], *want, "row {i}");
        }
    }

    #[test]
    fn timestamp_extension_table() {
        let c = 1u64 << 32;
        let rows: &[(&[u64], &[u64])] = &[
            (&[0, 3000, 6000], &[c, c + 3000, c + 6000]),
            (&[u32::MAX as u64 - 1499, 1500], &[c + u32::MAX as u64 - 1499, 2 * c + 1500]),
            (&[1500, u32::MAX as u64 - 1499, 4500], &[c + 1500, c - 1500, c + 4500]),
        ];
        for (i, (input, want)) in rows.iter().enumerate() {
            let mut e = TsExtender::new();
            let got: Vec<u64> = input.iter().map(|&v| e.extend(v)).collect();
            assert_eq!(&got[..], *want, "row {i}");
        }
    }

    #[test]
    fn peek_does_not_move_state() {
        let mut e = SeqExtender::new();
        assert_eq!(e.peek(5), None);
        e.extend(65535);
        assert_eq!(e.peek(2), Some((2 << 16) + 2));
        assert_eq!(e.highest(), Some((1 << 16) + 65535));
    }

    #[test]
    fn extend_near_never_underflows() {
        assert_eq!(extend_near(5, 65535, 16), 65535);
    }
}
