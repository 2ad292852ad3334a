//! Per-subscriber congestion control in the engine: stamping outgoing packets (transport-wide
//! sequence number, abs-send-time), feeding the bandwidth estimator from the subscriber's
//! feedback, running the allocator on a tick and applying its targets to the forwarders, probing
//! with duplicate packets when a higher layer might fit, telling subscribers why a track is
//! paused, and telling publishers which simulcast layers nobody needs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::rtp;
use warbler_media::MediaKind;

use super::rtp_out::{RtpOut, Stamp, Tx, send_rtp};
use super::{DownTrackId, Engine, Peer};
use crate::allocator::{LayerOption, Priority, VideoDemand, allocate};
use crate::api::{ParticipantEvent, TrackSource};
use crate::bwe::{Estimator, Mode, ProbeOutcome};
use crate::forwarder::Target;
use crate::ids::{PeerId, PeerRole, TrackId};

/// How often allocations are recomputed.
pub(super) const ALLOCATION_INTERVAL: Duration = Duration::from_millis(200);
/// Tick while a probe is being paced out.
pub(super) const PROBE_TICK: Duration = Duration::from_millis(10);
/// Wait between probes: after a success, after a failure.
const PROBE_AFTER_SUCCESS: Duration = Duration::from_millis(500);
/// How often NACKs are turned into a loss sample (subscribers without transport-cc).
const LOSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(1000);
/// After a failed probe, this long times the failures in a row (at most 2).
const PROBE_AFTER_FAILURE: Duration = Duration::from_millis(1500);
/// Most failures in a row the wait after a failure grows with.
const PROBE_BACKOFF_STEPS: u32 = 1;
/// What a padding-only probe packet costs on the wire (RTP header, extensions, padding, SRTP tag,
/// UDP/IP).
const PADDING_PACKET_BYTES: i64 = 70;
/// A layer nobody needed for this long is paused at the publisher.
const LAYER_UNNEEDED_GRACE: Duration = Duration::from_secs(5);
/// How often each outgoing stream gets a sender report (as the stack's interceptor did).
pub(super) const SENDER_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// What a subscriber said about how it shows one track.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackSettings {
    /// Displayed size in CSS pixels × device pixel ratio; `None`: unknown.
    pub display: Option<(u16, u16)>,
    pub visible: bool,
    pub pinned: bool,
}

impl Default for TrackSettings {
    fn default() -> Self {
        Self { display: None, visible: true, pinned: false }
    }
}

/// Congestion-control state of one subscriber connection.
pub(super) struct SubscriberCc {
    pub bwe: Estimator,
    pub twcc_ext: Option<u8>,
    pub abs_send_time_ext: Option<u8>,
    epoch: Instant,
    next_probe_at: Instant,
    /// Down track whose recent packets are resent as probe padding, and the next offset back.
    probe_cursor: u16,
    pub media_bps: crate::track::RateMeter,
    /// Probes failed in a row (backs off the next one), and whether the last one succeeded
    /// (the next may then aim higher).
    probe_failures: u32,
    last_probe_succeeded: bool,
    /// Since the last loss sample: media packets sent, and packets NACKed for the first time.
    pub packets_sent: usize,
    pub packets_nacked: usize,
    next_loss_sample: Instant,
    /// Without transport-cc (REMB): total rate to pad up to while more is wanted, so the
    /// receiver's estimate (bounded by what it receives) can grow; and when padding last ran.
    remb_pad_bps: f64,
    last_pad_at: Instant,
    /// When this connection's next sender reports are due (from its first packet on).
    pub next_sender_report: Option<Instant>,
}

