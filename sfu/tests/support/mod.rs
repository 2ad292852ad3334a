//! A native WebRTC client for tests (webrtc-rs `webrtc` 0.21, an independent async stack from the
//! server's point of view): publishes real H.264 + Opus, receives tracks and decodes them, and
//! records what a user would observe (decoded frames, sequence continuity, SSRCs).

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::rtp::codec::h264::H264Packet;
use rtc::rtp::packetizer::Depacketizer;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind};
use tokio::sync::watch;
use warbler_media::sources::{H264Decoder, H264Source, OpusDecoder, OpusSource};
use webrtc::media_stream::{MediaStreamTrack, Track};
use rtc::interceptor::{Attribute, Interceptor, Packet, Slot, StreamInfo, TaggedPacket};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::sender_report::SenderReport;
use rtc::sansio::Protocol;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription, Registry, register_default_interceptors,
};

pub const URI_MID: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
pub const URI_RID: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";
pub const URI_AUDIO_LEVEL: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";

/// A string-valued header extension (mid, rid) for `SampleWriter::with_extension`.
struct TextExtension(String);

impl rtc::shared::marshal::MarshalSize for TextExtension {
    fn marshal_size(&self) -> usize {
        self.0.len()
    }
}

impl rtc::shared::marshal::Marshal for TextExtension {
    fn marshal_to(&self, buf: &mut [u8]) -> rtc::shared::error::Result<usize> {
        buf[..self.0.len()].copy_from_slice(self.0.as_bytes());
        Ok(self.0.len())
    }
}

fn text_ext(uri: &'static str, value: &str) -> rtc::rtp::extension::HeaderExtension {
    rtc::rtp::extension::HeaderExtension::Custom { uri: uri.into(), extension: Box::new(TextExtension(value.to_owned())) }
}

/// One simulcast layer a native publisher sends.
#[derive(Clone, Copy, Debug)]
pub struct SimulcastLayer {
    pub rid: &'static str,
    pub width: usize,
    pub height: usize,
    pub bps: u32,
}

pub const H264_FMTP: &str = "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f";

pub fn h264_codec() -> RTCRtpCodec {
    RTCRtpCodec { mime_type: "video/H264".into(), clock_rate: 90_000, channels: 0, sdp_fmtp_line: H264_FMTP.into(), rtcp_feedback: vec![] }
}

pub fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec { mime_type: "audio/opus".into(), clock_rate: 48_000, channels: 2, sdp_fmtp_line: "minptime=10;useinbandfec=1".into(), rtcp_feedback: vec![] }
}

/// What one received track delivered.
#[derive(Debug, Default, Clone)]
pub struct TrackStats {
    pub kind: Option<RtpCodecKind>,
    pub stream_id: String,
    pub packets: u64,
    pub ssrcs: Vec<u32>,
    /// Packets whose sequence number was not previous + 1.
    pub seq_discontinuities: u64,
    /// Packets whose timestamp went backwards relative to the previous packet.
    pub ts_backwards: u64,
    pub frames_decoded: u64,
    pub decode_errors: u64,
    pub last_frame_size: Option<(usize, usize)>,
    pub audio_frames_decoded: u64,
    pub ended: bool,
    /// Every distinct (extended) sequence number received, to measure what stayed lost.
    pub seqs: std::collections::BTreeSet<u64>,
    ext: Option<u64>,
    last_seq: Option<u16>,
    last_ts: Option<u32>,
}

impl TrackStats {
    /// Sequence numbers never received between the first and the last `settle` packets.
    pub fn missing(&self, settle: u64) -> u64 {
        let (Some(&lo), Some(&hi)) = (self.seqs.first(), self.seqs.last()) else { return 0 };
        let hi = hi.saturating_sub(settle);
        if hi <= lo {
            return 0;
        }
        let have = self.seqs.range(lo..=hi).count() as u64;
        (hi - lo + 1) - have
    }
}

#[derive(Default)]
struct Shared {
    tracks: Mutex<HashMap<String, TrackStats>>,
    /// RFC 6464 level (−dBov) + 1 put on the microphone's packets; 0: no level extension.
    audio_level_plus_one: std::sync::atomic::AtomicU8,
    keyframe_requests: AtomicU64,
    sender_reports: Arc<Mutex<HashMap<u32, Vec<ReceivedSr>>>>,
}

