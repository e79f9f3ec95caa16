//! A change set: everything one logical operation writes, applied in one
//! redb write transaction ([`Changes::apply`]).
//!
//! Protocol code never writes to the store itself. It computes its effects
//! (MLS write set, records, history rows, outbox rows, processed inbox rows)
//! into a `Changes`, and its caller applies them atomically. That keeps the
//! protocol logic plain and testable, and makes the atomicity rule of
//! DESIGN.md section 6 hold by construction: an operation is either wholly
//! in the database or not at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{ReadableTable, WriteTransaction};
use transports::DeliveryAddress;

use crate::attestation::Attestation;
use crate::mls::{apply_writes, delete_namespace, WriteSet};
use crate::model::{Conversation, GroupProtonId, MessageId, ProtonId, TicketId};
use crate::records::{
    AddressRecord, GroupHead, GroupProtonRecord, GroupState, HistoryEntry, InboxEntry, MergeRecord,
    MergeState, MessageStatus, OutboxEntry, Owner, ProtonRecord, Recipient, TicketRecord, Trust,
};
use crate::store::{self, tables, StoreError};

/// The least outbox number not yet given in this process (see
/// `Changes::apply`). Shared by every store the process opens: numbers need
/// only be unique and rising per store, and gaps cost nothing.
static OUTBOX_NEXT: AtomicU64 = AtomicU64::new(0);

/// Epochs of accepted commits each group keeps for members who fell behind.
pub const ORDERED_LOG_KEPT: u64 = 64;

/// How a message's delivery state changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusChange {
    /// One recipient's node acknowledged it.
    Acknowledged,
    /// A recipient's node refused it for good.
    Failed,
    /// It goes to one more recipient (a member who joined after it was
    /// written): waiting again until that one's node has it.
    Resent,
}

/// Everything one operation writes.
#[derive(Debug, Default)]
pub struct Changes {
    pub mls: WriteSet,
    pub delete_mls_namespaces: Vec<[u8; 8]>,
    pub protons: Vec<ProtonRecord>,
    pub delete_protons: Vec<ProtonId>,
    pub groups: Vec<GroupProtonRecord>,
    pub delete_groups: Vec<GroupProtonId>,
    /// New derived routes: rows waiting for the group move to it.
    pub routes: Vec<(ProtonId, [u8; 16], GroupProtonId)>,
    /// Derived routes to remove, each only if it still leads to that group
    /// (a later introduction into the same MLS group may own it now).
    pub delete_routes: Vec<(ProtonId, [u8; 16], GroupProtonId)>,
    /// New inbox rows written by us (relayed control messages).
    pub inbox: Vec<InboxEntry>,
    pub merges: Vec<MergeRecord>,
    pub trust: Vec<(ProtonId, Trust)>,
    /// Attestations added to relationships' links.
    pub links: Vec<(ProtonId, Attestation)>,
    /// (retired, into).
    pub retired: Vec<(ProtonId, ProtonId)>,
    /// Retired relationships back in use (their merge was refused):
    /// (retired, into), each only if it is still retired into that one.
    pub unretired: Vec<(ProtonId, ProtonId)>,
    /// Accepted commits to log: (group, epoch they ended, signed payload).
    /// Only the last `ORDERED_LOG_KEPT` epochs of a group are kept.
    pub ordered_log: Vec<(GroupProtonId, u64, Vec<u8>)>,
    pub tickets: Vec<TicketRecord>,
    pub delete_tickets: Vec<TicketId>,
    pub accepted_tickets: Vec<(TicketId, ProtonId)>,
    pub delete_accepted_tickets: Vec<TicketId>,
    pub addresses: Vec<(DeliveryAddress, AddressRecord)>,
    pub delete_addresses: Vec<DeliveryAddress>,
    /// Appended to the conversation's history, in order.
    pub history: Vec<(Conversation, HistoryEntry)>,
    /// (conversation, history position, change).
    pub statuses: Vec<(Conversation, u64, StatusChange)>,
    /// Appended to the outbox, in order.
    pub outbox: Vec<OutboxEntry>,
    pub outbox_done: Vec<u64>,
    pub inbox_done: Vec<u64>,
    /// Drop a whole conversation's history.
    pub delete_history: Vec<Conversation>,
}

