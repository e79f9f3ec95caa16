//! The `GroupProton` actor: one per group membership, a thin shell around
//! [`GroupSession`], shaped like the `Proton` actor: work is queued, run as
//! one batch into one [`Changes`], and committed in one transaction off the
//! actor's thread; replies, events and relays go out after the commit.
//!
//! Inbox rows for a later epoch (an application message that overtook the
//! commit before it) stay in the inbox and are tried again after each
//! commit. A timer checks whether our pending commit waits too long for the
//! ordering service (failover, see `groups`). Relays (introductions and
//! equivalences to send through our relationships) are handed to the
//! manager, which passes them to the protons and reports back when queued.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use actix::prelude::*;
use redb::ReadableTable;
use tokio::sync::oneshot;

use crate::attestation::Attestation;
use crate::changes::Changes;
use crate::groups::{GroupError, GroupSession, Received};
use crate::identity::{Ipk, SecretKey};
use crate::model::{now_ms, GroupProtonId};
use crate::proton::Shared;
use crate::records::{
    GroupState, HistoryEntry, InboxEntry, Intent, Owner, ProtonRecord, Provenance, Relay, Source,
    TicketOrigin,
};
use crate::relationship::{accept_invite, AcceptLink, SideLink};
use crate::store::{self, tables, Store, StoreError};
use crate::views::{ContactChange, Event, GroupChange, GroupEvent};

/// Most inbox rows processed in one batch.
const INBOX_BATCH: usize = 512;
/// How often a pending commit is checked against the ordering timeout.
const ORDERING_CHECK: Duration = Duration::from_millis(250);

type Reply<T> = oneshot::Sender<Result<T, GroupError>>;

/// Something a group proton was asked to do.
pub enum Command {
    Send(String),
    Claim(Box<ProtonRecord>),
    Decline,
    Leave,
    Intent(Box<Intent>),
    Add(Vec<ProtonRecord>),
    Verify(Ipk),
    /// Seal this side-relationship ticket (and commit its changes with it).
    Connect {
        member: Ipk,
        ticket: String,
        key: SecretKey,
        changes: Box<Changes>,
    },
}

/// What a command answers: a history entry for `Send`, nothing else.
pub enum Answer {
    Sent(HistoryEntry),
    Done,
}

enum Work {
    Command(Box<Command>, Reply<Answer>),
    Inbox,
    /// Envelopes to process after the inbox rows (see `inbound::ProcessDirect`).
    Direct(Vec<InboxEntry>, oneshot::Sender<bool>),
    Tick,
    RelayDone([u8; 16]),
}

/// Run a command; answers once its effect is durable.
#[derive(Message)]
#[rtype(result = "Result<Answer, GroupError>")]
pub struct Do(pub Command);

/// Process this group proton's inbox rows.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ProcessInbox;

/// A relay was queued by its proton.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RelayDone(pub [u8; 16]);

/// Sent to the manager for each relay to pass to a proton.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct RelayRequest {
    pub group: GroupProtonId,
    pub relay: Relay,
}

pub struct GroupProton {
    id: GroupProtonId,
    shared: Shared,
    relays: Recipient<RelayRequest>,
    session: Option<GroupSession>,
    queue: VecDeque<Work>,
    busy: bool,
    /// Relays handed to the manager and not yet reported queued.
    relaying: HashSet<[u8; 16]>,
}

impl GroupProton {
    pub fn new(id: GroupProtonId, shared: Shared, relays: Recipient<RelayRequest>) -> Self {
        Self {
            id,
            shared,
            relays,
            session: None,
            queue: VecDeque::new(),
            busy: false,
            relaying: HashSet::new(),
        }
    }

    fn push(&mut self, work: Work, ctx: &mut Context<Self>) {
        self.queue.push_back(work);
        self.drain(ctx);
    }

