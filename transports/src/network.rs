//! The libp2p swarm of a node, run by one task, reached through a [`Client`].
//!
//! This module owns the node's network: transports (TCP + Noise + Yamux, and
//! QUIC), connection limits, identify, ping, optional mDNS, and the delivery
//! request-response protocol. Nothing else touches the [`Swarm`].
//!
//! ```text
//!                 Command (bounded, 64)               swarm events
//!   Client ─┐   ────────────────────────▶  EventLoop ◀────────────── libp2p
//!   Client ─┤   ◀──── oneshot reply ─────   (one task,
//!   Client ─┘                                owns the Swarm)
//!                                              │  Event (bounded, 256)
//!                                              ▼
//!                                            node: reads Event::Inbound(batch),
//!                                                  stores, calls batch.respond(..)
//!                                              │
//!              oneshot ◀───────────────────────┘ the EventLoop holds the libp2p
//!                                                ResponseChannel until then
//! ```
//!
//! The event loop never waits on the node: events are offered with
//! `try_send`, and an inbound batch the node cannot take right now is answered
//! `Rejected(Unavailable)` so that the sender retries later. Bad frames are
//! answered by the event loop itself and reported as [`Event::InvalidFrame`];
//! they never reach the node.
//!
//! Outbound, [`Client::deliver`] encodes a batch, the event loop hands it to
//! request-response together with the peer's addresses (so a peer we are not
//! connected to is dialed), and matches the answer back by request id.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt as _};
use libp2p::core::transport::TransportError;
use libp2p::identity::Keypair;
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    connection_limits, identify, mdns, multiaddr::Protocol, noise, ping, tcp, yamux, Multiaddr,
    PeerId, Swarm, SwarmBuilder,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::codec::{Codec, Request, PROTOCOL};
use crate::conduct::{Meter, Offence, Rules, Verdict};
use crate::wire::{
    decode_batch, encode_batch, DeliveryResponse, Envelope, Receipt, Refusal, WireError,
    DELIVERY_PROTOCOL,
};

/// Commands waiting for the event loop. Each is a small message answered
/// quickly, so 64 absorbs a burst from all of the node's actors; beyond that a
/// caller waits, which is the back-pressure we want.
const COMMAND_CAPACITY: usize = 64;
/// Events waiting for the node. Large enough for a burst of inbound batches
/// and connection changes while the node commits to storage; when it is full
/// the event loop refuses new batches rather than wait (see the module header).
const EVENT_CAPACITY: usize = 256;
/// How long [`spawn`] waits for every listener to report its first address.
const LISTEN_WAIT: Duration = Duration::from_secs(5);
/// How often mDNS asks the LAN who is there. The libp2p default is five
/// minutes; a person opening a laptop next to a friend's expects seconds.
const MDNS_QUERY_INTERVAL: Duration = Duration::from_secs(15);
/// Protocol name of identify, so that protonode nodes recognise each other.
const IDENTIFY_PROTOCOL: &str = "/protonode/id/1";
/// Request-response streams (both directions) on one connection at once.
/// A sender has about one batch in flight per peer; 32 leaves room for
/// retries and several relationships, and bounds the memory a peer can pin
/// with half-sent frames to 32 × 4 MiB per connection.
const MAX_STREAMS_PER_CONNECTION: usize = 32;

/// What went wrong while starting or talking to the network.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot set up the network transports: {0}")]
    Transport(String),
    #[error(
        "cannot listen on {addr} (check that the port is free and the address belongs to this machine)"
    )]
    Listen {
        addr: Multiaddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot listen on {addr}: another program holds its port (another protonode daemon?); \
         stop it, or give this node other ports: network.tcp_port and network.quic_port in its \
         config.toml (0 picks one at each start), or another address in --listen or \
         network.listen where those are given"
    )]
    InUse { addr: Multiaddr },
    #[error("the node listens on no address; configure network.listen or the tcp/quic ports")]
    NoListener,
    #[error("the network has stopped; restart the node")]
    Stopped,
}

