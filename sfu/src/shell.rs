//! The I/O shell around the sans-IO [`Engine`]: one OS thread that owns the shared UDP port (one
//! socket per advertised address, all on the same port) and the engine, and runs the one drive
//! loop: wait for readiness or the next deadline → feed datagrams and commands with `now` →
//! send what the engine produced. Signaling talks to it through an [`EngineHandle`]: commands go
//! in over a channel (waking the loop), replies come back on oneshots, participant events on a
//! per-participant channel.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use tokio::sync::{mpsc as tmpsc, oneshot};
use tracing::{error, info, warn};

use crate::api::*;
use crate::engine::{Engine, Output, RemoteCandidate};
use crate::ids::{ParticipantId, PeerRole, RoomName, TrackId};
use crate::metrics::Metrics;

/// Where the RTC port lives.
#[derive(Clone, Debug)]
pub struct RtcNetConfig {
    /// UDP port shared by all peers; 0 picks a free one.
    pub port: u16,
    /// Addresses to advertise. Empty: every IPv4 address of the host (loopback included), each
    /// bound directly. With one public address (behind NAT), the socket binds 0.0.0.0.
    pub public_ips: Vec<IpAddr>,
}

/// A participant's event stream, as signaling receives it.
pub type EventReceiver = tmpsc::UnboundedReceiver<ParticipantEvent>;

struct Core {
    engine: Engine,
    listeners: HashMap<ParticipantId, tmpsc::UnboundedSender<ParticipantEvent>>,
    stop: bool,
}

type Command = Box<dyn FnOnce(&mut Core, Instant) + Send>;

/// Cloneable handle signaling uses to talk to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    waker: Arc<Waker>,
    advertised: Arc<Vec<SocketAddr>>,
    metrics: Metrics,
}

const WAKER: Token = Token(usize::MAX);
/// Datagrams read from one socket before the loop looks at the others and at its timers.
const READ_BATCH: usize = 64;
const MAX_DATAGRAM: usize = 2048;

fn gone() -> EngineError {
    EngineError::Internal("the media engine has stopped".into())
}

