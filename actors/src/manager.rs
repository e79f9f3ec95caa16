//! The `RelationshipManager` actor: one per person (per node profile).
//!
//! It owns the registry of protons (starting their actors lazily, restoring
//! them from the store), routes processed-inbox work to them, runs the
//! multi-step workflows (invite, accept, the answer to our invitations),
//! resolves what the user types ("Blair", an id) to a relationship, and
//! serves read-only views straight from the store.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use redb::{ReadableTable, ReadableTableMetadata};
use tokio::sync::broadcast;
use transports::Multiaddr;

use crate::changes::Changes;
use crate::model::{now_ms, Conversation, DisplayIdentity, MessageId, ProtonId, TicketId};
use crate::outbox::Outcome;
use crate::protocol::Payload;
use crate::proton::{ProcessInbox, Proton, RefreshTransports, SendText, SetState, Shared};
use crate::records::{
    HistoryEntry, InboxEntry, MessageStatus, OutboxKind, Owner, ProtonRecord, ProtonState,
    TicketRecord,
};
use crate::relationship::{self, RelationshipError};
use crate::store::{self, tables, StoreError};
use crate::views::{self, ContactChange, ContactView, Event, MessageView, StatusView};

/// How often housekeeping runs: pruning expired tickets and addresses,
/// rotating addresses that are due.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(600);
/// Listen addresses settle for this long before peers are told.
const REFRESH_DEBOUNCE: Duration = Duration::from_secs(2);

/// What a user-facing request can fail with. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no contact matches {0:?}; `protonode contacts` lists them")]
    UnknownContact(String),
    #[error("{query:?} matches several contacts ({matches}); use the contact id")]
    AmbiguousContact { query: String, matches: String },
    #[error("the inviter's node refused this invitation: it was already used or has expired; ask for a new one")]
    TicketRefused,
    #[error("not acknowledged by the peer within {0:?}; it stays queued and will be delivered when the peer is reachable")]
    NotYetDelivered(Duration),
    #[error(transparent)]
    Relationship(#[from] RelationshipError),
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
    #[error("network: {0}")]
    Network(String),
    #[error("the node is shutting down")]
    Stopped,
}

/// An invitation as shown to the user.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InviteView {
    pub ticket: String,
    pub expires_at: String,
}

/// The result of accepting an invitation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AcceptView {
    pub contact: String,
    pub name: String,
    /// Whether the inviter's node has acknowledged our answer yet.
    pub delivered: bool,
}

#[derive(Message)]
#[rtype(result = "Result<InviteView, Error>")]
pub struct CreateInvite {
    /// How long the ticket stays valid; `None` for the configured default.
    pub ttl: Option<Duration>,
}

#[derive(Message)]
#[rtype(result = "Result<AcceptView, Error>")]
pub struct AcceptInvite {
    pub ticket: String,
}

#[derive(Message)]
#[rtype(result = "Result<Vec<ContactView>, Error>")]
pub struct ListContacts;

#[derive(Message)]
#[rtype(result = "Result<MessageView, Error>")]
pub struct SendMessage {
    /// A contact id or an unambiguous name.
    pub to: String,
    pub text: String,
    /// Wait for the peer's acknowledgement, at most this long.
    pub wait: Option<Duration>,
}

#[derive(Message)]
#[rtype(result = "Result<Vec<MessageView>, Error>")]
pub struct GetHistory {
    pub of: String,
}

#[derive(Message)]
#[rtype(result = "Result<StatusView, Error>")]
pub struct GetStatus;

/// New inbox rows for these owners (from the receiving service).
#[derive(Message)]
#[rtype(result = "()")]
pub struct InboxReady(pub Vec<Owner>);

/// A queued row was delivered or refused for good (from the sending service).
#[derive(Message)]
#[rtype(result = "()")]
pub struct DeliveryOutcome(pub Outcome);

/// The node listens on new addresses.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ListenAddrsChanged(pub Vec<Multiaddr>);

pub struct RelationshipManager {
    shared: Shared,
    client: transports::Client,
    config: config::Config,
    protons: HashMap<ProtonId, Addr<Proton>>,
    /// An answer to one of our invitations is being processed.
    welcomes_busy: bool,
    welcomes_again: bool,
    refresh_scheduled: bool,
}