/// A sender report as received: (when, packet count, octet count, NTP time, RTP time).
pub type ReceivedSr = (Instant, u32, u32, u64, u32);

/// Delivers keyframe requests (PLI/FIR) to the application, which a publisher must act on, and
/// records the sender reports received (per SSRC).
#[derive(Default)]
struct KeyframeRequests {
    reads: VecDeque<TaggedPacket>,
    writes: VecDeque<TaggedPacket>,
    sender_reports: Arc<Mutex<HashMap<u32, Vec<ReceivedSr>>>>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequests {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &mut msg.message.packet {
            for sr in packets.iter().filter_map(|p| p.as_any().downcast_ref::<SenderReport>()) {
                self.sender_reports.lock().unwrap().entry(sr.ssrc).or_default().push((msg.now, sr.packet_count, sr.octet_count, sr.ntp_time, sr.rtp_time));
            }
            let wanted = |p: &Box<dyn rtc::rtcp::Packet>| p.as_any().is::<PictureLossIndication>() || p.as_any().is::<FullIntraRequest>();
            if packets.iter().any(wanted) {
                packets.retain(wanted);
                msg.message.add(Attribute::DeliverToApplication);
            }
        }
        self.reads.push_back(msg);
        Ok(())
    }
    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.reads.pop_front()
    }
    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.writes.push_back(msg);
        Ok(())
    }
    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.writes.pop_front()
    }
}

impl Interceptor for KeyframeRequests {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

struct Handler {
    gathered: watch::Sender<bool>,
    state: watch::Sender<RTCPeerConnectionState>,
    shared: Arc<Shared>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.state.send(state);
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let id = track.track_id().await;
            let kind = track.kind().await;
            let stream_id = track.stream_id().await;
            {
                let mut t = shared.tracks.lock().unwrap();
                let e = t.entry(id.clone()).or_default();
                e.kind = Some(kind);
                e.stream_id = stream_id;
                e.ended = false;
            }
            let mut frames = FrameAssembler::default();
            let mut decoder = H264Decoder::new().ok();
            let mut opus = OpusDecoder::new().ok();
            while let Some(ev) = track.poll().await {
                let TrackRemoteEvent::OnRtpPacket(p) = ev else { continue };
                let mut t = shared.tracks.lock().unwrap();
                let e = t.entry(id.clone()).or_default();
                e.packets += 1;
                if !e.ssrcs.contains(&p.header.ssrc) {
                    e.ssrcs.push(p.header.ssrc);
                }
                if let Some(prev) = e.last_seq
                    && p.header.sequence_number != prev.wrapping_add(1)
                {
                    e.seq_discontinuities += 1;
                }
                if let Some(prev) = e.last_ts
                    && (p.header.timestamp.wrapping_sub(prev) as i32) < 0
                {
                    e.ts_backwards += 1;
                }
                let ext = match e.ext {
                    None => (1u64 << 16) + u64::from(p.header.sequence_number),
                    Some(h) => {
                        let base = h & !0xffff;
                        let c = base | u64::from(p.header.sequence_number);
                        if c > h && c - h > 0x8000 { c - 0x10000 } else if c < h && h - c > 0x8000 { c + 0x10000 } else { c }
                    }
                };
                e.ext = Some(e.ext.map_or(ext, |h| h.max(ext)));
                e.seqs.insert(ext);
                e.last_seq = Some(p.header.sequence_number);
                e.last_ts = Some(p.header.timestamp);
                let mut decoded = None;
                let mut audio_ok = false;
                let mut failed = 0;
                if kind == RtpCodecKind::Video {
                    for au in frames.push(ext, p.header.marker, p.payload.clone(), Instant::now()) {
                        match decoder.as_mut().map(|d| d.decode(&au)) {
                            Some(Ok(Some(size))) => {
                                e.frames_decoded += 1;
                                decoded = Some(size);
                            }
                            Some(Err(_)) => failed += 1,
                            _ => {}
                        }
                    }
                } else if let Some(o) = opus.as_mut() {
                    audio_ok = o.decode(&p.payload).is_ok();
                }
                if let Some(size) = decoded {
                    e.last_frame_size = Some(size);
                }
                e.decode_errors += failed;
                if audio_ok {
                    e.audio_frames_decoded += 1;
                }
            }
            if let Some(e) = shared.tracks.lock().unwrap().get_mut(&id) {
                e.ended = true;
            }
        });
    }
}