impl SubscriberCc {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            bwe: Estimator::default(),
            twcc_ext: None,
            abs_send_time_ext: None,
            epoch: now,
            next_probe_at: now + Duration::from_secs(1),
            probe_cursor: 0,
            media_bps: Default::default(),
            probe_failures: 0,
            last_probe_succeeded: false,
            packets_sent: 0,
            packets_nacked: 0,
            next_loss_sample: now + LOSS_SAMPLE_INTERVAL,
            remb_pad_bps: 0.0,
            last_pad_at: now,
            next_sender_report: None,
        }
    }

    /// This connection's header extension values for a packet about to be sent, recording the
    /// packet for the estimator (and, for media, the sent rate).
    pub(super) fn stamp(&mut self, now: Instant, ssrc: u32, seq: u16, size: usize, kind: SendKind) -> Stamp {
        let mut stamp = Stamp::default();
        if let Some(id) = self.twcc_ext {
            stamp.twcc = Some((id, self.bwe.on_sent(now, ssrc, seq, size)));
        }
        if let Some(id) = self.abs_send_time_ext {
            // 6.18 fixed-point seconds; any consistent clock will do for the receiver's deltas.
            let t = now.saturating_duration_since(self.epoch).as_secs_f64();
            stamp.abs_send_time = Some((id, ((t * f64::from(1u32 << 18)) as u64 & 0x00ff_ffff) as u32));
        }
        if kind == SendKind::Media {
            self.media_bps.add(now, size);
            self.packets_sent += 1;
        }
        if self.next_sender_report.is_none() {
            self.next_sender_report = Some(now + SENDER_REPORT_INTERVAL);
        }
        stamp
    }
}

/// What a packet written to a subscriber is: probes are paced on top of the media rate, so they
/// are not counted in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SendKind {
    Media,
    Probe,
}

impl Peer {
    /// Writes an RTP packet to this subscriber connection (probes and repairs; the forwarding
    /// path calls [`send_rtp`] with the down track it already holds). Returns whether a datagram
    /// was produced.
    pub(super) fn send_packet(&mut self, now: Instant, tx: &mut Tx<'_>, packet: &rtp::Packet, kind: SendKind) -> bool {
        let ssrc = packet.header.ssrc;
        let sr = self.down_by_ssrc.get(&ssrc).and_then(|id| self.down.get_mut(id)).filter(|d| d.out_ssrc == ssrc).map(|d| &mut d.sender_stats);
        send_rtp(&mut self.pc, self.cc.as_mut(), sr, tx, now, &RtpOut::of(&packet.header), &packet.payload, kind)
    }

    /// Learns the header extension ids the subscriber accepted.
    pub(super) fn refresh_extension_ids(&mut self) {
        let Some(cc) = self.cc.as_mut() else { return };
        let sender = self.down.values().next().map(|d| d.sender);
        let Some(params) = sender.and_then(|s| self.pc.rtp_sender(s)).map(|mut s| s.get_parameters().rtp_parameters.header_extensions.clone()) else { return };
        cc.twcc_ext = params.iter().find(|e| e.uri == crate::rtc_setup::URI_TRANSPORT_CC).map(|e| e.id as u8);
        cc.abs_send_time_ext = params.iter().find(|e| e.uri == crate::rtc_setup::URI_ABS_SEND_TIME).map(|e| e.id as u8);
    }
}

impl Engine {
    /// Transport-wide feedback, REMB and receiver reports from a subscriber.
    pub(super) fn on_subscriber_feedback(&mut self, now: Instant, peer_id: PeerId, packets: &[Box<dyn rtc::rtcp::Packet>]) {
        let Some(peer) = self.peers.get_mut(&peer_id) else { return };
        let own: Vec<u32> = peer.down.values().map(|d| d.out_ssrc).collect();
        let Some(cc) = peer.cc.as_mut() else { return };
        for p in packets {
            let any = p.as_any();
            if let Some(fb) = any.downcast_ref::<TransportLayerCc>() {
                cc.bwe.on_twcc(now, fb);
            } else if let Some(remb) = any.downcast_ref::<ReceiverEstimatedMaximumBitrate>() {
                cc.bwe.on_remb(now, f64::from(remb.bitrate));
            } else if let Some(rr) = any.downcast_ref::<ReceiverReport>() {
                // The worst loss among our streams (video dominates the bandwidth).
                if let Some(loss) = rr.reports.iter().filter(|r| own.contains(&r.ssrc)).map(|r| r.fraction_lost).max() {
                    cc.bwe.on_receiver_report(now, loss);
                }
            }
        }
    }

