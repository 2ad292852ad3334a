//! Writing RTP to subscribers. Each copy is marshalled, with the connection's header extensions,
//! into a datagram buffer from the engine's pool; the WebRTC stack only SRTP-protects it in place
//! and says where it goes (`RTCPeerConnection::protect_rtp_in_place`, a Warbler patch of rtc: see
//! `sfu/vendor/rtc/WARBLER-PATCH.md`), and the buffer goes straight to the engine's output. The
//! shell hands it back after sending, so a forwarded copy allocates nothing. The
//! stack's handler pipeline and interceptor chain are not involved, so the sender reports its
//! interceptor derived from the packets it saw are made here: per down track packet and octet
//! counts and the RTP ↔ wall-clock mapping of the last frame sent.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{BufMut, BytesMut};

use rtc::peer_connection::RTCPeerConnection;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtp;
use rtc::shared::time::SystemInstant;

use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::sansio::Protocol;

use super::congestion::{SENDER_REPORT_INTERVAL, SendKind, SubscriberCc};
use super::{Engine, Output, guarded};
use crate::metrics::Metrics;

/// The RTP header fields of a packet to a subscriber (extensions are added per connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RtpOut {
    pub marker: bool,
    pub payload_type: u8,
    pub sequence_number: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    /// Padding-only or padded (probes): padded to a multiple of 4 bytes, at least 4.
    pub padding: bool,
}

impl RtpOut {
    pub fn of(h: &rtp::header::Header) -> Self {
        Self { marker: h.marker, payload_type: h.payload_type, sequence_number: h.sequence_number, timestamp: h.timestamp, ssrc: h.ssrc, padding: h.padding }
    }
}

/// Header extension values stamped on one packet (one-byte form, RFC 8285).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Stamp {
    /// (id, transport-wide sequence number)
    pub twcc: Option<(u8, u16)>,
    /// (id, 24-bit abs-send-time)
    pub abs_send_time: Option<(u8, u32)>,
}

/// Where datagrams for the shell go, and the pool of buffers packets are written in.
pub(super) struct Tx<'a> {
    pub outputs: &'a mut VecDeque<Output>,
    pub buffers: &'a mut Vec<BytesMut>,
    pub metrics: &'a Metrics,
}

/// Most buffers the pool keeps: a loop turn of a large fan-out (a 5-packet frame to 400
/// subscribers) comes back whole; beyond it they are freed.
pub const BUFFER_POOL_MAX: usize = 2048;
/// A new buffer's capacity: a full-size RTP packet plus header extensions and the SRTP tag.
const BUFFER_CAPACITY: usize = 1536;

pub(super) fn recycle(pool: &mut Vec<BytesMut>, mut data: BytesMut) {
    // Only buffers of about datagram size: a rare large one would pin its memory.
    if pool.len() < BUFFER_POOL_MAX && (BUFFER_CAPACITY..=4 * BUFFER_CAPACITY).contains(&data.capacity()) {
        data.clear();
        pool.push(data);
    }
}

/// Marshals a packet as `rtp::Packet::marshal` would (one-byte extensions; padding as the
/// stack pads) into `buf`, and returns a header describing it for the SRTP context: SSRC,
/// sequence number and header length (the extension block counted as `extensions_padding`, so
/// no extension values need allocating).
pub(super) fn marshal(buf: &mut BytesMut, h: &RtpOut, stamp: &Stamp, payload: &[u8]) -> rtp::header::Header {
    buf.clear();
    let mut ext = [0u8; 8];
    let mut ext_len = 0;
    if let Some((id, seq)) = stamp.twcc.filter(|(id, _)| (1..=14).contains(id)) {
        ext[0] = id << 4 | 1;
        ext[1..3].copy_from_slice(&seq.to_be_bytes());
        ext_len = 3;
    }
    if let Some((id, t)) = stamp.abs_send_time.filter(|(id, _)| (1..=14).contains(id)) {
        ext[ext_len] = id << 4 | 2;
        ext[ext_len + 1..ext_len + 4].copy_from_slice(&t.to_be_bytes()[1..]);
        ext_len += 4;
    }
    let ext_words = ext_len.div_ceil(4);
    let extension = ext_len > 0;
    buf.put_u8(0x80 | u8::from(h.padding) << 5 | u8::from(extension) << 4);
    buf.put_u8(u8::from(h.marker) << 7 | (h.payload_type & 0x7f));
    buf.extend_from_slice(&h.sequence_number.to_be_bytes());
    buf.extend_from_slice(&h.timestamp.to_be_bytes());
    buf.extend_from_slice(&h.ssrc.to_be_bytes());
    if extension {
        buf.extend_from_slice(&[0xBE, 0xDE]);
        buf.extend_from_slice(&(ext_words as u16).to_be_bytes());
        buf.extend_from_slice(&ext[..ext_words * 4]);
    }
    buf.extend_from_slice(payload);
    if h.padding {
        let pad = match payload.len() % 4 {
            0 => 4,
            r => 4 - r,
        };
        buf.extend(std::iter::repeat_n(0, pad - 1));
        buf.put_u8(pad as u8);
    }
    rtp::header::Header {
        sequence_number: h.sequence_number,
        ssrc: h.ssrc,
        extension,
        extensions_padding: ext_words * 4,
        ..Default::default()
    }
}

