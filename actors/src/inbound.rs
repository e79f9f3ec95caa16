//! The receiving service: accepts envelopes for this node's delivery
//! addresses and acknowledges them only once they are durably stored.
//!
//! ```text
//! transports::Event::Inbound(batch)
//!        │
//!        ▼
//!   store_batch ── one write txn: resolve each address, de-duplicate,
//!        │         append to INBOX, consume one-time addresses; commit
//!        ▼
//!   batch.respond(receipts)      (only after the commit)
//!        │
//!        ▼
//!   RelationshipManager ◀── InboxReady(owners): the owners' actors process
//!                           their INBOX rows later, each in its own txn
//! ```
//!
//! An unknown address, an expired one and a one-time address already used
//! all get the same `Refused(UnknownAddress)`, so answers reveal nothing
//! about which addresses exist.

use redb::{ReadableTable, WriteTransaction};
use sha2::{Digest, Sha256};
use transports::{Envelope, Receipt, Refusal};

use crate::records::{AddressKind, AddressRecord, InboxEntry, Owner};
use crate::store::{self, tables, StoreError};

/// How long the hash of a received payload is remembered for
/// de-duplication. Retries come within minutes; MLS itself refuses a
/// ciphertext whose key was used, so this bounds only the table's size.
pub const SEEN_RETENTION_MS: u64 = 30 * 24 * 3600 * 1000;

/// Stores a batch of envelopes in `tx`: the receipts, in order, and the
/// owners that have new inbox rows.
pub fn store_batch(
    tx: &WriteTransaction,
    envelopes: &[Envelope],
    now: u64,
) -> Result<(Vec<Receipt>, Vec<Owner>), StoreError> {
    let mut addresses = tx.open_table(tables::ADDRESSES)?;
    let mut seen = tx.open_table(tables::SEEN)?;
    let mut inbox = tx.open_table(tables::INBOX)?;
    let mut next = store::next_seq(&inbox)?;
    let mut receipts = Vec::with_capacity(envelopes.len());
    let mut owners: Vec<Owner> = Vec::new();
    for envelope in envelopes {
        if envelope.version != transports::PROTOCOL_VERSION {
            receipts.push(Receipt::Refused(Refusal::UnsupportedVersion));
            continue;
        }
        let key = *envelope.to.as_bytes();
        let record: Option<AddressRecord> = store::get(&addresses, key, "address")?;
        let Some(record) = record.filter(|r| now < r.valid_until) else {
            receipts.push(Receipt::Refused(Refusal::UnknownAddress));
            continue;
        };
        let hash: [u8; 32] = Sha256::digest(&envelope.payload).into();
        if seen.get(hash)?.is_some() {
            receipts.push(Receipt::Duplicate);
            continue;
        }
        seen.insert(hash, now)?;
        let entry = InboxEntry {
            owner: record.owner,
            payload: envelope.payload.clone(),
            received_at: now,
        };
        store::put(&mut inbox, next, &entry, "inbox entry")?;
        next += 1;
        if record.kind == AddressKind::OneTime {
            addresses.remove(key)?;
        }
        if !owners.contains(&record.owner) {
            owners.push(record.owner);
        }
        receipts.push(Receipt::Stored);
    }
    Ok((receipts, owners))
}

