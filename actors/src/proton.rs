//! The `Proton` actor: one per 1:1 relationship, a thin shell around
//! [`ProtonSession`].
//!
//! Work (send a text, process the inbox, refresh transports, change state)
//! is queued; when the actor is idle it takes everything queued, runs it
//! through the session into one [`Changes`], and commits that in one write
//! transaction off the actor's thread. Replies and events go out only after
//! the commit. While a commit is in flight new work queues up and becomes
//! the next batch: that batching is what turns one fsync per message into
//! one per batch under load. If a commit fails, the session is rebuilt from
//! the store, so memory never runs ahead of what is durable.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock, RwLock};

use actix::prelude::*;
use redb::ReadableTable;
use tokio::sync::{broadcast, oneshot};

use crate::changes::Changes;
use crate::model::{now_ms, GroupProtonId, ProtonId};
use crate::outbox::OutboxHandle;
use crate::protocol::Body;
use crate::records::{HistoryEntry, InboxEntry, Owner, ProtonState};
use crate::relationship::{Lifetimes, NodeAddrs, ProtonSession, Received, RelationshipError};
use crate::store::{self, tables, Store};
use crate::views::{ContactChange, Event, MergeView};

/// Most inbox rows processed in one batch; the rest follow in the next.
const INBOX_BATCH: usize = 512;

/// What every conversation actor needs from the node.
#[derive(Clone)]
pub struct Shared {
    pub store: Store,
    pub outbox: OutboxHandle,
    pub events: broadcast::Sender<Event>,
    pub node: Arc<RwLock<NodeAddrs>>,
    pub lifetimes: Lifetimes,
    pub config: config::Delivery,
    /// Where actors report work for other actors (set once the manager runs).
    pub notices: Arc<OnceLock<Recipient<Notice>>>,
}

/// Work one actor found for another, reported to the manager.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub enum Notice {
    /// A group proton has new inbox rows or was just created.
    Group(GroupProtonId),
}