impl RelationshipManager {
    pub fn new(shared: Shared, client: transports::Client, config: config::Config) -> Self {
        Self {
            shared,
            client,
            config,
            protons: HashMap::new(),
            welcomes_busy: false,
            welcomes_again: false,
            refresh_scheduled: false,
        }
    }

    fn display(&self) -> DisplayIdentity {
        DisplayIdentity::from_profile(&self.config.profile)
    }

    /// The actor of a proton, started (and restored from the store) if needed.
    fn proton(&mut self, id: ProtonId) -> Addr<Proton> {
        if let Some(addr) = self.protons.get(&id).filter(|a| a.connected()) {
            return addr.clone();
        }
        let addr = Proton::new(id, self.shared.clone()).start();
        self.protons.insert(id, addr.clone());
        addr
    }

    fn proton_exists(&self, id: ProtonId) -> bool {
        self.shared
            .store
            .read(|tx| Ok(tx.open_table(tables::PROTONS)?.get(id.0)?.is_some()))
            .unwrap_or(false)
    }

    /// Resolves what the user typed to a relationship: an exact id, a unique
    /// name (case-insensitive), or a unique id prefix of at least 4 digits.
    fn resolve(&self, query: &str) -> Result<ProtonRecord, Error> {
        let protons = all_protons(&self.shared.store)?;
        let query_trim = query.trim();
        if let Ok(id) = query_trim.parse::<ProtonId>() {
            if let Some(p) = protons.iter().find(|p| p.id == id) {
                return Ok(p.clone());
            }
        }
        let by_name: Vec<&ProtonRecord> = protons
            .iter()
            .filter(|p| p.peer_display.name.eq_ignore_ascii_case(query_trim))
            .collect();
        let by_prefix: Vec<&ProtonRecord> = if query_trim.len() >= 4 {
            protons
                .iter()
                .filter(|p| {
                    p.id.to_string()
                        .starts_with(&query_trim.to_ascii_lowercase())
                })
                .collect()
        } else {
            Vec::new()
        };
        let matches = if by_name.is_empty() {
            by_prefix
        } else {
            by_name
        };
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(Error::UnknownContact(query.to_string())),
            many => Err(Error::AmbiguousContact {
                query: query.to_string(),
                matches: many
                    .iter()
                    .map(|p| format!("{} {}", p.id, p.peer_display.name))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Processes answers to our invitations, one batch at a time.
    fn process_welcomes(&mut self, ctx: &mut Context<Self>) {
        if self.welcomes_busy {
            self.welcomes_again = true;
            return;
        }
        let store = self.shared.store.clone();
        let rows = match read_ticket_inbox(&store) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "reading answers to our invitations failed");
                return;
            }
        };
        if rows.is_empty() {
            return;
        }
        let now = now_ms();
        let mut changes = Changes::default();
        let mut added: Vec<ProtonRecord> = Vec::new();
        for (seq, ticket_id, entry) in rows {
            let outcome = load_ticket(&store, ticket_id).and_then(|ticket| {
                let payload = Payload::decode(&entry.payload).map_err(RelationshipError::from)?;
                relationship::receive_welcome(&store, &ticket, &payload, seq, now)
            });
            match outcome {
                Ok((record, c)) => {
                    changes.extend(c);
                    added.push(record);
                    // One answer per batch: a second one for another ticket
                    // may read MLS state this one writes.
                    break;
                }
                Err(e) => {
                    tracing::warn!(ticket = %ticket_id, error = %e, "refused an answer to our invitation");
                    changes.inbox_done.push(seq);
                }
            }
        }
        self.welcomes_busy = true;
        let commit = async move { store.write(move |tx| changes.apply(tx)).await };
        ctx.spawn(commit.into_actor(self).map(move |result, act, ctx| {
            act.welcomes_busy = false;
            match result {
                Ok(_) => {
                    for record in added {
                        tracing::info!(contact = %record.id, name = %record.peer_display.name, "accepted our invitation");
                        act.shared.emit(Event::contact(&record, ContactChange::Added));
                        act.proton(record.id).do_send(ProcessInbox);
                    }
                    // Another answer may be waiting.
                    act.welcomes_again = true;
                }
                Err(e) => tracing::error!(error = %e, "storing a new relationship failed"),
            }
            if std::mem::take(&mut act.welcomes_again) {
                act.process_welcomes(ctx);
            }
        }));
    }

