//! How Warbler configures a webrtc-rs `rtc` peer connection for each role: codecs, RTCP
//! feedback, header extensions, interceptors, ICE-lite with server-chosen credentials, and the
//! engine's shared DTLS certificate. Everything webrtc-rs-specific about building a connection
//! lives here, so another stack could replace it in one place.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use rtc::interceptor::{
    Attribute, Interceptor, NackGeneratorBuilder, Packet, ReceiverReportBuilder, Registry, Slot, StreamInfo,
    TaggedPacket, TwccReceiverBuilder,
};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::sansio::Protocol;
use rtc::peer_connection::certificate::RTCCertificate;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_H264, MIME_TYPE_OPUS, MIME_TYPE_VP8, MediaEngine};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::{RTCBundlePolicy, RTCConfigurationBuilder, RTCRtcpMuxPolicy};
use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp_transceiver::rtp_sender::{RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind};
use warbler_media::Codec;

use crate::api::EngineError;
use crate::ids::PeerRole;

pub const URI_AUDIO_LEVEL: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";
pub const URI_MID: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
pub const URI_RID: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";
pub const URI_REPAIRED_RID: &str = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id";
pub const URI_TRANSPORT_CC: &str = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01";
pub const URI_ABS_SEND_TIME: &str = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time";

fn feedback(typ: &str, parameter: &str) -> RTCPFeedback {
    RTCPFeedback { typ: typ.to_owned(), parameter: parameter.to_owned() }
}

/// The codec parameters Warbler registers for `codec` (payload types follow browser habits).
pub fn codec_parameters(codec: Codec, with_twcc: bool) -> Vec<RTCRtpCodecParameters> {
    let mut video_fb = vec![feedback("goog-remb", ""), feedback("ccm", "fir"), feedback("nack", ""), feedback("nack", "pli")];
    if with_twcc {
        video_fb.push(feedback("transport-cc", ""));
    }
    let video = |mime: &str, fmtp: &str, pt: u8| RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec {
            mime_type: mime.to_owned(),
            clock_rate: 90_000,
            channels: 0,
            sdp_fmtp_line: fmtp.to_owned(),
            rtcp_feedback: video_fb.clone(),
        },
        payload_type: pt,
    };
    match codec {
        Codec::Opus => vec![RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: MIME_TYPE_OPUS.to_owned(),
                clock_rate: 48_000,
                channels: 2,
                sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
                rtcp_feedback: if with_twcc { vec![feedback("transport-cc", "")] } else { vec![] },
            },
            payload_type: 111,
        }],
        Codec::Vp8 => vec![video(MIME_TYPE_VP8, "", 96)],
        Codec::H264 => vec![
            video(MIME_TYPE_H264, "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f", 125),
            video(MIME_TYPE_H264, "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f", 102),
        ],
        Codec::Vp9 | Codec::Av1 => vec![],
    }
}

/// RTX (RFC 4588) for each video payload type, towards subscribers: retransmissions and
/// bandwidth probes travel on their own SSRC, so receivers never take them for replays.
pub fn rtx_parameters(codec: Codec) -> Vec<RTCRtpCodecParameters> {
    let rtx = |apt: u8, pt: u8| RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec { mime_type: "video/rtx".to_owned(), clock_rate: 90_000, channels: 0, sdp_fmtp_line: format!("apt={apt}"), rtcp_feedback: vec![] },
        payload_type: pt,
    };
    match codec {
        Codec::Vp8 => vec![rtx(96, 97)],
        Codec::H264 => vec![rtx(125, 124), rtx(102, 103)],
        _ => vec![],
    }
}

