//! The sending service: delivers every OUTBOX row until its receiver's node
//! acknowledges it, then removes it.
//!
//! ```text
//!  actors ── commit rows to OUTBOX ──▶ wake() ──▶ ┌──────────── Sender task ────────────┐
//!                                                 │ queues: one FIFO per destination     │
//!  receiving task ── peer_reachable(peer) ──────▶ │ (conversation, recipient); at most   │
//!                                                 │ one batch in flight per queue        │
//!                                                 └──┬───────────────────────────────────┘
//!                          transports::Client::deliver (batch) │ receipts
//!                                                              ▼
//!                one write txn: remove acknowledged rows, mark messages
//!                delivered/failed; then Event::Delivery and the outcome callback
//! ```
//!
//! Order: a destination's rows go in sequence order and the next batch
//! leaves only after the previous one was answered, so a receiver stores
//! one sender's messages in the order they were sent. Retries back off
//! exponentially (with jitter) up to `retry_max`, and start again at once
//! when the peer is seen again (connection, mDNS). A network failure moves
//! to the destination's next transport; an address the receiver does not
//! know moves to the next address, and when none is left the row fails for
//! good. Rows survive restarts: the task reloads them at start.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{broadcast, mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use transports::{DeliveryAddress, DeliveryError, Envelope, Multiaddr, PeerId, Receipt, Refusal};

use crate::changes::{Changes, Destination, StatusChange};
use crate::model::{now_ms, Conversation, MessageId, TransportInfo};
use crate::records::{OutboxEntry, OutboxKind, ProtonRecord, Recipient};
use crate::store::{self, tables, Store, StoreError};
use crate::views::Event;

/// Capacity of the command channel: peer-reachable hints and stop. Hints
/// are an optimisation (backoff ends by itself), so a full channel drops them.
const COMMAND_CAPACITY: usize = 256;

/// How a row's delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub conversation: Conversation,
    pub kind: OutboxKind,
    pub message: Option<MessageId>,
    pub delivered: bool,
}

/// Called (from the sender task) after each finished row is committed.
pub type OutcomeFn = Arc<dyn Fn(Outcome) + Send + Sync>;

enum Command {
    PeerReachable(PeerId),
    Stop,
}

/// Handle to the sending service. Cheap to clone.
#[derive(Clone)]
pub struct OutboxHandle {
    wake: Arc<Notify>,
    commands: mpsc::Sender<Command>,
}

impl OutboxHandle {
    /// New rows were committed: look for them.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The peer is reachable again: retry its destinations now.
    pub fn peer_reachable(&self, peer: PeerId) {
        let _ = self.commands.try_send(Command::PeerReachable(peer));
    }

    pub async fn stop(&self) {
        let _ = self.commands.send(Command::Stop).await;
    }
}

/// Starts the sending service on the current tokio runtime.
pub fn spawn(
    store: Store,
    client: transports::Client,
    config: config::Delivery,
    events: broadcast::Sender<Event>,
    on_outcome: OutcomeFn,
) -> (OutboxHandle, JoinHandle<()>) {
    let wake = Arc::new(Notify::new());
    let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
    let sender = Sender {
        store,
        client,
        config,
        events,
        on_outcome,
        wake: wake.clone(),
        commands: rx,
        queues: HashMap::new(),
        next_scan: 0,
        inflight: FuturesUnordered::new(),
    };
    let task = tokio::spawn(sender.run());
    (OutboxHandle { wake, commands: tx }, task)
}

#[derive(Default)]
struct Queue {
    seqs: VecDeque<u64>,
    busy: bool,
    failures: u32,
    retry_at: Option<Instant>,
    /// Index into the destination's candidates (transport × address).
    candidate: usize,
    /// Consecutive "unknown address" answers for the head row.
    refusals: usize,
    peer: Option<PeerId>,
}