    fn schedule_refresh(&mut self, ctx: &mut Context<Self>) {
        if self.refresh_scheduled {
            return;
        }
        self.refresh_scheduled = true;
        ctx.run_later(REFRESH_DEBOUNCE, |act, _| {
            act.refresh_scheduled = false;
            act.refresh_all();
        });
    }

    /// Asks every active proton to tell its peer about new transports.
    fn refresh_all(&mut self) {
        let ids: Vec<ProtonId> = match all_protons(&self.shared.store) {
            Ok(protons) => protons
                .into_iter()
                .filter(|p| p.state == ProtonState::Active)
                .map(|p| p.id)
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "listing relationships failed");
                return;
            }
        };
        for id in ids {
            self.proton(id).do_send(RefreshTransports);
        }
    }

    fn housekeeping(&mut self, ctx: &mut Context<Self>) {
        let store = self.shared.store.clone();
        let now = now_ms();
        ctx.spawn(
            async move { store.write(move |tx| prune(tx, now)).await }
                .into_actor(self)
                .map(|result, act, _| {
                    match result {
                        Ok(n) if n > 0 => {
                            tracing::info!(rows = n, "pruned expired tickets and addresses")
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "housekeeping failed"),
                    }
                    act.refresh_all();
                }),
        );
    }

    /// Dials the peers of our relationships so that queued messages (theirs
    /// to us, ours to them) flow at once after a restart.
    fn dial_known_peers(&self) {
        let peers = match relationship::known_peers(&self.shared.store) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "listing known peers failed");
                return;
            }
        };
        let client = self.client.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            futures::stream::iter(peers)
                .for_each_concurrent(8, |(peer, addrs)| {
                    let client = client.clone();
                    async move {
                        if let Err(e) = client.dial(peer, addrs).await {
                            tracing::debug!(%peer, error = %e, "peer not reachable at start-up");
                        }
                    }
                })
                .await;
        });
    }
}

impl Actor for RelationshipManager {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Work left by the last run: inbox rows not yet processed.
        match inbox_owners(&self.shared.store) {
            Ok(owners) if !owners.is_empty() => ctx.notify(InboxReady(owners)),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "reading the inbox failed"),
        }
        self.dial_known_peers();
        self.housekeeping(ctx);
        ctx.run_interval(HOUSEKEEPING_EVERY, |act, ctx| act.housekeeping(ctx));
    }
}

impl Handler<CreateInvite> for RelationshipManager {
    type Result = ResponseFuture<Result<InviteView, Error>>;

    fn handle(&mut self, msg: CreateInvite, _: &mut Self::Context) -> Self::Result {
        let ttl = msg.ttl.unwrap_or_else(|| self.config.delivery.ticket_ttl());
        let invite = relationship::create_invite(
            &self.shared.store,
            &self.shared.node_addrs(),
            self.display(),
            self.shared.lifetimes,
            ttl,
            now_ms(),
        );
        let store = self.shared.store.clone();
        Box::pin(async move {
            let invite = invite?;
            let changes = invite.changes;
            store.write(move |tx| changes.apply(tx)).await?;
            Ok(InviteView {
                ticket: invite.text,
                expires_at: views::rfc3339(invite.ticket.expires_at),
            })
        })
    }
}

impl Handler<AcceptInvite> for RelationshipManager {
    type Result = ResponseFuture<Result<AcceptView, Error>>;

    fn handle(&mut self, msg: AcceptInvite, _: &mut Self::Context) -> Self::Result {
        let acceptance = relationship::accept_invite(
            &self.shared.store,
            &self.shared.node_addrs(),
            self.display(),
            self.shared.lifetimes,
            &msg.ticket,
            now_ms(),
        );
        let shared = self.shared.clone();
        let wait = self.config.delivery.accept_wait();
        Box::pin(async move {
            let acceptance = acceptance?;
            let mut events = shared.events.subscribe();
            let changes = acceptance.changes;
            let applied = shared.store.write(move |tx| changes.apply(tx)).await?;
            shared.outbox.queued(applied.outbox);
            let view = |delivered| AcceptView {
                contact: acceptance.proton.id.to_string(),
                name: acceptance.proton.peer_display.name.clone(),
                delivered,
            };
            let conversation = Conversation::Proton(acceptance.proton.id);
            match wait_for_delivery(&shared, &mut events, conversation, acceptance.answer, wait)
                .await
            {
                Some(true) => Ok(view(true)),
                Some(false) => {
                    // Gone before we answer, so the user sees no trace of it.
                    forget(&shared.store, acceptance.proton.id).await?;
                    Err(Error::TicketRefused)
                }
                None => Ok(view(false)),
            }
        })
    }
}

