//! 1:1 relationships (DESIGN.md section 8.1) as plain code: making an
//! invitation, accepting one, the inviter's side of the answer, and a
//! proton's session (send and receive). Nothing here writes to the store or
//! touches the network: every operation returns the [`Changes`] its caller
//! applies atomically, so the whole flow is testable with two stores and no
//! network (see the tests below), and the actors are thin shells around it.

use std::collections::BTreeMap;
use std::time::Duration;

use openmls::prelude::{GroupId, MlsGroup};
use openmls_rust_crypto::RustCrypto;
use redb::ReadableTable;
use transports::{DeliveryAddress, Multiaddr, PeerId};

use crate::attestation::{Attestation, Kind};
use crate::changes::{Changes, StatusChange};
use crate::identity::{IdentityKey, Ipk, SecretKey};
use crate::mls::{self, Incoming, MlsError, Provider};
use crate::model::{
    validate_text, AddressLease, Conversation, DisplayIdentity, GroupProtonId, InvalidValue,
    MessageId, ProtonId, TicketId, TransportInfo, TransportKind,
};
use crate::protocol::{Body, DecodeError, HelloLink, Payload, Plaintext};
use crate::records::{
    AddressKind, AddressRecord, Author, HistoryEntry, InboxEntry, MessageStatus, OutboxEntry,
    OutboxKind, Owner, ProtonRecord, ProtonState, Provenance, Recipient, Source, TicketOrigin,
    TicketRecord,
};
use crate::store::{self, tables, Store, StoreError};
use crate::ticket::{Ticket, TicketError};

/// What failed in a relationship operation.
#[derive(Debug, thiserror::Error)]
pub enum RelationshipError {
    #[error(transparent)]
    Ticket(#[from] TicketError),
    #[error("you already accepted this invitation (contact {contact})")]
    AlreadyAccepted { contact: ProtonId },
    #[error("this is your own invitation; give it to the person you want to talk to")]
    OwnTicket,
    #[error("this node has no listen addresses to offer; is the daemon's network up?")]
    NoTransports,
    #[error("message not valid: {0}")]
    Invalid(#[from] InvalidValue),
    #[error("the relationship {0} does not exist")]
    UnknownProton(ProtonId),
    #[error(
        "the relationship is not active yet: the inviter's node has not acknowledged our answer"
    )]
    NotActive,
    #[error(
        "the inviter's node refused our answer: the invitation was already used or has expired"
    )]
    Refused,
    #[error("a message claimed to come from someone who is not the peer")]
    WrongSender,
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    #[error("the answer to our invitation is not valid: {0}")]
    BadWelcome(String),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Mls(#[from] MlsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Group(Box<crate::groups::GroupError>),
    #[error(transparent)]
    Merge(#[from] crate::merge::MergeError),
    #[error("this relationship was merged into {0}; use that one")]
    Retired(ProtonId),
}

/// Where this node can be reached now: its libp2p identity and the
/// addresses it advertises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddrs {
    pub peer: PeerId,
    pub addrs: Vec<Multiaddr>,
    /// The public half of our receiving service's key for derived addresses.
    pub service_key: [u8; 32],
}

impl NodeAddrs {
    /// The advertised addresses of one kind of transport.
    fn of_kind(&self, kind: TransportKind) -> Vec<Multiaddr> {
        self.addrs
            .iter()
            .filter(|a| TransportKind::of(a) == Some(kind))
            .cloned()
            .collect()
    }

    /// The kinds to offer: one transport per kind we listen on; with only one
    /// kind, two transports of it (each with its own addresses), so that a
    /// relationship always has at least two ways in.
    fn kinds(&self) -> Vec<TransportKind> {
        let present: Vec<TransportKind> = [TransportKind::Tcp, TransportKind::Quic]
            .into_iter()
            .filter(|k| !self.of_kind(*k).is_empty())
            .collect();
        match present.as_slice() {
            [one] => vec![*one, *one],
            _ => present,
        }
    }
}

/// Lifetimes of tickets and addresses, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    pub ephemeral: Duration,
    pub long_term: Duration,
}

impl From<&config::Delivery> for Lifetimes {
    fn from(d: &config::Delivery) -> Self {
        Self {
            ephemeral: d.ephemeral_address_ttl(),
            long_term: d.long_term_address_ttl(),
        }
    }
}

/// Fresh transports (with fresh addresses) for a new relationship end.
pub fn make_transports(
    node: &NodeAddrs,
    lifetimes: Lifetimes,
    now: u64,
) -> Result<Vec<TransportInfo>, RelationshipError> {
    let kinds = node.kinds();
    if kinds.is_empty() {
        return Err(RelationshipError::NoTransports);
    }
    Ok(kinds
        .into_iter()
        .map(|kind| {
            TransportInfo::new(
                kind,
                node.peer,
                node.service_key,
                &node.of_kind(kind),
                AddressLease::new(now, lifetimes.long_term),
                AddressLease::new(now, lifetimes.ephemeral),
            )
        })
        .collect())
}

/// The address rows that make our receiving service resolve `transports` to `owner`.
pub(crate) fn address_rows(
    owner: Owner,
    transports: &[TransportInfo],
) -> Vec<(DeliveryAddress, AddressRecord)> {
    transports
        .iter()
        .flat_map(|t| {
            [
                (&t.long_term, AddressKind::LongTerm),
                (&t.ephemeral, AddressKind::Ephemeral),
            ]
        })
        // Our own leases are plain addresses; nothing else is ours to resolve.
        .filter_map(|(lease, kind)| Some((lease.plain()?, lease.valid_until, kind)))
        .map(|(address, valid_until, kind)| {
            (
                address,
                AddressRecord {
                    owner,
                    kind,
                    valid_until,
                    used_by: None,
                },
            )
        })
        .collect()
}

/// An invitation, ready to show.
pub struct Invite {
    pub text: String,
    pub ticket: TicketRecord,
    pub changes: Changes,
}

