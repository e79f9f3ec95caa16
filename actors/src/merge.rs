//! Merging parallel relationships and catching a meddling introducer
//! (DESIGN.md sections 8.5 and 8.6).
//!
//! Two introducers (A and D) may each introduce Blair and Charlie: each then
//! holds two relationships with the other. Charlie may ask to merge them:
//! a [`MergeRequest`] sent inside both relationships says "my keys there are
//! equivalent, both are followed by this new key, here is a ticket for it,
//! and here is the key I believe you hold in each". Blair's relationship
//! manager checks the keys against its own protons:
//!
//! - they match: the request waits for Blair's consent (`accept` makes
//!   Blair's follow-on key, the two relationships become one, the old ones
//!   retire; `ignore` leaves them apart);
//! - one names a key that is not Blair's while Blair holds a relationship
//!   with someone presenting as Charlie under another key: someone sits in
//!   the middle of that relationship. It and the contact who introduced it
//!   are flagged, and the request cannot be accepted.
//!
//! The seed has Charlie start a group of P_C and both of Blair's protons when
//! Blair has not attested their equivalence. Here the same signed request
//! serves both cases; the record says whether Blair had linked the two, and
//! accepting an unlinked one first makes that equivalence attestation. A
//! group would carry nothing more, and would need one node to hold two
//! members of one MLS group.
//!
//! Everything here reads the store and returns [`Changes`]; nothing is
//! written until the caller commits them, so a refused request changes
//! nothing.

use redb::ReadableTable;

use std::time::Duration;

use crate::attestation::{Attestation, AttestationError, Kind};
use crate::changes::Changes;
use crate::model::{DisplayIdentity, InvalidValue, ProtonId};
use crate::protocol::MergeRequest;
use crate::records::{MergeRecord, MergeState, ProtonRecord, Provenance, TicketOrigin, Trust};
use crate::relationship::{
    accept_invite, create_invite, AcceptLink, Acceptance, Lifetimes, NodeAddrs, RelationshipError,
};
use crate::store::{self, tables, Store, StoreError};
use crate::ticket::{Ticket, TicketError};

