//! The engine's counters and gauges, registered in a Prometheus registry the caller owns.
//!
//! Counters are atomics updated by the engine thread only; label values are resolved once here so
//! the per-packet path never hashes a label.

use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::allocator::PauseReason;

use crate::forwarder::DropReason;

#[derive(Clone)]
pub struct Metrics {
    pub rooms: IntGauge,
    pub participants: IntGauge,
    pub peers: IntGauge,
    pub tracks_audio: IntGauge,
    pub tracks_video: IntGauge,
    pub down_tracks: IntGauge,
    pub udp_datagrams_in: IntCounter,
    pub udp_bytes_in: IntCounter,
    pub udp_datagrams_out: IntCounter,
    pub udp_bytes_out: IntCounter,
    pub udp_send_errors: IntCounter,
    pub udp_gso_sends: IntCounter,
    pub rtp_packets_in_audio: IntCounter,
    pub rtp_packets_in_video: IntCounter,
    pub rtp_bytes_in: IntCounter,
    pub rtp_packets_forwarded_audio: IntCounter,
    pub rtp_packets_forwarded_video: IntCounter,
    pub rtp_bytes_forwarded: IntCounter,
    dropped: Vec<IntCounter>,
    pub nacks_received: IntCounter,
    pub nack_retransmits: IntCounter,
    pub nacks_throttled: IntCounter,
    pub plis_received: IntCounter,
    pub plis_sent: IntCounter,
    pub keyframe_requests_throttled: IntCounter,
    pub peers_timed_out: IntCounter,
    pub active_speaker_changes: IntCounter,
    pub engine_panics_caught: IntCounter,
    pub data_messages_in: IntCounter,
    pub data_messages_out: IntCounter,
    pub data_messages_dropped: IntCounter,
    pub probes: IntCounter,
    pub probe_packets: IntCounter,
    pub sender_reports: IntCounter,
    pub layer_activity_changes: IntCounter,
    estimate: GaugeVec,
    /// Per subscriber and track: spatial layer (`which` = target / current; -1 = none).
    track_layer: IntGaugeVec,
    track_switches: IntGaugeVec,
    /// 1 for the reason a subscriber's track is paused; absent while it flows.
    track_paused: IntGaugeVec,
    pauses: IntCounterVec,
}

/// What the allocator last decided for one track of one subscriber, for `/metrics`.
pub struct DownTrackState {
    pub target: Option<u8>,
    pub current: Option<u8>,
    pub switches: u64,
    pub pause: Option<PauseReason>,
}

