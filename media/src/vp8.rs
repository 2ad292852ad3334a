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

/// Width and height from a keyframe's uncompressed header (RFC 6386 §9.1), if `payload` is the
/// first packet of a keyframe.
pub fn keyframe_dimensions(payload: &[u8]) -> Option<(u16, u16)> {
    let d = parse_descriptor(payload)?;
    if !(d.start_of_partition && d.partition_id == 0) {
        return None;
    }
    let frame = payload.get(d.header_len..)?;
    // 3-byte frame tag (P bit clear for keyframes), then start code 9d 01 2a, then 14-bit sizes.
    if frame.len() < 10 || frame[0] & 0x01 != 0 || frame[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let w = u16::from_le_bytes([frame[6], frame[7]]) & 0x3fff;
    let h = u16::from_le_bytes([frame[8], frame[9]]) & 0x3fff;
    (w > 0 && h > 0).then_some((w, h))
}

/// New values for the descriptor fields a forwarder renumbers (see [`rewrite_descriptor`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vp8Rewrite {
    pub picture_id: u16,
    pub tl0_pic_idx: u8,
    pub key_idx: u8,
}

/// A copy of `payload` with picture id, TL0PICIDX and KEYIDX replaced where the descriptor has
/// them (a 7-bit picture id keeps 7 bits). `None` if the descriptor is malformed.
pub fn rewrite_descriptor(payload: &[u8], r: Vp8Rewrite) -> Option<Vec<u8>> {
    let first = *payload.first()?;
    let mut out = payload.to_vec();
    if first & 0x80 == 0 {
        return Some(out);
    }
    let ext = *payload.get(1)?;
    let mut at = 2;
    if ext & 0x80 != 0 {
        let b = *payload.get(at)?;
        if b & 0x80 != 0 {
            *out.get_mut(at + 1)? = (r.picture_id & 0xff) as u8;
            out[at] = 0x80 | ((r.picture_id >> 8) as u8 & 0x7f);
            at += 2;
        } else {
            out[at] = (r.picture_id & 0x7f) as u8;
            at += 1;
        }
    }
    if ext & 0x40 != 0 {
        *out.get_mut(at)? = r.tl0_pic_idx;
        at += 1;
    }
    if ext & 0x10 != 0 {
        let b = out.get_mut(at)?;
        *b = (*b & 0xe0) | (r.key_idx & 0x1f);
    }
    Some(out)
}

/// KEYIDX when the descriptor carries it (K bit).
pub fn key_idx(payload: &[u8]) -> Option<u8> {
    let d = parse_descriptor(payload)?;
    let ext = *payload.get(1)?;
    if payload[0] & 0x80 == 0 || ext & 0x10 == 0 {
        return None;
    }
    // T/K byte is the last byte of the descriptor.
    payload.get(d.header_len - 1).map(|b| b & 0x1f)
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
        layer_sync: d.layer_sync,
        picture_id: d.picture_id,
        picture_id_15bit: payload.get(2).is_some_and(|b| payload[0] & 0x80 != 0 && payload[1] & 0x80 != 0 && b & 0x80 != 0),
        tl0_pic_idx: d.tl0_pic_idx,
        key_idx: key_idx(payload),
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
    fn keyframe_dimensions_table() {
        // descriptor (1 byte) + frame tag (3) + start code + 640x360 + scale bits set on width
        let key = [0x10, 0x00, 0x00, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x42, 0x68, 0x01];
        assert_eq!(keyframe_dimensions(&key), Some((640, 360)));
        let mut inter = key;
        inter[1] |= 0x01;
        assert_eq!(keyframe_dimensions(&inter), None, "interframes carry no size");
        let mut bad_start = key;
        bad_start[4] = 0;
        assert_eq!(keyframe_dimensions(&bad_start), None);
        assert_eq!(keyframe_dimensions(&key[..8]), None, "truncated");
        let mut cont = key;
        cont[0] = 0x00;
        assert_eq!(keyframe_dimensions(&cont), None, "not the start of the frame");
    }

    #[test]
    fn rewrite_table() {
        let r = Vp8Rewrite { picture_id: 0x0abc, tl0_pic_idx: 0x55, key_idx: 0x1e };
        // X, I (15-bit), L, T+K: pid 0x1234, tl0 7, tid 2 / keyidx 3
        let p = [0x90, 0xf0, 0x92, 0x34, 0x07, 0x83, 0xaa];
        let out = rewrite_descriptor(&p, r).unwrap();
        assert_eq!(out, vec![0x90, 0xf0, 0x8a, 0xbc, 0x55, 0x9e, 0xaa]);
        let d = parse_descriptor(&out).unwrap();
        assert_eq!((d.picture_id, d.tl0_pic_idx, d.temporal_id), (Some(0x0abc), Some(0x55), Some(2)));
        assert_eq!(key_idx(&out), Some(0x1e));
        // 7-bit picture id keeps its width
        let p7 = [0x90, 0x80, 0x05, 0xaa];
        assert_eq!(rewrite_descriptor(&p7, r).unwrap(), vec![0x90, 0x80, 0x3c, 0xaa]);
        // no extension: unchanged
        assert_eq!(rewrite_descriptor(&[0x10, 1, 2], r).unwrap(), vec![0x10, 1, 2]);
        // truncated: refused
        assert_eq!(rewrite_descriptor(&[0x90, 0xc0, 0x80], r), None);
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