/// Makes an invitation ticket valid for `ttl`. `origin` marks a side
/// relationship's ticket, sealed to a member of one of our groups.
pub fn create_invite(
    store: &Store,
    node: &NodeAddrs,
    display: DisplayIdentity,
    lifetimes: Lifetimes,
    ttl: Duration,
    origin: Option<TicketOrigin>,
    now: u64,
) -> Result<Invite, RelationshipError> {
    let proton = ProtonId::random();
    let id = TicketId::random();
    let key = IdentityKey::generate();
    let provider = Provider::new(store.clone(), proton.0);
    let key_package = mls::new_key_package(&provider, &key)?;
    let transports = make_transports(node, lifetimes, now)?;
    let expires_at = now.saturating_add(ttl.as_millis() as u64);
    let ticket = Ticket {
        id,
        display: display.clone(),
        key_package: mls::encode_key_package(key_package.key_package())?,
        transports: transports.clone(),
        welcome_address: DeliveryAddress::random(),
        expires_at,
    };
    let text = ticket.encode(&key);
    let record = TicketRecord {
        id,
        created_at: now,
        expires_at,
        proton,
        own_key: SecretKey::from(&key),
        own_display: display,
        own_transports: transports.clone(),
        welcome_address: ticket.welcome_address,
        used: false,
        origin,
    };
    let mut changes = Changes {
        mls: provider.mls_storage().take_writes(),
        ..Changes::default()
    };
    changes.addresses.push((
        ticket.welcome_address,
        AddressRecord {
            owner: Owner::Ticket(id),
            kind: AddressKind::OneTime,
            valid_until: expires_at,
            used_by: None,
        },
    ));
    changes
        .addresses
        .extend(address_rows(Owner::Proton(proton), &transports));
    changes.tickets.push(record.clone());
    Ok(Invite {
        text,
        ticket: record,
        changes,
    })
}

/// Our answer to someone's ticket.
pub struct Acceptance {
    pub proton: ProtonRecord,
    /// The outbox entry of the answer is tracked under this id.
    pub answer: MessageId,
    pub changes: Changes,
}

/// For a side relationship: our group proton's key, the group, and the
/// member whose ticket we accept.
pub struct SideLink<'a> {
    pub group_key: &'a IdentityKey,
    pub group: GroupProtonId,
    pub member: Ipk,
}

/// What ties the new relationship of an accepted ticket to our others.
pub enum AcceptLink<'a> {
    /// A side relationship with a member of one of our groups.
    Group(SideLink<'a>),
    /// A merge: the new key follows our keys in these two relationships.
    Merge {
        old: [ProtonId; 2],
        keys: Box<[IdentityKey; 2]>,
    },
}

/// Accepts a ticket: a fresh proton, the 2-member MLS group, and the answer
/// (Welcome plus our Hello) queued for the ticket's one-time address. With
/// `link`, the Hello carries our new key's equivalence to our group proton.
pub fn accept_invite(
    store: &Store,
    node: &NodeAddrs,
    display: DisplayIdentity,
    lifetimes: Lifetimes,
    text: &str,
    link: Option<AcceptLink<'_>>,
    now: u64,
) -> Result<Acceptance, RelationshipError> {
    let verified = Ticket::parse(text, &RustCrypto::default())?;
    verified.check_expiry(now)?;
    let ticket = verified.ticket;
    let accepted: Option<ProtonId> = store.read(|tx| {
        let t = tx.open_table(tables::ACCEPTED_TICKETS)?;
        Ok(t.get(ticket.id.0)?.map(|v| ProtonId(v.value())))
    })?;
    if let Some(contact) = accepted {
        return Err(RelationshipError::AlreadyAccepted { contact });
    }
    let own_ticket =
        store.read(|tx| Ok(tx.open_table(tables::TICKETS)?.get(ticket.id.0)?.is_some()))?;
    if own_ticket {
        return Err(RelationshipError::OwnTicket);
    }

    let id = ProtonId::random();
    let key = IdentityKey::generate();
    let provider = Provider::new(store.clone(), id.0);
    let mut group = mls::create_group(&provider, &key)?;
    let (_commit, welcome) =
        mls::add_members(&mut group, &provider, &key, &[verified.key_package])?;
    let transports = make_transports(node, lifetimes, now)?;
    let hello = Plaintext {
        body: Body::Hello {
            display: display.clone(),
            transports: transports.clone(),
            link: link.as_ref().map(|l| match l {
                AcceptLink::Group(side) => {
                    HelloLink::Group(Attestation::equivalent(&key, side.group_key, now))
                }
                AcceptLink::Merge { keys, .. } => HelloLink::Merge(
                    keys.iter()
                        .map(|old| Attestation::follows(old, &key, now))
                        .collect(),
                ),
            }),
        },
        transports: None,
    };
    let hello_link = match &hello.body {
        Body::Hello { link, .. } => link.clone(),
        _ => None,
    };
    let hello = mls::encrypt(&mut group, &provider, &key, &hello.encode())?;
    let record = ProtonRecord {
        id,
        created_at: now,
        state: ProtonState::Pending,
        provenance: match &link {
            Some(AcceptLink::Group(l)) => Provenance::MetInGroup {
                group: l.group,
                member: l.member,
            },
            Some(AcceptLink::Merge { old, .. }) => Provenance::Merged { from: *old },
            None => Provenance::AcceptedTicket { ticket: ticket.id },
        },
        own_key: SecretKey::from(&key),
        own_display: display,
        own_transports: transports.clone(),
        peer_display: ticket.display,
        peer_ipk: verified.ipk,
        peer_transports: ticket.transports,
        group_id: group.group_id().as_slice().to_vec(),
        transports_dirty: false,
    };
    let answer = MessageId::random();
    let mut changes = Changes {
        mls: provider.mls_storage().take_writes(),
        ..Changes::default()
    };
    changes.addresses = address_rows(Owner::Proton(id), &transports);
    changes.accepted_tickets.push((ticket.id, id));
    // Keep what ties the new key to our others, for the trust record.
    match hello_link {
        Some(HelloLink::Group(a)) => changes.links.push((id, a)),
        Some(HelloLink::Merge(follows)) => {
            for a in follows {
                changes.links.push((id, a));
            }
        }
        None => {}
    }
    changes.outbox.push(OutboxEntry {
        conversation: Conversation::Proton(id),
        recipient: Recipient::Peer,
        kind: OutboxKind::Welcome,
        message: Some(answer),
        history: None,
        address: Some(ticket.welcome_address.into()),
        payload: Payload::Welcome { welcome, hello }.encode(),
        created_at: now,
    });
    changes.protons.push(record.clone());
    Ok(Acceptance {
        proton: record,
        answer,
        changes,
    })
}

