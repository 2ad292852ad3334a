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
        deliver(core, &sockets, &by_local, metrics);
        if core.stop {
            deliver(core, &sockets, &by_local, metrics);
            return Ok(());
        }
    }
}

fn deliver(core: &mut Core, sockets: &[Bound], by_local: &HashMap<SocketAddr, usize>, metrics: &Metrics) {
    while let Some(out) = core.engine.poll_output() {
        match out {
            Output::Transmit { local, remote, data } => {
                let i = by_local.get(&local).copied().unwrap_or_else(|| {
                    sockets.iter().position(|b| b.advertised.is_ipv4() == remote.is_ipv4()).unwrap_or(0)
                });
                if let Err(e) = sockets[i].socket.send_to(&data, remote) {
                    metrics.udp_send_errors.inc();
                    tracing::debug!(error = %e, %remote, "send failed");
                }
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
}
