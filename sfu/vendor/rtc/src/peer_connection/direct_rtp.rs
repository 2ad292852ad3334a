//! Warbler patch: a direct write path for outgoing RTP (see WARBLER-PATCH.md).
//!
//! `handle_write` + `poll_write` move every RTP packet through all eight handlers, each with its
//! own queue, and through the interceptor chain, before it is encrypted and addressed. For an SFU
//! that forwards each packet to many subscribers that plumbing is most of the per-packet cost.
//! [`RTCPeerConnection::protect_rtp_in_place`] does only what an outgoing RTP packet needs once
//! the connection is up: SRTP-protect it with the connection's context, in the caller's buffer,
//! and say where it goes (the selected ICE candidate pair).
//!
//! What it does *not* do, so the caller must if it needs them: run the interceptors' write side
//! (sender reports, NACK send buffers, TWCC stamping), and count the packet in `get_stats`
//! (outbound-rtp, candidate-pair and transport counters).

use super::RTCPeerConnection;
use bytes::BytesMut;
use shared::TransportContext;
use shared::error::{Error, Result};
use std::time::Instant;

impl RTCPeerConnection {
    /// SRTP-protects the marshalled RTP packet in `packet` in place (the tag is appended) and
    /// returns the transport it must be sent on: the selected candidate pair. Bypasses the
    /// handler pipeline and the interceptor chain.
    ///
    /// `header` must describe `packet`'s header: its SSRC and sequence number select the SRTP
    /// state, and its `marshal_size()` must be the length of the header at the start of
    /// `packet` (everything after it is encrypted; the header is authenticated).
    ///
    /// Fails while the connection has no selected candidate pair or no SRTP keys yet; `packet`
    /// is then unchanged.
    pub fn protect_rtp_in_place(&mut self, now: Instant, header: &rtp::Header, packet: &mut BytesMut) -> Result<TransportContext> {
        use shared::marshal::MarshalSize;
        if header.marshal_size() > packet.len() {
            return Err(Error::ErrBufferTooSmall);
        }
        self.pipeline_context.now = self.pipeline_context.now.max(now);
        let transport = {
            let agent = &self.pipeline_context.ice_handler_context.ice_transport.agent;
            let (local, remote) = agent
                .get_selected_candidate_pair()
                .ok_or_else(|| Error::Other("no selected ICE candidate pair".to_owned()))?;
            let key = (local.addr(), remote.addr());
            match &self.direct_transport {
                Some((k, t)) if *k == key => *t,
                _ => {
                    // base_addr() parses the related address of a reflexive candidate: once per
                    // selected pair, not per packet.
                    let t = TransportContext {
                        local_addr: local.base_addr(),
                        peer_addr: remote.addr(),
                        ecn: None,
                        transport_protocol: local.network_type().to_protocol(),
                    };
                    self.direct_transport = Some((key, t));
                    t
                }
            }
        };
        let context = self
            .pipeline_context
            .srtp_handler_context
            .local_srtp_context
            .as_mut()
            .ok_or_else(|| Error::Other("local SRTP context is not set yet".to_owned()))?;
        context.encrypt_rtp_in_place(packet, header)?;
        Ok(transport)
    }
}