/// Writes one RTP packet to a subscriber connection: congestion-control stamps, sender report
/// accounting (`sr`, for packets on a down track's media SSRC), marshal, protect, output.
/// Returns whether a datagram was produced.
#[allow(clippy::too_many_arguments)]
pub(super) fn send_rtp(
    pc: &mut RTCPeerConnection,
    cc: Option<&mut SubscriberCc>,
    sr: Option<&mut SenderStats>,
    tx: &mut Tx<'_>,
    now: Instant,
    h: &RtpOut,
    payload: &[u8],
    kind: SendKind,
) -> bool {
    let stamp = match cc {
        Some(cc) => cc.stamp(now, h.ssrc, h.sequence_number, payload.len() + 12, kind),
        None => Stamp::default(),
    };
    let mut buf = tx.buffers.pop().unwrap_or_else(|| BytesMut::with_capacity(BUFFER_CAPACITY));
    let header = marshal(&mut buf, h, &stamp, payload);
    let protected = super::guarded(tx.metrics, "protect rtp", || pc.protect_rtp_in_place(now, &header, &mut buf));
    match protected {
        Some(Ok(transport)) => {
            if let Some(sr) = sr {
                sr.on_sent(now, h.sequence_number, h.timestamp, payload.len());
            }
            tx.metrics.udp_datagrams_out.inc();
            tx.metrics.udp_bytes_out.inc_by(buf.len() as u64);
            tx.outputs.push_back(Output::Transmit { local: transport.local_addr, remote: transport.peer_addr, data: buf });
            true
        }
        Some(Err(e)) => {
            tracing::trace!(error = %e, "RTP not written");
            recycle(tx.buffers, buf);
            false
        }
        None => false,
    }
}

/// What a sender report for one outgoing stream needs, kept as the stack's sender-report
/// interceptor kept it: every packet counts; the RTP ↔ time mapping moves with in-order packets
/// that start a new timestamp (so a frame's later packets, sent after processing delay, do not
/// skew it).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct SenderStats {
    packets: u32,
    octets: u32,
    last_seq: u16,
    /// RTP timestamp of the last frame started, and when its first packet was sent.
    last_frame: Option<(u32, Instant)>,
}

impl SenderStats {
    pub fn on_sent(&mut self, now: Instant, seq: u16, ts: u32, payload_len: usize) {
        let in_order = match self.last_frame {
            None => true,
            Some(_) => {
                let diff = seq.wrapping_sub(self.last_seq);
                diff > 0 && diff < 1 << 15
            }
        };
        if in_order {
            self.last_seq = seq;
            if self.last_frame.is_none_or(|(t, _)| t != ts) {
                self.last_frame = Some((ts, now));
            }
        }
        self.packets = self.packets.wrapping_add(1);
        self.octets = self.octets.wrapping_add(payload_len as u32);
    }

    /// The report for `ssrc` at `now`; `None` before anything was sent.
    pub fn report(&self, ssrc: u32, clock_rate: u32, now: Instant, wall: &SystemInstant) -> Option<SenderReport> {
        let (ts, at) = self.last_frame?;
        let elapsed = now.saturating_duration_since(at).as_secs_f64();
        Some(SenderReport {
            ssrc,
            ntp_time: wall.ntp(now),
            rtp_time: ts.wrapping_add((elapsed * f64::from(clock_rate)) as u32),
            packet_count: self.packets,
            octet_count: self.octets,
            ..Default::default()
        })
    }
}