/// One way to deliver: a transport of the recipient and whether to use its
/// long-term address instead of its current (ephemeral) one.
#[derive(Debug, Clone)]
struct Candidate {
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    transport: TransportInfo,
    long_term: bool,
}

impl Candidate {
    fn address(&self, now: u64) -> DeliveryAddress {
        if self.long_term {
            self.transport.long_term.address
        } else {
            self.transport.current_address(now)
        }
    }
}

struct Attempt {
    destination: Destination,
    rows: Vec<(u64, OutboxEntry)>,
    candidates: usize,
    result: Result<Vec<Receipt>, DeliveryError>,
}

struct Sender {
    store: Store,
    client: transports::Client,
    config: config::Delivery,
    events: broadcast::Sender<Event>,
    on_outcome: OutcomeFn,
    wake: Arc<Notify>,
    commands: mpsc::Receiver<Command>,
    queues: HashMap<Destination, Queue>,
    next_scan: u64,
    inflight: FuturesUnordered<futures::future::BoxFuture<'static, Attempt>>,
}

impl Sender {
    async fn run(mut self) {
        if let Err(e) = self.scan() {
            tracing::error!(error = %e, "reading the outbox failed");
        }
        loop {
            self.dispatch();
            let sleep = self.next_retry();
            tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    Some(Command::PeerReachable(peer)) => self.reachable(peer),
                    Some(Command::Stop) | None => break,
                },
                Some(attempt) = self.inflight.next() => self.finish(attempt).await,
                _ = self.wake.notified() => {
                    if let Err(e) = self.scan() {
                        tracing::error!(error = %e, "reading the outbox failed");
                    }
                }
                _ = tokio::time::sleep_until(sleep) => {}
            }
        }
        tracing::debug!("sending service stopped");
    }

    /// Picks up rows added since the last scan.
    fn scan(&mut self) -> Result<(), StoreError> {
        let from = self.next_scan;
        let rows: Vec<(u64, Destination)> = self.store.read(|tx| {
            let t = tx.open_table(tables::OUTBOX)?;
            let mut rows = Vec::new();
            for e in t.range(from..)? {
                let (k, v) = e?;
                let entry: OutboxEntry = store::decode(v.value(), "outbox entry")?;
                rows.push((k.value(), (entry.conversation, entry.recipient)));
            }
            Ok(rows)
        })?;
        for (seq, dest) in rows {
            self.next_scan = self.next_scan.max(seq + 1);
            let q = self.queues.entry(dest).or_default();
            if !q.seqs.contains(&seq) {
                q.seqs.push_back(seq);
            }
        }
        Ok(())
    }

    fn reachable(&mut self, peer: PeerId) {
        for q in self.queues.values_mut() {
            if q.peer == Some(peer) && !q.busy {
                q.retry_at = None;
                q.failures = 0;
            }
        }
    }

    fn next_retry(&self) -> Instant {
        self.queues
            .values()
            .filter(|q| !q.busy && !q.seqs.is_empty())
            .filter_map(|q| q.retry_at)
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
    }

    /// Starts a batch for every ready destination.
    fn dispatch(&mut self) {
        let now = Instant::now();
        let ready: Vec<Destination> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.busy && !q.seqs.is_empty() && q.retry_at.is_none_or(|t| t <= now))
            .map(|(d, _)| *d)
            .collect();
        for dest in ready {
            if let Err(e) = self.start(dest) {
                tracing::warn!(error = %e, "preparing a delivery failed");
                self.backoff_queue_by(dest);
            }
        }
        self.queues.retain(|_, q| q.busy || !q.seqs.is_empty());
    }

    fn start(&mut self, dest: Destination) -> Result<(), StoreError> {
        let Some(q) = self.queues.get_mut(&dest) else {
            return Ok(());
        };
        let max = self.config.max_batch as usize;
        let wanted: Vec<u64> = q.seqs.iter().take(max).copied().collect();
        let (rows, record) = self.store.read(|tx| {
            let t = tx.open_table(tables::OUTBOX)?;
            let mut rows = Vec::with_capacity(wanted.len());
            for seq in &wanted {
                if let Some(entry) = store::get::<_, OutboxEntry, _>(&t, *seq, "outbox entry")? {
                    rows.push((*seq, entry));
                }
            }
            let record: Option<ProtonRecord> = match dest.0 {
                Conversation::Proton(id) => {
                    store::get(&tx.open_table(tables::PROTONS)?, id.0, "proton")?
                }
                Conversation::Group(_) => None,
            };
            Ok((rows, record))
        })?;
        // Rows removed meanwhile (e.g. a forgotten relationship) leave the queue.
        q.seqs
            .retain(|s| !wanted.contains(s) || rows.iter().any(|(r, _)| r == s));
        if rows.is_empty() {
            return Ok(());
        }
        let transports = match (record, dest.1) {
            (Some(r), Recipient::Peer) => r.peer_transports,
            (None, _) => {
                // The conversation is gone: nothing can deliver these rows.
                let seqs: Vec<u64> = rows.iter().map(|(s, _)| *s).collect();
                q.seqs.retain(|s| !seqs.contains(s));
                let store = self.store.clone();
                tokio::spawn(async move {
                    let changes = Changes {
                        outbox_done: seqs,
                        ..Changes::default()
                    };
                    if let Err(e) = store.write(move |tx| changes.apply(tx)).await {
                        tracing::warn!(error = %e, "dropping orphaned outbox rows failed");
                    }
                });
                return Ok(());
            }
        };
        let candidates = candidates(&transports);
        if candidates.is_empty() {
            tracing::warn!(conversation = %dest.0, "the recipient has no usable transport");
            self.backoff_queue_by(dest);
            return Ok(());
        }
        let Some(q) = self.queues.get_mut(&dest) else {
            return Ok(());
        };
        let candidate = candidates[q.candidate % candidates.len()].clone();
        let now = now_ms();
        let mut envelopes = Vec::with_capacity(rows.len());
        let mut batch = Vec::with_capacity(rows.len());
        for (seq, entry) in rows {
            let to = entry.address.unwrap_or_else(|| candidate.address(now));
            envelopes.push(Envelope::new(to, entry.payload.clone()));
            if transports::encoded_batch_len(&envelopes) > transports::MAX_FRAME_BYTES {
                envelopes.pop();
                break;
            }
            batch.push((seq, entry));
        }
        q.busy = true;
        q.peer = Some(candidate.peer);
        let client = self.client.clone();
        let count = candidates.len();
        self.inflight.push(Box::pin(async move {
            let result = client
                .deliver(candidate.peer, candidate.addrs, &envelopes)
                .await;
            Attempt {
                destination: dest,
                rows: batch,
                candidates: count,
                result,
            }
        }));
        Ok(())
    }

    fn backoff_queue_by(&mut self, dest: Destination) {
        let config = self.config.clone();
        if let Some(q) = self.queues.get_mut(&dest) {
            q.failures = q.failures.saturating_add(1);
            q.retry_at = Some(Instant::now() + backoff(&config, q.failures));
        }
    }

    async fn finish(&mut self, attempt: Attempt) {
        let Attempt {
            destination,
            rows,
            candidates,
            result,
        } = attempt;
        let mut finished: Vec<(u64, OutboxEntry, bool)> = Vec::new();
        let mut transient = false;
        let mut next_address = false;
        match result {
            Ok(receipts) => {
                let refusals = self.queues.get(&destination).map_or(0, |q| q.refusals);
                for ((seq, entry), receipt) in rows.into_iter().zip(receipts) {
                    match receipt {
                        Receipt::Stored | Receipt::Duplicate => finished.push((seq, entry, true)),
                        Receipt::Refused(Refusal::UnknownAddress)
                            if entry.address.is_none() && refusals + 1 < candidates =>
                        {
                            // Try the next address before giving up; keep order.
                            next_address = true;
                            break;
                        }
                        Receipt::Refused(Refusal::Unavailable) => {
                            transient = true;
                            break;
                        }
                        Receipt::Refused(refusal) => {
                            if entry.kind == OutboxKind::Welcome {
                                // A used or expired ticket: the acceptor is told.
                                tracing::info!(conversation = %entry.conversation, %refusal, "the inviter's node refused our answer");
                            } else {
                                tracing::warn!(conversation = %entry.conversation, %refusal, "the receiver refused a message for good");
                            }
                            finished.push((seq, entry, false));
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(conversation = %destination.0, error = %e, "delivery failed; will retry");
                transient = true;
            }
        }

        if !finished.is_empty() {
            let mut changes = Changes::default();
            for (seq, entry, delivered) in &finished {
                changes.outbox_done.push(*seq);
                if let (Some(id), OutboxKind::Text) = (entry.message, entry.kind) {
                    let change = if *delivered {
                        StatusChange::Acknowledged
                    } else {
                        StatusChange::Failed
                    };
                    changes.statuses.push((entry.conversation, id, change));
                }
            }
            match self.store.write(move |tx| changes.apply(tx)).await {
                Ok(_) => {
                    for (_, entry, delivered) in &finished {
                        self.report(entry, *delivered);
                    }
                }
                Err(e) => {
                    // The rows stay; the receiver answers a retry with Duplicate.
                    tracing::error!(error = %e, "recording deliveries failed");
                    finished.clear();
                    transient = true;
                }
            }
        }

        let config = self.config.clone();
        if let Some(q) = self.queues.get_mut(&destination) {
            q.busy = false;
            q.seqs.retain(|s| !finished.iter().any(|(f, _, _)| f == s));
            if transient {
                q.failures = q.failures.saturating_add(1);
                q.retry_at = Some(Instant::now() + backoff(&config, q.failures));
                q.candidate = q.candidate.wrapping_add(1);
            } else if next_address {
                q.refusals += 1;
                q.candidate = q.candidate.wrapping_add(1);
                q.retry_at = None;
            } else {
                q.failures = 0;
                q.refusals = 0;
                q.retry_at = None;
            }
        }
    }

    fn report(&self, entry: &OutboxEntry, delivered: bool) {
        if let Some(id) = entry.message {
            let _ = self.events.send(Event::Delivery {
                conversation: entry.conversation.to_string(),
                message: id.to_string(),
                status: if delivered { "delivered" } else { "failed" },
            });
        }
        (self.on_outcome)(Outcome {
            conversation: entry.conversation,
            kind: entry.kind,
            message: entry.message,
            delivered,
        });
    }
}

/// The ways to reach a recipient, best first: each transport at its current
/// address, then each at its long-term address.
fn candidates(transports: &[TransportInfo]) -> Vec<Candidate> {
    let mut out = Vec::new();
    for long_term in [false, true] {
        for t in transports {
            if let Ok(peer) = t.peer_id() {
                out.push(Candidate {
                    peer,
                    addrs: t.multiaddrs(),
                    transport: t.clone(),
                    long_term,
                });
            }
        }
    }
    out
}

/// Exponential backoff with ±20% jitter, capped at `retry_max`.
fn backoff(config: &config::Delivery, failures: u32) -> Duration {
    let base = config
        .retry_initial()
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(config.retry_max());
    let jitter = 0.8 + rand::random::<f64>() * 0.4;
    base.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let config = config::Delivery::default();
        let first = backoff(&config, 1);
        assert!(first <= config.retry_initial().mul_f64(1.2));
        let late = backoff(&config, 30);
        assert!(late <= config.retry_max().mul_f64(1.2));
        assert!(late >= config.retry_max().mul_f64(0.8));
    }
}
