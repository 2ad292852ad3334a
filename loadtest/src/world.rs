//! The media thread: every simulated peer connection (a sans-IO `rtc` connection and its own
//! UDP socket, since an SFU on one port routes by the client's address), driven by one `mio`
//! loop. Publishers send looped pre-encoded packets on a frame clock; subscribers decrypt and
//! measure (no decoding). Signaling tasks reach the thread with closures ([`Cmd`]) and a waker.
//!
//! Latency: the publisher records the instant it hands each loop packet to its connection,
//! indexed by the packet's place in the loop; the subscriber finds that place from the received
//! payload's fingerprint (SFUs forward payloads byte for byte), so it needs no marker inside the
//! media and works through any sequence/timestamp rewriting. The loop lasts seconds, far longer
//! than any latency worth measuring, so the last send of that place is the one received.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use rtc::interceptor::{Attribute, Interceptor, Packet as IPacket, ReceiverReportBuilder, Registry, SenderReportBuilder, Slot, StreamInfo, TaggedPacket};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_H264, MIME_TYPE_OPUS, MediaEngine};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::{RTCBundlePolicy, RTCConfigurationBuilder, RTCRtcpMuxPolicy};
use rtc::peer_connection::event::RTCPeerConnectionEvent;
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use serde::Serialize;

use crate::measure::{FreezeDetector, LatencyStats, LossCounter, new_histogram};
use crate::media::Library;

pub const H264_PT: u8 = 102;
pub const OPUS_PT: u8 = 111;
pub const H264_FMTP: &str = "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f";
const WAKER: Token = Token(usize::MAX);
/// Datagrams read from one socket per turn before the loop moves on (fairness).
const READ_BATCH: usize = 64;

/// Work for the media thread, sent by signaling tasks.
pub type Cmd = Box<dyn FnOnce(&mut World) + Send>;

/// The handle signaling uses to reach the media thread.
#[derive(Clone)]
pub struct WorldHandle {
    tx: mpsc::Sender<Cmd>,
    waker: Arc<Waker>,
}