impl Shared {
    pub fn node_addrs(&self) -> NodeAddrs {
        match self.node.read() {
            Ok(n) => n.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn emit(&self, event: Event) {
        // No subscriber is fine: nobody is watching.
        let _ = self.events.send(event);
    }

    pub fn notify(&self, notice: Notice) {
        if let Some(r) = self.notices.get() {
            r.do_send(notice);
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, RelationshipError>>;

enum Work {
    Send {
        text: String,
        reply: Reply<HistoryEntry>,
    },
    Control {
        body: Box<Body>,
        reply: Reply<()>,
    },
    /// A control message whose changes the caller commits (see [`LendControl`]).
    Lend {
        body: Box<Body>,
        reply: Reply<Changes>,
        outcome: oneshot::Receiver<bool>,
    },
    Inbox,
    /// Envelopes to process after the inbox rows (see `inbound::ProcessDirect`).
    Direct(Vec<InboxEntry>, oneshot::Sender<bool>),
    Refresh,
    SetState(ProtonState),
    /// Answered once the inbox rows stored before it are processed.
    Settle(oneshot::Sender<()>),
}

/// Send a text message; answers once it is durably queued.
#[derive(Message)]
#[rtype(result = "Result<HistoryEntry, RelationshipError>")]
pub struct SendText(pub String);

/// Process this proton's inbox rows.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ProcessInbox;

/// Answers once every envelope stored for this relationship before it is
/// processed and its effects are durable (or failed): what the peer was
/// told is delivered (stored) is then in the history too.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Settle;

/// Tell the peer our transports if they changed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RefreshTransports;

/// Change the proton's state (our answer was acknowledged).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetState(pub ProtonState);

/// Send a control message (an introduction, an equivalence) to the peer;
/// answers once it is durably queued.
#[derive(Message)]
#[rtype(result = "Result<(), RelationshipError>")]
pub struct SendControl(pub Body);

/// Encrypt a control message to the peer and answer with its changes (the
/// relationship's MLS state, the outbox row), for the caller to commit in
/// its own transaction: an introducer creates a group and queues both
/// introductions in one durable commit instead of three in a row. The
/// actor holds all other work until `outcome` says how that commit ended:
/// `true`, committed, and memory is what the store holds; anything else
/// (`false`, or the sender dropped) and the session is reloaded from the
/// store, as after a failed commit of its own.
#[derive(Message)]
#[rtype(result = "Result<Changes, RelationshipError>")]
pub struct LendControl {
    pub body: Body,
    pub outcome: oneshot::Receiver<bool>,
}

pub struct Proton {
    id: ProtonId,
    shared: Shared,
    session: Option<ProtonSession>,
    queue: VecDeque<Work>,
    busy: bool,
}

impl Proton {
    pub fn new(id: ProtonId, shared: Shared) -> Self {
        Self {
            id,
            shared,
            session: None,
            queue: VecDeque::new(),
            busy: false,
        }
    }

    fn push(&mut self, work: Work, ctx: &mut Context<Self>) {
        self.queue.push_back(work);
        self.drain(ctx);
    }

    /// Runs everything queued as one batch and commits it.
    fn drain(&mut self, ctx: &mut Context<Self>) {
        if self.busy || self.queue.is_empty() {
            return;
        }
        let Some(session) = self.session.as_mut() else {
            for work in self.queue.drain(..) {
                match work {
                    Work::Send { reply, .. } => {
                        let _ = reply.send(Err(RelationshipError::UnknownProton(self.id)));
                    }
                    Work::Direct(_, done) => {
                        let _ = done.send(false);
                    }
                    Work::Lend { reply, .. } => {
                        let _ = reply.send(Err(RelationshipError::UnknownProton(self.id)));
                    }
                    _ => {}
                }
            }
            return;
        };
        if matches!(self.queue.front(), Some(Work::Lend { .. })) {
            self.lend(ctx);
            return;
        }
        // A loan is a batch of its own: take the work queued before it.
        let batch = match self
            .queue
            .iter()
            .position(|w| matches!(w, Work::Lend { .. }))
        {
            Some(at) => {
                let rest = self.queue.split_off(at);
                std::mem::replace(&mut self.queue, rest)
            }
            None => std::mem::take(&mut self.queue),
        };
        tracing::trace!(target: crate::TIMELINE, store = %self.shared.store.name(), proton = %self.id, works = batch.len(), "relationship: pass");
        let node = self.shared.node_addrs();
        let lifetimes = self.shared.lifetimes;
        let now = now_ms();
        let mut changes = Changes::default();
        let mut sent: Vec<(Reply<HistoryEntry>, HistoryEntry)> = Vec::new();
        let mut controlled: Vec<Reply<()>> = Vec::new();
        let mut groups: Vec<GroupProtonId> = Vec::new();
        let mut events: Vec<Event> = Vec::new();
        let mut more_inbox = false;
        let mut inbox_done = false;
        let mut settled: Vec<oneshot::Sender<()>> = Vec::new();
        let state_before = session.record().state;
        // Direct envelopes are processed with the inbox rows, after them.
        let (queue, mut direct, direct_done) = crate::inbound::take_direct(
            batch,
            |work| match work {
                Work::Direct(entries, done) => Ok((entries, done)),
                other => Err(other),
            },
            |work| matches!(work, Work::Inbox),
            || Work::Inbox,
        );

        for work in queue {
            match work {
                Work::Send { text, reply } => {
                    match session.send_text(&text, &node, lifetimes, now, &mut changes) {
                        Ok(entry) => sent.push((reply, entry)),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Work::Control { body, reply } => {
                    match session.send_control(*body, &node, lifetimes, now, &mut changes) {
                        Ok(()) => controlled.push(reply),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                // Not in a batch (taken apart above); kept for the next.
                lend @ Work::Lend { .. } => self.queue.push_front(lend),
                Work::Direct(..) => {}
                Work::Inbox if !inbox_done => {
                    inbox_done = true;
                    let mut rows: Vec<(Option<u64>, InboxEntry)> = match read_inbox(
                        &self.shared.store,
                        self.id,
                    ) {
                        Ok(rows) => rows.into_iter().map(|(s, e)| (Some(s), e)).collect(),
                        Err(e) => {
                            tracing::error!(proton = %self.id, error = %e, "reading the inbox failed");
                            // Kept, in order, for the next pass.
                            changes.inbox.append(&mut direct);
                            continue;
                        }
                    };
                    more_inbox = rows.len() >= INBOX_BATCH;
                    if more_inbox {
                        // Older rows wait beyond this batch: these wait behind them.
                        changes.inbox.append(&mut direct);
                    }
                    rows.extend(direct.drain(..).map(|e| (None, e)));
                    for (seq, entry) in rows {
                        changes.inbox_done.extend(seq);
                        match session.receive(&entry.payload, now, &mut changes) {
                            Ok(Received::Text(entry)) => {
                                events.push(Event::message(session.record(), &entry))
                            }
                            Ok(Received::Transports) => {}
                            Ok(Received::Joined(g)) => {
                                // The introduction waits for a claim or decline.
                                if let Some(group) = changes.groups.iter().rev().find(|r| r.id == g)
                                {
                                    events.push(Event::introduced(
                                        group,
                                        &session.record().peer_display.name,
                                    ));
                                }
                                groups.push(g)
                            }
                            Ok(Received::Relayed(g)) => groups.push(g),
                            Ok(Received::AlreadyInGroup(group_id)) => {
                                tracing::info!(proton = %self.id, "introduced into a group we are already in; declining the extra placeholder");
                                let decline = crate::protocol::Body::Decline { group_id };
                                if let Err(e) = session.send_control(
                                    decline,
                                    &node,
                                    lifetimes,
                                    now,
                                    &mut changes,
                                ) {
                                    tracing::warn!(proton = %self.id, error = %e, "declining an extra introduction failed");
                                }
                            }
                            Ok(Received::Merge(outcome)) => {
                                if let Some(m) =
                                    changes.merges.iter().rev().find(|m| m.id == outcome.id)
                                {
                                    if !outcome.flagged.is_empty() {
                                        tracing::warn!(proton = %self.id, flagged = ?outcome.flagged, "a merge request revealed a meddler");
                                    }
                                    if outcome.first {
                                        events.push(Event::Merge {
                                            merge: MergeView::of(
                                                m,
                                                session.record().peer_display.name.clone(),
                                            ),
                                        });
                                    }
                                }
                            }
                            Err(RelationshipError::Mls(crate::mls::MlsError::Replay)) => {
                                tracing::debug!(proton = %self.id, "dropped a retried envelope already processed")
                            }
                            Err(e) => {
                                tracing::warn!(proton = %self.id, error = %e, "dropped an envelope that did not process")
                            }
                        }
                    }
                }
                Work::Inbox => {}
                Work::Refresh => {
                    if let Err(e) = session.refresh_transports(&node, lifetimes, now, &mut changes)
                    {
                        tracing::warn!(proton = %self.id, error = %e, "sending our new transports failed");
                    }
                }
                Work::SetState(state) => {
                    if session.record().state != state {
                        changes.extend(session.set_state(state));
                    }
                }
                Work::Settle(done) => settled.push(done),
            }
        }
        // Our answer acknowledged, or the peer heard from: the state moved.
        let state = session.record().state;
        if state != state_before {
            let change = match state {
                ProtonState::Active => ContactChange::Active,
                ProtonState::Refused => ContactChange::Refused,
                ProtonState::Pending => ContactChange::Updated,
            };
            events.push(Event::contact(session.record(), change));
        }
        session.drain_writes(&mut changes);
        if changes.is_empty() {
            for done in direct_done {
                let _ = done.send(true);
            }
            for done in settled {
                let _ = done.send(());
            }
            return;
        }
        self.busy = true;
        let store = self.shared.store.clone();
        let outbox = self.shared.outbox.clone();
        let commit = async move {
            store
                .write_then(
                    move |tx| changes.apply(tx),
                    // Queued envelopes go to the sender the moment they are durable.
                    move |applied| outbox.queued(std::mem::take(&mut applied.outbox)),
                )
                .await
        };
        ctx.spawn(commit.into_actor(self).map(move |result, act, ctx| {
            tracing::trace!(target: crate::TIMELINE, store = %act.shared.store.name(), proton = %act.id, ok = result.is_ok(), "relationship: committed");
            act.busy = false;
            match result {
                Ok(_) => {
                    for done in direct_done {
                        let _ = done.send(true);
                    }
                    for (reply, entry) in sent {
                        let _ = reply.send(Ok(entry));
                    }
                    for reply in controlled {
                        let _ = reply.send(Ok(()));
                    }
                    for g in groups {
                        act.shared.notify(Notice::Group(g));
                    }
                    for event in events {
                        act.shared.emit(event);
                    }
                    if more_inbox {
                        // Older rows than those waited for remain.
                        act.queue.push_back(Work::Inbox);
                        act.queue.extend(settled.into_iter().map(Work::Settle));
                    } else {
                        for done in settled {
                            let _ = done.send(());
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(proton = %act.id, error = %e, "committing failed; reloading from the store");
                    let failed = || RelationshipError::Store(crate::store::StoreError::Worker(e.to_string()));
                    for (reply, _) in sent {
                        let _ = reply.send(Err(failed()));
                    }
                    for reply in controlled {
                        let _ = reply.send(Err(failed()));
                    }
                    for done in direct_done {
                        let _ = done.send(false);
                    }
                    act.reload();
                }
            }
            act.drain(ctx);
        }));
    }

    /// Runs the loan at the head of the queue (see [`LendControl`]).
    fn lend(&mut self, ctx: &mut Context<Self>) {
        let Some(Work::Lend {
            body,
            reply,
            outcome,
        }) = self.queue.pop_front()
        else {
            return;
        };
        let Some(session) = self.session.as_mut() else {
            let _ = reply.send(Err(RelationshipError::UnknownProton(self.id)));
            return;
        };
        let node = self.shared.node_addrs();
        let mut changes = Changes::default();
        if let Err(e) =
            session.send_control(*body, &node, self.shared.lifetimes, now_ms(), &mut changes)
        {
            let _ = reply.send(Err(e));
            self.drain(ctx);
            return;
        }
        session.drain_writes(&mut changes);
        if reply.send(Ok(changes)).is_err() {
            // Nobody will commit what was encrypted: back to the store.
            self.reload();
            self.drain(ctx);
            return;
        }
        self.busy = true;
        ctx.spawn(
            async move { outcome.await.unwrap_or(false) }
                .into_actor(self)
                .map(|committed, act, ctx| {
                    act.busy = false;
                    if !committed {
                        act.reload();
                    }
                    act.drain(ctx);
                }),
        );
    }

    fn reload(&mut self) {
        match ProtonSession::load(&self.shared.store, self.id) {
            Ok(session) => self.session = Some(session),
            Err(RelationshipError::Refused) => {
                tracing::debug!(proton = %self.id, "a refused relationship has no session");
                self.session = None;
            }
            Err(e) => {
                tracing::error!(proton = %self.id, error = %e, "loading the proton failed");
                self.session = None;
            }
        }
    }
}

impl Actor for Proton {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The mailbox is bounded by actix's default capacity (16 messages
        // queue before senders wait), on purpose: back-pressure on callers.
        self.reload();
        if self.session.is_none() {
            ctx.stop();
            return;
        }
        // Envelopes may have arrived while the actor was not running.
        self.push(Work::Inbox, ctx);
    }
}

impl Handler<SendText> for Proton {
    type Result = ResponseFuture<Result<HistoryEntry, RelationshipError>>;

    fn handle(&mut self, msg: SendText, ctx: &mut Self::Context) -> Self::Result {
        let (reply, rx) = oneshot::channel();
        self.push(Work::Send { text: msg.0, reply }, ctx);
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                Err(RelationshipError::Store(crate::store::StoreError::Worker(
                    "the relationship stopped".into(),
                )))
            })
        })
    }
}

impl Handler<SendControl> for Proton {
    type Result = ResponseFuture<Result<(), RelationshipError>>;

    fn handle(&mut self, msg: SendControl, ctx: &mut Self::Context) -> Self::Result {
        let (reply, rx) = oneshot::channel();
        self.push(
            Work::Control {
                body: Box::new(msg.0),
                reply,
            },
            ctx,
        );
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                Err(RelationshipError::Store(crate::store::StoreError::Worker(
                    "the relationship stopped".into(),
                )))
            })
        })
    }
}

impl Handler<LendControl> for Proton {
    type Result = ResponseFuture<Result<Changes, RelationshipError>>;

    fn handle(&mut self, msg: LendControl, ctx: &mut Self::Context) -> Self::Result {
        let (reply, rx) = oneshot::channel();
        self.push(
            Work::Lend {
                body: Box::new(msg.body),
                reply,
                outcome: msg.outcome,
            },
            ctx,
        );
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                Err(RelationshipError::Store(crate::store::StoreError::Worker(
                    "the relationship stopped".into(),
                )))
            })
        })
    }
}

