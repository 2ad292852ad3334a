//! Send-side bandwidth estimation towards one subscriber, sans-IO.
//!
//! With transport-wide congestion control (the subscriber reports arrival times of every packet
//! by transport sequence number): a trendline delay-gradient detector (as in Google congestion
//! control: 5 ms send bursts → accumulated, smoothed one-way delay variation → least-squares
//! slope over the last 20 groups → adaptive threshold) drives an AIMD controller capped by 1.5×
//! the acknowledged rate; a loss-based bound takes over when more than 10% is lost. (webrtc-rs
//! 0.21's GCC port compares the raw per-group Kalman gradient with the threshold, which misses a
//! 25% overload entirely; see the tests. Its TWCC feedback parsing and send history are used.) Probing finds out whether more would fit: the engine sends extra
//! packets at a probe rate for a short cluster; if they came back at that rate without the
//! detector seeing overuse, the estimate jumps there.
//!
//! Without transport-cc (e.g. aiortc): the subscriber's REMB is the estimate, and receiver-report
//! loss adjusts it; with neither, loss alone does.

use std::time::{Duration, Instant};

use std::collections::VecDeque;

use rtc::interceptor::{History, PacketReport, convert_twcc};
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;

pub const MIN_BPS: f64 = 50_000.0;
pub const MAX_BPS: f64 = 20_000_000.0;
/// Start here, then probe up (a 180p layer and audio fit).
pub const INITIAL_BPS: f64 = 1_000_000.0;

const DECREASE_FACTOR: f64 = 0.85;
const INCREASE_PER_SECOND: f64 = 1.08;
const RATE_CONTROL_INTERVAL: Duration = Duration::from_millis(200);
/// The delay-based estimate may not run ahead of what the path has carried by more than this.
const ACKED_HEADROOM: f64 = 1.5;
const HIGH_LOSS: f64 = 0.10;

/// The loss-based bound moves at most this often (GCC: once per RTT + 300 ms).
const LOSS_INTERVAL: Duration = Duration::from_millis(500);
const PROBE_DURATION: Duration = Duration::from_millis(250);
/// A probe above a rate where the path recently congested runs this long and is judged on its
/// second half: a token bucket (`tc tbf`, many access links) lets a short burst through at any
/// rate, so only a sustained probe tells its real rate.
const LONG_PROBE_DURATION: Duration = Duration::from_millis(1000);
/// How long the rate at which the path congested is remembered.
const CEILING_MEMORY: Duration = Duration::from_secs(60);
/// Packets sent this soon after a probe still meet the queue the probe built.
const PROBE_LOSS_GRACE: Duration = Duration::from_millis(300);
/// A probe's packets must be reported within this long after it ends, or it failed.
const PROBE_RESULT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Feedback this stale means TWCC stopped (or never started).
const FEEDBACK_STALE: Duration = Duration::from_secs(2);

/// What the delay detector concludes about the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Normal,
    /// Queues are building: send less.
    Over,
    /// Queues are draining: hold.
    Under,
}

/// Packets sent within this long of a group's first packet belong to the group (a burst).
const BURST: Duration = Duration::from_millis(5);
const TREND_WINDOW: usize = 20;
const TREND_SMOOTHING: f64 = 0.9;
const TREND_GAIN: f64 = 4.0;
const OVERUSE_TIME_MS: f64 = 10.0;

#[derive(Clone, Copy, Debug)]
struct Group {
    first_send: Instant,
    last_send: Instant,
    last_arrival: Duration,
}

/// Delay-gradient trend of packet groups and the overuse decision on it.
#[derive(Debug)]
pub struct Trendline {
    current: Option<Group>,
    previous: Option<Group>,
    accumulated_ms: f64,
    smoothed_ms: f64,
    /// (arrival ms since the first group, smoothed delay ms)
    points: VecDeque<(f64, f64)>,
    first_arrival: Option<Duration>,
    deltas: u32,
    threshold_ms: f64,
    last_threshold_update: Option<Duration>,
    prev_trend: f64,
    over_since_ms: Option<f64>,
    over_count: u32,
    usage: Usage,
}

impl Default for Trendline {
    fn default() -> Self {
        Self {
            current: None,
            previous: None,
            accumulated_ms: 0.0,
            smoothed_ms: 0.0,
            points: VecDeque::new(),
            first_arrival: None,
            deltas: 0,
            threshold_ms: 12.5,
            last_threshold_update: None,
            prev_trend: 0.0,
            over_since_ms: None,
            over_count: 0,
            usage: Usage::Normal,
        }
    }
}

impl Trendline {
    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// Feeds one received packet (send time on our clock, arrival on the receiver's clock).
    pub fn on_packet(&mut self, departure: Instant, arrival: Duration) -> Usage {
        match self.current.as_mut() {
            Some(g) if departure.saturating_duration_since(g.first_send) <= BURST && departure >= g.first_send => {
                g.last_send = g.last_send.max(departure);
                g.last_arrival = g.last_arrival.max(arrival);
                return self.usage;
            }
            Some(g) if departure < g.first_send => return self.usage, // reordered across groups
            _ => {}
        }
        let finished = self.current.replace(Group { first_send: departure, last_send: departure, last_arrival: arrival });
        if let Some(done) = finished {
            if let Some(prev) = self.previous {
                let send_delta = done.last_send.saturating_duration_since(prev.last_send).as_secs_f64() * 1000.0;
                let recv_delta = (done.last_arrival.as_secs_f64() - prev.last_arrival.as_secs_f64()) * 1000.0;
                self.update(recv_delta - send_delta, done.last_arrival);
            }
            self.previous = Some(done);
        }
        self.usage
    }

