//! The sending service: delivers every OUTBOX row until its receiver's node
//! acknowledges it, then removes it.
//!
//! ```text
//!  actors ── commit rows to OUTBOX ── queued(rows) ──▶ ┌────────── Sender task ──────────┐
//!                                                      │ one FIFO queue per destination │
//!  receiving task ── peer_reachable(peer) ───────────▶ │ (conversation, recipient); at  │
//!                                                      │ most one batch in flight each  │
//!                                                      └──┬─────────────────────────────┘
//!                          transports::Client::deliver (batch) │ receipts
//!                                                              ▼
//!          report (Event::Delivery, outcome callback), then one write txn:
//!          remove acknowledged rows, mark their history entries delivered/failed
//! ```
//!
//! Rows arrive with their contents from the actor that committed them, so
//! the hot path reads nothing back from the store. If that channel is ever
//! full, the task rescans the OUTBOX table instead; it also scans it at
//! start, so rows survive restarts.
//!
//! Order: a destination's rows go in sequence order and the next batch
//! leaves only after the previous one was answered, so a receiver stores one
//! sender's messages in the order they were sent. Retries back off
//! exponentially (with jitter) up to `retry_max`, and start again at once
//! when the peer is seen again (connection, mDNS, or an envelope from it).
//! A network failure moves to the destination's next transport; an address
//! the receiver does not know moves to the next address, and when none is
//! left the row fails for good.
//!
//! "Delivered" is reported as soon as the receipt is in hand, and recorded
//! just after: the receiver has the envelope durably whatever happens to our
//! note of it, and if a crash loses the note, the row is sent again and the
//! receiver answers Duplicate. Recording off the reply path keeps its fsync
//! out of the latency a sender sees; a reader that must see what was
//! reported (`history`) first waits for the records (`OutboxHandle::recorded`),
//! so `send --wait` saying "delivered" is never followed by a history that
//! says "queued". Records are group-committed: one write
//! at a time, taking every receipt that came in meanwhile, so a message to a
//! group of 127 costs a few writes, not 127 in a row.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use redb::ReadableTable;
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use transports::{Address, DeliveryError, Envelope, Multiaddr, PeerId, Receipt, Refusal};

use crate::changes::{Changes, Destination, StatusChange};
use crate::identity::Ipk;
use crate::model::{now_ms, Conversation, GroupProtonId, MessageId, TransportInfo};
use crate::records::{
    GroupProtonRecord, Member, MemberStatus, OutboxEntry, OutboxKind, ProtonRecord, Recipient,
};
use crate::store::{self, tables, Store, StoreError};
use crate::views::Event;

/// A group member's transports, name, and for a placeholder, who asserts
/// it ("you" for our own).
type MemberRoute = (Vec<TransportInfo>, String, Option<String>);

/// Capacity of the command channel. A full channel loses nothing: new rows
/// are then found by rescanning the table, and reachability hints are only
/// an optimisation (backoff ends by itself).
const COMMAND_CAPACITY: usize = 1024;
/// Rows of one destination whose contents are kept in memory; beyond that
/// only their sequence numbers are, and contents are read when sent.
const CACHED_ROWS: usize = 4096;
/// How long one delivery attempt may take before the queue gives up on it
/// and tries again (another transport next). A connection to a node that
/// was killed can look alive for a while (QUIC has no close to wait for),
/// and everything queued behind the batch would wait with it; in a group
/// that commits meanwhile, a message that waits too long cannot be read
/// any more (`mls::MAX_PAST_EPOCHS`).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a destination's transports are trusted before being re-read
/// (the peer may have sent new ones); they are also re-read after a failure.
const TRANSPORTS_TTL: Duration = Duration::from_secs(5);

/// How a row's delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub conversation: Conversation,
    pub kind: OutboxKind,
    pub message: Option<MessageId>,
    pub delivered: bool,
}

