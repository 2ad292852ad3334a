//! Codec and payload knowledge: which codec a track carries, whether an RTP payload starts a
//! keyframe, and which temporal layer it belongs to. Pure functions over payload bytes; the SFU
//! asks, this crate answers, nothing here does I/O.

pub mod codec;
pub mod h264;
pub mod vp8;

#[cfg(feature = "sources")]
pub mod sources;

pub use codec::{Codec, MediaKind, PayloadInfo, inspect_payload, keyframe_dimensions};