/// Why a delivery (or a dial) did not get an answer from the peer.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("cannot send this batch: {0}")]
    Encode(#[from] WireError),
    #[error("cannot reach the peer: {0}; check its addresses, or retry when it is online")]
    Dial(String),
    #[error("the peer did not answer in time; retry (a receiver ignores duplicates)")]
    Timeout,
    #[error(
        "the connection closed before the peer answered; retry (a receiver ignores duplicates)"
    )]
    ConnectionClosed,
    #[error(
        "the peer does not speak {DELIVERY_PROTOCOL}; it may run an incompatible protonode version"
    )]
    UnsupportedProtocol,
    #[error("the delivery stream failed: {0}; retry")]
    Io(String),
    #[error("the peer refused the whole request: {0}")]
    Rejected(Refusal),
    #[error("the peer's answer is not valid: {0}")]
    BadResponse(String),
    #[error("the network has stopped; restart the node")]
    Stopped,
}

impl DeliveryError {
    /// Whether trying again later may succeed without changing the request:
    /// the peer was unreachable, slow, busy, or the stream broke.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            DeliveryError::Dial(_)
                | DeliveryError::Timeout
                | DeliveryError::ConnectionClosed
                | DeliveryError::Io(_)
                | DeliveryError::Rejected(Refusal::Unavailable)
        )
    }
}

/// What the network tells the node.
#[derive(Debug)]
pub enum Event {
    /// A peer delivered a valid batch; answer it with [`InboundBatch::respond`].
    Inbound(InboundBatch),
    /// First connection with a peer (a good moment to retry its outbox).
    PeerConnected { peer: PeerId },
    /// Last connection with a peer closed.
    PeerDisconnected { peer: PeerId },
    /// mDNS found a peer on the LAN at these addresses (each ending in
    /// `/p2p/<peer>`). They are remembered for dials; nothing is dialed
    /// automatically.
    Discovered { peer: PeerId, addrs: Vec<Multiaddr> },
    /// The set of addresses the node listens on changed; here is all of it.
    /// Also sent while [`spawn`] starts the listeners.
    ListenAddrsChanged(Vec<Multiaddr>),
    /// A peer sent a frame that was refused without reaching the node.
    InvalidFrame { peer: PeerId, refusal: Refusal },
}

/// A valid batch of envelopes from a peer, waiting for the node's receipts.
///
/// Answer with [`respond`](Self::respond) once the envelopes are durably
/// stored, or [`reject`](Self::reject). Dropping it unanswered answers
/// `Refused(Unavailable)` for every envelope, so the sender retries.
#[derive(Debug)]
pub struct InboundBatch {
    pub peer: PeerId,
    pub envelopes: Vec<Envelope>,
    /// Envelopes received, kept apart because the node may take `envelopes`.
    count: usize,
    reply: oneshot::Sender<DeliveryResponse>,
}

impl InboundBatch {
    /// Answers with one receipt per envelope, in order. A wrong count is a
    /// bug in the caller: the answer is fixed up (extra receipts dropped,
    /// missing ones `Refused(Unavailable)`) so the sender stays consistent.
    pub fn respond(self, mut receipts: Vec<Receipt>) {
        if receipts.len() != self.count {
            warn!(
                peer = %self.peer,
                expected = self.count,
                given = receipts.len(),
                "wrong number of receipts for an inbound batch; answering the rest as unavailable"
            );
            receipts.resize(self.count, Receipt::Refused(Refusal::Unavailable));
        }
        // The event loop may have stopped or the peer given up; either way
        // there is no one left to tell.
        let _ = self.reply.send(DeliveryResponse::Receipts(receipts));
    }

    /// Refuses the whole batch, e.g. `Unavailable` while storage is failing.
    pub fn reject(self, refusal: Refusal) {
        let _ = self.reply.send(DeliveryResponse::Rejected(refusal));
    }
}

/// A snapshot of the network's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub peer_id: PeerId,
    pub listen_addrs: Vec<Multiaddr>,
    /// Addresses announced in the configuration (and any confirmed later).
    pub external_addrs: Vec<Multiaddr>,
    pub connected_peers: Vec<PeerId>,
    /// Whether mDNS discovery runs (configured on, and it could start).
    pub mdns: bool,
}

/// A cloneable handle to the network's event loop.
#[derive(Clone, Debug)]
pub struct Client {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
}

/// The event loop is gone; callers turn this into their module's `Stopped`.
struct LoopStopped;