/// Called (from the sender task) for each finished row.
pub type OutcomeFn = Arc<dyn Fn(Outcome) + Send + Sync>;

enum Command {
    Queued(Vec<(u64, OutboxEntry)>),
    PeerReachable(PeerId),
    /// Answer once every outcome reported so far is recorded.
    Recorded(oneshot::Sender<()>),
    Stop,
}

/// Handle to the sending service. Cheap to clone.
#[derive(Clone)]
pub struct OutboxHandle {
    commands: mpsc::Sender<Command>,
    rescan: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

impl OutboxHandle {
    /// These rows were just committed: deliver them.
    pub fn queued(&self, rows: Vec<(u64, OutboxEntry)>) {
        if rows.is_empty() {
            return;
        }
        if self.commands.try_send(Command::Queued(rows)).is_err() {
            self.rescan.store(true, Ordering::SeqCst);
            self.wake.notify_one();
        }
    }

    /// The peer is reachable again: retry its destinations now.
    pub fn peer_reachable(&self, peer: PeerId) {
        let _ = self.commands.try_send(Command::PeerReachable(peer));
    }

    /// Returns once every delivery outcome reported so far (events, `send
    /// --wait`) is in the store, or after `limit`: a history read after it
    /// agrees with what was reported. Returns at once when nothing is
    /// waiting to be recorded or the service has stopped.
    pub async fn recorded(&self, limit: Duration) {
        let (tx, rx) = oneshot::channel();
        let wait = async {
            if self.commands.send(Command::Recorded(tx)).await.is_ok() {
                let _ = rx.await;
            }
        };
        if tokio::time::timeout(limit, wait).await.is_err() {
            tracing::warn!(?limit, "delivery records are late; reading without them");
        }
    }

    pub async fn stop(&self) {
        let _ = self.commands.send(Command::Stop).await;
    }

    /// A handle whose rows go nowhere (tests read them from the store).
    #[cfg(test)]
    pub(crate) fn detached() -> Self {
        let (commands, _) = mpsc::channel(COMMAND_CAPACITY);
        Self {
            commands,
            rescan: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(Notify::new()),
        }
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
    let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
    let rescan = Arc::new(AtomicBool::new(true));
    let wake = Arc::new(Notify::new());
    let sender = Sender {
        store,
        client,
        config,
        events,
        on_outcome,
        commands: rx,
        rescan: rescan.clone(),
        wake: wake.clone(),
        queues: HashMap::new(),
        inflight: FuturesUnordered::new(),
        unrecorded: Changes::default(),
        recording: FuturesUnordered::new(),
        unrecorded_rows: HashSet::new(),
        reported: 0,
        recorded: 0,
        waiting: Vec::new(),
        groups: HashMap::new(),
    };
    let task = tokio::spawn(sender.run());
    (
        OutboxHandle {
            commands: tx,
            rescan,
            wake,
        },
        task,
    )
}

#[derive(Default)]
struct Queue {
    /// Sequence numbers in order, with the row's contents when cached.
    rows: VecDeque<(u64, Option<OutboxEntry>)>,
    known: HashSet<u64>,
    busy: bool,
    failures: u32,
    retry_at: Option<Instant>,
    /// Index into the destination's candidates (transport × address).
    candidate: usize,
    /// Consecutive "unknown address" answers for the head row.
    refusals: usize,
    peer: Option<PeerId>,
    transports: Option<(Instant, Vec<TransportInfo>)>,
    /// A 1:1 recipient's name, read with its transports, for events.
    name: Option<String>,
    /// The peer was seen (connected, discovered on the LAN) while a batch
    /// was in flight: if that batch fails, retry at once, not after backoff.
    hinted: bool,
    /// The peer's node answered that it is not keeping up and asked us to
    /// retry later. Its traffic to us then says it is busy, not that it is
    /// back: such a queue keeps its backoff until a batch goes through.
    /// (Two overloaded nodes that reset each other's backoff with every
    /// batch they send hammered each other several times a second.)
    asked_later: bool,
}

impl Queue {
    fn push(&mut self, seq: u64, entry: Option<OutboxEntry>) {
        if self.known.insert(seq) {
            let cached = entry.filter(|_| self.rows.len() < CACHED_ROWS);
            self.rows.push_back((seq, cached));
        }
    }