impl EngineHandle {
    async fn call<R: Send + 'static>(&self, f: impl FnOnce(&mut Core, Instant) -> R + Send + 'static) -> Result<R, EngineError> {
        let (tx, rx) = oneshot::channel();
        let cmd: Command = Box::new(move |core, now| {
            let _ = tx.send(f(core, now));
        });
        self.commands.send(cmd).map_err(|_| gone())?;
        self.waker.wake().map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// Joins a room; events for the participant arrive on the returned receiver, starting with
    /// those the join itself caused (e.g. the first subscriber offer).
    pub async fn join(&self, req: JoinRequest) -> Result<(Joined, EventReceiver), EngineError> {
        self.call(move |core, now| {
            let (tx, rx) = tmpsc::unbounded_channel();
            // Events the join itself causes (e.g. the first subscriber offer) sit in the engine's
            // output queue until this command returns, so registering right after is in time.
            let joined = core.engine.join(now, req)?;
            core.listeners.insert(joined.participant.id, tx);
            Ok((joined, rx))
        })
        .await?
    }

    pub async fn leave(&self, id: ParticipantId, reason: LeaveReason) -> Result<(), EngineError> {
        self.call(move |core, now| {
            core.engine.leave(now, id, reason);
            core.listeners.remove(&id);
        })
        .await
    }

    pub async fn publish(&self, id: ParticipantId, sdp: String, tracks: Vec<TrackDeclaration>) -> Result<PublishAnswer, EngineError> {
        self.call(move |core, now| core.engine.publish(now, id, sdp, tracks)).await?
    }

    pub async fn subscriber_answer(&self, id: ParticipantId, sdp: String) -> Result<(), EngineError> {
        self.call(move |core, now| core.engine.subscriber_answer(now, id, sdp)).await?
    }

    pub async fn whep_offer(&self, id: ParticipantId, sdp: String) -> Result<String, EngineError> {
        self.call(move |core, now| core.engine.whep_offer(now, id, sdp)).await?
    }

    pub async fn add_candidate(&self, id: ParticipantId, role: PeerRole, candidate: Option<RemoteCandidate>) -> Result<(), EngineError> {
        self.call(move |core, now| core.engine.add_candidate(now, id, role, candidate)).await?
    }

    pub async fn set_muted(&self, id: ParticipantId, track: TrackId, muted: bool) -> Result<(), EngineError> {
        self.call(move |core, now| core.engine.set_muted(now, id, track, muted)).await?
    }

    /// Sends one data channel message to each listed participant; returns those it failed for.
    pub async fn send_data(&self, to: Vec<ParticipantId>, label: String, data: bytes::Bytes, is_text: bool) -> Result<Vec<(ParticipantId, EngineError)>, EngineError> {
        self.call(move |core, now| core.engine.send_data(now, &to, &label, &data, is_text)).await
    }

    /// Participant ids in a room (for relaying to everyone).
    pub async fn room_participant_ids(&self, room: RoomName) -> Result<Vec<ParticipantId>, EngineError> {
        self.call(move |core, _| core.engine.room_participant_ids(&room)).await
    }

    pub async fn set_track_settings(&self, id: ParticipantId, track: TrackId, settings: crate::engine::TrackSettings) -> Result<(), EngineError> {
        self.call(move |core, now| core.engine.set_track_settings(now, id, track, settings)).await?
    }

    pub async fn room_participants(&self, room: RoomName) -> Result<Vec<ParticipantInfo>, EngineError> {
        self.call(move |core, _| core.engine.room_participants(&room)).await
    }

    pub async fn identity_present(&self, room: RoomName, identity: String) -> Result<bool, EngineError> {
        self.call(move |core, _| core.engine.identity_present(&room, &identity)).await
    }

    /// (rooms, participants)
    pub async fn counts(&self) -> Result<(usize, usize), EngineError> {
        self.call(|core, _| (core.engine.room_count(), core.engine.participant_count())).await
    }

    /// Stop admitting new participants.
    pub async fn start_draining(&self) -> Result<(), EngineError> {
        self.call(|core, _| core.engine.start_draining()).await
    }

    /// Removes everyone and stops the engine thread.
    pub async fn shutdown(&self) -> Result<(), EngineError> {
        self.call(|core, now| {
            core.engine.remove_all(now, LeaveReason::Draining);
            core.stop = true;
        })
        .await
    }

    /// The addresses clients reach the RTC port at.
    pub fn advertised(&self) -> &[SocketAddr] {
        &self.advertised
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

struct Bound {
    socket: UdpSocket,
    /// The address reported to the engine as the datagram's local address (= the candidate).
    advertised: SocketAddr,
}

fn bind_sockets(net: &RtcNetConfig) -> std::io::Result<Vec<Bound>> {
    let bind = |ip: IpAddr, port: u16| -> std::io::Result<UdpSocket> {
        let s = socket2::Socket::new(socket2::Domain::for_address(SocketAddr::new(ip, port)), socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        // Large buffers: a burst of video to many subscribers must not overflow the kernel queue.
        let _ = s.set_recv_buffer_size(4 << 20);
        let _ = s.set_send_buffer_size(4 << 20);
        s.set_nonblocking(true)?;
        s.bind(&SocketAddr::new(ip, port).into())?;
        Ok(UdpSocket::from_std(s.into()))
    };
    if let [public] = net.public_ips[..] {
        let unspecified = if public.is_ipv4() { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) };
        let socket = bind(unspecified, net.port)?;
        let port = socket.local_addr()?.port();
        return Ok(vec![Bound { socket, advertised: SocketAddr::new(public, port) }]);
    }
    let mut ips: Vec<IpAddr> = if net.public_ips.is_empty() {
        let mut ips: Vec<IpAddr> = if_addrs::get_if_addrs()?.into_iter().map(|i| i.ip()).filter(|ip| ip.is_ipv4()).collect();
        // Non-loopback first: the order is the candidates' preference order.
        ips.sort_by_key(|ip| ip.is_loopback());
        ips.dedup();
        ips
    } else {
        net.public_ips.clone()
    };
    if ips.is_empty() {
        ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    // All sockets share one port: bind the first (possibly on port 0), then the rest on its port.
    for attempt in 0..10 {
        let first = bind(ips[0], net.port)?;
        let port = first.local_addr()?.port();
        let mut bound = vec![Bound { socket: first, advertised: SocketAddr::new(ips[0], port) }];
        let mut clash = false;
        for &ip in &ips[1..] {
            match bind(ip, port) {
                Ok(socket) => bound.push(Bound { socket, advertised: SocketAddr::new(ip, port) }),
                Err(e) if net.port == 0 && e.kind() == ErrorKind::AddrInUse => {
                    clash = true;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if !clash {
            return Ok(bound);
        }
        warn!(attempt, "picked RTC port is taken on another address; retrying");
    }
    Err(std::io::Error::new(ErrorKind::AddrInUse, "no port free on every address"))
}

/// Binds the RTC port and starts the engine thread.
pub fn spawn(cfg: EngineConfig, net: RtcNetConfig, metrics: Metrics) -> Result<(EngineHandle, JoinHandle<()>), EngineError> {
    let io = |e: std::io::Error| EngineError::Internal(format!("RTC port: {e}"));
    let mut sockets = bind_sockets(&net).map_err(io)?;
    let advertised: Vec<SocketAddr> = sockets.iter().map(|b| b.advertised).collect();
    let poll = Poll::new().map_err(io)?;
    for (i, b) in sockets.iter_mut().enumerate() {
        poll.registry().register(&mut b.socket, Token(i), Interest::READABLE).map_err(io)?;
    }
    let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(io)?);
    let seed = rand::random::<u64>();
    let now = Instant::now();
    let engine = Engine::new(cfg, advertised.clone(), metrics.clone(), seed, now, rtc::shared::time::SystemInstant::now(now))?;
    let (tx, rx) = mpsc::channel::<Command>();
    info!(addresses = ?advertised, "RTC port bound");
    let handle = EngineHandle { commands: tx, waker, advertised: Arc::new(advertised), metrics: metrics.clone() };
    let thread = std::thread::Builder::new()
        .name("warbler-engine".into())
        .spawn(move || {
            let mut core = Core { engine, listeners: HashMap::new(), stop: false };
            if let Err(e) = drive(&mut core, poll, sockets, rx, &metrics) {
                error!(error = %e, "engine loop failed");
            }
            info!("engine stopped");
        })
        .map_err(io)?;
    Ok((handle, thread))
}

/// The drive loop: input → engine → output, until asked to stop.
fn drive(core: &mut Core, mut poll: Poll, sockets: Vec<Bound>, commands: mpsc::Receiver<Command>, metrics: &Metrics) -> std::io::Result<()> {
    let mut events = Events::with_capacity(64);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let by_local: HashMap<SocketAddr, usize> = sockets.iter().enumerate().map(|(i, b)| (b.advertised, i)).collect();
    let mut readable = vec![true; sockets.len()];
    let mut tx = TxBatch::new();
    loop {
        let busy = readable.iter().any(|r| *r);
        let timeout = if busy { Duration::ZERO } else { core.engine.poll_timeout().saturating_duration_since(Instant::now()) };
        match poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            if ev.token() != WAKER && ev.token().0 < readable.len() {
                readable[ev.token().0] = true;
            }
        }
        let now = Instant::now();
        while let Ok(cmd) = commands.try_recv() {
            cmd(core, now);
        }
        for (i, b) in sockets.iter().enumerate() {
            if !readable[i] {
                continue;
            }
            let mut n = 0;
            loop {
                if n == READ_BATCH {
                    break;
                }
                match b.socket.recv_from(&mut buf) {
                    Ok((len, from)) => {
                        n += 1;
                        core.engine.handle_datagram(now, b.advertised, from, &buf[..len]);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        readable[i] = false;
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // ICMP errors surface here on Linux (ECONNREFUSED from a closed peer).
                        tracing::debug!(error = %e, "recv error");
                        continue;
                    }
                }
            }
        }
        if Instant::now() >= core.engine.poll_timeout() {
            core.engine.handle_timeout(Instant::now());
        }
        deliver(core, &sockets, &by_local, &mut tx, metrics);
        if core.stop {
            deliver(core, &sockets, &by_local, &mut tx, metrics);
            return Ok(());
        }
    }
}

fn deliver(core: &mut Core, sockets: &[Bound], by_local: &HashMap<SocketAddr, usize>, tx: &mut TxBatch, metrics: &Metrics) {
    while let Some(out) = core.engine.poll_output() {
        match out {
            Output::Transmit { local, remote, data } => {
                let i = by_local.get(&local).copied().unwrap_or_else(|| {
                    sockets.iter().position(|b| b.advertised.is_ipv4() == remote.is_ipv4()).unwrap_or(0)
                });
                tx.push(i, remote, data);
            }
            Output::Event(to, event) => {
                let removed = matches!(event, ParticipantEvent::Removed { .. });
                if let Some(tx) = core.listeners.get(&to)
                    && tx.send(event).is_err()
                {
                    core.listeners.remove(&to);
                }
                if removed {
                    core.listeners.remove(&to);
                }
            }
        }
    }
    tx.flush(sockets, metrics);
    for data in tx.sent() {
        core.engine.recycle(data);
    }
}

/// Most segments in one GSO send (the kernel's `UDP_MAX_SEGMENTS` is 64 or more) and most bytes.
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65_000;

/// The datagrams of one loop turn, sent per destination: consecutive datagrams to one address
/// of one size (the last may be shorter) go out in one `sendmsg` with `UDP_SEGMENT` (GSO), so the
/// kernel's UDP/IP path runs once per run instead of once per datagram. A forwarded video frame
/// is such a run: its packets have one size but the last. Order per destination is kept; across
/// destinations it does not matter.
struct TxBatch {
    /// (socket, destination, datagram, next datagram of the same group or `NONE`)
    items: Vec<(usize, SocketAddr, BytesMut, usize)>,
    /// (socket, destination) → (first, last) item of its group. Hashed with Fx: one lookup per
    /// datagram, and the keys are our sockets and the peers' ICE-selected addresses.
    groups: HashMap<(usize, SocketAddr), (usize, usize), rustc_hash::FxBuildHasher>,
    heads: Vec<usize>,
    /// Reused across flushes: one group's items and their lengths.
    group: Vec<usize>,
    lens: Vec<usize>,
    /// Cleared when the kernel refuses GSO (old kernel, device without support): plain sends.
    gso: bool,
}

const NONE: usize = usize::MAX;

impl TxBatch {
    fn new() -> Self {
        Self { items: Vec::new(), groups: HashMap::default(), heads: Vec::new(), group: Vec::new(), lens: Vec::new(), gso: cfg!(target_os = "linux") }
    }

    fn push(&mut self, socket: usize, to: SocketAddr, data: BytesMut) {
        let i = self.items.len();
        self.items.push((socket, to, data, NONE));
        if !self.gso {
            return;
        }
        match self.groups.entry((socket, to)) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let (_, last) = e.get_mut();
                self.items[*last].3 = i;
                *last = i;
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert((i, i));
                self.heads.push(i);
            }
        }
    }

    fn flush(&mut self, sockets: &[Bound], metrics: &Metrics) {
        if self.items.is_empty() {
            return;
        }
        if !self.gso || self.heads.len() == self.items.len() {
            // Every datagram to a different address: nothing to coalesce.
            for (socket, to, data, _) in &self.items {
                send_one(&sockets[*socket], data, *to, metrics);
            }
        } else {
            let (mut group, mut lens) = (std::mem::take(&mut self.group), std::mem::take(&mut self.lens));
            for h in 0..self.heads.len() {
                group.clear();
                let mut i = self.heads[h];
                while i != NONE {
                    group.push(i);
                    i = self.items[i].3;
                }
                lens.clear();
                lens.extend(group.iter().map(|&i| self.items[i].2.len()));
                let mut start = 0;
                while start < group.len() {
                    let n = gso_run_len(&lens[start..]);
                    self.send_run(&group[start..start + n], lens[start], sockets, metrics);
                    start += n;
                }
            }
            (self.group, self.lens) = (group, lens);
        }
        self.groups.clear();
        self.heads.clear();
    }

    /// The buffers of the datagrams just flushed, to give back to the engine.
    fn sent(&mut self) -> impl Iterator<Item = BytesMut> + '_ {
        self.items.drain(..).map(|(_, _, data, _)| data)
    }

    fn send_run(&mut self, run: &[usize], size: usize, sockets: &[Bound], metrics: &Metrics) {
        let (socket, to, _, _) = &self.items[run[0]];
        let b = &sockets[*socket];
        if run.len() == 1 || !self.gso {
            for &i in run {
                send_one(b, &self.items[i].2, *to, metrics);
            }
            return;
        }
        match send_gso(b, run.iter().map(|&i| &self.items[i].2[..]), size, *to) {
            Ok(()) => metrics.udp_gso_sends.inc(),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) || e.raw_os_error() == Some(nix::libc::ENOBUFS) => {
                metrics.udp_send_errors.inc_by(run.len() as u64);
                tracing::debug!(error = %e, %to, "send failed");
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::EMSGSIZE) => {
                // A segment above the path MTU: plain sends for this run (the kernel may fragment).
                for &i in run {
                    send_one(b, &self.items[i].2, *to, metrics);
                }
            }
            Err(e) => {
                // EIO (no checksum offload), EINVAL (too old a kernel) and the like: plain sends
                // from now on.
                warn!(error = %e, "UDP GSO refused; sending datagrams one by one");
                self.gso = false;
                for &i in run {
                    send_one(b, &self.items[i].2, *to, metrics);
                }
            }
        }
    }
}