    /// The media tick: allocation for every subscriber connection, probes, layer activity.
    pub(super) fn media_tick(&mut self, now: Instant) {
        self.send_sender_reports(now);
        let mut probing = false;
        let subscriber_peers: Vec<PeerId> = self.peers.values().filter(|p| p.cc.is_some()).map(|p| p.id).collect();
        let allocate_now = now >= self.next_allocation;
        if allocate_now {
            self.next_allocation = now + ALLOCATION_INTERVAL;
        }
        for peer_id in subscriber_peers {
            if allocate_now {
                self.allocate_peer(now, peer_id);
            }
            probing |= self.pace_probe(now, peer_id);
        }
        if allocate_now {
            self.update_layer_activity(now);
        }
        self.next_media_tick = now + if probing { PROBE_TICK } else { ALLOCATION_INTERVAL };
    }

    fn allocate_peer(&mut self, now: Instant, peer_id: PeerId) {
        let Some(peer) = self.peers.get_mut(&peer_id) else { return };
        let participant = peer.participant;
        let Some(cc) = peer.cc.as_mut() else { return };
        cc.bwe.on_tick(now);
        if now >= cc.next_loss_sample {
            cc.bwe.on_nack_loss(now, cc.packets_nacked, cc.packets_sent);
            cc.packets_nacked = 0;
            cc.packets_sent = 0;
            cc.next_loss_sample = now + LOSS_SAMPLE_INTERVAL;
        }
        let outcome = cc.bwe.take_probe_outcome();
        if let Some(o) = outcome {
            tracing::debug!(participant = %participant, outcome = ?o, estimate = cc.bwe.estimate_bps(), "probe finished");
        }
        match outcome {
            Some(ProbeOutcome::Succeeded(_)) => {
                cc.next_probe_at = now + PROBE_AFTER_SUCCESS;
                cc.probe_failures = 0;
                cc.last_probe_succeeded = true;
            }
            Some(ProbeOutcome::Failed) => {
                cc.probe_failures += 1;
                cc.next_probe_at = now + PROBE_AFTER_FAILURE * cc.probe_failures.min(PROBE_BACKOFF_STEPS);
                cc.last_probe_succeeded = false;
            }
            None => {}
        }
        let estimate = cc.bwe.estimate_bps();
        let mode = cc.bwe.mode();
        self.metrics.set_estimate(&participant.to_string(), estimate);
        // The room's dominant speaker's camera ranks above other cameras.
        let dominant = self.participants.get(&participant).and_then(|p| self.rooms.get(&p.room)).and_then(|r| r.speakers.dominant());
        // Demands: every video down track fed by a track, described by its layers.
        let mut demands = Vec::new();
        let mut audio_bps = 0u64;
        for (dt_id, d) in &peer.down {
            let Some(track) = d.source_track.and_then(|t| self.tracks.get_mut(&t)) else { continue };
            if track.kind == MediaKind::Audio {
                audio_bps += track.layers.iter_mut().map(|l| l.rate.bps(now)).sum::<u64>().max(40_000);
                continue;
            }
            if track.muted {
                continue;
            }
            let mut layers: Vec<LayerOption> = track
                .layers
                .iter_mut()
                .enumerate()
                .map(|(i, l)| {
                    let bps = l.planning_bps(now);
                    LayerOption {
                        spatial: track.spatial.get(i).copied().unwrap_or(0),
                        dims: l.dims,
                        bps,
                        available: l.active(now) || l.paused_by_us,
                        temporal_layers: l.max_temporal + 1,
                    }
                })
                .collect();
            layers.sort_by_key(|l| l.spatial);
            let priority = if d.settings.pinned {
                Priority::Pinned
            } else if track.source == TrackSource::ScreenShare {
                Priority::ScreenShare
            } else if Some(track.owner) == dominant && track.source == TrackSource::Camera {
                Priority::Speaker
            } else {
                Priority::Normal
            };
            demands.push(VideoDemand {
                id: dt_id.0,
                priority,
                layers,
                display: d.settings.display,
                visible: d.settings.visible,
                current: d.forwarder.target().map(|t| (t.spatial, t.temporal)),
            });
        }
        if demands.is_empty() {
            return;
        }
        // Before any feedback, do not restrict: browsers start fine and the first feedback comes
        // within a second. Without any feedback mechanism at all, loss-based (Mode::LossOnly).
        let budget = match mode {
            Mode::Initial => u64::MAX / 4,
            Mode::TransportCc => estimate as u64,
            // Without transport-cc there is no probing to find the way back from a pause, and
            // the receiver's own estimate (REMB) falls when nothing arrives: keep the lowest
            // layers flowing.
            Mode::Remb | Mode::LossOnly => {
                let floor: u64 = demands
                    .iter()
                    .filter(|d| d.visible)
                    .filter_map(|d| d.layers.iter().filter(|l| l.available && l.bps > 0).map(|l| l.bps).min())
                    .sum();
                (estimate as u64).max(audio_bps + floor)
            }
        };
        let allocations = allocate(budget, audio_bps, &demands);
        let mut wants_more: Option<u64> = None;
        let mut wanted_total = audio_bps;
        let mut events = Vec::new();
        let mut total = audio_bps;
        for a in allocations {
            let Some(d) = peer.down.get_mut(&DownTrackId(a.id)) else { continue };
            let target = a.target.map(|(s, t)| Target { spatial: s, temporal: t });
            if d.forwarder.target() != target {
                tracing::debug!(participant = %participant, track = ?d.source_track, estimate, from = ?d.forwarder.target(), to = ?target, current = ?d.forwarder.current_spatial(), "layer target");
                d.forwarder.set_target(target);
            }
            total += a.bps;
            wanted_total += a.wanted_bps;
            if let Some(next) = a.next_bps {
                let extra = next.saturating_sub(a.bps);
                wants_more = Some(wants_more.map_or(extra, |w| w.min(extra)));
            }
            // A track whose media has not arrived yet is not "paused": the subscriber is told
            // only about a feed that stops after it flowed.
            let not_started = a.pause == Some(crate::allocator::PauseReason::FeedDry) && d.pause.is_none() && d.forwarder.current_spatial().is_none();
            if d.pause != a.pause
                && !not_started
                && let Some(track) = d.source_track
            {
                events.push(match a.pause {
                    Some(reason) => ParticipantEvent::TrackPaused { track, reason },
                    None => ParticipantEvent::TrackResumed { track },
                });
                if let Some(reason) = a.pause {
                    self.metrics.track_paused(reason);
                }
                d.pause = a.pause;
            }
            if let Some(track) = d.source_track {
                let state = crate::metrics::DownTrackState { target: target.map(|t| t.spatial), current: d.forwarder.current_spatial(), switches: d.forwarder.switches(), pause: d.pause };
                self.metrics.set_down_track(&participant.to_string(), &track.to_string(), &state);
            }
        }
        let mut probe_target = None;
        if let (Some(extra), Some(cc)) = (wants_more, peer.cc.as_mut())
            && mode == Mode::TransportCc
            && now >= cc.next_probe_at
            && !cc.bwe.probing()
        {
            // Aim for everything the subscriber could use (not just the next step, so a freed
            // link is found in a few probes), with headroom, but at most 1.5× the estimate (2×
            // right after a probe succeeded): a probe that overshoots a bottleneck by more fills
            // its queue and costs media.
            let reach = if cc.last_probe_succeeded { 2.0 } else { 1.5 };
            let goal = wanted_total.max(total + extra) as f64 * 1.15;
            let mut target = goal.min(estimate * reach).max(estimate * 1.2);
            if total <= audio_bps {
                // All video is paused: aim straight for the lowest layer so it can come back.
                target = target.max((total + extra) as f64 * 1.2);
            }
            cc.bwe.start_probe(now, target);
            cc.next_probe_at = now + PROBE_AFTER_FAILURE;
            probe_target = Some(target);
        }
        // REMB: no probe clusters (the receiver does not say when each packet arrived), but
        // its estimate is bounded by what it receives, so pad a little above the estimate while
        // more is wanted and nothing is being lost.
        if let Some(cc) = peer.cc.as_mut() {
            let pad = match wants_more {
                Some(extra) if mode == Mode::Remb && cc.bwe.loss() < 0.02 => (estimate * 1.25).min(wanted_total.max(total + extra) as f64 * 1.1),
                _ => 0.0,
            };
            if pad > 0.0 && cc.remb_pad_bps == 0.0 {
                cc.last_pad_at = now;
                self.next_media_tick = now;
            }
            cc.remb_pad_bps = pad;
        }
        if let Some(t) = probe_target {
            tracing::debug!(participant = %participant, estimate, target = t, "probing");
            self.metrics.probes.inc();
            self.next_media_tick = now;
        }
        for ev in events {
            self.emit(participant, ev);
        }
    }