impl Engine {
    /// Sender reports for the streams of every subscriber connection whose reports are due,
    /// one RTCP packet per stream as the stack's interceptor sent them (they are rare: the
    /// stack's ordinary write path carries them).
    pub(super) fn send_sender_reports(&mut self, now: Instant) {
        let (mut written, mut failed) = (Vec::new(), Vec::new());
        for peer in self.peers.values_mut() {
            let Some(cc) = peer.cc.as_mut() else { continue };
            if cc.next_sender_report.is_none_or(|due| now < due) {
                continue;
            }
            cc.next_sender_report = Some(now + SENDER_REPORT_INTERVAL);
            for d in peer.down.values() {
                let Some(sr) = d.sender_stats.report(d.out_ssrc, d.codec.clock_rate(), now, &self.wall) else { continue };
                let pc = &mut peer.pc;
                let message = TaggedRTCMessage { now, message: RTCMessage::RtcpPacket(String::new(), vec![Box::new(sr)]) };
                match guarded(&self.metrics, "write sender report", || pc.handle_write(message)) {
                    Some(Ok(())) => self.metrics.sender_reports.inc(),
                    Some(Err(e)) => tracing::debug!(error = %e, "sender report not written"),
                    None => {
                        failed.push(peer.id);
                        break;
                    }
                }
            }
            written.push(peer.id);
        }
        for id in written {
            self.mark_dirty(id);
        }
        for id in failed {
            self.fail_peer(now, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rtc::shared::marshal::{Marshal, MarshalSize};
    use std::time::Duration;

    /// The same bytes as the stack's own marshalling of an equivalent `rtp::Packet`.
    #[test]
    fn marshal_matches_the_stack() {
        let payloads: [&[u8]; 4] = [b"", b"a", b"abcd", &[7u8; 1187]];
        let stamps = [
            Stamp::default(),
            Stamp { twcc: Some((3, 0xfffe)), abs_send_time: None },
            Stamp { twcc: None, abs_send_time: Some((5, 0x12_3456)) },
            Stamp { twcc: Some((14, 7)), abs_send_time: Some((1, 0xab_cdef)) },
        ];
        let mut buf = BytesMut::new();
        for payload in payloads {
            for stamp in stamps {
                for (marker, padding) in [(false, false), (true, false), (false, true), (true, true)] {
                    let h = RtpOut { marker, payload_type: 102, sequence_number: 65_535, timestamp: 0xdead_beef, ssrc: 0x0102_0304, padding };
                    let shape = marshal(&mut buf, &h, &stamp, payload);
                    let mut extensions = Vec::new();
                    if let Some((id, seq)) = stamp.twcc {
                        extensions.push(rtp::header::Extension { id, payload: Bytes::copy_from_slice(&seq.to_be_bytes()) });
                    }
                    if let Some((id, t)) = stamp.abs_send_time {
                        extensions.push(rtp::header::Extension { id, payload: Bytes::copy_from_slice(&t.to_be_bytes()[1..]) });
                    }
                    let packet = rtp::Packet {
                        header: rtp::header::Header {
                            version: 2,
                            padding,
                            marker,
                            payload_type: 102,
                            sequence_number: 65_535,
                            timestamp: 0xdead_beef,
                            ssrc: 0x0102_0304,
                            extension: !extensions.is_empty(),
                            extension_profile: if extensions.is_empty() { 0 } else { 0xBEDE },
                            extensions,
                            ..Default::default()
                        },
                        payload: Bytes::copy_from_slice(payload),
                    };
                    let want = packet.marshal().expect("marshal");
                    assert_eq!(&buf[..], &want[..], "{h:?} {stamp:?} payload {}", payload.len());
                    assert_eq!(shape.marshal_size(), packet.header.marshal_size(), "header length for SRTP");
                    assert_eq!((shape.ssrc, shape.sequence_number), (h.ssrc, h.sequence_number));
                }
            }
        }
    }

    /// The in-place write path (rtc-srtp patch) must give the exact datagrams the stack's own
    /// `encrypt_rtp_with_header` gives, for both SRTP profiles and across the sequence number
    /// wrap (rollover counter), and a receiver must decrypt them.
    #[test]
    fn in_place_protection_matches_the_stack_and_decrypts() {
        use rtc::srtp::context::Context;
        use rtc::srtp::protection_profile::ProtectionProfile;
        let provider = rtc::crypto::default_provider().expect("crypto provider");
        for profile in [ProtectionProfile::AeadAes128Gcm, ProtectionProfile::Aes128CmHmacSha1_80] {
            let key = vec![7u8; profile.key_len()];
            let salt = vec![9u8; profile.salt_len()];
            let ctx = || Context::new(&key, &salt, profile, None, None, provider.crypto()).expect("context");
            let (mut stack, mut ours, mut receiver) = (ctx(), ctx(), ctx());
            let mut buf = BytesMut::new();
            for (i, seq) in [65_533u16, 65_534, 65_535, 0, 1, 2].into_iter().enumerate() {
                let h = RtpOut { marker: i % 2 == 0, payload_type: 96, sequence_number: seq, timestamp: 1000 * i as u32, ssrc: 0xabcd, padding: false };
                let payload = vec![i as u8; 100 + 300 * i];
                let stamp = Stamp { twcc: Some((3, seq)), abs_send_time: None };
                let header = marshal(&mut buf, &h, &stamp, &payload);
                let want = stack.encrypt_rtp_with_header(&buf, &header).expect("stack encrypts");
                ours.encrypt_rtp_in_place(&mut buf, &header).expect("in place");
                assert_eq!(&buf[..], &want[..], "{profile:?} seq {seq}");
                let plain = receiver.decrypt_rtp(&buf).expect("receiver decrypts");
                assert_eq!(&plain[plain.len() - payload.len()..], &payload[..], "{profile:?} seq {seq}");
            }
        }
    }

    #[test]
    fn the_buffer_pool_keeps_datagram_sized_buffers_up_to_its_bound() {
        let mut pool = Vec::new();
        let mut used = BytesMut::with_capacity(BUFFER_CAPACITY);
        used.extend_from_slice(&[1; 1200]);
        recycle(&mut pool, used);
        assert_eq!(pool.len(), 1);
        assert!(pool[0].is_empty() && pool[0].capacity() >= BUFFER_CAPACITY, "cleared, capacity kept");
        recycle(&mut pool, BytesMut::with_capacity(64));
        recycle(&mut pool, BytesMut::with_capacity(64 * 1024));
        assert_eq!(pool.len(), 1, "a tiny or a huge buffer is not kept");
        for _ in 0..BUFFER_POOL_MAX + 10 {
            recycle(&mut pool, BytesMut::with_capacity(BUFFER_CAPACITY));
        }
        assert_eq!(pool.len(), BUFFER_POOL_MAX);
    }

    #[test]
    fn out_of_range_extension_ids_are_left_out() {
        let mut buf = BytesMut::new();
        let h = RtpOut { marker: false, payload_type: 96, sequence_number: 1, timestamp: 2, ssrc: 3, padding: false };
        let shape = marshal(&mut buf, &h, &Stamp { twcc: Some((15, 1)), abs_send_time: Some((0, 1)) }, b"xy");
        assert_eq!(buf.len(), 14);
        assert!(!shape.extension);
    }

    #[test]
    fn sender_stats_count_everything_and_map_time_by_frame_start() {
        let t0 = Instant::now();
        let wall = SystemInstant::now(t0);
        let mut s = SenderStats::default();
        assert!(s.report(9, 90_000, t0, &wall).is_none(), "nothing sent yet");
        // A frame of three packets sent over 10 ms: the mapping is its first packet's.
        s.on_sent(t0, 100, 9000, 1000);
        s.on_sent(t0 + Duration::from_millis(5), 101, 9000, 1000);
        s.on_sent(t0 + Duration::from_millis(10), 102, 9000, 500);
        // A late retransmission of an older packet counts, but does not move the mapping.
        s.on_sent(t0 + Duration::from_millis(20), 99, 6000, 800);
        let r = s.report(9, 90_000, t0 + Duration::from_secs(1), &wall).expect("report");
        assert_eq!((r.ssrc, r.packet_count, r.octet_count), (9, 4, 3300));
        assert_eq!(r.rtp_time, 9000 + 90_000);
        assert_eq!(r.ntp_time, wall.ntp(t0 + Duration::from_secs(1)));
        // The next frame moves it, across the sequence number wrap too.
        let mut s = SenderStats::default();
        s.on_sent(t0, 65_535, u32::MAX - 10, 10);
        s.on_sent(t0 + Duration::from_millis(33), 0, 2990, 10);
        let r = s.report(1, 90_000, t0 + Duration::from_millis(33), &wall).expect("report");
        assert_eq!(r.rtp_time, 2990);
    }
}