/// Undoes an acceptance whose answer the inviter's node refused: the proton,
/// its addresses, MLS state and queued messages go; the record of having
/// accepted the ticket goes too, so the same mistake reads the same later.
///
/// Reads in the transaction that applies the changes, so that no row
/// queued or stored meanwhile escapes them.
pub fn forget_refused(
    tx: &redb::WriteTransaction,
    proton: &ProtonRecord,
) -> Result<Changes, StoreError> {
    let conversation = Conversation::Proton(proton.id);
    let t = tx.open_table(tables::OUTBOX)?;
    let mut outbox = Vec::new();
    for entry in t.iter()? {
        let (k, v) = entry?;
        let e: OutboxEntry = store::decode(v.value(), "outbox entry")?;
        if e.conversation == conversation {
            outbox.push(k.value());
        }
    }
    drop(t);
    // Envelopes that came for it and wait for its actor, which will not run.
    let t = tx.open_table(tables::INBOX)?;
    let mut inbox = Vec::new();
    for entry in t.iter()? {
        let (k, v) = entry?;
        let e: InboxEntry = store::decode(v.value(), "inbox entry")?;
        if e.owner == Owner::Proton(proton.id) {
            inbox.push(k.value());
        }
    }
    drop(t);
    // What we wrote into it: nobody on the other side will read it.
    let h = tx.open_table(tables::HISTORY)?;
    let key = conversation.key();
    let mut unread = Vec::new();
    let mut written = false;
    for entry in h.range((key, 0)..=(key, u64::MAX))? {
        let (k, v) = entry?;
        let e: HistoryEntry = store::decode(v.value(), "history entry")?;
        written = true;
        if e.author == Author::Me && e.status != MessageStatus::Failed {
            unread.push(k.value().1);
        }
    }
    drop(h);
    let unread = written.then_some(unread);
    let mut changes = Changes {
        inbox_done: inbox,
        outbox_done: outbox,
        delete_mls_namespaces: vec![proton.id.0],
        delete_addresses: address_rows(Owner::Proton(proton.id), &proton.own_transports)
            .into_iter()
            .map(|(a, _)| a)
            .collect(),
        ..Default::default()
    };
    match (&proton.provenance, unread) {
        // Kept, refused, with what the person wrote into it: a conversation
        // does not vanish from under them (`contacts --all` lists it). One
        // with nothing in it leaves no trace.
        (Provenance::AcceptedTicket { ticket }, Some(unread)) => {
            changes.delete_accepted_tickets.push(*ticket);
            let mut kept = proton.clone();
            kept.state = ProtonState::Refused;
            changes.protons.push(kept);
            changes.statuses = unread
                .into_iter()
                .map(|seq| (conversation, seq, StatusChange::Failed))
                .collect();
        }
        // A merge whose answer was refused: the old relationships live on,
        // with the histories it copied.
        (Provenance::Merged { from }, _) => {
            changes
                .unretired
                .extend(from.iter().map(|p| (*p, proton.id)));
            // The request it answered was not taken after all (asked again,
            // or made moot): it says so, rather than "accepted" into a
            // relationship that is gone.
            let merges = tx.open_table(tables::MERGES)?;
            for e in merges.iter()? {
                let (_, v) = e?;
                let mut m: crate::records::MergeRecord = store::decode(v.value(), "merge")?;
                if m.state == (crate::records::MergeState::Accepted { into: proton.id }) {
                    m.state = crate::records::MergeState::Replaced;
                    changes.merges.push(m);
                }
            }
            changes.delete_protons.push(proton.id);
            changes.delete_history.push(conversation);
        }
        (provenance, _) => {
            if let Provenance::AcceptedTicket { ticket } = provenance {
                changes.delete_accepted_tickets.push(*ticket);
            }
            changes.delete_protons.push(proton.id);
            changes.delete_history.push(conversation);
        }
    }
    Ok(changes)
}