    fn update(&mut self, delta_ms: f64, arrival: Duration) {
        self.deltas = (self.deltas + 1).min(60);
        self.accumulated_ms += delta_ms;
        self.smoothed_ms = TREND_SMOOTHING * self.smoothed_ms + (1.0 - TREND_SMOOTHING) * self.accumulated_ms;
        let first = *self.first_arrival.get_or_insert(arrival);
        let t_ms = (arrival.as_secs_f64() - first.as_secs_f64()) * 1000.0;
        self.points.push_back((t_ms, self.smoothed_ms));
        if self.points.len() > TREND_WINDOW {
            self.points.pop_front();
        }
        if self.points.len() < TREND_WINDOW {
            return;
        }
        let n = self.points.len() as f64;
        let (mx, my) = self.points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
        let (num, den) = self.points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + (x - mx) * (y - my), b + (x - mx) * (x - mx)));
        let slope = if den > 0.0 { num / den } else { 0.0 };
        let trend = f64::from(self.deltas) * slope * TREND_GAIN;
        self.detect(trend, t_ms);
        self.update_threshold(trend, arrival);
    }

    fn detect(&mut self, trend: f64, t_ms: f64) {
        if trend > self.threshold_ms {
            let since = *self.over_since_ms.get_or_insert(t_ms);
            self.over_count += 1;
            if t_ms - since >= OVERUSE_TIME_MS && self.over_count > 1 && trend >= self.prev_trend {
                self.usage = Usage::Over;
            }
        } else {
            self.over_since_ms = None;
            self.over_count = 0;
            self.usage = if trend < -self.threshold_ms { Usage::Under } else { Usage::Normal };
        }
        self.prev_trend = trend;
    }

    fn update_threshold(&mut self, trend: f64, arrival: Duration) {
        let last = self.last_threshold_update.replace(arrival);
        let Some(last) = last else { return };
        let magnitude = trend.abs();
        if magnitude > self.threshold_ms + 15.0 {
            return; // a spike: do not let it drag the threshold
        }
        let k = if magnitude < self.threshold_ms { 0.039 } else { 0.0087 };
        let dt_ms = ((arrival.as_secs_f64() - last.as_secs_f64()) * 1000.0).clamp(0.0, 100.0);
        self.threshold_ms = (self.threshold_ms + k * (magnitude - self.threshold_ms) * dt_ms).clamp(6.0, 600.0);
    }
}

/// Acknowledged (received) bitrate over the last 500 ms of the receiver's arrival clock.
#[derive(Debug, Default)]
struct AckedRate {
    window: VecDeque<(Duration, usize)>,
    bytes: usize,
}

const ACKED_WINDOW: Duration = Duration::from_millis(500);

impl AckedRate {
    fn add(&mut self, arrival: Duration, size: usize) {
        self.window.push_back((arrival, size));
        self.bytes += size;
        let newest = self.window.iter().map(|w| w.0).max().unwrap_or(arrival);
        while let Some(&(a, s)) = self.window.front() {
            if newest.saturating_sub(a) > ACKED_WINDOW {
                self.window.pop_front();
                self.bytes -= s;
            } else {
                break;
            }
        }
    }

    fn bps(&self) -> Option<f64> {
        // Over the span the packets arrived in (the first packet's bytes belong before it), and
        // only once the span is long enough that a burst does not read as a huge rate.
        let (first, last) = (self.window.front()?, self.window.back()?.0);
        let span = last.saturating_sub(first.0);
        (span >= ACKED_WINDOW / 2).then(|| (self.bytes - first.1) as f64 * 8.0 / span.as_secs_f64())
    }
}

/// Where the estimate comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Nothing heard yet.
    Initial,
    TransportCc,
    Remb,
    LossOnly,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Initial => "initial",
            Mode::TransportCc => "transport_cc",
            Mode::Remb => "remb",
            Mode::LossOnly => "loss",
        }
    }
}

/// An ongoing probe cluster.
#[derive(Clone, Copy, Debug)]
struct Probe {
    target_bps: f64,
    start: Instant,
    end: Instant,
    /// Bytes the engine should have sent as probe packets so far (paced).
    sent_bytes: u64,
    overuse_seen: bool,
    long: bool,
    first_id: Option<u64>,
    last_id: Option<u64>,
}

/// What became of a finished probe.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ProbeOutcome {
    /// The path carried this rate; the estimate is now at least it.
    Succeeded(f64),
    Failed,
}

pub struct Estimator {
    mode: Mode,
    history: History,
    next_twcc_seq: u16,
    trend: Trendline,
    acked: AckedRate,
    usage: Usage,
    /// Delay-based target.
    target: f64,
    /// Loss-based bound.
    loss_target: f64,
    last_loss_change: Option<Instant>,
    last_change: Option<Instant>,
    last_decrease_rate: Option<f64>,
    increasing: bool,
    loss_avg: f64,
    /// Packets reported lost / reported at all since the loss-based bound last moved.
    interval_lost: usize,
    interval_total: usize,
    remb: Option<f64>,
    last_feedback: Option<Instant>,
    probe: Option<Probe>,
    /// Reports held back for the running probe's evaluation: (id, departure, arrival, size).
    probe_reports: Vec<(u64, Instant, Duration, usize)>,
    /// Departures of the running probe's packets reported lost.
    probe_lost: Vec<Instant>,
    /// The rate at which the path last congested (delay overuse or loss), and when.
    ceiling: Option<(f64, Instant)>,
    /// The last loss fraction seen through NACKs, and when.
    nack_loss: Option<(f64, Instant)>,
    last_outcome: Option<(Instant, ProbeOutcome)>,
    /// Send-time windows of recent probes: what was lost then is the probe's doing, not a loss
    /// rate of the path at the estimate.
    probe_windows: VecDeque<(Instant, Instant)>,
}

