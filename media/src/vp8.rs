//! VP8 RTP payload descriptor (RFC 7741 §4.2): keyframe start and temporal layer id.

use crate::codec::PayloadInfo;

/// Parsed VP8 payload descriptor fields the SFU uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vp8Descriptor {
    /// S bit: first packet of a VP8 partition.
    pub start_of_partition: bool,
    /// Partition index (PID).
    pub partition_id: u8,
    /// 15- or 7-bit picture id when present.
    pub picture_id: Option<u16>,
    /// TL0PICIDX when present.
    pub tl0_pic_idx: Option<u8>,
    /// Temporal layer id when the T bit is set.
    pub temporal_id: Option<u8>,
    /// Y bit (layer sync) when the T bit is set.
    pub layer_sync: bool,
    /// Length of the descriptor in bytes; the VP8 payload header follows.
    pub header_len: usize,
}

/// Parses the descriptor; `None` when the payload is too short for what its flags announce.
pub fn parse_descriptor(payload: &[u8]) -> Option<Vp8Descriptor> {
    let first = *payload.first()?;
    let mut d = Vp8Descriptor {
        start_of_partition: first & 0x10 != 0,
        partition_id: first & 0x0f,
        ..Default::default()
    };
    let mut at = 1;
    if first & 0x80 != 0 {
        let ext = *payload.get(at)?;
        at += 1;
        let (has_i, has_l, has_t, has_k) = (ext & 0x80 != 0, ext & 0x40 != 0, ext & 0x20 != 0, ext & 0x10 != 0);
        if has_i {
            let b = *payload.get(at)?;
            at += 1;
            if b & 0x80 != 0 {
                let b2 = *payload.get(at)?;
                at += 1;
                d.picture_id = Some((u16::from(b & 0x7f) << 8) | u16::from(b2));
            } else {
                d.picture_id = Some(u16::from(b & 0x7f));
            }
        }
        if has_l {
            d.tl0_pic_idx = Some(*payload.get(at)?);
            at += 1;
        }
        if has_t || has_k {
            let b = *payload.get(at)?;
            at += 1;
            if has_t {
                d.temporal_id = Some(b >> 6);
                d.layer_sync = b & 0x20 != 0;
            }
        }
    }
    if at > payload.len() {
        return None;
    }
    d.header_len = at;
    Some(d)
}

/// Keyframe start: first packet of partition 0 whose VP8 frame header has the P bit clear.
pub fn inspect(payload: &[u8]) -> PayloadInfo {
    let Some(d) = parse_descriptor(payload) else {
        return PayloadInfo::default();
    };
    let frame_start = d.start_of_partition && d.partition_id == 0;
    let keyframe_start = frame_start
        && payload
            .get(d.header_len)
            .is_some_and(|frame_tag| frame_tag & 0x01 == 0);
    PayloadInfo {
        keyframe_start,
        temporal_layer: d.temporal_id.unwrap_or(0),
        frame_start,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_table() {
        // (payload, keyframe_start, frame_start, temporal layer)
        let cases: &[(&[u8], bool, bool, u8)] = &[
            // minimal descriptor, S=1 PID=0, frame tag P=0 → keyframe
            (&[0x10, 0x00, 0x00, 0x00], true, true, 0),
            // S=1 PID=0, P=1 → interframe
            (&[0x10, 0x01, 0x00], false, true, 0),
            // S=0 → continuation
            (&[0x00, 0x00], false, false, 0),
            // S=1 but partition 1
            (&[0x11, 0x00], false, false, 0),
            // X, I with 15-bit picture id, L, T (tid=2), keyframe
            (&[0x90, 0xe0, 0x80 | 0x12, 0x34, 0x07, 0x80, 0x00], true, true, 2),
            // X, I with 7-bit picture id, T (tid=1, Y), interframe
            (&[0x90, 0xa0, 0x05, 0x60, 0x01], false, true, 1),
            // truncated: X set but no extension byte
            (&[0x90], false, false, 0),
            // truncated: I announces a 2-byte picture id, only one byte present
            (&[0x90, 0x80, 0x80], false, false, 0),
            // descriptor ends exactly at payload end: no frame tag, so not a keyframe
            (&[0x10], false, true, 0),
            (&[], false, false, 0),
        ];
        for (i, (payload, key, start, tid)) in cases.iter().enumerate() {
            let info = inspect(payload);
            assert_eq!(info.keyframe_start, *key, "case {i} keyframe");
            assert_eq!(info.frame_start, *start, "case {i} frame start");
            assert_eq!(info.temporal_layer, *tid, "case {i} tid");
        }
    }

    #[test]
    fn picture_id_and_tl0() {
        let d = parse_descriptor(&[0x90, 0xe0, 0x80 | 0x12, 0x34, 0x07, 0x80, 0x00]).unwrap();
        assert_eq!(d.picture_id, Some(0x1234));
        assert_eq!(d.tl0_pic_idx, Some(7));
        assert_eq!(d.temporal_id, Some(2));
        assert_eq!(d.header_len, 6);
    }
}
