//! The engine's media path: RTP from publishers into layers and through every subscriber's
//! forwarder, keyframe requests per layer, RTCP from subscribers (NACKs answered from the layer
//! caches, PLI/FIR relayed) and from publishers (sender reports for timestamp alignment).

use std::time::Instant;

use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp;
use warbler_media::{MediaKind, inspect_payload, keyframe_dimensions};

use super::congestion::SendKind;
use super::rtp_out::{RtpOut, Tx, send_rtp};
use super::{DownTrackId, Engine, ENGINE_RTCP_SSRC, guarded};
use crate::api::ConnectionState;
use crate::forwarder::{DropReason, PacketMeta, Verdict, Vp8Fields};
use crate::ids::{PeerId, PeerRole, TrackId};
use crate::munger::SourceKey;
use crate::packet_cache::CachedPacket;
use crate::track::{Layer, SrTiming, ntp_to_secs};

impl Engine {
    pub(super) fn on_publisher_rtp(&mut self, now: Instant, peer_id: PeerId, rtc_track_id: &str, packet: rtp::Packet) {
        let Some(peer) = self.peers.get_mut(&peer_id) else { return };
        let ssrc = packet.header.ssrc;
        let track_id = match peer.ssrc_tracks.get(&ssrc) {
            Some(t) => *t,
            None => match peer.published.get(rtc_track_id) {
                Some(&t) => {
                    peer.ssrc_tracks.insert(ssrc, t);
                    t
                }
                None => {
                    self.metrics.dropped(DropReason::UnknownTrack).inc();
                    return;
                }
            },
        };
        let Some(track) = self.tracks.get_mut(&track_id) else {
            self.metrics.dropped(DropReason::UnknownTrack).inc();
            return;
        };
        let Some(codec) = track.codec.or_else(|| peer.pt_codecs.get(&packet.header.payload_type).copied()) else {
            self.metrics.dropped(DropReason::CodecUnsupported).inc();
            return;
        };
        match track.kind {
            MediaKind::Audio => {
                self.metrics.rtp_packets_in_audio.inc();
                // The speaker detector reads the level the sender put on the packet (RFC 6464);
                // a muted track is silent whatever it carries.
                let ext = *track.audio_level_ext.get_or_insert_with(|| {
                    let mut receiver = peer.pc.rtp_receiver(track.receiver)?;
                    let params = &receiver.get_parameters().rtp_parameters.header_extensions;
                    params.iter().find(|e| e.uri == crate::rtc_setup::URI_AUDIO_LEVEL).map(|e| e.id as u8)
                });
                let level = if track.muted { Some(127) } else { ext.and_then(|id| packet.header.get_extension(id)).and_then(|b| b.first().map(|v| v & 0x7f)) };
                if let Some(level) = level
                    && let Some(room) = self.participants.get(&track.owner).and_then(|p| self.rooms.get_mut(&p.room))
                {
                    room.speakers.observe(now, track.owner, level);
                }
            }
            MediaKind::Video => self.metrics.rtp_packets_in_video.inc(),
        }
        self.metrics.rtp_bytes_in.inc_by(packet.payload.len() as u64);

        // The packet's layer: one per SSRC; a new SSRC is a new layer (simulcast) or a restarted
        // sender, which the forwarders treat like any other source change.
        let layer_idx = match track.layers.iter().position(|l| l.ssrc == ssrc) {
            Some(i) => i,
            None => {
                let rid = peer.pc.rtp_receiver(track.receiver).and_then(|r| r.track().rid(ssrc).cloned());
                // A restarted sender replaces the layer with the same rid (or the only layer).
                let replaces = track.layers.iter().position(|l| l.rid.is_some() && l.rid == rid).or_else(|| (rid.is_none() && track.layers.len() == 1 && track.layers[0].rid.is_none()).then_some(0));
                let layer = Layer::new(rid, ssrc, track.kind, self.cfg.packet_cache_size, now);
                let i = match replaces {
                    Some(i) => {
                        track.layers[i] = layer;
                        i
                    }
                    None => {
                        track.layers.push(layer);
                        track.layers.len() - 1
                    }
                };
                track.reorder_layers(now);
                i
            }
        };
        let clock = codec.clock_rate();
        let layer = &mut track.layers[layer_idx];
        layer.on_packet(now, packet.payload.len() + 12);
        let ext_seq = layer.seq.extend(u64::from(packet.header.sequence_number));
        let ext_ts = layer.ts.extend(u64::from(packet.header.timestamp));
        let info = inspect_payload(codec, &packet.payload);
        if info.temporal_layer > layer.max_temporal {
            layer.max_temporal = info.temporal_layer.min(3);
        }
        let mut order_changed = false;
        if info.keyframe_start {
            layer.last_keyframe_at = Some(now);
            if let Some(dims) = keyframe_dimensions(codec, &packet.payload)
                && layer.dims != Some(dims)
            {
                layer.dims = Some(dims);
                order_changed = true;
            }
        }
        let capture = layer.capture_time(ext_ts, clock);
        let padding_only = packet.payload.is_empty();
        if let Some(cache) = layer.cache.as_mut()
            && !padding_only
        {
            cache.insert(CachedPacket { ext_seq, ext_ts, marker: packet.header.marker, payload: packet.payload.clone() });
        }
        if order_changed {
            track.reorder_layers(now);
        }
        let meta = PacketMeta {
            source: SourceKey { track: track_id.0, ssrc },
            spatial: track.spatial[layer_idx],
            temporal: info.temporal_layer,
            ext_seq,
            ext_ts,
            marker: packet.header.marker,
            keyframe_start: info.keyframe_start,
            frame_start: info.frame_start,
            layer_sync: info.layer_sync,
            padding_only,
            capture,
            vp8: info.picture_id.map(|picture_id| Vp8Fields {
                picture_id,
                picture_id_15bit: info.picture_id_15bit,
                tl0_pic_idx: info.tl0_pic_idx,
                key_idx: info.key_idx,
            }),
        };

        let kind = track.kind;
        let mut keyframe_layers: Vec<u8> = Vec::new();
        let (mut forwarded, mut forwarded_bytes) = (0u64, 0u64);
        for &(sub_id, dt_id) in &track.subscribers {
            let Some(sub) = self.peers.get_mut(&sub_id) else { continue };
            let Some(dt) = sub.down.get_mut(&dt_id) else { continue };
            let verdict = if sub.state != ConnectionState::Connected || dt.out_pt.is_none() {
                Verdict::Drop(DropReason::NotReady)
            } else if dt.codec != codec {
                Verdict::Drop(DropReason::CodecUnsupported)
            } else {
                dt.forwarder.on_packet(now, &meta)
            };
            if let Some(s) = dt.forwarder.keyframe_wanted()
                && !keyframe_layers.contains(&s)
            {
                keyframe_layers.push(s);
            }
            match verdict {
                Verdict::Forward { ext_seq, ext_ts, marker, vp8 } => {
                    let rewritten = vp8.and_then(|r| warbler_media::vp8::rewrite_descriptor(&packet.payload, r));
                    let payload: &[u8] = rewritten.as_deref().unwrap_or(&packet.payload);
                    if let Some(r) = vp8 {
                        dt.remember_vp8(ext_seq, r);
                    }
                    let out = RtpOut { marker, payload_type: dt.out_pt.unwrap_or_default(), sequence_number: ext_seq as u16, timestamp: ext_ts as u32, ssrc: dt.out_ssrc, padding: false };
                    let mut tx = Tx { outputs: &mut self.outputs, buffers: &mut self.buffers, metrics: &self.metrics };
                    if send_rtp(&mut sub.pc, sub.cc.as_mut(), Some(&mut dt.sender_stats), &mut tx, now, &out, payload, SendKind::Media) {
                        forwarded += 1;
                        forwarded_bytes += payload.len() as u64;
                    } else {
                        self.metrics.dropped(DropReason::WriteFailed).inc();
                    }
                }
                Verdict::Drop(reason) => self.metrics.dropped(reason).inc(),
            }
        }
        if forwarded > 0 {
            match kind {
                MediaKind::Audio => self.metrics.rtp_packets_forwarded_audio.inc_by(forwarded),
                MediaKind::Video => self.metrics.rtp_packets_forwarded_video.inc_by(forwarded),
            }
            self.metrics.rtp_bytes_forwarded.inc_by(forwarded_bytes);
        }
        for s in keyframe_layers {
            self.request_keyframe(now, track_id, s);
        }
    }