    /// Whether a row with this payload waits here (among the cached ones).
    fn holds(&self, payload: &[u8]) -> bool {
        self.rows
            .iter()
            .any(|(_, e)| e.as_ref().is_some_and(|e| e.payload == payload))
    }

    /// The peer showed up (connected, sent us something): retry now, unless
    /// it told us it is busy.
    fn peer_seen(&mut self) {
        if self.asked_later {
            return;
        }
        if self.busy {
            self.hinted = true;
        } else {
            self.retry_at = None;
            self.failures = 0;
        }
    }

    fn remove(&mut self, done: &HashSet<u64>) {
        self.rows.retain(|(s, _)| !done.contains(s));
        self.known.retain(|s| !done.contains(s));
    }
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
    fn address(&self, now: u64) -> Address {
        if self.long_term {
            self.transport.long_term.address.clone()
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
    commands: mpsc::Receiver<Command>,
    rescan: Arc<AtomicBool>,
    wake: Arc<Notify>,
    queues: HashMap<Destination, Queue>,
    inflight: FuturesUnordered<futures::future::BoxFuture<'static, Attempt>>,
    /// Finished rows (and their history statuses) not yet being recorded.
    unrecorded: Changes,
    /// The one write of finished rows under way; yields its rows and the
    /// `reported` count it covers.
    recording: FuturesUnordered<futures::future::BoxFuture<'static, (Vec<u64>, u64)>>,
    /// Finished rows whose removal is not yet committed: a rescan must not
    /// queue them again.
    unrecorded_rows: HashSet<u64>,
    /// How many batches of outcomes were reported, and how many of them are
    /// recorded; `waiting` holds readers until `recorded` reaches theirs.
    reported: u64,
    recorded: u64,
    waiting: Vec<(u64, oneshot::Sender<()>)>,
    /// Members' transports and names per group, read once for all its
    /// destinations, and when (`None`: to be read again, since one of them
    /// failed; the names still serve the events until then).
    groups: HashMap<GroupProtonId, (Option<Instant>, HashMap<Ipk, MemberRoute>)>,
}

/// How to reach each member of a group (and those removed lately: a
/// removal, and what was queued before it, must still reach them), by the
/// key rows are queued to. A placeholder claimed since a row was queued to
/// it is reached as its claimer, who holds the group's state of the epoch
/// the row was written in: the row goes to the claimer's transports.
fn member_routes(former: Vec<Member>, members: Vec<Member>) -> HashMap<Ipk, MemberRoute> {
    let mut routes = HashMap::new();
    let mut claimed = Vec::new();
    let names: HashMap<Ipk, String> = former
        .iter()
        .chain(&members)
        .map(|m| (m.ipk, m.display.name.clone()))
        .collect();
    for m in former.into_iter().chain(members) {
        // Our own key is no other member's: a placeholder no other member
        // asserts is one we made.
        let asserted_by = match m.status {
            MemberStatus::Placeholder { asserted_by } => Some(
                names
                    .get(&asserted_by)
                    .cloned()
                    .unwrap_or_else(|| "you".into()),
            ),
            _ => None,
        };
        let placeholder = match (&m.status, &m.claim) {
            (MemberStatus::Claimed { placeholder }, _) => Some(*placeholder),
            (_, Some(claim)) if claim.first != m.ipk => Some(claim.first),
            _ => None,
        };
        if let Some(p) = placeholder {
            claimed.push((p, (m.transports.clone(), m.display.name.clone(), None)));
        }
        routes.insert(m.ipk, (m.transports, m.display.name, asserted_by));
    }
    for (placeholder, route) in claimed {
        routes.entry(placeholder).or_insert(route);
    }
    routes
}

impl Sender {
    async fn run(mut self) {
        loop {
            if self.rescan.swap(false, Ordering::SeqCst) {
                if let Err(e) = self.scan() {
                    tracing::error!(error = %e, "reading the outbox failed");
                    self.rescan.store(true, Ordering::SeqCst);
                }
            }
            self.dispatch();
            let sleep = self.next_retry();
            tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    Some(Command::Queued(rows)) => {
                        for (seq, entry) in rows {
                            let q = self
                                .queues
                                .entry((entry.conversation, entry.recipient))
                                .or_default();
                            // Known already (a scan found it first): not a
                            // copy of itself. (Numbers are never given twice
                            // in one process: see `Changes::apply`.)
                            if q.known.contains(&seq) {
                                continue;
                            }
                            // A group's control message that a copy still
                            // waiting for this member already says (an
                            // ordering service asking again while the member
                            // is away) would only pile up: drop it. (Should
                            // that copy fail for good, the asking goes on
                            // and queues the next one.)
                            if entry.kind == OutboxKind::Control && q.holds(&entry.payload) {
                                self.unrecorded.outbox_done.push(seq);
                                self.unrecorded_rows.insert(seq);
                                continue;
                            }
                            q.push(seq, Some(entry));
                        }
                        self.record();
                    }
                    Some(Command::PeerReachable(peer)) => self.reachable(peer),
                    Some(Command::Recorded(reply)) => {
                        if self.recorded == self.reported {
                            let _ = reply.send(());
                        } else {
                            self.waiting.push((self.reported, reply));
                        }
                    }
                    Some(Command::Stop) | None => break,
                },
                Some(attempt) = self.inflight.next() => {
                    self.finish(attempt);
                    // Take every other answer already in, then record them all.
                    while let Some(Some(attempt)) = self.inflight.next().now_or_never() {
                        self.finish(attempt);
                    }
                    self.record();
                }
                Some((rows, covers)) = self.recording.next() => {
                    for seq in rows {
                        self.unrecorded_rows.remove(&seq);
                    }
                    self.recorded = covers;
                    let recorded = self.recorded;
                    for (_, reply) in self.waiting.extract_if(.., |(upto, _)| *upto <= recorded) {
                        let _ = reply.send(());
                    }
                    self.record();
                }
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(sleep) => {}
            }
        }
        // What is finished gets recorded before we go.
        while self.recording.next().await.is_some() {}
        self.record();
        while self.recording.next().await.is_some() {}
        tracing::debug!("sending service stopped");
    }