impl Metrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            r.register(Box::new(g.clone()))?;
            Ok(g)
        }
        fn counter(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            r.register(Box::new(c.clone()))?;
            Ok(c)
        }
        fn counter_vec(r: &Registry, name: &str, help: &str, label: &str) -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
            r.register(Box::new(c.clone()))?;
            Ok(c)
        }
        let tracks = IntGauge::new("warbler_tracks_audio", "Published audio tracks")?;
        r_register(registry, &tracks)?;
        let tracks_video = IntGauge::new("warbler_tracks_video", "Published video tracks")?;
        r_register(registry, &tracks_video)?;
        let rtp_in = counter_vec(registry, "warbler_rtp_packets_in_total", "RTP packets received from publishers", "kind")?;
        let rtp_fwd = counter_vec(registry, "warbler_rtp_packets_forwarded_total", "RTP packets forwarded to subscribers", "kind")?;
        let dropped_vec = counter_vec(registry, "warbler_packets_dropped_total", "Packets not forwarded, by reason", "reason")?;
        let dropped = DropReason::ALL
            .iter()
            .map(|r| dropped_vec.with_label_values(&[r.as_str()]))
            .collect();
        Ok(Self {
            rooms: gauge(registry, "warbler_rooms", "Rooms with at least one participant")?,
            participants: gauge(registry, "warbler_participants", "Participants in all rooms")?,
            peers: gauge(registry, "warbler_peer_connections", "Peer connections")?,
            tracks_audio: tracks,
            tracks_video,
            down_tracks: gauge(registry, "warbler_down_tracks", "Tracks being sent to subscribers")?,
            udp_datagrams_in: counter(registry, "warbler_udp_datagrams_in_total", "Datagrams received on the RTC port")?,
            udp_bytes_in: counter(registry, "warbler_udp_bytes_in_total", "Bytes received on the RTC port")?,
            udp_datagrams_out: counter(registry, "warbler_udp_datagrams_out_total", "Datagrams sent from the RTC port")?,
            udp_bytes_out: counter(registry, "warbler_udp_bytes_out_total", "Bytes sent from the RTC port")?,
            udp_send_errors: counter(registry, "warbler_udp_send_errors_total", "Datagrams the kernel refused")?,
            udp_gso_sends: counter(registry, "warbler_udp_gso_sends_total", "Sends that carried several datagrams to one address (UDP GSO)")?,
            rtp_packets_in_audio: rtp_in.with_label_values(&["audio"]),
            rtp_packets_in_video: rtp_in.with_label_values(&["video"]),
            rtp_bytes_in: counter(registry, "warbler_rtp_bytes_in_total", "RTP payload bytes received from publishers")?,
            rtp_packets_forwarded_audio: rtp_fwd.with_label_values(&["audio"]),
            rtp_packets_forwarded_video: rtp_fwd.with_label_values(&["video"]),
            rtp_bytes_forwarded: counter(registry, "warbler_rtp_bytes_forwarded_total", "RTP payload bytes forwarded")?,
            dropped,
            nacks_received: counter(registry, "warbler_nacks_received_total", "Sequence numbers NACKed by subscribers")?,
            nack_retransmits: counter(registry, "warbler_nacks_served_total", "Packets retransmitted from the cache in answer to NACKs")?,
            nacks_throttled: counter(registry, "warbler_nacks_throttled_total", "NACKed packets not resent because they were resent very recently or too often")?,
            plis_received: counter(registry, "warbler_plis_received_total", "PLI/FIR received from subscribers")?,
            plis_sent: counter(registry, "warbler_plis_sent_total", "PLI sent to publishers")?,
            keyframe_requests_throttled: counter(registry, "warbler_keyframe_requests_throttled_total", "Keyframe requests not sent because one was sent recently")?,
            peers_timed_out: counter(registry, "warbler_peers_timed_out_total", "Peer connections removed after losing ICE consent")?,
            active_speaker_changes: counter(registry, "warbler_active_speaker_changes_total", "Times a room's set or order of active speakers changed (each one announced)")?,
            engine_panics_caught: counter(registry, "warbler_engine_panics_caught_total", "Panics inside the WebRTC stack caught and isolated to one peer")?,
            data_messages_in: counter(registry, "warbler_data_messages_in_total", "Data channel messages received from clients")?,
            data_messages_out: counter(registry, "warbler_data_messages_out_total", "Data channel messages sent to clients")?,
            data_messages_dropped: counter(registry, "warbler_data_messages_dropped_total", "Data channel messages not delivered (oversized, unknown channel, slow reader)")?,
            probes: counter(registry, "warbler_bwe_probes_total", "Bandwidth probe clusters started towards subscribers")?,
            probe_packets: counter(registry, "warbler_bwe_probe_packets_total", "Packets sent as bandwidth probes")?,
            sender_reports: counter(registry, "warbler_rtcp_sender_reports_total", "RTCP sender reports sent to subscribers")?,
            layer_activity_changes: counter(registry, "warbler_layer_activity_changes_total", "Times publishers were told to pause or resume simulcast layers")?,
            estimate: {
                let g = GaugeVec::new(Opts::new("warbler_subscriber_estimate_bps", "Estimated downlink bandwidth per subscriber"), &["participant"])?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            track_layer: {
                let g = IntGaugeVec::new(Opts::new("warbler_subscriber_track_layer", "Spatial layer sent to a subscriber per track (target, current; -1 none)"), &["participant", "track", "which"])?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            track_switches: {
                let g = IntGaugeVec::new(Opts::new("warbler_subscriber_track_layer_switches", "Layer switches made for a subscriber's track since it was subscribed"), &["participant", "track"])?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            track_paused: {
                let g = IntGaugeVec::new(Opts::new("warbler_subscriber_track_paused", "1 while a subscriber's track is paused, labelled with why"), &["participant", "track", "reason"])?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            pauses: {
                let c = IntCounterVec::new(Opts::new("warbler_track_pauses_total", "Subscriber tracks paused by the allocator, by reason"), &["reason"])?;
                registry.register(Box::new(c.clone()))?;
                c
            },
        })
    }

    pub fn set_down_track(&self, participant: &str, track: &str, state: &DownTrackState) {
        let layer = |l: Option<u8>| l.map_or(-1, i64::from);
        self.track_layer.with_label_values(&[participant, track, "target"]).set(layer(state.target));
        self.track_layer.with_label_values(&[participant, track, "current"]).set(layer(state.current));
        self.track_switches.with_label_values(&[participant, track]).set(state.switches as i64);
        for reason in PauseReason::ALL {
            if Some(reason) == state.pause {
                self.track_paused.with_label_values(&[participant, track, reason.as_str()]).set(1);
            } else {
                let _ = self.track_paused.remove_label_values(&[participant, track, reason.as_str()]);
            }
        }
    }

    pub fn track_paused(&self, reason: PauseReason) {
        self.pauses.with_label_values(&[reason.as_str()]).inc();
    }

    pub fn forget_down_track(&self, participant: &str, track: &str) {
        for which in ["target", "current"] {
            let _ = self.track_layer.remove_label_values(&[participant, track, which]);
        }
        let _ = self.track_switches.remove_label_values(&[participant, track]);
        for reason in PauseReason::ALL {
            let _ = self.track_paused.remove_label_values(&[participant, track, reason.as_str()]);
        }
    }

    pub fn set_estimate(&self, participant: &str, bps: f64) {
        self.estimate.with_label_values(&[participant]).set(bps);
    }

    pub fn forget_participant(&self, participant: &str) {
        let _ = self.estimate.remove_label_values(&[participant]);
    }

    /// A private registry (tests, tools).
    pub fn unregistered() -> Self {
        Self::new(&Registry::new()).expect("a fresh registry has no name clashes")
    }

    pub fn dropped(&self, reason: DropReason) -> &IntCounter {
        // `ALL` lists the reasons in declaration order, so the discriminant is the index.
        &self.dropped[reason as usize]
    }
}

fn r_register(registry: &Registry, g: &IntGauge) -> prometheus::Result<()> {
    registry.register(Box::new(g.clone()))
}