    /// Asks a track's publisher for a keyframe on the layer at spatial index `spatial`, at most
    /// once per `keyframe_request_interval` per layer.
    pub(super) fn request_keyframe(&mut self, now: Instant, track_id: TrackId, spatial: u8) {
        let Some(track) = self.tracks.get_mut(&track_id) else { return };
        if track.kind != MediaKind::Video {
            return;
        }
        let Some(i) = track.layer_at_spatial(spatial) else { return };
        let layer = &mut track.layers[i];
        if let Some(last) = layer.last_keyframe_request
            && now.saturating_duration_since(last) < self.cfg.keyframe_request_interval
        {
            self.metrics.keyframe_requests_throttled.inc();
            return;
        }
        layer.last_keyframe_request = Some(now);
        let (peer_id, receiver, ssrc) = (track.peer, track.receiver, layer.ssrc);
        let Some(peer) = self.peers.get_mut(&peer_id) else { return };
        let pli = PictureLossIndication { sender_ssrc: ENGINE_RTCP_SSRC, media_ssrc: ssrc };
        let sent = guarded(&self.metrics, "write pli", || peer.pc.rtp_receiver(receiver).map(|mut r| r.write_rtcp(now, vec![Box::new(pli)])));
        if let Some(Some(Ok(()))) = sent {
            self.metrics.plis_sent.inc();
            self.mark_dirty(peer_id);
        }
    }