/// The inviter's side: the answer to our ticket arrived. Joins the group,
/// reads the acceptor's Hello, and makes the proton.
pub fn receive_welcome(
    store: &Store,
    ticket: &TicketRecord,
    payload: &Payload,
    inbox_seq: u64,
    now: u64,
) -> Result<(ProtonRecord, Changes), RelationshipError> {
    let Payload::Welcome { welcome, hello } = payload else {
        return Err(RelationshipError::Unexpected(
            "a ticket address only takes a Welcome",
        ));
    };
    if ticket.used {
        return Err(RelationshipError::BadWelcome(
            "the ticket was already used".into(),
        ));
    }
    let provider = Provider::new(store.clone(), ticket.proton.0);
    let mut group = mls::join_from_welcome(&provider, welcome)?;
    let own = ticket.own_key.key().ipk();
    let members = mls::member_ipks(&group);
    let peer = match members.as_slice() {
        [a, b] if *a == own => *b,
        [a, b] if *b == own => *a,
        _ => {
            return Err(RelationshipError::BadWelcome(format!(
                "expected a group of the two of us, found {} members",
                members.len()
            )))
        }
    };
    let Incoming::Application { sender, bytes } = mls::process(&mut group, &provider, hello)?
    else {
        return Err(RelationshipError::BadWelcome(
            "the Hello is not an application message".into(),
        ));
    };
    if sender != Some(peer) {
        return Err(RelationshipError::WrongSender);
    }
    let Body::Hello {
        display,
        transports,
        link,
    } = Plaintext::decode(&bytes)?.body
    else {
        return Err(RelationshipError::BadWelcome("expected a Hello".into()));
    };
    // A side relationship's answer must come from the member it was for; a
    // merge's, from the keys the peer holds in the two relationships merged.
    let mut extra = Changes::default();
    let provenance = match &ticket.origin {
        None => Provenance::InvitedByUs { ticket: ticket.id },
        Some(TicketOrigin::Group { group, member }) => {
            let Some(HelloLink::Group(link)) = link else {
                return Err(RelationshipError::BadWelcome(
                    "the answer is not linked to the group member".into(),
                ));
            };
            link.verify_as(Kind::Equivalent, &peer, member)
                .map_err(|e| {
                    RelationshipError::BadWelcome(format!(
                        "the answer's link to the group member: {e}"
                    ))
                })?;
            extra.links.push((ticket.proton, link.clone()));
            Provenance::MetInGroup {
                group: *group,
                member: *member,
            }
        }
        Some(TicketOrigin::Merge {
            request,
            old,
            peers,
        }) => {
            let Some(HelloLink::Merge(follows)) = link else {
                return Err(RelationshipError::BadWelcome(
                    "the answer does not follow the merged relationships".into(),
                ));
            };
            if follows.len() != 2 {
                return Err(RelationshipError::BadWelcome(
                    "a merge answer follows exactly two keys".into(),
                ));
            }
            for (attestation, previous) in follows.iter().zip(peers) {
                attestation
                    .verify_as(Kind::Follows, previous, &peer)
                    .map_err(|e| {
                        RelationshipError::BadWelcome(format!(
                            "the merge answer's follows attestation: {e}"
                        ))
                    })?;
            }
            extra = crate::merge::retire_into(store, *request, ticket.proton, *old)?;
            for a in follows.iter() {
                for p in old {
                    extra.links.push((*p, a.clone()));
                }
            }
            // The merged relationship's trust record holds what ties both
            // sides' new keys to their old ones, as the acceptor's does:
            // their "follows", and our request's equivalence and "follows".
            let asked = store.read(|tx| {
                store::get::<_, crate::records::MergeRecord, _>(
                    &tx.open_table(tables::MERGES)?,
                    *request,
                    "merge",
                )
            })?;
            let ours = asked.iter().flat_map(|m| {
                m.request
                    .follows
                    .iter()
                    .chain([&m.request.equivalence])
                    .cloned()
            });
            for a in follows.iter().cloned().chain(ours) {
                extra.links.push((ticket.proton, a));
            }
            Provenance::Merged { from: *old }
        }
    };
    let record = ProtonRecord {
        id: ticket.proton,
        created_at: now,
        state: ProtonState::Active,
        provenance,
        own_key: ticket.own_key.clone(),
        own_display: ticket.own_display.clone(),
        own_transports: ticket.own_transports.clone(),
        peer_display: display,
        peer_ipk: peer,
        peer_transports: transports,
        group_id: group.group_id().as_slice().to_vec(),
        transports_dirty: false,
    };
    let mut used = ticket.clone();
    used.used = true;
    let mut changes = Changes {
        mls: provider.mls_storage().take_writes(),
        ..Changes::default()
    };
    changes.protons.push(record.clone());
    changes.tickets.push(used);
    changes.inbox_done.push(inbox_seq);
    changes.extend(extra);
    Ok((record, changes))
}

/// What a received envelope turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    Text(HistoryEntry),
    /// The peer's transports changed.
    Transports,
    /// The peer introduced us into a group; we joined as its placeholder.
    Joined(GroupProtonId),
    /// A control message for one of our groups, now in its inbox.
    Relayed(GroupProtonId),
    /// A merge request, recorded (and what it revealed).
    Merge(crate::merge::RequestOutcome),
    /// The peer introduced us into a group we are already in (another
    /// member added us at the same time): its placeholder for us is one
    /// no one will claim. Decline it, so that the peer removes it.
    AlreadyInGroup(Vec<u8>),
}

/// One proton's live state: its record, key, MLS group and provider.
pub struct ProtonSession {
    record: ProtonRecord,
    key: IdentityKey,
    group: MlsGroup,
    provider: Provider,
}

impl ProtonSession {
    /// Restores a proton from the store.
    pub fn load(store: &Store, id: ProtonId) -> Result<Self, RelationshipError> {
        let record: ProtonRecord = store
            .read(|tx| store::get(&tx.open_table(tables::PROTONS)?, id.0, "proton"))?
            .ok_or(RelationshipError::UnknownProton(id))?;
        // Its MLS state went when the inviter refused our answer.
        if record.state == ProtonState::Refused {
            return Err(RelationshipError::Refused);
        }
        let provider = Provider::new(store.clone(), id.0);
        let group = mls::load_group(&provider, &GroupId::from_slice(&record.group_id))?;
        Ok(Self {
            key: record.own_key.key(),
            record,
            group,
            provider,
        })
    }

    pub fn record(&self) -> &ProtonRecord {
        &self.record
    }

    pub fn id(&self) -> ProtonId {
        self.record.id
    }

    /// Sets the proton's state (e.g. active once our answer was acknowledged).
    pub fn set_state(&mut self, state: ProtonState) -> Changes {
        self.record.state = state;
        Changes {
            protons: vec![self.record.clone()],
            ..Changes::default()
        }
    }