impl Client {
    /// This node's libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Delivers `envelopes` to `peer` in one request, dialing `addrs` if not
    /// connected, and returns one receipt per envelope.
    pub async fn deliver(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        envelopes: &[Envelope],
    ) -> Result<Vec<Receipt>, DeliveryError> {
        let frame = encode_batch(envelopes)?;
        match self.deliver_raw(peer, addrs, frame).await? {
            DeliveryResponse::Receipts(receipts) if receipts.len() == envelopes.len() => {
                Ok(receipts)
            }
            DeliveryResponse::Receipts(receipts) => Err(DeliveryError::BadResponse(format!(
                "{} receipts for {} envelopes",
                receipts.len(),
                envelopes.len()
            ))),
            DeliveryResponse::Rejected(refusal) => Err(DeliveryError::Rejected(refusal)),
        }
    }

    /// Sends `frame` as it is and returns the peer's answer. Meant for tests
    /// that prove a receiver refuses malformed or oversize input.
    pub async fn deliver_raw(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        frame: Vec<u8>,
    ) -> Result<DeliveryResponse, DeliveryError> {
        self.request(|reply| Command::Deliver {
            peer,
            addrs,
            frame,
            reply,
        })
        .await
        .map_err(|LoopStopped| DeliveryError::Stopped)?
    }

    /// Connects to `peer` (at `addrs` or any address already known) and
    /// returns once connected. The connection then stays open for the
    /// configured idle timeout.
    pub async fn dial(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(), DeliveryError> {
        self.request(|reply| Command::Dial { peer, addrs, reply })
            .await
            .map_err(|LoopStopped| DeliveryError::Stopped)?
    }

    pub async fn status(&self) -> Result<Status, Error> {
        self.request(|reply| Command::Status { reply })
            .await
            .map_err(|LoopStopped| Error::Stopped)
    }

    /// Closes every connection with `peer`. Not being connected is fine.
    pub async fn disconnect(&self, peer: PeerId) -> Result<(), Error> {
        self.request(|reply| Command::Disconnect { peer, reply })
            .await
            .map_err(|LoopStopped| Error::Stopped)
    }

    /// Stops the event loop and closes all connections. Later calls on any
    /// clone return `Stopped`. Stopping a stopped loop is fine.
    pub async fn shutdown(&self) {
        let _ = self.request(|reply| Command::Shutdown { reply }).await;
    }

    async fn request<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, LoopStopped> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| LoopStopped)?;
        answer.await.map_err(|_| LoopStopped)
    }
}

/// What a [`Client`] asks of the event loop; each carries its reply channel.
#[derive(Debug)]
enum Command {
    Deliver {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        frame: Vec<u8>,
        reply: oneshot::Sender<Result<DeliveryResponse, DeliveryError>>,
    },
    Dial {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<(), DeliveryError>>,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    Disconnect {
        peer: PeerId,
        reply: oneshot::Sender<()>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    /// First, so that a connection over the limits is refused before any
    /// other behaviour spends anything on it.
    limits: connection_limits::Behaviour,
    delivery: request_response::Behaviour<Codec>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// Starts the network: builds the swarm, listens on `config.listen_addrs()`,
/// announces `config.announce_addrs()`, waits (up to 5 s) until every
/// listener has reported its first address or failed, then runs the event
/// loop on the current tokio runtime.
///
/// Fails if no listener could start. Listening on `0.0.0.0` reports one
/// address per interface. Returns the client, the node's event stream, and
/// the event loop's task, which ends after [`Client::shutdown`] or once every
/// client is dropped.
pub async fn spawn(
    config: &config::Network,
    keypair: Keypair,
) -> Result<(Client, mpsc::Receiver<Event>, JoinHandle<()>), Error> {
    let peer_id = keypair.public().to_peer_id();
    let swarm = build_swarm(config, keypair)?;
    let (command_tx, command_rx) = mpsc::channel(COMMAND_CAPACITY);
    let (event_tx, event_rx) = mpsc::channel(EVENT_CAPACITY);
    let mut event_loop = EventLoop {
        swarm,
        commands: command_rx,
        events: event_tx,
        pending_deliveries: HashMap::new(),
        pending_dials: HashMap::new(),
        pending_responses: FuturesUnordered::new(),
        request_timeout: config.request_timeout(),
        conduct: Meter::new(Rules::default()),
        connections: HashMap::new(),
    };
    event_loop.start_listening(config).await?;
    let task = tokio::spawn(event_loop.run());
    let client = Client {
        peer_id,
        commands: command_tx,
    };
    Ok((client, event_rx, task))
}

fn build_swarm(config: &config::Network, keypair: Keypair) -> Result<Swarm<Behaviour>, Error> {
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(config.max_connections_per_peer))
        .with_max_pending_outgoing(Some(config.max_pending_dials))
        .with_max_pending_incoming(Some(config.max_pending_incoming));
    let delivery_config = request_response::Config::default()
        .with_request_timeout(config.request_timeout())
        .with_max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
    let idle_timeout = config.idle_connection_timeout();
    let want_mdns = config.mdns;

    // The behaviour below is built infallibly (mDNS degrades instead of
    // failing), so `with_behaviour`'s error type is `Infallible`.
    let Ok(builder) = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| Error::Transport(format!("noise: {e}")))?
        .with_quic()
        .with_behaviour(|key| {
            let local_peer_id = key.public().to_peer_id();
            let mdns = want_mdns
                .then(|| {
                    let config = mdns::Config {
                        query_interval: MDNS_QUERY_INTERVAL,
                        ..Default::default()
                    };
                    // A node without mDNS still works with explicit
                    // addresses, so a failure here is a warning, not fatal.
                    mdns::tokio::Behaviour::new(config, local_peer_id)
                        .inspect_err(|e| warn!("mDNS could not start, LAN discovery is off: {e}"))
                        .ok()
                })
                .flatten();
            Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                delivery: request_response::Behaviour::with_codec(
                    Codec,
                    [(PROTOCOL, ProtocolSupport::Full)],
                    delivery_config,
                ),
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                        .with_agent_version(format!("protonode/{}", env!("CARGO_PKG_VERSION"))),
                ),
                ping: ping::Behaviour::new(ping::Config::new()),
                mdns: Toggle::from(mdns),
            }
        });
    // Connections with no open stream close after this long; an open delivery
    // keeps its connection alive regardless. Set on purpose: libp2p's default
    // (10 s) would drop a contact between two messages of a conversation.
    Ok(builder
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle_timeout))
        .build())
}