    /// Starts writing the finished rows, unless a write is under way (its
    /// end starts the next one).
    fn record(&mut self) {
        if !self.recording.is_empty() || self.unrecorded.is_empty() {
            return;
        }
        let changes = std::mem::take(&mut self.unrecorded);
        let rows = changes.outbox_done.clone();
        let store = self.store.clone();
        let covers = self.reported;
        self.recording.push(Box::pin(async move {
            if let Err(e) = store.write(move |tx| changes.apply(tx)).await {
                // The rows stay in the table; after a restart they are sent
                // again and the receiver answers Duplicate.
                tracing::error!(error = %e, "recording deliveries failed");
            }
            (rows, covers)
        }));
    }

    /// Picks up every row of the table that no queue knows yet.
    fn scan(&mut self) -> Result<(), StoreError> {
        let rows: Vec<(u64, OutboxEntry)> = self.store.read(|tx| {
            let t = tx.open_table(tables::OUTBOX)?;
            let mut rows = Vec::new();
            for e in t.iter()? {
                let (k, v) = e?;
                rows.push((k.value(), store::decode(v.value(), "outbox entry")?));
            }
            Ok(rows)
        })?;
        for (seq, entry) in rows {
            if self.unrecorded_rows.contains(&seq) {
                continue;
            }
            self.queues
                .entry((entry.conversation, entry.recipient))
                .or_default()
                .push(seq, Some(entry));
        }
        Ok(())
    }