    /// Runs one step so that its failure leaves the session as it was before
    /// the step, even when earlier steps of the same batch are not yet
    /// committed: the pending MLS writes are restored and, if the step
    /// changed them, the group reloaded from them (a step that changed
    /// none left the group in memory as it was).
    fn isolated<R>(
        &mut self,
        step: impl FnOnce(&mut Self) -> Result<R, RelationshipError>,
    ) -> Result<R, RelationshipError> {
        let writes = self.provider.mls_storage().snapshot();
        let record = self.record.clone();
        match step(self) {
            Ok(r) => Ok(r),
            Err(e) => {
                self.record = record;
                if self.provider.mls_storage().restore(writes) {
                    self.group = mls::load_group(&self.provider, self.group.group_id())?;
                }
                Err(e)
            }
        }
    }

    /// Moves the pending MLS writes of this batch into `changes`.
    pub fn drain_writes(&self, changes: &mut Changes) {
        changes
            .mls
            .extend(self.provider.mls_storage().take_writes());
    }

    /// Encrypts and queues a text message.
    pub fn send_text(
        &mut self,
        text: &str,
        node: &NodeAddrs,
        lifetimes: Lifetimes,
        now: u64,
        changes: &mut Changes,
    ) -> Result<HistoryEntry, RelationshipError> {
        validate_text(text)?;
        let store = self.provider.mls_storage().store();
        if let Some(into) = crate::merge::merged_into_live(store, self.record.id)? {
            return Err(RelationshipError::Retired(into));
        }
        let id = MessageId::random();
        let body = Body::Text {
            id,
            text: text.to_string(),
            sent_at: now,
        };
        self.isolated(|s| {
            s.send(
                body,
                node,
                lifetimes,
                now,
                OutboxKind::Text,
                Some(id),
                changes,
            )
        })?;
        let entry = HistoryEntry {
            id,
            author: Author::Me,
            text: text.to_string(),
            sent_at: now,
            stored_at: now,
            status: MessageStatus::Queued,
            pending: 1,
        };
        changes
            .history
            .push((Conversation::Proton(self.record.id), entry.clone()));
        Ok(entry)
    }

    /// Sends a control message (introduction, equivalence, decline).
    pub fn send_control(
        &mut self,
        body: Body,
        node: &NodeAddrs,
        lifetimes: Lifetimes,
        now: u64,
        changes: &mut Changes,
    ) -> Result<(), RelationshipError> {
        if self.record.state != ProtonState::Active {
            return Err(RelationshipError::NotActive);
        }
        self.isolated(|s| {
            s.send(
                body,
                node,
                lifetimes,
                now,
                OutboxKind::Control,
                None,
                changes,
            )
        })
    }

    /// Tells the peer our transports if they changed (new listen addresses,
    /// an ephemeral address due for rotation). Returns whether it sent.
    pub fn refresh_transports(
        &mut self,
        node: &NodeAddrs,
        lifetimes: Lifetimes,
        now: u64,
        changes: &mut Changes,
    ) -> Result<bool, RelationshipError> {
        if self.record.state != ProtonState::Active || !self.transports_due(node, lifetimes, now) {
            return Ok(false);
        }
        self.isolated(|s| {
            s.send(
                Body::Transports,
                node,
                lifetimes,
                now,
                OutboxKind::Control,
                None,
                changes,
            )
        })?;
        Ok(true)
    }

    fn transports_due(&self, node: &NodeAddrs, lifetimes: Lifetimes, now: u64) -> bool {
        self.record.transports_dirty
            || self.record.own_transports.iter().any(|t| {
                lease_due(&t.ephemeral, lifetimes.ephemeral, now)
                    || lease_due(&t.long_term, lifetimes.long_term, now)
                    || t.multiaddrs() != node.of_kind(t.kind)
            })
    }

    /// Rotates due addresses and follows our listen addresses; returns the
    /// new transports to piggyback, registering new addresses in `changes`.
    fn rotate_transports(
        &mut self,
        node: &NodeAddrs,
        lifetimes: Lifetimes,
        now: u64,
        changes: &mut Changes,
    ) -> Option<Vec<TransportInfo>> {
        if !self.transports_due(node, lifetimes, now) {
            return None;
        }
        let owner = Owner::Proton(self.record.id);
        let mut transports = self.record.own_transports.clone();
        for t in &mut transports {
            if lease_due(&t.ephemeral, lifetimes.ephemeral, now) {
                t.ephemeral = AddressLease::new(now, lifetimes.ephemeral);
            }
            if lease_due(&t.long_term, lifetimes.long_term, now) {
                t.long_term = AddressLease::new(now, lifetimes.long_term);
            }
            let addrs = node.of_kind(t.kind);
            if !addrs.is_empty() {
                *t = TransportInfo::new(
                    t.kind,
                    node.peer,
                    node.service_key,
                    &addrs,
                    t.long_term.clone(),
                    t.ephemeral.clone(),
                );
            }
        }
        // Old addresses stay registered until they expire: envelopes already
        // on their way to them are still accepted.
        changes.addresses.extend(address_rows(owner, &transports));
        self.record.own_transports = transports.clone();
        self.record.transports_dirty = false;
        changes.protons.push(self.record.clone());
        Some(transports)
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        body: Body,
        node: &NodeAddrs,
        lifetimes: Lifetimes,
        now: u64,
        kind: OutboxKind,
        message: Option<MessageId>,
        changes: &mut Changes,
    ) -> Result<(), RelationshipError> {
        match self.record.state {
            ProtonState::Active | ProtonState::Pending => {}
            ProtonState::Refused => return Err(RelationshipError::Refused),
        }
        let mut step = Changes::default();
        let transports = self.rotate_transports(node, lifetimes, now, &mut step);
        let plaintext = Plaintext { body, transports };
        let ciphertext = mls::encrypt(
            &mut self.group,
            &self.provider,
            &self.key,
            &plaintext.encode(),
        )?;
        step.outbox.push(OutboxEntry {
            conversation: Conversation::Proton(self.record.id),
            recipient: Recipient::Peer,
            kind,
            message,
            history: None,
            address: None,
            payload: Payload::Mls(ciphertext).encode(),
            created_at: now,
        });
        changes.extend(step);
        Ok(())
    }

