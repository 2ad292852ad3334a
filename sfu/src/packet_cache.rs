//! Recent packets of one published video stream, kept so that subscriber NACKs are answered by
//! the SFU (one cache per source, shared by all its subscribers) instead of being forwarded to the
//! publisher.

use bytes::Bytes;

/// A packet as received from the publisher (before any per-subscriber rewriting).
#[derive(Clone, Debug)]
pub struct CachedPacket {
    pub ext_seq: u64,
    pub ext_ts: u64,
    pub marker: bool,
    pub payload: Bytes,
}

/// Ring buffer indexed by extended sequence number.
#[derive(Debug)]
pub struct PacketCache {
    slots: Vec<Option<CachedPacket>>,
    mask: u64,
}

impl PacketCache {
    /// `capacity` is rounded up to a power of two. 512 packets ≈ 0.5 s of 720p at 2.5 Mbit/s —
    /// more than a NACK round trip on any link worth retransmitting over.
    pub fn new(capacity: usize) -> Self {
        let cap = capacity.max(1).next_power_of_two();
        Self { slots: (0..cap).map(|_| None).collect(), mask: cap as u64 - 1 }
    }

    pub fn insert(&mut self, packet: CachedPacket) {
        let i = (packet.ext_seq & self.mask) as usize;
        // A late packet never evicts a newer one that owns the slot.
        if let Some(existing) = &self.slots[i]
            && existing.ext_seq > packet.ext_seq
        {
            return;
        }
        self.slots[i] = Some(packet);
    }

    pub fn get(&self, ext_seq: u64) -> Option<&CachedPacket> {
        self.slots[(ext_seq & self.mask) as usize]
            .as_ref()
            .filter(|p| p.ext_seq == ext_seq)
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(seq: u64) -> CachedPacket {
        CachedPacket { ext_seq: seq, ext_ts: seq * 10, marker: false, payload: Bytes::from(vec![seq as u8]) }
    }

    #[test]
    fn keeps_the_last_capacity_packets() {
        let mut c = PacketCache::new(4);
        for s in 100..110 {
            c.insert(p(s));
        }
        for s in 100..106 {
            assert!(c.get(s).is_none(), "{s} evicted");
        }
        for s in 106..110 {
            assert_eq!(c.get(s).unwrap().ext_ts, s * 10);
        }
    }

    #[test]
    fn late_packet_does_not_evict_newer() {
        let mut c = PacketCache::new(4);
        c.insert(p(108));
        c.insert(p(104));
        assert!(c.get(104).is_none());
        assert!(c.get(108).is_some());
    }

    #[test]
    fn capacity_rounds_up() {
        assert_eq!(PacketCache::new(500).capacity(), 512);
        assert_eq!(PacketCache::new(0).capacity(), 1);
    }
}
