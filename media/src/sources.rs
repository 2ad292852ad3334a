//! Real encoded media for test publishers and the load tester: a synthetic moving picture
//! encoded with OpenH264, a tone encoded with libopus, and an H.264 decoder so tests can check
//! that what arrived really decodes.

use openh264::OpenH264API;
use openh264::decoder::Decoder;
use openh264::encoder::{BitRate, Encoder, EncoderConfig, FrameRate, IntraFramePeriod, Profile};
use openh264::formats::{YUVBuffer, YUVSource};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("h264: {0}")]
    H264(String),
    #[error("opus: {0}")]
    Opus(#[from] opus::Error),
}

/// A synthetic camera: a gradient with a moving bar and sensor-like noise (so the encoder spends
/// a realistic bitrate, as with a real camera), encoded as constrained-baseline H.264
/// (profile-level-id 42e01f, what browsers accept everywhere).
pub struct H264Source {
    encoder: Encoder,
    yuv: YUVBuffer,
    width: usize,
    height: usize,
    frame: u64,
}

impl H264Source {
    pub fn new(width: usize, height: usize, fps: f32, bitrate_bps: u32) -> Result<Self, SourceError> {
        let config = EncoderConfig::new()
            .bitrate(BitRate::from_bps(bitrate_bps))
            .max_frame_rate(FrameRate::from_hz(fps))
            .profile(Profile::Baseline)
            .intra_frame_period(IntraFramePeriod::from_num_frames((fps * 2.0) as u32));
        let encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
            .map_err(|e| SourceError::H264(e.to_string()))?;
        Ok(Self { encoder, yuv: YUVBuffer::new(width, height), width, height, frame: 0 })
    }

    /// Encodes the next picture; returns one access unit in Annex-B form (start codes).
    pub fn next_frame(&mut self) -> Result<Vec<u8>, SourceError> {
        self.paint();
        self.frame += 1;
        let bitstream = self.encoder.encode(&self.yuv).map_err(|e| SourceError::H264(e.to_string()))?;
        Ok(bitstream.to_vec())
    }

    /// The next frame will be an IDR (answer to a PLI).
    pub fn force_keyframe(&mut self) {
        self.encoder.force_intra_frame();
    }

    pub fn dimensions(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    fn paint(&mut self) {
        let (w, h) = (self.width, self.height);
        let bar = (self.frame as usize * 8) % w.max(1);
        let mut data = vec![0u8; w * h * 3 / 2];
        let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ self.frame.wrapping_mul(0x2545_f491_4f6c_dd1d);
        for y in 0..h {
            for x in 0..w {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let base = if x.abs_diff(bar) < 16 { 200 } else { ((x + y) * 200 / (w + h)) as i32 };
                let noise = (rng & 0x7) as i32 - 4;
                data[y * w + x] = (base + noise).clamp(16, 235) as u8;
            }
        }
        for v in data[w * h..].iter_mut() {
            *v = 128;
        }
        self.yuv = YUVBuffer::from_vec(data, w, h);
    }
}

/// Decodes H.264 access units (Annex-B) and reports decoded picture sizes.
pub struct H264Decoder {
    decoder: Decoder,
}

impl H264Decoder {
    pub fn new() -> Result<Self, SourceError> {
        Ok(Self { decoder: Decoder::new().map_err(|e| SourceError::H264(e.to_string()))? })
    }

    /// Returns the size of the decoded picture, or `None` when the unit produced no picture yet.
    pub fn decode(&mut self, access_unit: &[u8]) -> Result<Option<(usize, usize)>, SourceError> {
        match self.decoder.decode(access_unit) {
            Ok(Some(yuv)) => Ok(Some(yuv.dimensions())),
            Ok(None) => Ok(None),
            Err(e) => Err(SourceError::H264(e.to_string())),
        }
    }
}

/// A 440 Hz tone as 20 ms Opus frames, 48 kHz stereo.
pub struct OpusSource {
    encoder: opus::Encoder,
    sample: u64,
}

pub const OPUS_FRAME_SAMPLES: usize = 960;

impl OpusSource {
    pub fn new() -> Result<Self, SourceError> {
        let encoder = opus::Encoder::new(48_000, opus::Channels::Stereo, opus::Application::Voip)?;
        Ok(Self { encoder, sample: 0 })
    }

    pub fn next_frame(&mut self) -> Result<Vec<u8>, SourceError> {
        let mut pcm = [0i16; OPUS_FRAME_SAMPLES * 2];
        for i in 0..OPUS_FRAME_SAMPLES {
            let t = (self.sample + i as u64) as f64 / 48_000.0;
            let v = ((t * 440.0 * std::f64::consts::TAU).sin() * 8000.0) as i16;
            pcm[2 * i] = v;
            pcm[2 * i + 1] = v;
        }
        self.sample += OPUS_FRAME_SAMPLES as u64;
        let mut out = vec![0u8; 1500];
        let n = self.encoder.encode(&pcm, &mut out)?;
        out.truncate(n);
        Ok(out)
    }
}

/// Decodes Opus packets; returns the number of samples per channel decoded.
pub struct OpusDecoder {
    decoder: opus::Decoder,
}

impl OpusDecoder {
    pub fn new() -> Result<Self, SourceError> {
        Ok(Self { decoder: opus::Decoder::new(48_000, opus::Channels::Stereo)? })
    }

    pub fn decode(&mut self, packet: &[u8]) -> Result<usize, SourceError> {
        let mut pcm = vec![0i16; 5760 * 2];
        Ok(self.decoder.decode(packet, &mut pcm, false)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h264_round_trip_decodes_at_source_size() {
        let mut src = H264Source::new(320, 180, 30.0, 300_000).unwrap();
        let mut dec = H264Decoder::new().unwrap();
        let first = src.next_frame().unwrap();
        // The first access unit carries SPS + IDR.
        let nal_types: Vec<u8> = openh264::nal_units(&first).map(|n| {
            let skip = if n.starts_with(&[0, 0, 0, 1]) { 4 } else { 3 };
            n[skip] & 0x1f
        }).collect();
        assert!(nal_types.contains(&7) && nal_types.contains(&5), "{nal_types:?}");
        let mut decoded = 0;
        if dec.decode(&first).unwrap() == Some((320, 180)) {
            decoded += 1;
        }
        for _ in 0..5 {
            let au = src.next_frame().unwrap();
            if dec.decode(&au).unwrap() == Some((320, 180)) {
                decoded += 1;
            }
        }
        assert!(decoded >= 5, "decoded {decoded}");
    }

    #[test]
    fn sps_of_encoded_streams_gives_their_size() {
        for (w, h) in [(320usize, 180usize), (640, 360), (1280, 720), (176, 144)] {
            let mut src = H264Source::new(w, h, 30.0, 500_000).unwrap();
            let au = src.next_frame().unwrap();
            let sps = openh264::nal_units(&au)
                .map(|n| if n.starts_with(&[0, 0, 0, 1]) { &n[4..] } else { &n[3..] })
                .find(|n| n[0] & 0x1f == 7)
                .expect("first access unit has an SPS");
            assert_eq!(crate::h264::sps_dimensions(sps), Some((w as u16, h as u16)));
        }
    }

    #[test]
    fn opus_round_trip() {
        let mut src = OpusSource::new().unwrap();
        let mut dec = OpusDecoder::new().unwrap();
        let pkt = src.next_frame().unwrap();
        assert!(!pkt.is_empty() && pkt.len() < 400);
        assert_eq!(dec.decode(&pkt).unwrap(), OPUS_FRAME_SAMPLES);
    }
}