    /// Decrypts and applies one envelope from the inbox. On failure the
    /// session is as before; the caller still marks the inbox row done.
    pub fn receive(
        &mut self,
        payload: &[u8],
        now: u64,
        changes: &mut Changes,
    ) -> Result<Received, RelationshipError> {
        // On failure nothing of it may reach the caller's changes either.
        let mut own = Changes::default();
        let received = self.isolated(|s| s.receive_inner(payload, now, &mut own))?;
        changes.extend(own);
        Ok(received)
    }

    fn receive_inner(
        &mut self,
        payload: &[u8],
        now: u64,
        changes: &mut Changes,
    ) -> Result<Received, RelationshipError> {
        let Payload::Mls(bytes) = Payload::decode(payload)? else {
            return Err(RelationshipError::Unexpected(
                "a Welcome sent to an existing relationship",
            ));
        };
        let (sender, bytes) = match mls::process(&mut self.group, &self.provider, &bytes)? {
            Incoming::Application { sender, bytes } => (sender, bytes),
            Incoming::Commit { .. } | Incoming::Proposal => {
                return Err(RelationshipError::Unexpected(
                    "a commit or proposal in a 1:1 relationship",
                ))
            }
        };
        let peer = self.record.peer_ipk;
        if sender != Some(peer) {
            return Err(RelationshipError::WrongSender);
        }
        let plaintext = Plaintext::decode(&bytes)?;
        if let Some(transports) = plaintext.transports {
            self.record.peer_transports = transports;
            changes.protons.push(self.record.clone());
        }
        // Anything from the peer proves our answer reached them.
        if self.record.state == ProtonState::Pending {
            self.record.state = ProtonState::Active;
            changes.protons.push(self.record.clone());
        }
        match plaintext.body {
            Body::Text { id, text, sent_at } => {
                let entry = HistoryEntry {
                    id,
                    author: Author::Peer(peer),
                    text,
                    sent_at,
                    stored_at: now,
                    status: MessageStatus::Received,
                    pending: 0,
                };
                changes
                    .history
                    .push((Conversation::Proton(self.record.id), entry.clone()));
                Ok(Received::Text(entry))
            }
            Body::Transports => Ok(Received::Transports),
            Body::Hello { .. } => Err(RelationshipError::Unexpected("a second Hello")),
            Body::Introduction(intro) => {
                let store = self.provider.mls_storage().store().clone();
                match crate::groups::accept_introduction(&store, &self.record, &intro, now) {
                    Ok((group, c)) => {
                        changes.extend(c);
                        Ok(Received::Joined(group.id))
                    }
                    Err(crate::groups::GroupError::AlreadyMember) => {
                        Ok(Received::AlreadyInGroup(intro.group_id.clone()))
                    }
                    Err(e) => Err(RelationshipError::Group(Box::new(e))),
                }
            }
            Body::MergeRequest(request) => {
                let store = self.provider.mls_storage().store();
                let (outcome, c) =
                    crate::merge::receive_request(store, &self.record, &request, now)?;
                changes.extend(c);
                Ok(Received::Merge(outcome))
            }
            Body::Equivalence { ref group_id, .. } | Body::Decline { ref group_id } => {
                // The group's business: hand it over in the same transaction.
                let store = self.provider.mls_storage().store();
                let group = crate::groups::find_by_group_id(store, group_id)?.ok_or(
                    RelationshipError::Unexpected("a message about a group we are not in"),
                )?;
                changes.inbox.push(InboxEntry {
                    owner: Owner::Group(group),
                    source: Source::Relationship(self.record.id),
                    context: None,
                    payload: Payload::Relayed(Box::new(plaintext.body)).encode(),
                    received_at: now,
                });
                Ok(Received::Relayed(group))
            }
            Body::MemberInfo(_) | Body::Leave { .. } | Body::Unread { .. } => Err(
                RelationshipError::Unexpected("a group message in a relationship"),
            ),
        }
    }
}

/// A lease is due for renewal when less than half its lifetime is left.
fn lease_due(lease: &AddressLease, lifetime: Duration, now: u64) -> bool {
    lease.valid_until.saturating_sub(now) < (lifetime.as_millis() as u64) / 2
}

/// Reads the peers of every live proton and of our groups' members, for
/// dialing at start-up.
pub fn known_peers(store: &Store) -> Result<BTreeMap<PeerId, Vec<Multiaddr>>, StoreError> {
    store.read(|tx| {
        let t = tx.open_table(tables::PROTONS)?;
        let mut peers = BTreeMap::new();
        for entry in t.iter()? {
            let (_, v) = entry?;
            let p: ProtonRecord = store::decode(v.value(), "proton")?;
            if p.state == ProtonState::Refused {
                continue;
            }
            add_peers(&mut peers, &p.peer_transports);
        }
        // Members of our groups we have no relationship with: their nodes
        // retry what waits for us once we are reachable again.
        let t = tx.open_table(tables::GROUPS)?;
        for entry in t.iter()? {
            let (_, v) = entry?;
            let g: crate::records::GroupProtonRecord = store::decode(v.value(), "group")?;
            if g.state == crate::records::GroupState::Gone {
                continue;
            }
            for m in g.members.iter() {
                add_peers(&mut peers, &m.transports);
            }
        }
        Ok(peers)
    })
}