/// A delivery waiting for the peer's answer.
struct PendingDelivery {
    peer: PeerId,
    reply: oneshot::Sender<Result<DeliveryResponse, DeliveryError>>,
    /// The last reason a dial to `peer` failed while this delivery waited,
    /// so that a `DialFailure` can say why.
    dial_error: Option<String>,
}

/// An inbound request waiting for the node's answer (or its timeout).
type PendingResponse = Pin<
    Box<
        dyn Future<
                Output = (
                    PeerId,
                    request_response::ResponseChannel<DeliveryResponse>,
                    DeliveryResponse,
                ),
            > + Send,
    >,
>;

/// Owns the swarm; see the module header.
struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    pending_deliveries: HashMap<OutboundRequestId, PendingDelivery>,
    pending_dials: HashMap<ConnectionId, oneshot::Sender<Result<(), DeliveryError>>>,
    /// Bounded in time: each resolves within the request timeout, after which
    /// libp2p has dropped the stream anyway.
    pending_responses: FuturesUnordered<PendingResponse>,
    request_timeout: Duration,
    /// Scores of peers that waste the node's work; see [`crate::conduct`].
    conduct: Meter,
    /// Each peer's open connections and when they were established.
    connections: HashMap<PeerId, Vec<(ConnectionId, Instant)>>,
}

/// How much older than a peer's new inbound connection its other
/// connections must be to be taken for dead (see
/// [`EventLoop::close_stale`]). Two nodes that dial each other at once
/// make two connections within a round trip or so of each other; should
/// both be closed, the deliveries on them fail and go again, on a new one.
const STALE_AFTER: Duration = Duration::from_millis(500);

impl EventLoop {
    /// A peer dialed us while we hold older connections with it. Nodes dial
    /// only peers they hold no connection with, so those are dead on its
    /// side: it restarted, or lost them. Over QUIC nothing tells us so
    /// until the idle timeout, and requests sent over them meanwhile wait
    /// out their timeout: close them now. (Younger ones may be the other
    /// half of a simultaneous dial, and stay.) Returns whether any closed.
    fn close_stale(&mut self, peer: PeerId) -> bool {
        let now = Instant::now();
        let stale: Vec<ConnectionId> = self
            .connections
            .get(&peer)
            .into_iter()
            .flatten()
            .filter(|(_, at)| now.saturating_duration_since(*at) >= STALE_AFTER)
            .map(|(c, _)| *c)
            .collect();
        for c in &stale {
            debug!(%peer, connection = ?c, "the peer dialed us again: closing an older connection, dead on its side");
            self.swarm.close_connection(*c);
        }
        !stale.is_empty()
    }

