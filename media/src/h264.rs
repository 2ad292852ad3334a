//! H.264 RTP payload (RFC 6184): keyframe start detection over single NAL units, STAP-A and FU-A.

use crate::codec::PayloadInfo;

const NAL_IDR: u8 = 5;
const NAL_SPS: u8 = 7;
const NAL_STAP_A: u8 = 24;
const NAL_FU_A: u8 = 28;

/// Width and height from an SPS carried in this payload (single NAL unit or STAP-A; an SPS is
/// never fragmented in practice). Handles emulation prevention and frame cropping.
pub fn sps_dimensions(payload: &[u8]) -> Option<(u16, u16)> {
    let first = *payload.first()?;
    match first & 0x1f {
        NAL_SPS => parse_sps(&payload[1..]),
        NAL_STAP_A => {
            let mut at = 1;
            while at + 2 < payload.len() {
                let size = usize::from(u16::from_be_bytes([payload[at], payload[at + 1]]));
                at += 2;
                let nal = payload.get(at..at + size)?;
                if nal.first().is_some_and(|b| b & 0x1f == NAL_SPS) {
                    return parse_sps(&nal[1..]);
                }
                at += size;
            }
            None
        }
        _ => None,
    }
}

/// Bit reader over an RBSP (emulation prevention bytes removed first).
struct Bits {
    data: Vec<u8>,
    pos: usize,
}

impl Bits {
    fn new(ebsp: &[u8]) -> Self {
        let mut data = Vec::with_capacity(ebsp.len());
        let mut zeros = 0;
        for &b in ebsp {
            if zeros >= 2 && b == 3 {
                zeros = 0;
                continue;
            }
            zeros = if b == 0 { zeros + 1 } else { 0 };
            data.push(b);
        }
        Self { data, pos: 0 }
    }

    fn bit(&mut self) -> Option<u32> {
        let byte = *self.data.get(self.pos / 8)?;
        let v = (byte >> (7 - self.pos % 8)) & 1;
        self.pos += 1;
        Some(u32::from(v))
    }

    fn bits(&mut self, n: u32) -> Option<u32> {
        let mut v = 0;
        for _ in 0..n {
            v = (v << 1) | self.bit()?;
        }
        Some(v)
    }

    fn ue(&mut self) -> Option<u32> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return None;
            }
        }
        Some((1u32 << zeros) - 1 + self.bits(zeros)?)
    }

    fn se(&mut self) -> Option<i32> {
        let k = self.ue()?;
        Some(if k % 2 == 1 { k.div_ceil(2) as i32 } else { -((k / 2) as i32) })
    }
}

fn parse_sps(rbsp: &[u8]) -> Option<(u16, u16)> {
    let mut b = Bits::new(rbsp);
    let profile_idc = b.bits(8)?;
    b.bits(16)?; // constraint flags + level
    b.ue()?; // seq_parameter_set_id
    let mut chroma_format_idc = 1;
    if [100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135].contains(&profile_idc) {
        chroma_format_idc = b.ue()?;
        if chroma_format_idc == 3 {
            b.bit()?;
        }
        b.ue()?; // bit_depth_luma
        b.ue()?; // bit_depth_chroma
        b.bit()?; // qpprime_y_zero_transform_bypass
        if b.bit()? == 1 {
            let lists = if chroma_format_idc == 3 { 12 } else { 8 };
            for i in 0..lists {
                if b.bit()? == 1 {
                    let size = if i < 6 { 16 } else { 64 };
                    let (mut last, mut next) = (8i32, 8i32);
                    for _ in 0..size {
                        if next != 0 {
                            next = (last + b.se()? + 256) % 256;
                        }
                        last = if next == 0 { last } else { next };
                    }
                }
            }
        }
    }
    b.ue()?; // log2_max_frame_num_minus4
    match b.ue()? {
        0 => {
            b.ue()?;
        }
        1 => {
            b.bit()?;
            b.se()?;
            b.se()?;
            let n = b.ue()?;
            if n > 255 {
                return None;
            }
            for _ in 0..n {
                b.se()?;
            }
        }
        _ => {}
    }
    b.ue()?; // max_num_ref_frames
    b.bit()?; // gaps_in_frame_num_value_allowed
    let width_mbs = b.ue()? + 1;
    let height_map_units = b.ue()? + 1;
    let frame_mbs_only = b.bit()?;
    if frame_mbs_only == 0 {
        b.bit()?;
    }
    b.bit()?; // direct_8x8_inference
    let (mut crop_l, mut crop_r, mut crop_t, mut crop_b) = (0, 0, 0, 0);
    if b.bit()? == 1 {
        crop_l = b.ue()?;
        crop_r = b.ue()?;
        crop_t = b.ue()?;
        crop_b = b.ue()?;
    }
    let (sub_w, sub_h) = match chroma_format_idc {
        0 | 3 => (1, 1),
        2 => (2, 1),
        _ => (2, 2),
    };
    let crop_unit_y = sub_h * (2 - frame_mbs_only);
    let w = (width_mbs * 16).checked_sub((crop_l + crop_r) * sub_w)?;
    let h = (height_map_units * 16 * (2 - frame_mbs_only)).checked_sub((crop_t + crop_b) * crop_unit_y)?;
    if w == 0 || h == 0 || w > 16384 || h > 16384 {
        return None;
    }
    Some((w as u16, h as u16))
}

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
            PayloadInfo { keyframe_start: key, frame_start: true, ..Default::default() }
        }
        NAL_FU_A => {
            let Some(&fu_header) = payload.get(1) else {
                return PayloadInfo::default();
            };
            let start = fu_header & 0x80 != 0;
            let t = fu_header & 0x1f;
            PayloadInfo { keyframe_start: start && (t == NAL_IDR || t == NAL_SPS), frame_start: start, ..Default::default() }
        }
        t @ 1..=23 => PayloadInfo { keyframe_start: t == NAL_SPS || t == NAL_IDR, frame_start: true, ..Default::default() },
        _ => PayloadInfo::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sps_dimensions_table() {
        // SPS NAL units from real encoders (Annex-B start codes removed).
        let cases: &[(&[u8], Option<(u16, u16)>)] = &[
            // constrained baseline 1280x720
            (&[0x67, 0x42, 0xc0, 0x1f, 0xda, 0x01, 0x40, 0x16, 0xe8, 0x40, 0x00, 0x00, 0x03, 0x00, 0x40, 0x00, 0x00, 0x0f, 0x23, 0xc6, 0x0c, 0xa8], Some((1280, 720))),
            (&[0x67], None),
            (&[0x65, 0x88, 0x84], None),
        ];
        for (i, (nal, want)) in cases.iter().enumerate() {
            assert_eq!(sps_dimensions(nal), *want, "case {i}");
        }
    }

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