fn add_peers(peers: &mut BTreeMap<PeerId, Vec<Multiaddr>>, transports: &[TransportInfo]) {
    for t in transports {
        if let Ok(peer) = t.peer_id() {
            let addrs = peers.entry(peer).or_default();
            for a in t.multiaddrs() {
                if !addrs.contains(&a) {
                    addrs.push(a);
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The 1:1 story with two stores and no network: the envelope that one
    //! side queues is handed to the other by hand.

    use super::*;

    pub(crate) struct Side {
        _dir: tempfile::TempDir,
        pub(crate) store: Store,
        pub(crate) node: NodeAddrs,
    }

    pub(crate) const LIFETIMES: Lifetimes = Lifetimes {
        ephemeral: Duration::from_secs(3600),
        long_term: Duration::from_secs(365 * 24 * 3600),
    };

    pub(crate) fn side() -> Side {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let node = NodeAddrs {
            peer: PeerId::random(),
            addrs: vec![
                "/ip4/127.0.0.1/tcp/4001".parse().unwrap(),
                "/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap(),
            ],
            service_key: crate::seal::SealKey::generate().public(),
        };
        Side {
            _dir: dir,
            store,
            node,
        }
    }

    fn display(name: &str) -> DisplayIdentity {
        DisplayIdentity {
            name: name.into(),
            pronouns: None,
            picture: None,
        }
    }

    pub(crate) fn commit(side: &Side, changes: Changes) -> crate::changes::Applied {
        side.store
            .write_blocking(move |tx| changes.apply(tx))
            .unwrap()
    }

    fn ticket_record(side: &Side, id: TicketId) -> TicketRecord {
        side.store
            .read(|tx| store::get(&tx.open_table(tables::TICKETS)?, id.0, "ticket"))
            .unwrap()
            .unwrap()
    }

    /// Alex invites, Blair accepts, Alex receives the answer.
    pub(crate) fn befriend(alex: &Side, blair: &Side) -> (ProtonId, ProtonId) {
        let invite = create_invite(
            &alex.store,
            &alex.node,
            display("Alex"),
            LIFETIMES,
            Duration::from_secs(60),
            None,
            1_000,
        )
        .unwrap();
        let ticket_id = invite.ticket.id;
        commit(alex, invite.changes);

        let acceptance = accept_invite(
            &blair.store,
            &blair.node,
            display("Blair"),
            LIFETIMES,
            &invite.text,
            None,
            2_000,
        )
        .unwrap();
        assert_eq!(acceptance.proton.peer_display.name, "Alex");
        let answer = acceptance.changes.outbox[0].clone();
        assert_eq!(answer.kind, OutboxKind::Welcome);
        let blair_id = acceptance.proton.id;
        commit(blair, acceptance.changes);

        let payload = Payload::decode(&answer.payload).unwrap();
        let (alex_proton, changes) = receive_welcome(
            &alex.store,
            &ticket_record(alex, ticket_id),
            &payload,
            0,
            3_000,
        )
        .unwrap();
        assert_eq!(alex_proton.peer_display.name, "Blair");
        commit(alex, changes);
        assert!(ticket_record(alex, ticket_id).used);
        (alex_proton.id, blair_id)
    }

    #[test]
    fn invite_accept_and_talk_both_ways() {
        let (alex, blair) = (side(), side());
        let (a_id, b_id) = befriend(&alex, &blair);

        let mut a = ProtonSession::load(&alex.store, a_id).unwrap();
        let mut b = ProtonSession::load(&blair.store, b_id).unwrap();
        exchange(&mut a, &alex, &mut b, &blair, "hi Blair");
        exchange(&mut b, &blair, &mut a, &alex, "hi Alex");
    }

    fn exchange(
        from: &mut ProtonSession,
        from_side: &Side,
        to: &mut ProtonSession,
        to_side: &Side,
        text: &str,
    ) {
        let mut changes = Changes::default();
        let sent = from
            .send_text(text, &from_side.node, LIFETIMES, 5_000, &mut changes)
            .unwrap();
        from.drain_writes(&mut changes);
        let payload = changes.outbox[0].payload.clone();
        commit(from_side, changes);

        let mut changes = Changes::default();
        let got = to.receive(&payload, 6_000, &mut changes).unwrap();
        to.drain_writes(&mut changes);
        commit(to_side, changes);
        match got {
            Received::Text(entry) => {
                assert_eq!(entry.text, text);
                assert_eq!(entry.id, sent.id, "both sides know the message by one id");
            }
            other => panic!("expected a text, got {other:?}"),
        }
    }

    #[test]
    fn a_ticket_works_once_and_not_after_expiry() {
        let (alex, blair) = (side(), side());
        let invite = create_invite(
            &alex.store,
            &alex.node,
            display("Alex"),
            LIFETIMES,
            Duration::from_secs(60),
            None,
            1_000,
        )
        .unwrap();
        commit(&alex, invite.changes);
        let first = accept_invite(
            &blair.store,
            &blair.node,
            display("Blair"),
            LIFETIMES,
            &invite.text,
            None,
            2_000,
        )
        .unwrap();
        let contact = first.proton.id;
        commit(&blair, first.changes);
        assert!(matches!(
            accept_invite(&blair.store, &blair.node, display("Blair"), LIFETIMES, &invite.text, None, 2_000),
            Err(RelationshipError::AlreadyAccepted { contact: c }) if c == contact
        ));
        let charlie = side();
        assert!(matches!(
            accept_invite(
                &charlie.store,
                &charlie.node,
                display("Charlie"),
                LIFETIMES,
                &invite.text,
                None,
                61_001
            ),
            Err(RelationshipError::Ticket(TicketError::Expired(_)))
        ));
        assert!(matches!(
            accept_invite(
                &alex.store,
                &alex.node,
                display("Alex"),
                LIFETIMES,
                &invite.text,
                None,
                2_000
            ),
            Err(RelationshipError::OwnTicket)
        ));
    }

    #[test]
    fn altered_or_damaged_tickets_are_refused() {
        let (alex, blair) = (side(), side());
        let invite = create_invite(
            &alex.store,
            &alex.node,
            display("Alex"),
            LIFETIMES,
            Duration::from_secs(60),
            None,
            1_000,
        )
        .unwrap();
        let accept = |text: &str| {
            accept_invite(
                &blair.store,
                &blair.node,
                display("Blair"),
                LIFETIMES,
                text,
                None,
                2_000,
            )
        };
        assert!(matches!(
            accept("hello"),
            Err(RelationshipError::Ticket(TicketError::NotATicket))
        ));
        let cut = &invite.text[..invite.text.len() - 10];
        assert!(matches!(
            accept(cut),
            Err(RelationshipError::Ticket(TicketError::Damaged(_)))
        ));
        // Flip one character in the middle: decoding or the signature fails.
        let mut chars: Vec<char> = invite.text.chars().collect();
        let mid = chars.len() / 2;
        chars[mid] = if chars[mid] == 'A' { 'B' } else { 'A' };
        let flipped: String = chars.into_iter().collect();
        assert!(matches!(
            accept(&flipped),
            Err(RelationshipError::Ticket(_))
        ));
    }

    #[test]
    fn a_replayed_or_forged_message_is_refused_and_changes_nothing() {
        let (alex, blair) = (side(), side());
        let (a_id, b_id) = befriend(&alex, &blair);
        let mut a = ProtonSession::load(&alex.store, a_id).unwrap();
        let mut b = ProtonSession::load(&blair.store, b_id).unwrap();

        let mut changes = Changes::default();
        a.send_text("once", &alex.node, LIFETIMES, 5_000, &mut changes)
            .unwrap();
        a.drain_writes(&mut changes);
        let payload = changes.outbox[0].payload.clone();
        commit(&alex, changes);

        let mut changes = Changes::default();
        b.receive(&payload, 6_000, &mut changes).unwrap();
        b.drain_writes(&mut changes);
        commit(&blair, changes);

        let mut changes = Changes::default();
        assert!(
            b.receive(&payload, 7_000, &mut changes).is_err(),
            "replay refused"
        );
        assert!(
            b.receive(b"\x01garbage", 7_000, &mut changes).is_err(),
            "garbage refused"
        );
        b.drain_writes(&mut changes);
        assert!(
            changes.is_empty(),
            "a refused message changes nothing: {changes:?}"
        );

        // The session still works after the refusals.
        let mut changes = Changes::default();
        a.send_text("twice", &alex.node, LIFETIMES, 8_000, &mut changes)
            .unwrap();
        a.drain_writes(&mut changes);
        let payload = changes.outbox[0].payload.clone();
        commit(&alex, changes);
        let mut changes = Changes::default();
        assert!(matches!(
            b.receive(&payload, 9_000, &mut changes),
            Ok(Received::Text(_))
        ));
    }

    #[test]
    fn transports_rotate_and_reach_the_peer() {
        let (alex, blair) = (side(), side());
        let (a_id, b_id) = befriend(&alex, &blair);
        let mut a = ProtonSession::load(&alex.store, a_id).unwrap();
        let mut b = ProtonSession::load(&blair.store, b_id).unwrap();
        let before = a.record().own_transports.clone();
        // Far in the future, the ephemeral addresses are due.
        let later = 3_000 + LIFETIMES.ephemeral.as_millis() as u64;
        let mut changes = Changes::default();
        assert!(a
            .refresh_transports(&alex.node, LIFETIMES, later, &mut changes)
            .unwrap());
        a.drain_writes(&mut changes);
        assert_ne!(a.record().own_transports[0].ephemeral, before[0].ephemeral);
        let payload = changes.outbox[0].payload.clone();
        commit(&alex, changes);
        let mut changes = Changes::default();
        assert_eq!(
            b.receive(&payload, later, &mut changes).unwrap(),
            Received::Transports
        );
        assert_eq!(b.record().peer_transports, a.record().own_transports);
    }

    #[test]
    fn a_receive_that_fails_part_way_leaves_exactly_the_state_before() {
        let (alex, blair) = (side(), side());
        let (a_id, b_id) = befriend(&alex, &blair);
        let mut a = ProtonSession::load(&alex.store, a_id).unwrap();
        let mut changes = Changes::default();
        a.send_text("survive me", &alex.node, LIFETIMES, 5_000, &mut changes)
            .unwrap();
        a.drain_writes(&mut changes);
        let payload = changes.outbox[0].payload.clone();
        commit(&alex, changes);

        let blair_db = blair._dir.path().join("db");
        let before = blair.store.digest().unwrap();
        {
            // Decrypt (the MLS ratchet moves), record the message, then the
            // transaction fails after every write of the operation was made.
            let mut b = ProtonSession::load(&blair.store, b_id).unwrap();
            let mut changes = Changes::default();
            b.receive(&payload, 6_000, &mut changes).unwrap();
            b.drain_writes(&mut changes);
            assert!(!changes.mls.is_empty() && !changes.history.is_empty());
            let failed = blair.store.write_blocking(move |tx| {
                changes.apply(tx)?;
                Err::<(), _>(StoreError::Worker(
                    "injected failure after all writes".into(),
                ))
            });
            assert!(failed.is_err());
        }
        // Reopen the file: exactly the state before.
        let Side { _dir, store, node } = blair;
        drop(store);
        let store = Store::open(&blair_db).unwrap();
        assert_eq!(
            store.digest().unwrap(),
            before,
            "nothing of the failed operation remains"
        );

        // The same ciphertext still decrypts (the ratchet did not move) ...
        let mut b = ProtonSession::load(&store, b_id).unwrap();
        let mut changes = Changes::default();
        assert!(matches!(
            b.receive(&payload, 7_000, &mut changes),
            Ok(Received::Text(_))
        ));
        b.drain_writes(&mut changes);
        store.write_blocking(move |tx| changes.apply(tx)).unwrap();
        // ... and once committed, the whole operation is there: the
        // message in the history and the ratchet moved on.
        let reopened = ProtonSession::load(&store, b_id).unwrap();
        let history = crate::manager::history(&store, Conversation::Proton(b_id)).unwrap();
        assert_eq!(history.len(), 1);
        assert_eq!(history[0].text, "survive me");
        let mut b = reopened;
        let mut changes = Changes::default();
        assert!(
            b.receive(&payload, 8_000, &mut changes).is_err(),
            "a replay after the commit is refused"
        );
        drop((node, _dir));
    }
}