/// Forgets payload hashes older than the retention period.
pub fn prune_seen(tx: &WriteTransaction, now: u64) -> Result<usize, StoreError> {
    let mut seen = tx.open_table(tables::SEEN)?;
    let cutoff = now.saturating_sub(SEEN_RETENTION_MS);
    let old: Vec<[u8; 32]> = seen
        .iter()?
        .filter_map(|e| match e {
            Ok((k, v)) if v.value() < cutoff => Some(Ok(k.value())),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<_, _>>()?;
    for k in &old {
        seen.remove(*k)?;
    }
    Ok(old.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ProtonId, TicketId};
    use crate::store::Store;
    use redb::ReadableTableMetadata;
    use transports::DeliveryAddress;

    fn store_with(addresses: &[(DeliveryAddress, AddressRecord)]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let rows = addresses.to_vec();
        store
            .write_blocking(move |tx| {
                let mut t = tx.open_table(tables::ADDRESSES)?;
                for (a, r) in &rows {
                    store::put(&mut t, *a.as_bytes(), r, "address")?;
                }
                Ok(())
            })
            .unwrap();
        (dir, store)
    }

    fn inbox_len(store: &Store) -> u64 {
        store
            .read(|tx| Ok(tx.open_table(tables::INBOX)?.len()?))
            .unwrap()
    }

    #[test]
    fn stores_known_refuses_unknown_and_expired_alike_and_deduplicates() {
        let live = DeliveryAddress::random();
        let expired = DeliveryAddress::random();
        let owner = Owner::Proton(ProtonId::random());
        let (_dir, store) = store_with(&[
            (
                live,
                AddressRecord {
                    owner,
                    kind: AddressKind::LongTerm,
                    valid_until: 100,
                },
            ),
            (
                expired,
                AddressRecord {
                    owner,
                    kind: AddressKind::Ephemeral,
                    valid_until: 10,
                },
            ),
        ]);
        let batch = vec![
            Envelope::new(live, b"one".to_vec()),
            Envelope::new(live, b"one".to_vec()),
            Envelope::new(expired, b"two".to_vec()),
            Envelope::new(DeliveryAddress::random(), b"three".to_vec()),
            Envelope {
                version: 9,
                to: live,
                payload: b"four".to_vec(),
            },
        ];
        let (receipts, owners) = store
            .write_blocking(move |tx| store_batch(tx, &batch, 50))
            .unwrap();
        assert_eq!(
            receipts,
            vec![
                Receipt::Stored,
                Receipt::Duplicate,
                Receipt::Refused(Refusal::UnknownAddress),
                Receipt::Refused(Refusal::UnknownAddress),
                Receipt::Refused(Refusal::UnsupportedVersion),
            ]
        );
        assert_eq!(owners, vec![owner]);
        assert_eq!(inbox_len(&store), 1);

        // A retry after the acknowledgement was lost is a duplicate, not a second copy.
        let again = vec![Envelope::new(live, b"one".to_vec())];
        let (receipts, _) = store
            .write_blocking(move |tx| store_batch(tx, &again, 60))
            .unwrap();
        assert_eq!(receipts, vec![Receipt::Duplicate]);
        assert_eq!(inbox_len(&store), 1);
    }

    #[test]
    fn a_one_time_address_takes_one_envelope() {
        let ticket = DeliveryAddress::random();
        let (_dir, store) = store_with(&[(
            ticket,
            AddressRecord {
                owner: Owner::Ticket(TicketId::random()),
                kind: AddressKind::OneTime,
                valid_until: 100,
            },
        )]);
        let batch = vec![
            Envelope::new(ticket, b"first".to_vec()),
            Envelope::new(ticket, b"second".to_vec()),
        ];
        let (receipts, _) = store
            .write_blocking(move |tx| store_batch(tx, &batch, 50))
            .unwrap();
        assert_eq!(
            receipts,
            vec![Receipt::Stored, Receipt::Refused(Refusal::UnknownAddress)]
        );
    }

    #[test]
    fn old_hashes_are_pruned() {
        let live = DeliveryAddress::random();
        let owner = Owner::Proton(ProtonId::random());
        let (_dir, store) = store_with(&[(
            live,
            AddressRecord {
                owner,
                kind: AddressKind::LongTerm,
                valid_until: u64::MAX,
            },
        )]);
        let batch = vec![Envelope::new(live, b"x".to_vec())];
        store
            .write_blocking(move |tx| store_batch(tx, &batch, 1))
            .unwrap();
        let pruned = store
            .write_blocking(|tx| prune_seen(tx, 2 + SEEN_RETENTION_MS))
            .unwrap();
        assert_eq!(pruned, 1);
    }
}