/// How many of the datagrams (lengths `lens`, not empty) one GSO send can carry from the first:
/// those of the first one's size, then at most one shorter, within the kernel's limits; at least 1.
fn gso_run_len(lens: &[usize]) -> usize {
    let size = lens[0];
    let (mut n, mut bytes) = (0, 0);
    for &len in lens {
        if n == GSO_MAX_SEGMENTS || bytes + len > GSO_MAX_BYTES || len > size || len == 0 {
            break;
        }
        n += 1;
        bytes += len;
        if len < size {
            break;
        }
    }
    n.max(1)
}

fn send_one(b: &Bound, data: &[u8], to: SocketAddr, metrics: &Metrics) {
    if let Err(e) = b.socket.send_to(data, to) {
        metrics.udp_send_errors.inc();
        tracing::debug!(error = %e, remote = %to, "send failed");
    }
}

#[cfg(target_os = "linux")]
fn send_gso<'a>(b: &Bound, segments: impl Iterator<Item = &'a [u8]>, size: usize, to: SocketAddr) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
    use std::os::fd::AsRawFd;
    let iov: Vec<std::io::IoSlice<'_>> = segments.map(std::io::IoSlice::new).collect();
    let segment = size as u16;
    let addr = SockaddrStorage::from(to);
    sendmsg(b.socket.as_raw_fd(), &iov, &[ControlMessage::UdpGsoSegments(&segment)], MsgFlags::empty(), Some(&addr)).map(|_| ()).map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn send_gso<'a>(_: &Bound, _: impl Iterator<Item = &'a [u8]>, _: usize, _: SocketAddr) -> std::io::Result<()> {
    Err(std::io::Error::from(ErrorKind::Unsupported))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_runs_table() {
        let cases: &[(&[usize], usize)] = &[
            (&[1200], 1),
            (&[1200, 1200, 1200], 3),
            (&[1200, 1200, 700, 1200], 3),
            (&[1200, 700, 700], 2),
            (&[700, 1200], 1),
            (&[0, 0], 1),
            (&[1200, 0], 1),
            (&[100; 100], GSO_MAX_SEGMENTS),
            (&[1200; 60], GSO_MAX_BYTES / 1200),
        ];
        for (lens, want) in cases {
            assert_eq!(gso_run_len(lens), *want, "{lens:?}");
        }
    }
}
