//! The media every simulated publisher sends: each layer encoded once at start (OpenH264 for
//! video, libopus for audio), packetized into RTP payloads, and looped with fresh sequence
//! numbers and timestamps, so that the tester's CPU goes to networking, not encoding.
//!
//! The library also indexes every payload by [`fingerprint`]: a subscriber finds a received
//! packet's place in the loop from its (unchanged) payload, and so the instant its publisher sent
//! it (see `world.rs`).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use rtc::rtp::codec::h264::H264Payloader;
use rtc::rtp::packetizer::Payloader;
use warbler_media::sources::H264Source;

use crate::measure::fingerprint;

/// RTP payload size limit (what browsers use, leaves room for SRTP and extensions).
pub const MTU: usize = 1200;

#[derive(Clone, Debug)]
pub struct LayerSpec {
    pub rid: Option<String>,
    pub width: usize,
    pub height: usize,
    pub fps: u32,
    pub bitrate_bps: u32,
}

/// One encoded picture (or audio frame) of a loop: `packets[first..first + count]`.
#[derive(Clone, Debug)]
pub struct Frame {
    pub first: usize,
    pub count: usize,
    pub keyframe: bool,
}

#[derive(Clone, Debug)]
pub struct Packet {
    pub payload: Bytes,
    pub marker: bool,
}

/// A loop of pre-packetized frames of one track (or one simulcast layer).
#[derive(Debug)]
pub struct TrackLoop {
    pub rid: Option<String>,
    pub clock_rate: u32,
    pub frame_interval: Duration,
    /// RTP timestamp increment per frame.
    pub ts_step: u32,
    pub frames: Vec<Frame>,
    pub packets: Vec<Packet>,
}

impl TrackLoop {
    /// The first keyframe at or after frame `from` (wrapping), for answering a PLI.
    pub fn next_keyframe(&self, from: usize) -> usize {
        let n = self.frames.len();
        (0..n).map(|k| (from + k) % n).find(|&f| self.frames[f].keyframe).unwrap_or(0)
    }

    pub fn bitrate_bps(&self) -> f64 {
        let bytes: usize = self.packets.iter().map(|p| p.payload.len()).sum();
        bytes as f64 * 8.0 / (self.frame_interval.as_secs_f64() * self.frames.len() as f64)
    }
}

/// Where a fingerprint points: which loop (0 = audio, 1.. = video layers) and packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopPos {
    pub track: u8,
    pub packet: u32,
}

#[derive(Debug)]
pub struct Library {
    pub audio: TrackLoop,
    pub video: Vec<TrackLoop>,
    /// fingerprint → position; `None` when two packets share a fingerprint (ambiguous: such
    /// packets count for loss but not for latency).
    index: HashMap<u64, Option<LoopPos>>,
    pub ambiguous: usize,
}

impl Library {
    pub fn build(layers: &[LayerSpec], loop_duration: Duration) -> Result<Self> {
        let audio = encode_audio(loop_duration)?;
        let video = layers.iter().map(|l| encode_video(l, loop_duration)).collect::<Result<Vec<_>>>()?;
        let mut index: HashMap<u64, Option<LoopPos>> = HashMap::new();
        let mut ambiguous = 0;
        for (t, tl) in std::iter::once(&audio).chain(video.iter()).enumerate() {
            for (i, p) in tl.packets.iter().enumerate() {
                let pos = LoopPos { track: t as u8, packet: i as u32 };
                match index.entry(fingerprint(&p.payload)) {
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(Some(pos));
                    }
                    std::collections::hash_map::Entry::Occupied(mut o) => {
                        if o.get().is_some() {
                            ambiguous += 1;
                        }
                        ambiguous += 1;
                        o.insert(None);
                    }
                }
            }
        }
        Ok(Self { audio, video, index, ambiguous })
    }

    pub fn lookup(&self, payload: &[u8]) -> Option<LoopPos> {
        self.index.get(&fingerprint(payload)).copied().flatten()
    }

    pub fn track(&self, t: u8) -> &TrackLoop {
        if t == 0 { &self.audio } else { &self.video[usize::from(t) - 1] }
    }
}