    async fn start_listening(&mut self, config: &config::Network) -> Result<(), Error> {
        let mut waiting = HashMap::new();
        let mut failures = Vec::new();
        for addr in config.listen_addrs() {
            // libp2p listens on TCP with SO_REUSEPORT, so a second node on the
            // same port would silently share it (the kernel hands each
            // incoming connection to one of the two); a QUIC port in use
            // would only cost this node that transport. Either way contacts
            // would not reach it where they look for it, so stop here.
            if in_use(&addr) {
                return Err(Error::InUse { addr });
            }
            match self.swarm.listen_on(addr.clone()) {
                Ok(id) => {
                    waiting.insert(id, addr);
                }
                Err(e) => failures.push((addr, transport_error(e))),
            }
        }
        for addr in config.announce_addrs() {
            self.swarm.add_external_address(addr);
        }

        let deadline = tokio::time::Instant::now() + LISTEN_WAIT;
        while !waiting.is_empty() {
            let Ok(event) = tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await
            else {
                warn!(
                    still_waiting = ?waiting.values().collect::<Vec<_>>(),
                    "some listeners reported no address in time"
                );
                break;
            };
            match &event {
                SwarmEvent::NewListenAddr { listener_id, .. } => {
                    waiting.remove(listener_id);
                }
                SwarmEvent::ListenerClosed {
                    listener_id,
                    reason,
                    ..
                } => {
                    if let Some(addr) = waiting.remove(listener_id) {
                        let source = match reason {
                            Err(e) => io::Error::new(e.kind(), e.to_string()),
                            Ok(()) => io::Error::other("the listener closed"),
                        };
                        failures.push((addr, source));
                    }
                }
                SwarmEvent::ListenerError { listener_id, error } => {
                    if let Some(addr) = waiting.remove(listener_id) {
                        failures.push((addr, io::Error::new(error.kind(), error.to_string())));
                    }
                }
                _ => {}
            }
            self.on_swarm_event(event);
        }

        for (addr, source) in &failures {
            warn!(%addr, "cannot listen: {source}");
        }
        if self.swarm.listeners().next().is_none() {
            return Err(match failures.into_iter().next() {
                Some((addr, source)) => Error::Listen { addr, source },
                None => Error::NoListener,
            });
        }
        info!(
            peer_id = %self.swarm.local_peer_id(),
            listen_addrs = ?self.swarm.listeners().collect::<Vec<_>>(),
            "network started"
        );
        Ok(())
    }