impl Handler<ProcessInbox> for Proton {
    type Result = ();

    fn handle(&mut self, _: ProcessInbox, ctx: &mut Self::Context) {
        self.push(Work::Inbox, ctx);
    }
}

impl Handler<Settle> for Proton {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Settle, ctx: &mut Self::Context) -> Self::Result {
        let (done, settled) = oneshot::channel();
        self.queue.push_back(Work::Inbox);
        self.push(Work::Settle(done), ctx);
        // A dropped sender (the pass failed, or the actor stopped) ends the
        // wait too: the history is read as it is.
        Box::pin(async move {
            let _ = settled.await;
        })
    }
}

impl Handler<crate::inbound::ProcessDirect> for Proton {
    type Result = ();

    fn handle(&mut self, msg: crate::inbound::ProcessDirect, ctx: &mut Self::Context) {
        self.push(Work::Direct(msg.0, msg.1), ctx);
    }
}

impl Handler<RefreshTransports> for Proton {
    type Result = ();

    fn handle(&mut self, _: RefreshTransports, ctx: &mut Self::Context) {
        self.push(Work::Refresh, ctx);
    }
}

impl Handler<SetState> for Proton {
    type Result = ();

    fn handle(&mut self, msg: SetState, ctx: &mut Self::Context) {
        self.push(Work::SetState(msg.0), ctx);
    }
}

