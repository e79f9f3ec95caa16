//! A running node: the pieces wired together.
//!
//! ```text
//!   transports event loop (tokio task, owns the Swarm)
//!      │ Event::Inbound ...                ▲ Client::deliver
//!      ▼                                   │
//!   receiving task ──InboxReady──▶ RelationshipManager ──▶ Proton actors
//!      │ (store_batch, ack)                 ▲    (actix, one thread)   │
//!      │ peer_reachable                     │ DeliveryOutcome          │ commit rows,
//!      ▼                                    │                          │ wake()
//!   sending service (tokio task) ◀─────────────────────────────────────┘
//! ```
//!
//! [`Node::start`] must run inside an actix system (the actors live on the
//! current arbiter); the two services and the swarm are plain tokio tasks,
//! as actix futures are not `Send`.

use std::sync::{Arc, RwLock};

use actix::prelude::*;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use transports::{identity::Keypair, Multiaddr, PeerId};

use crate::inbound;
use crate::manager::{self, DeliveryOutcome, InboxReady, ListenAddrsChanged, RelationshipManager};
use crate::model::now_ms;
use crate::outbox::{self, OutboxHandle};
use crate::proton::Shared;
use crate::relationship::{Lifetimes, NodeAddrs};
use crate::store::Store;
use crate::views::Event;

/// Events kept for slow `watch` clients before they miss some.
const EVENT_CAPACITY: usize = 1024;

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    // The source is not repeated in the message: the binary prints the
    // whole chain.
    #[error("starting the network failed")]
    Network(#[from] transports::Error),
    #[error("reading the node's keys failed")]
    Store(#[from] crate::store::StoreError),
}

/// A running node.
pub struct Node {
    pub manager: Addr<RelationshipManager>,
    events: broadcast::Sender<Event>,
    client: transports::Client,
    outbox: OutboxHandle,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    /// Starts the network, the services and the relationship manager.
    pub async fn start(
        store: Store,
        config: config::Config,
        keypair: Keypair,
    ) -> Result<Self, StartError> {
        let service = Arc::new(store.service_key()?);
        let (client, net_events, net_task) = transports::spawn(&config.network, keypair).await?;
        let status = client.status().await?;
        let node_addrs = Arc::new(RwLock::new(NodeAddrs {
            peer: status.peer_id,
            addrs: manager::advertised(&status.listen_addrs, &config.network.announce_addrs()),
            service_key: service.public(),
        }));
        let (events, _) = broadcast::channel(EVENT_CAPACITY);

        // The sending service reports outcomes to the manager, which is
        // created after it: hand it the address through a slot.
        let manager_slot: Arc<RwLock<Option<Addr<RelationshipManager>>>> =
            Arc::new(RwLock::new(None));
        let slot = manager_slot.clone();
        let on_outcome: outbox::OutcomeFn = Arc::new(move |outcome| {
            if let Ok(guard) = slot.read() {
                if let Some(addr) = guard.as_ref() {
                    addr.do_send(DeliveryOutcome(outcome));
                }
            }
        });
        let (outbox, outbox_task) = outbox::spawn(
            store.clone(),
            client.clone(),
            config.delivery.clone(),
            events.clone(),
            on_outcome,
        );

        let shared = Shared {
            store: store.clone(),
            outbox: outbox.clone(),
            events: events.clone(),
            node: node_addrs,
            lifetimes: Lifetimes::from(&config.delivery),
            config: config.delivery.clone(),
            notices: Arc::new(std::sync::OnceLock::new()),
        };
        let manager = RelationshipManager::new(shared, client.clone(), config).start();
        if let Ok(mut guard) = manager_slot.write() {
            *guard = Some(manager.clone());
        }
        let receiving = tokio::spawn(receive(
            store,
            Arc::new(crate::seal::Resolver::new((*service).clone())),
            net_events,
            manager.clone(),
            outbox.clone(),
        ));
        Ok(Self {
            manager,
            events,
            client,
            outbox,
            tasks: vec![net_task, outbox_task, receiving],
        })
    }

    pub fn peer_id(&self) -> PeerId {
        self.client.peer_id()
    }

    /// Where the node listens now.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.client
            .status()
            .await
            .map(|s| s.listen_addrs)
            .unwrap_or_default()
    }

    /// A stream of what happens (messages, deliveries, contacts).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The sending side of the event stream, to subscribe later.
    pub fn event_sender(&self) -> broadcast::Sender<Event> {
        self.events.clone()
    }

    /// The network client (for tests and benchmarks that probe the wire).
    pub fn client(&self) -> &transports::Client {
        &self.client
    }

    /// Stops the services and the network. Everything acknowledged is
    /// already durable; nothing needs flushing.
    pub async fn stop(self) {
        self.outbox.stop().await;
        self.client.shutdown().await;
        self.manager.do_send(StopManager);
        for task in self.tasks {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
        }
    }
}

/// Stops the relationship manager (and with it the proton actors it holds).
#[derive(Message)]
#[rtype(result = "()")]
struct StopManager;

