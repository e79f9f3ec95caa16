//! Groups and introductions (DESIGN.md sections 8.2 to 8.4 and 9), as plain
//! code: nothing here touches the network or writes to the store; every
//! operation returns the [`Changes`] its caller commits atomically.
//!
//! ```text
//!  introducer A                                  invitee B (C alike)
//!  create_group(via = [AB, AC])
//!   GP_A, placeholders GP_AB, GP_AC, MLS group,
//!   addresses for B, C derived from theirs ──▶ relays: Introduction inside AB / AC
//!                                               accept_introduction: joins as GP_AB
//!                                               (all three can talk at once)
//!                                               claim: GP_B, "GP_B ≡ P_BtoA" inside AB,
//!                                               commit "GP_B follows GP_AB" (AAD)
//!                                                   │ Payload::Commit
//!                         ordering service ◀────────┘ (a member: the creator's
//!                         node, or the next one by rank when it is unreachable)
//!                         accepts the first commit of an epoch, merges it,
//!                         fans it out signed: Payload::Ordered ──▶ every member
//! ```
//!
//! Every member keeps, for each other member, a status that says how far it
//! can trust that member's identity: a placeholder made by an introducer
//! (who may keep its key), claimed by a verified "follows" attestation,
//! linked to one of its own relationships by an equivalence attestation, or
//! verified out of band.

use openmls::prelude::{GroupId, MlsGroup};
use redb::ReadableTable;
use sha2::{Digest, Sha256};

use crate::attestation::{Attestation, AttestationError, Kind};
use crate::changes::{Changes, StatusChange};
use crate::identity::{IdentityKey, Ipk, SecretKey, SIGNATURE_LEN};
use crate::mls::{self, Incoming, MlsError, Provider};
use crate::model::{
    validate_text, AddressLease, Conversation, DisplayIdentity, GroupProtonId, InvalidValue,
    MessageId, TransportInfo,
};
use crate::protocol::{
    self, Accepted, Body, DecodeError, Introduction, MemberInfo, Payload, Plaintext, ViewStep,
};
use crate::records::{
    AcceptedCommit, AddressKind, AddressRecord, Author, GroupProtonRecord, GroupState,
    HistoryEntry, Intent, Invitee, Member, MemberStatus, MessageStatus, OutboxEntry, OutboxKind,
    Owner, PendingCommit, ProtonRecord, Recipient, Relay,
};
use crate::relationship::{make_transports, Lifetimes, NodeAddrs, RelationshipError};
use crate::seal::{self, SealKey};
use crate::store::{self, tables, Store, StoreError};

const ORDERED_LABEL: &[u8] = b"protonode/v1/ordered-commit";
const PROPOSE_LABEL: &[u8] = b"protonode/v1/proposed-commit";
const VIEW_LABEL: &[u8] = b"protonode/v1/ordering-view";
/// How often the ordering service asks again the members that have not
/// answered its sync or its proposal (ms).
const ASK_AGAIN_MS: u64 = 2_000;
const SIDE_INFO: &[u8] = b"protonode/v1/side-invitation";
const SIDE_LABEL: &[u8] = b"protonode/v1/side-invitation/signature";
/// Removed members kept reachable for the commit that removed them.
const FORMER_KEPT: usize = 32;