    /// Sends the probe bytes due now. On a video down track's RTX stream: copies of recently
    /// forwarded packets (real size; receivers discard them as already received, after counting
    /// them for congestion feedback), or RTX padding while the video is paused. Without RTX:
    /// padding-only packets numbered into the video stream.
    fn pace_probe(&mut self, now: Instant, peer_id: PeerId) -> bool {
        let Some(peer) = self.peers.get_mut(&peer_id) else { return false };
        let Some(cc) = peer.cc.as_mut() else { return false };
        let media = cc.media_bps.bps(now) as f64;
        let mut due = if cc.bwe.probing() {
            cc.bwe.probe_bytes_due(now, media) as i64
        } else if cc.remb_pad_bps > 0.0 {
            let dt = now.saturating_duration_since(cc.last_pad_at).as_secs_f64().min(0.1);
            cc.last_pad_at = now;
            ((cc.remb_pad_bps - media).max(0.0) * dt / 8.0) as i64
        } else {
            return false;
        };
        let mut cursor = cc.probe_cursor;
        let mut outs: Vec<rtp::Packet> = Vec::new();
        let video: Vec<DownTrackId> = peer.down.iter().filter(|(_, d)| d.kind == MediaKind::Video && d.out_pt.is_some()).map(|(id, _)| *id).collect();
        // Copies of recent packets, on the RTX stream of a forwarding down track.
        for dt_id in &video {
            let Some(d) = peer.down.get(dt_id) else { continue };
            if d.rtx_pt.is_none() || d.forwarder.current_spatial().is_none() {
                continue;
            }
            let (Some(track), Some(pt)) = (d.source_track.and_then(|t| self.tracks.get(&t)), d.out_pt) else { continue };
            let last = d.forwarder.last_out_seq() as u16;
            let mut copies = Vec::new();
            let mut tries = 0;
            while due > 0 && tries < 64 {
                tries += 1;
                let seq = last.wrapping_sub(cursor % 32);
                cursor = cursor.wrapping_add(1);
                let cache_of = |ssrc: u32| track.layers.iter().find(|l| l.ssrc == ssrc).and_then(|l| l.cache.as_ref());
                let Some(r) = d.forwarder.retransmission(seq, |src, in_seq| cache_of(src.ssrc)?.get(in_seq).map(|p| p.ext_ts)) else { continue };
                let Some(cached) = cache_of(r.source.ssrc).and_then(|c| c.get(r.in_ext_seq)) else { continue };
                let Some(payload) = d.resend_payload(seq, &cached.payload) else { continue };
                due -= payload.len() as i64 + 60;
                copies.push(rtp::Packet {
                    header: rtp::header::Header { version: 2, marker: cached.marker, payload_type: pt, sequence_number: seq, timestamp: r.out_ext_ts as u32, ssrc: d.out_ssrc, ..Default::default() },
                    payload,
                });
            }
            if let Some(d) = peer.down.get_mut(dt_id) {
                outs.extend(copies.into_iter().filter_map(|p| d.rtx_packet(p)));
            }
            if due <= 0 {
                break;
            }
        }
        // Nothing to copy (paused, or no RTX): padding.
        if due > 0
            && let Some(dt_id) = video.first()
            && let Some(d) = peer.down.get_mut(dt_id)
        {
            let pt = d.out_pt.unwrap_or_default();
            while due > 0 && outs.len() < 256 {
                due -= PADDING_PACKET_BYTES;
                let padding = if d.rtx_pt.is_some() {
                    let original = rtp::Packet { header: rtp::header::Header { version: 2, ..Default::default() }, payload: Bytes::new() };
                    d.rtx_packet(original).map(|mut p| {
                        p.payload = Bytes::new();
                        p.header.padding = true;
                        p
                    })
                } else {
                    None
                };
                outs.push(match padding {
                    Some(p) => p,
                    None => {
                        let (seq, ts) = d.forwarder.insert_padding_paused();
                        rtp::Packet {
                            header: rtp::header::Header { version: 2, padding: true, payload_type: pt, sequence_number: seq as u16, timestamp: ts as u32, ssrc: d.out_ssrc, ..Default::default() },
                            payload: Bytes::new(),
                        }
                    }
                });
            }
        }
        let mut tx = Tx { outputs: &mut self.outputs, buffers: &mut self.buffers, metrics: &self.metrics };
        for out in outs {
            if peer.send_packet(now, &mut tx, &out, SendKind::Probe) {
                self.metrics.probe_packets.inc();
            }
        }
        if let Some(cc) = peer.cc.as_mut() {
            cc.probe_cursor = cursor;
        }
        true
    }