fn media_engine(role: PeerRole, video_codecs: &[Codec]) -> Result<MediaEngine, EngineError> {
    let internal = |e: rtc::shared::error::Error| EngineError::Internal(format!("media engine: {e}"));
    let upstream = role == PeerRole::Publisher;
    let mut me = MediaEngine::default();
    // Transport-wide CC both ways: upstream so publishers' congestion control gets feedback,
    // downstream so the engine estimates each subscriber's bandwidth.
    for p in codec_parameters(Codec::Opus, true) {
        me.register_codec(p, RtpCodecKind::Audio).map_err(internal)?;
    }
    for &c in video_codecs {
        for p in codec_parameters(c, true) {
            me.register_codec(p, RtpCodecKind::Video).map_err(internal)?;
        }
        if !upstream {
            for p in rtx_parameters(c) {
                me.register_codec(p, RtpCodecKind::Video).map_err(internal)?;
            }
        }
    }
    let mut ext = |uri: &str, kind| me.register_header_extension(RTCRtpHeaderExtensionCapability { uri: uri.to_owned() }, kind, None).map_err(internal);
    if !upstream {
        // Stamped by the engine on every packet to a subscriber: transport-cc for subscribers that
        // report per packet (browsers), abs-send-time for those that estimate themselves and send
        // REMB (aiortc, older stacks).
        ext(URI_TRANSPORT_CC, RtpCodecKind::Audio)?;
        ext(URI_TRANSPORT_CC, RtpCodecKind::Video)?;
        ext(URI_ABS_SEND_TIME, RtpCodecKind::Audio)?;
        ext(URI_ABS_SEND_TIME, RtpCodecKind::Video)?;
    }
    if upstream {
        ext(URI_MID, RtpCodecKind::Audio)?;
        ext(URI_MID, RtpCodecKind::Video)?;
        ext(URI_AUDIO_LEVEL, RtpCodecKind::Audio)?;
        ext(URI_RID, RtpCodecKind::Video)?;
        ext(URI_REPAIRED_RID, RtpCodecKind::Video)?;
        ext(URI_TRANSPORT_CC, RtpCodecKind::Audio)?;
        ext(URI_TRANSPORT_CC, RtpCodecKind::Video)?;
    }
    Ok(me)
}

/// Where [`RtcpToEngine`] sits: application-most, after every interceptor that reads RTCP.
const SLOT_RTCP_TO_ENGINE: usize = 20_000;

/// Hands the RTCP the engine acts on (NACK, PLI, FIR, transport-wide feedback, REMB and receiver
/// reports from subscribers; sender reports from publishers) past the end of the interceptor
/// chain, which otherwise stops all inbound RTCP.
///
/// The stack routes a delivered compound packet by the destination SSRC of its first packet and
/// drops it if that SSRC is not one of the connection's; a packet about one of our own streams is
/// therefore moved to the front.
#[derive(Default)]
pub struct RtcpToEngine {
    reads: VecDeque<TaggedPacket>,
    writes: VecDeque<TaggedPacket>,
    local_ssrcs: Vec<u32>,
    remote_ssrcs: Vec<u32>,
}

fn engine_wants(p: &dyn rtc::rtcp::Packet) -> bool {
    let any = p.as_any();
    any.is::<TransportLayerNack>()
        || any.is::<PictureLossIndication>()
        || any.is::<FullIntraRequest>()
        || any.is::<SenderReport>()
        || any.is::<TransportLayerCc>()
        || any.is::<ReceiverEstimatedMaximumBitrate>()
        || any.is::<ReceiverReport>()
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for RtcpToEngine {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &mut msg.message.packet
            && packets.iter().any(|p| engine_wants(p.as_ref()))
        {
            packets.retain(|p| engine_wants(p.as_ref()));
            let known = |p: &Box<dyn rtc::rtcp::Packet>| {
                p.destination_ssrc().iter().any(|s| self.local_ssrcs.contains(s) || self.remote_ssrcs.contains(s))
            };
            if let Some(i) = packets.iter().position(known) {
                packets.swap(0, i);
            } else if let Some(&ours) = self.local_ssrcs.first()
                && let Some(i) = packets.iter().position(|p| p.as_any().is::<TransportLayerCc>())
                && let Some(fb) = packets[i].as_any().downcast_ref::<TransportLayerCc>()
            {
                // Transport-wide feedback names the stream of whatever packet arrived last,
                // often an RTX one (probes, repairs) the stack does not route by: it is about the
                // whole connection, so it is addressed to one of our streams instead of dropped.
                let mut fb = fb.clone();
                fb.media_ssrc = ours;
                packets[i] = Box::new(fb);
                packets.swap(0, i);
            }
            msg.message.add(Attribute::DeliverToApplication);
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

impl Interceptor for RtcpToEngine {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.local_ssrcs.push(info.ssrc);
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.local_ssrcs.retain(|s| *s != info.ssrc);
    }
    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        self.remote_ssrcs.push(info.ssrc);
    }
    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        self.remote_ssrcs.retain(|s| *s != info.ssrc);
    }
}

