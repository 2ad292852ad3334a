//! The codecs Warbler forwards and the per-packet facts the forwarder needs from a payload.

use crate::{h264, vp8};

/// Audio or video.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MediaKind {
    Audio,
    Video,
}

/// A codec the SFU knows how to forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codec {
    Opus,
    Vp8,
    H264,
    Vp9,
    Av1,
}

impl Codec {
    /// Recognises a codec from an SDP/RTP mime type such as `video/VP8` (case-insensitive).
    pub fn from_mime(mime: &str) -> Option<Codec> {
        let sub = mime.rsplit('/').next().unwrap_or(mime);
        match sub.to_ascii_lowercase().as_str() {
            "opus" => Some(Codec::Opus),
            "vp8" => Some(Codec::Vp8),
            "h264" => Some(Codec::H264),
            "vp9" => Some(Codec::Vp9),
            "av1" => Some(Codec::Av1),
            _ => None,
        }
    }

    pub fn kind(self) -> MediaKind {
        match self {
            Codec::Opus => MediaKind::Audio,
            _ => MediaKind::Video,
        }
    }

    pub fn mime(self) -> &'static str {
        match self {
            Codec::Opus => "audio/opus",
            Codec::Vp8 => "video/VP8",
            Codec::H264 => "video/H264",
            Codec::Vp9 => "video/VP9",
            Codec::Av1 => "video/AV1",
        }
    }

    pub fn clock_rate(self) -> u32 {
        match self {
            Codec::Opus => 48_000,
            _ => 90_000,
        }
    }

    /// Short lowercase name used in metrics and the protocol.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Opus => "opus",
            Codec::Vp8 => "vp8",
            Codec::H264 => "h264",
            Codec::Vp9 => "vp9",
            Codec::Av1 => "av1",
        }
    }
}

/// What the forwarder needs to know about one RTP payload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PayloadInfo {
    /// The packet is the first packet of a keyframe: a decoder can start here.
    pub keyframe_start: bool,
    /// Temporal layer id when the codec signals one (VP8 with the T bit); 0 otherwise.
    pub temporal_layer: u8,
    /// The payload is the start of a new frame (VP8 S bit with partition 0; any H.264 packet
    /// that is not a continuation fragment).
    pub frame_start: bool,
    /// VP8 Y bit: the frame depends only on the base temporal layer, so a forwarder may switch
    /// up to this temporal layer here.
    pub layer_sync: bool,
    /// VP8 picture id, TL0PICIDX and KEYIDX when present (a forwarder renumbers them).
    pub picture_id: Option<u16>,
    pub picture_id_15bit: bool,
    pub tl0_pic_idx: Option<u8>,
    pub key_idx: Option<u8>,
}

/// Picture size from the first packet of a keyframe, when the codec carries it there.
pub fn keyframe_dimensions(codec: Codec, payload: &[u8]) -> Option<(u16, u16)> {
    match codec {
        Codec::Vp8 => vp8::keyframe_dimensions(payload),
        Codec::H264 => h264::sps_dimensions(payload),
        _ => None,
    }
}

/// Inspects a payload of `codec`. Malformed payloads yield a default (not a keyframe), never a panic.
pub fn inspect_payload(codec: Codec, payload: &[u8]) -> PayloadInfo {
    match codec {
        Codec::Vp8 => vp8::inspect(payload),
        Codec::H264 => h264::inspect(payload),
        Codec::Opus => PayloadInfo { keyframe_start: true, frame_start: true, ..Default::default() },
        // Not forwarded yet: nothing is ever a decodable start, so a subscriber never gets a
        // corrupt stream from a codec we cannot parse.
        Codec::Vp9 | Codec::Av1 => PayloadInfo::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_types_are_recognised_case_insensitively() {
        for (mime, want) in [
            ("audio/opus", Some(Codec::Opus)),
            ("audio/OPUS", Some(Codec::Opus)),
            ("video/VP8", Some(Codec::Vp8)),
            ("video/h264", Some(Codec::H264)),
            ("video/VP9", Some(Codec::Vp9)),
            ("video/AV1", Some(Codec::Av1)),
            ("video/rtx", None),
            ("", None),
        ] {
            assert_eq!(Codec::from_mime(mime), want, "{mime}");
        }
    }
}