impl Default for Estimator {
    fn default() -> Self {
        Self::new(INITIAL_BPS)
    }
}

impl Estimator {
    pub fn new(initial_bps: f64) -> Self {
        Self {
            mode: Mode::Initial,
            history: History::new(),
            next_twcc_seq: 0,
            trend: Trendline::default(),
            acked: AckedRate::default(),
            usage: Usage::Normal,
            target: initial_bps.clamp(MIN_BPS, MAX_BPS),
            loss_target: MAX_BPS,
            last_loss_change: None,
            last_change: None,
            last_decrease_rate: None,
            increasing: false,
            loss_avg: 0.0,
            interval_lost: 0,
            interval_total: 0,
            remb: None,
            last_feedback: None,
            probe: None,
            probe_reports: Vec::new(),
            probe_lost: Vec::new(),
            ceiling: None,
            nack_loss: None,
            last_outcome: None,
            probe_windows: VecDeque::new(),
        }
    }

    pub fn estimate_bps(&self) -> f64 {
        let est = match self.mode {
            Mode::Remb => self.remb.unwrap_or(self.target).min(self.target),
            _ => self.target,
        };
        est.min(self.loss_target).clamp(MIN_BPS, MAX_BPS)
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn usage(&self) -> Usage {
        self.usage
    }

    pub fn loss(&self) -> f64 {
        self.loss_avg
    }

    /// Records a packet leaving towards the subscriber; returns the transport-wide sequence
    /// number to put in its transport-cc header extension.
    pub fn on_sent(&mut self, now: Instant, ssrc: u32, seq: u16, size: usize) -> u16 {
        let twcc = self.next_twcc_seq;
        self.next_twcc_seq = self.next_twcc_seq.wrapping_add(1);
        let id = self.history.add_outgoing(ssrc, seq, true, twcc, size, now);
        if let Some(p) = self.probe.as_mut()
            && now >= p.start
            && now <= p.end
        {
            p.first_id.get_or_insert(id);
            p.last_id = Some(id);
        }
        twcc
    }

    /// Transport-wide feedback from the subscriber.
    pub fn on_twcc(&mut self, now: Instant, feedback: &TransportLayerCc) {
        // The last status chunk is padded with "not received" symbols past the packets the
        // feedback covers (`convert_twcc` returns those too): reading them as losses would mark
        // packets lost before their own feedback arrives.
        for ack in convert_twcc(feedback).into_iter().take(usize::from(feedback.packet_status_count)) {
            self.history.on_twcc_feedback(now, ack);
        }
        let reports = self.history.take_reports();
        self.on_reports(now, &reports);
        self.history.prune_before(now - Duration::from_secs(5));
    }

    /// Packet reports (departure and arrival of each packet): the estimator proper.
    pub fn on_reports(&mut self, now: Instant, reports: &[PacketReport]) {
        if reports.is_empty() {
            return;
        }
        self.mode = Mode::TransportCc;
        self.last_feedback = Some(now);
        for r in reports {
            let in_probe = self.probe_windows.iter().any(|(a, b)| r.departure >= *a && r.departure <= *b + PROBE_LOSS_GRACE);
            if !in_probe {
                self.interval_total += 1;
                if !r.arrived {
                    self.interval_lost += 1;
                }
            }
            let in_running_probe = self.probe.as_ref().is_some_and(|p| p.first_id.is_some_and(|f| r.id >= f) && p.last_id.is_none_or(|l| r.id <= l));
            match (r.arrived, r.arrival) {
                (true, Some(arrival)) => {
                    self.acked.add(arrival, r.size);
                    self.usage = self.trend.on_packet(r.departure, arrival);
                    if in_running_probe {
                        self.probe_reports.push((r.id, r.departure, arrival, r.size));
                    }
                }
                _ if in_running_probe => self.probe_lost.push(r.departure),
                _ => {}
            }
        }
        if let Some(p) = self.probe.as_mut()
            && self.usage == Usage::Over
        {
            p.overuse_seen = true;
            // The answer is known: stop filling the queue.
            if p.end > now {
                p.end = now.max(p.start);
            }
        }
        let acked = self.acked.bps();
        self.rate_control(now, acked);
        self.loss_control(now, acked);
        self.evaluate_probe(now);
    }

    fn rate_control(&mut self, now: Instant, acked: Option<f64>) {
        match self.usage {
            Usage::Over => {
                // Back off from what actually got through, once per interval.
                if self.last_change.is_none_or(|t| now.saturating_duration_since(t) >= RATE_CONTROL_INTERVAL) || self.increasing {
                    let base = acked.unwrap_or(self.target).min(self.target);
                    self.ceiling = Some((base, now));
                    self.target = (base * DECREASE_FACTOR).clamp(MIN_BPS, MAX_BPS);
                    self.last_decrease_rate = acked;
                    self.last_change = Some(now);
                }
                self.increasing = false;
            }
            Usage::Under => self.increasing = false,
            Usage::Normal => {
                if !self.increasing {
                    // Hold one interval after a decrease or underuse before growing again.
                    self.increasing = true;
                    self.last_change = Some(now);
                    return;
                }
                let elapsed = self.last_change.map_or(RATE_CONTROL_INTERVAL, |t| now.saturating_duration_since(t));
                if elapsed < RATE_CONTROL_INTERVAL {
                    return;
                }
                let near_ceiling = self.last_decrease_rate.is_some_and(|c| self.target > c * 0.85 && self.target < c * 1.15);
                let grown = if near_ceiling {
                    self.target + 10_000.0 * elapsed.as_secs_f64() / RATE_CONTROL_INTERVAL.as_secs_f64()
                } else {
                    self.target * INCREASE_PER_SECOND.powf(elapsed.as_secs_f64().min(1.0))
                };
                // Never run far ahead of what the path has been shown to carry.
                let cap = acked.map_or(grown, |a| (a * ACKED_HEADROOM + 10_000.0).max(self.target));
                self.target = grown.min(cap).clamp(MIN_BPS, MAX_BPS);
                self.last_change = Some(now);
            }
        }
    }

    /// The loss-based bound (GCC): each interval, the fraction lost *in that interval* p; above
    /// 10% the bound becomes the current estimate × (1 − p/2), under 2% it grows 8%. Judging each
    /// loss once keeps one burst (a keyframe overflowing a queue) from being punished again and
    /// again while the rate is already down.
    fn loss_control(&mut self, now: Instant, _acked: Option<f64>) {
        if self.last_loss_change.is_some_and(|t| now.saturating_duration_since(t) < LOSS_INTERVAL) {
            return;
        }
        if self.interval_total < 20 {
            return;
        }
        self.loss_avg = self.interval_lost as f64 / self.interval_total as f64;
        self.interval_lost = 0;
        self.interval_total = 0;
        if self.loss_avg > HIGH_LOSS {
            let current = self.loss_target.min(self.target).min(self.remb.unwrap_or(MAX_BPS));
            self.ceiling = Some((current, now));
            // Moderate loss: at most a 30% cut per interval (with transport-cc the delay-based
            // part reacts first and better). Heavy loss means the path carried only the rest of
            // what was sent (a link that just dropped to a fraction of the rate): the bound goes
            // straight there, so the allocator steps down once instead of layer by layer.
            let factor = if self.loss_avg > 0.3 { (1.0 - self.loss_avg).max(0.2) } else { 1.0 - 0.5 * self.loss_avg.min(0.6) };
            self.loss_target = (current * factor).clamp(MIN_BPS, MAX_BPS);
            self.last_loss_change = Some(now);
        } else if self.loss_avg < 0.02 && self.loss_target < MAX_BPS {
            self.loss_target = (self.loss_target * 1.08).min(MAX_BPS);
            if self.loss_target > self.target * 2.0 {
                self.loss_target = MAX_BPS;
            }
            self.last_loss_change = Some(now);
        } else {
            self.last_loss_change = Some(now);
        }
    }

    /// Receiver Estimated Maximum Bitrate from the subscriber.
    pub fn on_remb(&mut self, now: Instant, bps: f64) {
        if self.mode == Mode::TransportCc && self.last_feedback.is_some_and(|t| now.saturating_duration_since(t) < FEEDBACK_STALE) {
            return;
        }
        self.mode = Mode::Remb;
        self.remb = Some(bps.clamp(MIN_BPS, MAX_BPS));
        self.last_feedback = Some(now);
        // The loss-based bound starts from the receiver's view.
        if self.target < bps * 0.5 || self.target > bps * 2.0 {
            self.target = bps.clamp(MIN_BPS, MAX_BPS);
        }
    }

    /// Loss from a receiver report (fraction lost, 0–255), for subscribers without transport-cc.
    pub fn on_receiver_report(&mut self, now: Instant, fraction_lost: u8) {
        if self.mode == Mode::TransportCc && self.last_feedback.is_some_and(|t| now.saturating_duration_since(t) < FEEDBACK_STALE) {
            return;
        }
        if self.mode == Mode::Initial {
            self.mode = Mode::LossOnly;
        }
        let mut loss = f64::from(fraction_lost) / 256.0;
        // Reports count repaired packets as received: while NACKs tell more, they win.
        if let Some((nack_loss, at)) = self.nack_loss
            && now.saturating_duration_since(at) < FEEDBACK_STALE
        {
            loss = loss.max(nack_loss);
        }
        self.on_loss_fraction(now, loss);
    }

    /// Loss seen through NACKs: packets asked for (first requests only) over packets sent since
    /// the last call, for subscribers without transport-cc. Receiver reports count repaired
    /// packets as received, so a link dropping a tenth of its packets can report almost no loss
    /// while its video stalls waiting for repairs.
    pub fn on_nack_loss(&mut self, now: Instant, nacked: usize, sent: usize) {
        if (sent < 20 && nacked > 0) || (self.mode == Mode::TransportCc && self.last_feedback.is_some_and(|t| now.saturating_duration_since(t) < FEEDBACK_STALE)) {
            return;
        }
        if self.mode == Mode::Initial {
            self.mode = Mode::LossOnly;
        }
        // Little sent and nothing asked for counts as a clean interval, so a bound lowered by
        // loss can grow back while the video runs on its lowest layer.
        let loss = (nacked as f64 / sent.max(1) as f64).min(1.0);
        self.nack_loss = Some((loss, now));
        self.on_loss_fraction(now, loss);
    }

    fn on_loss_fraction(&mut self, now: Instant, loss: f64) {
        if self.mode == Mode::LossOnly {
            self.loss_avg = 0.7 * self.loss_avg + 0.3 * loss;
            // No other signal: loss moves the estimate itself.
            if self.last_change.is_some_and(|t| now.saturating_duration_since(t) < RATE_CONTROL_INTERVAL) {
                return;
            }
            if self.loss_avg > HIGH_LOSS {
                self.target = (self.target * (1.0 - 0.5 * self.loss_avg)).clamp(MIN_BPS, MAX_BPS);
            } else if self.loss_avg < 0.02 {
                self.target = (self.target * 1.05).clamp(MIN_BPS, MAX_BPS);
            }
            self.last_change = Some(now);
        } else {
            // A report covers its own interval: judge it as such (the worst of what receiver
            // reports and NACKs said since the bound last moved).
            let pending = if self.interval_total > 0 { self.interval_lost as f64 / self.interval_total as f64 } else { 0.0 };
            self.interval_total = 100;
            self.interval_lost = (loss.max(pending) * 100.0).round() as usize;
            self.loss_control(now, None);
        }
    }

    /// Starts a probe cluster at `target_bps` (total send rate to aim for).
    pub fn start_probe(&mut self, now: Instant, target_bps: f64) {
        if self.probe.is_some() || self.mode != Mode::TransportCc {
            return;
        }
        self.probe_reports.clear();
        self.probe_lost.clear();
        let long = self.ceiling.is_some_and(|(rate, at)| now.saturating_duration_since(at) < CEILING_MEMORY && target_bps > rate * 0.95);
        let end = now + if long { LONG_PROBE_DURATION } else { PROBE_DURATION };
        self.probe_windows.push_back((now, end));
        while self.probe_windows.len() > 4 {
            self.probe_windows.pop_front();
        }
        self.probe = Some(Probe { target_bps, start: now, end, sent_bytes: 0, overuse_seen: false, long, first_id: None, last_id: None });
    }

    pub fn probing(&self) -> bool {
        self.probe.is_some_and(|p| p.first_id.is_none() || p.end > p.start)
    }

    /// Probe bytes to send now on top of `media_bps` of ongoing media so that the total runs at
    /// the probe rate (the engine calls this on its media tick while probing).
    pub fn probe_bytes_due(&mut self, now: Instant, media_bps: f64) -> usize {
        let Some(p) = self.probe.as_mut() else { return 0 };
        if now > p.end {
            return 0;
        }
        let elapsed = now.saturating_duration_since(p.start).as_secs_f64();
        let extra_bps = (p.target_bps - media_bps).max(0.0);
        let owed = (extra_bps * elapsed / 8.0) as u64;
        let due = owed.saturating_sub(p.sent_bytes);
        p.sent_bytes += due;
        due as usize
    }

    /// The outcome of the last probe, once (the allocator reacts to it).
    pub fn take_probe_outcome(&mut self) -> Option<ProbeOutcome> {
        self.last_outcome.take().map(|(_, o)| o)
    }

    /// Times out a probe whose feedback never came.
    pub fn on_tick(&mut self, now: Instant) {
        if let Some(p) = self.probe
            && now > p.end + PROBE_RESULT_TIMEOUT
        {
            self.probe = None;
            self.last_outcome = Some((now, ProbeOutcome::Failed));
        }
    }

    fn evaluate_probe(&mut self, now: Instant) {
        let Some(p) = self.probe else { return };
        let (Some(_), Some(last)) = (p.first_id, p.last_id) else { return };
        if now < p.end || !self.probe_reports.iter().any(|r| r.0 >= last) && now < p.end + PROBE_RESULT_TIMEOUT {
            return;
        }
        self.probe = None;
        let mut reports = std::mem::take(&mut self.probe_reports);
        let mut lost = std::mem::take(&mut self.probe_lost);
        if p.long {
            // Judged on its second half, once any burst allowance of the path is used up.
            let half = p.start + (p.end - p.start) / 2;
            if reports.iter().filter(|r| r.1 >= half).count() >= 5 {
                reports.retain(|r| r.1 >= half);
                lost.retain(|d| *d >= half);
            }
        }
        let lossy = lost.len() * 10 > reports.len() + lost.len();
        tracing::debug!(reports = reports.len(), lost = lost.len(), overuse = p.overuse_seen, long = p.long, target = p.target_bps, "probe evaluation");
        let outcome = match (reports.first(), reports.last()) {
            (Some(first), Some(last_r)) if reports.len() >= 5 && !p.overuse_seen && !lossy => {
                let bytes: usize = reports.iter().map(|r| r.3).sum();
                let send_span = last_r.1.saturating_duration_since(first.1).as_secs_f64().max(0.001);
                let recv_span = reports.iter().map(|r| r.2).max().unwrap_or_default().saturating_sub(reports.iter().map(|r| r.2).min().unwrap_or_default()).as_secs_f64().max(0.001);
                let send_rate = bytes as f64 * 8.0 / send_span;
                let recv_rate = bytes as f64 * 8.0 / recv_span;
                tracing::debug!(send_rate, recv_rate, bytes, send_span, recv_span, "probe rates");
                // The path carried the probe if it arrived about as fast as it was sent.
                if recv_rate >= 0.85 * send_rate {
                    ProbeOutcome::Succeeded(send_rate.min(recv_rate))
                } else {
                    ProbeOutcome::Failed
                }
            }
            _ => ProbeOutcome::Failed,
        };
        if let ProbeOutcome::Succeeded(measured) = outcome {
            if p.long && self.ceiling.is_some_and(|(c, _)| measured > c * 1.1) {
                self.ceiling = None;
            }
            let rate = (measured * 0.95).min(p.target_bps).clamp(MIN_BPS, MAX_BPS);
            if rate > self.target {
                self.target = rate;
                self.last_change = Some(now);
                self.last_decrease_rate = None;
            }
            // The path just carried this rate without loss: the loss-based bound (GCC resets it
            // on a probe result too) must not hold the estimate below it.
            self.loss_target = self.loss_target.max(rate);
        }
        self.last_outcome = Some((now, outcome));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtcp::transport_feedbacks::cc_feedback_report::Ecn;

    /// A synthetic path: packets of `size` bytes sent every `gap`, arriving after `delay(i)`;
    /// `lost(i)` drops some. Feeds reports in batches of 10 (like TWCC every ~50 ms).
    struct Path {
        t0: Instant,
        next: u64,
    }

    impl Path {
        fn new() -> Self {
            Self { t0: Instant::now(), next: 0 }
        }

        fn run(&mut self, e: &mut Estimator, packets: u64, gap_ms: f64, size: usize, delay: impl Fn(u64) -> f64, lost: impl Fn(u64) -> bool) {
            let mut batch = Vec::new();
            for _ in 0..packets {
                let i = self.next;
                self.next += 1;
                let sent_ms = i as f64 * gap_ms;
                let departure = self.t0 + Duration::from_secs_f64(sent_ms / 1000.0);
                let arrival = Duration::from_secs_f64((sent_ms + delay(i)) / 1000.0);
                let ok = !lost(i);
                batch.push(PacketReport {
                    ssrc: 1,
                    id: i,
                    rtp_sequence_number: i as u16,
                    is_twcc: true,
                    twcc_sequence_number: i as u16,
                    size,
                    arrived: ok,
                    departure,
                    arrival: ok.then_some(arrival),
                    ecn: Ecn::default(),
                });
                if batch.len() == 10 {
                    let now = departure + Duration::from_secs_f64((delay(i) + 5.0) / 1000.0);
                    e.on_reports(now, &batch);
                    batch.clear();
                }
            }
        }
    }

    #[test]
    fn rising_delay_lowers_the_estimate() {
        let mut e = Estimator::new(2_000_000.0);
        let mut path = Path::new();
        // 1 Mbit/s of 1000-byte packets, steady delay: no reason to go down.
        path.run(&mut e, 500, 8.0, 1000, |_| 20.0, |_| false);
        let steady = e.estimate_bps();
        assert!(steady >= 1_000_000.0, "steady path keeps the estimate up: {steady}");
        // A queue builds: each packet waits 2 ms more than the one before.
        path.run(&mut e, 200, 8.0, 1000, |i| 20.0 + (i - 500) as f64 * 2.0, |_| false);
        let congested = e.estimate_bps();
        assert_eq!(e.usage(), Usage::Over, "a 25% overload is detected");
        assert!(congested < steady * 0.9, "rising delay: {steady} → {congested}");
        assert!(congested <= 1_000_000.0, "backs off below what was getting through: {congested}");
    }

    #[test]
    fn heavy_loss_lowers_the_estimate() {
        let mut e = Estimator::new(2_000_000.0);
        let mut path = Path::new();
        path.run(&mut e, 300, 8.0, 1000, |_| 20.0, |_| false);
        let before = e.estimate_bps();
        path.run(&mut e, 300, 8.0, 1000, |_| 20.0, |i| i % 4 == 0);
        let after = e.estimate_bps();
        assert!(e.loss() > 0.15, "loss measured: {}", e.loss());
        assert!(after < before * 0.8, "25% loss: {before} → {after}");
    }

    #[test]
    fn a_link_that_drops_to_a_third_is_followed_in_one_step() {
        // 1 Mbit/s through a link that suddenly carries only a third of it (constant delay, so
        // only loss tells): within two loss intervals the estimate is near what gets through,
        // not 30% lower per interval.
        let mut e = Estimator::new(1_000_000.0);
        let mut path = Path::new();
        path.run(&mut e, 300, 8.0, 1000, |_| 20.0, |_| false);
        assert!(e.estimate_bps() >= 900_000.0);
        path.run(&mut e, 125, 8.0, 1000, |_| 20.0, |i| i % 3 != 0);
        let after = e.estimate_bps();
        assert!(e.loss() > 0.6, "loss measured: {}", e.loss());
        assert!(after < 450_000.0, "two thirds lost: estimate {after} (what got through: ~333k)");
        assert!(after > 150_000.0, "not below what got through by much: {after}");
    }

    #[test]
    fn a_clean_path_does_not_outrun_what_it_carries() {
        let mut e = Estimator::new(300_000.0);
        let mut path = Path::new();
        // 250 kbit/s for 10 s, clean.
        path.run(&mut e, 1250, 32.0, 1000, |_| 20.0, |_| false);
        let est = e.estimate_bps();
        assert!(est > 300_000.0, "a clean path grows: {est}");
        assert!(est <= 250_000.0 * ACKED_HEADROOM + 20_000.0, "capped by 1.5× acknowledged: {est}");
    }

    #[test]
    fn a_successful_probe_raises_the_estimate() {
        let mut e = Estimator::new(400_000.0);
        let mut path = Path::new();
        path.run(&mut e, 100, 20.0, 1000, |_| 20.0, |_| false);
        assert_eq!(e.mode(), Mode::TransportCc);
        let before = e.estimate_bps();
        let t = path.t0 + Duration::from_millis(2000);
        e.start_probe(t, 1_600_000.0);
        // Pacing: at 50 ms into the probe, 1.2 Mbit/s of extra data is due for those 50 ms.
        let due = e.probe_bytes_due(t + Duration::from_millis(50), 400_000.0);
        assert_eq!(due, 1_200_000 / 8 * 50 / 1000);
        // The probe's packets go out at 1.6 Mbit/s and arrive just as fast.
        for i in 0..40u64 {
            e.on_sent(t + Duration::from_micros(i * 5000), 1, i as u16, 1000);
        }
        let reports: Vec<PacketReport> = (0..40u64)
            .map(|i| PacketReport {
                ssrc: 1,
                id: i,
                rtp_sequence_number: i as u16,
                is_twcc: true,
                twcc_sequence_number: i as u16,
                size: 1000,
                arrived: true,
                departure: t + Duration::from_micros(i * 5000),
                // same 20 ms one-way delay as the path before it
                arrival: Some(Duration::from_millis(2020) + Duration::from_micros(i * 5000)),
                ecn: Ecn::default(),
            })
            .collect();
        // The probe's ids are those of `on_sent` (a fresh history numbers from 0).
        e.on_reports(t + PROBE_DURATION + Duration::from_millis(30), &reports);
        let outcome = e.take_probe_outcome();
        assert!(matches!(outcome, Some(ProbeOutcome::Succeeded(r)) if r > 1_400_000.0), "{outcome:?}");
        assert!(e.estimate_bps() > before * 3.0, "{before} → {}", e.estimate_bps());
    }

    /// Sends a probe cluster at `send_bps` (1000-byte packets) from `t` for as long as the
    /// estimator's probe runs, through a token bucket of `link_bps` with `burst` bytes and a
    /// 200 ms queue (`tc tbf`; 0 = unlimited link); feeds all reports afterwards.
    fn probe_through_bucket(e: &mut Estimator, t: Instant, send_bps: f64, link_bps: f64, burst: f64) -> Option<ProbeOutcome> {
        let end = e.probe.unwrap().end;
        let gap = Duration::from_secs_f64(8000.0 / send_bps);
        let (mut tokens, mut last, mut link_free) = (burst, t, t);
        let mut reports = Vec::new();
        let mut at = t;
        while at < end {
            e.on_sent(at, 1, 0, 1000);
            let id = e.probe.unwrap().last_id.unwrap();
            let arrival = if link_bps == 0.0 {
                Some(at)
            } else {
                // Tokens refill at the link rate; a packet leaves once it has 1000 bytes' worth.
                tokens = (tokens + at.saturating_duration_since(last).as_secs_f64() * link_bps / 8.0).min(burst);
                last = at;
                let wait = if tokens >= 1000.0 { 0.0 } else { (1000.0 - tokens) * 8.0 / link_bps };
                let leaves = (at + Duration::from_secs_f64(wait)).max(link_free);
                if leaves.saturating_duration_since(at) > Duration::from_millis(200) {
                    None
                } else {
                    tokens -= 1000.0;
                    link_free = leaves;
                    Some(leaves)
                }
            };
            reports.push(PacketReport {
                ssrc: 1,
                id,
                rtp_sequence_number: 0,
                is_twcc: true,
                twcc_sequence_number: 0,
                size: 1000,
                arrived: arrival.is_some(),
                departure: at,
                arrival: arrival.map(|a| a.saturating_duration_since(t) + Duration::from_millis(20)),
                ecn: Ecn::default(),
            });
            at += gap;
        }
        e.on_reports(end + Duration::from_millis(300), &reports);
        e.take_probe_outcome()
    }

    #[test]
    fn after_congestion_probes_above_it_are_long_enough_to_see_through_a_token_bucket() {
        let warm = |e: &mut Estimator, path: &mut Path| path.run(e, 100, 20.0, 1000, |_| 20.0, |_| false);
        // A 500 kbit/s bucket with a 20 kB burst lets a 250 ms probe at 750 kbit/s through
        // untouched: a short probe cannot tell.
        let mut fresh = Estimator::new(500_000.0);
        warm(&mut fresh, &mut Path::new());
        let t = Instant::now() + Duration::from_secs(5);
        fresh.start_probe(t, 750_000.0);
        assert!(!fresh.probe.unwrap().long);
        assert!(matches!(probe_through_bucket(&mut fresh, t, 750_000.0, 500_000.0, 20_000.0), Some(ProbeOutcome::Succeeded(_))));

        // Once the path has congested around 500 kbit/s, a probe above that runs 1 s and is
        // judged on its second half: it fails, and the estimate stays.
        let mut e = Estimator::new(600_000.0);
        let mut path = Path::new();
        warm(&mut e, &mut path);
        path.run(&mut e, 150, 13.0, 1000, |i| 20.0 + (i - 100) as f64 * 2.0, |_| false);
        let (ceiling, _) = e.ceiling.expect("congestion remembered");
        assert!(ceiling < 700_000.0, "{ceiling}");
        let before = e.estimate_bps();
        let t = path.t0 + Duration::from_secs(10);
        e.start_probe(t, 750_000.0);
        assert!(e.probe.unwrap().long);
        assert_eq!(probe_through_bucket(&mut e, t, 750_000.0, 500_000.0, 20_000.0), Some(ProbeOutcome::Failed));
        assert!(e.estimate_bps() <= before, "{before} → {}", e.estimate_bps());

        // The cap is lifted: the long probe succeeds and congestion is forgotten.
        let t = t + Duration::from_secs(3);
        e.start_probe(t, 750_000.0);
        assert!(matches!(probe_through_bucket(&mut e, t, 750_000.0, 0.0, 0.0), Some(ProbeOutcome::Succeeded(r)) if r > 650_000.0));
        assert!(e.ceiling.is_none());
        assert!(e.estimate_bps() > 650_000.0, "{}", e.estimate_bps());
    }

    #[test]
    fn without_transport_cc_nacked_packets_lower_the_estimate_even_when_reports_show_none() {
        let t = Instant::now();
        let mut e = Estimator::new(1_000_000.0);
        e.on_remb(t, 800_000.0);
        assert_eq!(e.mode(), Mode::Remb);
        // The receiver still reports 800k and no loss (its repairs arrive), but a fifth of the
        // packets had to be asked for again, second after second.
        for i in 1..=4u64 {
            let now = t + Duration::from_millis(1000 * i);
            e.on_remb(now, 800_000.0);
            e.on_receiver_report(now, 0);
            e.on_nack_loss(now + Duration::from_millis(10), 20, 100);
        }
        assert!(e.estimate_bps() < 600_000.0, "{}", e.estimate_bps());
        // Clean again: it recovers towards what the receiver says.
        let before = e.estimate_bps();
        for i in 5..=12u64 {
            let now = t + Duration::from_millis(1000 * i);
            e.on_remb(now, 800_000.0);
            e.on_nack_loss(now, 0, 100);
        }
        assert!(e.estimate_bps() > before, "{before} → {}", e.estimate_bps());
    }

    #[test]
    fn a_probe_that_queues_fails_and_changes_nothing() {
        let mut e = Estimator::new(400_000.0);
        let mut path = Path::new();
        path.run(&mut e, 100, 20.0, 1000, |_| 20.0, |_| false);
        let before = e.estimate_bps();
        let t = path.t0 + Duration::from_millis(2000);
        e.start_probe(t, 1_600_000.0);
        for i in 0..40u64 {
            e.on_sent(t + Duration::from_micros(i * 5000), 1, i as u16, 1000);
        }
        // Sent at 1.6 Mbit/s but the bottleneck delivers 500 kbit/s: arrivals 16 ms apart.
        let reports: Vec<PacketReport> = (0..40u64)
            .map(|i| PacketReport {
                ssrc: 1,
                id: i,
                rtp_sequence_number: i as u16,
                is_twcc: true,
                twcc_sequence_number: i as u16,
                size: 1000,
                arrived: true,
                departure: t + Duration::from_micros(i * 5000),
                arrival: Some(Duration::from_millis(2020) + Duration::from_millis(i * 16)),
                ecn: Ecn::default(),
            })
            .collect();
        e.on_reports(t + Duration::from_millis(700), &reports);
        assert_eq!(e.take_probe_outcome(), Some(ProbeOutcome::Failed));
        assert!(e.estimate_bps() < before * 1.2, "no jump: {before} → {}", e.estimate_bps());
    }

    #[test]
    fn a_probe_without_feedback_times_out() {
        let mut e = Estimator::new(400_000.0);
        let mut path = Path::new();
        path.run(&mut e, 20, 20.0, 1000, |_| 20.0, |_| false);
        let t = path.t0 + Duration::from_secs(1);
        e.start_probe(t, 1_000_000.0);
        e.on_tick(t + Duration::from_millis(100));
        assert_eq!(e.take_probe_outcome(), None, "still running");
        e.on_tick(t + PROBE_DURATION + PROBE_RESULT_TIMEOUT + Duration::from_millis(1));
        assert_eq!(e.take_probe_outcome(), Some(ProbeOutcome::Failed));
    }

    #[test]
    fn remb_and_receiver_report_fallbacks() {
        let t = Instant::now();
        let mut e = Estimator::new(1_000_000.0);
        e.on_remb(t, 300_000.0);
        assert_eq!(e.mode(), Mode::Remb);
        assert_eq!(e.estimate_bps(), 300_000.0);
        e.on_remb(t + Duration::from_secs(1), 800_000.0);
        assert_eq!(e.estimate_bps(), 800_000.0);
        // Loss from receiver reports lowers it further.
        for i in 0..10 {
            e.on_receiver_report(t + Duration::from_millis(1000 + 300 * i), 64); // 25%
        }
        assert!(e.estimate_bps() < 800_000.0 * 0.7, "{}", e.estimate_bps());
        // Only receiver reports: loss-based.
        let mut l = Estimator::new(1_000_000.0);
        for i in 0..5 {
            l.on_receiver_report(t + Duration::from_millis(300 * i), 0);
        }
        assert_eq!(l.mode(), Mode::LossOnly);
        assert!(l.estimate_bps() > 1_000_000.0, "clean reports let it grow");
    }
}
