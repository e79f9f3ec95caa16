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
use crate::group_proton::{self, Answer, Command, Do, GroupProton, RelayDone, RelayRequest};
use crate::groups::{self, GroupError};
use crate::identity::Ipk;
use crate::merge::{self, MergeError};
use crate::model::{
    now_ms, Conversation, DisplayIdentity, GroupProtonId, MessageId, ProtonId, TicketId,
};
use crate::outbox::Outcome;
use crate::protocol::Body;
use crate::protocol::Payload;
use crate::proton::{
    LendControl, Notice, ProcessInbox, Proton, RefreshTransports, SendControl, SendText, SetState,
    Shared,
};
use crate::records::{
    Author, GroupProtonRecord, GroupState, HistoryEntry, InboxEntry, Intent, MemberStatus,
    MergeRecord, MessageStatus, OutboxKind, Owner, ProtonRecord, ProtonState, Provenance,
    TicketOrigin, TicketRecord,
};
use crate::relationship::{self, RelationshipError};
use crate::store::{self, tables, StoreError};
use crate::views::{
    self, AttestationView, ContactChange, ContactView, Event, GroupChange, GroupView, MergeView,
    MessageView, StatusView, TrustRecordView,
};

/// How often housekeeping runs: pruning expired tickets and addresses,
/// rotating addresses that are due.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(600);
/// Listen addresses settle for this long before peers are told.
const REFRESH_DEBOUNCE: Duration = Duration::from_secs(2);
/// How often inbox rows still waiting are routed again. Actors are told of
/// new rows as they are committed; this sweep makes sure that a row is
/// processed even if such a notice was ever lost (a stopping actor).
const INBOX_SWEEP_EVERY: Duration = Duration::from_secs(3);
/// A merge's ticket waits this long at least for the peer's consent.
const MERGE_TICKET_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// What a user-facing request can fail with. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no contact matches {0:?}; `protonode contacts` lists them (an id may be shortened to its first 4 or more characters)")]
    UnknownContact(String),
    #[error("contact {contact} is your invitation to {name} in group {group}, not answered yet: their node answers it once it is reachable and has the group's latest changes (`protonode status` warns while it waits)")]
    NotAnsweredYet {
        contact: String,
        name: String,
        group: String,
    },
    /// An empty (or blank) contact, group or member argument.
    #[error(
        "the {0} argument is empty: give its id (or its first 4 or more characters) or its name"
    )]
    EmptyQuery(&'static str),
    #[error("you already have a relationship with {name}: contact {contact}")]
    AlreadyContact { name: String, contact: String },
    #[error(
        "no contact or group matches {0:?}; `protonode contacts` and `protonode groups` list them (an id may be shortened to its first 4 or more characters)"
    )]
    UnknownConversation(String),
    #[error("no group matches {0:?}; `protonode groups` lists them (an introduction is listed once the introducer's node has delivered it; `protonode watch` shows when)")]
    UnknownGroup(String),
    #[error("{query:?} matches several groups ({matches}); use the group id")]
    AmbiguousGroup { query: String, matches: String },
    #[error("{query:?} matches both a contact and a group; use the id")]
    AmbiguousConversation { query: String },
    #[error("no member of the group matches {0:?}; `protonode groups` lists them")]
    UnknownMember(String),
    #[error(
        "{query:?} matches several members ({matches}); use the member id `protonode groups` shows"
    )]
    AmbiguousMember { query: String, matches: String },
    /// The query, and what to do instead (may be empty).
    #[error("{0:?} is you{1}")]
    OwnMember(String, &'static str),
    #[error("{0} is not an active relationship yet; wait until it is")]
    NotActive(String),
    #[error("{0}'s node refused your answer to their invitation (it was used or had expired), so this relationship never started on their side; ask them for a new ticket")]
    RefusedContact(String),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Group(#[from] GroupError),
    #[error("{query:?} matches several contacts ({matches}); use the contact id")]
    AmbiguousContact { query: String, matches: String },
    #[error("the inviter's node refused this invitation: it was already used or has expired; ask for a new one")]
    TicketRefused,
    #[error("their node refused this merge: they asked again, or their relationships were merged another way; the two stay as they were (`protonode merge list` shows what waits)")]
    MergeRefused,
    #[error("message {id} was not acknowledged within {}{}; it stays queued and is delivered once the receiving nodes are reachable (`protonode history` shows when)", views::human_duration(*.within), .members.map(|(done, all)| format!(" (by {done} of {all} members' nodes so far)")).unwrap_or_default())]
    NotYetDelivered {
        id: String,
        within: Duration,
        /// In a group: how many members' nodes acknowledged it, of how many.
        members: Option<(u32, u32)>,
    },
    #[error("the group has not ordered {what} within {}; it stays queued and is made once the group can order it, which takes the nodes of a majority of its members, reachable (`protonode status` says how many; `protonode groups` shows the change then)", views::human_duration(*.within))]
    NotYetOrdered {
        /// "your claim" or "the change".
        what: &'static str,
        within: Duration,
    },
    #[error(transparent)]
    Relationship(#[from] RelationshipError),
    #[error(transparent)]
    Merge(#[from] MergeError),
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

/// Live relationships (not merged into others).
#[derive(Message)]
#[rtype(result = "Result<Vec<ContactView>, Error>")]
pub struct ListContacts;

/// Every relationship, also those merged into others (marked retired).
#[derive(Message)]
#[rtype(result = "Result<Vec<ContactView>, Error>")]
pub struct ListAllContacts;

/// `contact CONTACT`: the trust record of one relationship.
#[derive(Message)]
#[rtype(result = "Result<TrustRecordView, Error>")]
pub struct ContactDetail {
    pub contact: String,
}

/// `link A B`: our two relationships are both us towards that person.
#[derive(Message)]
#[rtype(result = "Result<Vec<AttestationView>, Error>")]
pub struct Link {
    pub a: String,
    pub b: String,
    /// Even if the two contacts go by different names.
    pub force: bool,
}

/// `merge request A B`: ask the peer to merge two relationships.
#[derive(Message)]
#[rtype(result = "Result<MergeView, Error>")]
pub struct RequestMerge {
    pub a: String,
    pub b: String,
    /// Even if the two contacts go by different names.
    pub force: bool,
}

#[derive(Message)]
#[rtype(result = "Result<Vec<MergeView>, Error>")]
pub struct ListMerges;

/// `merge accept ID`.
#[derive(Message)]
#[rtype(result = "Result<AcceptView, Error>")]
pub struct AcceptMerge {
    pub id: String,
}

/// `merge ignore ID`.
#[derive(Message)]
#[rtype(result = "Result<MergeView, Error>")]
pub struct IgnoreMerge {
    pub id: String,
}

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

/// Starts a group with placeholders for these contacts (two: an
/// introduction).
#[derive(Message)]
#[rtype(result = "Result<GroupView, Error>")]
pub struct CreateGroup {
    pub contacts: Vec<String>,
    pub name: Option<String>,
}

#[derive(Message)]
#[rtype(result = "Result<Vec<GroupView>, Error>")]
pub struct ListGroups;

/// Every group, also those we left or were removed from (state "gone"):
/// their history stays readable.
#[derive(Message)]
#[rtype(result = "Result<Vec<GroupView>, Error>")]
pub struct ListAllGroups;

/// The groups we are in whose other members are exactly these contacts
/// (asked before introducing the same people again).
#[derive(Message)]
#[rtype(result = "Result<Vec<GroupView>, Error>")]
pub struct GroupsWith {
    pub contacts: Vec<String>,
}

/// Starts a side relationship with a member of a group (DESIGN.md 8.4).
#[derive(Message)]
#[rtype(result = "Result<AcceptView, Error>")]
pub struct Connect {
    pub group: String,
    pub member: String,
}

/// Something to do in one group.
#[derive(Debug, Clone)]
pub enum GroupAction {
    Claim,
    Decline,
    Leave,
    Add(String),
    Remove(String),
    /// Fresh keys for our own leaf (an MLS update commit).
    Update,
    Verify(String),
}

#[derive(Message)]
#[rtype(result = "Result<GroupView, Error>")]
pub struct GroupCommand {
    pub group: String,
    pub action: GroupAction,
}

/// Answers once a group has no change of ours waiting to be ordered
/// (queued or sent to the ordering service), with the group as it is then.
#[derive(Message)]
#[rtype(result = "Result<GroupView, Error>")]
pub struct AwaitOrdered {
    /// The group's id.
    pub group: String,
    /// When to give up.
    pub until: tokio::time::Instant,
    /// The wait asked for (for the error).
    pub within: Duration,
}

/// New inbox rows for these owners (from the receiving service).
#[derive(Message)]
#[rtype(result = "()")]
pub struct InboxReady(pub Vec<Owner>);

/// Answered once every answer to our invitations stored so far is filed
/// as a relationship (or refused): a pass over them found none left, or
/// could not run. From the receiving service, which holds the answer's
/// acknowledgement until then.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WelcomesFiled(pub tokio::sync::oneshot::Sender<()>);

/// Envelopes for one owner to process at once (from the receiving
/// service, see `inbound::ProcessDirect`). Answered `false` when the owner
/// cannot take them: a relationship whose ticket is not answered yet.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver(
    pub Owner,
    pub Vec<crate::records::InboxEntry>,
    pub tokio::sync::oneshot::Sender<bool>,
);

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
    groups: HashMap<GroupProtonId, Addr<GroupProton>>,
    /// An answer to one of our invitations is being processed.
    welcomes_busy: bool,
    welcomes_again: bool,
    /// Waiting for the answers to our invitations to be filed.
    welcomes_waiting: Vec<tokio::sync::oneshot::Sender<()>>,
    refresh_scheduled: bool,
}

impl RelationshipManager {
    pub fn new(shared: Shared, client: transports::Client, config: config::Config) -> Self {
        Self {
            shared,
            client,
            config,
            protons: HashMap::new(),
            groups: HashMap::new(),
            welcomes_busy: false,
            welcomes_again: false,
            welcomes_waiting: Vec::new(),
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

    /// The actor of a group proton, started (and restored) if needed.
    fn group(&mut self, id: GroupProtonId, ctx: &mut Context<Self>) -> Addr<GroupProton> {
        if let Some(addr) = self.groups.get(&id).filter(|a| a.connected()) {
            return addr.clone();
        }
        let addr = GroupProton::new(id, self.shared.clone(), ctx.address().recipient()).start();
        self.groups.insert(id, addr.clone());
        addr
    }

    /// Our groups, oldest first; with `all`, also those we are no longer in.
    fn group_views(&self, all: bool) -> Result<Vec<GroupView>, Error> {
        let mut groups = groups::all_groups(&self.shared.store)?;
        groups.retain(|g| all || g.state != GroupState::Gone);
        groups.sort_by_key(|g| g.created_at);
        Ok(groups.iter().map(GroupView::of).collect())
    }

    /// Resolves a group: an exact id, a unique name, or a unique id prefix
    /// of at least 4 digits. Groups we are still in come first; a group we
    /// left or were removed from is found when no other matches (its
    /// history stays readable).
    fn resolve_group(&self, query: &str) -> Result<GroupProtonRecord, Error> {
        let q = query.trim();
        if q.is_empty() {
            return Err(Error::EmptyQuery("group"));
        }
        // An exact id is one read, not a scan of every group.
        if let Ok(id) = q.parse::<GroupProtonId>() {
            if let Some(g) = groups::get_group(&self.shared.store, id)? {
                return Ok(g);
            }
        }
        let all = groups::all_groups(&self.shared.store)?;
        let named = |gone: bool| -> Vec<&GroupProtonRecord> {
            let candidates = || all.iter().filter(|g| (g.state == GroupState::Gone) == gone);
            let by_name: Vec<&GroupProtonRecord> = candidates()
                .filter(|g| g.name.as_deref().is_some_and(|n| same_name(n, q)))
                .collect();
            if !by_name.is_empty() || q.len() < 4 {
                return by_name;
            }
            candidates()
                .filter(|g| g.id.to_string().starts_with(&q.to_ascii_lowercase()))
                .collect()
        };
        let mut matches = named(false);
        if matches.is_empty() {
            matches = named(true);
        }
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(Error::UnknownGroup(query.to_string())),
            many => Err(Error::AmbiguousGroup {
                query: query.to_string(),
                matches: many
                    .iter()
                    .map(|g| format!("{} {}", g.id, g.name.clone().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// A contact or a group, whichever `query` names.
    fn resolve_conversation(&self, query: &str) -> Result<Conversation, Error> {
        // An exact id: one read each (a group and a relationship never share
        // an id), no scan.
        let q = query.trim();
        if q.is_empty() {
            return Err(Error::EmptyQuery("contact or group"));
        }
        if let (Ok(g), Ok(p)) = (q.parse::<GroupProtonId>(), q.parse::<ProtonId>()) {
            let (group, proton) = self.shared.store.read(|tx| {
                Ok((
                    tx.open_table(tables::GROUPS)?.get(g.0)?.is_some(),
                    tx.open_table(tables::PROTONS)?.get(p.0)?.is_some(),
                ))
            })?;
            match (group, proton) {
                (true, false) => return Ok(Conversation::Group(g)),
                (false, true) => return Ok(Conversation::Proton(p)),
                _ => {}
            }
        }
        let contact = self.resolve(query);
        let group = self.resolve_group(query);
        match (contact, group) {
            // A group we are no longer in gives way to a contact.
            (Ok(p), Ok(g)) if g.state == GroupState::Gone => Ok(Conversation::Proton(p.id)),
            (Err(e @ Error::AmbiguousContact { .. }), Ok(g)) if g.state == GroupState::Gone => {
                Err(e)
            }
            (Ok(_), Ok(_)) => Err(Error::AmbiguousConversation {
                query: query.to_string(),
            }),
            (Ok(p), Err(_)) => Ok(Conversation::Proton(p.id)),
            (Err(_), Ok(g)) => Ok(Conversation::Group(g.id)),
            (Err(e @ (Error::AmbiguousContact { .. } | Error::NotAnsweredYet { .. })), Err(_)) => {
                Err(e)
            }
            (Err(_), Err(e @ Error::AmbiguousGroup { .. })) => Err(e),
            (Err(_), Err(_)) => Err(Error::UnknownConversation(query.to_string())),
        }
    }

    fn proton_exists(&self, id: ProtonId) -> bool {
        self.shared
            .store
            .read(|tx| Ok(tx.open_table(tables::PROTONS)?.get(id.0)?.is_some()))
            .unwrap_or(false)
    }

    /// Resolves what the user typed to a relationship: an exact id, a unique
    /// name (case-insensitive), or a unique id prefix of at least 4 digits.
    /// A contact to introduce or add to a group: live (not merged into
    /// another) and active.
    fn resolve_usable(&self, query: &str) -> Result<ProtonRecord, Error> {
        let p = self.resolve(query)?;
        if let Some(into) = merge::merged_into_live(&self.shared.store, p.id)? {
            return Err(RelationshipError::Retired(into).into());
        }
        match p.state {
            ProtonState::Active => Ok(p),
            ProtonState::Refused => Err(Error::RefusedContact(p.peer_display.name)),
            ProtonState::Pending => Err(Error::NotActive(p.peer_display.name)),
        }
    }

    /// What a contact id (or a prefix of 4 or more characters) that
    /// names no relationship is, if it is that of a side invitation of
    /// ours still unanswered: `connect` gives its id before the member's
    /// node has answered.
    fn unanswered(&self, query: &str) -> Result<Option<Error>, Error> {
        if query.len() < 4 {
            return Ok(None);
        }
        let query = query.to_ascii_lowercase();
        let ticket = self.shared.store.read(|tx| {
            let t = tx.open_table(tables::TICKETS)?;
            for e in t.iter()? {
                let (_, v) = e?;
                let r: TicketRecord = store::decode(v.value(), "ticket")?;
                if !r.used && r.proton.to_string().starts_with(&query) {
                    return Ok(Some(r));
                }
            }
            Ok(None)
        })?;
        let Some(TicketRecord {
            proton,
            origin: Some(TicketOrigin::Group { group, member }),
            ..
        }) = ticket
        else {
            return Ok(None);
        };
        let g = groups::get_group(&self.shared.store, group)?;
        let name = member_name(g.as_ref(), member);
        let group = g.map_or_else(|| group.to_string(), |g| group_label(&g));
        Ok(Some(Error::NotAnsweredYet {
            contact: proton.to_string(),
            name,
            group,
        }))
    }

    fn resolve(&self, query: &str) -> Result<ProtonRecord, Error> {
        let query_trim = query.trim();
        if query_trim.is_empty() {
            return Err(Error::EmptyQuery("contact"));
        }
        // An exact id is one read, not a scan of every relationship.
        if let Ok(id) = query_trim.parse::<ProtonId>() {
            let found: Option<ProtonRecord> = self
                .shared
                .store
                .read(|tx| store::get(&tx.open_table(tables::PROTONS)?, id.0, "proton"))?;
            if let Some(p) = found {
                return Ok(p);
            }
        }
        let protons = all_protons(&self.shared.store)?;
        let retired = retired_map(&self.shared.store)?;
        // A merged relationship is found by its id (or a prefix) only: by
        // name, the merge's result stands for it.
        let by_name: Vec<&ProtonRecord> = protons
            .iter()
            .filter(|p| {
                same_name(&p.peer_display.name, query_trim)
                    && !retired.contains_key(&p.id)
                    && p.state != ProtonState::Refused
            })
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
        // A relationship their node refused still has its history; by name,
        // it is found when no live one goes by that name.
        let refused: Vec<&ProtonRecord> = protons
            .iter()
            .filter(|p| {
                same_name(&p.peer_display.name, query_trim)
                    && !retired.contains_key(&p.id)
                    && p.state == ProtonState::Refused
            })
            .collect();
        let matches = match (by_name.is_empty(), by_prefix.is_empty()) {
            (false, _) => by_name,
            (true, false) => by_prefix,
            (true, true) => refused,
        };
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(self
                .unanswered(query_trim)?
                .unwrap_or_else(|| Error::UnknownContact(query.to_string()))),
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
                self.welcomes_settled();
                return;
            }
        };
        if rows.is_empty() {
            self.welcomes_settled();
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
                Err(e) => {
                    tracing::error!(error = %e, "storing a new relationship failed");
                    act.welcomes_settled();
                }
            }
            if std::mem::take(&mut act.welcomes_again) {
                act.process_welcomes(ctx);
            }
        }));
    }

    /// Answers whoever waits for the answers to our invitations.
    fn welcomes_settled(&mut self) {
        for waiting in self.welcomes_waiting.drain(..) {
            let _ = waiting.send(());
        }
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
                        Ok(pruned) => {
                            if pruned.expired > 0 {
                                tracing::info!(
                                    rows = pruned.expired,
                                    "pruned expired tickets and addresses"
                                );
                            }
                            if pruned.held > 0 {
                                tracing::warn!(
                                    envelopes = pruned.held,
                                    "dropped envelopes that waited for an introduction to a \
                                     group that never came (30 days, or their relationship \
                                     is gone)"
                                );
                            }
                        }
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
        // Started as the node stops (its start failed, say): nothing to dial.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
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
        let _ = self.shared.notices.set(ctx.address().recipient());
        // Groups with work in flight (relays, commits) pick it up again.
        match groups::all_groups(&self.shared.store) {
            Ok(all) => {
                for g in all {
                    let busy = !g.relays.is_empty() || g.pending.is_some() || !g.intents.is_empty();
                    if busy {
                        self.group(g.id, ctx);
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "reading groups failed"),
        }
        // Work left by the last run: inbox rows not yet processed.
        match inbox_owners(&self.shared.store) {
            Ok(owners) if !owners.is_empty() => ctx.notify(InboxReady(owners)),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "reading the inbox failed"),
        }
        self.dial_known_peers();
        self.housekeeping(ctx);
        ctx.run_interval(HOUSEKEEPING_EVERY, |act, ctx| act.housekeeping(ctx));
        ctx.run_interval(INBOX_SWEEP_EVERY, |act, ctx| {
            match inbox_owners(&act.shared.store) {
                Ok(owners) if !owners.is_empty() => ctx.notify(InboxReady(owners)),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reading the inbox failed"),
            }
        });
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
            None,
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
            None,
            now_ms(),
        );
        let shared = self.shared.clone();
        let wait = self.config.delivery.accept_wait();
        Box::pin(async move { answer(&shared, acceptance?, wait, false, None).await })
    }
}

impl Handler<ListContacts> for RelationshipManager {
    type Result = Result<Vec<ContactView>, Error>;

    fn handle(&mut self, _: ListContacts, _: &mut Self::Context) -> Self::Result {
        contacts(&self.shared.store, false)
    }
}

impl Handler<ListAllContacts> for RelationshipManager {
    type Result = Result<Vec<ContactView>, Error>;

    fn handle(&mut self, _: ListAllContacts, _: &mut Self::Context) -> Self::Result {
        contacts(&self.shared.store, true)
    }
}

/// Contacts oldest first, marked with where they were merged and how far
/// they are trusted; retired ones only with `all`.
fn contacts(store: &store::Store, all: bool) -> Result<Vec<ContactView>, Error> {
    let mut protons = all_protons(store)?;
    protons.sort_by_key(|p| p.created_at);
    let retired = retired_map(store)?;
    let mut out = Vec::new();
    for p in &protons {
        let into = retired.get(&p.id).copied();
        if (into.is_some() || p.state == ProtonState::Refused) && !all {
            continue;
        }
        out.push(contact_view(store, p, into)?);
    }
    Ok(out)
}

/// A contact as shown: where it was merged, how trusted, and for an
/// introduced one, by whom and in which group.
fn contact_view(
    store: &store::Store,
    p: &ProtonRecord,
    retired_into: Option<ProtonId>,
) -> Result<ContactView, Error> {
    let mut view = ContactView::of(p).marked(retired_into, &merge::trust_of(store, p.id)?);
    if let Provenance::MetInGroup { group, .. } = p.provenance {
        let name = group_label_of(store, group)?;
        let adder = added_by_other(store, p)?;
        view.origin = match (merge::introducer_of(store, p)?, adder) {
            (Some((_, by)), Some(adder)) => {
                view.introduced_by = Some(adder.clone());
                format!("added by {adder} to group {name}, which {by} introduced you to")
            }
            (Some((_, by)), None) => {
                view.introduced_by = Some(by.clone());
                format!("introduced by {by} in group {name}")
            }
            (None, Some(adder)) => {
                view.introduced_by = Some(adder.clone());
                format!("added by {adder} to our group {name}")
            }
            (None, None) => format!("met in our group {name}"),
        };
    }
    Ok(view)
}

/// For a relationship begun in a group: the name of the member who added
/// its peer to the group, when that is not who introduced us there (or,
/// in a group we made, not us). Their word, too, is what the peer's key
/// rests on.
fn added_by_other(store: &store::Store, p: &ProtonRecord) -> Result<Option<String>, StoreError> {
    let Provenance::MetInGroup { group, member } = p.provenance else {
        return Ok(None);
    };
    let Some(g) = groups::get_group(store, group)? else {
        return Ok(None);
    };
    let known = || g.members.iter().chain(g.former.iter());
    let Some(by) = known()
        .find(|m| m.ipk == member)
        .and_then(|m| m.introduced_by)
    else {
        return Ok(None);
    };
    let ours = g.introduced.map(|(_, ipk)| ipk);
    if Some(by) == ours || by == g.own_key.key().ipk() {
        return Ok(None);
    }
    Ok(Some(
        known()
            .find(|m| m.ipk == by)
            .map(|m| m.display.name.clone())
            .unwrap_or_else(|| by.fingerprint()),
    ))
}

impl Handler<ContactDetail> for RelationshipManager {
    type Result = Result<TrustRecordView, Error>;

    fn handle(&mut self, msg: ContactDetail, _: &mut Self::Context) -> Self::Result {
        let store = &self.shared.store;
        let p = self.resolve(&msg.contact)?;
        let contact = contact_view(store, &p, merge::retired_into(store, p.id)?)?;
        let name_of = |id: ProtonId| -> String {
            store
                .read(|tx| {
                    store::get::<_, ProtonRecord, _>(
                        &tx.open_table(tables::PROTONS)?,
                        id.0,
                        "proton",
                    )
                })
                .ok()
                .flatten()
                .map(|r| format!("{id} {}", r.peer_display.name))
                .unwrap_or_else(|| id.to_string())
        };
        let obtained = match &p.provenance {
            Provenance::InvitedByUs { .. } => "ticket: they accepted our invitation".to_string(),
            Provenance::AcceptedTicket { .. } => "ticket: we accepted their invitation".to_string(),
            Provenance::MetInGroup { group, .. } => {
                let group = group_label_of(store, *group)?;
                match (merge::introducer_of(store, &p)?, added_by_other(store, &p)?) {
                    (Some((by, _)), Some(adder)) => format!(
                        "added by {adder} to group {group}, which {} introduced us to",
                        name_of(by)
                    ),
                    (Some((by, _)), None) => {
                        format!("introduced by {} in group {group}", name_of(by))
                    }
                    (None, Some(adder)) => {
                        format!("added by {adder} to group {group}, which we started")
                    }
                    (None, None) => format!("met in group {group}, which we started"),
                }
            }
            Provenance::Merged { from: [a, b] } => {
                format!("merged from {} and {}", name_of(*a), name_of(*b))
            }
        };
        let mut vouched_by = Vec::new();
        let mut attestations = Vec::new();
        let mut met_directly = false;
        let mut verified_in = Vec::new();
        for id in merge::lineage(store, p.id)? {
            let Some(r) = store.read(|tx| {
                store::get::<_, ProtonRecord, _>(&tx.open_table(tables::PROTONS)?, id.0, "proton")
            })?
            else {
                continue;
            };
            // Their key came to us directly: by a ticket, or it is a group
            // member's we checked out of band (`group verify`).
            met_directly |= match &r.provenance {
                Provenance::InvitedByUs { .. } | Provenance::AcceptedTicket { .. } => true,
                Provenance::MetInGroup { group, member } => {
                    let verified = groups::get_group(store, *group)?.filter(|g| {
                        g.members
                            .iter()
                            .any(|m| m.ipk == *member && matches!(m.status, MemberStatus::Verified))
                    });
                    if let Some(g) = &verified {
                        verified_in.push(g.name.clone().unwrap_or_else(|| g.id.to_string()));
                    }
                    verified.is_some()
                }
                Provenance::Merged { .. } => false,
            };
            if let Some((by, _)) = merge::introducer_of(store, &r)? {
                let by = name_of(by);
                if !vouched_by.contains(&by) {
                    vouched_by.push(by);
                }
            }
            // The member who added them to the group vouches too.
            if let Some(adder) = added_by_other(store, &r)? {
                let adder = format!("{adder} (the group member who added them)");
                if !vouched_by.contains(&adder) {
                    vouched_by.push(adder);
                }
            }
            for a in merge::links_of(store, id)? {
                let view = AttestationView::of(&a);
                if !attestations.contains(&view) {
                    attestations.push(view);
                }
            }
        }
        Ok(TrustRecordView {
            contact,
            own_fingerprint: p.own_key.key().ipk().fingerprint(),
            obtained,
            may_be_alias_of: if met_directly {
                Vec::new()
            } else {
                vouched_by.clone()
            },
            vouched_by,
            verified_in,
            attestations,
        })
    }
}

impl Handler<Link> for RelationshipManager {
    type Result = ResponseFuture<Result<Vec<AttestationView>, Error>>;

    fn handle(&mut self, msg: Link, _: &mut Self::Context) -> Self::Result {
        let store = self.shared.store.clone();
        let changes = (|| {
            let a = self.resolve(&msg.a)?;
            let b = self.resolve(&msg.b)?;
            one_person(&a, &b, msg.force, "link")?;
            Ok::<_, Error>(merge::link(&store, a.id, b.id, now_ms())?)
        })();
        Box::pin(async move {
            let changes = changes?;
            let made: Vec<AttestationView> = changes
                .links
                .iter()
                .take(1)
                .map(|(_, a)| AttestationView::of(a))
                .collect();
            store.write(move |tx| changes.apply(tx)).await?;
            Ok(made)
        })
    }
}

impl Handler<RequestMerge> for RelationshipManager {
    type Result = ResponseFuture<Result<MergeView, Error>>;

    fn handle(&mut self, msg: RequestMerge, _: &mut Self::Context) -> Self::Result {
        let shared = self.shared.clone();
        let prepared = (|| {
            let a = self.resolve(&msg.a)?;
            let b = self.resolve(&msg.b)?;
            one_person(&a, &b, msg.force, "merge request")?;
            let outgoing = merge::request(
                &self.shared.store,
                &self.shared.node_addrs(),
                self.display(),
                self.shared.lifetimes,
                self.config.delivery.ticket_ttl().max(MERGE_TICKET_TTL),
                a.id,
                b.id,
                now_ms(),
            )?;
            let name = a.peer_display.name.clone();
            Ok::<_, Error>(([self.proton(a.id), self.proton(b.id)], outgoing, name))
        })();
        // The request goes inside both relationships, each encrypted by its
        // actor and committed with the merge's record: all of it, or (a
        // crash, a failure) none, never a request recorded as sent that
        // no relationship queued.
        Box::pin(async move {
            let (actors, outgoing, name) = prepared?;
            let mut changes = outgoing.changes;
            let mut committed = Vec::new();
            for actor in actors {
                let (told, outcome) = tokio::sync::oneshot::channel();
                let lent = actor
                    .send(LendControl {
                        body: Body::MergeRequest(Box::new(outgoing.request.clone())),
                        outcome,
                    })
                    .await
                    .map_err(|_| Error::Stopped)??;
                changes.extend(lent);
                committed.push(told);
            }
            let outbox = shared.outbox.clone();
            shared
                .store
                .write_then(
                    move |tx| changes.apply(tx),
                    move |applied| {
                        outbox.queued(std::mem::take(&mut applied.outbox));
                        for told in committed {
                            let _ = told.send(true);
                        }
                    },
                )
                .await?;
            Ok(MergeView::of(&outgoing.record, name))
        })
    }
}

impl Handler<ListMerges> for RelationshipManager {
    type Result = Result<Vec<MergeView>, Error>;

    fn handle(&mut self, _: ListMerges, _: &mut Self::Context) -> Self::Result {
        let store = &self.shared.store;
        let protons = all_protons(store)?;
        Ok(merge::all_merges(store)?
            .iter()
            .map(|m| MergeView::of(m, merge_name(&protons, m)))
            .collect())
    }
}

impl Handler<IgnoreMerge> for RelationshipManager {
    type Result = ResponseFuture<Result<MergeView, Error>>;

    fn handle(&mut self, msg: IgnoreMerge, _: &mut Self::Context) -> Self::Result {
        let store = self.shared.store.clone();
        let prepared = merge::ignore(&store, &msg.id)
            .map_err(Error::from)
            .and_then(|c| Ok((all_protons(&store)?, c)));
        Box::pin(async move {
            let (protons, changes) = prepared?;
            let view = changes
                .merges
                .first()
                .map(|m| MergeView::of(m, merge_name(&protons, m)));
            let id = changes.merges.first().map(|m| m.id);
            // Checked again where it is written: an acceptance may have
            // been committed since (`merge accept` and `merge ignore` at once).
            store
                .write(move |tx| {
                    if let Some(id) = id {
                        let merges = tx.open_table(tables::MERGES)?;
                        if let Err(e) = merge::may_decide(&merges, id, "ignored") {
                            return Ok(Err(e));
                        }
                    }
                    changes.apply(tx).map(Ok)
                })
                .await??;
            view.ok_or(Error::Stopped)
        })
    }
}

impl Handler<AcceptMerge> for RelationshipManager {
    type Result = ResponseFuture<Result<AcceptView, Error>>;

    fn handle(&mut self, msg: AcceptMerge, _: &mut Self::Context) -> Self::Result {
        let prepared = merge::find(&self.shared.store, &msg.id)
            .map_err(RelationshipError::from)
            .and_then(|record| {
                let acceptance = merge::accept(
                    &self.shared.store,
                    &self.shared.node_addrs(),
                    self.display(),
                    self.shared.lifetimes,
                    &msg.id,
                    now_ms(),
                )?;
                Ok((record.id, acceptance))
            });
        let shared = self.shared.clone();
        let wait = self.config.delivery.accept_wait();
        Box::pin(async move {
            let (id, acceptance) = prepared?;
            answer(&shared, acceptance, wait, true, Some(id)).await
        })
    }
}

/// Commits an acceptance (its answer queued to the inviter) and waits, at
/// most `wait`, for the inviter's node to take the answer. If it refuses
/// it, the new relationship goes again (for a merge, the old ones live on).
/// The acceptance of merge request `merge` is committed only if the
/// request may still be accepted ([`merge::may_accept`]) in that
/// transaction: another acceptance may have been committed since it was
/// prepared.
async fn answer(
    shared: &Shared,
    acceptance: relationship::Acceptance,
    wait: Duration,
    announce: bool,
    merge: Option<[u8; 16]>,
) -> Result<AcceptView, Error> {
    let mut events = shared.events.subscribe();
    let changes = acceptance.changes;
    let applied = shared
        .store
        .write(move |tx| {
            if let Some(id) = merge {
                let merges = tx.open_table(tables::MERGES)?;
                let retired = tx.open_table(tables::RETIRED)?;
                if let Err(e) = merge::may_accept(&merges, &retired, id) {
                    return Ok(Err(e));
                }
            }
            changes.apply(tx).map(Ok)
        })
        .await??;
    shared.outbox.queued(applied.outbox);
    if announce {
        shared.emit(Event::contact(&acceptance.proton, ContactChange::Added));
    }
    let view = |delivered| AcceptView {
        contact: acceptance.proton.id.to_string(),
        name: acceptance.proton.peer_display.name.clone(),
        delivered,
    };
    let conversation = Conversation::Proton(acceptance.proton.id);
    match wait_for_delivery(shared, &mut events, conversation, acceptance.answer, wait).await {
        Some(true) => Ok(view(true)),
        Some(false) => {
            // Gone before we answer, so the user sees no trace of it.
            forget(&shared.store, acceptance.proton.id).await?;
            Err(if merge.is_some() {
                Error::MergeRefused
            } else {
                Error::TicketRefused
            })
        }
        None => Ok(view(false)),
    }
}

/// Whom a merge is with: the peer's name in our relationship it concerns.
fn merge_name(protons: &[ProtonRecord], m: &MergeRecord) -> String {
    m.ours
        .iter()
        .chain(&m.via)
        .find_map(|id| protons.iter().find(|p| p.id == *id))
        .map(|p| p.peer_display.name.clone())
        .unwrap_or_default()
}

/// Retired relationship → the one it was merged into.
fn retired_map(store: &store::Store) -> Result<HashMap<ProtonId, ProtonId>, StoreError> {
    store.read(|tx| {
        let t = tx.open_table(tables::RETIRED)?;
        let mut out = HashMap::new();
        for e in t.iter()? {
            let (k, v) = e?;
            out.insert(ProtonId(k.value()), ProtonId(v.value()));
        }
        Ok(out)
    })
}

impl Handler<SendMessage> for RelationshipManager {
    type Result = ResponseFuture<Result<MessageView, Error>>;

    fn handle(&mut self, msg: SendMessage, ctx: &mut Self::Context) -> Self::Result {
        // Nothing but spaces says nothing (peers still take such a text).
        if !msg.text.is_empty() && msg.text.trim().is_empty() {
            return Box::pin(async {
                Err(Error::Usage(
                    "the message is only spaces; write something".into(),
                ))
            });
        }
        let conversation = self.resolve_conversation(&msg.to);
        let shared = self.shared.clone();
        let target = conversation.map(|c| match c {
            Conversation::Proton(id) => (c, Ok(self.proton(id))),
            Conversation::Group(id) => (c, Err(self.group(id, ctx))),
        });
        // The wait counts from the request, not from when the message is
        // queued (which takes longer on a node that is behind). Queuing
        // itself is waited for however long it takes: it is what says the
        // message will not be lost, and a caller told "not queued" would
        // send it again while the first one is still on its way.
        // Bounded by the callers; capped here too, since an Instant overflows.
        let deadline = msg
            .wait
            .map(|limit| tokio::time::Instant::now() + limit.min(Duration::from_secs(86_400)));
        Box::pin(async move {
            let (conversation, actor) = target?;
            let mut events = shared.events.subscribe();
            let entry = match actor {
                Ok(proton) => proton.send(SendText(msg.text)).await.map_err(|_| {
                    // Its actor stops at once when it cannot load: a
                    // relationship whose answer was refused has no MLS state.
                    match conversation {
                        Conversation::Proton(id) if refused(&shared.store, id) => {
                            Error::Relationship(RelationshipError::Refused)
                        }
                        _ => Error::Stopped,
                    }
                })??,
                Err(group) => match group
                    .send(Do(Command::Send(msg.text)))
                    .await
                    .map_err(|_| Error::Stopped)??
                {
                    Answer::Sent(entry) => entry,
                    Answer::Done => return Err(Error::Stopped),
                },
            };
            let mut view = MessageView::of(conversation, &entry);
            view.to = Some(conversation.to_string());
            if let Conversation::Group(_) = conversation {
                view.recipients = Some(entry.pending);
            }
            let waiting = msg.wait.zip(deadline);
            if let Some((limit, deadline)) =
                waiting.filter(|_| entry.status == MessageStatus::Queued)
            {
                // A group message is delivered once every member's node has it.
                let mut left = entry.pending.max(1);
                while left > 0 {
                    let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match wait_for_delivery(&shared, &mut events, conversation, entry.id, wait)
                        .await
                    {
                        Some(true) => left -= 1,
                        Some(false) => {
                            view.status = views::status_name(MessageStatus::Failed);
                            return Ok(view);
                        }
                        None => {
                            let all = entry.pending.max(1);
                            return Err(Error::NotYetDelivered {
                                id: view.id,
                                within: limit,
                                members: matches!(conversation, Conversation::Group(_))
                                    .then_some((all - left, all)),
                            });
                        }
                    }
                }
                view.status = views::status_name(MessageStatus::Delivered);
            }
            Ok(view)
        })
    }
}

/// How long a history read waits for delivery outcomes already reported to
/// be recorded (one write, normally a millisecond; far more only when the
/// disk stalls, and then the read goes ahead without them).
const RECORDS_WAIT: Duration = Duration::from_secs(10);

impl Handler<GetHistory> for RelationshipManager {
    type Result = ResponseFuture<Result<Vec<MessageView>, Error>>;

    fn handle(&mut self, msg: GetHistory, _: &mut Self::Context) -> Self::Result {
        let conversation = self.resolve_conversation(&msg.of);
        // What the peer's `send --wait` was told is delivered is stored
        // here, and maybe not yet processed: wait for it. (A group's
        // envelopes are processed before they are acknowledged.)
        let settled = match conversation {
            Ok(Conversation::Proton(id)) if self.proton_exists(id) => {
                Some(self.proton(id).send(crate::proton::Settle))
            }
            _ => None,
        };
        let shared = self.shared.clone();
        Box::pin(async move {
            let conversation = conversation?;
            // One bound for both waits below.
            let until = tokio::time::Instant::now() + RECORDS_WAIT;
            if let Some(settled) = settled {
                let _ = tokio::time::timeout_at(until, settled).await;
            }
            // What `send --wait` or `watch` said was delivered, history says too.
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            shared.outbox.recorded(left).await;
            let entries = history(&shared.store, conversation)?;
            let name_of = authors(&shared.store, conversation)?;
            Ok(entries
                .iter()
                .map(|e| {
                    let (name, asserted_by) = match e.author {
                        Author::Me => (None, None),
                        Author::Peer(ipk) => name_of(ipk),
                    };
                    MessageView {
                        name,
                        asserted_by,
                        ..MessageView::of(conversation, e)
                    }
                })
                .collect())
        })
    }
}

impl Handler<CreateGroup> for RelationshipManager {
    type Result = ResponseFuture<Result<GroupView, Error>>;

    fn handle(&mut self, msg: CreateGroup, ctx: &mut Self::Context) -> Self::Result {
        let created = (|| {
            if msg.contacts.is_empty() {
                return Err(Error::Usage(
                    "a group needs at least one contact to invite".into(),
                ));
            }
            let mut via: Vec<ProtonRecord> = Vec::new();
            for c in &msg.contacts {
                let p = self.resolve_usable(c)?;
                if via.iter().any(|v| v.id == p.id) {
                    return Err(Error::Usage(format!("{c:?} is named twice")));
                }
                via.push(p);
            }
            Ok(groups::create_group(
                &self.shared.store,
                &self.shared.node_addrs(),
                self.display(),
                self.shared.lifetimes,
                &via,
                msg.name.clone(),
                now_ms(),
            )?)
        })();
        // Each introduction is encrypted by its relationship's actor and
        // committed with the group: one durable commit for all of it.
        let mut loans = Vec::new();
        if let Ok((record, _)) = &created {
            for relay in &record.relays {
                let (outcome, told) = tokio::sync::oneshot::channel();
                let answer = self.proton(relay.via).send(LendControl {
                    body: relay.body.clone(),
                    outcome: told,
                });
                loans.push((relay.id, outcome, answer));
            }
        }
        let shared = self.shared.clone();
        let me = ctx.address();
        Box::pin(async move {
            let (mut record, mut changes) = created?;
            let mut committed = Vec::new();
            for (relay, outcome, answer) in loans {
                match answer.await {
                    Ok(Ok(lent)) => {
                        changes.extend(lent);
                        record.relays.retain(|r| r.id != relay);
                        committed.push(outcome);
                    }
                    // Left to the group's actor, which sends what is pending.
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "an introduction could not be encrypted; it is sent later")
                    }
                    Err(_) => tracing::warn!(
                        "a relationship's actor stopped; its introduction is sent later"
                    ),
                }
            }
            groups::replace_record(&mut changes, &record);
            let outbox = shared.outbox.clone();
            shared
                .store
                .write_then(
                    move |tx| changes.apply(tx),
                    move |applied| {
                        outbox.queued(std::mem::take(&mut applied.outbox));
                        for outcome in committed {
                            let _ = outcome.send(true);
                        }
                    },
                )
                .await?;
            // The group's actor sends whatever introduction is still pending.
            me.do_send(StartGroup(record.id));
            shared.emit(Event::group(&record, record.epoch, GroupChange::Joined));
            Ok(GroupView::of(&record))
        })
    }
}

/// Starts a group proton's actor (it then does what is pending).
#[derive(Message)]
#[rtype(result = "()")]
struct StartGroup(GroupProtonId);

impl Handler<StartGroup> for RelationshipManager {
    type Result = ();

    fn handle(&mut self, msg: StartGroup, ctx: &mut Self::Context) {
        self.group(msg.0, ctx).do_send(group_proton::ProcessInbox);
    }
}

impl Handler<ListGroups> for RelationshipManager {
    type Result = Result<Vec<GroupView>, Error>;

    fn handle(&mut self, _: ListGroups, _: &mut Self::Context) -> Self::Result {
        self.group_views(false)
    }
}

impl Handler<ListAllGroups> for RelationshipManager {
    type Result = Result<Vec<GroupView>, Error>;

    fn handle(&mut self, _: ListAllGroups, _: &mut Self::Context) -> Self::Result {
        self.group_views(true)
    }
}

impl Handler<GroupsWith> for RelationshipManager {
    type Result = Result<Vec<GroupView>, Error>;

    fn handle(&mut self, msg: GroupsWith, _: &mut Self::Context) -> Self::Result {
        let mut protons = Vec::with_capacity(msg.contacts.len());
        for c in &msg.contacts {
            protons.push(self.resolve(c)?.id);
        }
        let groups = groups::groups_of_exactly(&self.shared.store, &protons)?;
        Ok(groups.iter().map(GroupView::of).collect())
    }
}

impl Handler<GroupCommand> for RelationshipManager {
    type Result = ResponseFuture<Result<GroupView, Error>>;

    fn handle(&mut self, msg: GroupCommand, ctx: &mut Self::Context) -> Self::Result {
        let prepared = (|| {
            let g = match self.resolve_group(&msg.group) {
                // Two introductions under one name: only one may still
                // wait for an answer (not claimed, no claim on its way).
                Err(Error::AmbiguousGroup { query, matches })
                    if matches!(msg.action, GroupAction::Claim | GroupAction::Decline) =>
                {
                    let pending: Vec<GroupProtonRecord> = groups::all_groups(&self.shared.store)?
                        .into_iter()
                        .filter(|g| {
                            g.state == GroupState::Invited
                                && !g.claiming()
                                && g.name.as_deref().is_some_and(|n| same_name(n, &query))
                        })
                        .collect();
                    match <[GroupProtonRecord; 1]>::try_from(pending) {
                        Ok([one]) => one,
                        Err(_) => return Err(Error::AmbiguousGroup { query, matches }),
                    }
                }
                other => other?,
            };
            let member = |query: &str| resolve_member(&g, query);
            let command = match &msg.action {
                GroupAction::Claim => {
                    let (via, _) = g.introduced.ok_or(match g.state {
                        GroupState::Gone => GroupError::Gone,
                        _ => GroupError::OwnGroup,
                    })?;
                    let proton = groups::load_protons(&self.shared.store, [via])?
                        .pop()
                        .ok_or(Error::NotActive(
                            "the relationship you were introduced through".into(),
                        ))?;
                    Command::Claim(Box::new(proton))
                }
                GroupAction::Decline => Command::Decline,
                // Leaving an introduction not yet claimed is declining it:
                // the introducer removes the placeholder, as the seed has it.
                GroupAction::Leave if g.state == GroupState::Invited => Command::Decline,
                GroupAction::Leave => Command::Leave,
                GroupAction::Update => Command::Intent(Box::new(Intent::Update)),
                GroupAction::Remove(q) => Command::Intent(Box::new(Intent::Remove {
                    members: vec![member(q).map_err(|e| match e {
                        Error::OwnMember(q, _) => {
                            Error::OwnMember(q, "; `protonode group leave GROUP` leaves a group")
                        }
                        other => other,
                    })?],
                })),
                GroupAction::Verify(q) => Command::Verify(member(q)?),
                GroupAction::Add(contact) => Command::Add(vec![self.resolve_usable(contact)?]),
            };
            Ok((g.id, command))
        })();
        let prepared = prepared.map(|(id, command)| (id, self.group(id, ctx), command));
        let store = self.shared.store.clone();
        Box::pin(async move {
            let (id, actor, command) = prepared?;
            actor
                .send(Do(command))
                .await
                .map_err(|_| Error::Stopped)??;
            let record =
                groups::get_group(&store, id)?.ok_or(Error::UnknownGroup(id.to_string()))?;
            Ok(GroupView::of(&record))
        })
    }
}

impl Handler<Connect> for RelationshipManager {
    type Result = ResponseFuture<Result<AcceptView, Error>>;

    fn handle(&mut self, msg: Connect, ctx: &mut Self::Context) -> Self::Result {
        let prepared = (|| {
            let g = self.resolve_group(&msg.group)?;
            if g.state == GroupState::Gone {
                return Err(Error::Group(GroupError::Gone));
            }
            if g.state != GroupState::Active {
                return Err(Error::Group(GroupError::NotClaimed));
            }
            let member = resolve_member(&g, &msg.member)?;
            let name = g
                .members
                .iter()
                .find(|m| m.ipk == member)
                .map(|m| m.display.name.clone())
                .unwrap_or_default();
            // One relationship with a person is enough (two would be merged
            // later): the member we were introduced by, or met here before.
            let linked = g.members.iter().find_map(|m| match m.status {
                MemberStatus::Linked { proton } if m.ipk == member => Some(proton),
                _ => None,
            });
            if let Some(proton) = linked.or(met_in_group(&self.shared.store, g.id, member)?) {
                // Merged since: the relationship it was merged into.
                let proton = merge::merged_into_live(&self.shared.store, proton)?.unwrap_or(proton);
                return Err(Error::AlreadyContact {
                    name,
                    contact: proton.to_string(),
                });
            }
            // An invitation of ours still on its way: a second one would
            // make a second relationship if both arrive. (Its member's node
            // keeps one it cannot place yet for an hour; after that, asking
            // again is on offer.)
            let since = now_ms().saturating_sub(groups::HOLD_UNKNOWN_SENDER_MS);
            if let Some(t) = side_ticket_to(&self.shared.store, g.id, member, since)? {
                return Err(Error::NotAnsweredYet {
                    contact: t.proton.to_string(),
                    name,
                    group: group_label(&g),
                });
            }
            let invite = relationship::create_invite(
                &self.shared.store,
                &self.shared.node_addrs(),
                g.own_display.clone(),
                self.shared.lifetimes,
                self.config.delivery.ticket_ttl(),
                Some(TicketOrigin::Group {
                    group: g.id,
                    member,
                }),
                now_ms(),
            )?;
            Ok((g.id, member, name, invite))
        })();
        let prepared = prepared
            .map(|(id, member, name, invite)| (id, self.group(id, ctx), member, name, invite));
        let shared = self.shared.clone();
        let wait = self.config.delivery.accept_wait();
        Box::pin(async move {
            let (group, actor, member, name, invite) = prepared?;
            let contact = invite.ticket.proton;
            let mut events = shared.events.subscribe();
            actor
                .send(Do(Command::Connect {
                    member,
                    ticket: invite.text,
                    key: invite.ticket.own_key.clone(),
                    changes: Box::new(invite.changes),
                }))
                .await
                .map_err(|_| Error::Stopped)??;
            // The member's node accepts and answers; we see the new contact
            // then. Or our invitations crossed and the member's won: the
            // relationship is then the one its invitation made.
            let wanted = contact.to_string();
            let made = || met_in_group(&shared.store, group, member).ok().flatten();
            let arrived = tokio::time::timeout(wait, async {
                loop {
                    match events.recv().await {
                        Ok(Event::Contact { contact, .. }) if contact.id == wanted => {
                            return Some(contact.id)
                        }
                        Ok(Event::Contact { .. }) => {
                            if let Some(other) = made() {
                                return Some(other.to_string());
                            }
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            })
            .await
            .ok()
            .flatten()
            .or_else(|| made().map(|p| p.to_string()));
            Ok(AcceptView {
                delivered: arrived.is_some(),
                contact: arrived.unwrap_or(wanted),
                name,
            })
        })
    }
}

impl Handler<AwaitOrdered> for RelationshipManager {
    type Result = ResponseFuture<Result<GroupView, Error>>;

    fn handle(&mut self, msg: AwaitOrdered, _ctx: &mut Self::Context) -> Self::Result {
        let store = self.shared.store.clone();
        Box::pin(async move {
            let id: GroupProtonId = msg
                .group
                .parse()
                .map_err(|_| Error::UnknownGroup(msg.group.clone()))?;
            loop {
                // The group proton writes its record as it goes: reading it
                // is cheaper than a round trip through its actor, and a
                // change that no longer applies is dropped without an event.
                let record =
                    groups::get_group(&store, id)?.ok_or(Error::UnknownGroup(msg.group.clone()))?;
                let settled = record.pending.is_none() && record.intents.is_empty();
                if settled || record.state == GroupState::Gone {
                    return Ok(GroupView::of(&record));
                }
                if tokio::time::Instant::now() >= msg.until {
                    return Err(Error::NotYetOrdered {
                        what: if record.claiming() {
                            "your claim"
                        } else {
                            "the change"
                        },
                        within: msg.within,
                    });
                }
                tokio::time::sleep_until(
                    msg.until
                        .min(tokio::time::Instant::now() + Duration::from_millis(50)),
                )
                .await;
            }
        })
    }
}

impl Handler<Notice> for RelationshipManager {
    type Result = ();

    fn handle(&mut self, msg: Notice, ctx: &mut Self::Context) {
        match msg {
            Notice::Group(id) => {
                self.group(id, ctx).do_send(group_proton::ProcessInbox);
            }
        }
    }
}

impl Handler<RelayRequest> for RelationshipManager {
    type Result = ();

    fn handle(&mut self, msg: RelayRequest, ctx: &mut Self::Context) {
        let proton = self.proton(msg.relay.via);
        let group = self.group(msg.group, ctx);
        let id = msg.relay.id;
        ctx.spawn(
            async move {
                match proton.send(SendControl(msg.relay.body)).await {
                    Ok(Ok(())) => group.do_send(RelayDone(id)),
                    Ok(Err(e)) => tracing::warn!(error = %e, "sending a group message through a relationship failed"),
                    Err(_) => tracing::warn!("the relationship's actor stopped"),
                }
            }
            .into_actor(self),
        );
    }
}

/// A group member: by key fingerprint (or a prefix of at least 4 hex
/// digits), or by unique name.
fn resolve_member(g: &GroupProtonRecord, query: &str) -> Result<Ipk, Error> {
    if query.trim().is_empty() {
        return Err(Error::EmptyQuery("member"));
    }
    pick_member(&g.members, query, &g.own_display.name, || {
        g.own_key.key().ipk()
    })
}

/// The member `query` names among `members`: a unique id (or id prefix of
/// at least 4 characters) or a unique name. `own` (our key, derived only if
/// nothing else matches) and `own_name` tell "that is you" from "unknown".
fn pick_member(
    members: &[crate::records::Member],
    query: &str,
    own_name: &str,
    own: impl FnOnce() -> Ipk,
) -> Result<Ipk, Error> {
    let q = query.trim();
    let matches_id = |ipk: &Ipk| {
        let (fingerprint, q) = (ipk.fingerprint(), q.to_ascii_lowercase());
        q.len() >= 4
            && (fingerprint == q
                || fingerprint
                    .replace('-', "")
                    .starts_with(&q.replace('-', "")))
    };
    let by_id: Vec<Ipk> = members.iter().map(|m| m.ipk).filter(matches_id).collect();
    let by_name: Vec<Ipk> = members
        .iter()
        .filter(|m| same_name(&m.display.name, q))
        .map(|m| m.ipk)
        .collect();
    match (by_id.as_slice(), by_name.as_slice()) {
        ([one], _) | (_, [one]) => Ok(*one),
        ([], []) if same_name(own_name, q) || matches_id(&own()) => {
            Err(Error::OwnMember(query.to_string(), ""))
        }
        ([], []) => Err(Error::UnknownMember(query.to_string())),
        (many, []) | ([], many) | (many, _) => Err(Error::AmbiguousMember {
            query: query.to_string(),
            matches: many
                .iter()
                .map(Ipk::fingerprint)
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// How long `status` mentions a relationship whose inviter refused our
/// answer.
const REFUSED_WARNED_MS: u64 = 7 * 24 * 60 * 60 * 1000;

impl Handler<GetStatus> for RelationshipManager {
    type Result = ResponseFuture<Result<StatusView, Error>>;

    fn handle(&mut self, _: GetStatus, _: &mut Self::Context) -> Self::Result {
        let client = self.client.clone();
        let store = self.shared.store.clone();
        // A change waits this long for the ordering service before status
        // mentions it: a few of its timeouts (each one fails over).
        let overdue = 3 * self.config.delivery.ordering_timeout();
        Box::pin(async move {
            let status = client
                .status()
                .await
                .map_err(|e| Error::Network(e.to_string()))?;
            let outbox = store.read(|tx| Ok(tx.open_table(tables::OUTBOX)?.len()? as usize))?;
            let protons = all_protons(&store)?;
            let retired = retired_map(&store)?;
            // As `contacts` lists them: not merged into others, not refused.
            let contacts = protons
                .iter()
                .filter(|p| !retired.contains_key(&p.id) && p.state != ProtonState::Refused)
                .count();
            let mut warnings = Vec::new();
            if outbox > 0 {
                warnings.push(format!(
                    "{outbox} envelope(s) wait for their receiver's acknowledgement"
                ));
            }
            let now = now_ms();
            for p in &protons {
                // A refusal heard after `accept` returned: the contact left
                // `contacts` without a word but in the log. Said for a week.
                if p.state == ProtonState::Refused
                    && now.saturating_sub(p.created_at) < REFUSED_WARNED_MS
                {
                    warnings.push(format!(
                        "{}'s node refused your answer to their invitation (it had been used or had expired): ask them for a new one; `protonode contacts --all` shows contact {}",
                        p.peer_display.name, p.id
                    ));
                }
            }
            for p in protons {
                if let crate::records::Trust::Flagged { reason, .. } =
                    merge::trust_of(&store, p.id)?
                {
                    warnings.push(format!(
                        "contact {} ({}) is flagged, do not trust it: {reason}",
                        p.id, p.peer_display.name
                    ));
                }
            }
            let waiting = merge::all_merges(&store)?
                .iter()
                .filter(|m| !m.from_us && m.state == crate::records::MergeState::Pending)
                .count();
            if waiting > 0 {
                warnings.push(format!(
                    "{waiting} merge request(s) wait for your answer: `protonode merge list`"
                ));
            }
            let all_groups = groups::all_groups(&store)?;
            for g in &all_groups {
                let Some(p) = g.pending.as_ref().filter(|_| g.state != GroupState::Gone) else {
                    continue;
                };
                let waited = Duration::from_millis(now.saturating_sub(p.sent_at));
                if waited < overdue {
                    continue;
                }
                let what = match p.intent {
                    Intent::Claim { .. } => "claim",
                    Intent::Add { .. } => "addition",
                    Intent::Remove { .. } => "removal",
                    Intent::Update => "key update",
                };
                let everyone = g.members.len() + 1;
                warnings.push(format!(
                    "group {}{}: a {what} this node asked for has waited {} for the group to order it; it is made once the nodes of a majority of its members ({} of {everyone}, this one included; an introducer's node also votes for the placeholders it made) can be reached, one of which then orders it",
                    g.id,
                    g.name.as_deref().map(|n| format!(" \"{n}\"")).unwrap_or_default(),
                    views::human_duration(waited),
                    everyone / 2 + 1,
                ));
            }
            let unanswered = all_groups
                .iter()
                .filter(|g| g.state == crate::records::GroupState::Invited && !g.claiming())
                .count();
            if unanswered > 0 {
                warnings.push(format!(
                    "{unanswered} introduction(s) wait for you to claim or decline them: `protonode groups`"
                ));
            }
            // Side invitations (`connect`) are answered by the member's
            // node at once: one that waits long says that node is away.
            let side_tickets = store.read(|tx| {
                let t = tx.open_table(tables::TICKETS)?;
                let mut out = Vec::new();
                for e in t.iter()? {
                    let (_, v) = e?;
                    let r: TicketRecord = store::decode(v.value(), "ticket")?;
                    if let Some(TicketOrigin::Group { group, member }) = r.origin {
                        if !r.used && now < r.expires_at {
                            out.push((r.proton, r.created_at, group, member));
                        }
                    }
                }
                Ok(out)
            })?;
            for (proton, at, group, member) in side_tickets {
                let waited = Duration::from_millis(now.saturating_sub(at));
                if waited < overdue {
                    continue;
                }
                let g = all_groups.iter().find(|g| g.id == group);
                let name = member_name(g, member);
                warnings.push(format!(
                    "your invitation to {name} in group {group}{} (contact {proton}) has waited {} for their node's answer; it is answered once their node is reachable",
                    g.and_then(|g| g.name.as_deref()).map(|n| format!(" \"{n}\"")).unwrap_or_default(),
                    views::human_duration(waited),
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
                Owner::Group(id) => self.group(id, ctx).do_send(group_proton::ProcessInbox),
            }
        }
        if welcomes {
            self.process_welcomes(ctx);
        }
    }
}

impl Handler<WelcomesFiled> for RelationshipManager {
    type Result = ();

    fn handle(&mut self, msg: WelcomesFiled, ctx: &mut Self::Context) {
        self.welcomes_waiting.push(msg.0);
        self.process_welcomes(ctx);
    }
}

impl Handler<Deliver> for RelationshipManager {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        let Deliver(owner, entries, done) = msg;
        let direct = crate::inbound::ProcessDirect(entries, done);
        match owner {
            Owner::Proton(id) if self.proton_exists(id) => self.proton(id).do_send(direct),
            Owner::Group(id) => self.group(id, ctx).do_send(direct),
            _ => {
                let _ = direct.1.send(false);
            }
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
        // existed on their side. It is kept, refused, with its history.
        self.protons.remove(&id);
        let store = self.shared.store.clone();
        ctx.spawn(async move { forget(&store, id).await }.into_actor(self).map(move |result, act, _| {
            // An actor started for it meanwhile (a send by id) goes too.
            act.protons.remove(&id);
            match result {
                Ok(Some(mut record)) => {
                    record.state = ProtonState::Refused;
                    tracing::warn!(contact = %record.id, "the inviter's node refused our answer; the relationship is kept, refused, with its history");
                    act.shared.emit(Event::contact(&record, ContactChange::Refused));
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "forgetting a refused relationship failed"),
            }
        }));
    }
}

/// Whether the inviter refused our answer in relationship `id`.
fn refused(store: &store::Store, id: ProtonId) -> bool {
    let record: Result<Option<ProtonRecord>, _> =
        store.read(|tx| store::get(&tx.open_table(tables::PROTONS)?, id.0, "proton"));
    matches!(record, Ok(Some(p)) if p.state == ProtonState::Refused)
}

/// Marks a relationship whose answer the inviter refused as refused (its
/// MLS state and addresses go; its history stays), if it still exists and
/// is not refused already; returns it.
async fn forget(store: &store::Store, id: ProtonId) -> Result<Option<ProtonRecord>, Error> {
    let forgotten = store
        .write(move |tx| {
            let record: Option<ProtonRecord> =
                store::get(&tx.open_table(tables::PROTONS)?, id.0, "proton")?;
            let Some(record) = record.filter(|r| r.state != ProtonState::Refused) else {
                return Ok(None);
            };
            relationship::forget_refused(tx, &record)?.apply(tx)?;
            Ok(Some(record))
        })
        .await?;
    Ok(forgotten)
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
/// Whether a name a peer or we gave matches what a person typed: the
/// same, ignoring case (in any script) and the spaces around it.
/// Refuses to take two contacts who go by different names for one person
/// unless told to: a merge request (and a link, which a merge checks)
/// between two people makes each of them, rightly, distrust the other's
/// relationship as one someone poses in.
fn one_person(a: &ProtonRecord, b: &ProtonRecord, force: bool, command: &str) -> Result<(), Error> {
    let (one, other) = (&a.peer_display.name, &b.peer_display.name);
    // One not active yet (or refused) is refused for that, not its name.
    let active = |p: &ProtonRecord| p.state == ProtonState::Active;
    if force || !active(a) || !active(b) || same_name(one, other) {
        return Ok(());
    }
    let why = if command == "link" {
        "if not, a merge request over them later would tell each that someone poses as them"
    } else {
        "if not, each would be told that someone poses as them to you"
    };
    Err(Error::Usage(format!(
        "\"{one}\" and \"{other}\" go by different names: are they really one person? \
         ({why}) `protonode {command} --force` if you are sure"
    )))
}

fn same_name(name: &str, typed: &str) -> bool {
    let (name, typed) = (name.trim(), typed.trim());
    name == typed || name.to_lowercase() == typed.to_lowercase()
}

/// Our side relationship with `member` of `group`, if we have one (live
/// or merged since; not one whose answer was refused).
pub fn met_in_group(
    store: &store::Store,
    group: GroupProtonId,
    member: Ipk,
) -> Result<Option<ProtonId>, StoreError> {
    Ok(all_protons(store)?
        .into_iter()
        .find(|p| {
            p.state != ProtonState::Refused
                && p.provenance == Provenance::MetInGroup { group, member }
        })
        .map(|p| p.id))
}

/// How recent an unanswered invitation of ours to a member must be for
/// the member's own invitation to count as crossing it (both sent before
/// either arrived). An older one the member has not answered was lost or
/// is stuck: it must not keep us from taking theirs.
pub const CROSSING_WINDOW_MS: u64 = 10 * 60 * 1000;

/// Our invitation to a side relationship with `member` of `group` that
/// has not been answered yet and was made since `since` (ms), if any.
/// A group as errors name it: `"Name" (id)`, or its id.
fn group_label(g: &GroupProtonRecord) -> String {
    match &g.name {
        Some(n) => format!("\"{n}\" ({})", g.id),
        None => g.id.to_string(),
    }
}

/// [`group_label`] of a group known by its id (the id alone if it is gone
/// from the store).
fn group_label_of(store: &store::Store, group: GroupProtonId) -> Result<String, StoreError> {
    Ok(groups::get_group(store, group)?.map_or_else(|| group.to_string(), |g| group_label(&g)))
}

/// A member's name in `g` (also one gone lately), or its key id.
fn member_name(g: Option<&GroupProtonRecord>, member: Ipk) -> String {
    g.and_then(|g| g.members.iter().chain(&g.former).find(|m| m.ipk == member))
        .map_or_else(
            || format!("member {}", member.fingerprint()),
            |m| m.display.name.clone(),
        )
}

pub fn side_ticket_to(
    store: &store::Store,
    group: GroupProtonId,
    member: Ipk,
    since: u64,
) -> Result<Option<TicketRecord>, StoreError> {
    let wanted = Some(TicketOrigin::Group { group, member });
    store.read(|tx| {
        let t = tx.open_table(tables::TICKETS)?;
        for e in t.iter()? {
            let (_, v) = e?;
            let r: TicketRecord = store::decode(v.value(), "ticket")?;
            if !r.used && r.origin == wanted && r.created_at >= since {
                return Ok(Some(r));
            }
        }
        Ok(None)
    })
}

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

/// Who wrote what in `conversation`, by name: the contact (1:1), or a
/// group's member by key, among its members and those it still remembers
/// as removed or gone (see [`views::group_author`]), with who asserts it
/// for a placeholder.
#[allow(clippy::type_complexity)]
fn authors(
    store: &store::Store,
    conversation: Conversation,
) -> Result<Box<dyn Fn(Ipk) -> (Option<String>, Option<String>) + Send>, Error> {
    Ok(match conversation {
        Conversation::Proton(id) => {
            let name = store
                .read(|tx| {
                    store::get::<_, ProtonRecord, _>(
                        &tx.open_table(tables::PROTONS)?,
                        id.0,
                        "proton",
                    )
                })?
                .map(|p| p.peer_display.name);
            Box::new(move |_| (name.clone(), None))
        }
        Conversation::Group(id) => match groups::get_group(store, id)? {
            Some(g) => {
                let me = g.own_key.key().ipk();
                Box::new(move |ipk| match views::group_author(&g, me, ipk) {
                    Some((name, asserted_by)) => (Some(name), asserted_by),
                    None => (None, None),
                })
            }
            None => Box::new(|_| (None, None)),
        },
    })
}

/// A conversation's history, in the order this node stored its messages.
/// A merged relationship's includes the histories of those it follows,
/// interleaved by the time each message was sent.
pub fn history(
    store: &store::Store,
    conversation: Conversation,
) -> Result<Vec<HistoryEntry>, StoreError> {
    let conversations = match conversation {
        Conversation::Proton(id) => merge::lineage(store, id)?
            .into_iter()
            .map(Conversation::Proton)
            .collect(),
        Conversation::Group(_) => vec![conversation],
    };
    let merged = conversations.len() > 1;
    let mut out: Vec<HistoryEntry> = store.read(|tx| {
        let t = tx.open_table(tables::HISTORY)?;
        let mut out = Vec::new();
        for c in &conversations {
            let key = c.key();
            for e in t.range((key, 0)..=(key, u64::MAX))? {
                let (_, v) = e?;
                out.push(store::decode(v.value(), "history entry")?);
            }
        }
        Ok(out)
    })?;
    if merged {
        // Two relationships' histories, each in this node's order, are
        // interleaved by the time their messages were sent: neither
        // node's storing order says how the two threads went together.
        out.sort_by_key(|e| e.sent_at);
        let mut seen = std::collections::HashSet::new();
        out.retain(|e| seen.insert(e.id));
    }
    Ok(out)
}

fn inbox_owners(store: &store::Store) -> Result<Vec<Owner>, StoreError> {
    store.read(|tx| {
        let t = tx.open_table(tables::INBOX)?;
        let mut owners = Vec::new();
        for e in t.iter()? {
            let (_, v) = e?;
            let entry: InboxEntry = store::decode(v.value(), "inbox entry")?;
            // Rows for an address derived from ours wait for their group.
            if entry.context.is_none() && !owners.contains(&entry.owner) {
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

/// How long an envelope that came to an address derived from one of our
/// relationships waits for the introduction to its group (which comes
/// through that relationship, and may come after the group's first
/// messages). After that, or once the relationship is gone, it is dropped:
/// only the group's members know such an address, and what they send for a
/// group we never joined would otherwise stay for ever.
pub const HELD_FOR_GROUP_MS: u64 = 30 * 24 * 3600 * 1000;

/// What `prune` dropped.
#[derive(Debug, Default, PartialEq, Eq)]
struct Pruned {
    /// Expired tickets, addresses and rows that came for unused tickets.
    expired: usize,
    /// Envelopes that waited for an introduction that never came.
    held: usize,
}

/// Drops what has expired: unused tickets (with their addresses, MLS state
/// and any rows that arrived for them), expired addresses, and envelopes
/// held for a group longer than [`HELD_FOR_GROUP_MS`] or for a relationship
/// that is gone.
fn prune(tx: &redb::WriteTransaction, now: u64) -> Result<Pruned, StoreError> {
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
    let mut held = 0;
    {
        let inbox = tx.open_table(tables::INBOX)?;
        let protons = tx.open_table(tables::PROTONS)?;
        for e in inbox.iter()? {
            let (k, v) = e?;
            let entry: InboxEntry = store::decode(v.value(), "inbox entry")?;
            let orphan = match entry.owner {
                Owner::Proton(p) => expired_tickets.iter().any(|t| !t.used && t.proton == p),
                Owner::Ticket(id) => expired_tickets.iter().any(|t| t.id == id),
                Owner::Group(_) => false,
            };
            let waited_out = entry.context.is_some()
                && (entry.received_at.saturating_add(HELD_FOR_GROUP_MS) <= now
                    || matches!(entry.owner, Owner::Proton(p) if protons.get(p.0)?.is_none()));
            if orphan {
                count += 1;
            } else if waited_out {
                held += 1;
            } else {
                continue;
            }
            changes.inbox_done.push(k.value());
        }
    }
    changes.apply(tx)?;
    Ok(Pruned {
        expired: count,
        held,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityKey;
    use crate::records::Member;

    fn member(name: &str) -> Member {
        Member::for_test(name)
    }

    #[test]
    fn envelopes_held_for_a_group_go_after_thirty_days_or_with_their_relationship() {
        let dir = tempfile::tempdir().unwrap();
        let store = store::Store::open(&dir.path().join("db")).unwrap();
        let (live, gone) = (ProtonId([1; 8]), ProtonId([2; 8]));
        let now = 100 * HELD_FOR_GROUP_MS;
        let day = 24 * 3600 * 1000;
        let row = |owner: ProtonId, context: Option<[u8; 16]>, age: u64| InboxEntry {
            owner: Owner::Proton(owner),
            source: crate::records::Source::Network,
            context,
            payload: vec![age as u8],
            received_at: now - age,
        };
        let rows = [
            row(live, Some([7; 16]), day),                     // waits on
            row(live, Some([7; 16]), HELD_FOR_GROUP_MS + day), // waited out
            row(gone, Some([7; 16]), day),                     // its relationship is gone
            row(gone, None, HELD_FOR_GROUP_MS + day),          // not held: its proton's
        ];
        store
            .write_blocking(|tx| {
                // Only whether a record is there counts.
                tx.open_table(tables::PROTONS)?
                    .insert(live.0, b"record".as_slice())?;
                let mut t = tx.open_table(tables::INBOX)?;
                for (seq, entry) in rows.iter().enumerate() {
                    store::put(&mut t, seq as u64, entry, "inbox entry")?;
                }
                Ok(())
            })
            .unwrap();
        let pruned = store.write_blocking(|tx| prune(tx, now)).unwrap();
        assert_eq!(
            pruned,
            Pruned {
                expired: 0,
                held: 2
            }
        );
        let left: Vec<u64> = store
            .read(|tx| {
                let t = tx.open_table(tables::INBOX)?;
                let mut keys = Vec::new();
                for e in t.iter()? {
                    keys.push(e?.0.value());
                }
                Ok(keys)
            })
            .unwrap();
        assert_eq!(left, vec![0, 3]);
    }

    #[test]
    fn a_name_matches_in_any_case_and_script_without_its_surrounding_spaces() {
        assert!(same_name("Trip ✈️ plans  ünï", "TRIP ✈️ PLANS  ÜNÏ"));
        assert!(same_name("  Spacey  ", "spacey"));
        assert!(same_name("Blair", " blair "));
        assert!(!same_name("Blair", "Blai"));
        assert!(!same_name("Blair Smith", "BlairSmith"));
    }

    #[test]
    fn a_member_is_named_by_id_or_unique_name_and_never_by_guess() {
        let (sam, sam2, kim) = (member("Sam"), member("sam"), member("Kim"));
        let me = IdentityKey::generate().ipk();
        let members = [sam.clone(), sam2.clone(), kim.clone()];
        let pick = |q: &str| pick_member(&members, q, "Alex", || me);

        assert_eq!(pick("kim").ok(), Some(kim.ipk));
        assert_eq!(pick(&sam2.ipk.fingerprint()).ok(), Some(sam2.ipk));
        assert_eq!(pick(&sam.ipk.fingerprint()[..9]).ok(), Some(sam.ipk));
        match pick("Sam") {
            Err(Error::AmbiguousMember { matches, .. }) => {
                assert!(matches.contains(&sam.ipk.fingerprint()));
                assert!(matches.contains(&sam2.ipk.fingerprint()));
            }
            other => panic!("two members named Sam: {other:?}"),
        }
        assert!(matches!(pick("alex"), Err(Error::OwnMember(..))));
        assert!(matches!(pick(&me.fingerprint()), Err(Error::OwnMember(..))));
        assert!(matches!(pick("Zed"), Err(Error::UnknownMember(_))));
        // Too short to be taken for an id.
        assert!(matches!(
            pick(&kim.ipk.fingerprint()[..3]),
            Err(Error::UnknownMember(_))
        ));
    }
}