impl Handler<ListContacts> for RelationshipManager {
    type Result = Result<Vec<ContactView>, Error>;

    fn handle(&mut self, _: ListContacts, _: &mut Self::Context) -> Self::Result {
        let mut protons = all_protons(&self.shared.store)?;
        protons.sort_by_key(|p| p.created_at);
        Ok(protons.iter().map(ContactView::of).collect())
    }
}

impl Handler<SendMessage> for RelationshipManager {
    type Result = ResponseFuture<Result<MessageView, Error>>;

    fn handle(&mut self, msg: SendMessage, _: &mut Self::Context) -> Self::Result {
        let target = self.resolve(&msg.to);
        let target = target.map(|p| (p.id, self.proton(p.id)));
        let shared = self.shared.clone();
        Box::pin(async move {
            let (id, addr) = target?;
            let mut events = shared.events.subscribe();
            let entry = addr
                .send(SendText(msg.text))
                .await
                .map_err(|_| Error::Stopped)??;
            let conversation = Conversation::Proton(id);
            let mut view = MessageView::of(conversation, &entry);
            if let Some(limit) = msg.wait {
                match wait_for_delivery(&shared, &mut events, conversation, entry.id, limit).await {
                    Some(true) => view.status = views::status_name(MessageStatus::Delivered),
                    Some(false) => view.status = views::status_name(MessageStatus::Failed),
                    None => return Err(Error::NotYetDelivered(limit)),
                }
            }
            Ok(view)
        })
    }
}

impl Handler<GetHistory> for RelationshipManager {
    type Result = Result<Vec<MessageView>, Error>;

    fn handle(&mut self, msg: GetHistory, _: &mut Self::Context) -> Self::Result {
        let p = self.resolve(&msg.of)?;
        let conversation = Conversation::Proton(p.id);
        Ok(history(&self.shared.store, conversation)?
            .iter()
            .map(|e| MessageView::of(conversation, e))
            .collect())
    }
}

impl Handler<GetStatus> for RelationshipManager {
    type Result = ResponseFuture<Result<StatusView, Error>>;

    fn handle(&mut self, _: GetStatus, _: &mut Self::Context) -> Self::Result {
        let client = self.client.clone();
        let store = self.shared.store.clone();
        Box::pin(async move {
            let status = client
                .status()
                .await
                .map_err(|e| Error::Network(e.to_string()))?;
            let (contacts, outbox) = store.read(|tx| {
                Ok((
                    tx.open_table(tables::PROTONS)?.len()? as usize,
                    tx.open_table(tables::OUTBOX)?.len()? as usize,
                ))
            })?;
            let mut warnings = Vec::new();
            if outbox > 0 {
                warnings.push(format!(
                    "{outbox} envelope(s) wait for their receiver's acknowledgement"
                ));
            }
            if !status.mdns {
                warnings.push("mDNS is off or unavailable: peers are found only through the addresses in invitations".into());
            }
            Ok(StatusView {
                peer_id: status.peer_id.to_string(),
                listen: status.listen_addrs.iter().map(|a| a.to_string()).collect(),
                peers: status
                    .connected_peers
                    .iter()
                    .map(|p| p.to_string())
                    .collect(),
                contacts,
                outbox,
                warnings,
            })
        })
    }
}

impl Handler<InboxReady> for RelationshipManager {
    type Result = ();

    fn handle(&mut self, msg: InboxReady, ctx: &mut Self::Context) {
        let mut welcomes = false;
        for owner in msg.0 {
            match owner {
                Owner::Proton(id) => {
                    // Rows for a proton whose ticket is not yet answered wait
                    // for the answer; it processes them when it starts.
                    if self.proton_exists(id) {
                        self.proton(id).do_send(ProcessInbox);
                    }
                }
                Owner::Ticket(_) => welcomes = true,
            }
        }
        if welcomes {
            self.process_welcomes(ctx);
        }
    }
}