/// What failed in a group operation.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("the group {0} does not exist")]
    Unknown(GroupProtonId),
    #[error("you are already in this group")]
    AlreadyMember,
    #[error("{0} is already in this group (or on the way in)")]
    AlreadyInGroup(String),
    #[error("the introduction is not valid: {0}")]
    BadIntroduction(String),
    #[error("this group is pending: claim it (or decline it) first")]
    NotClaimed,
    #[error("an addition you asked for is on its way: leave once the group has ordered it (`protonode groups` shows it), then remove the placeholder or wait for its claim")]
    AddingBeforeLeaving,
    #[error("your claim of this group is on its way: wait until the group has ordered it (`protonode claim GROUP --wait` waits for it); then `protonode group leave` leaves it")]
    ClaimPending,
    #[error("you already claimed this group; `protonode group leave` leaves it")]
    ClaimedNotDeclinable,
    #[error("you made this group: there is no introduction to claim or decline")]
    OwnGroup,
    #[error("you are no longer in this group")]
    Gone,
    #[error("{name}'s node still votes for {placeholders} (not claimed yet), and without it the others are no majority: the group could order nothing again, their claims included; remove them first, or wait until they claim (`protonode groups` shows it)")]
    SpeaksForPlaceholders { name: String, placeholders: String },
    #[error("your node still votes for {0} (not claimed yet), and without it the others are no majority: the group could order nothing again, their claims included; remove them first (`protonode group remove`), or wait until they claim")]
    LeavingPlaceholders(String),
    #[error("no member matches {0:?}")]
    UnknownMember(String),
    #[error("{0} has just claimed their place, under a new key; run the command again")]
    JustClaimed(String),
    #[error("you already have a relationship with this member: contact {0}")]
    AlreadyConnected(crate::model::ProtonId),
    #[error("{name} is still a placeholder that {asserted_by}: {action} once {name} has claimed it, which `protonode groups` shows")]
    PlaceholderMember {
        name: String,
        /// Who asserts it and holds its key, as a phrase ("Alex asserts
        /// (and holds the key of)", "you assert (and hold the key of)").
        asserted_by: String,
        /// What waits for the claim ("connect", "verify").
        action: &'static str,
    },
    #[error(
        "{0}'s node has not told the group how to reach it privately yet; try again in a moment"
    )]
    NoDirectKey(String),
    #[error("the sender is not a member of the group (removed or never added)")]
    NotAMember,
    /// From a key this node has never seen in the group: a member whose
    /// claim (or addition) has not reached us yet, as far as we can tell.
    /// Kept for [`HOLD_UNKNOWN_SENDER_MS`], retried after every commit.
    #[error("the sender is not a member of the group as far as this node knows yet")]
    NotYetAMember,
    /// From a member whose removal this node applied lately: what it sent
    /// before it learnt (a vote, a request), now moot.
    #[error("the sender was removed from the group a moment ago")]
    RemovedLately,
    #[error("this node is not the group's ordering service")]
    NotOrderer,
    #[error("the commit is for epoch {got}, the group is at epoch {at}")]
    WrongEpoch { got: u64, at: u64 },
    #[error("the message is for a later epoch; kept until the group gets there")]
    Deferred,
    #[error("the ordering signature does not verify")]
    BadOrdering,
    #[error("the claim's attestation is invalid: {0}")]
    BadClaim(AttestationError),
    #[error("the attestation is invalid: {0}")]
    Attestation(#[from] AttestationError),
    #[error("{0} has no address we can derive a group address from (an older node?)")]
    NoDerivableAddress(String),
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    #[error("{0}")]
    Invalid(#[from] InvalidValue),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Mls(#[from] MlsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Relationship(#[from] RelationshipError),
}

impl From<seal::SealError> for GroupError {
    fn from(e: seal::SealError) -> Self {
        GroupError::BadIntroduction(e.to_string())
    }
}

/// The context that binds derived addresses to one group.
pub fn context_of(group_id: &[u8]) -> [u8; 16] {
    let digest = Sha256::new()
        .chain_update(b"protonode/v1/group-context")
        .chain_update(group_id)
        .finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// The transports of a relationship's peer, with addresses derived from its
/// long-term ones for this group: how the group reaches that person's
/// placeholder before they answer, resolvable only by their node.
///
/// One address per service key (per node), shared by that node's
/// transports: it resolves to one of the relationship's long-term
/// addresses, and any of them leads to the same relationship. A seal costs
/// two X25519 operations, the most of an introduction's work per invitee
/// after its key package.
fn derived_transports(
    peer: &ProtonRecord,
    context: &[u8; 16],
) -> Result<Vec<TransportInfo>, GroupError> {
    let mut out = Vec::new();
    let mut made: Vec<([u8; 32], AddressLease)> = Vec::new();
    for t in &peer.peer_transports {
        let (Some(base), Some(key)) = (t.long_term.plain(), t.service_key) else {
            continue;
        };
        let lease = match made.iter().find(|(k, _)| *k == key) {
            Some((_, lease)) => lease.clone(),
            None => {
                let lease = AddressLease {
                    address: seal::derive_address(&key, &base, context)?.into(),
                    valid_until: t.long_term.valid_until,
                };
                made.push((key, lease.clone()));
                lease
            }
        };
        let mut derived = t.clone();
        derived.long_term = lease.clone();
        derived.ephemeral = lease;
        out.push(derived);
    }
    if out.is_empty() {
        return Err(GroupError::NoDerivableAddress(
            peer.peer_display.name.clone(),
        ));
    }
    Ok(out)
}

/// The address rows of our own transports in a group.
fn own_address_rows(
    id: GroupProtonId,
    transports: &[TransportInfo],
) -> Vec<(transports::DeliveryAddress, AddressRecord)> {
    transports
        .iter()
        .flat_map(|t| {
            [
                (&t.long_term, AddressKind::LongTerm),
                (&t.ephemeral, AddressKind::Ephemeral),
            ]
        })
        .filter_map(|(lease, kind)| {
            Some((
                lease.plain()?,
                AddressRecord {
                    owner: Owner::Group(id),
                    kind,
                    valid_until: lease.valid_until,
                    used_by: None,
                },
            ))
        })
        .collect()
}

/// Placeholders for the peers of `via`, made in a scratch namespace that is
/// never committed: an honest introducer keeps none of their keys.
fn make_invitees(
    store: &Store,
    via: &[ProtonRecord],
    introducer: Ipk,
    context: &[u8; 16],
) -> Result<(Vec<Invitee>, Vec<openmls::prelude::KeyPackage>), GroupError> {
    let scratch = Provider::new(store.clone(), rand::random());
    let mut invitees = Vec::new();
    let mut packages = Vec::new();
    for proton in via {
        let key = IdentityKey::generate();
        let (kp, bundle) = mls::placeholder_key_package(&scratch, &key)?;
        invitees.push(Invitee {
            via: proton.id,
            placeholder: SecretKey::from(&key),
            bundle,
            member: Member {
                ipk: key.ipk(),
                display: proton.peer_display.clone(),
                transports: derived_transports(proton, context)?,
                status: MemberStatus::Placeholder {
                    asserted_by: introducer,
                },
                introduced_by: Some(introducer),
                direct_key: None,
                via: Some(proton.id),
                claim: None,
            },
        });
        packages.push(kp);
    }
    scratch.mls_storage().discard_writes();
    Ok((invitees, packages))
}

fn member_info(m: &Member) -> MemberInfo {
    MemberInfo {
        ipk: m.ipk,
        display: m.display.clone(),
        transports: m.transports.clone(),
        direct_key: m.direct_key,
        placeholder_of: match m.status {
            MemberStatus::Placeholder { asserted_by } => Some(asserted_by),
            _ => None,
        },
        claim: m.claim.clone(),
    }
}

/// The introductions of `invitees` into a group we are in (`record`, under
/// `key`), each to go inside its relationship.
fn introductions(
    record: &GroupProtonRecord,
    key: &IdentityKey,
    via: &[ProtonRecord],
    invitees: &[Invitee],
    welcome: &[u8],
    now: u64,
) -> Result<Vec<Relay>, GroupError> {
    let me = MemberInfo {
        ipk: key.ipk(),
        display: record.own_display.clone(),
        transports: record.own_transports.clone(),
        direct_key: Some(SealKey::from_seed(record.direct_seed).public()),
        placeholder_of: None,
        claim: None,
    };
    let mut out = Vec::new();
    for invitee in invitees {
        let proton = via
            .iter()
            .find(|p| p.id == invitee.via)
            .ok_or(GroupError::Unexpected(
                "an invitee without its relationship",
            ))?;
        let members = record
            .members
            .iter()
            .filter(|m| m.ipk != invitee.member.ipk)
            .map(member_info)
            .collect();
        out.push(Relay {
            id: rand::random(),
            via: proton.id,
            body: Body::Introduction(Box::new(Introduction {
                group_id: record.group_id.clone(),
                name: record.name.clone(),
                welcome: welcome.to_vec(),
                placeholder_key: invitee.placeholder.clone(),
                placeholder_bundle: invitee.bundle.clone(),
                introducer: me.clone(),
                equivalence: Attestation::equivalent(key, &proton.own_key.key(), now),
                members,
                your_transports: invitee.member.transports.clone(),
                orderer_rank: record.orderer_rank,
            })),
        });
    }
    Ok(out)
}

/// A new group of ours with placeholders for the peers of `via`: the
/// seed's introduction when `via` holds two relationships.
pub fn create_group(
    store: &Store,
    node: &NodeAddrs,
    display: DisplayIdentity,
    lifetimes: Lifetimes,
    via: &[ProtonRecord],
    name: Option<String>,
    now: u64,
) -> Result<(GroupProtonRecord, Changes), GroupError> {
    // "  Book club " is found as "Book club": store what is found.
    let name = name.map(|n| n.trim().to_string());
    if let Some(name) = &name {
        protocol::validate_group_name(name)?;
    }
    let id = GroupProtonId::random();
    let key = IdentityKey::generate();
    let provider = Provider::new(store.clone(), id.0);
    let mut group = mls::create_group(&provider, &key)?;
    let group_id = group.group_id().as_slice().to_vec();
    let context = context_of(&group_id);
    let (invitees, packages) = make_invitees(store, via, key.ipk(), &context)?;
    let (_commit, welcome) = mls::stage_add(&mut group, &provider, &key, &packages, Vec::new())?;
    // We are the only member and the ordering service: nothing to order.
    mls::merge_pending(&mut group, &provider)?;
    let own_transports = make_transports(node, lifetimes, now)?;
    let mut record = GroupProtonRecord {
        id,
        created_at: now,
        name,
        group_id,
        context,
        state: GroupState::Active,
        own_key: SecretKey::from(&key),
        own_display: display,
        own_transports: own_transports.clone(),
        direct_seed: SealKey::generate().seed(),
        introduced: None,
        members: std::sync::Arc::new(invitees.iter().map(|i| i.member.clone()).collect()),
        orderer_rank: 0,
        synced_rank: 0,
        accepted: None,
        left: Vec::new(),
        pending: None,
        intents: Vec::new(),
        pending_links: Vec::new(),
        relays: Vec::new(),
        former: Vec::new(),
        epoch: 0,
        authenticator: Vec::new(),
    };
    record.relays = introductions(&record, &key, via, &invitees, &welcome, now)?;
    record.epoch = group.epoch().as_u64();
    record.authenticator = mls::epoch_authenticator(&group);
    let mut changes = Changes {
        mls: provider.mls_storage().take_writes(),
        ..Changes::default()
    };
    changes.addresses = own_address_rows(id, &own_transports);
    changes.groups.push(record.clone());
    Ok((record, changes))
}

/// Makes `record` the group record that `changes` writes.
pub fn replace_record(changes: &mut Changes, record: &GroupProtonRecord) {
    changes.groups.retain(|g| g.id != record.id);
    changes.groups.push(record.clone());
}

/// The invitee's side: an introduction arrived inside our relationship
/// `proton`. Verifies the introducer's equivalence, joins the group as the
/// placeholder, and routes the group's derived addresses to it.
pub fn accept_introduction(
    store: &Store,
    proton: &ProtonRecord,
    intro: &Introduction,
    now: u64,
) -> Result<(GroupProtonRecord, Changes), GroupError> {
    if find_by_group_id(store, &intro.group_id)?.is_some() {
        return Err(GroupError::AlreadyMember);
    }
    intro
        .equivalence
        .verify_as(Kind::Equivalent, &intro.introducer.ipk, &proton.peer_ipk)
        .map_err(|e| GroupError::BadIntroduction(format!("the introducer's equivalence: {e}")))?;
    let placeholder = intro.placeholder_key.key();
    let id = GroupProtonId::random();
    let provider = Provider::new(store.clone(), id.0);
    mls::install_placeholder(&provider, &intro.placeholder_bundle, &placeholder.ipk())?;
    let group = mls::join_from_welcome(&provider, &intro.welcome)?;
    if group.group_id().as_slice() != intro.group_id.as_slice() {
        return Err(GroupError::BadIntroduction(
            "the Welcome is for another group".into(),
        ));
    }
    let roster = mls::member_ipks(&group);
    if !roster.contains(&placeholder.ipk()) || !roster.contains(&intro.introducer.ipk) {
        return Err(GroupError::BadIntroduction(
            "the group does not hold the introducer and our placeholder".into(),
        ));
    }
    let introducer = intro.introducer.ipk;
    let mut members = vec![Member {
        ipk: introducer,
        display: intro.introducer.display.clone(),
        transports: intro.introducer.transports.clone(),
        status: MemberStatus::Linked { proton: proton.id },
        introduced_by: None,
        direct_key: intro.introducer.direct_key,
        via: None,
        claim: None,
    }];
    for info in &intro.members {
        if info.ipk == placeholder.ipk() || info.ipk == introducer || !roster.contains(&info.ipk) {
            continue;
        }
        members.push(member_from_info(info, introducer));
    }
    let context = context_of(&intro.group_id);
    let mut record = GroupProtonRecord {
        id,
        created_at: now,
        name: intro.name.clone(),
        group_id: intro.group_id.clone(),
        context,
        state: GroupState::Invited,
        own_key: intro.placeholder_key.clone(),
        own_display: proton.own_display.clone(),
        own_transports: intro.your_transports.clone(),
        direct_seed: SealKey::generate().seed(),
        introduced: Some((proton.id, introducer)),
        members: members.into(),
        orderer_rank: intro.orderer_rank,
        synced_rank: 0,
        accepted: None,
        left: Vec::new(),
        pending: None,
        intents: Vec::new(),
        pending_links: Vec::new(),
        relays: Vec::new(),
        former: Vec::new(),
        epoch: 0,
        authenticator: Vec::new(),
    };
    record.epoch = group.epoch().as_u64();
    record.authenticator = mls::epoch_authenticator(&group);
    let mut changes = Changes {
        mls: provider.mls_storage().take_writes(),
        ..Changes::default()
    };
    changes.routes.push((proton.id, context, id));
    changes.groups.push(record.clone());
    Ok((record, changes))
}

/// A member as another member describes it: claimed if its claim
/// attestation verifies from a placeholder, a placeholder if the describer
/// says someone made it as one, else vouched for by the describer (a
/// group's creator, say, has no claim and was never a placeholder).
fn member_from_info(info: &MemberInfo, describer: Ipk) -> Member {
    let claimed = info.claim.as_ref().and_then(|a| {
        (a.kind == Kind::Follows && a.second == info.ipk && a.verify().is_ok()).then_some(a.first)
    });
    let status = match (claimed, info.placeholder_of) {
        (Some(placeholder), _) => MemberStatus::Claimed { placeholder },
        (None, Some(asserted_by)) => MemberStatus::Placeholder { asserted_by },
        (None, None) => MemberStatus::Vouched { by: describer },
    };
    Member {
        ipk: info.ipk,
        display: info.display.clone(),
        transports: info.transports.clone(),
        status,
        introduced_by: Some(info.placeholder_of.unwrap_or(describer)),
        direct_key: info.direct_key,
        via: None,
        claim: info.claim.clone(),
    }
}

/// What processing one inbox row did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    Text(HistoryEntry),
    /// A commit was merged: the roster or keys changed.
    Committed,
    /// A member invites us to a side relationship: its verified ticket,
    /// and the member's attestation that the ticket's key is equivalent
    /// to its key in the group (kept in our trust record of the contact).
    SideInvitation {
        ticket: String,
        from: Ipk,
        equivalence: Box<Attestation>,
    },
    /// Anything else that changed no history.
    Other,
}

/// One group proton's live state.
pub struct GroupSession {
    record: GroupProtonRecord,
    key: IdentityKey,
    group: MlsGroup,
    provider: Provider,
    /// When we last asked for missed commits (ms); not stored.
    last_catch_up: u64,
    /// As the ordering service: the sync under way before we order.
    sync: Option<SyncRound>,
    /// As the ordering service: the commit we proposed, not yet accepted
    /// by a majority.
    proposal: Option<Proposal>,
    /// As the ordering service holding a majority alone: a member's commit
    /// processed and checked once, merged when it is ordered a moment
    /// later (in the same step) instead of processed a second time; with
    /// the claim it proved, if it is one (checked once too).
    checked: Option<(Vec<u8>, Incoming, Option<Attestation>)>,
    /// The members' IPKs at one epoch (its number and authenticator), in
    /// leaf order: membership changes only with a commit, which starts a
    /// new epoch, and reading it from openmls costs a clone and a parse per
    /// member, on every message.
    roster: std::cell::RefCell<Option<Roster>>,
    /// Members removed by the commits applied since the last
    /// [`take_departures`](Self::take_departures), each with who removed
    /// them (`None`: they asked to leave). Not stored: it only tells
    /// `watch` what happened.
    departures: Vec<(Ipk, Option<Ipk>)>,
    /// Members whose commits since the last
    /// [`take_updates`](Self::take_updates) only rotated their keys (ours
    /// too). Not stored: it only tells `watch` who did.
    updates: Vec<Ipk>,
    /// Members removed by commits this session applied, and when: their
    /// texts written before the removal are still taken for a while (see
    /// [`REMOVED_GRACE_MS`]). Not stored: after a restart such late texts
    /// are refused, as any from a former member.
    removed_lately: Vec<(Ipk, u64)>,
    /// Which member besides the ordering node the next catch-up request
    /// goes to (see [`request_catch_up`](Self::request_catch_up)).
    catch_up_turn: usize,
    /// Placeholders whose invitees declined (we introduced them and heard
    /// their decline in this session): `watch` says so when their removal
    /// is applied, rather than "declined, or withdrawn".
    declined: Vec<Ipk>,
    /// What a text written at an older epoch than the one it is read at
    /// needs (see [`Body::Unread`]), for the commits this session applied
    /// and the texts it sent; not stored, so best effort across restarts.
    late: LateTexts,
}

/// How many entries each list of [`LateTexts`] keeps.
const LATE_KEPT: usize = 256;

/// A member's text is written for the group as its node knows it. A node
/// that was down (or cut off) while someone joined, and writes before it
/// has caught up, writes for the group without them: the members who
/// joined meanwhile cannot read it, though it was written after they
/// joined. The ordering node, which reads each text at the epoch the group
/// has reached, tells the author when that is later than the one it was
/// written in ([`Body::Unread`]), and the author, once caught up, sends it
/// to those who joined in between. So the ordering node's order of commits
/// and texts decides, as a delivery service's would: a text it reads
/// after someone's joining reaches them.
#[derive(Debug, Default)]
struct LateTexts {
    /// Members who joined by the commits applied, each with the epoch the
    /// commit began (a claimer with its placeholder's: the placeholder's
    /// holder read what was written for it).
    joins: Vec<(Ipk, u64)>,
    /// The epoch the session was loaded at: joins before it are unknown.
    since: u64,
    /// Our texts, with the epoch each was written in.
    sent: Vec<(MessageId, u64)>,
    /// Texts we sent again, and to whom.
    resent: Vec<(MessageId, Ipk)>,
}

impl LateTexts {
    fn keep<T>(list: &mut Vec<T>, item: T) {
        if list.len() >= LATE_KEPT {
            list.remove(0);
        }
        list.push(item);
    }

    /// Whether members may have joined after `written` (by the epoch we
    /// are at): some did, not counting `except`, or we cannot tell.
    fn joined_after(&self, written: u64, except: Ipk, members: &[Member]) -> bool {
        written < self.since
            || self
                .joins
                .iter()
                .any(|(m, at)| *at > written && *m != except && members.iter().any(|x| x.ipk == *m))
    }

    /// The members who joined after `written`, by `read`, that `message`
    /// was not sent to again yet.
    fn owed(&self, message: MessageId, written: u64, read: u64, members: &[Member]) -> Vec<Ipk> {
        let mut out: Vec<Ipk> = Vec::new();
        for (m, at) in &self.joins {
            if *at > written
                && *at <= read
                && members.iter().any(|x| x.ipk == *m)
                && !self.resent.contains(&(message, *m))
                && !out.contains(m)
            {
                out.push(*m);
            }
        }
        out
    }
}

/// The members at one epoch, told apart by its number and authenticator.
struct Roster {
    epoch: u64,
    authenticator: Vec<u8>,
    ipks: Vec<Ipk>,
}

/// A [`Payload::View`], its signature apart.
struct ViewMessage {
    step: ViewStep,
    rank: u32,
    epoch: u64,
    from: Ipk,
    accepted: Option<Accepted>,
    digest: [u8; 32],
}

/// A sync of the ordering service at `rank` (see [`ViewStep`]).
struct SyncRound {
    rank: u32,
    /// When we last sent `Sync` to those that have not answered.
    asked: u64,
    /// Members that promised.
    promised: Vec<Ipk>,
    /// The highest epoch a member that promised was at: we order only once
    /// we are there too (it sent us the commits we lacked).
    highest: u64,
    /// What they had accepted: (epoch, rank, commit).
    accepted: Vec<(u64, u32, Vec<u8>)>,
}

/// A commit we proposed as the ordering service.
struct Proposal {
    epoch: u64,
    commit: Vec<u8>,
    digest: [u8; 32],
    /// Members that accepted it (we count too).
    acks: Vec<Ipk>,
    /// When we last sent it to those that have not accepted it.
    asked: u64,
}

impl GroupSession {
    pub fn load(store: &Store, id: GroupProtonId) -> Result<Self, GroupError> {
        let record: GroupProtonRecord = store
            .read(|tx| store::get(&tx.open_table(tables::GROUPS)?, id.0, "group"))?
            .ok_or(GroupError::Unknown(id))?;
        let provider = Provider::new(store.clone(), id.0);
        let group = mls::load_group(&provider, &GroupId::from_slice(&record.group_id))?;
        let epoch = group.epoch().as_u64();
        Ok(Self {
            key: record.own_key.key(),
            record,
            group,
            provider,
            last_catch_up: 0,
            sync: None,
            proposal: None,
            checked: None,
            roster: std::cell::RefCell::new(None),
            departures: Vec::new(),
            updates: Vec::new(),
            removed_lately: Vec::new(),
            declined: Vec::new(),
            catch_up_turn: 0,
            late: LateTexts {
                since: epoch,
                ..LateTexts::default()
            },
        })
    }

    pub fn record(&self) -> &GroupProtonRecord {
        &self.record
    }

    pub fn id(&self) -> GroupProtonId {
        self.record.id
    }

    pub fn epoch(&self) -> u64 {
        self.group.epoch().as_u64()
    }

    pub fn epoch_authenticator(&self) -> Vec<u8> {
        mls::epoch_authenticator(&self.group)
    }

    pub fn own_ipk(&self) -> Ipk {
        self.key.ipk()
    }

    /// Our group key (a side relationship links to it).
    pub fn key(&self) -> &IdentityKey {
        &self.key
    }

    /// Moves the pending MLS writes into `changes`, with the record.
    pub fn drain_writes(&self, changes: &mut Changes) {
        changes
            .mls
            .extend(self.provider.mls_storage().take_writes());
    }

    /// The record as it is now, for the caller to store.
    fn save(&mut self, changes: &mut Changes) {
        self.record.epoch = self.epoch();
        self.record.authenticator = self.epoch_authenticator();
        changes.groups.retain(|g| g.id != self.record.id);
        changes.groups.push(self.record.clone());
        // Gone: what comes to our derived address from now on waits for a
        // new introduction into the group (say, after being added again:
        // the address is the same), rather than reaching this membership,
        // which drops it.
        if let (GroupState::Gone, Some((via, _))) = (self.record.state, self.record.introduced) {
            let route = (via, self.record.context, self.record.id);
            if !changes.delete_routes.contains(&route) {
                changes.delete_routes.push(route);
            }
        }
    }

    /// Runs one step so that its failure leaves the session as before it
    /// (see `ProtonSession::isolated`).
    fn isolated<R>(
        &mut self,
        changes: &mut Changes,
        step: impl FnOnce(&mut Self, &mut Changes) -> Result<R, GroupError>,
    ) -> Result<R, GroupError> {
        let writes = self.provider.mls_storage().snapshot();
        let record = self.record.clone();
        let mut scratch = Changes::default();
        match step(self, &mut scratch) {
            Ok(r) => {
                changes.extend(scratch);
                Ok(r)
            }
            Err(e) => {
                self.checked = None;
                self.record = record;
                self.key = self.record.own_key.key();
                if self.provider.mls_storage().restore(writes) {
                    self.group = mls::load_group(&self.provider, self.group.group_id())?;
                }
                Err(e)
            }
        }
    }

    /// Every member's group IPK (ours too), in leaf order.
    pub fn roster(&self) -> Vec<Ipk> {
        self.with_roster(<[Ipk]>::to_vec)
    }

    /// Whether `ipk` is a member at the current epoch.
    pub fn is_member(&self, ipk: &Ipk) -> bool {
        self.with_roster(|roster| roster.contains(ipk))
    }

    fn with_roster<R>(&self, f: impl FnOnce(&[Ipk]) -> R) -> R {
        let epoch = self.group.epoch().as_u64();
        let authenticator = self.group.epoch_authenticator();
        let mut cached = self.roster.borrow_mut();
        match &*cached {
            Some(r) if r.epoch == epoch && r.authenticator == authenticator.as_slice() => {
                f(&r.ipks)
            }
            _ => {
                let ipks = mls::member_ipks(&self.group);
                let answer = f(&ipks);
                *cached = Some(Roster {
                    epoch,
                    authenticator: authenticator.as_slice().to_vec(),
                    ipks,
                });
                answer
            }
        }
    }

    /// The ordering service at a rank: the member at that position (modulo
    /// the size of the group) in leaf order, so every member computes the
    /// same one from the same epoch.
    pub fn orderer_at(&self, rank: u32) -> Option<Ipk> {
        let roster = self.roster();
        if roster.is_empty() {
            return None;
        }
        roster.get(rank as usize % roster.len()).copied()
    }

    pub fn orderer(&self) -> Option<Ipk> {
        self.orderer_at(self.record.orderer_rank)
    }

    /// Whether we order now. Not while we hold a placeholder: its vote is
    /// its introducer's until we claim it (see [`GroupSession::votes_of`]),
    /// so the next rank orders instead.
    pub fn is_orderer(&self) -> bool {
        self.record.state == GroupState::Active && self.orderer() == Some(self.key.ipk())
    }

    /// The roster members whose votes `voter`'s node casts when it accepts
    /// or promises: its own, and those of the placeholders it introduced
    /// that are still unclaimed. A placeholder's invitee votes only once it
    /// has claimed, under its own key, so every member of the roster has
    /// exactly one node voting for it (what Paxos needs), and a group just
    /// made by an introduction orders at once, its invitees offline or not.
    fn votes_of(&self, voter: Ipk, roster: &[Ipk]) -> Vec<Ipk> {
        let introduced = self.record.members.iter().filter(|m| {
            matches!(m.status, MemberStatus::Placeholder { asserted_by } if asserted_by == voter && m.ipk != voter)
        });
        std::iter::once(voter)
            .chain(introduced.map(|m| m.ipk))
            .filter(|i| roster.contains(i))
            .collect()
    }

    /// Whether the ordering service at our rank is a placeholder not yet
    /// claimed, which nobody orders for: its invitee's node orders only
    /// under its own key, once it has claimed, and its introducer only for
    /// its own rank. Waiting out the ordering timeout for it would only
    /// stall the group; the next rank takes over at once. (A member we know
    /// only from the roster, whose description has not come yet, may be
    /// someone who orders, so for it the timeout holds.)
    fn orderer_is_placeholder(&self) -> bool {
        let Some(orderer) = self.orderer() else {
            return false;
        };
        if orderer == self.key.ipk() {
            return self.record.state == GroupState::Invited;
        }
        self.record.members.iter().any(|m| {
            m.ipk == orderer
                && matches!(m.status, MemberStatus::Placeholder { asserted_by } if asserted_by != orderer)
        })
    }

    /// Whether the current ordering service's node casts a majority of the
    /// votes by itself (and has not left), as an introducer does until its
    /// placeholders are claimed: then no other could order without it.
    fn orderer_holds_majority(&self) -> bool {
        let Some(orderer) = self.orderer() else {
            return false;
        };
        if self.record.left.iter().any(|(i, _)| *i == orderer) {
            return false;
        }
        let roster = self.roster();
        self.votes_of(orderer, &roster).len() * 2 > roster.len()
    }

    /// Whether `voters` (those that accepted, or promised), we, and the
    /// members that left (they accept everything) are a majority of votes.
    fn is_majority(&self, voters: &[Ipk]) -> bool {
        let roster = self.roster();
        let left = self.record.left.iter().map(|(i, _)| *i);
        let mut votes: Vec<Ipk> = voters
            .iter()
            .copied()
            .chain(std::iter::once(self.key.ipk()))
            .chain(left)
            .flat_map(|v| self.votes_of(v, &roster))
            .collect();
        votes.sort_unstable_by_key(|i| *i.as_bytes());
        votes.dedup();
        votes.len() * 2 > roster.len()
    }

    /// One outbox row per other member (or one member), same payload.
    fn fan_out(
        &self,
        payload: &[u8],
        kind: OutboxKind,
        message: Option<MessageId>,
        only: Option<Ipk>,
        changes: &mut Changes,
        now: u64,
    ) -> u32 {
        let mut count = 0;
        for m in self.record.members.iter() {
            if only.is_some_and(|o| o != m.ipk) {
                continue;
            }
            changes.outbox.push(OutboxEntry {
                conversation: Conversation::Group(self.record.id),
                recipient: Recipient::Member(m.ipk),
                kind,
                message,
                history: None,
                address: None,
                payload: payload.to_vec(),
                created_at: now,
            });
            count += 1;
        }
        count
    }

    /// Encrypts `body` for the group.
    fn encrypt(&mut self, body: Body) -> Result<Vec<u8>, GroupError> {
        let plaintext = Plaintext {
            body,
            transports: None,
        };
        let ciphertext = mls::encrypt(
            &mut self.group,
            &self.provider,
            &self.key,
            &plaintext.encode(),
        )?;
        Ok(Payload::Mls(ciphertext).encode())
    }

    /// Sends a text to every member.
    pub fn send_text(
        &mut self,
        text: &str,
        now: u64,
        changes: &mut Changes,
    ) -> Result<HistoryEntry, GroupError> {
        validate_text(text)?;
        if self.record.state == GroupState::Gone {
            return Err(GroupError::Gone);
        }
        let id = MessageId::random();
        let written = self.epoch();
        let sent = self.isolated(changes, |s, changes| {
            let payload = s.encrypt(Body::Text {
                id,
                text: text.to_string(),
                sent_at: now,
            })?;
            let pending = s.fan_out(
                &payload,
                OutboxKind::GroupText,
                Some(id),
                None,
                changes,
                now,
            );
            let entry = HistoryEntry {
                id,
                author: Author::Me,
                text: text.to_string(),
                sent_at: now,
                stored_at: now,
                // With nobody else in the group, nothing waits.
                status: if pending == 0 {
                    MessageStatus::Delivered
                } else {
                    MessageStatus::Queued
                },
                pending,
            };
            changes
                .history
                .push((Conversation::Group(s.record.id), entry.clone()));
            Ok(entry)
        })?;
        LateTexts::keep(&mut self.late.sent, (id, written));
        Ok(sent)
    }

    /// The ordering node read our text `message` at `read`, a later epoch
    /// than the one we wrote it in (see [`LateTexts`]): sends it to the
    /// members who joined in between, each once, written at our epoch
    /// now, and its history entry waits for them too. We are at `read` or
    /// later (the notice was written at `read`).
    fn send_to_joined(
        &mut self,
        message: MessageId,
        read: u64,
        now: u64,
        changes: &mut Changes,
    ) -> Result<(), GroupError> {
        let Some(&(_, written)) = self.late.sent.iter().find(|(id, _)| *id == message) else {
            return Ok(()); // not ours, or from before this session
        };
        let owed = self.late.owed(message, written, read, &self.record.members);
        if owed.is_empty() {
            return Ok(());
        }
        let conversation = Conversation::Group(self.record.id);
        let Some((position, entry)) = self.own_text(message)? else {
            return Ok(());
        };
        let payload = self.encrypt(Body::Text {
            id: message,
            text: entry.text,
            sent_at: entry.sent_at,
        })?;
        for member in owed {
            changes.outbox.push(OutboxEntry {
                conversation,
                recipient: Recipient::Member(member),
                kind: OutboxKind::GroupText,
                message: Some(message),
                history: Some(position),
                address: None,
                payload: payload.clone(),
                created_at: now,
            });
            changes
                .statuses
                .push((conversation, position, StatusChange::Resent));
            LateTexts::keep(&mut self.late.resent, (message, member));
        }
        Ok(())
    }

    /// One of our texts in this group's history, by id: its position and
    /// entry. Looked for among the latest entries only: a notice of a late
    /// text comes soon after it.
    fn own_text(&self, message: MessageId) -> Result<Option<(u64, HistoryEntry)>, GroupError> {
        let key = Conversation::Group(self.record.id).key();
        Ok(self.provider_store().read(|tx| {
            let t = tx.open_table(tables::HISTORY)?;
            for row in t
                .range((key, 0)..=(key, u64::MAX))?
                .rev()
                .take(LATE_KEPT * 4)
            {
                let (k, v) = row?;
                let entry: HistoryEntry = store::decode(v.value(), "history entry")?;
                if entry.id == message && entry.author == Author::Me {
                    return Ok(Some((k.value().1, entry)));
                }
            }
            Ok(None)
        })?)
    }

    /// Tells every member who we are and how to reach us (and, for
    /// placeholders we made, who they are for).
    fn announce(
        &mut self,
        infos: Vec<MemberInfo>,
        now: u64,
        changes: &mut Changes,
    ) -> Result<(), GroupError> {
        for info in infos {
            let payload = self.encrypt(Body::MemberInfo(info))?;
            self.fan_out(&payload, OutboxKind::Control, None, None, changes, now);
        }
        Ok(())
    }

    /// Who we are to the other members under `ipk`, reached at `transports`.
    fn own_info(&self, ipk: Ipk, transports: &[TransportInfo]) -> MemberInfo {
        MemberInfo {
            ipk,
            display: self.record.own_display.clone(),
            transports: transports.to_vec(),
            direct_key: Some(SealKey::from_seed(self.record.direct_seed).public()),
            placeholder_of: None,
            claim: None,
        }
    }

    /// Claims our placeholder: a fresh group key, its equivalence to our key
    /// in the relationship we were introduced through (to tell the
    /// introducer), and the commit that replaces the placeholder.
    pub fn claim(
        &mut self,
        proton: &ProtonRecord,
        node: &NodeAddrs,
        lifetimes: Lifetimes,
        now: u64,
        changes: &mut Changes,
    ) -> Result<(), GroupError> {
        // Asked again (a retry after a `--wait` ran out, say): done, or
        // on its way, is an answer, not an error.
        if self.record.state == GroupState::Active && self.record.introduced.is_some() {
            return Ok(());
        }
        if self.record.state != GroupState::Invited {
            return Err(self.not_invited(GroupError::OwnGroup));
        }
        if self.record.claiming() {
            return Ok(()); // already on its way
        }
        let key = IdentityKey::generate();
        let transports = make_transports(node, lifetimes, now)?;
        changes
            .addresses
            .extend(own_address_rows(self.record.id, &transports));
        self.record.relays.push(Relay {
            id: rand::random(),
            via: proton.id,
            body: Body::Equivalence {
                group_id: self.record.group_id.clone(),
                attestation: Attestation::equivalent(&key, &proton.own_key.key(), now),
            },
        });
        let follows = Attestation::follows(&self.key, &key, now);
        self.record.intents.push(Intent::Claim {
            key: SecretKey::from(&key),
            transports,
            follows: Box::new(follows),
        });
        self.advance(now, changes)?;
        self.save(changes);
        Ok(())
    }

    /// Queues a change that needs a commit and starts it if we can.
    pub fn push_intent(
        &mut self,
        intent: Intent,
        now: u64,
        changes: &mut Changes,
    ) -> Result<(), GroupError> {
        if self.record.state == GroupState::Gone {
            return Err(GroupError::Gone);
        }
        self.record.intents.push(intent);
        self.advance(now, changes)?;
        self.save(changes);
        Ok(())
    }

    /// A change the user asks for (a key update, a removal). Refused while
    /// our introduction is pending (the placeholder is not ours to change
    /// the group with), and when it would remove the member that alone
    /// votes for unclaimed placeholders: their claims could never be
    /// ordered.
    pub fn request(
        &mut self,
        intent: Intent,
        now: u64,
        changes: &mut Changes,
    ) -> Result<(), GroupError> {
        self.must_be_active()?;
        if let Intent::Remove { members } = &intent {
            for target in members {
                // Named by a key a claim replaced: say so, not "removed".
                self.member(*target)?;
            }
            let stranded = self.stranded_without(members);
            if !stranded.is_empty() {
                let names = |keys: &[Ipk]| {
                    keys.iter()
                        .filter_map(|k| self.member(*k).ok())
                        .map(|m| m.display.name.clone())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let asserters: Vec<Ipk> = members
                    .iter()
                    .copied()
                    .filter(|t| {
                        self.record.members.iter().any(|m| {
                            stranded.contains(&m.ipk)
                                && matches!(m.status, MemberStatus::Placeholder { asserted_by } if asserted_by == *t)
                        })
                    })
                    .collect();
                let name = match names(&asserters) {
                    n if n.is_empty() => "their introducer".to_string(),
                    n => n,
                };
                return Err(GroupError::SpeaksForPlaceholders {
                    name,
                    placeholders: names(&stranded),
                });
            }
        }
        self.push_intent(intent, now, changes)
    }

    /// Whether we may change the group or act in it as a member: not once
    /// we are gone, nor with an introduction's placeholder (claim first).
    fn must_be_active(&self) -> Result<(), GroupError> {
        match self.record.state {
            GroupState::Active => Ok(()),
            GroupState::Gone => Err(GroupError::Gone),
            GroupState::Invited if self.record.claiming() => Err(GroupError::ClaimPending),
            GroupState::Invited => Err(GroupError::NotClaimed),
        }
    }

    /// The unclaimed placeholders that would lose their only vote if
    /// `leaving` went, when the rest would then be no majority: the group
    /// could order nothing again, their claims included. Empty when the
    /// rest keep a majority. Each member's node votes for itself and for
    /// the placeholders it introduced (see `votes_of`).
    fn stranded_without(&self, leaving: &[Ipk]) -> Vec<Ipk> {
        let roster: Vec<Ipk> = self
            .roster()
            .into_iter()
            .filter(|i| !leaving.contains(i))
            .collect();
        let placeholder = |i: &Ipk| {
            self.record
                .members
                .iter()
                .any(|m| m.ipk == *i && matches!(m.status, MemberStatus::Placeholder { .. }))
        };
        let mut votes: Vec<Ipk> = roster
            .iter()
            .filter(|i| !placeholder(i))
            .flat_map(|v| self.votes_of(*v, &roster))
            .collect();
        votes.sort_unstable_by_key(|i| *i.as_bytes());
        votes.dedup();
        if votes.len() * 2 > roster.len() {
            return Vec::new();
        }
        roster
            .into_iter()
            .filter(|i| placeholder(i) && !votes.contains(i))
            .collect()
    }

    /// Adds placeholders for the peers of `via` (we introduce them).
    pub fn add(
        &mut self,
        store: &Store,
        via: &[ProtonRecord],
        now: u64,
        changes: &mut Changes,
    ) -> Result<(), GroupError> {
        self.must_be_active()?;
        // A second placeholder for someone in the group would be one they
        // can never claim, and a key only we hold.
        let queued = self
            .record
            .intents
            .iter()
            .chain(self.record.pending.as_ref().map(|p| &p.intent));
        let adding: Vec<crate::model::ProtonId> = queued
            .flat_map(|i| match i {
                Intent::Add { invitees } => invitees.iter().map(|v| v.via).collect(),
                _ => Vec::new(),
            })
            .collect();
        for p in via {
            let in_group = self.record.members.iter().any(|m| m.stands_for(p.id));
            if in_group || adding.contains(&p.id) {
                return Err(GroupError::AlreadyInGroup(p.peer_display.name.clone()));
            }
        }
        let (invitees, _) = make_invitees(store, via, self.key.ipk(), &self.record.context)?;
        self.push_intent(Intent::Add { invitees }, now, changes)
    }

    /// Stages the first queued intent, unless a commit of ours is pending.
    /// The ordering service proposes it itself; anyone else sends it there.
    fn advance(&mut self, now: u64, changes: &mut Changes) -> Result<(), GroupError> {
        while self.record.pending.is_none()
            && !self.record.intents.is_empty()
            && self.record.state != GroupState::Gone
        {
            let intent = self.record.intents.remove(0);
            let epoch = self.epoch();
            // A removal asked for before another change was ordered (an
            // addition by the member removed, say) may strand the group
            // now: dropped, as a change that no longer applies.
            if let Intent::Remove { members } = &intent {
                // Two members removed the same one at once, say: done.
                if !members.iter().any(|m| self.is_member(m)) {
                    tracing::debug!(group = %self.record.id, "dropped a removal of members no longer in the group");
                    continue;
                }
                if !self.stranded_without(members).is_empty() {
                    tracing::warn!(group = %self.record.id, "dropped a removal that would leave placeholders no majority to be claimed in");
                    continue;
                }
            }
            let staged = self.isolated(changes, |s, _| s.stage(&intent));
            let (commit, welcome) = match staged {
                Ok(c) => c,
                Err(e) => {
                    // An intent that no longer applies (its member left).
                    tracing::warn!(group = %self.record.id, error = %e, "dropped a change that no longer applies");
                    continue;
                }
            };
            self.record.pending = Some(PendingCommit {
                epoch,
                commit: commit.clone(),
                welcome,
                intent,
                sent_at: now,
            });
            if self.is_orderer() {
                // Ordered at once when we are alone; else once accepted.
                self.propose_next(now, changes)?;
            } else {
                self.send_to_orderer(commit, now, changes);
            }
        }
        Ok(())
    }

    /// As the ordering service: proposes our own staged commit, if one
    /// waits and nothing else is under way.
    fn propose_next(&mut self, now: u64, changes: &mut Changes) -> Result<(), GroupError> {
        if !self.is_orderer() || !self.ready_to_order(now, changes) || self.proposal.is_some() {
            return Ok(());
        }
        // What we proposed for this epoch at this rank before we crashed
        // (or before a step failed) goes again: never another in its place.
        let epoch = self.epoch();
        let rank = self.record.orderer_rank;
        if let Some(again) = self
            .record
            .accepted
            .as_ref()
            .filter(|a| a.epoch == epoch && a.rank == rank)
        {
            let commit = again.commit.clone();
            return self.propose(commit, now, changes);
        }
        if let Some(commit) = self.record.pending.as_ref().map(|p| p.commit.clone()) {
            self.propose(commit, now, changes)?;
        }
        Ok(())
    }

    /// Whether we, the ordering service, may propose now. The first
    /// ordering service (rank 0) may. One that took over after a failover
    /// first syncs (a view change, see [`ViewStep`]): it asks every member
    /// to promise its rank and to send the commits it lacks, and proposes
    /// once a majority has promised and it holds every commit they had. If
    /// one of them had accepted a proposal for the current epoch, that
    /// proposal (the one of the highest rank) goes first: a majority may
    /// have accepted it, and some member may have been told it was ordered.
    /// So two members never apply different commits for one epoch, whoever
    /// crashes when. (This is Paxos: a rank is a ballot, one instance per
    /// epoch; the sync is phase 1 for every later epoch at once.) After a
    /// restart no sync is needed: the sync at our rank is done and stored,
    /// and a proposal we made is stored with it (see `propose_next`); were
    /// the group at a higher rank now, the members' answers tell us.
    fn ready_to_order(&mut self, now: u64, changes: &mut Changes) -> bool {
        let rank = self.record.orderer_rank;
        if rank == 0 || self.record.synced_rank >= rank {
            return true;
        }
        let me = self.key.ipk();
        let roster = self.roster();
        let mut round = match self.sync.take() {
            Some(round) if round.rank == rank => round,
            _ => SyncRound {
                rank,
                asked: 0,
                promised: Vec::new(),
                highest: self.epoch(),
                accepted: Vec::new(),
            },
        };
        let gone: Vec<&(Ipk, Option<AcceptedCommit>)> = self
            .record
            .left
            .iter()
            .filter(|(i, _)| roster.contains(i) && !round.promised.contains(i))
            .collect();
        if self.is_majority(&round.promised) && self.epoch() >= round.highest {
            self.record.synced_rank = rank;
            tracing::info!(group = %self.record.id, rank, epoch = self.epoch(), promised = round.promised.len(), members = roster.len(), "ordering service synced");
            let epoch = self.epoch();
            let ours = self
                .record
                .accepted
                .iter()
                .chain(gone.into_iter().filter_map(|(_, a)| a.as_ref()))
                .map(|a| (a.epoch, a.rank, a.commit.clone()))
                .collect::<Vec<_>>();
            let again = round
                .accepted
                .into_iter()
                .chain(ours)
                .filter(|(e, _, _)| *e == epoch)
                .max_by_key(|(_, r, _)| *r);
            self.save(changes);
            if let Some((_, _, commit)) = again {
                if let Err(e) = self.propose(commit, now, changes) {
                    tracing::warn!(group = %self.record.id, error = %e, "proposing an accepted commit again failed");
                }
            }
            return true;
        }
        if now >= round.asked.saturating_add(ASK_AGAIN_MS) {
            round.asked = now;
            let sync = self.view_payload(ViewStep::Sync, self.epoch(), None);
            for o in roster
                .iter()
                .filter(|o| **o != me && !round.promised.contains(o))
            {
                self.outbox_to(*o, &sync, changes, now);
            }
        }
        self.sync = Some(round);
        false
    }

    /// As the ordering service: proposes `commit` for our epoch; we accept
    /// it ourselves (stored with the proposal, so that after a crash we
    /// propose it again rather than another).
    fn propose(
        &mut self,
        commit: Vec<u8>,
        now: u64,
        changes: &mut Changes,
    ) -> Result<(), GroupError> {
        let epoch = self.epoch();
        let rank = self.record.orderer_rank;
        let digest: [u8; 32] = Sha256::digest(&commit).into();
        // Holding a majority of the votes ourselves, we need nobody's.
        if !self.is_majority(&[]) {
            let payload = self.proposal_payload(epoch, &commit);
            let me = self.key.ipk();
            for ipk in self.roster().into_iter().filter(|i| *i != me) {
                self.outbox_to(ipk, &payload, changes, now);
            }
        }
        self.record.accepted = Some(AcceptedCommit {
            epoch,
            rank,
            commit: commit.clone(),
        });
        self.proposal = Some(Proposal {
            epoch,
            commit,
            digest,
            acks: Vec::new(),
            asked: now,
        });
        self.save(changes);
        self.decide_if_accepted(now, changes)
    }

    /// Our proposal of `commit` for `epoch`, signed at our rank.
    fn proposal_payload(&self, epoch: u64, commit: &[u8]) -> Vec<u8> {
        let rank = self.record.orderer_rank;
        let signature = self.key.sign_bytes(&commit_message(
            PROPOSE_LABEL,
            &self.record.group_id,
            epoch,
            rank,
            commit,
        ));
        Payload::Propose {
            commit: commit.to_vec(),
            rank,
            signature,
        }
        .encode()
    }

    /// As the ordering service: once a majority (us included) has accepted
    /// our proposal, it is ordered: applied, logged, and sent to everyone.
    fn decide_if_accepted(&mut self, now: u64, changes: &mut Changes) -> Result<(), GroupError> {
        let roster = self.roster();
        let accepted = self
            .proposal
            .as_ref()
            .is_some_and(|p| self.is_majority(&p.acks));
        let Some(proposal) = self.proposal.take_if(|_| accepted) else {
            return Ok(());
        };
        let epoch = proposal.epoch;
        let ordered = self.sign_ordered(&proposal.commit, epoch)?;
        changes
            .ordered_log
            .push((self.record.id, epoch, ordered.clone()));
        let replaced = self.apply_commit(&proposal.commit, now, changes)?;
        // Everyone who was in the group before this commit, us excepted:
        // members it removes learn they are out, those it adds join by
        // Welcome instead, and a claimer is reached under its new key.
        let me = self.key.ipk();
        for ipk in roster.into_iter().filter(|i| *i != me) {
            let ipk = match replaced {
                Some((old, new)) if old == ipk => new,
                _ => ipk,
            };
            self.outbox_to(ipk, &ordered, changes, now);
        }
        self.advance(now, changes)?;
        self.save(changes);
        Ok(())
    }

    /// A signed view-change message from us, at our rank.
    fn view_payload(&self, step: ViewStep, epoch: u64, accepted: Option<(u32, &[u8])>) -> Vec<u8> {
        let rank = self.record.orderer_rank;
        let from = self.key.ipk();
        let digest: [u8; 32] = accepted
            .map(|(_, c)| Sha256::digest(c).into())
            .unwrap_or_default();
        let accepted_rank = accepted.map(|(r, _)| r);
        let signature = self.key.sign_bytes(&view_message(
            &self.record.group_id,
            step,
            rank,
            epoch,
            &from,
            &digest,
            accepted_rank,
        ));
        Payload::View {
            step,
            rank,
            epoch,
            from,
            // An acceptance names the commit by its digest only.
            accepted: accepted
                .filter(|_| step == ViewStep::Promise)
                .map(|(rank, commit)| Accepted {
                    rank,
                    commit: commit.to_vec(),
                }),
            digest,
            signature,
        }
        .encode()
    }

    /// Moves us to the view at `rank`, if it is higher than ours. Our
    /// pending commit goes to the new ordering service; if that is us, we
    /// start syncing.
    fn adopt_rank(&mut self, rank: u32, now: u64, changes: &mut Changes) {
        if rank <= self.record.orderer_rank {
            return;
        }
        tracing::info!(group = %self.record.id, from = self.record.orderer_rank, to = rank, "the group moves to another ordering service");
        self.record.orderer_rank = rank;
        self.sync = None;
        self.proposal = None;
        if self.is_orderer() {
            self.ready_to_order(now, changes);
        } else if let Some(p) = self.record.pending.as_mut() {
            p.sent_at = now;
            let commit = p.commit.clone();
            self.send_to_orderer(commit, now, changes);
        }
    }

    /// The group's actor starts (the node started, or the group was
    /// idle): a commit of ours still waiting for the ordering service has
    /// its timeout count from now. Its request is in the outbox and goes
    /// out again; that the node was down says nothing of the ordering
    /// service, and failing over at once would move the role off a node
    /// that may be alive.
    pub fn restart_ordering_clock(&mut self, now: u64) {
        if let Some(p) = self.record.pending.as_mut() {
            p.sent_at = p.sent_at.max(now);
        }
    }

    /// Whether a timer should call [`GroupSession::check_ordering`].
    pub fn needs_tick(&self) -> bool {
        self.record.pending.is_some() || self.sync.is_some() || self.proposal.is_some()
    }

    /// What, when it changes, may let held inbox rows through: the epoch,
    /// the view, and whether we (as the ordering service) are syncing or
    /// waiting for a proposal to be accepted.
    pub fn progress_marker(&self) -> (u64, u32, bool, bool) {
        (
            self.epoch(),
            self.record.orderer_rank,
            self.sync.is_none(),
            self.proposal.is_none(),
        )
    }

    fn stage(&mut self, intent: &Intent) -> Result<(Vec<u8>, Option<Vec<u8>>), GroupError> {
        Ok(match intent {
            Intent::Claim {
                key,
                transports,
                follows,
            } => {
                let new = key.key();
                let info = postcard::to_allocvec(&self.own_info(new.ipk(), transports))
                    .map_err(|e| MlsError::Encode(e.to_string()))?;
                let aad = ClaimAad {
                    follows: (**follows).clone(),
                    info: mls::seal_for_epoch(
                        &self.group,
                        &self.provider,
                        CLAIM_INFO_LABEL,
                        new.ipk().as_bytes(),
                        &info,
                    )?,
                };
                let aad =
                    postcard::to_allocvec(&aad).map_err(|e| MlsError::Encode(e.to_string()))?;
                (
                    mls::stage_claim(&mut self.group, &self.provider, &self.key, &new, aad)?,
                    None,
                )
            }
            Intent::Add { invitees } => {
                let packages = invitees
                    .iter()
                    .map(|i| decode_bundle_key_package(&i.bundle))
                    .collect::<Result<Vec<_>, _>>()?;
                // Who the placeholders are for, sealed for the members of
                // the epoch it commits from: they learn it with the commit.
                let infos: Vec<MemberInfo> =
                    invitees.iter().map(|i| member_info(&i.member)).collect();
                let infos =
                    postcard::to_allocvec(&infos).map_err(|e| MlsError::Encode(e.to_string()))?;
                let aad = AddAad {
                    infos: mls::seal_for_epoch(
                        &self.group,
                        &self.provider,
                        ADD_INFO_LABEL,
                        self.key.ipk().as_bytes(),
                        &infos,
                    )?,
                };
                let aad =
                    postcard::to_allocvec(&aad).map_err(|e| MlsError::Encode(e.to_string()))?;
                let (commit, welcome) =
                    mls::stage_add(&mut self.group, &self.provider, &self.key, &packages, aad)?;
                (commit, Some(welcome))
            }
            Intent::Remove { members } => {
                let present: Vec<Ipk> = members
                    .iter()
                    .copied()
                    .filter(|m| self.is_member(m))
                    .collect();
                // Removing members who asked to leave says so, for the
                // others to tell a departure from a removal.
                let left = !present.is_empty()
                    && present
                        .iter()
                        .all(|m| self.record.left.iter().any(|(l, _)| l == m));
                let aad = if left { LEAVE_AAD.to_vec() } else { Vec::new() };
                (
                    mls::stage_remove(&mut self.group, &self.provider, &self.key, &present, aad)?,
                    None,
                )
            }
            Intent::Update => (
                mls::stage_self_update(&mut self.group, &self.provider, &self.key)?,
                None,
            ),
        })
    }

    fn send_to_orderer(&mut self, commit: Vec<u8>, now: u64, changes: &mut Changes) {
        let Some(orderer) = self.orderer() else {
            return;
        };
        let rank = self.record.orderer_rank;
        self.fan_out(
            &Payload::Commit { commit, rank }.encode(),
            OutboxKind::Control,
            None,
            Some(orderer),
            changes,
            now,
        );
    }

    fn outbox_to(&self, ipk: Ipk, payload: &[u8], changes: &mut Changes, now: u64) {
        changes.outbox.push(OutboxEntry {
            conversation: Conversation::Group(self.record.id),
            recipient: Recipient::Member(ipk),
            kind: OutboxKind::Control,
            message: None,
            history: None,
            address: None,
            payload: payload.to_vec(),
            created_at: now,
        });
    }

    fn sign_ordered(&self, commit: &[u8], epoch: u64) -> Result<Vec<u8>, GroupError> {
        let signature = self.key.sign_bytes(&commit_message(
            ORDERED_LABEL,
            &self.record.group_id,
            epoch,
            self.record.orderer_rank,
            commit,
        ));
        Ok(Payload::Ordered {
            commit: commit.to_vec(),
            rank: self.record.orderer_rank,
            signature,
        }
        .encode())
    }

    /// Our commit was accepted and merged: do what it was for.
    fn finish_intent(
        &mut self,
        pending: PendingCommit,
        now: u64,
        changes: &mut Changes,
    ) -> Result<(), GroupError> {
        match pending.intent {
            Intent::Claim {
                key, transports, ..
            } => {
                self.key = key.key();
                self.record.own_key = key;
                self.record.own_transports = transports;
                // The members learn our info from the claim itself.
                self.record.state = GroupState::Active;
            }
            Intent::Add { invitees } => {
                let members = std::sync::Arc::make_mut(&mut self.record.members);
                for i in &invitees {
                    members.retain(|m| m.ipk != i.member.ipk);
                    members.push(i.member.clone());
                }
                // Existing members learn who the placeholders are for.
                let infos: Vec<MemberInfo> =
                    invitees.iter().map(|i| member_info(&i.member)).collect();
                self.announce(infos, now, changes)?;
                let via = load_protons(&self.provider_store(), invitees.iter().map(|i| i.via))?;
                let welcome = pending.welcome.unwrap_or_default();
                let relays =
                    introductions(&self.record, &self.key, &via, &invitees, &welcome, now)?;
                self.record.relays.extend(relays);
            }
            Intent::Remove { members } => {
                let me = self.key.ipk();
                self.note_departures(&members, me, false, now);
            }
            Intent::Update => self.updates.push(self.key.ipk()),
        }
        self.sync_roster();
        self.save(changes);
        Ok(())
    }

    fn provider_store(&self) -> Store {
        self.provider.mls_storage().store().clone()
    }

    /// Keeps the member list equal to the MLS roster (minus us).
    fn sync_roster(&mut self) {
        let roster = self.roster();
        let me = self.key.ipk();
        if roster.len() == self.record.members.len() + 1
            && roster.contains(&me)
            && self
                .record
                .members
                .iter()
                .all(|m| m.ipk != me && roster.contains(&m.ipk))
        {
            // Nobody came or went (most commits): the list stays shared.
            self.record.left.retain(|(i, _)| roster.contains(i));
            return;
        }
        let (kept, gone): (Vec<Member>, Vec<Member>) =
            std::sync::Arc::unwrap_or_clone(std::mem::take(&mut self.record.members))
                .into_iter()
                .partition(|m| roster.contains(&m.ipk));
        self.record.members = std::sync::Arc::new(kept);
        self.record.former.extend(gone);
        self.record.left.retain(|(i, _)| roster.contains(i));
        let excess = self.record.former.len().saturating_sub(FORMER_KEPT);
        self.record.former.drain(..excess);
        for ipk in roster {
            if ipk != me && !self.record.members.iter().any(|m| m.ipk == ipk) {
                std::sync::Arc::make_mut(&mut self.record.members).push(Member {
                    ipk,
                    display: DisplayIdentity {
                        name: format!("member {}", ipk.fingerprint()),
                        pronouns: None,
                        picture: None,
                    },
                    transports: Vec::new(),
                    status: MemberStatus::Placeholder { asserted_by: ipk },
                    introduced_by: None,
                    direct_key: None,
                    via: None,
                    claim: None,
                });
            }
        }
    }

    /// If our commit waited too long for the ordering service, move to the
    /// next one (by rank) and send it there; if that is us, apply it once
    /// synced. Also ends a sync that has waited long enough.
    pub fn check_ordering(
        &mut self,
        now: u64,
        timeout_ms: u64,
        changes: &mut Changes,
    ) -> Result<bool, GroupError> {
        if self.is_orderer() {
            if !self.needs_tick() {
                return Ok(false);
            }
            let before = self.progress_marker();
            self.propose_next(now, changes)?;
            self.propose_again(now, changes);
            self.save(changes);
            return Ok(self.progress_marker() != before);
        }
        let Some(pending) = &self.record.pending else {
            return Ok(false);
        };
        if now < pending.sent_at.saturating_add(timeout_ms) && !self.orderer_is_placeholder() {
            return Ok(false);
        }
        if self.orderer_holds_majority() {
            // Nobody else could gather a majority without its node (an
            // introducer votes for the placeholders it made until they are
            // claimed): moving on would only go round the ranks. Our
            // commit stays queued for it until it is back.
            tracing::debug!(group = %self.record.id, rank = self.record.orderer_rank, "the ordering service did not answer; it holds a majority of the votes, so we wait for it");
            return Ok(false);
        }
        // The next one by rank takes over; its sync moves everyone there.
        tracing::info!(group = %self.record.id, rank = self.record.orderer_rank, "the ordering service did not answer; moving to the next one");
        let next = self.record.orderer_rank.wrapping_add(1);
        self.adopt_rank(next, now, changes);
        if self.is_orderer() {
            self.propose_next(now, changes)?;
        } else {
            // We may have missed commits the old ordering service made.
            self.last_catch_up = 0;
            self.request_catch_up(now, timeout_ms, changes);
        }
        self.save(changes);
        Ok(true)
    }

    /// Processes one inbox row. `Err(Deferred)` means: keep the row and try
    /// again after the next commit.
    pub fn receive(
        &mut self,
        payload: &[u8],
        relayed_from: Option<crate::model::ProtonId>,
        now: u64,
        changes: &mut Changes,
    ) -> Result<Received, GroupError> {
        if self.record.state == GroupState::Gone {
            return Err(GroupError::Gone);
        }
        let payload = Payload::decode(payload)?;
        tracing::trace!(target: crate::TIMELINE, store = %self.provider_store().name(), group = %self.record.id, kind = payload.kind(), "group: receives");
        // A commit request for a higher rank: the group is failing over (we
        // may be the next ordering service). An ordering service that is
        // still syncing, or waits for its proposal to be accepted, keeps
        // commit requests for later. Neither must be rolled back.
        if let Payload::Commit { rank, .. } = payload {
            let before = self.progress_marker();
            self.adopt_rank(rank, now, changes);
            if self.is_orderer() {
                // Ours first (or what we proposed before a crash).
                self.propose_next(now, changes)?;
            }
            if self.is_orderer() && (!self.ready_to_order(now, changes) || self.proposal.is_some())
            {
                self.save(changes);
                return Err(GroupError::Deferred);
            }
            if self.progress_marker() != before {
                self.save(changes);
            }
        }
        self.isolated(changes, |s, changes| match payload {
            Payload::Mls(bytes) => s.receive_application(&bytes, now, changes),
            Payload::Commit { commit, rank } => {
                s.receive_commit_request(&commit, rank, now, changes)
            }
            Payload::Propose {
                commit,
                rank,
                signature,
            } => s.receive_proposal(&commit, rank, &signature, now, changes),
            Payload::View {
                step,
                rank,
                epoch,
                from,
                accepted,
                digest,
                signature,
            } => s.receive_view(
                ViewMessage {
                    step,
                    rank,
                    epoch,
                    from,
                    accepted,
                    digest,
                },
                &signature,
                now,
                changes,
            ),
            Payload::Ordered {
                commit,
                rank,
                signature,
            } => s.receive_ordered(&commit, rank, &signature, now, changes),
            Payload::CatchUp { epoch, from } => s.serve_catch_up(epoch, from, now, changes),
            Payload::Relayed(body) => match relayed_from {
                Some(proton) => s.receive_relayed(proton, *body, now, changes),
                None => Err(GroupError::Unexpected("a relayed message from the network")),
            },
            Payload::Sealed {
                from,
                sealed,
                signature,
            } => s.receive_sealed(from, &sealed, &signature),
            Payload::Welcome { .. } => {
                Err(GroupError::Unexpected("a Welcome sent to a group address"))
            }
        })
    }

    /// The epoch `bytes` was written in; `Deferred` if we are not there.
    fn check_epoch(&self, bytes: &[u8]) -> Result<u64, GroupError> {
        let epoch = mls::message_epoch(bytes)?;
        if epoch > self.epoch() {
            return Err(GroupError::Deferred);
        }
        Ok(epoch)
    }

    fn receive_application(
        &mut self,
        bytes: &[u8],
        now: u64,
        changes: &mut Changes,
    ) -> Result<Received, GroupError> {
        let written = self.check_epoch(bytes)?;
        let (sender, plain) = match mls::process(&mut self.group, &self.provider, bytes)? {
            Incoming::Application { sender, bytes } => (sender, bytes),
            Incoming::Commit { .. } => {
                return Err(GroupError::Unexpected(
                    "a commit that bypassed the ordering service",
                ))
            }
            Incoming::Proposal => return Err(GroupError::Unexpected("a standalone proposal")),
        };
        let sender = sender.ok_or(GroupError::NotAMember)?;
        let plaintext = Plaintext::decode(&plain)?;
        let sender = match self.current_identity(sender) {
            // Written before its author's removal reached us (openmls
            // checked it against the epoch it was written in), and come
            // soon after: every member's node takes it alike, whichever
            // it got first. Later, it would be a removed member writing
            // on with keys of the past.
            Err(GroupError::NotAMember)
                if matches!(plaintext.body, Body::Text { .. })
                    && self.removed_lately(sender, now) =>
            {
                sender
            }
            // Its vote or news, sent before it learnt: moot. (A text after
            // the grace stays "not a member".)
            Err(GroupError::NotAMember) if !matches!(plaintext.body, Body::Text { .. }) => {
                return Err(self.outsider(sender))
            }
            other => other?,
        };
        let received = match plaintext.body {
            Body::Text { id, text, sent_at } => {
                let entry = HistoryEntry {
                    id,
                    author: Author::Peer(sender),
                    text,
                    sent_at,
                    stored_at: now,
                    status: MessageStatus::Received,
                    pending: 0,
                };
                changes
                    .history
                    .push((Conversation::Group(self.record.id), entry.clone()));
                // Read later than written, as the ordering node: those who
                // joined in between are owed it (see `LateTexts`).
                if written < self.epoch()
                    && self.is_orderer()
                    && self
                        .late
                        .joined_after(written, sender, &self.record.members)
                {
                    let notice = self.encrypt(Body::Unread {
                        message: id,
                        epoch: self.epoch(),
                    })?;
                    self.fan_out(
                        &notice,
                        OutboxKind::Control,
                        None,
                        Some(sender),
                        changes,
                        now,
                    );
                }
                Received::Text(entry)
            }
            // Only the ordering node's word, written at the epoch it names:
            // another member could otherwise have us send a text to those
            // who joined after it was written and read.
            Body::Unread { message, epoch } => {
                if self.orderer() != Some(sender) || epoch != written {
                    return Err(GroupError::Unexpected(
                        "a notice of a late text not from the ordering node",
                    ));
                }
                self.send_to_joined(message, epoch, now, changes)?;
                Received::Other
            }
            Body::MemberInfo(info) => {
                self.apply_member_info(sender, info);
                self.save(changes);
                Received::Other
            }
            Body::Leave { accepted } => {
                let accepted = accepted.and_then(|a| {
                    Some(AcceptedCommit {
                        epoch: mls::message_epoch(&a.commit).ok()?,
                        rank: a.rank,
                        commit: a.commit,
                    })
                });
                // A placeholder's vote is its introducer's, whatever its
                // invitee does: only members voting for themselves count
                // as accepting once they leave.
                let votes_itself = !self.record.members.iter().any(|m| {
                    m.ipk == sender
                        && matches!(m.status, MemberStatus::Placeholder { asserted_by } if asserted_by != sender)
                });
                self.record.left.retain(|(i, _)| *i != sender);
                if votes_itself {
                    self.record.left.push((sender, accepted));
                }
                // The ordering service itself leaves: the next one takes over.
                if self.orderer() == Some(sender) {
                    let next = self.record.orderer_rank.wrapping_add(1);
                    self.adopt_rank(next, now, changes);
                }
                if self.is_orderer() {
                    self.record.intents.push(Intent::Remove {
                        members: vec![sender],
                    });
                    self.advance(now, changes)?;
                }
                self.save(changes);
                Received::Other
            }
            _ => return Err(GroupError::Unexpected("a relationship message in a group")),
        };
        Ok(received)
    }

    /// Who sent a message: a member, or the member who since claimed the
    /// placeholder it was sent from (the claim proves it is them). Anyone
    /// else (a removed member, on past epochs' keys) is refused.
    fn current_identity(&self, sender: Ipk) -> Result<Ipk, GroupError> {
        if self.is_member(&sender) {
            return Ok(sender);
        }
        self.record
            .members
            .iter()
            .find(|m| m.claim.as_ref().is_some_and(|a| a.first == sender))
            .map(|m| m.ipk)
            .ok_or(GroupError::NotAMember)
    }

    fn apply_member_info(&mut self, sender: Ipk, info: MemberInfo) {
        if info.ipk == self.key.ipk() {
            return;
        }
        let about_self = info.ipk == sender;
        let Some(member) = std::sync::Arc::make_mut(&mut self.record.members)
            .iter_mut()
            .find(|m| m.ipk == info.ipk)
        else {
            return;
        };
        if about_self {
            member.display = info.display;
            member.transports = info.transports;
            member.direct_key = info.direct_key;
            if let Some(claim) = info.claim {
                if claim.kind == Kind::Follows && claim.second == info.ipk && claim.verify().is_ok()
                {
                    if matches!(member.status, MemberStatus::Placeholder { .. }) {
                        member.status = MemberStatus::Claimed {
                            placeholder: claim.first,
                        };
                    }
                    member.claim = Some(claim);
                }
            }
        } else if info.placeholder_of == Some(sender) {
            // Who a placeholder the sender made is for.
            if matches!(member.status, MemberStatus::Placeholder { .. }) {
                member.display = info.display;
                member.transports = info.transports;
                member.status = MemberStatus::Placeholder {
                    asserted_by: sender,
                };
                member.introduced_by = Some(sender);
            }
        }
    }

    /// As the ordering service: a member's commit for an epoch. Checked,
    /// then proposed.
    fn receive_commit_request(
        &mut self,
        bytes: &[u8],
        rank: u32,
        now: u64,
        changes: &mut Changes,
    ) -> Result<Received, GroupError> {
        if !self.is_orderer() {
            // Its sender is behind on the view: pass it on.
            if rank < self.record.orderer_rank {
                self.send_to_orderer(bytes.to_vec(), now, changes);
                return Ok(Received::Other);
            }
            return Err(GroupError::NotOrderer);
        }
        let epoch = mls::message_epoch(bytes)?;
        if epoch != self.epoch() {
            // Lost the race (or arrived late): the winner reaches its author.
            return Err(GroupError::WrongEpoch {
                got: epoch,
                at: self.epoch(),
            });
        }
        if self.is_majority(&[]) {
            // Ordered as soon as proposed: processed once, and merged by
            // `apply_commit` (a failure here leaves the session as it was,
            // see `isolated`).
            let (incoming, claim) = self.check_commit(bytes)?;
            self.checked = Some((bytes.to_vec(), incoming, claim));
            let proposed = self.propose(bytes.to_vec(), now, changes);
            self.checked = None;
            proposed?;
        } else {
            let writes = self.provider.mls_storage().snapshot();
            let checked = self.check_commit(bytes);
            if self.provider.mls_storage().restore(writes) {
                self.group = mls::load_group(&self.provider, self.group.group_id())?;
            }
            checked?;
            self.propose(bytes.to_vec(), now, changes)?;
        }
        Ok(Received::Other)
    }

    /// Processes a member's commit: whether it applies to our group as it
    /// is, and a claim in it proves itself (the proof, if it is a claim).
    /// Staged, not merged.
    fn check_commit(
        &mut self,
        bytes: &[u8],
    ) -> Result<(Incoming, Option<Attestation>), GroupError> {
        match mls::process(&mut self.group, &self.provider, bytes)? {
            Incoming::Commit {
                staged,
                sender,
                aad,
            } => {
                let claim = match mls::summarize(&self.group, &staged, sender).replaced {
                    Some((old, new)) => {
                        Some(verify_claim(&aad, old, new).map_err(GroupError::BadClaim)?)
                    }
                    None => None,
                };
                let incoming = Incoming::Commit {
                    staged,
                    sender,
                    aad,
                };
                Ok((incoming, claim))
            }
            _ => Err(GroupError::Unexpected("not a commit")),
        }
    }

    fn requeue_pending(&mut self) {
        if let Some(p) = self.record.pending.take() {
            self.record.intents.insert(0, p.intent);
        }
    }

    /// Applies the commit ordered for our epoch: ours (its intent is done)
    /// or another member's (ours, if any, lost and is staged again later).
    /// Returns the placeholder it replaced by a claimer's key, if any.
    fn apply_commit(
        &mut self,
        commit: &[u8],
        now: u64,
        changes: &mut Changes,
    ) -> Result<Option<(Ipk, Ipk)>, GroupError> {
        let from = self.epoch();
        let before: Vec<Ipk> = self.record.members.iter().map(|m| m.ipk).collect();
        let replaced = self.apply_commit_only(commit, now, changes)?;
        if self.record.state == GroupState::Gone {
            return Ok(replaced);
        }
        // Who joined by it, for texts read later than written.
        let joined: Vec<Ipk> = self
            .record
            .members
            .iter()
            .map(|m| m.ipk)
            .filter(|m| !before.contains(m))
            .collect();
        for m in joined {
            let at = match replaced {
                Some((old, new)) if new == m => {
                    match self.late.joins.iter().find(|(j, _)| *j == old) {
                        Some(&(_, at)) => at,
                        None => continue, // a placeholder of before
                    }
                }
                _ => from + 1,
            };
            LateTexts::keep(&mut self.late.joins, (m, at));
        }
        Ok(replaced)
    }

    /// [`apply_commit`](Self::apply_commit) but for noting who joined.
    fn apply_commit_only(
        &mut self,
        commit: &[u8],
        now: u64,
        changes: &mut Changes,
    ) -> Result<Option<(Ipk, Ipk)>, GroupError> {
        if self
            .record
            .pending
            .as_ref()
            .is_some_and(|p| p.commit == commit)
        {
            let Some(pending) = self.record.pending.take() else {
                return Ok(None);
            };
            let replaced = match &pending.intent {
                Intent::Claim { key, .. } => Some((self.key.ipk(), key.key().ipk())),
                _ => None,
            };
            mls::merge_pending(&mut self.group, &self.provider)?;
            self.finish_intent(pending, now, changes)?;
            return Ok(replaced);
        }
        let (processed, checked_claim) = match self.checked.take() {
            Some((checked, incoming, claim)) if checked == commit => (incoming, Some(claim)),
            _ => {
                if self.record.pending.is_some() {
                    mls::clear_pending(&mut self.group, &self.provider)?;
                }
                (mls::process(&mut self.group, &self.provider, commit)?, None)
            }
        };
        if self.record.pending.is_some() {
            mls::clear_pending(&mut self.group, &self.provider)?;
            self.requeue_pending();
        }
        let Incoming::Commit {
            staged,
            sender,
            aad,
        } = processed
        else {
            return Err(GroupError::Unexpected(
                "an ordered message that is not a commit",
            ));
        };
        let summary = mls::summarize(&self.group, &staged, sender);
        // A claim checked when it came in is not verified again.
        let claim = checked_claim.unwrap_or_else(|| {
            summary
                .replaced
                .and_then(|(old, new)| verify_claim(&aad, old, new).ok())
        });
        // A claim's info is sealed under the epoch it commits from, as is
        // who the placeholders an addition makes are for.
        let claim_info = summary
            .replaced
            .and_then(|(_, new)| self.open_claim_info(&aad, new));
        let added_info = match sender {
            Some(by) if !summary.added.is_empty() => self.open_add_info(&aad, by, &summary.added),
            _ => Vec::new(),
        };
        let removed_us = staged.self_removed();
        // Noted once the commit is taken (a failed merge leaves no trace).
        let departures = |s: &mut Self| {
            if let Some(by) = sender {
                s.note_departures(&summary.removed, by, aad == LEAVE_AAD, now);
            }
        };
        if removed_us {
            departures(self);
            // Not merged: a removed member derives none of the new epoch's
            // secrets, so the group stays at the last epoch we were in,
            // with that epoch's authenticator, as the others knew it.
            self.record.state = GroupState::Gone;
            self.record.intents.clear();
            self.save(changes);
            return Ok(summary.replaced);
        }
        mls::merge_staged(&mut self.group, &self.provider, *staged)?;
        departures(self);
        if let Some(by) = sender.filter(|_| {
            summary.added.is_empty() && summary.removed.is_empty() && summary.replaced.is_none()
        }) {
            self.updates.push(by);
        }
        self.apply_summary(&summary, claim, claim_info);
        if let Some(by) = sender {
            for info in added_info {
                self.apply_member_info(by, info);
            }
        }
        self.save(changes);
        Ok(summary.replaced)
    }

    /// A commit the ordering service ordered (a majority accepted it).
    fn receive_ordered(
        &mut self,
        commit: &[u8],
        rank: u32,
        signature: &[u8; SIGNATURE_LEN],
        now: u64,
        changes: &mut Changes,
    ) -> Result<Received, GroupError> {
        let Some((epoch, _)) = self.signed_for_epoch(ORDERED_LABEL, commit, rank, signature)?
        else {
            return Ok(Received::Other); // already applied
        };
        self.adopt_rank(rank, now, changes);
        // Kept to serve members who fall behind, should we order later.
        changes.ordered_log.push((
            self.record.id,
            epoch,
            Payload::Ordered {
                commit: commit.to_vec(),
                rank,
                signature: *signature,
            }
            .encode(),
        ));
        // This epoch is ordered: whatever we proposed for it is moot.
        self.proposal = None;
        self.apply_commit(commit, now, changes)?;
        if self.record.state != GroupState::Gone {
            self.advance(now, changes)?;
        }
        self.save(changes);
        Ok(Received::Committed)
    }

    /// Checks a commit the ordering service at `rank` signed (proposed or
    /// ordered): `None` if it is for an epoch we are past, `Deferred` if
    /// for a later one; else its epoch (ours) and the signer.
    fn signed_for_epoch(
        &self,
        label: &[u8],
        commit: &[u8],
        rank: u32,
        signature: &[u8; SIGNATURE_LEN],
    ) -> Result<Option<(u64, Ipk)>, GroupError> {
        let epoch = mls::message_epoch(commit)?;
        if epoch < self.epoch() {
            return Ok(None);
        }
        if epoch > self.epoch() {
            return Err(GroupError::Deferred);
        }
        let signer = self.orderer_at(rank).ok_or(GroupError::BadOrdering)?;
        signer
            .verify(
                &commit_message(label, &self.record.group_id, epoch, rank, commit),
                signature,
            )
            .map_err(|_| GroupError::BadOrdering)?;
        Ok(Some((epoch, signer)))
    }

    /// A proposal of the ordering service at `rank` for our epoch: we
    /// accept it unless we promised a higher rank.
    fn receive_proposal(
        &mut self,
        commit: &[u8],
        rank: u32,
        signature: &[u8; SIGNATURE_LEN],
        now: u64,
        changes: &mut Changes,
    ) -> Result<Received, GroupError> {
        let Some((epoch, proposer)) =
            self.signed_for_epoch(PROPOSE_LABEL, commit, rank, signature)?
        else {
            return Ok(Received::Other); // ordered already
        };
        if self.record.state != GroupState::Active {
            // Our placeholder's vote is its introducer's until we claim.
            return Ok(Received::Other);
        }
        if rank < self.record.orderer_rank {
            // We promised a later ordering service: tell this one.
            let promise = self.view_payload(ViewStep::Promise, self.epoch(), None);
            self.outbox_to(proposer, &promise, changes, now);
            return Ok(Received::Other);
        }
        self.adopt_rank(rank, now, changes);
        self.record.accepted = Some(AcceptedCommit {
            epoch,
            rank,
            commit: commit.to_vec(),
        });
        let accept = self.view_payload(ViewStep::Accept, epoch, Some((rank, commit)));
        self.outbox_to(proposer, &accept, changes, now);
        self.save(changes);
        Ok(Received::Other)
    }

    /// Notes that `by`'s commit removes `removed`: each asked to leave if
    /// `leaving` (the commit says so) or if we received their leaving.
    fn note_departures(&mut self, removed: &[Ipk], by: Ipk, leaving: bool, now: u64) {
        self.removed_lately
            .retain(|(_, at)| now < at.saturating_add(REMOVED_GRACE_MS));
        for m in removed {
            let left = leaving || self.record.left.iter().any(|(l, _)| l == m);
            self.departures.push((*m, (!left).then_some(by)));
            self.removed_lately.push((*m, now));
        }
    }

    /// Why `from`'s message is refused: it is no member, or (told apart,
    /// since that is expected) one whose removal we applied in this
    /// session.
    fn outsider(&self, from: Ipk) -> GroupError {
        if self.removed_lately.iter().any(|(m, _)| *m == from) {
            GroupError::RemovedLately
        } else {
            GroupError::NotAMember
        }
    }

    /// Whether `key` was a member's once: one removed (and still
    /// remembered), or a placeholder a member claimed.
    fn was_member(&self, key: Ipk) -> bool {
        self.removed_lately.iter().any(|(m, _)| *m == key)
            || self.record.former.iter().any(|m| m.ipk == key)
            || self.current_identity(key).is_ok()
    }

    /// Whether `sender` was removed from the group less than
    /// [`REMOVED_GRACE_MS`] ago (by this session's clock).
    fn removed_lately(&self, sender: Ipk, now: u64) -> bool {
        self.removed_lately
            .iter()
            .any(|(m, at)| *m == sender && now < at.saturating_add(REMOVED_GRACE_MS))
    }

    /// Members removed since the last call, each with who removed them
    /// (`None`: they left); our own key among them if we were removed.
    pub fn take_departures(&mut self) -> Vec<(Ipk, Option<Ipk>)> {
        std::mem::take(&mut self.departures)
    }

    /// Members who only rotated their keys since the last call (our own
    /// key among them if we did).
    pub fn take_updates(&mut self) -> Vec<Ipk> {
        std::mem::take(&mut self.updates)
    }

    /// Placeholders whose invitees we heard decline.
    pub fn declined(&self) -> &[Ipk] {
        &self.declined
    }

    /// Updates the member list after someone else's commit; `verified` is
    /// the follows attestation of a claim in it, if it verified.
    fn apply_summary(
        &mut self,
        summary: &mls::CommitSummary,
        verified: Option<Attestation>,
        claim_info: Option<MemberInfo>,
    ) {
        if let Some((old, new)) = summary.replaced {
            let linked = self
                .record
                .pending_links
                .iter()
                .find(|(i, _)| *i == new)
                .map(|(_, p)| *p);
            if let Some(m) = std::sync::Arc::make_mut(&mut self.record.members)
                .iter_mut()
                .find(|m| m.ipk == old)
            {
                m.ipk = new;
                m.claim = verified.clone();
                m.status = match (linked, &verified) {
                    (Some(proton), Some(_)) => MemberStatus::Linked { proton },
                    (None, Some(_)) => MemberStatus::Claimed { placeholder: old },
                    // A claim the ordering service let through unproven:
                    // stay in step with the group, trust nothing new.
                    (_, None) => m.status.clone(),
                };
            }
            self.record.pending_links.retain(|(i, _)| *i != new);
            if let (Some(info), Some(_)) = (claim_info, verified) {
                self.apply_member_info(new, info);
            }
        }
        self.sync_roster();
    }

    /// Who the placeholders an addition by `by` makes are for (their names
    /// and derived transports), if its authenticated data opens under our
    /// epoch (the one it commits from). Only what is about a member it adds
    /// counts. An addition whose data does not open (or an older node's,
    /// which has none) adds the members all the same: the adder also
    /// announces them in a group message.
    fn open_add_info(&self, aad: &[u8], by: Ipk, added: &[Ipk]) -> Vec<MemberInfo> {
        if aad.is_empty() {
            return Vec::new();
        }
        let opened = (|| {
            let aad: AddAad = postcard::from_bytes(aad).ok()?;
            let infos = mls::open_for_epoch(
                &self.group,
                &self.provider,
                ADD_INFO_LABEL,
                by.as_bytes(),
                &aad.infos,
            )
            .ok()?;
            postcard::from_bytes::<Vec<MemberInfo>>(&infos).ok()
        })();
        let Some(infos) = opened else {
            tracing::warn!(group = %self.record.id, member = %by, "an addition's member info does not open; its placeholders are named once their adder's announcement comes");
            return Vec::new();
        };
        infos
            .into_iter()
            .filter(|i| {
                added.contains(&i.ipk)
                    && i.placeholder_of == Some(by)
                    && i.claim.is_none()
                    && i.validate().is_ok()
            })
            .collect()
    }

    /// The member info a claim of `new` carries, if it opens under our
    /// epoch (the one the claim commits from) and is about `new`. A claim
    /// whose info does not open still replaces the placeholder: the
    /// members stay in step, and keep the placeholder's transports.
    fn open_claim_info(&self, aad: &[u8], new: Ipk) -> Option<MemberInfo> {
        let opened = (|| {
            let aad: ClaimAad = postcard::from_bytes(aad).ok()?;
            let info = mls::open_for_epoch(
                &self.group,
                &self.provider,
                CLAIM_INFO_LABEL,
                new.as_bytes(),
                &aad.info,
            )
            .ok()?;
            let info: MemberInfo = postcard::from_bytes(&info).ok()?;
            let about_new =
                info.ipk == new && info.placeholder_of.is_none() && info.claim.is_none();
            (about_new && info.validate().is_ok()).then_some(info)
        })();
        if opened.is_none() {
            tracing::warn!(group = %self.record.id, member = %new, "a claim's member info does not open; the member keeps the placeholder's transports");
        }
        opened
    }

    /// A control message our relationship's peer sent about this group.
    fn receive_relayed(
        &mut self,
        proton: crate::model::ProtonId,
        body: Body,
        now: u64,
        changes: &mut Changes,
    ) -> Result<Received, GroupError> {
        match body {
            Body::Equivalence { attestation, .. } => {
                let peer = load_protons(&self.provider_store(), [proton])?
                    .into_iter()
                    .next()
                    .ok_or(GroupError::Unexpected("the relationship is gone"))?;
                let member_key = if attestation.first == peer.peer_ipk {
                    attestation.second
                } else {
                    attestation.first
                };
                attestation.verify_as(Kind::Equivalent, &member_key, &peer.peer_ipk)?;
                match std::sync::Arc::make_mut(&mut self.record.members)
                    .iter_mut()
                    .find(|m| m.ipk == member_key)
                {
                    Some(m) => m.status = MemberStatus::Linked { proton },
                    // The claim commit has not arrived yet.
                    None => self.record.pending_links.push((member_key, proton)),
                }
                self.save(changes);
                Ok(Received::Other)
            }
            Body::Decline { .. } => {
                let placeholders: Vec<Ipk> = self
                    .record
                    .members
                    .iter()
                    .filter(|m| {
                        m.via == Some(proton)
                            && matches!(m.status, MemberStatus::Placeholder { .. })
                    })
                    .map(|m| m.ipk)
                    .collect();
                if !placeholders.is_empty() {
                    self.declined.extend(&placeholders);
                    self.push_intent(
                        Intent::Remove {
                            members: placeholders,
                        },
                        now,
                        changes,
                    )?;
                }
                Ok(Received::Other)
            }
            _ => Err(GroupError::Unexpected(
                "a relayed message of a kind not relayed",
            )),
        }
    }

    /// Invites a member to a side relationship: `ticket` (made for it) and
    /// the ticket key's equivalence to our group key, sealed to the member's
    /// direct key and sent straight to its node.
    pub fn connect(
        &mut self,
        member: Ipk,
        ticket: String,
        ticket_key: &IdentityKey,
        now: u64,
        changes: &mut Changes,
    ) -> Result<(), GroupError> {
        self.must_be_active()?;
        let m = self.member(member)?;
        // A side relationship with a placeholder could be one with its
        // introducer, who holds its key.
        self.not_a_placeholder(m, "connect")?;
        let direct = m
            .direct_key
            .ok_or_else(|| GroupError::NoDirectKey(m.display.name.clone()))?;
        let invitation = protocol::SideInvitation {
            ticket,
            equivalence: Attestation::equivalent(ticket_key, &self.key, now),
        };
        let bytes =
            postcard::to_allocvec(&invitation).map_err(|e| MlsError::Encode(e.to_string()))?;
        let sealed = seal::seal(&direct, SIDE_INFO, &bytes)?;
        let signature = self.key.sign_bytes(&side_message(
            &self.record.group_id,
            &self.key.ipk(),
            &sealed,
        ));
        let payload = Payload::Sealed {
            from: self.key.ipk(),
            sealed,
            signature,
        }
        .encode();
        self.outbox_to(member, &payload, changes, now);
        Ok(())
    }

    fn receive_sealed(
        &mut self,
        from: Ipk,
        sealed: &[u8],
        signature: &[u8; SIGNATURE_LEN],
    ) -> Result<Received, GroupError> {
        let member = self.is_member(&from);
        if from == self.key.ipk() || (!member && self.was_member(from)) {
            return Err(self.outsider(from));
        }
        from.verify(
            &side_message(&self.record.group_id, &from, sealed),
            signature,
        )
        .map_err(|_| GroupError::BadIntroduction("the side invitation's signature".into()))?;
        // Sent by a member who has just come in, say by a claim whose
        // commit has not reached us (we were down): it waits for it.
        if !member {
            return Err(GroupError::NotYetAMember);
        }
        let bytes = SealKey::from_seed(self.record.direct_seed)
            .open(SIDE_INFO, sealed)
            .ok_or(GroupError::BadIntroduction(
                "the side invitation does not open".into(),
            ))?;
        let invitation: protocol::SideInvitation = postcard::from_bytes(&bytes)
            .map_err(|e| GroupError::BadIntroduction(format!("the side invitation: {e}")))?;
        let verified = crate::ticket::Ticket::parse(
            &invitation.ticket,
            &openmls_rust_crypto::RustCrypto::default(),
        )
        .map_err(|e| GroupError::BadIntroduction(e.to_string()))?;
        invitation
            .equivalence
            .verify_as(Kind::Equivalent, &verified.ipk, &from)?;
        Ok(Received::SideInvitation {
            ticket: invitation.ticket,
            from,
            equivalence: Box::new(invitation.equivalence),
        })
    }

    /// Asks the ordering service for the commits we missed (we hold
    /// messages of a later epoch, or our commit got no answer). At most
    /// once per half ordering timeout.
    ///
    /// Every member keeps the commits it applied, so when we asked lately
    /// and are still behind (the ordering node may be down), another
    /// member is asked too, a different one each time.
    pub fn request_catch_up(&mut self, now: u64, timeout_ms: u64, changes: &mut Changes) {
        if now < self.last_catch_up.saturating_add(timeout_ms / 2) {
            return;
        }
        let me = self.key.ipk();
        let Some(orderer) = self.orderer().filter(|o| *o != me) else {
            return;
        };
        let again = self.last_catch_up != 0
            && now
                < self
                    .last_catch_up
                    .saturating_add(CATCH_UP_AGAIN * timeout_ms);
        self.last_catch_up = now;
        let payload = Payload::CatchUp {
            epoch: self.epoch(),
            from: me,
        }
        .encode();
        self.outbox_to(orderer, &payload, changes, now);
        if again {
            let others: Vec<Ipk> = self
                .record
                .members
                .iter()
                .map(|m| m.ipk)
                .filter(|m| *m != orderer && *m != me)
                .collect();
            if !others.is_empty() {
                self.catch_up_turn = self.catch_up_turn.wrapping_add(1);
                let other = others[self.catch_up_turn % others.len()];
                self.outbox_to(other, &payload, changes, now);
            }
        }
    }

    /// Sends a member that fell behind the accepted commits since `epoch`.
    fn serve_catch_up(
        &mut self,
        epoch: u64,
        from: Ipk,
        now: u64,
        changes: &mut Changes,
    ) -> Result<Received, GroupError> {
        if from == self.key.ipk() || !self.record.members.iter().any(|m| m.ipk == from) {
            return Err(self.outsider(from));
        }
        self.send_log_since(epoch, from, now, changes)?;
        Ok(Received::Other)
    }

    /// Sends `to` the accepted commits from `epoch` on that we hold.
    fn send_log_since(
        &mut self,
        epoch: u64,
        to: Ipk,
        now: u64,
        changes: &mut Changes,
    ) -> Result<(), GroupError> {
        if epoch >= self.epoch() {
            return Ok(());
        }
        let group = self.record.id.0;
        let until = self.epoch();
        let missed: Vec<Vec<u8>> = self.provider_store().read(|tx| {
            let t = tx.open_table(tables::ORDERED_LOG)?;
            let mut out = Vec::new();
            for e in t.range((group, epoch)..(group, until))? {
                out.push(e?.1.value().to_vec());
            }
            Ok(out)
        })?;
        for payload in missed {
            self.outbox_to(to, &payload, changes, now);
        }
        Ok(())
    }

    /// A step of a view change, or an acceptance (see [`ViewStep`]), from
    /// a member.
    fn receive_view(
        &mut self,
        m: ViewMessage,
        signature: &[u8; SIGNATURE_LEN],
        now: u64,
        changes: &mut Changes,
    ) -> Result<Received, GroupError> {
        let me = self.key.ipk();
        if m.from == me || !self.is_member(&m.from) {
            return Err(self.outsider(m.from));
        }
        if m.accepted
            .as_ref()
            .is_some_and(|a| <[u8; 32]>::from(Sha256::digest(&a.commit)) != m.digest)
        {
            return Err(GroupError::BadOrdering);
        }
        let accepted_rank = match m.step {
            ViewStep::Promise => m.accepted.as_ref().map(|a| a.rank),
            ViewStep::Accept => Some(m.rank),
            ViewStep::Sync => None,
        };
        m.from
            .verify(
                &view_message(
                    &self.record.group_id,
                    m.step,
                    m.rank,
                    m.epoch,
                    &m.from,
                    &m.digest,
                    accepted_rank,
                ),
                signature,
            )
            .map_err(|_| GroupError::BadOrdering)?;
        match m.step {
            ViewStep::Sync if self.record.state != GroupState::Active => {
                // Our placeholder's vote is its introducer's until we claim.
                self.adopt_rank(m.rank, now, changes);
            }
            ViewStep::Sync => {
                if m.rank < self.record.orderer_rank {
                    // The asker is behind (an ordering service back from a
                    // crash): tell it where the group is.
                    let promise = self.view_payload(ViewStep::Promise, self.epoch(), None);
                    self.outbox_to(m.from, &promise, changes, now);
                    return Ok(Received::Other);
                }
                self.adopt_rank(m.rank, now, changes);
                // What the asker lacks first, then the promise: it orders
                // only once it holds what we had.
                self.send_log_since(m.epoch, m.from, now, changes)?;
                let epoch = self.epoch();
                let accepted = self.record.accepted.clone().filter(|a| a.epoch == epoch);
                let promise = self.view_payload(
                    ViewStep::Promise,
                    epoch,
                    accepted.as_ref().map(|a| (a.rank, a.commit.as_slice())),
                );
                self.outbox_to(m.from, &promise, changes, now);
            }
            ViewStep::Promise => {
                if m.rank > self.record.orderer_rank {
                    self.adopt_rank(m.rank, now, changes);
                } else if let Some(round) = self.sync.as_mut().filter(|r| r.rank == m.rank) {
                    if !round.promised.contains(&m.from) {
                        round.promised.push(m.from);
                    }
                    round.highest = round.highest.max(m.epoch);
                    if let Some(a) = m.accepted {
                        round.accepted.push((m.epoch, a.rank, a.commit));
                    }
                    self.propose_next(now, changes)?;
                }
            }
            ViewStep::Accept => {
                let rank = self.record.orderer_rank;
                let accepted = self
                    .proposal
                    .as_mut()
                    .filter(|p| m.rank == rank && p.epoch == m.epoch && p.digest == m.digest);
                if let Some(p) = accepted {
                    if !p.acks.contains(&m.from) {
                        p.acks.push(m.from);
                    }
                    self.decide_if_accepted(now, changes)?;
                }
            }
        }
        self.save(changes);
        Ok(Received::Other)
    }

    /// As the ordering service: sends our proposal again to the members
    /// that have not accepted it, at most every [`ASK_AGAIN_MS`].
    fn propose_again(&mut self, now: u64, changes: &mut Changes) {
        let Some(p) = self
            .proposal
            .as_mut()
            .filter(|p| now >= p.asked.saturating_add(ASK_AGAIN_MS))
        else {
            return;
        };
        p.asked = now;
        let (epoch, commit, acks) = (p.epoch, p.commit.clone(), p.acks.clone());
        let payload = self.proposal_payload(epoch, &commit);
        let me = self.key.ipk();
        for ipk in self.roster() {
            if ipk != me && !acks.contains(&ipk) {
                self.outbox_to(ipk, &payload, changes, now);
            }
        }
    }

    /// Leaves the group: the ordering service removes us. We stop at once.
    pub fn leave(&mut self, now: u64, changes: &mut Changes) -> Result<(), GroupError> {
        if self.record.state == GroupState::Gone {
            return Err(GroupError::Gone);
        }
        if self.record.state == GroupState::Invited && self.record.claiming() {
            return Err(GroupError::ClaimPending);
        }
        // Someone we are adding, sent to the ordering service, could still
        // be ordered in: a placeholder with no one to vote for it. (What
        // is only queued is dropped with the rest.)
        let adding = self
            .record
            .pending
            .as_ref()
            .is_some_and(|p| matches!(p.intent, Intent::Add { .. }));
        if adding {
            return Err(GroupError::AddingBeforeLeaving);
        }
        if self.record.state == GroupState::Active {
            let stranded = self.stranded_without(&[self.key.ipk()]);
            if !stranded.is_empty() {
                let names: Vec<String> = stranded
                    .iter()
                    .filter_map(|k| self.member(*k).ok())
                    .map(|m| m.display.name.clone())
                    .collect();
                return Err(GroupError::LeavingPlaceholders(names.join(", ")));
            }
        }
        let epoch = self.epoch();
        let accepted = self
            .record
            .accepted
            .clone()
            .filter(|a| a.epoch == epoch)
            .map(|a| Accepted {
                rank: a.rank,
                commit: a.commit,
            });
        let payload = self.encrypt(Body::Leave { accepted })?;
        // Everyone learns it (we answer nothing from now on); the ordering
        // service removes us, the next one if that was us.
        self.fan_out(&payload, OutboxKind::Control, None, None, changes, now);
        self.record.state = GroupState::Gone;
        self.record.intents.clear();
        self.record.pending = None;
        self.save(changes);
        Ok(())
    }

    /// Why a group that is not a pending introduction cannot be claimed or
    /// declined: we left it (or declined it), made it, or `claimed`.
    fn not_invited(&self, claimed: GroupError) -> GroupError {
        match (self.record.state, self.record.introduced) {
            (GroupState::Gone, _) => GroupError::Gone,
            (_, None) => GroupError::OwnGroup,
            _ => claimed,
        }
    }

    /// Declines an introduction: the introducer removes the placeholder; we
    /// drop the group.
    pub fn decline(&mut self, changes: &mut Changes) -> Result<(), GroupError> {
        if self.record.state != GroupState::Invited {
            return Err(self.not_invited(GroupError::ClaimedNotDeclinable));
        }
        // The others would take us in while we dropped the group.
        if self.record.claiming() {
            return Err(GroupError::ClaimPending);
        }
        if let Some((via, _)) = self.record.introduced {
            self.record.relays.push(Relay {
                id: rand::random(),
                via,
                body: Body::Decline {
                    group_id: self.record.group_id.clone(),
                },
            });
        }
        self.record.state = GroupState::Gone;
        self.save(changes);
        Ok(())
    }

    /// A relay was queued by its proton: forget it.
    pub fn relay_done(&mut self, id: [u8; 16], changes: &mut Changes) {
        let before = self.record.relays.len();
        self.record.relays.retain(|r| r.id != id);
        if self.record.relays.len() != before {
            self.save(changes);
        }
    }

    /// Marks a member verified (checked out of band).
    /// The member with key `ipk` (not us).
    fn member(&self, ipk: Ipk) -> Result<&Member, GroupError> {
        if let Some(m) = self.record.members.iter().find(|m| m.ipk == ipk) {
            return Ok(m);
        }
        // Named by its placeholder's key just before its claim landed.
        let claimed = self.record.members.iter().find(|m| {
            matches!(m.status, MemberStatus::Claimed { placeholder } if placeholder == ipk)
                || m.claim.as_ref().is_some_and(|a| a.first == ipk)
        });
        Err(match claimed {
            Some(m) => GroupError::JustClaimed(m.display.name.clone()),
            None => GroupError::UnknownMember(ipk.fingerprint()),
        })
    }

    /// Refuses `action` on a member that is still a placeholder.
    fn not_a_placeholder(&self, m: &Member, action: &'static str) -> Result<(), GroupError> {
        let MemberStatus::Placeholder { asserted_by } = m.status else {
            return Ok(());
        };
        let asserted_by = match self.record.members.iter().find(|a| a.ipk == asserted_by) {
            Some(a) => format!("{} asserts (and holds the key of)", a.display.name),
            None if asserted_by == self.key.ipk() => "you assert (and hold the key of)".into(),
            None => format!(
                "{} asserts (and holds the key of)",
                asserted_by.fingerprint()
            ),
        };
        Err(GroupError::PlaceholderMember {
            name: m.display.name.clone(),
            asserted_by,
            action,
        })
    }

    pub fn verify_member(&mut self, member: Ipk, changes: &mut Changes) -> Result<(), GroupError> {
        // Its introducer holds a placeholder's key: checking it out of band
        // cannot show that only the invitee does.
        self.not_a_placeholder(self.member(member)?, "verify")?;
        if let Some(m) = std::sync::Arc::make_mut(&mut self.record.members)
            .iter_mut()
            .find(|m| m.ipk == member)
        {
            m.status = MemberStatus::Verified;
        }
        self.save(changes);
        Ok(())
    }
}

/// The bytes the ordering service signs for a commit it proposes or orders.
fn commit_message(label: &[u8], group_id: &[u8], epoch: u64, rank: u32, commit: &[u8]) -> Vec<u8> {
    let mut m = label.to_vec();
    m.push(0);
    m.extend_from_slice(&(group_id.len() as u32).to_be_bytes());
    m.extend_from_slice(group_id);
    m.extend_from_slice(&epoch.to_be_bytes());
    m.extend_from_slice(&rank.to_be_bytes());
    m.extend_from_slice(&Sha256::digest(commit));
    m
}

/// The bytes a member signs for a step of a view change or an acceptance.
fn view_message(
    group_id: &[u8],
    step: ViewStep,
    rank: u32,
    epoch: u64,
    from: &Ipk,
    digest: &[u8; 32],
    accepted_rank: Option<u32>,
) -> Vec<u8> {
    let mut m = VIEW_LABEL.to_vec();
    m.push(0);
    m.extend_from_slice(&(group_id.len() as u32).to_be_bytes());
    m.extend_from_slice(group_id);
    m.push(match step {
        ViewStep::Sync => 1,
        ViewStep::Promise => 2,
        ViewStep::Accept => 3,
    });
    m.extend_from_slice(&rank.to_be_bytes());
    m.extend_from_slice(&epoch.to_be_bytes());
    m.extend_from_slice(from.as_bytes());
    m.extend_from_slice(digest);
    match accepted_rank {
        Some(r) => {
            m.push(1);
            m.extend_from_slice(&r.to_be_bytes());
        }
        None => m.push(0),
    }
    m
}

/// The bytes a side invitation's sender signs.
fn side_message(group_id: &[u8], from: &Ipk, sealed: &[u8]) -> Vec<u8> {
    let mut m = SIDE_LABEL.to_vec();
    m.push(0);
    m.extend_from_slice(&(group_id.len() as u32).to_be_bytes());
    m.extend_from_slice(group_id);
    m.extend_from_slice(from.as_bytes());
    m.extend_from_slice(&Sha256::digest(sealed));
    m
}

/// A claim commit's authenticated data must be "`new` follows `old`",
/// signed by both.
fn verify_claim(aad: &[u8], old: Ipk, new: Ipk) -> Result<Attestation, AttestationError> {
    let aad: ClaimAad = postcard::from_bytes(aad).map_err(|_| AttestationError::Mismatch)?;
    aad.follows.verify_as(Kind::Follows, &old, &new)?;
    Ok(aad.follows)
}

/// The label of the key a claim's member info is sealed under.
const CLAIM_INFO_LABEL: &str = "protonode/v1/claim-info";

/// The label of the key an addition's member infos are sealed under.
const ADD_INFO_LABEL: &str = "protonode/v1/add-info";

/// What an addition's commit carries in its authenticated data (older
/// nodes read none): the [`MemberInfo`] of each placeholder it adds, as
/// the adder describes them, sealed for the members of the epoch it
/// commits from. They name the new members, and know them for
/// placeholders, in the same step as the commit; the adder's announcement
/// (a group message that may come later, or not at all to a member that
/// was offline) says it again.
#[derive(serde::Serialize, serde::Deserialize)]
struct AddAad {
    infos: Vec<u8>,
}

/// How long after applying a member's removal we still take texts they
/// wrote before it (in an epoch they were a member of). A removal and the
/// removed member's last messages travel apart, from different nodes; a
/// text the author's node sent before it learnt of its removal reaches
/// every member within retries of each other, not at once.
const REMOVED_GRACE_MS: u64 = 60_000;

/// A catch-up request within this many ordering timeouts of the last one
/// means that one brought nothing: another member is asked too.
const CATCH_UP_AGAIN: u64 = 4;

/// How long a message from a key the group does not know yet
/// ([`GroupError::NotYetAMember`]) is kept, waiting for the commit that
/// adds it: catching up takes seconds once the ordering node is up, so
/// an hour covers its being down for a while.
pub const HOLD_UNKNOWN_SENDER_MS: u64 = 60 * 60 * 1000;

/// The authenticated data of a commit that removes members who asked to
/// leave (a removal's is otherwise empty; a claim's is a [`ClaimAad`]).
/// Older nodes read no removal's AAD, and see a removal.
const LEAVE_AAD: &[u8] = b"protonode: they left";

/// What a claim commit carries in its authenticated data (which travels in
/// the clear, signed with the commit).
#[derive(serde::Serialize, serde::Deserialize)]
struct ClaimAad {
    /// "The claimer's new key follows the placeholder", signed by both.
    follows: Attestation,
    /// The claimer's [`MemberInfo`] under its new key (transports, direct
    /// key, display), sealed for the members of the epoch the claim commits
    /// from: they learn it with the claim, in the same step, and nobody
    /// else can read it.
    info: Vec<u8>,
}

fn decode_bundle_key_package(bundle: &[u8]) -> Result<openmls::prelude::KeyPackage, GroupError> {
    let bundle: openmls::prelude::KeyPackageBundle =
        serde_json::from_slice(bundle).map_err(|e| MlsError::Decode(e.to_string()))?;
    Ok(bundle.key_package().clone())
}

/// Reads the records of some protons.
pub fn load_protons(
    store: &Store,
    ids: impl IntoIterator<Item = crate::model::ProtonId>,
) -> Result<Vec<ProtonRecord>, StoreError> {
    let ids: Vec<_> = ids.into_iter().collect();
    store.read(|tx| {
        let t = tx.open_table(tables::PROTONS)?;
        let mut out = Vec::new();
        for id in ids {
            if let Some(p) = store::get(&t, id.0, "proton")? {
                out.push(p);
            }
        }
        Ok(out)
    })
}

/// Every group proton.
/// Our membership (not gone) of the MLS group `group_id`, if any: one
/// lookup in the index of group ids (see `tables::GROUP_IDS`).
pub fn find_by_group_id(
    store: &Store,
    group_id: &[u8],
) -> Result<Option<GroupProtonId>, StoreError> {
    store.read(|tx| {
        let t = tx.open_table(tables::GROUP_IDS)?;
        let mut range = t.range((group_id, [0u8; 8])..=(group_id, [0xff; 8]))?;
        Ok(match range.next() {
            Some(entry) => Some(GroupProtonId(entry?.0.value().1)),
            None => None,
        })
    })
}

/// One group record, by its id: one read.
pub fn get_group(
    store: &Store,
    id: GroupProtonId,
) -> Result<Option<GroupProtonRecord>, StoreError> {
    store.read(|tx| store::get(&tx.open_table(tables::GROUPS)?, id.0, "group"))
}

/// Groups we are still in whose other members are exactly the peers of
/// these relationships (see [`Member::stands_for`]).
pub fn groups_of_exactly(
    store: &Store,
    protons: &[crate::model::ProtonId],
) -> Result<Vec<GroupProtonRecord>, StoreError> {
    let mut distinct = protons.to_vec();
    distinct.sort_unstable_by_key(|p| p.0);
    distinct.dedup();
    if distinct.len() != protons.len() {
        return Ok(Vec::new());
    }
    let mut groups = all_groups(store)?;
    groups.retain(|g| {
        g.state != GroupState::Gone
            && g.members.len() == protons.len()
            && protons
                .iter()
                .all(|p| g.members.iter().any(|m| m.stands_for(*p)))
    });
    Ok(groups)
}

pub fn all_groups(store: &Store) -> Result<Vec<GroupProtonRecord>, StoreError> {
    store.read(|tx| {
        let t = tx.open_table(tables::GROUPS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (_, v) = e?;
            out.push(store::decode(v.value(), "group")?);
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    //! Alex introduces Blair and Charlie, three stores, no network: each
    //! outbox row is handed to its recipient by hand.
    use super::*;
    use crate::relationship::{accept_invite, create_invite, receive_welcome, ProtonSession};
    use std::time::Duration;

    const LIFETIMES: Lifetimes = Lifetimes {
        ephemeral: Duration::from_secs(3600),
        long_term: Duration::from_secs(365 * 24 * 3600),
    };

    struct Person {
        name: &'static str,
        _dir: tempfile::TempDir,
        store: Store,
        node: NodeAddrs,
    }

    fn person(name: &'static str) -> Person {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let node = NodeAddrs {
            peer: transports::PeerId::random(),
            addrs: vec![
                "/ip4/127.0.0.1/tcp/4001".parse().unwrap(),
                "/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap(),
            ],
            service_key: store.service_key().unwrap().public(),
        };
        Person {
            name,
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

    fn commit(p: &Person, changes: Changes) -> crate::changes::Applied {
        p.store.write_blocking(move |tx| changes.apply(tx)).unwrap()
    }

    /// `inviter` invites `other`; returns (proton at inviter, proton at other).
    fn befriend(
        inviter: &Person,
        other: &Person,
    ) -> (crate::model::ProtonId, crate::model::ProtonId) {
        let invite = create_invite(
            &inviter.store,
            &inviter.node,
            display(inviter.name),
            LIFETIMES,
            Duration::from_secs(60),
            None,
            1,
        )
        .unwrap();
        let ticket = invite.ticket.clone();
        commit(inviter, invite.changes);
        let acceptance = accept_invite(
            &other.store,
            &other.node,
            display(other.name),
            LIFETIMES,
            &invite.text,
            None,
            2,
        )
        .unwrap();
        let answer = acceptance.changes.outbox[0].payload.clone();
        let theirs = acceptance.proton.id;
        commit(other, acceptance.changes);
        let (ours, changes) = receive_welcome(
            &inviter.store,
            &ticket,
            &Payload::decode(&answer).unwrap(),
            0,
            3,
        )
        .unwrap();
        commit(inviter, changes);
        let mut session = ProtonSession::load(&other.store, theirs).unwrap();
        let mut c = Changes::default();
        session.set_state(crate::records::ProtonState::Active);
        c.protons.push(session.record().clone());
        commit(other, c);
        (ours.id, theirs)
    }

    /// Sends a relay through its proton and has the peer's proton process it.
    fn relay(
        from: &Person,
        to: &Person,
        to_proton: crate::model::ProtonId,
        relay: &Relay,
    ) -> crate::relationship::Received {
        let mut s = ProtonSession::load(&from.store, relay.via).unwrap();
        let mut c = Changes::default();
        s.send_control(relay.body.clone(), &from.node, LIFETIMES, 10, &mut c)
            .unwrap();
        s.drain_writes(&mut c);
        let payload = c.outbox[0].payload.clone();
        commit(from, c);
        let mut r = ProtonSession::load(&to.store, to_proton).unwrap();
        let mut c = Changes::default();
        let got = r.receive(&payload, 11, &mut c).unwrap();
        r.drain_writes(&mut c);
        commit(to, c);
        got
    }

    /// Alex befriends Blair and Charlie and makes the group "Trio" that
    /// introduces them (committed at Alex): the relationships AB, BA, AC,
    /// CA, and Alex's group record.
    fn alex_introduces(
        alex: &Person,
        blair: &Person,
        charlie: &Person,
    ) -> ([crate::model::ProtonId; 4], GroupProtonRecord) {
        let (ab, ba) = befriend(alex, blair);
        let (ac, ca) = befriend(alex, charlie);
        let via = load_protons(&alex.store, [ab, ac]).unwrap();
        let (record, changes) = create_group(
            &alex.store,
            &alex.node,
            display("Alex"),
            LIFETIMES,
            &via,
            Some("Trio".into()),
            5,
        )
        .unwrap();
        commit(alex, changes);
        ([ab, ba, ac, ca], record)
    }

    fn group_of(p: &Person) -> GroupSession {
        let g = all_groups(&p.store).unwrap().into_iter().next().unwrap();
        GroupSession::load(&p.store, g.id).unwrap()
    }

    /// Runs `f` on a session and commits; returns the outbox rows.
    fn step(
        p: &Person,
        s: &mut GroupSession,
        f: impl FnOnce(&mut GroupSession, &mut Changes),
    ) -> Vec<OutboxEntry> {
        let mut c = Changes::default();
        f(s, &mut c);
        s.drain_writes(&mut c);
        let rows = c.outbox.clone();
        commit(p, c);
        rows
    }

    fn deliver(p: &Person, s: &mut GroupSession, payload: &[u8]) -> Result<Received, GroupError> {
        let mut c = Changes::default();
        let r = s.receive(payload, None, 20, &mut c);
        s.drain_writes(&mut c);
        commit(p, c);
        r
    }

    /// The ordering service `o` takes a member's commit request. It holds
    /// a majority of the votes (its own, and those of the placeholders it
    /// introduced), so it orders it at once: the rows of the ordered commit
    /// come back.
    fn order(op: &Person, o: &mut GroupSession, request: &[u8], now: u64) -> Vec<OutboxEntry> {
        step(op, o, |s, ch| {
            assert_eq!(s.receive(request, None, now, ch).unwrap(), Received::Other);
        })
    }

    fn rows_for(rows: &[OutboxEntry], ipk: Ipk) -> Vec<Vec<u8>> {
        rows.iter()
            .filter(|r| r.recipient == Recipient::Member(ipk))
            .map(|r| r.payload.clone())
            .collect()
    }

    /// Which of our groups is in an MLS group is one index lookup; the
    /// index follows the records (a group gone leaves it) and is built
    /// from them when a database made before it is opened.
    #[test]
    fn groups_are_found_by_mls_group_id_also_in_an_older_database() {
        let (alex, blair, charlie) = (person("Alex"), person("Blair"), person("Charlie"));
        let (_, record) = alex_introduces(&alex, &blair, &charlie);
        let found = |store: &Store| find_by_group_id(store, &record.group_id).unwrap();
        assert_eq!(found(&alex.store), Some(record.id));
        assert_eq!(
            find_by_group_id(&alex.store, b"another group").unwrap(),
            None
        );
        let prefix = &record.group_id[..record.group_id.len() - 1];
        assert_eq!(find_by_group_id(&alex.store, prefix).unwrap(), None);

        // A version 2 database: records, no index.
        alex.store
            .write_blocking(|tx| {
                tx.delete_table(tables::GROUP_IDS)?;
                tx.open_table(tables::META)?
                    .insert("schema_version", 2u32.to_be_bytes().as_slice())?;
                Ok(())
            })
            .unwrap();
        let Person {
            _dir: dir, store, ..
        } = alex;
        drop(store);
        let store = Store::open(&dir.path().join("db")).unwrap();
        assert_eq!(found(&store), Some(record.id), "built on open");
        // Migrated once: a node of version 2 would not keep the index.
        let version = store
            .read(|tx| {
                let meta = tx.open_table(tables::META)?;
                let v = meta.get("schema_version")?.map(|v| v.value().to_vec());
                Ok(v)
            })
            .unwrap();
        assert_eq!(
            version,
            Some(super::store::SCHEMA_VERSION.to_be_bytes().to_vec())
        );

        let mut gone = record.clone();
        gone.state = GroupState::Gone;
        store
            .write_blocking(|tx| {
                Changes {
                    groups: vec![gone],
                    ..Changes::default()
                }
                .apply(tx)
            })
            .unwrap();
        assert_eq!(found(&store), None, "a group we left is not ours");
    }

    /// Each invitee's node gets one address derived for the group, on all
    /// of its transports: only that node resolves it, to its relationship
    /// with the introducer, under the group's context.
    #[test]
    fn an_invitee_s_transports_share_one_derived_address() {
        let (alex, blair, charlie) = (person("Alex"), person("Blair"), person("Charlie"));
        let ([_, ba, _, ca], record) = alex_introduces(&alex, &blair, &charlie);
        for (member, (invitee, proton)) in record.members.iter().zip([(&blair, ba), (&charlie, ca)])
        {
            assert_eq!(member.transports.len(), 2, "TCP and QUIC");
            let address = &member.transports[0].long_term.address;
            assert!(member
                .transports
                .iter()
                .all(|t| t.long_term.address == *address && t.ephemeral.address == *address));
            let transports::Address::Derived(derived) = address else {
                panic!("a plain address for an invitee: {address:?}");
            };
            let (base, context) = invitee
                .store
                .service_key()
                .unwrap()
                .resolve(derived)
                .unwrap();
            assert_eq!(context, record.context);
            let owner = invitee
                .store
                .read(|tx| {
                    store::get::<_, AddressRecord, _>(
                        &tx.open_table(tables::ADDRESSES)?,
                        *base.as_bytes(),
                        "address",
                    )
                })
                .unwrap()
                .map(|r| r.owner);
            assert_eq!(owner, Some(Owner::Proton(proton)));
            assert_eq!(alex.store.service_key().unwrap().resolve(derived), None);
        }
    }

    /// A claim whose sealed member info does not open (garbage, or sealed
    /// for another epoch) still replaces the placeholder, so the members
    /// stay in step, but nobody takes anything from it: the placeholder's
    /// transports stay, and the claim counts as verified only through its
    /// follows attestation.
    #[test]
    fn a_claim_with_info_that_does_not_open_changes_only_the_key() {
        let (alex, blair, charlie) = (person("Alex"), person("Blair"), person("Charlie"));
        let ([_, ba, _, ca], record) = alex_introduces(&alex, &blair, &charlie);
        for (r, (to, proton)) in record.relays.iter().zip([(&blair, ba), (&charlie, ca)]) {
            relay(&alex, to, proton, r);
        }
        let (mut a, mut b, mut c) = (group_of(&alex), group_of(&blair), group_of(&charlie));
        let placeholder_b = b.own_ipk();
        let before = |s: &GroupSession| {
            let m = s.record().members.iter().find(|m| m.ipk == placeholder_b);
            m.map(|m| (m.transports.clone(), m.direct_key, m.display.clone()))
        };
        let (at_alex, at_charlie) = (before(&a).unwrap(), before(&c).unwrap());

        let new = IdentityKey::generate();
        let garbage = ClaimAad {
            follows: Attestation::follows(&b.key, &new, 40),
            info: vec![7; 64],
        };
        let aad = postcard::to_allocvec(&garbage).unwrap();
        let commit = mls::stage_claim(&mut b.group, &b.provider, &b.key, &new, aad).unwrap();
        let request = Payload::Commit { commit, rank: 0 }.encode();
        let fanned = order(&alex, &mut a, &request, 42);
        let ordered = rows_for(&fanned, c.own_ipk()).pop().unwrap();
        assert_eq!(
            deliver(&charlie, &mut c, &ordered).unwrap(),
            Received::Committed
        );
        for (s, was) in [(&a, at_alex), (&c, at_charlie)] {
            let m = s
                .record()
                .members
                .iter()
                .find(|m| m.ipk == new.ipk())
                .expect("the new key replaced the placeholder");
            assert_eq!((m.transports.clone(), m.direct_key, m.display.clone()), was);
            assert!(m.claim.is_some(), "the follows attestation verified");
        }
        assert_eq!(a.epoch_authenticator(), c.epoch_authenticator());
    }

    /// The members know whom an addition's placeholder stands for, and
    /// whose word that is, from the commit itself: not only once the
    /// adder's announcement (a group message of its own) comes.
    #[test]
    fn the_members_learn_who_an_addition_is_for_with_its_commit() {
        let (alex, blair, charlie) = (person("Alex"), person("Blair"), person("Charlie"));
        let dana = person("Dana");
        let ([_, ba, _, ca], record) = alex_introduces(&alex, &blair, &charlie);
        for (r, (to, proton)) in record.relays.iter().zip([(&blair, ba), (&charlie, ca)]) {
            relay(&alex, to, proton, r);
        }
        let (mut a, mut b) = (group_of(&alex), group_of(&blair));
        let (ad, _) = befriend(&alex, &dana);
        let via = load_protons(&alex.store, [ad]).unwrap();
        // Alex orders it at once: his vote and his placeholders' are a majority.
        let rows = step(&alex, &mut a, |s, ch| {
            s.add(&alex.store, &via, 50, ch).unwrap()
        });
        let placeholder = a
            .record()
            .members
            .iter()
            .find(|m| m.display.name == "Dana")
            .unwrap()
            .clone();
        let (ordered, others): (Vec<_>, Vec<_>) = rows_for(&rows, b.own_ipk())
            .into_iter()
            .partition(|p| matches!(Payload::decode(p), Ok(Payload::Ordered { .. })));
        assert_eq!(ordered.len(), 1);
        assert!(!others.is_empty(), "the announcement is sent too");
        assert_eq!(
            deliver(&blair, &mut b, &ordered[0]).unwrap(),
            Received::Committed
        );
        let seen = b
            .record()
            .members
            .iter()
            .find(|m| m.ipk == placeholder.ipk)
            .unwrap()
            .clone();
        assert_eq!(seen.display.name, "Dana");
        assert_eq!(
            seen.status,
            MemberStatus::Placeholder {
                asserted_by: a.own_ipk()
            }
        );
        assert_eq!(seen.introduced_by, Some(a.own_ipk()));
        assert_eq!(seen.transports, placeholder.transports);
        assert_eq!(a.epoch_authenticator(), b.epoch_authenticator());
    }

    /// An addition or removal can move the ordering rank onto a placeholder
    /// nobody orders for yet. A member whose commit waits for it moves to
    /// the next rank at its next check, not after the ordering timeout.
    #[test]
    fn a_placeholder_at_the_ordering_rank_is_passed_over_at_once() {
        let (alex, blair, charlie) = (person("Alex"), person("Blair"), person("Charlie"));
        let ([_, ba, _, ca], record) = alex_introduces(&alex, &blair, &charlie);
        for (r, (to, proton)) in record.relays.iter().zip([(&blair, ba), (&charlie, ca)]) {
            relay(&alex, to, proton, r);
        }
        let (a, mut b, c) = (group_of(&alex), group_of(&blair), group_of(&charlie));
        let roster = b.roster();
        let at = |ipk: Ipk| roster.iter().position(|i| *i == ipk).unwrap() as u32;
        let ba_record = load_protons(&blair.store, [ba]).unwrap().pop().unwrap();
        step(&blair, &mut b, |s, ch| {
            s.claim(&ba_record, &blair.node, LIFETIMES, 40, ch).unwrap()
        });
        // Within the timeout, an ordering service that may answer is waited for.
        b.record.orderer_rank = at(a.own_ipk());
        let mut ch = Changes::default();
        assert!(!b.check_ordering(41, 10_000, &mut ch).unwrap());
        // After a restart, the timeout counts from the restart; never back.
        b.restart_ordering_clock(30);
        assert_eq!(b.record().pending.as_ref().unwrap().sent_at, 40);
        b.restart_ordering_clock(41);
        assert_eq!(b.record().pending.as_ref().unwrap().sent_at, 41);
        // Her own placeholder (she has not claimed yet), then Charlie's:
        // nobody orders there, so she moves on without waiting, to Alex.
        b.record.orderer_rank = at(b.own_ipk());
        for (next, rank) in [
            (c.own_ipk(), at(c.own_ipk())),
            (a.own_ipk(), roster.len() as u32),
        ] {
            let mut ch = Changes::default();
            assert!(b.check_ordering(41, 10_000, &mut ch).unwrap());
            assert_eq!(b.record().orderer_rank, rank);
            assert_eq!(b.orderer(), Some(next));
            assert!(
                !rows_for(&ch.outbox, next).is_empty(),
                "the claim goes to the next ordering service"
            );
        }
        // Alex may answer: waited for again.
        let mut ch = Changes::default();
        assert!(!b.check_ordering(42, 10_000, &mut ch).unwrap());
    }

    /// A replayed message, or one sent at an epoch we have not reached
    /// (kept for later), is refused before openmls writes anything: the
    /// group's state is kept as it is in memory, not decoded again from
    /// the store (with every past epoch's secrets, the cost that grows
    /// with members times kept epochs). What comes next is received as
    /// before.
    #[test]
    fn a_refused_replay_or_early_message_does_not_reload_the_group() {
        let (alex, blair, charlie) = (person("Alex"), person("Blair"), person("Charlie"));
        let ([_, ba, _, ca], record) = alex_introduces(&alex, &blair, &charlie);
        for (r, (to, proton)) in record.relays.iter().zip([(&blair, ba), (&charlie, ca)]) {
            relay(&alex, to, proton, r);
        }
        let (mut a, mut b) = (group_of(&alex), group_of(&blair));
        let blair_ipk = b.own_ipk();
        // Alex writes `text`; Blair's copy.
        let mut write = |text: &str, now| {
            let rows = step(&alex, &mut a, |s, ch| {
                s.send_text(text, now, ch).unwrap();
            });
            rows_for(&rows, blair_ipk)[0].clone()
        };
        let gets = |s: &mut GroupSession, payload: &[u8], text: &str| {
            let got = deliver(&blair, s, payload).unwrap();
            assert!(
                matches!(&got, Received::Text(e) if e.text == text),
                "{got:?}"
            );
        };
        let first = write("one", 30);
        gets(&mut b, &first, "one");
        let authenticator = b.epoch_authenticator();

        let loads = mls::LOADS.get();
        let mut ch = Changes::default();
        let replay = b.receive(&first, None, 31, &mut ch);
        assert!(replay.is_err(), "a replay is refused: {replay:?}");
        assert!(ch.history.is_empty() && ch.outbox.is_empty());
        b.drain_writes(&mut ch);
        assert!(ch.mls.is_empty(), "a refused replay writes nothing");
        // The same message, said to be of the next epoch: kept for later.
        let Ok(Payload::Mls(mut early)) = Payload::decode(&first) else {
            panic!("an MLS message")
        };
        // MLSMessage: version (2 bytes), wire format (2), then the
        // PrivateMessage: its group id (a 1-byte length here), its epoch.
        let at = 5 + usize::from(early[4]);
        let epoch = u64::from_be_bytes(early[at..at + 8].try_into().unwrap());
        assert_eq!(epoch, b.epoch());
        early[at..at + 8].copy_from_slice(&(epoch + 1).to_be_bytes());
        let mut ch = Changes::default();
        assert!(matches!(
            b.receive(&Payload::Mls(early).encode(), None, 32, &mut ch),
            Err(GroupError::Deferred)
        ));
        assert_eq!(mls::LOADS.get(), loads, "no reload for either");
        assert_eq!(b.epoch_authenticator(), authenticator);

        gets(&mut b, &write("two", 33), "two");
        // Across a restart too: what was committed is what was in memory.
        let mut reloaded = group_of(&blair);
        assert_eq!(reloaded.epoch_authenticator(), authenticator);
        gets(&mut reloaded, &write("three", 34), "three");
    }

    #[test]
    fn alex_introduces_blair_and_charlie_who_claim_their_placeholders() {
        let (alex, blair, charlie) = (person("Alex"), person("Blair"), person("Charlie"));
        // Alex forms the group with placeholders; introductions go inside AB and AC.
        let ([ab, ba, ac, ca], record) = alex_introduces(&alex, &blair, &charlie);
        assert_eq!(record.relays.len(), 2);
        assert!(record
            .members
            .iter()
            .all(|m| matches!(m.status, MemberStatus::Placeholder { .. })));
        for (r, (to, proton)) in record.relays.iter().zip([(&blair, ba), (&charlie, ca)]) {
            assert!(matches!(
                relay(&alex, to, proton, r),
                crate::relationship::Received::Joined(_)
            ));
        }
        // The introduction again (as when two members add someone at once):
        // Blair joins nothing new, and is told to decline the extra one.
        assert!(matches!(
            relay(&alex, &blair, ba, &record.relays[0]),
            crate::relationship::Received::AlreadyInGroup(ref g) if *g == record.group_id
        ));
        let (mut a, mut b, mut c) = (group_of(&alex), group_of(&blair), group_of(&charlie));
        assert_eq!(b.record().state, GroupState::Invited);
        assert_eq!(a.epoch_authenticator(), b.epoch_authenticator());
        assert_eq!(a.epoch_authenticator(), c.epoch_authenticator());
        // Blair sees Alex linked (Alex's equivalence verified) and Charlie as a placeholder Alex asserts.
        let alex_ipk = a.own_ipk();
        let seen = |s: &GroupSession, ipk: Ipk| {
            s.record()
                .members
                .iter()
                .find(|m| m.ipk == ipk)
                .unwrap()
                .status
                .clone()
        };
        assert_eq!(seen(&b, alex_ipk), MemberStatus::Linked { proton: ba });
        // Blair has no relationship with Charlie, but dials Charlie's node
        // at start-up too, so that what waits there for her flows at once.
        let charlie_node = c.record().own_transports[0].peer_id().unwrap();
        assert!(crate::relationship::known_peers(&blair.store)
            .unwrap()
            .contains_key(&charlie_node));
        assert_eq!(
            seen(&b, c.own_ipk()),
            MemberStatus::Placeholder {
                asserted_by: alex_ipk
            }
        );
        assert_eq!(
            b.record()
                .members
                .iter()
                .find(|m| m.ipk == c.own_ipk())
                .unwrap()
                .display
                .name,
            "Charlie"
        );
        // What is written with a placeholder's key is its introducer's word.
        let author =
            |s: &GroupSession, ipk| crate::views::group_author(s.record(), s.own_ipk(), ipk);
        let word = |name: &str, by: Option<&str>| Some((name.to_string(), by.map(String::from)));
        assert_eq!(author(&b, c.own_ipk()), word("Charlie", Some("Alex")));
        assert_eq!(
            author(&a, c.own_ipk()),
            word("Charlie", None),
            "Alex's own word"
        );
        assert_eq!(author(&b, alex_ipk), word("Alex", None));

        // All three can message at once: Alex to the placeholders' derived addresses.
        let rows = step(&alex, &mut a, |s, ch| {
            s.send_text("welcome, both", 30, ch).unwrap();
        });
        assert_eq!(rows.len(), 2);
        for (p, s) in [(&blair, &mut b), (&charlie, &mut c)] {
            let got = rows_for(&rows, s.own_ipk());
            match deliver(p, s, &got[0]).unwrap() {
                Received::Text(e) => assert_eq!(e.text, "welcome, both"),
                other => panic!("{other:?}"),
            }
        }

        // Blair claims: the equivalence goes to Alex inside BA, the commit to the orderer (Alex).
        let ba_record = load_protons(&blair.store, [ba]).unwrap().pop().unwrap();
        let placeholder_b = b.own_ipk();
        let derived_for_blair = a
            .record()
            .members
            .iter()
            .find(|m| m.ipk == placeholder_b)
            .unwrap()
            .transports
            .clone();
        let rows = step(&blair, &mut b, |s, ch| {
            s.claim(&ba_record, &blair.node, LIFETIMES, 40, ch).unwrap()
        });
        let to_orderer = rows_for(&rows, alex_ipk);
        assert_eq!(
            to_orderer.len(),
            1,
            "the commit goes to the ordering service only"
        );
        // Blair writes while her claim waits: still under the placeholder.
        let early = step(&blair, &mut b, |s, ch| {
            s.send_text("while my claim waits", 40, ch).unwrap();
        });
        let early_to_alex = rows_for(&early, alex_ipk);
        // Declining or leaving now would drop the group while the others
        // take her in: refused, nothing changes.
        let mut ch = Changes::default();
        assert!(matches!(b.decline(&mut ch), Err(GroupError::ClaimPending)));
        assert!(matches!(
            b.leave(41, &mut ch),
            Err(GroupError::ClaimPending)
        ));
        assert!(ch.is_empty());
        assert_eq!(b.record().state, GroupState::Invited);
        // Alex does not answer for longer than the ordering timeout. He
        // casts the majority (his vote and the unclaimed placeholders'), so
        // no other member could order: Blair waits for him, she does not
        // go round the ranks.
        let mut ch = Changes::default();
        assert!(!b.check_ordering(40 + 10_001, 10_000, &mut ch).unwrap());
        assert_eq!(b.record().orderer_rank, 0);
        assert!(ch.outbox.is_empty());
        let equivalence = b
            .record()
            .relays
            .iter()
            .find(|r| matches!(r.body, Body::Equivalence { .. }))
            .unwrap()
            .clone();
        assert!(matches!(
            relay(&blair, &alex, ab, &equivalence),
            crate::relationship::Received::Relayed(_)
        ));
        // Alex's group processes the relayed equivalence (an inbox row his proton wrote).
        let relayed = alex
            .store
            .read(|tx| {
                let t = tx.open_table(tables::INBOX)?;
                let mut out = Vec::new();
                for e in t.iter()? {
                    let (_, v) = e?;
                    out.push(store::decode::<crate::records::InboxEntry>(
                        v.value(),
                        "inbox",
                    )?);
                }
                Ok(out)
            })
            .unwrap();
        let entry = relayed
            .iter()
            .find(|e| e.owner == Owner::Group(a.id()))
            .unwrap();
        let mut ch = Changes::default();
        a.receive(&entry.payload, Some(ab), 41, &mut ch).unwrap();
        a.drain_writes(&mut ch);
        commit(&alex, ch);

        // The ordering service proposes the claim; once Charlie accepts
        // it (a majority), it is ordered and fanned out, signed.
        let (alex_before, charlie_before) =
            (a.record().members.clone(), c.record().members.clone());
        let fanned = order(&alex, &mut a, &to_orderer[0], 42);
        // One signed copy for each member, Blair reached under her new key.
        assert_eq!(fanned.len(), 2);
        assert!(rows_for(&fanned, placeholder_b).is_empty());
        assert_eq!(rows_for(&fanned, c.own_ipk()).len(), 1);
        let ordered = fanned[0].payload.clone();
        let mut after_claim = Vec::new();
        for (p, s) in [(&blair, &mut b), (&charlie, &mut c)] {
            let mut ch = Changes::default();
            assert_eq!(
                s.receive(&ordered, None, 43, &mut ch).unwrap(),
                Received::Committed
            );
            s.drain_writes(&mut ch);
            after_claim.push(ch.outbox.len());
            commit(p, ch);
        }
        assert_eq!(
            after_claim,
            [0, 0],
            "a claim needs no announcement after it"
        );
        // What `watch` tells of it: Blair claimed, nobody joined or went.
        let claimed_only = (Vec::new(), vec!["Blair".to_string()], Vec::new());
        for (before, s) in [(&alex_before, &a), (&charlie_before, &c)] {
            assert_eq!(
                crate::views::roster_change(before, &s.record().members),
                claimed_only
            );
        }
        let gp_b = b.own_ipk();
        // The claim carried Blair's info under her new key, sealed for the
        // members: her new transports and direct key, her name.
        let blair_info = |s: &GroupSession| {
            let m = s.record().members.iter().find(|m| m.ipk == gp_b).unwrap();
            (m.transports.clone(), m.direct_key, m.display.name.clone())
        };
        let own = b.record();
        let expected = (
            own.own_transports.clone(),
            Some(SealKey::from_seed(own.direct_seed).public()),
            own.own_display.name.clone(),
        );
        assert_ne!(
            expected.0, derived_for_blair,
            "fresh transports, not the ones Alex derived"
        );
        assert_eq!(blair_info(&a), expected, "Alex learns it with the claim");
        assert_eq!(blair_info(&c), expected, "Charlie learns it with the claim");
        assert_eq!(rows_for(&fanned, gp_b).len(), 1);
        assert_ne!(gp_b, placeholder_b);
        // What Blair wrote while her claim waited, read once the claim is
        // ordered, is Blair's (the claim proves the placeholder was hers).
        match deliver(&alex, &mut a, &early_to_alex[0]) {
            Ok(Received::Text(e)) => assert_eq!(e.author, Author::Peer(gp_b)),
            other => panic!("{other:?}"),
        }
        // A command that named Blair by her placeholder's key just before
        // her claim landed is told so, not "no member matches".
        let mut ch = Changes::default();
        assert!(matches!(
            c.verify_member(placeholder_b, &mut ch),
            Err(GroupError::JustClaimed(name)) if name == "Blair"
        ));
        assert_eq!(b.record().state, GroupState::Active);
        assert_eq!(
            seen(&a, gp_b),
            MemberStatus::Linked { proton: ab },
            "Alex links Blair through AB"
        );
        assert_eq!(
            seen(&c, gp_b),
            MemberStatus::Claimed {
                placeholder: placeholder_b
            },
            "Charlie sees a verified claim"
        );
        // Claimed, Blair writes as Blair; what her placeholder's key wrote
        // stays Alex's word, also once the key is gone from the group.
        assert_eq!(author(&c, gp_b), word("Blair", None));
        assert_eq!(author(&c, placeholder_b), word("Blair", Some("Alex")));
        assert_eq!(author(&a, placeholder_b), word("Blair", None));
        // The head of a record decodes from the whole of it.
        let head: crate::records::GroupHead =
            store::decode(&store::encode(a.record(), "group").unwrap(), "group").unwrap();
        assert_eq!(head.group_id, a.record().group_id);
        assert_eq!(head.state, a.record().state);
        let auth = a.epoch_authenticator();
        assert_eq!(b.epoch_authenticator(), auth);
        assert_eq!(c.epoch_authenticator(), auth);

        // Charlie claims too; then nobody is a placeholder and all agree.
        let ca_record = load_protons(&charlie.store, [ca]).unwrap().pop().unwrap();
        let rows = step(&charlie, &mut c, |s, ch| {
            s.claim(&ca_record, &charlie.node, LIFETIMES, 50, ch)
                .unwrap()
        });
        let fanned = order(&alex, &mut a, &rows_for(&rows, alex_ipk)[0], 51);
        let ordered = fanned[0].payload.clone();
        for (p, s) in [(&blair, &mut b), (&charlie, &mut c)] {
            deliver(p, s, &ordered).unwrap();
        }
        for s in [&a, &b, &c] {
            assert_eq!(s.epoch(), 3, "creation, two claims");
            assert_eq!(s.epoch_authenticator(), a.epoch_authenticator());
            assert_eq!(s.record().members.len(), 2);
            assert!(s
                .record()
                .members
                .iter()
                .all(|m| !matches!(m.status, MemberStatus::Placeholder { .. })));
        }
        assert!(
            matches!(seen(&b, c.own_ipk()), MemberStatus::Claimed { .. }),
            "Blair sees Charlie's claim"
        );
        assert!(
            matches!(seen(&a, c.own_ipk()), MemberStatus::Claimed { .. }),
            "before Charlie's equivalence arrives"
        );
        // This time the equivalence arrives after the claim commit.
        let equivalence = c
            .record()
            .relays
            .iter()
            .find(|r| matches!(r.body, Body::Equivalence { .. }))
            .unwrap()
            .clone();
        relay(&charlie, &alex, ac, &equivalence);
        let rows = alex
            .store
            .read(|tx| {
                let t = tx.open_table(tables::INBOX)?;
                let mut out = Vec::new();
                for e in t.iter()? {
                    let (k, v) = e?;
                    out.push((
                        k.value(),
                        store::decode::<crate::records::InboxEntry>(v.value(), "inbox")?,
                    ));
                }
                Ok(out)
            })
            .unwrap();
        let (_, entry) = rows
            .iter()
            .filter(|(_, e)| e.owner == Owner::Group(a.id()))
            .last()
            .unwrap();
        let mut ch = Changes::default();
        a.receive(&entry.payload, Some(ac), 60, &mut ch).unwrap();
        a.drain_writes(&mut ch);
        commit(&alex, ch);
        assert_eq!(seen(&a, c.own_ipk()), MemberStatus::Linked { proton: ac });

        // Blair leaves. Her leaving reaches Alex, who orders her removal;
        // Charlie gets the removal first: the commit itself says that she
        // left, and nobody removed her.
        let _ = (a.take_departures(), c.take_departures());
        // Her last words before, which reach Charlie after her removal.
        let last = step(&blair, &mut b, |s, ch| {
            s.send_text("bye, both", 69, ch).unwrap();
            s.send_text("one more thing", 69, ch).unwrap();
        });
        let last = rows_for(&last, c.own_ipk());
        let rows = step(&blair, &mut b, |s, ch| s.leave(70, ch).unwrap());
        let fanned = order(&alex, &mut a, &rows_for(&rows, alex_ipk)[0], 71);
        assert_eq!(a.take_departures(), [(gp_b, None)]);
        let removal = rows_for(&fanned, c.own_ipk());
        assert_eq!(removal.len(), 1);
        assert_eq!(
            deliver(&charlie, &mut c, &removal[0]).unwrap(),
            Received::Committed
        );
        assert_eq!(c.record().members.len(), 1);
        assert_eq!(c.take_departures(), [(gp_b, None)], "Blair left");
        // What she wrote before her removal reached us, and came soon after
        // it, is hers; long after, it would be a former member writing on.
        let mut ch = Changes::default();
        match c.receive(&last[0], None, 20 + REMOVED_GRACE_MS - 1, &mut ch) {
            Ok(Received::Text(e)) => {
                assert_eq!(
                    (e.author, e.text.as_str()),
                    (Author::Peer(gp_b), "bye, both")
                )
            }
            other => panic!("{other:?}"),
        }
        let mut ch = Changes::default();
        assert!(matches!(
            c.receive(&last[1], None, 20 + REMOVED_GRACE_MS, &mut ch),
            Err(GroupError::NotAMember)
        ));

        // A sealed message (a side invitation) signed by a key: refused
        // from her, a former member; from a key the group never knew (a
        // claim we have not seen yet, say), kept for the commit that adds
        // it; refused when its signature does not verify.
        let group_id = c.record().group_id.clone();
        let sealed_by = |key: &IdentityKey| {
            let sealed = b"opaque".to_vec();
            let signature = key.sign_bytes(&side_message(&group_id, &key.ipk(), &sealed));
            Payload::Sealed {
                from: key.ipk(),
                sealed,
                signature,
            }
            .encode()
        };
        let stranger = IdentityKey::generate();
        let mut ch = Changes::default();
        assert!(matches!(
            c.receive(&sealed_by(&stranger), None, 90, &mut ch),
            Err(GroupError::NotYetAMember)
        ));
        let forged = Payload::Sealed {
            from: stranger.ipk(),
            sealed: b"opaque".to_vec(),
            signature: [7; SIGNATURE_LEN],
        }
        .encode();
        assert!(matches!(
            c.receive(&forged, None, 90, &mut ch),
            Err(GroupError::BadIntroduction(_))
        ));
        let her = Payload::Sealed {
            from: gp_b,
            sealed: b"opaque".to_vec(),
            signature: [7; SIGNATURE_LEN],
        }
        .encode();
        assert!(matches!(
            c.receive(&her, None, 90, &mut ch),
            Err(GroupError::RemovedLately | GroupError::NotAMember)
        ));
        assert!(ch.is_empty(), "nothing to store for any of them");
    }

    /// Who is owed a text read later than written: those who joined in
    /// between and are still members, once each; and whether the ordering
    /// node should say so at all.
    #[test]
    fn a_late_text_is_owed_to_who_joined_between_its_writing_and_reading() {
        let member = |ipk: Ipk| Member {
            ipk,
            ..Member::for_test("M")
        };
        let [early, fay, gone, sender] = std::array::from_fn(|_| IdentityKey::generate().ipk());
        let members = vec![member(early), member(fay), member(sender)];
        let late = LateTexts {
            joins: vec![(early, 3), (fay, 6), (gone, 6)],
            since: 2,
            sent: Vec::new(),
            resent: Vec::new(),
        };
        // Written at 5, read at 7: Fay joined in between (the other one
        // who did is gone since); written at 6, she could read it.
        assert!(late.joined_after(5, sender, &members));
        assert!(!late.joined_after(6, sender, &members));
        assert!(!late.joined_after(5, fay, &members), "not to herself");
        // Written before the log begins: cannot tell, so say it.
        assert!(late.joined_after(1, sender, &members));
        let m = MessageId::random();
        assert_eq!(late.owed(m, 5, 7, &members), vec![fay]);
        assert_eq!(late.owed(m, 2, 7, &members), vec![early, fay]);
        assert_eq!(
            late.owed(m, 5, 5, &members),
            Vec::<Ipk>::new(),
            "read before she joined"
        );
        assert_eq!(late.owed(m, 6, 7, &members), Vec::<Ipk>::new());
        let mut late = late;
        late.resent.push((m, fay));
        assert_eq!(late.owed(m, 5, 7, &members), Vec::<Ipk>::new(), "once");
        assert_eq!(late.owed(MessageId::random(), 5, 7, &members), vec![fay]);
    }
}