fn interceptors(role: PeerRole) -> Registry {
    let registry = match role {
        // Receiving: ask the publisher to resend what was lost, report reception, and give its
        // congestion controller transport-wide feedback so it ramps up its bitrate.
        PeerRole::Publisher => Registry::new()
            .with(Slot::NackGenerator, NackGeneratorBuilder::new().build())
            .with(Slot::TwccReceiver, TwccReceiverBuilder::new().build())
            .with(Slot::ReceiverReport, ReceiverReportBuilder::new().build()),
        // Sending: nothing. The engine writes RTP past the stack's pipeline and interceptors
        // (`protect_rtp_in_place`) and makes the sender reports itself (engine/rtp_out.rs); NACKs
        // are answered from its shared per-track cache (no NACK responder send buffer).
        PeerRole::Subscriber | PeerRole::Whep => Registry::new(),
    };
    registry.with(Slot::from(SLOT_RTCP_TO_ENGINE), RtcpToEngine::default())
}

/// ICE credentials the server picks for one connection; the ufrag routes STUN to it.
#[derive(Clone, Debug)]
pub struct IceCredentials {
    pub ufrag: String,
    pub pwd: String,
}

impl IceCredentials {
    pub fn random(rng: &mut impl rand::Rng) -> Self {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let mut pick = |n: usize| -> String {
            (0..n).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
        };
        Self { ufrag: pick(16), pwd: pick(32) }
    }
}

/// Builds a server-side peer connection for `role`, with a host candidate for each advertised
/// address of the shared RTC port.
pub fn build_peer_connection(
    role: PeerRole,
    video_codecs: &[Codec],
    certificate: &RTCCertificate,
    credentials: &IceCredentials,
    advertised: &[SocketAddr],
    now: Instant,
) -> Result<RTCPeerConnection, EngineError> {
    let internal = |e: rtc::shared::error::Error| EngineError::Internal(format!("peer connection: {e}"));
    let mut media_engine = media_engine(role, video_codecs)?;
    // Upstream needs the TWCC receiver's feedback type registered per codec; the codecs above
    // already carry it, so the registry only adds the interceptor.
    let _ = &mut media_engine;
    let settings = SettingEngineBuilder::new()
        .with_lite(true)
        .with_ice_credentials(credentials.ufrag.clone(), credentials.pwd.clone())
        // The engine applies its own consent timeout; these make the stack report the state too.
        .with_ice_timeouts(Some(Duration::from_secs(5)), Some(Duration::from_secs(15)), Some(Duration::from_secs(2)))
        .build();
    let config = RTCConfigurationBuilder::new()
        .with_certificates(vec![certificate.clone()])
        .with_bundle_policy(RTCBundlePolicy::MaxBundle)
        .with_rtcp_mux_policy(RTCRtcpMuxPolicy::Require)
        .build();
    let mut pc = RTCPeerConnectionBuilder::new()
        .with_configuration(config)
        .with_media_engine(media_engine)
        .with_setting_engine(settings)
        .with_interceptor_registry(interceptors(role))
        .build(now)
        .map_err(internal)?;
    for (i, addr) in advertised.iter().enumerate() {
        let candidate = CandidateHostConfig {
            base_config: CandidateConfig {
                network: "udp".to_owned(),
                address: addr.ip().to_string(),
                port: addr.port(),
                component: 1,
                // Earlier addresses are preferred (the operator's --public-ip comes first).
                priority: 0,
                foundation: format!("{}", i + 1),
                ..Default::default()
            },
            ..Default::default()
        }
        .new_candidate_host()
        .map_err(internal)?;
        let init = RTCIceCandidate::from(&candidate).to_json().map_err(internal)?;
        pc.add_local_candidate(init).map_err(internal)?;
    }
    Ok(pc)
}

/// The engine's DTLS certificate: generated once and shared by every connection, so a join does
/// not pay for key generation.
pub fn generate_certificate() -> Result<RTCCertificate, EngineError> {
    let provider = rtc::crypto::default_provider().map_err(|e| EngineError::Internal(format!("crypto provider: {e}")))?;
    RTCCertificate::generate(
        provider.crypto(),
        rtc::crypto::SignatureScheme::EcdsaP256Sha256,
        rtc::peer_connection::certificate::CertificateParams::new(vec!["warbler".to_owned()])
            .map_err(|e| EngineError::Internal(format!("certificate params: {e}")))?,
    )
    .map_err(|e| EngineError::Internal(format!("certificate: {e}")))
}