impl Handler<DeliveryOutcome> for RelationshipManager {
    type Result = ();

    fn handle(&mut self, msg: DeliveryOutcome, ctx: &mut Self::Context) {
        let outcome = msg.0;
        let (Conversation::Proton(id), OutboxKind::Welcome) = (outcome.conversation, outcome.kind)
        else {
            return;
        };
        if outcome.delivered {
            self.proton(id).do_send(SetState(ProtonState::Active));
            return;
        }
        // The inviter's node refused our answer: this relationship never
        // existed on their side. Forget it.
        self.protons.remove(&id);
        let store = self.shared.store.clone();
        ctx.spawn(async move { forget(&store, id).await }.into_actor(self).map(|result, act, _| {
            match result {
                Ok(Some(mut record)) => {
                    record.state = ProtonState::Refused;
                    tracing::warn!(contact = %record.id, "the inviter's node refused our answer; relationship removed");
                    act.shared.emit(Event::contact(&record, ContactChange::Refused));
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "forgetting a refused relationship failed"),
            }
        }));
    }
}

/// Removes a relationship whose answer the inviter refused, if it still
/// exists; returns it.
async fn forget(store: &store::Store, id: ProtonId) -> Result<Option<ProtonRecord>, Error> {
    let record: Option<ProtonRecord> =
        store.read(|tx| store::get(&tx.open_table(tables::PROTONS)?, id.0, "proton"))?;
    let Some(record) = record else {
        return Ok(None);
    };
    let changes = relationship::forget_refused(store, &record)?;
    store.write(move |tx| changes.apply(tx)).await?;
    Ok(Some(record))
}

impl Handler<ListenAddrsChanged> for RelationshipManager {
    type Result = ();

    fn handle(&mut self, msg: ListenAddrsChanged, ctx: &mut Self::Context) {
        let addrs = advertised(&msg.0, &self.config.network.announce_addrs());
        let changed = match self.shared.node.write() {
            Ok(mut node) if node.addrs != addrs => {
                node.addrs = addrs;
                true
            }
            _ => false,
        };
        if changed {
            self.schedule_refresh(ctx);
        }
    }
}

/// The addresses to advertise: concrete listen addresses (no 0.0.0.0) and
/// the configured extra ones, without duplicates.
pub fn advertised(listen: &[Multiaddr], announce: &[Multiaddr]) -> Vec<Multiaddr> {
    use multiaddr::Protocol;
    let mut out: Vec<Multiaddr> = Vec::new();
    for a in listen.iter().chain(announce) {
        let unspecified = a.iter().any(|p| match p {
            Protocol::Ip4(ip) => ip.is_unspecified(),
            Protocol::Ip6(ip) => ip.is_unspecified(),
            _ => false,
        });
        if !unspecified && !out.contains(a) {
            out.push(a.clone());
        }
    }
    out
}