fn encode_video(spec: &LayerSpec, loop_duration: Duration) -> Result<TrackLoop> {
    let mut src = H264Source::new(spec.width, spec.height, spec.fps as f32, spec.bitrate_bps)
        .with_context(|| format!("H.264 encoder for {}x{}", spec.width, spec.height))?;
    let n = ((loop_duration.as_secs_f64() * f64::from(spec.fps)).round() as usize).max(1);
    let mut payloader = H264Payloader::default();
    let mut frames = Vec::with_capacity(n);
    let mut packets = Vec::new();
    for i in 0..n {
        if i == 0 {
            src.force_keyframe();
        }
        let au = src.next_frame().context("encoding a frame")?;
        let keyframe = openh264::nal_units(&au).any(|nal| {
            let skip = if nal.starts_with(&[0, 0, 0, 1]) { 4 } else { 3 };
            nal.get(skip).is_some_and(|b| b & 0x1f == 5)
        });
        let payloads = payloader.payload(MTU, &Bytes::from(au)).context("packetizing H.264")?;
        let first = packets.len();
        let count = payloads.len();
        for (k, p) in payloads.into_iter().enumerate() {
            packets.push(Packet { payload: p, marker: k + 1 == count });
        }
        frames.push(Frame { first, count, keyframe });
    }
    anyhow::ensure!(frames.first().is_some_and(|f| f.keyframe), "the loop must start with a keyframe");
    Ok(TrackLoop {
        rid: spec.rid.clone(),
        clock_rate: 90_000,
        frame_interval: Duration::from_secs_f64(1.0 / f64::from(spec.fps)),
        ts_step: 90_000 / spec.fps,
        frames,
        packets,
    })
}

/// Opus frames of a gliding two-tone signal with a little noise: unlike a steady tone (whose
/// 20 ms frames repeat byte for byte), every frame of the loop differs, so each packet's
/// payload identifies its place in the loop.
fn encode_audio(loop_duration: Duration) -> Result<TrackLoop> {
    const SAMPLES: usize = 960;
    let mut enc = opus::Encoder::new(48_000, opus::Channels::Stereo, opus::Application::Voip).context("Opus encoder")?;
    let n = ((loop_duration.as_secs_f64() / 0.020).round() as usize).max(1);
    let mut frames = Vec::with_capacity(n);
    let mut packets = Vec::with_capacity(n);
    let mut noise: u32 = 0x1234_5678;
    let mut phase = [0f64; 2];
    let mut pcm = vec![0i16; SAMPLES * 2];
    let mut out = vec![0u8; 1500];
    for i in 0..n {
        let f1 = 300.0 + 200.0 * ((i as f64) * 0.05).sin();
        let f2 = 700.0 + 150.0 * ((i as f64) * 0.031).cos();
        for k in 0..SAMPLES {
            phase[0] += f1 * std::f64::consts::TAU / 48_000.0;
            phase[1] += f2 * std::f64::consts::TAU / 48_000.0;
            noise = noise.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let v = phase[0].sin() * 6000.0 + phase[1].sin() * 3000.0 + f64::from((noise >> 20) as i32 - 2048) * 0.5;
            pcm[2 * k] = v as i16;
            pcm[2 * k + 1] = v as i16;
        }
        let len = enc.encode(&pcm, &mut out).context("encoding Opus")?;
        let f = out[..len].to_vec();
        packets.push(Packet { payload: Bytes::from(f), marker: i == 0 });
        frames.push(Frame { first: i, count: 1, keyframe: true });
    }
    Ok(TrackLoop {
        rid: None,
        clock_rate: 48_000,
        frame_interval: Duration::from_millis(20),
        ts_step: 960,
        frames,
        packets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_encodes_indexes_and_finds_keyframes() {
        let layers = [LayerSpec { rid: None, width: 160, height: 96, fps: 15, bitrate_bps: 150_000 }];
        let lib = Library::build(&layers, Duration::from_secs(2)).unwrap();
        let v = &lib.video[0];
        assert_eq!(v.frames.len(), 30);
        assert!(v.frames[0].keyframe);
        assert_eq!(v.next_keyframe(0), 0);
        // Every frame ends with a marker packet, and only there.
        for f in &v.frames {
            for k in 0..f.count {
                assert_eq!(v.packets[f.first + k].marker, k + 1 == f.count);
            }
        }
        assert_eq!(lib.audio.frames.len(), 100);
        // Most packets are identifiable by their payload.
        let total = lib.audio.packets.len() + v.packets.len();
        assert!(lib.ambiguous * 100 < total, "{} of {} ambiguous", lib.ambiguous, total);
        let p = &v.packets[v.frames[5].first];
        if let Some(pos) = lib.lookup(&p.payload) {
            assert_eq!(pos, LoopPos { track: 1, packet: v.frames[5].first as u32 });
        }
    }
}