    fn reachable(&mut self, peer: PeerId) {
        for q in self.queues.values_mut() {
            if q.peer == Some(peer) {
                q.peer_seen();
            }
        }
    }

    fn next_retry(&self) -> Instant {
        self.queues
            .values()
            .filter(|q| !q.busy && !q.rows.is_empty())
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
            .filter(|(_, q)| !q.busy && !q.rows.is_empty() && q.retry_at.is_none_or(|t| t <= now))
            .map(|(d, _)| *d)
            .collect();
        for dest in ready {
            if let Err(e) = self.start(dest) {
                tracing::warn!(error = %e, "preparing a delivery failed");
                self.back_off(dest);
            }
        }
        self.queues.retain(|_, q| q.busy || !q.rows.is_empty());
    }

    fn back_off(&mut self, dest: Destination) {
        let config = self.config.clone();
        if let Some(q) = self.queues.get_mut(&dest) {
            q.failures = q.failures.saturating_add(1);
            q.retry_at = Some(Instant::now() + backoff(&config, q.failures));
        }
        self.forget_transports(dest);
    }

    /// Reads the destination's transports again next time (they failed).
    fn forget_transports(&mut self, dest: Destination) {
        if let Some(q) = self.queues.get_mut(&dest) {
            q.transports = None;
        }
        if let Conversation::Group(id) = dest.0 {
            if let Some((read_at, _)) = self.groups.get_mut(&id) {
                *read_at = None;
            }
        }
    }

    /// The next rows of a destination, reading uncached ones from the store.
    fn head(&mut self, dest: Destination) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        let max = self.config.max_batch as usize;
        let Some(q) = self.queues.get_mut(&dest) else {
            return Ok(Vec::new());
        };
        let missing: Vec<u64> = q
            .rows
            .iter()
            .take(max)
            .filter(|(_, e)| e.is_none())
            .map(|(s, _)| *s)
            .collect();
        let mut read: HashMap<u64, OutboxEntry> = HashMap::new();
        if !missing.is_empty() {
            read = self.store.read(|tx| {
                let t = tx.open_table(tables::OUTBOX)?;
                let mut out = HashMap::new();
                for seq in &missing {
                    if let Some(entry) = store::get::<_, OutboxEntry, _>(&t, *seq, "outbox entry")?
                    {
                        out.insert(*seq, entry);
                    }
                }
                Ok(out)
            })?;
            // Rows gone from the table (a forgotten relationship) leave the queue.
            let gone: HashSet<u64> = missing
                .iter()
                .filter(|s| !read.contains_key(s))
                .copied()
                .collect();
            q.remove(&gone);
        }
        Ok(q.rows
            .iter()
            .take(max)
            .filter_map(|(seq, e)| {
                e.clone()
                    .or_else(|| read.get(seq).cloned())
                    .map(|e| (*seq, e))
            })
            .collect())
    }