    async fn run(mut self) {
        let shutdown = loop {
            // Unbiased on purpose: a flood of inbound traffic must not starve
            // the node's own commands, nor a burst of commands the network.
            tokio::select! {
                Some((peer, channel, response)) = self.pending_responses.next(),
                    if !self.pending_responses.is_empty() => self.answer_batch(peer, channel, response),
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown { reply }) => break Some(reply),
                    Some(command) => self.on_command(command),
                    // Every client is gone: no one can use the network any more.
                    None => break None,
                },
            }
        };
        info!("network stopping");
        // Dropping the loop closes every connection, fails every pending
        // delivery and queued command with `Stopped`, and ends the node's
        // event stream. Answer the shutdown only once that is done.
        drop(self);
        if let Some(reply) = shutdown {
            let _ = reply.send(());
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Deliver {
                peer,
                addrs,
                frame,
                reply,
            } => {
                if peer == *self.swarm.local_peer_id() {
                    let _ = reply.send(Err(DeliveryError::Dial(
                        "that is this node's own peer id".into(),
                    )));
                    return;
                }
                let addrs = self.remember_addresses(peer, addrs);
                let id = self
                    .swarm
                    .behaviour_mut()
                    .delivery
                    .send_request_with_addresses(&peer, Request::Frame(frame), addrs);
                self.pending_deliveries.insert(
                    id,
                    PendingDelivery {
                        peer,
                        reply,
                        dial_error: None,
                    },
                );
            }
            Command::Dial { peer, addrs, reply } => {
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                let addrs = self.remember_addresses(peer, addrs);
                let opts = DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .extend_addresses_through_behaviour()
                    .condition(PeerCondition::Disconnected)
                    .build();
                let connection = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.pending_dials.insert(connection, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(DeliveryError::Dial(e.to_string())));
                    }
                }
            }
            Command::Status { reply } => {
                let swarm = &self.swarm;
                let _ = reply.send(Status {
                    peer_id: *swarm.local_peer_id(),
                    listen_addrs: swarm.listeners().cloned().collect(),
                    external_addrs: swarm.external_addresses().cloned().collect(),
                    connected_peers: swarm.connected_peers().copied().collect(),
                    mdns: swarm.behaviour().mdns.is_enabled(),
                });
            }
            Command::Disconnect { peer, reply } => {
                // `Err` only means there was no connection to close.
                let _ = self.swarm.disconnect_peer_id(peer);
                let _ = reply.send(());
            }
            Command::Shutdown { reply } => {
                // Handled by `run`, which must leave its loop.
                let _ = reply.send(());
            }
        }
    }

    /// Adds `addrs` to the swarm's address book for `peer` (request-response
    /// and identify serve it to later dials) and returns them in the form the
    /// book stores, ending in `/p2p/<peer>`, so that a dial given both does
    /// not try the same address twice. An address naming another peer is
    /// dropped.
    fn remember_addresses(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) -> Vec<Multiaddr> {
        addrs
            .into_iter()
            .filter_map(|addr| match addr.with_p2p(peer) {
                Ok(addr) => {
                    self.swarm.add_peer_address(peer, addr.clone());
                    Some(addr)
                }
                Err(addr) => {
                    warn!(%peer, %addr, "ignoring an address that names another peer");
                    None
                }
            })
            .collect()
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Delivery(event)) => self.on_delivery_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in found {
                    by_peer.entry(peer).or_default().push(addr);
                }
                for (peer, addrs) in by_peer {
                    debug!(%peer, ?addrs, "discovered on the LAN");
                    let addrs = self.remember_addresses(peer, addrs);
                    // A delivery waiting on stale addresses (the peer moved)
                    // goes out over the new ones now rather than after its
                    // dial times out.
                    let waiting = self.pending_deliveries.values().any(|p| p.peer == peer);
                    if waiting && !addrs.is_empty() && !self.swarm.is_connected(&peer) {
                        let opts = DialOpts::peer_id(peer)
                            .addresses(addrs.clone())
                            .condition(PeerCondition::Disconnected)
                            .build();
                        if let Err(e) = self.swarm.dial(opts) {
                            debug!(%peer, "dialing a peer found on the LAN failed: {e}");
                        }
                    }
                    self.emit(Event::Discovered { peer, addrs });
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(_))) => {}
            SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) => {
                debug!(?event, "identify");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(_)) => {}
            SwarmEvent::Behaviour(BehaviourEvent::Limits(never)) => match never {},
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                num_established,
                endpoint,
                ..
            } => {
                debug!(peer = %peer_id, address = %endpoint.get_remote_address(), "connected");
                if endpoint.is_listener() && self.conduct.is_banned(&peer_id, Instant::now()) {
                    debug!(peer = %peer_id, "closing a connection from a banned peer");
                    self.swarm.close_connection(connection_id);
                    return;
                }
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(()));
                }
                let closed = endpoint.is_listener() && self.close_stale(peer_id);
                self.connections
                    .entry(peer_id)
                    .or_default()
                    .push((connection_id, Instant::now()));
                if num_established.get() == 1 || closed {
                    self.emit(Event::PeerConnected { peer: peer_id });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                debug!(peer = %peer_id, ?cause, "connection closed");
                if let Some(open) = self.connections.get_mut(&peer_id) {
                    open.retain(|(c, _)| *c != connection_id);
                    if open.is_empty() {
                        self.connections.remove(&peer_id);
                    }
                }
                if num_established == 0 {
                    self.emit(Event::PeerDisconnected { peer: peer_id });
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                let reason = error.to_string();
                debug!(peer = ?peer_id, "dial failed: {reason}");
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(DeliveryError::Dial(reason.clone())));
                }
                // The swarm reports this before request-response fails the
                // deliveries waiting on that dial; keep it for their error.
                if let Some(peer) = peer_id {
                    for pending in self.pending_deliveries.values_mut() {
                        if pending.peer == peer {
                            pending.dial_error = Some(reason.clone());
                        }
                    }
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                self.emit_listen_addrs();
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                info!(%address, "no longer listening");
                self.emit_listen_addrs();
            }
            SwarmEvent::ListenerClosed {
                addresses, reason, ..
            } => {
                warn!(?addresses, ?reason, "listener closed");
                self.emit_listen_addrs();
            }
            SwarmEvent::ListenerError { error, .. } => warn!("listener error: {error}"),
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => debug!(%send_back_addr, "incoming connection failed: {error}"),
            _ => {}
        }
    }

    fn on_delivery_event(&mut self, event: request_response::Event<Request, DeliveryResponse>) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => self.on_inbound_request(peer, request, channel),
            request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(pending) = self.pending_deliveries.remove(&request_id) {
                    let _ = pending.reply.send(Ok(response));
                }
            }
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(pending) = self.pending_deliveries.remove(&request_id) {
                    let error = delivery_error(error, pending.dial_error);
                    debug!(peer = %pending.peer, "delivery failed: {error}");
                    let _ = pending.reply.send(Err(error));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, "inbound delivery failed: {error}");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_inbound_request(
        &mut self,
        peer: PeerId,
        request: Request,
        channel: request_response::ResponseChannel<DeliveryResponse>,
    ) {
        // A peer that wasted too much of our work is answered unread.
        match self.conduct.verdict(peer, Instant::now()) {
            Verdict::Serve => {}
            Verdict::Throttle => {
                let verdict = self
                    .conduct
                    .offend(peer, Offence::WhileThrottled, Instant::now());
                self.enforce(peer, verdict);
                return self.answer(channel, DeliveryResponse::Rejected(Refusal::Unavailable));
            }
            Verdict::Disconnect => {
                self.enforce(peer, Verdict::Disconnect);
                return self.answer(channel, DeliveryResponse::Rejected(Refusal::Unavailable));
            }
        }
        let frame = match request {
            Request::Frame(frame) => frame,
            Request::Oversize { declared } => {
                debug!(%peer, declared, "refusing an oversize frame");
                return self.refuse(peer, channel, Refusal::TooLarge);
            }
        };
        let envelopes = match decode_batch(&frame) {
            Ok(envelopes) => envelopes,
            Err(e) => {
                debug!(%peer, "refusing a frame: {e}");
                return self.refuse(peer, channel, e.refusal());
            }
        };
        let count = envelopes.len();
        let (reply, answer) = oneshot::channel();
        let batch = InboundBatch {
            peer,
            envelopes,
            count,
            reply,
        };
        match self.events.try_send(Event::Inbound(batch)) {
            Ok(()) => {
                let timeout = self.request_timeout;
                self.pending_responses.push(Box::pin(async move {
                    let response = match tokio::time::timeout(timeout, answer).await {
                        Ok(Ok(response)) => response,
                        // Dropped unanswered, or the node took longer than the
                        // sender waits: tell it to retry.
                        Ok(Err(_)) | Err(_) => {
                            DeliveryResponse::Receipts(vec![
                                Receipt::Refused(Refusal::Unavailable);
                                count
                            ])
                        }
                    };
                    (peer, channel, response)
                }));
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(%peer, "the node is not keeping up with inbound deliveries; asking the sender to retry");
                self.answer(channel, DeliveryResponse::Rejected(Refusal::Unavailable));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                warn!(%peer, "no one reads inbound deliveries; asking the sender to retry");
                self.answer(channel, DeliveryResponse::Rejected(Refusal::Unavailable));
            }
        }
    }

    /// Answers a bad frame and tells the node who sent it.
    fn refuse(
        &mut self,
        peer: PeerId,
        channel: request_response::ResponseChannel<DeliveryResponse>,
        refusal: Refusal,
    ) {
        self.answer(channel, DeliveryResponse::Rejected(refusal));
        self.emit(Event::InvalidFrame { peer, refusal });
        let verdict = self
            .conduct
            .offend(peer, Offence::InvalidFrame, Instant::now());
        self.enforce(peer, verdict);
    }

    /// Sends the node's answer to a batch, counting the envelopes it could
    /// not resolve against the peer.
    fn answer_batch(
        &mut self,
        peer: PeerId,
        channel: request_response::ResponseChannel<DeliveryResponse>,
        response: DeliveryResponse,
    ) {
        let unknown = match &response {
            DeliveryResponse::Receipts(receipts) => receipts
                .iter()
                .filter(|r| **r == Receipt::Refused(Refusal::UnknownAddress))
                .count(),
            DeliveryResponse::Rejected(_) => 0,
        };
        self.answer(channel, response);
        if unknown > 0 {
            let verdict =
                self.conduct
                    .offend(peer, Offence::UnknownAddresses(unknown), Instant::now());
            self.enforce(peer, verdict);
        }
    }

    /// Acts on the meter's verdict: a peer over the limit is disconnected
    /// (and, while banned, its new connections are closed on arrival).
    fn enforce(&mut self, peer: PeerId, verdict: Verdict) {
        match verdict {
            Verdict::Serve => {}
            Verdict::Throttle => {
                debug!(%peer, "throttled: its requests are refused unread for now");
            }
            Verdict::Disconnect => {
                if self.swarm.is_connected(&peer) {
                    warn!(
                        %peer,
                        "disconnected a peer that kept sending unresolvable or invalid requests; \
                         its connections are refused for a while"
                    );
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
        }
    }

    fn answer(
        &mut self,
        channel: request_response::ResponseChannel<DeliveryResponse>,
        response: DeliveryResponse,
    ) {
        if self
            .swarm
            .behaviour_mut()
            .delivery
            .send_response(channel, response)
            .is_err()
        {
            debug!("the peer stopped waiting for an answer (timeout or closed connection)");
        }
    }

    fn emit_listen_addrs(&mut self) {
        let addrs = self.swarm.listeners().cloned().collect();
        self.emit(Event::ListenAddrsChanged(addrs));
    }

    /// Offers an event to the node without waiting (see the module header).
    fn emit(&mut self, event: Event) {
        match self.events.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => {
                warn!(
                    ?event,
                    "the node is not keeping up with network events; dropped one"
                );
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

fn delivery_error(failure: OutboundFailure, dial_error: Option<String>) -> DeliveryError {
    match failure {
        OutboundFailure::DialFailure => DeliveryError::Dial(
            dial_error.unwrap_or_else(|| "no known address of the peer could be dialed".into()),
        ),
        OutboundFailure::Timeout => DeliveryError::Timeout,
        OutboundFailure::ConnectionClosed => DeliveryError::ConnectionClosed,
        OutboundFailure::UnsupportedProtocols => DeliveryError::UnsupportedProtocol,
        // The codec reports an oversize or undecodable answer as invalid data.
        OutboundFailure::Io(e) if e.kind() == io::ErrorKind::InvalidData => {
            DeliveryError::BadResponse(e.to_string())
        }
        OutboundFailure::Io(e) => DeliveryError::Io(e.to_string()),
    }
}

/// Whether another socket is bound to `addr`'s fixed port (a port of 0 is
/// never in use). Binds the port without SO_REUSEPORT, which only a port
/// nobody else holds allows, and frees it at once for the swarm to take.
/// Any other failure (say, an address not of this machine) is for the
/// swarm's own listen to report.
fn in_use(addr: &Multiaddr) -> bool {
    let mut parts = addr.iter();
    let ip = match parts.next() {
        Some(Protocol::Ip4(ip)) => IpAddr::V4(ip),
        Some(Protocol::Ip6(ip)) => IpAddr::V6(ip),
        _ => return false,
    };
    let (kind, port) = match parts.next() {
        Some(Protocol::Tcp(port)) if port != 0 => (socket2::Type::STREAM, port),
        Some(Protocol::Udp(port)) if port != 0 => (socket2::Type::DGRAM, port),
        _ => return false,
    };
    let address = SocketAddr::new(ip, port);
    let probe = || -> io::Result<()> {
        let socket = socket2::Socket::new(socket2::Domain::for_address(address), kind, None)?;
        // As libp2p binds: an IPv6 address alone (not also IPv4, which
        // this node may listen on itself), and a TCP port in TIME_WAIT
        // after a restart is free.
        if address.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        if kind == socket2::Type::STREAM {
            socket.set_reuse_address(true)?;
        }
        socket.bind(&address.into())?;
        if kind == socket2::Type::STREAM {
            socket.listen(1)?;
        }
        Ok(())
    };
    matches!(probe(), Err(e) if e.kind() == io::ErrorKind::AddrInUse)
}

fn transport_error(error: TransportError<io::Error>) -> io::Error {
    match error {
        TransportError::MultiaddrNotSupported(addr) => io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("no transport supports {addr} (use /ip4/…/tcp/… or /ip4/…/udp/…/quic-v1)"),
        ),
        TransportError::Other(e) => e,
    }
}