    fn drain(&mut self, ctx: &mut Context<Self>) {
        if self.busy || self.queue.is_empty() {
            return;
        }
        let Some(session) = self.session.as_mut() else {
            for work in self.queue.drain(..) {
                match work {
                    Work::Command(_, reply) => {
                        let _ = reply.send(Err(GroupError::Unknown(self.id)));
                    }
                    Work::Direct(_, done) => {
                        let _ = done.send(false);
                    }
                    _ => {}
                }
            }
            return;
        };
        let now = now_ms();
        tracing::trace!(target: crate::TIMELINE, store = %self.shared.store.name(), group = %self.id, works = self.queue.len(), "group: pass");
        let node = self.shared.node_addrs();
        let lifetimes = self.shared.lifetimes;
        let timeout = self.shared.config.ordering_timeout_ms;
        let mut changes = Changes::default();
        let mut replies: Vec<(Reply<Answer>, Answer)> = Vec::new();
        let mut events: Vec<Event> = Vec::new();
        let mut more_inbox = false;
        let mut inbox_done = false;
        let epoch_before = session.epoch();
        let state_before = session.record().state;
        let members_before = session.record().members.clone();
        // Direct envelopes are processed with the inbox rows, after them.
        let (queue, mut direct, direct_done) = crate::inbound::take_direct(
            std::mem::take(&mut self.queue),
            |work| match work {
                Work::Direct(entries, done) => Ok((entries, done)),
                other => Err(other),
            },
            |work| matches!(work, Work::Inbox),
            || Work::Inbox,
        );

        for work in queue {
            match work {
                Work::Command(command, reply) => {
                    let result = match *command {
                        Command::Send(text) => session
                            .send_text(&text, now, &mut changes)
                            .map(Answer::Sent),
                        Command::Claim(proton) => session
                            .claim(&proton, &node, lifetimes, now, &mut changes)
                            .map(|()| Answer::Done),
                        Command::Decline => session.decline(&mut changes).map(|()| Answer::Done),
                        Command::Leave => session.leave(now, &mut changes).map(|()| Answer::Done),
                        Command::Intent(intent) => session
                            .request(*intent, now, &mut changes)
                            .map(|()| Answer::Done),
                        Command::Add(protons) => session
                            .add(&self.shared.store, &protons, now, &mut changes)
                            .map(|()| Answer::Done),
                        Command::Verify(member) => session
                            .verify_member(member, &mut changes)
                            .map(|()| Answer::Done),
                        Command::Connect {
                            member,
                            ticket,
                            key,
                            changes: invite,
                        } => {
                            // The member's invitation may have made the
                            // relationship since the manager looked, or
                            // earlier in this pass.
                            let met = Provenance::MetInGroup {
                                group: self.id,
                                member,
                            };
                            let made_now = changes
                                .protons
                                .iter()
                                .find(|p| p.provenance == met)
                                .map(|p| p.id);
                            match crate::manager::met_in_group(&self.shared.store, self.id, member)
                                .map(|found| found.or(made_now))
                            {
                                Ok(Some(contact)) => Err(GroupError::AlreadyConnected(contact)),
                                _ => {
                                    // The ticket and its sealed delivery commit together.
                                    let mut step = *invite;
                                    session
                                        .connect(member, ticket, &key.key(), now, &mut step)
                                        .map(|()| {
                                            changes.extend(step);
                                            Answer::Done
                                        })
                                }
                            }
                        }
                    };
                    match result {
                        Ok(answer) => replies.push((reply, answer)),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Work::Direct(..) => {}
                Work::Inbox if !inbox_done => {
                    inbox_done = true;
                    match process_inbox(
                        session,
                        &self.shared.store,
                        self.id,
                        std::mem::take(&mut direct),
                        now,
                        timeout,
                        &mut changes,
                    ) {
                        Ok((received, invitations, more)) => {
                            more_inbox = more;
                            // Side relationships offered by members: accept them
                            // in the same transaction that consumes the offer.
                            for (ticket, from, equivalence) in invitations {
                                // A member who connects again gets the
                                // relationship we already have with them.
                                let met = Provenance::MetInGroup {
                                    group: self.id,
                                    member: from,
                                };
                                let made_now = changes
                                    .protons
                                    .iter()
                                    .find(|p| p.provenance == met)
                                    .map(|p| p.id);
                                if let Some(contact) = made_now.or(crate::manager::met_in_group(
                                    &self.shared.store,
                                    self.id,
                                    from,
                                )
                                .ok()
                                .flatten())
                                {
                                    tracing::info!(group = %self.id, %contact, "a member offered a side relationship we already have");
                                    continue;
                                }
                                // We both asked at once and the invitations
                                // crossed: keep one relationship. Both nodes
                                // keep the invitation of the member whose
                                // group key is the lower.
                                let crossed = crate::manager::side_ticket_to(
                                    &self.shared.store,
                                    self.id,
                                    from,
                                    now.saturating_sub(crate::manager::CROSSING_WINDOW_MS),
                                )
                                .unwrap_or_else(|e| {
                                    tracing::warn!(group = %self.id, error = %e, "reading our invitations failed");
                                    None
                                });
                                // Ours may also be in this very pass, not
                                // yet stored: the member skips it then, if
                                // theirs wins; ours stays unused.
                                let ours_now = changes.tickets.iter().any(|t| {
                                    !t.used
                                        && t.origin
                                            == Some(TicketOrigin::Group {
                                                group: self.id,
                                                member: from,
                                            })
                                });
                                if (crossed.is_some() || ours_now) && session.own_ipk() < from {
                                    tracing::info!(group = %self.id, "side invitations crossed; the member takes ours");
                                    continue;
                                }
                                let link = SideLink {
                                    group_key: session.key(),
                                    group: self.id,
                                    member: from,
                                };
                                match accept_invite(
                                    &self.shared.store,
                                    &node,
                                    session.record().own_display.clone(),
                                    lifetimes,
                                    &ticket,
                                    Some(AcceptLink::Group(link)),
                                    now,
                                ) {
                                    Ok(acceptance) => {
                                        events.push(Event::contact(
                                            &acceptance.proton,
                                            ContactChange::Added,
                                        ));
                                        changes.extend(acceptance.changes);
                                        // Their word that the contact is
                                        // the member, as they have ours.
                                        changes.links.push((acceptance.proton.id, equivalence));
                                        // Ours, which the member drops.
                                        if let Some(ours) = crossed {
                                            changes.delete_tickets.push(ours.id);
                                            changes.delete_mls_namespaces.push(ours.proton.0);
                                        }
                                    }
                                    Err(e) => {
                                        tracing::warn!(group = %self.id, error = %e, "a side invitation could not be accepted")
                                    }
                                }
                            }
                            let me = session.own_ipk();
                            for entry in received {
                                events.push(Event::group_message(session.record(), me, &entry));
                            }
                        }
                        Err(e) => {
                            tracing::error!(group = %self.id, error = %e, "reading the inbox failed")
                        }
                    }
                }
                Work::Inbox => {}
                Work::Tick => match session.check_ordering(now, timeout, &mut changes) {
                    // Held inbox rows may go through now (the sync ended).
                    Ok(true) => more_inbox = true,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(group = %self.id, error = %e, "moving to the next ordering service failed")
                    }
                },
                Work::RelayDone(id) => {
                    self.relaying.remove(&id);
                    session.relay_done(id, &mut changes);
                }
            }
        }
        let departures = session.take_departures();
        let updates = session.take_updates();
        if session.epoch() != epoch_before || session.record().state != state_before {
            let (joined, claimed, gone) =
                crate::views::roster_change(&members_before, &session.record().members);
            let (left, removed, removed_by) = crate::views::departures_named(
                &members_before,
                &session.record().members,
                &departures,
                session.own_ipk(),
                session.declined(),
            );
            let change = match (state_before, session.record().state) {
                (_, GroupState::Gone) => GroupChange::Left,
                (GroupState::Invited, GroupState::Active) => GroupChange::Entered,
                _ => GroupChange::Changed,
            };
            events.push(Event::Group(GroupEvent {
                joined,
                claimed,
                gone,
                left,
                removed,
                removed_by,
                updated: updates
                    .iter()
                    .map(
                        |k| match session.record().members.iter().find(|m| m.ipk == *k) {
                            Some(m) => m.display.name.clone(),
                            None if *k == session.own_ipk() => "me".into(),
                            None => k.fingerprint(),
                        },
                    )
                    .collect(),
                ..Event::group_change(session.record(), session.epoch(), change)
            }));
        }
        session.drain_writes(&mut changes);
        if changes.is_empty() {
            for (reply, answer) in replies {
                let _ = reply.send(Ok(answer));
            }
            for done in direct_done {
                let _ = done.send(true);
            }
            return;
        }
        self.busy = true;
        tracing::trace!(target: crate::TIMELINE, store = %self.shared.store.name(), group = %self.id, outbox = changes.outbox.len(), "group: commit");
        let store = self.shared.store.clone();
        let outbox = self.shared.outbox.clone();
        let commit = async move {
            store
                .write_then(
                    move |tx| changes.apply(tx),
                    move |applied| outbox.queued(std::mem::take(&mut applied.outbox)),
                )
                .await
        };
        ctx.spawn(commit.into_actor(self).map(move |result, act, ctx| {
            tracing::trace!(target: crate::TIMELINE, store = %act.shared.store.name(), group = %act.id, ok = result.is_ok(), "group: committed");
            act.busy = false;
            match result {
                Ok(_) => {
                    for (reply, answer) in replies {
                        let _ = reply.send(Ok(answer));
                    }
                    for done in direct_done {
                        let _ = done.send(true);
                    }
                    for event in events {
                        act.shared.emit(event);
                    }
                    act.send_relays();
                    if more_inbox {
                        act.queue.push_back(Work::Inbox);
                    }
                }
                Err(e) => {
                    tracing::error!(group = %act.id, error = %e, "committing failed; reloading from the store");
                    for (reply, _) in replies {
                        let _ = reply.send(Err(GroupError::Store(StoreError::Worker(e.to_string()))));
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

    /// Hands every relay not yet in flight to the manager.
    fn send_relays(&mut self) {
        let Some(session) = &self.session else { return };
        for relay in &session.record().relays {
            if self.relaying.insert(relay.id) {
                self.relays.do_send(RelayRequest {
                    group: self.id,
                    relay: relay.clone(),
                });
            }
        }
    }

    fn reload(&mut self) {
        match GroupSession::load(&self.shared.store, self.id) {
            Ok(session) => self.session = Some(session),
            Err(e) => {
                tracing::error!(group = %self.id, error = %e, "loading the group failed");
                self.session = None;
            }
        }
        self.relaying.clear();
    }
}

/// Processes the group's inbox rows in order. A row for a later epoch is
/// held back, and retried as soon as a commit moves the group on, before
/// any row after that commit: so each sender's messages are processed (and
/// land in the history) in the order they were sent, and a held message is
/// never left behind by so many later ones of its sender that its key
/// falls out of the ratchet's window. Rows still held at the end stay in
/// the inbox for the next pass.
#[allow(clippy::type_complexity)]
fn process_inbox(
    session: &mut GroupSession,
    store: &Store,
    id: GroupProtonId,
    mut direct: Vec<InboxEntry>,
    now: u64,
    timeout_ms: u64,
    changes: &mut Changes,
) -> Result<(Vec<HistoryEntry>, Vec<(String, Ipk, Attestation)>, bool), StoreError> {
    let rows = match read_inbox(store, id) {
        Ok(rows) => rows,
        Err(e) => {
            // Kept, in order, for the next pass.
            changes.inbox.append(&mut direct);
            return Err(e);
        }
    };
    let more = rows.len() >= INBOX_BATCH;
    let mut rows: Vec<(Option<u64>, InboxEntry)> =
        rows.into_iter().map(|(s, e)| (Some(s), e)).collect();
    if more {
        // Older rows wait beyond this batch: these wait behind them.
        changes.inbox.append(&mut direct);
    }
    rows.extend(direct.into_iter().map(|e| (None, e)));
    let mut pass = InboxPass {
        session,
        id,
        now,
        timeout_ms,
        received: Vec::new(),
        invitations: Vec::new(),
        held: Vec::new(),
    };
    for (seq, entry) in rows {
        let before = pass.session.progress_marker();
        pass.handle(seq, entry, changes);
        if pass.session.progress_marker() != before {
            pass.retry_held(changes);
        }
    }
    // Direct rows still held are stored, to be tried again with the others.
    for (seq, entry) in pass.held {
        if seq.is_none() {
            changes.inbox.push(entry);
        }
    }
    Ok((pass.received, pass.invitations, more))
}

/// One pass over a group's inbox; see [`process_inbox`].
struct InboxPass<'a> {
    session: &'a mut GroupSession,
    id: GroupProtonId,
    now: u64,
    timeout_ms: u64,
    received: Vec<HistoryEntry>,
    invitations: Vec<(String, Ipk, Attestation)>,
    /// Rows for a later epoch, in inbox order (direct ones have no row yet).
    held: Vec<(Option<u64>, InboxEntry)>,
}

impl InboxPass<'_> {
    fn handle(&mut self, seq: Option<u64>, entry: InboxEntry, changes: &mut Changes) {
        let relayed = match entry.source {
            Source::Relationship(p) => Some(p),
            Source::Network => None,
        };
        match self
            .session
            .receive(&entry.payload, relayed, self.now, changes)
        {
            Ok(Received::Text(e)) => {
                self.received.push(e);
                changes.inbox_done.extend(seq);
            }
            Ok(Received::SideInvitation {
                ticket,
                from,
                equivalence,
            }) => {
                self.invitations.push((ticket, from, *equivalence));
                changes.inbox_done.extend(seq);
            }
            Ok(_) => changes.inbox_done.extend(seq),
            Err(GroupError::NotYetAMember)
                if self.now.saturating_sub(entry.received_at)
                    < crate::groups::HOLD_UNKNOWN_SENDER_MS =>
            {
                self.held.push((seq, entry));
                self.session
                    .request_catch_up(self.now, self.timeout_ms, changes);
            }
            Err(GroupError::Deferred) => {
                self.held.push((seq, entry));
                self.session
                    .request_catch_up(self.now, self.timeout_ms, changes);
            }
            Err(e) => {
                log_drop(self.id, &e);
                changes.inbox_done.extend(seq);
            }
        }
    }

    /// Retries the held rows, in order, for as long as they move the group on.
    fn retry_held(&mut self, changes: &mut Changes) {
        loop {
            let before = self.session.progress_marker();
            for (seq, entry) in std::mem::take(&mut self.held) {
                self.handle(seq, entry, changes);
            }
            if self.held.is_empty() || self.session.progress_marker() == before {
                return;
            }
        }
    }
}

fn log_drop(id: GroupProtonId, e: &GroupError) {
    match e {
        GroupError::WrongEpoch { .. }
        | GroupError::Mls(crate::mls::MlsError::Replay)
        | GroupError::RemovedLately
        | GroupError::Gone => {
            tracing::debug!(group = %id, error = %e, "dropped a stale or repeated message")
        }
        _ => tracing::warn!(group = %id, error = %e, "dropped a message that did not process"),
    }
}

fn read_inbox(store: &Store, id: GroupProtonId) -> Result<Vec<(u64, InboxEntry)>, StoreError> {
    store.read(|tx| {
        let t = tx.open_table(tables::INBOX)?;
        let mut rows = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            let entry: InboxEntry = store::decode(v.value(), "inbox entry")?;
            if entry.owner == Owner::Group(id) {
                rows.push((k.value(), entry));
                if rows.len() >= INBOX_BATCH {
                    break;
                }
            }
        }
        Ok(rows)
    })
}

impl Actor for GroupProton {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.reload();
        let Some(session) = self.session.as_mut() else {
            ctx.stop();
            return;
        };
        session.restart_ordering_clock(now_ms());
        ctx.run_interval(ORDERING_CHECK, |act, ctx| {
            if act.session.as_ref().is_some_and(|s| s.needs_tick()) {
                act.push(Work::Tick, ctx);
            }
        });
        self.send_relays();
        self.push(Work::Inbox, ctx);
    }
}

impl Handler<Do> for GroupProton {
    type Result = ResponseFuture<Result<Answer, GroupError>>;

    fn handle(&mut self, msg: Do, ctx: &mut Self::Context) -> Self::Result {
        let (reply, rx) = oneshot::channel();
        self.push(Work::Command(Box::new(msg.0), reply), ctx);
        Box::pin(async move { rx.await.unwrap_or(Err(GroupError::Gone)) })
    }
}

impl Handler<ProcessInbox> for GroupProton {
    type Result = ();

    fn handle(&mut self, _: ProcessInbox, ctx: &mut Self::Context) {
        self.push(Work::Inbox, ctx);
    }
}

impl Handler<crate::inbound::ProcessDirect> for GroupProton {
    type Result = ();

    fn handle(&mut self, msg: crate::inbound::ProcessDirect, ctx: &mut Self::Context) {
        self.push(Work::Direct(msg.0, msg.1), ctx);
    }
}

impl Handler<RelayDone> for GroupProton {
    type Result = ();

    fn handle(&mut self, msg: RelayDone, ctx: &mut Self::Context) {
        self.push(Work::RelayDone(msg.0), ctx);
    }
}