impl WorldHandle {
    /// Runs `f` on the media thread and returns its result.
    pub async fn call<T: Send + 'static>(&self, f: impl FnOnce(&mut World) -> T + Send + 'static) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Box::new(move |w: &mut World| {
                let _ = tx.send(f(w));
            }))
            .map_err(|_| anyhow!("media thread is gone"))?;
        self.waker.wake().context("waking the media thread")?;
        rx.await.map_err(|_| anyhow!("media thread dropped the call"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Audio,
    Video,
}

/// What a publisher sends.
#[derive(Clone, Debug)]
pub struct PublishSpec {
    pub audio: bool,
    /// Indices of the library's video layers to send (one = single layer, three = simulcast).
    pub video_layers: Vec<usize>,
    pub data_channel: Option<String>,
}

/// A received stream as the subscriber's signaling described it.
#[derive(Clone, Debug)]
pub struct StreamInfoMap {
    pub publisher: usize,
    pub kind: Kind,
}

struct SendTrack {
    loop_id: u8,
    ssrc: u32,
    pt: u8,
    rid: Option<String>,
    /// Header extensions every packet carries (simulcast: mid and rid), as (id, value).
    extensions: Vec<(u8, bytes::Bytes)>,
    seq: u16,
    ts: u32,
    frame: usize,
    next_at: Instant,
    keyframe_wanted: bool,
}

struct RecvTrack {
    publisher: usize,
    kind: Kind,
    loss: LossCounter,
    latency: LatencyStats,
    freeze: FreezeDetector,
    bytes: u64,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
    layers_seen: u8,
}

impl RecvTrack {
    fn new(publisher: usize, kind: Kind) -> Self {
        Self {
            publisher,
            kind,
            loss: LossCounter::default(),
            latency: LatencyStats::default(),
            freeze: FreezeDetector::default(),
            bytes: 0,
            first_at: None,
            last_at: None,
            layers_seen: 0,
        }
    }
}

enum Role {
    Publisher { publisher: usize, tracks: Vec<SendTrack>, data_channel: Option<rtc::data_channel::RTCDataChannelId>, chat_sent: u64 },
    Subscriber { streams: HashMap<u32, RecvTrack>, ssrc_info: HashMap<u32, StreamInfoMap>, joined_at: Instant },
}

struct Peer {
    pc: RTCPeerConnection,
    socket: UdpSocket,
    local: SocketAddr,
    role: Role,
    state: RTCPeerConnectionState,
    connected_at: Option<Instant>,
    deadline: Option<Instant>,
    dirty: bool,
    readable: bool,
    failed: bool,
}

/// Results of one received track.
#[derive(Clone, Debug, Serialize)]
pub struct TrackResult {
    pub subscriber: usize,
    pub publisher: usize,
    pub kind: Kind,
    pub packets: u64,
    pub expected: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub bytes: u64,
    pub bitrate_kbps: f64,
    pub latency_ms: Percentiles,
    pub jitter_ms: Percentiles,
    pub unmatched: u64,
    pub frames: u64,
    pub incomplete_frames: u64,
    pub freezes: u64,
    pub frozen_ms: f64,
    pub time_to_first_packet_ms: Option<f64>,
    /// Video: which of the publisher's layers (0 = first in the scenario) arrived.
    pub layers: Vec<u8>,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
    pub count: u64,
}

impl Percentiles {
    pub fn from_us(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |v: u64| v as f64 / 1000.0;
        Self {
            p50: ms(h.value_at_quantile(0.50)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
            count: h.len(),
        }
    }
}

/// Counters the orchestrator samples once a second.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Snapshot {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub lost: u64,
    pub expected: u64,
    pub interval_latency: Percentiles,
    pub publishers_connected: usize,
    pub subscribers_connected: usize,
    pub peers: usize,
    pub failed_peers: u64,
    pub chat_sent: u64,
    pub chat_received: u64,
    pub socket_errors: u64,
    /// SRTP protection profile negotiated → connections.
    pub srtp_ciphers: std::collections::BTreeMap<String, usize>,
}

/// The media thread's state. See the module documentation.
pub struct World {
    poll: Poll,
    lib: Arc<Library>,
    next_key: usize,
    peers: HashMap<usize, Peer>,
    deadlines: BTreeSet<(Instant, usize)>,
    /// Publisher send schedule: (next frame instant, peer, track index).
    schedule: BTreeSet<(Instant, usize, usize)>,
    dirty: Vec<usize>,
    still_readable: VecDeque<usize>,
    /// [publisher][loop id][packet] → when it was last sent.
    send_log: Vec<Vec<Vec<Option<Instant>>>>,
    finished: Vec<TrackResult>,
    totals_latency: Histogram<u64>,
    totals_jitter: Histogram<u64>,
    interval_latency: Histogram<u64>,
    counters: Snapshot,
    buf: Vec<u8>,
    stop: bool,
    pub srtp_profiles: Vec<rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile>,
    chat_interval: Option<Duration>,
    next_chat: Option<Instant>,
}

impl World {
    /// Starts the media thread.
    pub fn spawn(lib: Arc<Library>, publishers: usize, srtp_gcm_only: bool) -> Result<(WorldHandle, std::thread::JoinHandle<()>)> {
        use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile as P;
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = mpsc::channel::<Cmd>();
        let loops = 1 + lib.video.len();
        let send_log = (0..publishers)
            .map(|_| (0..loops).map(|l| vec![None; lib.track(l as u8).packets.len()]).collect())
            .collect();
        let srtp_profiles = if srtp_gcm_only {
            vec![P::Srtp_Aead_Aes_128_Gcm]
        } else {
            // What Chrome offers, in its order.
            vec![P::Srtp_Aead_Aes_128_Gcm, P::Srtp_Aead_Aes_256_Gcm, P::Srtp_Aes128_Cm_Hmac_Sha1_80, P::Srtp_Aes128_Cm_Hmac_Sha1_32]
        };
        let mut world = World {
            poll,
            lib,
            next_key: 1,
            peers: HashMap::new(),
            deadlines: BTreeSet::new(),
            schedule: BTreeSet::new(),
            dirty: Vec::new(),
            still_readable: VecDeque::new(),
            send_log,
            finished: Vec::new(),
            totals_latency: new_histogram(),
            totals_jitter: new_histogram(),
            interval_latency: new_histogram(),
            counters: Snapshot::default(),
            buf: vec![0u8; 2048],
            stop: false,
            srtp_profiles,
            chat_interval: None,
            next_chat: None,
        };
        let handle = WorldHandle { tx, waker };
        let join = std::thread::Builder::new().name("media".into()).spawn(move || world.run(rx))?;
        Ok((handle, join))
    }

    fn run(&mut self, rx: mpsc::Receiver<Cmd>) {
        let mut events = Events::with_capacity(1024);
        while !self.stop {
            while let Ok(cmd) = rx.try_recv() {
                cmd(self);
            }
            if self.stop {
                break;
            }
            let now = Instant::now();
            self.run_timers(now);
            self.send_media(now);
            self.send_chat(now);
            self.flush();
            let timeout = if self.still_readable.is_empty() {
                let next = [self.deadlines.first().map(|d| d.0), self.schedule.first().map(|s| s.0), self.next_chat]
                    .into_iter()
                    .flatten()
                    .min();
                let now = Instant::now();
                Some(next.map_or(Duration::from_millis(50), |t| t.saturating_duration_since(now)).min(Duration::from_millis(50)))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != std::io::ErrorKind::Interrupted
            {
                tracing::error!(error = %e, "poll failed");
                break;
            }
            for ev in events.iter() {
                if ev.token() != WAKER
                    && let Some(p) = self.peers.get_mut(&ev.token().0)
                    && !p.readable
                {
                    p.readable = true;
                    self.still_readable.push_back(ev.token().0);
                }
            }
            let n = self.still_readable.len();
            for _ in 0..n {
                let Some(key) = self.still_readable.pop_front() else { break };
                if self.read_socket(key) {
                    self.still_readable.push_back(key);
                } else if let Some(p) = self.peers.get_mut(&key) {
                    p.readable = false;
                }
            }
        }
        let keys: Vec<usize> = self.peers.keys().copied().collect();
        for k in keys {
            self.close_peer(k);
        }
    }

    pub fn stop(&mut self) {
        self.stop = true;
    }

    pub fn set_chat_rate(&mut self, per_publisher_per_sec: f64) {
        if per_publisher_per_sec > 0.0 {
            self.chat_interval = Some(Duration::from_secs_f64(1.0 / per_publisher_per_sec));
            self.next_chat = Some(Instant::now());
        }
    }

    // ------------------------------------------------------------------------------------
    // Peers.

    fn build_pc(&self, publisher: bool, now: Instant) -> Result<RTCPeerConnection> {
        let mut me = MediaEngine::default();
        let fb = |t: &str, p: &str| RTCPFeedback { typ: t.into(), parameter: p.into() };
        me.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: RTCRtpCodec {
                    mime_type: MIME_TYPE_H264.into(),
                    clock_rate: 90_000,
                    channels: 0,
                    sdp_fmtp_line: H264_FMTP.into(),
                    rtcp_feedback: vec![fb("nack", ""), fb("nack", "pli"), fb("ccm", "fir")],
                },
                payload_type: H264_PT,
            },
            RtpCodecKind::Video,
        )?;
        me.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: RTCRtpCodec {
                    mime_type: MIME_TYPE_OPUS.into(),
                    clock_rate: 48_000,
                    channels: 2,
                    sdp_fmtp_line: "minptime=10;useinbandfec=1".into(),
                    rtcp_feedback: vec![],
                },
                payload_type: OPUS_PT,
            },
            RtpCodecKind::Audio,
        )?;
        if publisher {
            // Simulcast layers carry mid and rid (video only).
            for uri in [URI_MID, URI_RID] {
                me.register_header_extension(
                    rtc::rtp_transceiver::rtp_sender::RTCRtpHeaderExtensionCapability { uri: uri.into() },
                    RtpCodecKind::Video,
                    None,
                )?;
            }
        }
        // Publishers: sender reports, and keyframe requests delivered to us. Subscribers:
        // receiver reports (as any client sends); no NACKs, so loss is measured as it happened.
        let registry = if publisher {
            Registry::new().with(Slot::SenderReport, SenderReportBuilder::new().build())
        } else {
            Registry::new().with(Slot::ReceiverReport, ReceiverReportBuilder::new().build())
        }
        .with(Slot::from(20_000), KeyframeRequestsToApp::default());
        let settings = SettingEngineBuilder::new().with_srtp_protection_profiles(self.srtp_profiles.clone()).build();
        let config = RTCConfigurationBuilder::new()
            .with_bundle_policy(RTCBundlePolicy::MaxBundle)
            .with_rtcp_mux_policy(RTCRtcpMuxPolicy::Require)
            .build();
        Ok(RTCPeerConnectionBuilder::new()
            .with_configuration(config)
            .with_media_engine(me)
            .with_setting_engine(settings)
            .with_interceptor_registry(registry)
            .build(now)?)
    }

    fn new_peer(&mut self, ip: IpAddr, publisher: bool, role: Role) -> Result<usize> {
        let now = Instant::now();
        let key = self.next_key;
        self.next_key += 1;
        let std_sock = {
            let s = socket2::Socket::new(socket2::Domain::for_address(SocketAddr::new(ip, 0)), socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
            let _ = s.set_recv_buffer_size(1 << 20);
            let _ = s.set_send_buffer_size(1 << 20);
            s.set_nonblocking(true)?;
            s.bind(&SocketAddr::new(ip, 0).into())?;
            std::net::UdpSocket::from(s)
        };
        let local = std_sock.local_addr()?;
        let mut socket = UdpSocket::from_std(std_sock);
        self.poll.registry().register(&mut socket, Token(key), Interest::READABLE)?;
        let mut pc = self.build_pc(publisher, now)?;
        let candidate = CandidateHostConfig {
            base_config: CandidateConfig {
                network: "udp".into(),
                address: local.ip().to_string(),
                port: local.port(),
                component: 1,
                ..Default::default()
            },
            ..Default::default()
        }
        .new_candidate_host()?;
        pc.add_local_candidate(RTCIceCandidate::from(&candidate).to_json()?)?;
        self.peers.insert(
            key,
            Peer {
                pc,
                socket,
                local,
                role,
                state: RTCPeerConnectionState::New,
                connected_at: None,
                deadline: None,
                dirty: true,
                readable: false,
                failed: false,
            },
        );
        self.dirty.push(key);
        Ok(key)
    }

    /// Creates a publisher connection and its offer. Returns (peer key, offer SDP, track ids:
    /// `(track_id, kind)` as in the SDP's msid).
    pub fn create_publisher(&mut self, ip: IpAddr, publisher: usize, spec: &PublishSpec) -> Result<(usize, String, Vec<(String, Kind)>)> {
        let key = self.new_peer(ip, true, Role::Publisher { publisher, tracks: Vec::new(), data_channel: None, chat_sent: 0 })?;
        let now = Instant::now();
        let mut tracks = Vec::new();
        let mut send = Vec::new();
        let stream = format!("pub{publisher}");
        let lib = self.lib.clone();
        let peer = self.peers.get_mut(&key).expect("just inserted");
        if spec.audio {
            let ssrc = rand::random::<u32>();
            let id = format!("pub{publisher}-audio");
            let codec = RTCRtpCodec { mime_type: MIME_TYPE_OPUS.into(), clock_rate: 48_000, channels: 2, sdp_fmtp_line: "minptime=10;useinbandfec=1".into(), rtcp_feedback: vec![] };
            let enc = vec![RTCRtpEncodingParameters { rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(ssrc), ..Default::default() }, codec, ..Default::default() }];
            peer.pc.add_track(MediaStreamTrack::new(stream.clone(), id.clone(), id.clone(), RtpCodecKind::Audio, enc))?;
            tracks.push((id, Kind::Audio));
            send.push(SendTrack { loop_id: 0, ssrc, pt: OPUS_PT, rid: None, extensions: Vec::new(), seq: rand::random(), ts: rand::random(), frame: rand::random_range(0..lib.audio.frames.len()), next_at: now, keyframe_wanted: false });
        }
        if !spec.video_layers.is_empty() {
            let id = format!("pub{publisher}-video");
            let codec = RTCRtpCodec { mime_type: MIME_TYPE_H264.into(), clock_rate: 90_000, channels: 0, sdp_fmtp_line: H264_FMTP.into(), rtcp_feedback: vec![] };
            let simulcast = spec.video_layers.len() > 1;
            let mut encodings = Vec::new();
            // A random phase, so that the publishers' keyframes do not all coincide.
            let phase = rand::random_range(0..lib.video[spec.video_layers[0]].frames.len());
            for &l in &spec.video_layers {
                let ssrc = rand::random::<u32>();
                let rid = if simulcast { lib.video[l].rid.clone() } else { None };
                encodings.push(RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(ssrc), rid: rid.clone().unwrap_or_default(), ..Default::default() },
                    codec: codec.clone(),
                    ..Default::default()
                });
                let frames = lib.video[l].frames.len();
                send.push(SendTrack {
                    loop_id: (l + 1) as u8,
                    ssrc,
                    pt: H264_PT,
                    rid,
                    extensions: Vec::new(),
                    seq: rand::random(),
                    ts: rand::random(),
                    frame: lib.video[l].next_keyframe(phase % frames),
                    next_at: now,
                    keyframe_wanted: false,
                });
            }
            peer.pc.add_track(MediaStreamTrack::new(stream.clone(), id.clone(), id.clone(), RtpCodecKind::Video, encodings))?;
            tracks.push((id, Kind::Video));
        }
        if let Some(label) = &spec.data_channel {
            let dc = peer.pc.create_data_channel(label, None)?;
            let id = dc.id();
            if let Role::Publisher { data_channel, .. } = &mut peer.role {
                *data_channel = Some(id);
            }
        }
        let offer = peer.pc.create_offer(None)?;
        let sdp = offer.sdp.clone();
        // Simulcast layers are told apart by the rid header extension (and the m-line by mid),
        // with the ids this offer gave them.
        let video = video_extmap(&sdp);
        for t in send.iter_mut().filter(|t| t.rid.is_some()) {
            if let (Some(mid), Some(mid_id)) = (&video.mid, video.mid_ext) {
                t.extensions.push((mid_id, bytes::Bytes::copy_from_slice(mid.as_bytes())));
            }
            if let (Some(rid), Some(rid_id)) = (&t.rid, video.rid_ext) {
                t.extensions.push((rid_id, bytes::Bytes::copy_from_slice(rid.as_bytes())));
            }
        }
        if let Role::Publisher { tracks: t, .. } = &mut peer.role {
            *t = send;
        }
        peer.pc.set_local_description(now, offer)?;
        Ok((key, sdp, tracks))
    }

    pub fn set_answer(&mut self, key: usize, sdp: String) -> Result<()> {
        let peer = self.peers.get_mut(&key).ok_or_else(|| anyhow!("no peer {key}"))?;
        peer.pc.set_remote_description(Instant::now(), RTCSessionDescription::answer(sdp)?)?;
        self.mark_dirty(key);
        Ok(())
    }

    pub fn create_subscriber(&mut self, ip: IpAddr, joined_at: Instant) -> Result<usize> {
        self.new_peer(ip, false, Role::Subscriber { streams: HashMap::new(), ssrc_info: HashMap::new(), joined_at })
    }

    /// Answers a server offer on a subscriber connection; `mids` tells which publisher and kind
    /// each m-line (by mid) carries.
    pub fn answer_offer(&mut self, key: usize, sdp: String, mids: &HashMap<String, StreamInfoMap>) -> Result<String> {
        let peer = self.peers.get_mut(&key).ok_or_else(|| anyhow!("no peer {key}"))?;
        let now = Instant::now();
        for (ssrc, mid) in ssrcs_by_mid(&sdp) {
            if let (Some(info), Role::Subscriber { ssrc_info, .. }) = (mids.get(&mid), &mut peer.role) {
                ssrc_info.insert(ssrc, info.clone());
            }
        }
        peer.pc.set_remote_description(now, RTCSessionDescription::offer(sdp)?)?;
        let answer = peer.pc.create_answer(None)?;
        let sdp = answer.sdp.clone();
        peer.pc.set_local_description(now, answer)?;
        self.mark_dirty(key);
        Ok(sdp)
    }

    pub fn is_connected(&self, key: usize) -> bool {
        self.peers.get(&key).is_some_and(|p| p.state == RTCPeerConnectionState::Connected)
    }

    pub fn is_failed(&self, key: usize) -> bool {
        self.peers.get(&key).is_none_or(|p| p.failed)
    }

    /// Closes a peer (a goodbye: DTLS close_notify), keeping what its tracks measured.
    pub fn close_peer(&mut self, key: usize) {
        let Some(mut peer) = self.peers.remove(&key) else { return };
        let now = Instant::now();
        if peer.pc.close().is_ok() {
            while let Some(out) = peer.pc.poll_write() {
                let _ = peer.socket.send_to(&out.message, out.transport.peer_addr);
            }
        }
        let _ = self.poll.registry().deregister(&mut peer.socket);
        if let Some(d) = peer.deadline {
            self.deadlines.remove(&(d, key));
        }
        if let Role::Publisher { tracks, .. } = &peer.role {
            for (i, t) in tracks.iter().enumerate() {
                self.schedule.remove(&(t.next_at, key, i));
            }
        }
        if let Role::Subscriber { streams, joined_at, .. } = peer.role {
            for (_, mut t) in streams {
                t.freeze.finish(now);
                self.finished.push(track_result(key, joined_at, &mut t));
            }
        }
    }

    fn mark_dirty(&mut self, key: usize) {
        if let Some(p) = self.peers.get_mut(&key)
            && !p.dirty
        {
            p.dirty = true;
            self.dirty.push(key);
        }
    }

    // ------------------------------------------------------------------------------------
    // The loop's work.

    /// Reads up to a batch of datagrams; returns whether the socket may have more.
    fn read_socket(&mut self, key: usize) -> bool {
        let mut more = false;
        for _ in 0..READ_BATCH {
            let Some(peer) = self.peers.get_mut(&key) else { return false };
            let (n, from) = match peer.socket.recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(_) => {
                    self.counters.socket_errors += 1;
                    return false;
                }
            };
            more = true;
            let now = Instant::now();
            let msg = TaggedBytesMut {
                now,
                transport: TransportContext { local_addr: peer.local, peer_addr: from, ecn: None, transport_protocol: TransportProtocol::UDP },
                message: BytesMut::from(&self.buf[..n]),
            };
            if peer.pc.handle_read(msg).is_err() {
                continue;
            }
            self.process_peer(key);
        }
        // A connected subscriber answers nothing per packet (no NACKs): its reports go out on
        // its timers, so skip draining and re-arming it per read (that is most of a packet's
        // cost in the stack otherwise).
        let quiet = self.peers.get(&key).is_some_and(|p| matches!(p.role, Role::Subscriber { .. }) && p.state == RTCPeerConnectionState::Connected);
        if !quiet {
            self.mark_dirty(key);
        }
        more
    }

    fn process_peer(&mut self, key: usize) {
        let Some(peer) = self.peers.get_mut(&key) else { return };
        while let Some(ev) = peer.pc.poll_event() {
            if let RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) = ev {
                peer.state = s;
                let now = Instant::now();
                match s {
                    RTCPeerConnectionState::Connected => {
                        if peer.connected_at.is_none() {
                            let report = peer.pc.get_stats(now, rtc::statistics::StatsSelector::None);
                            let cipher = report.transport().map(|t| t.srtp_cipher.clone()).unwrap_or_default();
                            *self.counters.srtp_ciphers.entry(cipher).or_default() += 1;
                        }
                        peer.connected_at.get_or_insert(now);
                        if let Role::Publisher { tracks, .. } = &mut peer.role {
                            for (i, t) in tracks.iter_mut().enumerate() {
                                t.next_at = now;
                                self.schedule.insert((now, key, i));
                            }
                        }
                    }
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                        if !peer.failed {
                            peer.failed = true;
                            if s == RTCPeerConnectionState::Failed {
                                self.counters.failed_peers += 1;
                            }
                        }
                        if let Role::Publisher { tracks, .. } = &peer.role {
                            for (i, t) in tracks.iter().enumerate() {
                                self.schedule.remove(&(t.next_at, key, i));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        while let Some(msg) = peer.pc.poll_read() {
            let now = msg.now;
            match msg.message {
                RTCMessage::RtpPacket(_, pkt) => {
                    if let Role::Subscriber { streams, ssrc_info, .. } = &mut peer.role {
                        on_rtp(&self.lib, &self.send_log, streams, ssrc_info, &mut self.counters, &mut self.totals_latency, &mut self.totals_jitter, &mut self.interval_latency, pkt, now);
                    }
                }
                RTCMessage::RtcpPacket(_, packets) => {
                    if let Role::Publisher { tracks, .. } = &mut peer.role {
                        for p in &packets {
                            let any = p.as_any();
                            let mut wanted = Vec::new();
                            if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
                                wanted.push(pli.media_ssrc);
                            } else if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
                                wanted.extend(fir.fir.iter().map(|e| e.ssrc));
                            }
                            for t in tracks.iter_mut().filter(|t| wanted.contains(&t.ssrc)) {
                                t.keyframe_wanted = true;
                            }
                        }
                    }
                }
                RTCMessage::DataChannelMessage(_, _) => self.counters.chat_received += 1,
                _ => {}
            }
        }
    }

    fn run_timers(&mut self, now: Instant) {
        while let Some(&(at, key)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(peer) = self.peers.get_mut(&key) else { continue };
            peer.deadline = None;
            let _ = peer.pc.handle_timeout(now);
            self.process_peer(key);
            self.mark_dirty(key);
        }
    }

    fn send_media(&mut self, now: Instant) {
        while let Some(&(at, key, ti)) = self.schedule.first() {
            if at > now {
                break;
            }
            self.schedule.pop_first();
            let Some(peer) = self.peers.get_mut(&key) else { continue };
            let Role::Publisher { publisher, tracks, .. } = &mut peer.role else { continue };
            let Some(t) = tracks.get_mut(ti) else { continue };
            let lp = self.lib.track(t.loop_id);
            if t.keyframe_wanted {
                t.keyframe_wanted = false;
                t.frame = lp.next_keyframe(t.frame);
            }
            let frame = &lp.frames[t.frame];
            let log = &mut self.send_log[*publisher][usize::from(t.loop_id)];
            let sent_at = Instant::now();
            for k in 0..frame.count {
                let p = &lp.packets[frame.first + k];
                let mut header = rtp::header::Header {
                    version: 2,
                    marker: p.marker,
                    payload_type: t.pt,
                    sequence_number: t.seq,
                    timestamp: t.ts,
                    ssrc: t.ssrc,
                    ..Default::default()
                };
                for (id, v) in &t.extensions {
                    let _ = header.set_extension(*id, v.clone());
                }
                let pkt = rtp::Packet { header, payload: p.payload.clone() };
                log[frame.first + k] = Some(sent_at);
                if peer.pc.handle_write(TaggedRTCMessage { now: sent_at, message: RTCMessage::RtpPacket(String::new(), pkt) }).is_ok() {
                    self.counters.tx_packets += 1;
                    self.counters.tx_bytes += p.payload.len() as u64;
                }
                t.seq = t.seq.wrapping_add(1);
            }
            t.ts = t.ts.wrapping_add(lp.ts_step);
            t.frame = (t.frame + 1) % lp.frames.len();
            // Keep the frame clock: the next frame is due one interval after this one was.
            let mut next = at + lp.frame_interval;
            if next + Duration::from_millis(500) < now {
                next = now; // fell far behind (stalled): resynchronise instead of bursting
            }
            t.next_at = next;
            self.schedule.insert((next, key, ti));
            self.mark_dirty(key);
        }
    }

    fn send_chat(&mut self, now: Instant) {
        let (Some(interval), Some(at)) = (self.chat_interval, self.next_chat) else { return };
        if at > now {
            return;
        }
        self.next_chat = Some(at + interval);
        let keys: Vec<usize> = self.peers.keys().copied().collect();
        for key in keys {
            let Some(peer) = self.peers.get_mut(&key) else { continue };
            if peer.state != RTCPeerConnectionState::Connected {
                continue;
            }
            let Role::Publisher { data_channel: Some(dc), chat_sent, publisher, .. } = &mut peer.role else { continue };
            *chat_sent += 1;
            let text = format!(r#"{{"type":"chat","id":"p{}-{}","text":"load test message {}"}}"#, publisher, chat_sent, chat_sent);
            if let Some(mut ch) = peer.pc.data_channel(*dc)
                && ch.send_text(now, text).is_ok()
            {
                self.counters.chat_sent += 1;
            }
            self.mark_dirty(key);
        }
    }

    fn flush(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for key in dirty {
            let Some(peer) = self.peers.get_mut(&key) else { continue };
            peer.dirty = false;
            while let Some(out) = peer.pc.poll_write() {
                match peer.socket.send_to(&out.message, out.transport.peer_addr) {
                    Ok(_) => {}
                    Err(_) => self.counters.socket_errors += 1,
                }
            }
            let new = peer.pc.poll_timeout();
            if new != peer.deadline {
                if let Some(d) = peer.deadline {
                    self.deadlines.remove(&(d, key));
                }
                if let Some(d) = new {
                    self.deadlines.insert((d, key));
                }
                peer.deadline = new;
            }
        }
    }

    // ------------------------------------------------------------------------------------
    // Results.

    /// Counters since the start, and the latency of the interval since the last snapshot.
    pub fn snapshot(&mut self) -> Snapshot {
        let mut s = self.counters.clone();
        s.interval_latency = Percentiles::from_us(&self.interval_latency);
        self.interval_latency.reset();
        let (mut lost, mut expected) = (0, 0);
        for p in self.peers.values() {
            match &p.role {
                Role::Publisher { .. } => s.publishers_connected += usize::from(p.state == RTCPeerConnectionState::Connected),
                Role::Subscriber { streams, .. } => {
                    s.subscribers_connected += usize::from(p.state == RTCPeerConnectionState::Connected);
                    for t in streams.values() {
                        lost += t.loss.lost();
                        expected += t.loss.expected();
                    }
                }
            }
        }
        for t in &self.finished {
            lost += t.lost;
            expected += t.expected;
        }
        s.lost = lost;
        s.expected = expected;
        s.peers = self.peers.len();
        s
    }

    /// Every received track's results (open peers included), and the merged histograms.
    pub fn results(&mut self) -> (Vec<TrackResult>, Percentiles, Percentiles) {
        let now = Instant::now();
        let mut out = self.finished.clone();
        for (&key, p) in self.peers.iter_mut() {
            if let Role::Subscriber { streams, joined_at, .. } = &mut p.role {
                for t in streams.values_mut() {
                    let mut f = t.freeze.clone();
                    f.finish(now);
                    let saved = std::mem::replace(&mut t.freeze, f);
                    out.push(track_result(key, *joined_at, t));
                    t.freeze = saved;
                }
            }
        }
        (out, Percentiles::from_us(&self.totals_latency), Percentiles::from_us(&self.totals_jitter))
    }

    /// Resets what was measured (after a warm-up): counters, histograms, and every track's
    /// statistics (time to first packet is kept).
    pub fn reset_measurements(&mut self) {
        self.totals_latency.reset();
        self.totals_jitter.reset();
        self.interval_latency.reset();
        self.finished.clear();
        self.counters = Snapshot { failed_peers: self.counters.failed_peers, srtp_ciphers: std::mem::take(&mut self.counters.srtp_ciphers), ..Snapshot::default() };
        for p in self.peers.values_mut() {
            if let Role::Subscriber { streams, .. } = &mut p.role {
                for t in streams.values_mut() {
                    let first = t.first_at;
                    *t = RecvTrack::new(t.publisher, t.kind);
                    t.first_at = first;
                }
            }
        }
    }
}

pub const URI_MID: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
pub const URI_RID: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";
#[derive(Debug, Default, PartialEq)]
pub struct VideoExtmap {
    pub mid: Option<String>,
    pub mid_ext: Option<u8>,
    pub rid_ext: Option<u8>,
}

/// The first video m-section's mid and the extension ids of mid and rid in an SDP.
pub fn video_extmap(sdp: &str) -> VideoExtmap {
    let mut out = VideoExtmap::default();
    let mut in_video = false;
    for line in sdp.lines().map(str::trim) {
        if line.starts_with("m=") {
            if out.mid.is_some() {
                break;
            }
            in_video = line.starts_with("m=video");
        } else if in_video {
            if let Some(m) = line.strip_prefix("a=mid:") {
                out.mid = Some(m.to_owned());
            } else if let Some(rest) = line.strip_prefix("a=extmap:") {
                let mut it = rest.split_whitespace();
                let id = it.next().and_then(|i| i.split('/').next()).and_then(|i| i.parse::<u8>().ok());
                match it.next() {
                    Some(URI_MID) => out.mid_ext = id,
                    Some(URI_RID) => out.rid_ext = id,
                    _ => {}
                }
            }
        }
    }
    out
}

fn track_result(subscriber: usize, joined_at: Instant, t: &mut RecvTrack) -> TrackResult {
    let span = match (t.first_at, t.last_at) {
        (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
        _ => 0.0,
    };
    TrackResult {
        subscriber,
        publisher: t.publisher,
        kind: t.kind,
        packets: t.loss.received(),
        expected: t.loss.expected(),
        lost: t.loss.lost(),
        duplicates: t.loss.duplicates,
        bytes: t.bytes,
        bitrate_kbps: if span > 0.0 { t.bytes as f64 * 8.0 / span / 1000.0 } else { 0.0 },
        latency_ms: Percentiles::from_us(&t.latency.latency),
        jitter_ms: Percentiles::from_us(&t.latency.jitter),
        unmatched: t.latency.unmatched,
        frames: t.freeze.frames,
        incomplete_frames: t.freeze.incomplete_frames,
        freezes: t.freeze.freezes,
        frozen_ms: t.freeze.frozen.as_secs_f64() * 1000.0,
        time_to_first_packet_ms: t.first_at.map(|f| f.saturating_duration_since(joined_at).as_secs_f64() * 1000.0),
        layers: (1..8u8).filter(|l| t.layers_seen & (1 << l) != 0).map(|l| l - 1).collect(),
    }
}

#[allow(clippy::too_many_arguments)]
fn on_rtp(
    lib: &Library,
    send_log: &[Vec<Vec<Option<Instant>>>],
    streams: &mut HashMap<u32, RecvTrack>,
    ssrc_info: &HashMap<u32, StreamInfoMap>,
    counters: &mut Snapshot,
    totals_latency: &mut Histogram<u64>,
    totals_jitter: &mut Histogram<u64>,
    interval_latency: &mut Histogram<u64>,
    pkt: rtp::Packet,
    now: Instant,
) {
    let ssrc = pkt.header.ssrc;
    counters.rx_packets += 1;
    counters.rx_bytes += pkt.payload.len() as u64;
    let t = match streams.get_mut(&ssrc) {
        Some(t) => t,
        None => {
            let (publisher, kind) = match ssrc_info.get(&ssrc) {
                Some(i) => (i.publisher, i.kind),
                // Not announced: guess the kind from the payload type, publisher unknown.
                None => (usize::MAX, if pkt.header.payload_type == OPUS_PT { Kind::Audio } else { Kind::Video }),
            };
            streams.entry(ssrc).or_insert_with(|| RecvTrack::new(publisher, kind))
        }
    };
    t.first_at.get_or_insert(now);
    t.last_at = Some(now);
    t.bytes += pkt.payload.len() as u64;
    let ext = t.loss.on_packet(pkt.header.sequence_number);
    let sent = lib.lookup(&pkt.payload).and_then(|pos| {
        if pos.track > 0 {
            t.layers_seen |= 1 << pos.track;
        }
        send_log.get(t.publisher)?.get(usize::from(pos.track))?.get(pos.packet as usize).copied().flatten()
    });
    if let Some(us) = t.latency.on_packet(sent, now) {
        totals_latency.saturating_record(us);
        interval_latency.saturating_record(us);
        if let Some(j) = t.latency.last_jitter {
            totals_jitter.saturating_record(j);
        }
    }
    t.freeze.on_packet(ext, pkt.header.marker, t.kind == Kind::Audio, now);
}

/// `(ssrc, mid)` for every `a=ssrc:` line of an SDP, by the m-section's `a=mid`.
pub fn ssrcs_by_mid(sdp: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let mut mid: Option<String> = None;
    let mut pending: Vec<u32> = Vec::new();
    let flush = |mid: &Option<String>, pending: &mut Vec<u32>, out: &mut Vec<(u32, String)>| {
        if let Some(m) = mid {
            for s in pending.drain(..) {
                out.push((s, m.clone()));
            }
        }
        pending.clear();
    };
    for line in sdp.lines() {
        let line = line.trim();
        if line.starts_with("m=") {
            flush(&mid, &mut pending, &mut out);
            mid = None;
        } else if let Some(m) = line.strip_prefix("a=mid:") {
            mid = Some(m.to_owned());
        } else if let Some(rest) = line.strip_prefix("a=ssrc:")
            && let Some(s) = rest.split_whitespace().next().and_then(|s| s.parse::<u32>().ok())
            && !pending.contains(&s)
        {
            pending.push(s);
        }
    }
    flush(&mid, &mut pending, &mut out);
    out
}

/// Hands keyframe requests (PLI/FIR) past the end of the interceptor chain, which otherwise
/// stops all inbound RTCP, so the publisher can answer them.
#[derive(Default)]
struct KeyframeRequestsToApp {
    reads: VecDeque<TaggedPacket>,
    writes: VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequestsToApp {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let IPacket::Rtcp(packets) = &mut msg.message.packet {
            let wanted = |p: &Box<dyn rtc::rtcp::Packet>| {
                let any = p.as_ref().as_any();
                any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
            };
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

impl Interceptor for KeyframeRequestsToApp {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn video_extension_ids_are_read_from_the_offer() {
        let sdp = "m=audio 9 X 111\r\na=mid:0\r\na=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid\r\n\
                   m=video 9 X 102\r\na=mid:1\r\na=extmap:3 urn:ietf:params:rtp-hdrext:sdes:mid\r\n\
                   a=extmap:4/sendonly urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\r\n";
        assert_eq!(video_extmap(sdp), VideoExtmap { mid: Some("1".into()), mid_ext: Some(3), rid_ext: Some(4) });
    }

    #[test]
    fn ssrcs_are_mapped_to_their_m_section_mid() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=ssrc:111 cname:x\r\na=ssrc:111 msid:a b\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 102\r\na=ssrc:222 cname:y\r\na=mid:1\r\n";
        assert_eq!(ssrcs_by_mid(sdp), vec![(111, "0".to_string()), (222, "1".to_string())]);
    }
}