/// A data channel of a native peer.
pub struct DataChannelHandle {
    pub dc: Arc<dyn webrtc::data_channel::DataChannel>,
    pub incoming: tokio::sync::mpsc::UnboundedReceiver<String>,
    open: watch::Receiver<bool>,
}

impl DataChannelHandle {
    pub async fn wait_open(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, self.open.wait_for(|o| *o)).await.is_ok()
    }

    pub async fn send(&self, text: &str) {
        self.dc.send_text(text).await.expect("send on data channel");
    }

    pub async fn recv(&mut self, within: Duration) -> Option<String> {
        tokio::time::timeout(within, self.incoming.recv()).await.ok().flatten()
    }
}

/// A minimal jitter buffer: puts video packets back in sequence order (retransmissions arrive
/// late) and hands out complete access units; a hole not filled within 500 ms is skipped.
#[derive(Default)]
struct FrameAssembler {
    buf: std::collections::BTreeMap<u64, (bool, Bytes)>,
    next: Option<u64>,
    gap_since: Option<Instant>,
}

impl FrameAssembler {
    fn push(&mut self, ext: u64, marker: bool, payload: Bytes, now: Instant) -> Vec<Vec<u8>> {
        let next = *self.next.get_or_insert(ext);
        if ext < next {
            return vec![];
        }
        self.buf.insert(ext, (marker, payload));
        let mut out = Vec::new();
        loop {
            let next = self.next.unwrap_or(ext);
            // A complete frame: next, next+1, ... up to a marker, all present.
            let mut end = None;
            let mut s = next;
            while let Some((m, _)) = self.buf.get(&s) {
                if *m {
                    end = Some(s);
                    break;
                }
                s += 1;
            }
            if let Some(end) = end {
                let mut h264 = H264Packet::default();
                let mut au = Vec::new();
                for k in next..=end {
                    if let Some((_, payload)) = self.buf.remove(&k)
                        && let Ok(nal) = h264.depacketize(&payload)
                    {
                        au.extend_from_slice(&nal);
                    }
                }
                self.next = Some(end + 1);
                self.gap_since = None;
                if !au.is_empty() {
                    out.push(au);
                }
                continue;
            }
            if self.buf.contains_key(&next) || self.buf.is_empty() {
                break;
            }
            // The head is missing: wait for a retransmission, give up after 500 ms.
            let since = *self.gap_since.get_or_insert(now);
            if now.duration_since(since) < Duration::from_millis(500) {
                break;
            }
            // Skip to the first packet after a frame boundary.
            let first = *self.buf.keys().next().unwrap_or(&next);
            let boundary = self.buf.range(first..).find(|(_, (m, _))| *m).map(|(k, _)| *k + 1);
            let resume = boundary.unwrap_or(first);
            self.buf = self.buf.split_off(&resume);
            self.next = Some(resume);
            self.gap_since = None;
        }
        out
    }
}

/// One native peer connection (publisher or subscriber).
pub struct NativePeer {
    pub pc: Arc<dyn PeerConnection>,
    gathered: watch::Receiver<bool>,
    state: watch::Receiver<RTCPeerConnectionState>,
    shared: Arc<Shared>,
    streaming: Vec<tokio::task::JoinHandle<()>>,
}

