//! H.264 RTP payload (RFC 6184): keyframe start detection over single NAL units, STAP-A and FU-A.

use crate::codec::PayloadInfo;

const NAL_IDR: u8 = 5;
const NAL_SPS: u8 = 7;
const NAL_STAP_A: u8 = 24;
const NAL_FU_A: u8 = 28;

/// A decoder can start at a packet carrying an SPS or the first fragment of an IDR slice.
/// Browsers send SPS+PPS (in a STAP-A or as single NAL units) right before each IDR.
pub fn inspect(payload: &[u8]) -> PayloadInfo {
    let Some(&first) = payload.first() else {
        return PayloadInfo::default();
    };
    match first & 0x1f {
        NAL_STAP_A => {
            let mut at = 1;
            let mut key = false;
            while at + 2 < payload.len() {
                let size = usize::from(u16::from_be_bytes([payload[at], payload[at + 1]]));
                at += 2;
                if size == 0 || at + size > payload.len() {
                    break;
                }
                let t = payload[at] & 0x1f;
                key |= t == NAL_SPS || t == NAL_IDR;
                at += size;
            }
            PayloadInfo { keyframe_start: key, temporal_layer: 0, frame_start: true }
        }
        NAL_FU_A => {
            let Some(&fu_header) = payload.get(1) else {
                return PayloadInfo::default();
            };
            let start = fu_header & 0x80 != 0;
            let t = fu_header & 0x1f;
            PayloadInfo {
                keyframe_start: start && (t == NAL_IDR || t == NAL_SPS),
                temporal_layer: 0,
                frame_start: start,
            }
        }
        t @ 1..=23 => PayloadInfo {
            keyframe_start: t == NAL_SPS || t == NAL_IDR,
            temporal_layer: 0,
            frame_start: true,
        },
        _ => PayloadInfo::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nal_table() {
        let cases: &[(&[u8], bool, bool)] = &[
            (&[0x67, 0x42], true, true),              // SPS
            (&[0x68, 0xce], false, true),             // PPS alone
            (&[0x65, 0x88], true, true),              // IDR slice
            (&[0x41, 0x9a], false, true),             // non-IDR slice
            (&[0x7c, 0x85, 0x00], true, true),        // FU-A start of IDR
            (&[0x7c, 0x05, 0x00], false, false),      // FU-A continuation of IDR
            (&[0x5c, 0x81, 0x00], false, true),       // FU-A start of non-IDR
            (&[0x78, 0x00, 0x02, 0x67, 0x42, 0x00, 0x02, 0x68, 0xce], true, true), // STAP-A SPS+PPS
            (&[0x78, 0x00, 0x02, 0x68, 0xce], false, true), // STAP-A PPS only
            (&[0x78, 0x00, 0xff, 0x67], false, true), // STAP-A with a size past the end
            (&[0x7c], false, false),                  // truncated FU-A
            (&[], false, false),
        ];
        for (i, (payload, key, start)) in cases.iter().enumerate() {
            let info = inspect(payload);
            assert_eq!(info.keyframe_start, *key, "case {i} keyframe");
            assert_eq!(info.frame_start, *start, "case {i} frame start");
        }
    }
}