    /// The destination's transports, from the cache while fresh.
    fn transports(&mut self, dest: Destination) -> Result<Option<Vec<TransportInfo>>, StoreError> {
        if let Some((at, t)) = self.queues.get(&dest).and_then(|q| q.transports.as_ref()) {
            if at.elapsed() < TRANSPORTS_TTL {
                return Ok(Some(t.clone()));
            }
        }
        let found: Option<Vec<TransportInfo>> = match dest {
            (Conversation::Proton(id), Recipient::Peer) => {
                let record = self.store.read(|tx| {
                    store::get::<_, ProtonRecord, _>(
                        &tx.open_table(tables::PROTONS)?,
                        id.0,
                        "proton",
                    )
                })?;
                if let (Some(q), Some(r)) = (self.queues.get_mut(&dest), &record) {
                    q.name = Some(r.peer_display.name.clone());
                }
                record.map(|r| r.peer_transports)
            }
            (Conversation::Group(id), Recipient::Member(ipk)) => {
                // One read of the group serves all its members' queues (a
                // message to a large group starts one per member at once).
                let fresh = self.groups.get(&id).filter(|(at, members)| {
                    at.is_some_and(|at| at.elapsed() < TRANSPORTS_TTL) && members.contains_key(&ipk)
                });
                if fresh.is_none() {
                    // Even a group we left: our "leave" must still get out.
                    let members = self.store.read(|tx| {
                        Ok(store::get::<_, GroupProtonRecord, _>(
                            &tx.open_table(tables::GROUPS)?,
                            id.0,
                            "group",
                        )?
                        .map(|g| {
                            member_routes(g.former, std::sync::Arc::unwrap_or_clone(g.members))
                        })
                        .unwrap_or_default())
                    })?;
                    self.groups.insert(id, (Some(Instant::now()), members));
                }
                self.groups
                    .get(&id)
                    .and_then(|(_, m)| m.get(&ipk))
                    .map(|(transports, ..)| transports.clone())
            }
            _ => None,
        };
        let Some(transports) = found else {
            return Ok(None);
        };
        if let Some(q) = self.queues.get_mut(&dest) {
            q.transports = Some((Instant::now(), transports.clone()));
        }
        Ok(Some(transports))
    }

    fn start(&mut self, dest: Destination) -> Result<(), StoreError> {
        let rows = self.head(dest)?;
        if rows.is_empty() {
            return Ok(());
        }
        let Some(transports) = self.transports(dest)? else {
            self.drop_orphans(dest, rows);
            return Ok(());
        };
        let candidates = candidates(&transports);
        if candidates.is_empty() {
            tracing::warn!(conversation = %dest.0, "the recipient has no usable transport");
            self.back_off(dest);
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
            let to = entry
                .address
                .clone()
                .unwrap_or_else(|| candidate.address(now));
            envelopes.push(Envelope::new(to, entry.payload.clone()));
            if transports::encoded_batch_len(&envelopes) > transports::MAX_FRAME_BYTES {
                envelopes.pop();
                break;
            }
            batch.push((seq, entry));
        }
        q.busy = true;
        tracing::trace!(target: crate::TIMELINE, store = %self.store.name(), peer = %candidate.peer, envelopes = envelopes.len(), "out: batch");
        q.peer = Some(candidate.peer);
        let client = self.client.clone();
        let count = candidates.len();
        self.inflight.push(Box::pin(async move {
            let result = tokio::time::timeout(
                ATTEMPT_TIMEOUT,
                client.deliver(candidate.peer, candidate.addrs, &envelopes),
            )
            .await
            .unwrap_or(Err(DeliveryError::Timeout));
            Attempt {
                destination: dest,
                rows: batch,
                candidates: count,
                result,
            }
        }));
        Ok(())
    }

    /// The conversation is gone: nothing can deliver these rows.
    fn drop_orphans(&mut self, dest: Destination, rows: Vec<(u64, OutboxEntry)>) {
        let seqs: HashSet<u64> = rows.iter().map(|(s, _)| *s).collect();
        if let Some(q) = self.queues.get_mut(&dest) {
            q.remove(&seqs);
        }
        // What they carried is owed no more: to a group's member, once it is
        // no member (nor removed lately, nor a placeholder since claimed),
        // it counts as done, so the message is "delivered" once every
        // member it still goes to has it; in a relationship that is gone,
        // it failed. Either way its history entry does not wait for ever.
        let change = match dest.1 {
            Recipient::Member(_) => StatusChange::Acknowledged,
            Recipient::Peer => StatusChange::Failed,
        };
        let statuses: Vec<_> = rows
            .iter()
            .filter_map(|(_, e)| e.history.map(|h| (e.conversation, h, change)))
            .collect();
        tracing::debug!(conversation = %dest.0, rows = rows.len(), "dropped rows whose recipient is gone");
        let store = self.store.clone();
        tokio::spawn(async move {
            let changes = Changes {
                outbox_done: seqs.into_iter().collect(),
                statuses,
                ..Changes::default()
            };
            if let Err(e) = store.write(move |tx| changes.apply(tx)).await {
                tracing::warn!(error = %e, "dropping orphaned outbox rows failed");
            }
        });
    }