/// Where an outbox entry must go: one queue per destination keeps order.
pub type Destination = (Conversation, Recipient);

/// What applying a change set assigned.
#[derive(Debug, Default)]
pub struct Applied {
    /// The stored outbox entries with their sequence numbers (and history
    /// positions filled in), in the order of `Changes::outbox`.
    pub outbox: Vec<(u64, OutboxEntry)>,
    /// Messages whose state changed, with their new state.
    pub statuses: Vec<(Conversation, MessageId, MessageStatus)>,
    /// Owners of the inbox rows written.
    pub inbox_owners: Vec<Owner>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.mls.is_empty()
            && self.delete_mls_namespaces.is_empty()
            && self.protons.is_empty()
            && self.delete_protons.is_empty()
            && self.groups.is_empty()
            && self.delete_groups.is_empty()
            && self.routes.is_empty()
            && self.delete_routes.is_empty()
            && self.inbox.is_empty()
            && self.ordered_log.is_empty()
            && self.merges.is_empty()
            && self.trust.is_empty()
            && self.links.is_empty()
            && self.retired.is_empty()
            && self.unretired.is_empty()
            && self.tickets.is_empty()
            && self.delete_tickets.is_empty()
            && self.accepted_tickets.is_empty()
            && self.delete_accepted_tickets.is_empty()
            && self.addresses.is_empty()
            && self.delete_addresses.is_empty()
            && self.history.is_empty()
            && self.statuses.is_empty()
            && self.outbox.is_empty()
            && self.outbox_done.is_empty()
            && self.inbox_done.is_empty()
            && self.delete_history.is_empty()
    }

    /// Adds another change set after this one.
    pub fn extend(&mut self, other: Changes) {
        self.mls.extend(other.mls);
        self.delete_mls_namespaces
            .extend(other.delete_mls_namespaces);
        self.protons.extend(other.protons);
        self.delete_protons.extend(other.delete_protons);
        self.groups.extend(other.groups);
        self.delete_groups.extend(other.delete_groups);
        self.routes.extend(other.routes);
        self.delete_routes.extend(other.delete_routes);
        self.inbox.extend(other.inbox);
        self.ordered_log.extend(other.ordered_log);
        self.merges.extend(other.merges);
        self.trust.extend(other.trust);
        self.links.extend(other.links);
        self.retired.extend(other.retired);
        self.unretired.extend(other.unretired);
        self.tickets.extend(other.tickets);
        self.delete_tickets.extend(other.delete_tickets);
        self.accepted_tickets.extend(other.accepted_tickets);
        self.delete_accepted_tickets
            .extend(other.delete_accepted_tickets);
        self.addresses.extend(other.addresses);
        self.delete_addresses.extend(other.delete_addresses);
        self.history.extend(other.history);
        self.statuses.extend(other.statuses);
        self.outbox.extend(other.outbox);
        self.outbox_done.extend(other.outbox_done);
        self.inbox_done.extend(other.inbox_done);
        self.delete_history.extend(other.delete_history);
    }

    /// Writes everything inside `tx`. Deletions run before insertions of the
    /// same kind, so a change set can replace what it removes.
    pub fn apply(&self, tx: &WriteTransaction) -> Result<Applied, StoreError> {
        let mut applied = Applied::default();

        for ns in &self.delete_mls_namespaces {
            delete_namespace(tx, *ns)?;
        }
        apply_writes(tx, &self.mls)?;

        // A table is opened only when something changes in it: opening one
        // in a write transaction costs a lookup now and work at the commit,
        // and most commits touch two or three of them.
        if !self.delete_protons.is_empty() || !self.protons.is_empty() {
            let mut t = tx.open_table(tables::PROTONS)?;
            for id in &self.delete_protons {
                t.remove(id.0)?;
            }
            for p in &self.protons {
                store::put(&mut t, p.id.0, p, "proton")?;
            }
        }
        if !self.delete_groups.is_empty() || !self.groups.is_empty() {
            let mut t = tx.open_table(tables::GROUPS)?;
            let mut index = tx.open_table(tables::GROUP_IDS)?;
            for id in &self.delete_groups {
                if let Some(old) = t.remove(id.0)? {
                    let head: GroupHead = store::decode(old.value(), "group")?;
                    index.remove((head.group_id.as_slice(), id.0))?;
                }
            }
            for g in &self.groups {
                store::put(&mut t, g.id.0, g, "group")?;
                let key = (g.group_id.as_slice(), g.id.0);
                if g.state == GroupState::Gone {
                    index.remove(key)?;
                } else {
                    index.insert(key, ())?;
                }
            }
        }
        if !self.delete_routes.is_empty() || !self.routes.is_empty() {
            let mut t = tx.open_table(tables::DERIVED_ROUTES)?;
            for (p, c, g) in &self.delete_routes {
                let leads_there = t.get((p.0, *c))?.is_some_and(|v| v.value() == g.0);
                if leads_there {
                    t.remove((p.0, *c))?;
                }
            }
            for (p, c, g) in &self.routes {
                t.insert((p.0, *c), g.0)?;
            }
        }
        if !self.trust.is_empty() {
            let mut t = tx.open_table(tables::TRUST)?;
            for (p, trust) in &self.trust {
                match trust {
                    Trust::Normal => {
                        t.remove(p.0)?;
                    }
                    flagged => store::put(&mut t, p.0, flagged, "trust")?,
                }
            }
        }
        if !self.links.is_empty() {
            let mut t = tx.open_table(tables::LINKS)?;
            for (p, attestation) in &self.links {
                let mut list: Vec<Attestation> = store::get(&t, p.0, "links")?.unwrap_or_default();
                if !list.contains(attestation) {
                    list.push(attestation.clone());
                }
                store::put(&mut t, p.0, &list, "links")?;
            }
        }
        if !self.retired.is_empty() || !self.unretired.is_empty() {
            let mut t = tx.open_table(tables::RETIRED)?;
            for (p, into) in &self.unretired {
                if t.get(p.0)?.is_some_and(|v| v.value() == into.0) {
                    t.remove(p.0)?;
                }
            }
            for (p, into) in &self.retired {
                t.insert(p.0, into.0)?;
            }
        }
        if !self.merges.is_empty() || !self.retired.is_empty() {
            let mut t = tx.open_table(tables::MERGES)?;
            let retired = tx.open_table(tables::RETIRED)?;
            let is_retired = |ours: &[ProtonId]| -> Result<bool, StoreError> {
                for p in ours {
                    if retired.get(p.0)?.is_some() {
                        return Ok(true);
                    }
                }
                Ok(false)
            };
            for m in &self.merges {
                // Two relationships may record the same request at once:
                // keep every path it came through, and a decision once made.
                let mut m = m.clone();
                if let Some(old) = store::get::<_, MergeRecord, _>(&t, m.id, "merge")? {
                    for v in old.via {
                        if !m.via.contains(&v) {
                            m.via.push(v);
                        }
                    }
                    if m.state == MergeState::Pending {
                        m.state = old.state;
                    }
                }
                // Made while its relationships were being merged another
                // way (the checks ran before this transaction): moot.
                if m.state == MergeState::Pending && is_retired(&m.ours)? {
                    m.state = MergeState::Replaced;
                }
                store::put(&mut t, m.id, &m, "merge")?;
            }
            // A merge makes every request still pending over its
            // relationships moot, also one written since it was prepared.
            if !self.retired.is_empty() {
                let mut moot = Vec::new();
                for e in t.iter()? {
                    let (_, v) = e?;
                    let m: MergeRecord = store::decode(v.value(), "merge")?;
                    let over = m
                        .ours
                        .iter()
                        .any(|p| self.retired.iter().any(|(r, _)| r == p));
                    if m.state == MergeState::Pending && over {
                        moot.push(m);
                    }
                }
                for mut m in moot {
                    m.state = MergeState::Replaced;
                    store::put(&mut t, m.id, &m, "merge")?;
                }
            }
        }
        if !self.ordered_log.is_empty() {
            let mut t = tx.open_table(tables::ORDERED_LOG)?;
            for (group, epoch, payload) in &self.ordered_log {
                t.insert((group.0, *epoch), payload.as_slice())?;
                if let Some(old) = epoch.checked_sub(ORDERED_LOG_KEPT) {
                    let stale: Vec<u64> = t
                        .range((group.0, 0)..=(group.0, old))?
                        .map(|e| e.map(|(k, _)| k.value().1))
                        .collect::<Result<_, _>>()?;
                    for e in stale {
                        t.remove((group.0, e))?;
                    }
                }
            }
        }
        if !self.delete_tickets.is_empty() || !self.tickets.is_empty() {
            let mut t = tx.open_table(tables::TICKETS)?;
            for id in &self.delete_tickets {
                t.remove(id.0)?;
            }
            for r in &self.tickets {
                store::put(&mut t, r.id.0, r, "ticket")?;
            }
        }
        if !self.delete_accepted_tickets.is_empty() || !self.accepted_tickets.is_empty() {
            let mut t = tx.open_table(tables::ACCEPTED_TICKETS)?;
            for id in &self.delete_accepted_tickets {
                t.remove(id.0)?;
            }
            for (ticket, proton) in &self.accepted_tickets {
                t.insert(ticket.0, proton.0)?;
            }
        }
        if !self.delete_addresses.is_empty() || !self.addresses.is_empty() {
            let mut t = tx.open_table(tables::ADDRESSES)?;
            for a in &self.delete_addresses {
                t.remove(*a.as_bytes())?;
            }
            for (a, r) in &self.addresses {
                store::put(&mut t, *a.as_bytes(), r, "address")?;
            }
        }
        let mut positions: HashMap<MessageId, u64> = HashMap::new();
        if !self.delete_history.is_empty() || !self.history.is_empty() || !self.statuses.is_empty()
        {
            let mut history = tx.open_table(tables::HISTORY)?;
            for conv in &self.delete_history {
                let key = conv.key();
                let seqs: Vec<u64> = history
                    .range((key, 0)..=(key, u64::MAX))?
                    .map(|e| e.map(|(k, _)| k.value().1))
                    .collect::<Result<_, _>>()?;
                for seq in seqs {
                    history.remove((key, seq))?;
                }
            }
            for (conv, entry) in &self.history {
                let key = conv.key();
                let seq = history
                    .range((key, 0)..=(key, u64::MAX))?
                    .next_back()
                    .transpose()?
                    .map(|(k, _)| k.value().1 + 1)
                    .unwrap_or(0);
                store::put(&mut history, (key, seq), entry, "history entry")?;
                positions.insert(entry.id, seq);
            }
            for (conv, seq, change) in &self.statuses {
                let key = (conv.key(), *seq);
                let Some(mut entry) =
                    store::get::<_, HistoryEntry, _>(&history, key, "history entry")?
                else {
                    continue;
                };
                match change {
                    StatusChange::Acknowledged => {
                        entry.pending = entry.pending.saturating_sub(1);
                        if entry.pending == 0 && entry.status == MessageStatus::Queued {
                            entry.status = MessageStatus::Delivered;
                        }
                    }
                    StatusChange::Failed => entry.status = MessageStatus::Failed,
                    StatusChange::Resent => {
                        entry.pending = entry.pending.saturating_add(1);
                        if entry.status == MessageStatus::Delivered {
                            entry.status = MessageStatus::Queued;
                        }
                    }
                }
                store::put(&mut history, key, &entry, "history entry")?;
                applied.statuses.push((*conv, entry.id, entry.status));
            }
        }
        if !self.outbox_done.is_empty() || !self.outbox.is_empty() {
            let mut t = tx.open_table(tables::OUTBOX)?;
            for seq in &self.outbox_done {
                t.remove(*seq)?;
            }
            // A number is never given twice in one process, even once the
            // table has emptied: the sending service tells rows apart by
            // number, and still holds the numbers of rows whose removal is
            // being committed. (After a restart it holds none, so the
            // table's own last number is enough to start from.)
            let first = store::next_seq(&t)?.max(OUTBOX_NEXT.load(Ordering::SeqCst));
            // Raised before the commit: a transaction that is dropped and
            // run again only leaves a gap.
            OUTBOX_NEXT.fetch_max(first + self.outbox.len() as u64, Ordering::SeqCst);
            for (seq, entry) in (first..).zip(&self.outbox) {
                let mut entry = entry.clone();
                if let Some(id) = entry.message {
                    entry.history = positions.get(&id).copied().or(entry.history);
                }
                store::put(&mut t, seq, &entry, "outbox entry")?;
                applied.outbox.push((seq, entry));
            }
        }
        if !self.inbox_done.is_empty() || !self.routes.is_empty() || !self.inbox.is_empty() {
            let mut t = tx.open_table(tables::INBOX)?;
            for seq in &self.inbox_done {
                t.remove(*seq)?;
            }
            // Rows that came for a group before we knew it move to it.
            if !self.routes.is_empty() {
                let mut moved = Vec::new();
                for e in t.iter()? {
                    let (k, v) = e?;
                    let mut entry: InboxEntry = store::decode(v.value(), "inbox entry")?;
                    let target = self.routes.iter().find(|(p, c, _)| {
                        entry.owner == Owner::Proton(*p) && entry.context == Some(*c)
                    });
                    if let Some((_, _, g)) = target {
                        entry.owner = Owner::Group(*g);
                        entry.context = None;
                        moved.push((k.value(), entry));
                    }
                }
                for (seq, entry) in moved {
                    store::put(&mut t, seq, &entry, "inbox entry")?;
                }
            }
            let first = store::next_seq(&t)?;
            for (seq, entry) in (first..).zip(&self.inbox) {
                store::put(&mut t, seq, entry, "inbox entry")?;
                applied.inbox_owners.push(entry.owner);
            }
        }
        Ok(applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn row(n: u8) -> OutboxEntry {
        OutboxEntry {
            conversation: Conversation::Proton(ProtonId([n; 8])),
            recipient: Recipient::Peer,
            kind: crate::records::OutboxKind::Control,
            message: None,
            history: None,
            address: None,
            payload: vec![n],
            created_at: 0,
        }
    }

    /// The sending service may still hold the number of a row whose removal
    /// is being committed; a new row must not come back with it.
    #[test]
    fn an_outbox_number_is_not_given_again_once_the_table_empties() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let queue = |n: u8| {
            let changes = Changes {
                outbox: vec![row(n)],
                ..Changes::default()
            };
            let applied = store.write_blocking(|tx| changes.apply(tx)).unwrap();
            applied.outbox[0].0
        };
        let finish = |seq: u64| {
            let changes = Changes {
                outbox_done: vec![seq],
                ..Changes::default()
            };
            store.write_blocking(|tx| changes.apply(tx)).unwrap();
        };
        let first = queue(1);
        finish(first);
        let second = queue(2);
        assert!(second > first, "{second} after {first}");
        let third = queue(3);
        assert!(third > second);
        finish(third);
        finish(second);
        assert!(queue(4) > third);
    }
}