/// Why a link or a merge was refused.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("a relationship cannot be linked or merged with itself")]
    SameRelationship,
    #[error("{0} was merged into another relationship; use that one")]
    Retired(ProtonId),
    #[error("{0} was merged into {1}; use that one")]
    RetiredInto(ProtonId, ProtonId),
    #[error("{0} is not an active relationship yet; wait until it is")]
    NotActive(ProtonId),
    #[error("{0} never started on the other side (their node refused our answer to their invitation); ask them for a new ticket")]
    Refused(ProtonId),
    #[error("the merge request is malformed: {0}")]
    Invalid(#[from] InvalidValue),
    #[error("the merge request's ticket: {0}")]
    Ticket(#[from] TicketError),
    #[error("the merge request's {what} attestation: {source}")]
    Attestation {
        what: &'static str,
        #[source]
        source: AttestationError,
    },
    #[error("the merge request names relationships the sender does not hold")]
    NotTheSenders,
    #[error("the merge request says we hold another key in the relationship it came through")]
    Mismatch,
    #[error("merge request {0} was already received through this relationship")]
    Replayed(String),
    #[error("merge request {0} came again with different contents")]
    Conflicting(String),
    #[error("no merge request {0:?}; `protonode merge list` shows them")]
    Unknown(String),
    #[error("merge request {0} is one you sent: only its receiver accepts or ignores it (`protonode merge list` shows its state)")]
    Sent(String),
    #[error("merge request {id} is {state}; only a pending one can be {action}")]
    NotPending {
        id: String,
        state: &'static str,
        action: &'static str,
    },
    #[error("the request's ticket key is not the follow-on key its attestations name")]
    WrongFollowOn,
    #[error("you asked them to merge these relationships too (request {ours}), and your requests crossed: yours stands, so the merge happens once they accept it; `protonode merge list` shows both")]
    Crossed { ours: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A merge request id as the user types it.
pub fn id_string(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a merge id: its 32 hex digits, or a unique prefix of at least 4.
pub fn find(store: &Store, query: &str) -> Result<MergeRecord, MergeError> {
    let q = query.trim().to_ascii_lowercase();
    let all = all_merges(store)?;
    let matches: Vec<&MergeRecord> = all
        .iter()
        .filter(|m| {
            let id = id_string(&m.id);
            id == q || (q.len() >= 4 && id.starts_with(&q))
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        _ => Err(MergeError::Unknown(query.to_string())),
    }
}

/// Every merge, sent or received, oldest first.
pub fn all_merges(store: &Store) -> Result<Vec<MergeRecord>, StoreError> {
    let mut all: Vec<MergeRecord> = store.read(|tx| {
        let t = tx.open_table(tables::MERGES)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (_, v) = e?;
            out.push(store::decode(v.value(), "merge")?);
        }
        Ok(out)
    })?;
    all.sort_by_key(|m| m.received_at);
    Ok(all)
}

pub fn state_name(state: &MergeState) -> &'static str {
    match state {
        MergeState::Pending => "pending",
        MergeState::Accepted { .. } => "accepted",
        MergeState::Ignored => "ignored",
        MergeState::Flagged { .. } => "flagged",
        MergeState::Replaced => "replaced",
    }
}

/// The relationship `id` was merged into, if it was.
pub fn retired_into(store: &Store, id: ProtonId) -> Result<Option<ProtonId>, StoreError> {
    store.read(|tx| {
        let t = tx.open_table(tables::RETIRED)?;
        Ok(t.get(id.0)?.map(|v| ProtonId(v.value())))
    })
}

/// The live relationship `id` was merged into, following merges of the
/// merged ones; `None` if `id` is live itself.
pub fn merged_into_live(store: &Store, id: ProtonId) -> Result<Option<ProtonId>, StoreError> {
    let mut at = id;
    // Each merge retires two relationships into a newer one: the chain
    // ends. The bound only guards against a damaged table.
    for _ in 0..64 {
        match retired_into(store, at)? {
            Some(next) => at = next,
            None => break,
        }
    }
    Ok((at != id).then_some(at))
}

/// The attestations that link `id` to our other relationships.
pub fn links_of(store: &Store, id: ProtonId) -> Result<Vec<Attestation>, StoreError> {
    store.read(|tx| {
        let t = tx.open_table(tables::LINKS)?;
        Ok(store::get(&t, id.0, "links")?.unwrap_or_default())
    })
}

/// How far `id` is trusted.
pub fn trust_of(store: &Store, id: ProtonId) -> Result<Trust, StoreError> {
    store.read(|tx| {
        let t = tx.open_table(tables::TRUST)?;
        Ok(store::get(&t, id.0, "trust")?.unwrap_or(Trust::Normal))
    })
}

fn load(store: &Store, id: ProtonId) -> Result<ProtonRecord, MergeError> {
    store
        .read(|tx| {
            let t = tx.open_table(tables::PROTONS)?;
            store::get::<_, ProtonRecord, _>(&t, id.0, "proton")
        })?
        .ok_or(MergeError::Unknown(id.to_string()))
}

/// Two of our relationships that may be linked or merged: distinct, live,
/// active.
fn live_pair(store: &Store, a: ProtonId, b: ProtonId) -> Result<[ProtonRecord; 2], MergeError> {
    if a == b {
        return Err(MergeError::SameRelationship);
    }
    let mut out = Vec::with_capacity(2);
    for id in [a, b] {
        if let Some(into) = merged_into_live(store, id)? {
            return Err(MergeError::RetiredInto(id, into));
        }
        let p = load(store, id)?;
        match p.state {
            crate::records::ProtonState::Active => {}
            crate::records::ProtonState::Refused => return Err(MergeError::Refused(id)),
            crate::records::ProtonState::Pending => return Err(MergeError::NotActive(id)),
        }
        out.push(p);
    }
    let [a, b]: [ProtonRecord; 2] = out.try_into().map_err(|_| MergeError::SameRelationship)?;
    Ok([a, b])
}

/// Pending requests (other than `except`) that `ours` makes moot, set
/// aside as replaced: with `exact: Some(from_us)`, those made in the same
/// direction over the same two relationships (a newer request replaces an
/// older one; a request the other way crossed it, and [`may_accept`]
/// decides between the two); with `None`, those over either of them either
/// way (they were just merged, so no other request over them can go
/// through).
fn superseded(
    store: &Store,
    ours: &[ProtonId],
    exact: Option<bool>,
    except: [u8; 16],
) -> Result<Vec<MergeRecord>, StoreError> {
    Ok(all_merges(store)?
        .into_iter()
        .filter(|m| m.id != except && m.state == MergeState::Pending)
        .filter(|m| match exact {
            Some(from_us) => {
                m.from_us == from_us
                    && m.ours.len() == ours.len()
                    && m.ours.iter().all(|p| ours.contains(p))
            }
            None => m.ours.iter().any(|p| ours.contains(p)),
        })
        .map(|mut m| {
            m.state = MergeState::Replaced;
            m
        })
        .collect())
}

/// Whether we attested our keys in `a` and `b` equivalent.
fn linked(store: &Store, a: &ProtonRecord, b: &ProtonRecord) -> Result<bool, StoreError> {
    let (ka, kb) = (a.own_key.key().ipk(), b.own_key.key().ipk());
    Ok(links_of(store, a.id)?
        .iter()
        .any(|l| l.kind == Kind::Equivalent && l.mentions(&ka) && l.mentions(&kb)))
}

/// "These two relationships are both me towards that person": our keys in
/// both, attested equivalent, kept with each.
pub fn link(store: &Store, a: ProtonId, b: ProtonId, now: u64) -> Result<Changes, MergeError> {
    let [a, b] = live_pair(store, a, b)?;
    let mut changes = Changes::default();
    if !linked(store, &a, &b)? {
        let attestation = Attestation::equivalent(&a.own_key.key(), &b.own_key.key(), now);
        changes.links.push((a.id, attestation.clone()));
        changes.links.push((b.id, attestation));
    }
    Ok(changes)
}

/// A merge request made: what to commit, then to send inside both
/// relationships (our ticket for the follow-on key is in the changes).
pub struct Outgoing {
    pub request: MergeRequest,
    pub record: MergeRecord,
    pub changes: Changes,
}

/// Charlie's side: asks the peer of `a` and `b` to merge them. Makes the
/// follow-on key with its ticket (valid for `ttl`), the equivalence of our
/// two keys and their "follows" attestations.
#[allow(clippy::too_many_arguments)]
pub fn request(
    store: &Store,
    node: &NodeAddrs,
    display: DisplayIdentity,
    lifetimes: Lifetimes,
    ttl: Duration,
    a: ProtonId,
    b: ProtonId,
    now: u64,
) -> Result<Outgoing, RelationshipError> {
    let [pa, pb] = live_pair(store, a, b)?;
    let id: [u8; 16] = rand::random();
    let invite = create_invite(
        store,
        node,
        display,
        lifetimes,
        ttl,
        Some(TicketOrigin::Merge {
            request: id,
            old: [pa.id, pb.id],
            peers: [pa.peer_ipk, pb.peer_ipk],
        }),
        now,
    )?;
    let new_key = invite.ticket.own_key.key();
    let (ka, kb) = (pa.own_key.key(), pb.own_key.key());
    let equivalence = Attestation::equivalent(&ka, &kb, now);
    let request = MergeRequest {
        id,
        pairs: vec![(ka.ipk(), pa.peer_ipk), (kb.ipk(), pb.peer_ipk)],
        introducers: vec![introducer_name(store, &pa)?, introducer_name(store, &pb)?],
        equivalence: equivalence.clone(),
        follows: vec![
            Attestation::follows(&ka, &new_key, now),
            Attestation::follows(&kb, &new_key, now),
        ],
        ticket: invite.text,
    };
    request.validate_shape().map_err(MergeError::from)?;
    let record = MergeRecord {
        id,
        received_at: now,
        request: request.clone(),
        via: Vec::new(),
        ours: vec![pa.id, pb.id],
        linked: true,
        state: MergeState::Pending,
        from_us: true,
    };
    let mut changes = invite.changes;
    if !linked(store, &pa, &pb)? {
        changes.links.push((pa.id, equivalence.clone()));
        changes.links.push((pb.id, equivalence));
    }
    // The older request's ticket stays: should the peer accept it before
    // it sees this one, the merge is made all the same (and this one is
    // then moot).
    changes
        .merges
        .extend(superseded(store, &record.ours, Some(true), id)?);
    changes.merges.push(record.clone());
    Ok(Outgoing {
        request,
        record,
        changes,
    })
}

/// What a received request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestOutcome {
    pub id: [u8; 16],
    pub state: MergeState,
    /// Whether this is the first time we hear of it.
    pub first: bool,
    /// Relationships newly flagged because of it.
    pub flagged: Vec<ProtonId>,
}

/// The receiver's side: a merge request arrived through our relationship
/// `via` (MLS has authenticated it as the peer's). Checks it and records it.
pub fn receive_request(
    store: &Store,
    via: &ProtonRecord,
    request: &MergeRequest,
    now: u64,
) -> Result<(RequestOutcome, Changes), MergeError> {
    request.validate_shape()?;
    let crypto = openmls_rust_crypto::RustCrypto::default();
    let ticket = Ticket::parse(&request.ticket, &crypto)?;
    // The sender must hold the relationship it came through, under the key
    // we know, and must believe we hold ours under our key.
    let here = request
        .pairs
        .iter()
        .position(|(theirs, _)| *theirs == via.peer_ipk)
        .ok_or(MergeError::NotTheSenders)?;
    if request.pairs[here].1 != via.own_key.key().ipk() {
        return Err(MergeError::Mismatch);
    }
    let (their_a, their_b) = (request.pairs[0].0, request.pairs[1].0);
    request
        .equivalence
        .verify_as(Kind::Equivalent, &their_a, &their_b)
        .map_err(|source| MergeError::Attestation {
            what: "equivalence",
            source,
        })?;
    for (follows, (theirs, _)) in request.follows.iter().zip(&request.pairs) {
        follows
            .verify_as(Kind::Follows, theirs, &follows.second)
            .map_err(|source| MergeError::Attestation {
                what: "follows",
                source,
            })?;
        if follows.second != ticket.ipk {
            return Err(MergeError::WrongFollowOn);
        }
    }
    let existing = store.read(|tx| {
        let t = tx.open_table(tables::MERGES)?;
        store::get::<_, MergeRecord, _>(&t, request.id, "merge")
    })?;
    if let Some(mut record) = existing {
        if record.request != *request || record.from_us {
            return Err(MergeError::Conflicting(id_string(&request.id)));
        }
        if record.via.contains(&via.id) {
            return Err(MergeError::Replayed(id_string(&request.id)));
        }
        record.via.push(via.id);
        let mut changes = Changes::default();
        changes.merges.push(record.clone());
        return Ok((
            RequestOutcome {
                id: request.id,
                state: record.state,
                first: false,
                flagged: Vec::new(),
            },
            changes,
        ));
    }

    let (their_other, ours_claimed) = request.pairs[1 - here];
    let protons = crate::manager::all_protons(store)?;
    let mut changes = Changes::default();
    let mut flagged = Vec::new();
    let mut ours = vec![via.id];
    let name = via.peer_display.name.clone();
    let state = match protons
        .iter()
        .find(|p| p.own_key.key().ipk() == ours_claimed)
    {
        Some(p) if p.id == via.id => return Err(MergeError::Mismatch),
        Some(p) if p.peer_ipk == their_other => {
            if retired_into(store, p.id)?.is_some() || retired_into(store, via.id)?.is_some() {
                return Err(MergeError::Retired(p.id));
            }
            ours.insert(if here == 0 { 1 } else { 0 }, p.id);
            MergeState::Pending
        }
        Some(p) => {
            // The sender reaches our key, but our key talks to someone else.
            let reason = format!(
                "{name} says their key in this relationship is {}, but it is {} here: someone is in the middle",
                their_other.fingerprint(),
                p.peer_ipk.fingerprint()
            );
            flag(store, p, &reason, now, &mut changes, &mut flagged)?;
            ours.push(p.id);
            MergeState::Flagged { reason }
        }
        None => {
            // The sender's other relationship is with a key that is not
            // ours. Where we hold a relationship with someone presenting as
            // the sender under yet another key, introduced by the same
            // introducer (by name), that one has a meddler in the middle.
            let their_keys = [their_a, their_b];
            let hint = request.introducers[1 - here].as_str();
            let links = links_of(store, via.id)?;
            let mut suspects: Vec<&ProtonRecord> = Vec::new();
            for p in &protons {
                if p.id == via.id || their_keys.contains(&p.peer_ipk) {
                    continue;
                }
                let presents = p.peer_display.name.eq_ignore_ascii_case(&name)
                    || links.iter().any(|l| l.mentions(&p.own_key.key().ipk()));
                if presents && introducer_name(store, p)?.eq_ignore_ascii_case(hint) {
                    suspects.push(p);
                }
            }
            let reason = format!(
                "{name}'s merge request shows that their relationship with \"you\" is with key {}, which is not yours: someone poses as you to {name}, and as {name} to you",
                ours_claimed.fingerprint()
            );
            for p in &suspects {
                if retired_into(store, p.id)?.is_none() {
                    flag(store, p, &reason, now, &mut changes, &mut flagged)?;
                    ours.push(p.id);
                }
            }
            MergeState::Flagged { reason }
        }
    };
    let linked = match ours.as_slice() {
        [a, b] if matches!(state, MergeState::Pending) => {
            let a = load(store, *a)?;
            let b = load(store, *b)?;
            linked(store, &a, &b)?
        }
        _ => false,
    };
    let record = MergeRecord {
        id: request.id,
        received_at: now,
        request: request.clone(),
        via: vec![via.id],
        ours,
        linked,
        state: state.clone(),
        from_us: false,
    };
    if state == MergeState::Pending {
        changes
            .merges
            .extend(superseded(store, &record.ours, Some(false), record.id)?);
    }
    changes.merges.push(record);
    Ok((
        RequestOutcome {
            id: request.id,
            state,
            first: true,
            flagged,
        },
        changes,
    ))
}

/// Flags a relationship with a meddler in it, and the contact who
/// introduced it.
fn flag(
    store: &Store,
    p: &ProtonRecord,
    reason: &str,
    now: u64,
    changes: &mut Changes,
    flagged: &mut Vec<ProtonId>,
) -> Result<(), StoreError> {
    let mut mark = |id: ProtonId, reason: String| {
        if !flagged.contains(&id) {
            changes.trust.push((id, Trust::Flagged { reason, at: now }));
            flagged.push(id);
        }
    };
    mark(p.id, reason.to_string());
    if let Some((introducer, name)) = introducer_of(store, p)? {
        mark(
            introducer,
            format!(
                "introduced you to \"{}\" ({}), a relationship with someone in the middle: {reason}",
                p.peer_display.name, p.id
            ),
        );
        tracing::warn!(contact = %p.id, introducer = %introducer, name = %name, "flagged a meddling introducer");
    }
    Ok(())
}

/// Our relationship with whoever introduced the relationship `p` (through
/// the group `p` was met in), and their name.
pub fn introducer_of(
    store: &Store,
    p: &ProtonRecord,
) -> Result<Option<(ProtonId, String)>, StoreError> {
    let Provenance::MetInGroup { group, .. } = p.provenance else {
        return Ok(None);
    };
    let Some(g) = crate::groups::get_group(store, group)? else {
        return Ok(None);
    };
    let Some((via, _)) = g.introduced else {
        return Ok(None);
    };
    let name = store
        .read(|tx| {
            let t = tx.open_table(tables::PROTONS)?;
            store::get::<_, ProtonRecord, _>(&t, via.0, "proton")
        })?
        .map(|r| r.peer_display.name)
        .unwrap_or_default();
    Ok(Some((via, name)))
}

/// The name of whoever introduced `p`, "" for a relationship begun with a
/// ticket (or in a group we started).
fn introducer_name(store: &Store, p: &ProtonRecord) -> Result<String, StoreError> {
    Ok(introducer_of(store, p)?
        .map(|(_, name)| name)
        .unwrap_or_default())
}

/// Blair's consent: accepts the request's ticket with a key that follows
/// both of ours (first attesting our two keys equivalent if we had not),
/// and retires the two relationships into the new one. Commit the
/// acceptance's changes; its answer is queued to the requester.
pub fn accept(
    store: &Store,
    node: &NodeAddrs,
    display: DisplayIdentity,
    lifetimes: Lifetimes,
    query: &str,
    now: u64,
) -> Result<Acceptance, RelationshipError> {
    let found = find(store, query)?;
    let record = store.read(|tx| {
        Ok(may_accept(
            &tx.open_table(tables::MERGES)?,
            &tx.open_table(tables::RETIRED)?,
            found.id,
        ))
    })??;
    let [a, b] = match record.ours.as_slice() {
        [a, b] => [*a, *b],
        _ => return Err(MergeError::Unknown(id_string(&record.id)).into()),
    };
    let [pa, pb] = live_pair(store, a, b)?;
    let mut acceptance = accept_invite(
        store,
        node,
        display,
        lifetimes,
        &record.request.ticket,
        Some(AcceptLink::Merge {
            old: [a, b],
            keys: Box::new([pa.own_key.key(), pb.own_key.key()]),
        }),
        now,
    )?;
    acceptance.changes.extend(link(store, a, b, now)?);
    // What ties the peer's new key to its old ones, for the trust record.
    let new = acceptance.proton.id;
    for a in record
        .request
        .follows
        .iter()
        .chain([&record.request.equivalence])
    {
        acceptance.changes.links.push((new, a.clone()));
    }
    acceptance
        .changes
        .extend(retire_into(store, record.id, acceptance.proton.id, [a, b])?);
    Ok(acceptance)
}

/// Whether merge request `id` may be accepted now, read from the merges
/// and retirements in `merges` and `retired` (so that the check can run
/// again in the transaction that commits the acceptance: two acceptances
/// at once, of one request or of two over a shared relationship, must not
/// both retire the same relationships). Returns the request's record.
///
/// Two people who each asked the other to merge the same relationships
/// (crossed requests, each accepting the other's) would each make a merged
/// relationship the other never takes. So of two crossed requests the one
/// with the lower id stands: ours, if lower, refuses the acceptance of
/// theirs, and on their side the same rule lets theirs through.
pub fn may_accept<M, R>(merges: &M, retired: &R, id: [u8; 16]) -> Result<MergeRecord, MergeError>
where
    M: ReadableTable<[u8; 16], &'static [u8]>,
    R: ReadableTable<[u8; 8], [u8; 8]>,
{
    let record = may_decide(merges, id, "accepted")?;
    for p in &record.ours {
        if let Some(into) = retired.get(p.0).map_err(StoreError::from)? {
            return Err(MergeError::RetiredInto(*p, ProtonId(into.value())));
        }
    }
    for e in merges.iter().map_err(StoreError::from)? {
        let (_, v) = e.map_err(StoreError::from)?;
        let ours: MergeRecord = store::decode(v.value(), "merge")?;
        let crossed = ours.from_us
            && ours.state == MergeState::Pending
            && ours.ours.iter().any(|p| record.ours.contains(p));
        if crossed && ours.id < record.id {
            return Err(MergeError::Crossed {
                ours: id_string(&ours.id),
            });
        }
    }
    Ok(record)
}

/// Whether the receiver may still decide on merge request `id` (accept or
/// ignore it, `action`): one received, still pending. Read from `merges`,
/// so that it can run again where the decision is written.
pub fn may_decide<M>(
    merges: &M,
    id: [u8; 16],
    action: &'static str,
) -> Result<MergeRecord, MergeError>
where
    M: ReadableTable<[u8; 16], &'static [u8]>,
{
    let record: MergeRecord =
        store::get(merges, id, "merge")?.ok_or_else(|| MergeError::Unknown(id_string(&id)))?;
    if record.from_us {
        return Err(MergeError::Sent(id_string(&id)));
    }
    if record.state != MergeState::Pending {
        return Err(MergeError::NotPending {
            id: id_string(&id),
            state: state_name(&record.state),
            action,
        });
    }
    Ok(record)
}

/// The tickets of our own requests among `replaced` go: an answer to one
/// (the peer accepting it after all) then finds no address and is refused,
/// so their node drops the merged relationship it made and keeps the old
/// ones, instead of a merged relationship that ours never took.
fn revoke_tickets(store: &Store, replaced: &[MergeRecord]) -> Result<Changes, StoreError> {
    let ours: Vec<[u8; 16]> = replaced
        .iter()
        .filter(|m| m.from_us)
        .map(|m| m.id)
        .collect();
    let mut changes = Changes::default();
    if ours.is_empty() {
        return Ok(changes);
    }
    store.read(|tx| {
        let tickets = tx.open_table(tables::TICKETS)?;
        let mut revoked = Vec::new();
        for e in tickets.iter()? {
            let (_, v) = e?;
            let t: crate::records::TicketRecord = store::decode(v.value(), "ticket")?;
            let for_ours = matches!(&t.origin, Some(TicketOrigin::Merge { request, .. }) if ours.contains(request));
            if for_ours && !t.used {
                revoked.push(t);
            }
        }
        for t in revoked {
            changes.delete_tickets.push(t.id);
            changes.delete_mls_namespaces.push(t.proton.0);
            changes.delete_addresses.push(t.welcome_address);
            for (a, _) in crate::relationship::address_rows(
                crate::records::Owner::Proton(t.proton),
                &t.own_transports,
            ) {
                changes.delete_addresses.push(a);
            }
        }
        Ok(())
    })?;
    Ok(changes)
}

/// Leaves the two relationships apart.
pub fn ignore(store: &Store, query: &str) -> Result<Changes, MergeError> {
    let mut record = find(store, query)?;
    if record.from_us {
        return Err(MergeError::Sent(id_string(&record.id)));
    }
    if record.state != MergeState::Pending {
        return Err(MergeError::NotPending {
            id: id_string(&record.id),
            state: state_name(&record.state),
            action: "ignored",
        });
    }
    record.state = MergeState::Ignored;
    let mut changes = Changes::default();
    changes.merges.push(record);
    Ok(changes)
}

/// Retires `old` into `new`: they send nothing more, their histories show
/// as `new`'s (see [`merged_history`]), and the merge record (`request`)
/// says where they went.
pub fn retire_into(
    store: &Store,
    request: [u8; 16],
    new: ProtonId,
    old: [ProtonId; 2],
) -> Result<Changes, MergeError> {
    let mut changes = Changes::default();
    for p in old {
        if let Some(into) = retired_into(store, p)? {
            return Err(MergeError::RetiredInto(p, into));
        }
        changes.retired.push((p, new));
    }
    let record = store.read(|tx| {
        let t = tx.open_table(tables::MERGES)?;
        store::get::<_, MergeRecord, _>(&t, request, "merge")
    })?;
    let replaced = superseded(store, &old, None, request)?;
    changes.extend(revoke_tickets(store, &replaced)?);
    changes.merges.extend(replaced);
    if let Some(mut record) = record {
        record.state = MergeState::Accepted { into: new };
        changes.merges.push(record);
    }
    Ok(changes)
}

/// The relationships whose histories show as `id`'s: itself and, for a
/// merged one, those it follows (recursively).
pub fn lineage(store: &Store, id: ProtonId) -> Result<Vec<ProtonId>, StoreError> {
    let mut out = vec![id];
    let mut i = 0;
    while i < out.len() && out.len() < 64 {
        let record = store.read(|tx| {
            let t = tx.open_table(tables::PROTONS)?;
            store::get::<_, ProtonRecord, _>(&t, out[i].0, "proton")
        })?;
        if let Some(ProtonRecord {
            provenance: Provenance::Merged { from },
            ..
        }) = record
        {
            for f in from {
                if !out.contains(&f) {
                    out.push(f);
                }
            }
        }
        i += 1;
    }
    Ok(out)
}