impl NativePeer {
    pub async fn new() -> Self {
        let mut me = MediaEngine::default();
        let mut h264 = rtc::rtp_transceiver::rtp_sender::RTCRtpCodecParameters { rtp_codec: h264_codec(), payload_type: 102 };
        h264.rtp_codec.rtcp_feedback = vec![
            rtc::rtp_transceiver::rtp_sender::RTCPFeedback { typ: "nack".into(), parameter: "".into() },
            rtc::rtp_transceiver::rtp_sender::RTCPFeedback { typ: "nack".into(), parameter: "pli".into() },
        ];
        me.register_codec(h264, RtpCodecKind::Video).unwrap();
        me.register_codec(
            rtc::rtp_transceiver::rtp_sender::RTCRtpCodecParameters {
                rtp_codec: RTCRtpCodec { mime_type: "video/rtx".into(), clock_rate: 90_000, channels: 0, sdp_fmtp_line: "apt=102".into(), rtcp_feedback: vec![] },
                payload_type: 103,
            },
            RtpCodecKind::Video,
        )
        .unwrap();
        for uri in [URI_MID, URI_RID] {
            me.register_header_extension(rtc::rtp_transceiver::rtp_sender::RTCRtpHeaderExtensionCapability { uri: uri.into() }, RtpCodecKind::Video, None).unwrap();
        }
        me.register_codec(rtc::rtp_transceiver::rtp_sender::RTCRtpCodecParameters { rtp_codec: opus_codec(), payload_type: 111 }, RtpCodecKind::Audio).unwrap();
        me.register_header_extension(rtc::rtp_transceiver::rtp_sender::RTCRtpHeaderExtensionCapability { uri: URI_AUDIO_LEVEL.into() }, RtpCodecKind::Audio, None).unwrap();
        let shared = Arc::new(Shared::default());
        let keyframe_requests = KeyframeRequests { sender_reports: shared.sender_reports.clone(), ..Default::default() };
        let registry = register_default_interceptors(Registry::new(), &mut me).unwrap().with(Slot::from(20_000), keyframe_requests);
        let (gtx, grx) = watch::channel(false);
        let (stx, srx) = watch::channel(RTCPeerConnectionState::New);
        let handler = Arc::new(Handler { gathered: gtx, state: stx, shared: shared.clone() });
        let pc = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(me)
            .with_interceptor_registry(registry)
            .with_handler(handler)
            .with_udp_addrs(vec!["127.0.0.1:0"])
            .build()
            .await
            .expect("native peer connection");
        Self { pc: Arc::new(pc), gathered: grx, state: srx, shared, streaming: Vec::new() }
    }

    /// The audio level (−dBov, 0 loudest, 127 silence; RFC 6464) the microphone's packets carry
    /// from now on; `None`: no level extension (the default).
    pub fn set_audio_level(&self, level: Option<u8>) {
        self.shared.audio_level_plus_one.store(level.map_or(0, |l| l.min(127) + 1), Ordering::Relaxed);
    }