/// The first inbox rows of one proton, oldest first.
fn read_inbox(
    store: &Store,
    id: ProtonId,
) -> Result<Vec<(u64, InboxEntry)>, crate::store::StoreError> {
    store.read(|tx| {
        let t = tx.open_table(tables::INBOX)?;
        let mut rows = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            let entry: InboxEntry = store::decode(v.value(), "inbox entry")?;
            // Rows for an address derived from ours wait for their group.
            if entry.owner == Owner::Proton(id) && entry.context.is_none() {
                rows.push((k.value(), entry));
                if rows.len() >= INBOX_BATCH {
                    break;
                }
            }
        }
        Ok(rows)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::OutboxEntry;
    use crate::relationship::tests::{befriend, commit, side, Side, LIFETIMES};
    use std::time::Duration;

    fn start(side: &Side, id: ProtonId) -> Addr<Proton> {
        let shared = Shared {
            store: side.store.clone(),
            outbox: crate::outbox::OutboxHandle::detached(),
            events: broadcast::channel(16).0,
            node: Arc::new(RwLock::new(side.node.clone())),
            lifetimes: LIFETIMES,
            config: config::Delivery::default(),
            notices: Arc::new(OnceLock::new()),
        };
        Proton::new(id, shared).start()
    }

    /// The payloads `side` has queued, oldest first.
    fn queued(side: &Side) -> Vec<Vec<u8>> {
        side.store
            .read(|tx| {
                let t = tx.open_table(tables::OUTBOX)?;
                let mut out = Vec::new();
                for row in t.iter()? {
                    let (_, v) = row?;
                    let entry: OutboxEntry = store::decode(v.value(), "outbox entry")?;
                    out.push(entry.payload);
                }
                Ok(out)
            })
            .unwrap()
    }

    /// Borrows the changes of a control message; the sender says how
    /// their commit ended.
    async fn lend(actor: &Addr<Proton>) -> (Changes, oneshot::Sender<bool>) {
        let (told, outcome) = oneshot::channel();
        let lent = actor
            .send(LendControl {
                body: Body::Transports,
                outcome,
            })
            .await
            .unwrap()
            .unwrap();
        (lent, told)
    }

    /// A relationship lends a control message's changes to a caller that
    /// commits them: until the caller says how its commit ended, the
    /// relationship does nothing else; then it goes on from the lent state
    /// (committed) or from the store's (not committed), and its peer reads
    /// everything that was committed, in order.
    #[actix_rt::test]
    async fn a_loan_holds_the_relationship_until_its_commit_ends() {
        let (alex, blair) = (side(), side());
        let (ab, ba) = befriend(&alex, &blair);
        let actor = start(&alex, ab);
        let before = queued(&alex).len();

        let (lent, told) = lend(&actor).await;
        assert_eq!(lent.outbox.len(), 1, "the lent changes queue the message");
        let text = actor.send(SendText("after the loan".into()));
        tokio::pin!(text);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut text)
                .await
                .is_err(),
            "nothing else happens while the loan is out"
        );
        commit(&alex, lent);
        told.send(true).unwrap();
        text.await.unwrap().unwrap();

        // A loan whose commit never happened is forgotten.
        let (lent, told) = lend(&actor).await;
        drop((lent, told));
        actor
            .send(SendText("after the lost loan".into()))
            .await
            .unwrap()
            .unwrap();

        let payloads = queued(&alex);
        assert_eq!(payloads.len(), before + 3);
        let mut b = ProtonSession::load(&blair.store, ba).unwrap();
        let mut got = Vec::new();
        for payload in &payloads[before..] {
            let mut c = Changes::default();
            got.push(b.receive(payload, 5_000, &mut c).unwrap());
            b.drain_writes(&mut c);
            commit(&blair, c);
        }
        assert!(matches!(got[0], Received::Transports));
        assert!(matches!(&got[1], Received::Text(e) if e.text == "after the loan"));
        assert!(matches!(&got[2], Received::Text(e) if e.text == "after the lost loan"));
    }
}