    fn finish(&mut self, attempt: Attempt) {
        let Attempt {
            destination,
            rows,
            candidates,
            result,
        } = attempt;
        tracing::trace!(target: crate::TIMELINE, store = %self.store.name(), ok = result.is_ok(), "out: answered");
        let mut finished: Vec<(u64, OutboxEntry, bool)> = Vec::new();
        let mut transient = false;
        // The receiver's node, or its answer's timeout, says "busy".
        let asked_later = match &result {
            Err(DeliveryError::Rejected(Refusal::Unavailable)) => true,
            Ok(receipts) => receipts.contains(&Receipt::Refused(Refusal::Unavailable)),
            Err(_) => false,
        };
        let mut next_address = false;
        match result {
            Ok(receipts) => {
                let refusals = self.queues.get(&destination).map_or(0, |q| q.refusals);
                // Once the inviter's node refused our answer, the rest was
                // sent into a relationship it does not have: whatever it
                // said of storing it, nobody will read it.
                let mut answer_refused = false;
                for ((seq, entry), receipt) in rows.into_iter().zip(receipts) {
                    if answer_refused {
                        finished.push((seq, entry, false));
                        continue;
                    }
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
                                answer_refused = true;
                            } else {
                                tracing::warn!(conversation = %entry.conversation, %refusal, "the receiver refused a message for good");
                            }
                            finished.push((seq, entry, false));
                        }
                    }
                }
                if answer_refused {
                    // Nothing queued behind the refused answer goes out:
                    // the rest of the queue fails with it (the manager then
                    // marks the relationship refused and clears its rows).
                    if let Some(q) = self.queues.get_mut(&destination) {
                        let answered: HashSet<u64> = finished.iter().map(|(s, _, _)| *s).collect();
                        for (seq, entry) in q.rows.drain(..) {
                            if let Some(entry) = entry.filter(|_| !answered.contains(&seq)) {
                                finished.push((seq, entry, false));
                            }
                        }
                        q.known.clear();
                    }
                }
            }
            Err(e) => {
                tracing::debug!(conversation = %destination.0, error = %e, "delivery failed; will retry");
                transient = true;
            }
        }

        if !finished.is_empty() {
            self.reported += 1;
        }
        for (_, entry, delivered) in &finished {
            self.report(entry, *delivered);
        }
        let done: HashSet<u64> = finished.iter().map(|(s, _, _)| *s).collect();
        for (seq, entry, delivered) in &finished {
            self.unrecorded.outbox_done.push(*seq);
            self.unrecorded_rows.insert(*seq);
            if let Some(position) = entry.history {
                let change = if *delivered {
                    StatusChange::Acknowledged
                } else {
                    StatusChange::Failed
                };
                self.unrecorded
                    .statuses
                    .push((entry.conversation, position, change));
            }
        }

        let config = self.config.clone();
        if transient || next_address {
            self.forget_transports(destination);
        }
        if let Some(q) = self.queues.get_mut(&destination) {
            q.busy = false;
            q.remove(&done);
            let hinted = std::mem::take(&mut q.hinted) && !asked_later;
            q.asked_later = asked_later;
            if transient && hinted {
                // The peer showed up while this batch failed: go again now.
                q.failures = 0;
                q.retry_at = None;
                q.candidate = q.candidate.wrapping_add(1);
            } else if transient {
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
            let route = match (entry.conversation, entry.recipient) {
                (Conversation::Group(id), Recipient::Member(ipk)) => {
                    self.groups.get(&id).and_then(|(_, m)| m.get(&ipk))
                }
                _ => None,
            };
            let _ = self.events.send(Event::Delivery {
                conversation: entry.conversation.to_string(),
                message: id.to_string(),
                status: if delivered { "delivered" } else { "failed" },
                kind: match entry.kind {
                    OutboxKind::Welcome => "answer",
                    _ => "message",
                },
                member: match entry.recipient {
                    Recipient::Member(ipk) => Some(ipk.fingerprint()),
                    Recipient::Peer => None,
                },
                member_name: route.map(|(_, name, _)| name.clone()),
                asserted_by: route.and_then(|(.., by)| by.clone()),
                contact_name: match entry.recipient {
                    Recipient::Peer => self
                        .queues
                        .get(&(entry.conversation, entry.recipient))
                        .and_then(|q| q.name.clone()),
                    Recipient::Member(_) => None,
                },
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
    fn a_peer_that_asked_us_to_retry_later_keeps_its_backoff_when_seen() {
        let waiting = || Queue {
            failures: 3,
            retry_at: Some(Instant::now() + Duration::from_secs(2)),
            ..Queue::default()
        };
        let mut back = waiting();
        back.peer_seen();
        assert_eq!((back.failures, back.retry_at), (0, None), "retried at once");
        let mut busy = waiting();
        busy.asked_later = true;
        busy.peer_seen();
        assert_eq!(busy.failures, 3);
        assert!(busy.retry_at.is_some(), "it still waits out its backoff");
    }

    /// A row queued to a placeholder that is claimed before it goes out
    /// reaches the claimer (it was dropped as having no recipient, and its
    /// message stayed "queued" for ever); a member removed lately is still
    /// reached; a key nobody stands for is not.
    #[test]
    fn a_placeholder_claimed_since_is_reached_as_its_claimer() {
        use crate::identity::IdentityKey;
        use crate::model::DisplayIdentity;
        let member = |name: &str, status: MemberStatus, port: u8| Member {
            ipk: IdentityKey::generate().ipk(),
            display: DisplayIdentity {
                name: name.into(),
                pronouns: None,
                picture: None,
            },
            transports: vec![TransportInfo::new(
                crate::model::TransportKind::Tcp,
                PeerId::random(),
                [port; 32],
                &[],
                crate::model::AddressLease::new(0, Duration::from_secs(60)),
                crate::model::AddressLease::new(0, Duration::from_secs(60)),
            )],
            status,
            introduced_by: None,
            direct_key: None,
            via: None,
            claim: None,
        };
        let placeholder = IdentityKey::generate().ipk();
        let blair = member("Blair", MemberStatus::Claimed { placeholder }, 1);
        let gone = member("Gil", MemberStatus::Verified, 2);
        let hers = member(
            "Cleo",
            MemberStatus::Placeholder {
                asserted_by: blair.ipk,
            },
            3,
        );
        let ours = member(
            "Dov",
            MemberStatus::Placeholder {
                asserted_by: IdentityKey::generate().ipk(),
            },
            4,
        );
        let routes = member_routes(
            vec![gone.clone()],
            vec![blair.clone(), hers.clone(), ours.clone()],
        );
        assert_eq!(
            routes[&placeholder],
            (blair.transports.clone(), "Blair".into(), None)
        );
        assert_eq!(routes[&blair.ipk].1, "Blair");
        assert_eq!(routes[&gone.ipk].1, "Gil");
        // A placeholder is named with who asserts it.
        assert_eq!(routes[&hers.ipk].2.as_deref(), Some("Blair"));
        assert_eq!(routes[&ours.ipk].2.as_deref(), Some("you"));
        assert_eq!(routes[&blair.ipk].2, None);
        assert!(!routes.contains_key(&IdentityKey::generate().ipk()));
    }

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