    async fn wait_gathered(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.gathered.wait_for(|g| *g)).await;
    }

    /// Adds an H.264 camera and an Opus microphone and starts streaming once connected.
    pub async fn add_camera_and_mic(&mut self) -> (String, String) {
        let video = Arc::new(
            TrackLocalStaticSample::new(Instant::now(), sample_track("cam-stream", "cam-video", RtpCodecKind::Video, h264_codec())).unwrap(),
        );
        let audio = Arc::new(
            TrackLocalStaticSample::new(Instant::now(), sample_track("cam-stream", "cam-audio", RtpCodecKind::Audio, opus_codec())).unwrap(),
        );
        self.pc.add_track(video.clone() as Arc<dyn TrackLocal>).await.unwrap();
        self.pc.add_track(audio.clone() as Arc<dyn TrackLocal>).await.unwrap();
        let state = self.state.clone();
        self.streaming.push(tokio::spawn(stream_video(video, state.clone(), self.shared.clone())));
        self.streaming.push(tokio::spawn(stream_audio(audio, state, self.shared.clone())));
        ("cam-video".into(), "cam-audio".into())
    }

    /// Adds an H.264 camera sent as simulcast (one encoding per layer, identified by rid) and
    /// starts streaming every layer once connected, at 15 fps.
    pub async fn add_simulcast_camera(&mut self, layers: &[SimulcastLayer]) -> String {
        let encodings = layers
            .iter()
            .map(|l| RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters { rid: l.rid.into(), ssrc: Some(rand::random::<u32>()), ..Default::default() },
                codec: h264_codec(),
                ..Default::default()
            })
            .collect();
        let track = Arc::new(
            TrackLocalStaticSample::new(Instant::now(), MediaStreamTrack::new("sim-stream".into(), "sim-video".into(), "sim-video".into(), RtpCodecKind::Video, encodings)).unwrap(),
        );
        self.pc.add_track(track.clone() as Arc<dyn TrackLocal>).await.unwrap();
        let state = self.state.clone();
        let layers = layers.to_vec();
        let shared = self.shared.clone();
        self.streaming.push(tokio::spawn(async move {
            if !wait_for_connected(state).await {
                return;
            }
            let ssrcs = track.ssrcs().await;
            let mut sources: Vec<(H264Source, u32, &'static str)> = Vec::new();
            for (l, ssrc) in layers.iter().zip(ssrcs) {
                sources.push((H264Source::new(l.width, l.height, 15.0, l.bps).unwrap(), ssrc, l.rid));
            }
            let mut tick = tokio::time::interval(Duration::from_millis(66));
            let mut feedback_open = true;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    ev = track.poll(), if feedback_open => {
                        match ev {
                            Some(TrackLocalEvent::OnRtcpPacket(_)) => {
                                shared.keyframe_requests.fetch_add(1, Ordering::Relaxed);
                                // Which layer was asked is in the PLI; a keyframe on all is simplest.
                                for (src, _, _) in sources.iter_mut() {
                                    src.force_keyframe();
                                }
                            }
                            Some(_) => {}
                            None => feedback_open = false,
                        }
                        continue;
                    }
                }
                for (src, ssrc, rid) in sources.iter_mut() {
                    let frame = src.next_frame().unwrap();
                    let sample = rtc::media::Sample { data: Bytes::from(frame), duration: Duration::from_millis(66), ..rtc::media::Sample::new(Instant::now()) };
                    let writer = track.sample_writer(*ssrc, H264_PT).with_extension(text_ext(URI_MID, "0")).with_extension(text_ext(URI_RID, rid));
                    if writer.write_sample(&sample).await.is_err() {
                        return;
                    }
                }
            }
        }));
        "sim-video".into()
    }

    /// Opens a reliable, ordered data channel; messages received on it arrive on the returned
    /// receiver, and `send` on the handle writes text.
    pub async fn open_data_channel(&self, label: &str) -> DataChannelHandle {
        let dc = self.pc.create_data_channel(label, None).await.expect("data channel");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (open_tx, open_rx) = watch::channel(false);
        let reader = dc.clone();
        tokio::spawn(async move {
            while let Some(ev) = reader.poll().await {
                match ev {
                    webrtc::data_channel::DataChannelEvent::OnOpen => {
                        let _ = open_tx.send(true);
                    }
                    webrtc::data_channel::DataChannelEvent::OnMessage(m) => {
                        let _ = tx.send(String::from_utf8_lossy(&m.data).into_owned());
                    }
                    webrtc::data_channel::DataChannelEvent::OnClose => break,
                    _ => {}
                }
            }
        });
        DataChannelHandle { dc, incoming: rx, open: open_rx }
    }

    /// A receive-only audio and video transceiver (a WHEP player).
    pub async fn add_receive_only(&self) {
        for kind in [RtpCodecKind::Audio, RtpCodecKind::Video] {
            let init = rtc::rtp_transceiver::RTCRtpTransceiverInit {
                direction: rtc::rtp_transceiver::RTCRtpTransceiverDirection::Recvonly,
                streams: vec![],
                send_encodings: vec![],
            };
            self.pc.add_transceiver_from_kind(kind, Some(init)).await.unwrap();
        }
    }

    /// Creates an offer with all candidates in it.
    pub async fn offer(&mut self) -> String {
        let offer = self.pc.create_offer(None).await.unwrap();
        self.pc.set_local_description(offer).await.unwrap();
        self.wait_gathered().await;
        self.pc.local_description().await.unwrap().sdp
    }

    pub async fn accept_answer(&self, sdp: String) {
        self.pc.set_remote_description(RTCSessionDescription::answer(sdp).unwrap()).await.unwrap();
    }

    /// Answers a (re)offer.
    pub async fn answer(&mut self, offer: String) -> String {
        self.pc.set_remote_description(RTCSessionDescription::offer(offer).unwrap()).await.unwrap();
        let answer = self.pc.create_answer(None).await.unwrap();
        self.pc.set_local_description(answer).await.unwrap();
        self.wait_gathered().await;
        self.pc.local_description().await.unwrap().sdp
    }

    pub fn state(&self) -> RTCPeerConnectionState {
        *self.state.borrow()
    }

    pub async fn wait_connected(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, self.state.wait_for(|s| *s == RTCPeerConnectionState::Connected)).await.is_ok()
    }

    /// PLI/FIR the publisher received (it answers each with a keyframe).
    pub fn keyframe_requests(&self) -> u64 {
        self.shared.keyframe_requests.load(Ordering::Relaxed)
    }

    /// Sender reports received, per SSRC, in arrival order.
    pub fn sender_reports(&self) -> HashMap<u32, Vec<ReceivedSr>> {
        self.shared.sender_reports.lock().unwrap().clone()
    }

    pub fn tracks(&self) -> HashMap<String, TrackStats> {
        self.shared.tracks.lock().unwrap().clone()
    }

    /// Stops streaming and closes the connection (a goodbye).
    pub async fn close(&mut self) {
        for t in self.streaming.drain(..) {
            t.abort();
        }
        let _ = self.pc.close().await;
    }

    /// Stops everything without telling anyone (a vanished client). The connection object stays
    /// alive but silent: no more datagrams go out.
    pub fn vanish(&mut self) {
        for t in self.streaming.drain(..) {
            t.abort();
        }
    }
}