    /// Tells publishers which simulcast layers somebody needs; unneeded ones are paused (after a
    /// grace period), needed ones resumed at once. The lowest layer always stays on so a new
    /// subscriber starts fast.
    fn update_layer_activity(&mut self, now: Instant) {
        let mut needed: HashMap<TrackId, Vec<u8>> = HashMap::new();
        for peer in self.peers.values() {
            for d in peer.down.values() {
                let Some(t) = d.source_track else { continue };
                let e = needed.entry(t).or_default();
                if let Some(c) = d.forwarder.current_spatial() {
                    e.push(c);
                }
                if let Some(tg) = d.forwarder.target() {
                    e.push(tg.spatial);
                }
            }
        }
        let mut notices = Vec::new();
        for (id, track) in self.tracks.iter_mut() {
            if track.kind != MediaKind::Video || track.layers.len() < 2 || track.layers.iter().any(|l| l.rid.is_none()) {
                continue;
            }
            let wanted = needed.get(id).cloned().unwrap_or_default();
            let top = (track.layers.len() - 1) as u8;
            let mut changed = false;
            for (i, layer) in track.layers.iter_mut().enumerate() {
                let spatial = track.spatial.get(i).copied().unwrap_or(0);
                let is_needed = spatial == 0 || wanted.iter().any(|&w| w.min(top) == spatial);
                if is_needed {
                    layer.last_needed_at = now;
                    if layer.paused_by_us {
                        layer.paused_by_us = false;
                        changed = true;
                    }
                } else if !layer.paused_by_us && now.saturating_duration_since(layer.last_needed_at) > LAYER_UNNEEDED_GRACE {
                    layer.paused_by_us = true;
                    changed = true;
                }
            }
            if changed {
                let layers: Vec<(String, bool)> = track.layers.iter().filter_map(|l| Some((l.rid.clone()?, !l.paused_by_us))).collect();
                notices.push((track.owner, *id, layers));
            }
        }
        for (owner, track, layers) in notices {
            self.metrics.layer_activity_changes.inc();
            self.emit(owner, ParticipantEvent::LayerActivity { track, layers });
        }
    }

    /// A subscriber's display settings for one of its tracks.
    pub fn set_track_settings(&mut self, now: Instant, id: crate::ids::ParticipantId, track: TrackId, settings: TrackSettings) -> Result<(), crate::api::EngineError> {
        let peer_id = self.participants.get(&id).and_then(|p| p.subscriber).ok_or(crate::api::EngineError::UnknownTrack)?;
        let peer = self.peers.get_mut(&peer_id).ok_or(crate::api::EngineError::UnknownTrack)?;
        let d = peer.down.values_mut().find(|d| d.source_track == Some(track)).ok_or(crate::api::EngineError::UnknownTrack)?;
        d.settings = settings;
        // Re-allocate soon so a newly visible or enlarged tile gets its layer quickly.
        self.next_allocation = self.next_allocation.min(now);
        self.next_media_tick = self.next_media_tick.min(now);
        Ok(())
    }
}

pub(super) fn is_subscriber_role(role: PeerRole) -> bool {
    matches!(role, PeerRole::Subscriber | PeerRole::Whep)
}