/// Waits for the delivery outcome of one message: `Some(true)` delivered,
/// `Some(false)` refused for good, `None` not within `limit`.
async fn wait_for_delivery(
    shared: &Shared,
    events: &mut broadcast::Receiver<Event>,
    conversation: Conversation,
    id: MessageId,
    limit: Duration,
) -> Option<bool> {
    let wanted = id.to_string();
    let wait = async {
        loop {
            match events.recv().await {
                Ok(Event::Delivery {
                    message, status, ..
                }) if message == wanted => {
                    return Some(status == "delivered");
                }
                Ok(_) => {}
                // Missed events: the history row tells the state.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    if let Ok(Some(status)) = message_status(&shared.store, conversation, id) {
                        match status {
                            MessageStatus::Delivered => return Some(true),
                            MessageStatus::Failed => return Some(false),
                            _ => {}
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    };
    tokio::time::timeout(limit, wait).await.ok().flatten()
}

fn message_status(
    store: &store::Store,
    conversation: Conversation,
    id: MessageId,
) -> Result<Option<MessageStatus>, StoreError> {
    // Only when events were missed: a scan of one conversation is fine.
    Ok(history(store, conversation)?
        .into_iter()
        .rev()
        .find(|e| e.id == id)
        .map(|e| e.status))
}

/// Every proton, in key order.
pub fn all_protons(store: &store::Store) -> Result<Vec<ProtonRecord>, StoreError> {
    store.read(|tx| {
        let t = tx.open_table(tables::PROTONS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (_, v) = e?;
            out.push(store::decode(v.value(), "proton")?);
        }
        Ok(out)
    })
}

/// A conversation's history, oldest first.
pub fn history(
    store: &store::Store,
    conversation: Conversation,
) -> Result<Vec<HistoryEntry>, StoreError> {
    let key = conversation.key();
    store.read(|tx| {
        let t = tx.open_table(tables::HISTORY)?;
        let mut out = Vec::new();
        for e in t.range((key, 0)..=(key, u64::MAX))? {
            let (_, v) = e?;
            out.push(store::decode(v.value(), "history entry")?);
        }
        Ok(out)
    })
}

fn inbox_owners(store: &store::Store) -> Result<Vec<Owner>, StoreError> {
    store.read(|tx| {
        let t = tx.open_table(tables::INBOX)?;
        let mut owners = Vec::new();
        for e in t.iter()? {
            let (_, v) = e?;
            let entry: InboxEntry = store::decode(v.value(), "inbox entry")?;
            if !owners.contains(&entry.owner) {
                owners.push(entry.owner);
            }
        }
        Ok(owners)
    })
}

fn read_ticket_inbox(store: &store::Store) -> Result<Vec<(u64, TicketId, InboxEntry)>, StoreError> {
    store.read(|tx| {
        let t = tx.open_table(tables::INBOX)?;
        let mut rows = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            let entry: InboxEntry = store::decode(v.value(), "inbox entry")?;
            if let Owner::Ticket(id) = entry.owner {
                rows.push((k.value(), id, entry));
            }
        }
        Ok(rows)
    })
}

fn load_ticket(store: &store::Store, id: TicketId) -> Result<TicketRecord, RelationshipError> {
    store
        .read(|tx| store::get(&tx.open_table(tables::TICKETS)?, id.0, "ticket"))?
        .ok_or_else(|| RelationshipError::BadWelcome("no such ticket".into()))
}

/// Drops what has expired: unused tickets (with their addresses, MLS state
/// and any rows that arrived for them) and expired addresses.
fn prune(tx: &redb::WriteTransaction, now: u64) -> Result<usize, StoreError> {
    let mut count = 0;
    let expired_tickets: Vec<TicketRecord> = {
        let t = tx.open_table(tables::TICKETS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (_, v) = e?;
            let r: TicketRecord = store::decode(v.value(), "ticket")?;
            if r.expires_at <= now {
                out.push(r);
            }
        }
        out
    };
    let mut changes = Changes::default();
    for t in &expired_tickets {
        changes.delete_tickets.push(t.id);
        if !t.used {
            changes.delete_mls_namespaces.push(t.proton.0);
        }
    }
    count += expired_tickets.len();
    {
        let addresses = tx.open_table(tables::ADDRESSES)?;
        for e in addresses.iter()? {
            let (k, v) = e?;
            let r: crate::records::AddressRecord = store::decode(v.value(), "address")?;
            let orphan = matches!(r.owner, Owner::Proton(p) if expired_tickets.iter().any(|t| !t.used && t.proton == p));
            if r.valid_until <= now || orphan {
                changes
                    .delete_addresses
                    .push(transports::DeliveryAddress::from_bytes(k.value()));
            }
        }
    }
    count += changes.delete_addresses.len();
    {
        let inbox = tx.open_table(tables::INBOX)?;
        for e in inbox.iter()? {
            let (k, v) = e?;
            let entry: InboxEntry = store::decode(v.value(), "inbox entry")?;
            let orphan = match entry.owner {
                Owner::Proton(p) => expired_tickets.iter().any(|t| !t.used && t.proton == p),
                Owner::Ticket(id) => expired_tickets.iter().any(|t| t.id == id),
            };
            if orphan {
                changes.inbox_done.push(k.value());
            }
        }
    }
    count += changes.inbox_done.len();
    changes.apply(tx)?;
    Ok(count)
}