impl Handler<StopManager> for RelationshipManager {
    type Result = ();
    fn handle(&mut self, _: StopManager, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

/// Most inbound batches handed to their groups' actors at once.
const DIRECT_IN_FLIGHT: usize = 256;

/// Longest an answer to our invitation waits to be filed before it is
/// acknowledged anyway (filing takes milliseconds; a busy disk may take
/// far longer, and the acceptor's node waits `request_timeout_secs`, 20 s
/// by default, before it tries again).
const WELCOMES_FILED_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Hands each owner its envelopes of `batch` (`direct` says whose they
/// are), stores the rest, and those whose owner could not take them, as
/// inbox rows, and answers the batch once all of it is durable and the
/// answers to our invitations among it are filed.
async fn deliver_direct(
    store: Store,
    service: Arc<crate::seal::Resolver>,
    manager: Addr<RelationshipManager>,
    batch: transports::InboundBatch,
    envelopes: Vec<transports::Envelope>,
    direct: Vec<Option<crate::records::Owner>>,
    now: u64,
) {
    let mut by_owner: Vec<(crate::records::Owner, Vec<usize>)> = Vec::new();
    for (i, owner) in direct.iter().enumerate() {
        let Some(owner) = owner else { continue };
        match by_owner.iter_mut().find(|(o, _)| o == owner) {
            Some((_, at)) => at.push(i),
            None => by_owner.push((*owner, vec![i])),
        }
    }
    let mut answers = Vec::with_capacity(by_owner.len());
    for (owner, at) in &by_owner {
        let entries = at
            .iter()
            .map(|&i| crate::records::InboxEntry {
                owner: *owner,
                source: crate::records::Source::Network,
                context: None,
                payload: envelopes[i].payload.clone(),
                received_at: now,
            })
            .collect();
        let (done, answer) = tokio::sync::oneshot::channel();
        manager.do_send(manager::Deliver(*owner, entries, done));
        answers.push(answer);
    }
    let mut taken = vec![false; envelopes.len()];
    for ((_, at), answer) in by_owner
        .iter()
        .zip(futures::future::join_all(answers).await)
    {
        if answer == Ok(true) {
            for &i in at {
                taken[i] = true;
            }
        }
    }
    let mut receipts = vec![transports::Receipt::Stored; envelopes.len()];
    let rest: Vec<usize> = (0..envelopes.len()).filter(|&i| !taken[i]).collect();
    if !rest.is_empty() {
        let left: Vec<transports::Envelope> = rest.iter().map(|&i| envelopes[i].clone()).collect();
        match store
            .write(move |tx| inbound::store_batch(tx, &left, &service, now))
            .await
        {
            Ok((stored, owners)) => {
                for (&i, receipt) in rest.iter().zip(stored) {
                    receipts[i] = receipt;
                }
                let tickets = owners
                    .iter()
                    .any(|o| matches!(o, crate::records::Owner::Ticket(_)));
                if !owners.is_empty() {
                    manager.do_send(InboxReady(owners));
                }
                if tickets {
                    // Whoever accepted our invitation hears "connected" once
                    // we can act on it; the answer is durable either way, so
                    // a manager that is slow or gone only delays the receipt.
                    let (filed, waiting) = tokio::sync::oneshot::channel();
                    manager.do_send(manager::WelcomesFiled(filed));
                    let _ = tokio::time::timeout(WELCOMES_FILED_WAIT, waiting).await;
                }
            }
            Err(e) => {
                // Unanswered: the sender is told Unavailable and retries.
                tracing::error!(error = %e, "storing received envelopes failed");
                return;
            }
        }
    }
    batch.respond(receipts);
}

/// The receiving service: stores inbound batches, acknowledges them, and
/// tells the manager which owners have new rows.
async fn receive(
    store: Store,
    service: Arc<crate::seal::Resolver>,
    mut events: mpsc::Receiver<transports::Event>,
    manager: Addr<RelationshipManager>,
    outbox: OutboxHandle,
) {
    // Batches handed to their groups' actors and not yet answered. At the
    // limit the service waits, and so the network stops reading from
    // peers, as it does while a batch is being stored.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(DIRECT_IN_FLIGHT));
    while let Some(event) = events.recv().await {
        match event {
            transports::Event::Inbound(mut batch) => {
                let peer = batch.peer;
                let envelopes = std::mem::take(&mut batch.envelopes);
                tracing::trace!(target: crate::TIMELINE, store = %store.name(), %peer, envelopes = envelopes.len(), "in: batch");
                let now = now_ms();
                // Envelopes their owners can process at once are handed to
                // them: one durable commit for storing and processing.
                // Answers to our invitations are acknowledged once filed.
                let (direct, tickets) = store
                    .read(|tx| {
                        let mut direct = Vec::with_capacity(envelopes.len());
                        let mut tickets = false;
                        for e in &envelopes {
                            direct.push(inbound::direct_owner(tx, e, &service, now)?);
                            tickets = tickets || inbound::answers_ticket(tx, e, now)?;
                        }
                        Ok((direct, tickets))
                    })
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "reading addresses failed; storing the batch");
                        (Vec::new(), false)
                    });
                if tickets || direct.iter().any(Option::is_some) {
                    // Answered from its own task, so that the next batch can
                    // reach its owners meanwhile (each owner's actor takes
                    // them in order, and commits them together).
                    let Ok(permit) = in_flight.clone().acquire_owned().await else {
                        return; // never closed
                    };
                    let task = deliver_direct(
                        store.clone(),
                        service.clone(),
                        manager.clone(),
                        batch,
                        envelopes,
                        direct,
                        now,
                    );
                    tokio::spawn(async move {
                        task.await;
                        drop(permit);
                    });
                    outbox.peer_reachable(peer);
                    continue;
                }
                let service = service.clone();
                // The batch is answered from the committing thread, the
                // moment the envelopes are durable; if the commit fails, the
                // batch is dropped unanswered and the sender is told
                // Unavailable (see transports::InboundBatch).
                let answered = store
                    .write_then(
                        move |tx| inbound::store_batch(tx, &envelopes, &service, now),
                        move |(receipts, _)| batch.respond(std::mem::take(receipts)),
                    )
                    .await;
                match answered {
                    Ok((_, owners)) if !owners.is_empty() => manager.do_send(InboxReady(owners)),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "storing received envelopes failed"),
                }
                // Whoever sent to us is reachable: retry what waits for them.
                outbox.peer_reachable(peer);
            }
            transports::Event::PeerConnected { peer }
            | transports::Event::Discovered { peer, .. } => {
                outbox.peer_reachable(peer);
            }
            transports::Event::ListenAddrsChanged(addrs) => {
                manager.do_send(ListenAddrsChanged(addrs))
            }
            transports::Event::InvalidFrame { peer, refusal } => {
                tracing::warn!(%peer, %refusal, "a peer sent an invalid frame");
            }
            transports::Event::PeerDisconnected { .. } => {}
        }
    }
    tracing::debug!("receiving service stopped");
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::manager::{AcceptInvite, CreateInvite, GetHistory, ListContacts, SendMessage};

    fn loopback(name: &str) -> config::Config {
        let mut config = config::Config::new(name);
        config.network.mdns = false;
        config.network.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
        config.delivery.retry_initial_ms = 20;
        config
    }

    async fn node(dir: &tempfile::TempDir, name: &str) -> Node {
        let store = Store::open(&dir.path().join("protonode.redb")).unwrap();
        Node::start(store, loopback(name), Keypair::generate_ed25519())
            .await
            .unwrap()
    }

    /// `inviter` invites `acceptor`, who accepts; the answer was delivered.
    async fn invite(inviter: &Node, acceptor: &Node) {
        let ticket = inviter
            .manager
            .send(CreateInvite { ttl: None })
            .await
            .unwrap()
            .unwrap()
            .ticket;
        let accepted = acceptor
            .manager
            .send(AcceptInvite { ticket })
            .await
            .unwrap()
            .unwrap();
        assert!(accepted.delivered);
    }

    /// `accept` says "You are now connected" once the inviter's node took
    /// the answer; the inviter may act on the new contact straight away
    /// (a script that accepts and then has the inviter `introduce` it), so
    /// by then the inviter's node has filed it, not only stored it.
    #[actix_rt::test]
    async fn an_accepted_invitation_is_filed_by_the_time_the_acceptor_is_told() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let alex = node(&a_dir, "Alex").await;
        let blair = node(&b_dir, "Blair").await;
        for round in 1..=5 {
            invite(&alex, &blair).await;
            let contacts = alex.manager.send(ListContacts).await.unwrap().unwrap();
            assert_eq!(contacts.len(), round, "round {round}: {contacts:?}");
        }
        alex.stop().await;
        blair.stop().await;
    }

    /// `send` with `wait` answers as soon as the receipt is in hand and the
    /// sender records it just after; a history read in between must still
    /// say "delivered", as the caller was told. In one process the read
    /// comes microseconds after the answer, well inside that window.
    #[actix_rt::test]
    async fn history_right_after_send_wait_says_delivered() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let alex = node(&a_dir, "Alex").await;
        let blair = node(&b_dir, "Blair").await;
        invite(&blair, &alex).await;
        let contact = alex.manager.send(ListContacts).await.unwrap().unwrap()[0]
            .id
            .clone();

        for i in 0..20 {
            let text = format!("message {i}");
            let sent = alex
                .manager
                .send(SendMessage {
                    to: contact.clone(),
                    text: text.clone(),
                    wait: Some(Duration::from_secs(10)),
                })
                .await
                .unwrap()
                .unwrap();
            assert_eq!(sent.status, "delivered");
            let history = alex
                .manager
                .send(GetHistory {
                    of: contact.clone(),
                })
                .await
                .unwrap()
                .unwrap();
            let last = history.last().unwrap();
            assert_eq!(last.text, text);
            assert_eq!(last.status, "delivered", "message {i}");
        }
        alex.stop().await;
        blair.stop().await;
    }
}