fn sample_track(stream: &str, id: &str, kind: RtpCodecKind, codec: RTCRtpCodec) -> MediaStreamTrack {
    MediaStreamTrack::new(
        stream.into(),
        id.into(),
        id.into(),
        kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(rand::random::<u32>()), ..Default::default() },
            codec,
            ..Default::default()
        }],
    )
}

/// The server answers with the offerer's payload types, which are these (registered above).
const H264_PT: u8 = 102;
const OPUS_PT: u8 = 111;

async fn wait_for_connected(mut state: watch::Receiver<RTCPeerConnectionState>) -> bool {
    state.wait_for(|s| *s == RTCPeerConnectionState::Connected).await.is_ok()
}

async fn stream_video(track: Arc<TrackLocalStaticSample>, state: watch::Receiver<RTCPeerConnectionState>, shared: Arc<Shared>) {
    if !wait_for_connected(state).await {
        return;
    }
    let ssrc = track.ssrcs().await[0];
    let pt = H264_PT;
    let mut src = H264Source::new(320, 180, 30.0, 400_000).unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(33));
    let mut feedback_open = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            ev = track.poll(), if feedback_open => {
                match ev {
                    Some(TrackLocalEvent::OnRtcpPacket(_)) => {
                        shared.keyframe_requests.fetch_add(1, Ordering::Relaxed);
                        src.force_keyframe();
                    }
                    Some(_) => {}
                    None => feedback_open = false,
                }
                continue;
            }
        }
        let frame = src.next_frame().unwrap();
        let sample = rtc::media::Sample { data: Bytes::from(frame), duration: Duration::from_millis(33), ..rtc::media::Sample::new(Instant::now()) };
        if track.sample_writer(ssrc, pt).write_sample(&sample).await.is_err() {
            return;
        }
    }
}

async fn stream_audio(track: Arc<TrackLocalStaticSample>, state: watch::Receiver<RTCPeerConnectionState>, shared: Arc<Shared>) {
    if !wait_for_connected(state).await {
        return;
    }
    let ssrc = track.ssrcs().await[0];
    let pt = OPUS_PT;
    let mut src = OpusSource::new().unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        let frame = src.next_frame().unwrap();
        let sample = rtc::media::Sample { data: Bytes::from(frame), duration: Duration::from_millis(20), ..rtc::media::Sample::new(Instant::now()) };
        let mut writer = track.sample_writer(ssrc, pt);
        if let Some(level) = shared.audio_level_plus_one.load(Ordering::Relaxed).checked_sub(1) {
            writer = writer.with_audio_level(rtc::rtp::extension::audio_level_extension::AudioLevelExtension { level, voice: level < 127 });
        }
        if writer.write_sample(&sample).await.is_err() {
            return;
        }
    }
}

/// Polls `f` until it returns true or `within` passes (no fixed sleeps in tests).
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