    /// RTCP for the engine: from subscribers, NACKs (answered from the cache) and PLI/FIR
    /// (relayed, throttled); from publishers, sender reports (layer timing).
    pub(super) fn on_rtcp(&mut self, now: Instant, peer_id: PeerId, packets: Vec<Box<dyn rtc::rtcp::Packet>>) {
        let Some(peer) = self.peers.get(&peer_id) else { return };
        if peer.role == PeerRole::Publisher {
            for p in &packets {
                if let Some(sr) = p.as_any().downcast_ref::<SenderReport>() {
                    self.on_sender_report(peer_id, sr);
                }
            }
            return;
        }
        self.on_subscriber_feedback(now, peer_id, &packets);
        let Some(peer) = self.peers.get(&peer_id) else { return };
        let mut keyframes: Vec<(TrackId, u8)> = Vec::new();
        let mut nacks: Vec<(DownTrackId, Vec<u16>)> = Vec::new();
        let keyframe_for = |ssrc: u32| -> Option<(TrackId, u8)> {
            let d = peer.down.get(peer.down_by_ssrc.get(&ssrc)?)?;
            Some((d.source_track?, d.forwarder.current_spatial().unwrap_or(0)))
        };
        for p in &packets {
            let any = p.as_any();
            if let Some(nack) = any.downcast_ref::<TransportLayerNack>() {
                if let Some(dt) = peer.down_by_ssrc.get(&nack.media_ssrc) {
                    let seqs: Vec<u16> = nack.nacks.iter().flat_map(|n| n.packet_list()).collect();
                    nacks.push((*dt, seqs));
                }
            } else if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
                self.metrics.plis_received.inc();
                keyframes.extend(keyframe_for(pli.media_ssrc));
            } else if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
                self.metrics.plis_received.inc();
                keyframes.extend(fir.fir.iter().filter_map(|e| keyframe_for(e.ssrc)));
            }
        }
        for (t, s) in keyframes {
            self.request_keyframe(now, t, s);
        }
        for (dt_id, seqs) in nacks {
            self.answer_nack(now, peer_id, dt_id, &seqs);
        }
    }

    fn on_sender_report(&mut self, peer_id: PeerId, sr: &SenderReport) {
        let Some(peer) = self.peers.get(&peer_id) else { return };
        let Some(track) = peer.ssrc_tracks.get(&sr.ssrc).and_then(|t| self.tracks.get_mut(t)) else { return };
        if let Some(layer) = track.layers.iter_mut().find(|l| l.ssrc == sr.ssrc)
            && let Some(rtp_ext) = layer.ts.peek(u64::from(sr.rtp_time))
        {
            layer.sr = Some(SrTiming { ntp_secs: ntp_to_secs(sr.ntp_time), rtp_ext });
        }
    }

    fn answer_nack(&mut self, now: Instant, peer_id: PeerId, dt_id: DownTrackId, seqs: &[u16]) {
        self.metrics.nacks_received.inc_by(seqs.len() as u64);
        let Some(peer) = self.peers.get_mut(&peer_id) else { return };
        // A link already sending well over its estimate gets no repairs on top: they would only
        // deepen the queue that is losing the packets (the NACKs repeat; later ones may be served).
        if let Some(cc) = peer.cc.as_mut()
            && cc.bwe.mode() == crate::bwe::Mode::TransportCc
            && cc.media_bps.bps(now) as f64 > cc.bwe.estimate_bps() * 1.5
        {
            self.metrics.nacks_throttled.inc_by(seqs.len() as u64);
            return;
        }
        let Some(dt) = peer.down.get_mut(&dt_id) else { return };
        // First requests for packets still in the cache are a loss signal for subscribers
        // without transport-cc (old ones asked again and again are not).
        let first_asks: Vec<u16> = seqs.iter().copied().filter(|&s| dt.first_nack(s)).collect();
        let asked = seqs.len();
        let seqs: Vec<u16> = seqs.iter().copied().filter(|&s| dt.allow_retransmission(s, now)).collect();
        self.metrics.nacks_throttled.inc_by((asked - seqs.len()) as u64);
        let dt = &*dt;
        let (Some(track_id), Some(pt)) = (dt.source_track, dt.out_pt) else { return };
        let Some(track) = self.tracks.get(&track_id) else { return };
        let cache_of = |src: SourceKey| track.layers.iter().find(|l| l.ssrc == src.ssrc).and_then(|l| l.cache.as_ref());
        let mut outs = Vec::new();
        let mut lost_known = 0;
        for &seq in &seqs {
            let rtx = dt.forwarder.retransmission(seq, |src, in_seq| cache_of(src)?.get(in_seq).map(|p| p.ext_ts));
            let Some(r) = rtx else {
                self.metrics.dropped(DropReason::NotInCache).inc();
                continue;
            };
            let Some(cached) = cache_of(r.source).and_then(|c| c.get(r.in_ext_seq)) else { continue };
            if first_asks.contains(&seq) {
                lost_known += 1;
            }
            let Some(payload) = dt.resend_payload(r.out_wire_seq, &cached.payload) else {
                self.metrics.dropped(DropReason::NotInCache).inc();
                continue;
            };
            let out = rtp::Packet {
                header: rtp::header::Header {
                    version: 2,
                    marker: cached.marker,
                    payload_type: pt,
                    sequence_number: r.out_wire_seq,
                    timestamp: r.out_ext_ts as u32,
                    ssrc: dt.out_ssrc,
                    ..Default::default()
                },
                payload,
            };
            outs.push(out);
        }
        if let Some(cc) = peer.cc.as_mut() {
            cc.packets_nacked += lost_known;
        }
        let mut tx = Tx { outputs: &mut self.outputs, buffers: &mut self.buffers, metrics: &self.metrics };
        for out in outs {
            // On the RTX stream when the subscriber has one (it is what receivers expect for
            // repairs), else as the original packet again.
            let out = match peer.down.get_mut(&dt_id).and_then(|d| d.rtx_packet(out.clone())) {
                Some(rtx) => rtx,
                None => out,
            };
            if peer.send_packet(now, &mut tx, &out, SendKind::Media) {
                self.metrics.nack_retransmits.inc();
            }
        }
    }
}
