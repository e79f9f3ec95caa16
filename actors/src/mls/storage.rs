//! The openmls `StorageProvider` over redb.
//!
//! openmls writes its entities one by one through `&self` methods; on their
//! own those writes are not transactional. Here they never touch the
//! database directly: every write lands in a *write set* held in memory,
//! reads look at the write set first and then at the last committed state,
//! and the owner of the storage takes the write set ([`MlsStorage::take_writes`])
//! and applies it ([`apply_writes`]) inside the same redb write transaction
//! as the rows that belong with it (history, outbox, inbox). So "process this
//! commit and record what it produced" is all or nothing.
//!
//! Keys are namespaced per proton / group proton (8 bytes first), so a
//! placeholder and its successor can hold state of the same MLS group in one
//! node, and a whole conversation's MLS state can be dropped by prefix.
//! Values are MessagePack with named fields (rmp-serde): some openmls types
//! deserialise through `serde(untagged)`, which needs a self-describing
//! format and which postcard cannot read. openmls's own providers use
//! serde_json, as this one did before: a value written then (it starts
//! with a JSON character) is still read as JSON; a value written now starts
//! with the byte [`PACKED`], which starts no JSON text. MessagePack writes
//! a byte of key material as one or two bytes where JSON wrote it as up to
//! four digits and a comma: a group member's state after one message in a
//! 128-member group, rewritten at each message, was 5.1 KB of JSON.
//! Keys keep their JSON encoding, so that values written before are found.
//! A group's message secrets, written after every message, are stored in
//! parts (see [`past_epochs`](super::past_epochs)) and with their byte
//! strings as MessagePack binaries.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use openmls_traits::storage::{traits, StorageProvider, CURRENT_VERSION};
use redb::{ReadableTable, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::past_epochs;
use crate::store::{tables, Store, StoreError};

/// Pending writes: full key → new value, or `None` for a deletion.
pub type WriteSet = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Why openmls storage failed.
#[derive(Debug, thiserror::Error)]
pub enum MlsStorageError {
    #[error("store: {0}")]
    Store(String),
    #[error("openmls value could not be (de)serialised: {0}")]
    Json(#[from] serde_json::Error),
    #[error("openmls value could not be serialised: {0}")]
    Pack(#[from] rmp_serde::encode::Error),
    #[error("openmls value could not be deserialised: {0}")]
    Unpack(#[from] rmp_serde::decode::Error),
    #[error("a stored openmls list is malformed")]
    List,
    #[error(transparent)]
    Parts(#[from] past_epochs::Malformed),
}

/// The first byte of every value written in MessagePack: `0xc1` is the one
/// byte MessagePack never uses, and no JSON text starts with it.
pub const PACKED: u8 = 0xc1;

/// `value` as it is stored: [`PACKED`], then MessagePack with named fields.
fn pack<V: Serialize + ?Sized>(value: &V) -> Result<Vec<u8>, MlsStorageError> {
    #[cfg(test)]
    if WRITE_JSON.get() {
        return Ok(serde_json::to_vec(value)?);
    }
    let mut out = vec![PACKED];
    pack_into(&mut out, value)?;
    Ok(out)
}

fn pack_into<V: Serialize + ?Sized>(out: &mut Vec<u8>, value: &V) -> Result<(), MlsStorageError> {
    value.serialize(&mut rmp_serde::Serializer::new(out).with_struct_map())?;
    Ok(())
}

/// `value` packed, with its byte strings as MessagePack binaries rather
/// than lists of numbers: several times faster to write and to walk, and
/// smaller. Only for values whose types read byte strings as sequences
/// (which rmp-serde serves from a binary too); a byte string inside a
/// `serde(untagged)` or `flatten` type would not read back. A group's
/// message secrets are such a value, and written after every message.
fn pack_binaries<V: Serialize + ?Sized>(value: &V) -> Result<Vec<u8>, MlsStorageError> {
    #[cfg(test)]
    if WRITE_JSON.get() {
        return Ok(serde_json::to_vec(value)?);
    }
    let mut out = vec![PACKED];
    value.serialize(
        &mut rmp_serde::Serializer::new(&mut out)
            .with_struct_map()
            .with_bytes(rmp_serde::config::BytesMode::ForceIterables),
    )?;
    Ok(out)
}

#[cfg(test)]
thread_local! {
    /// Set, this thread writes as a node did before values were packed
    /// (tests of reading what such a node left).
    pub static WRITE_JSON: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Set, this thread writes a group's message secrets whole, with byte
    /// strings as lists of numbers, as a node did before they were stored
    /// in parts.
    pub static WRITE_WHOLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a list with nothing stored yet is begun in JSON (only in tests
/// that write as an older node did).
fn begin_lists_in_json() -> bool {
    #[cfg(test)]
    return WRITE_JSON.get();
    #[cfg(not(test))]
    false
}

/// A stored value, written now (packed) or before (JSON).
fn unpack<V: DeserializeOwned>(bytes: &[u8]) -> Result<V, MlsStorageError> {
    match bytes.split_first() {
        Some((&PACKED, packed)) => Ok(rmp_serde::from_slice(packed)?),
        _ => Ok(serde_json::from_slice(bytes)?),
    }
}

/// A packed list: how many items, and their bytes (one after the other).
fn packed_items(packed: &[u8]) -> Result<(u32, &[u8]), MlsStorageError> {
    let mut items = packed;
    let len = rmp::decode::read_array_len(&mut items).map_err(|_| MlsStorageError::List)?;
    Ok((len, items))
}

impl From<StoreError> for MlsStorageError {
    fn from(e: StoreError) -> Self {
        Self::Store(e.to_string())
    }
}

impl From<redb::StorageError> for MlsStorageError {
    fn from(e: redb::StorageError) -> Self {
        Self::Store(e.to_string())
    }
}

/// openmls storage for one namespace (one proton or group proton).
pub struct MlsStorage {
    store: Store,
    namespace: [u8; 8],
    writes: RefCell<WriteSet>,
    /// How many times the pending writes changed (openmls's writes and
    /// deletions, or writes taken or dropped): a step in which they did
    /// not change left the in-memory MLS state as it found it.
    written: Cell<u64>,
}

/// The pending writes before a step, to put back if it fails.
pub struct Snapshot {
    writes: WriteSet,
    written: u64,
}

impl MlsStorage {
    pub fn new(store: Store, namespace: [u8; 8]) -> Self {
        Self {
            store,
            namespace,
            writes: RefCell::new(WriteSet::new()),
            written: Cell::new(0),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn namespace(&self) -> [u8; 8] {
        self.namespace
    }

    /// Takes the writes made since the last call, leaving none pending. The
    /// caller commits them with [`apply_writes`] or, on failure, drops them
    /// and reloads whatever in-memory MLS state was built on them.
    pub fn take_writes(&self) -> WriteSet {
        self.written.set(self.written.get() + 1);
        std::mem::take(&mut *self.writes.borrow_mut())
    }

    /// Whether writes are pending.
    pub fn has_writes(&self) -> bool {
        !self.writes.borrow().is_empty()
    }

    /// A copy of the pending writes, to restore if the next step fails.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            writes: self.writes.borrow().clone(),
            written: self.written.get(),
        }
    }

    /// Puts back the pending writes of a snapshot. Says whether openmls
    /// wrote anything since it was taken: only then can the in-memory MLS
    /// state differ from what the storage now holds, and need reloading.
    /// (openmls persists each change of a group's state as it makes it; a
    /// message it refuses, such as a replay or one for a key already used,
    /// is refused before anything is written.)
    #[must_use = "in-memory MLS state built on the dropped writes must be reloaded"]
    pub fn restore(&self, snapshot: Snapshot) -> bool {
        if self.written.get() == snapshot.written {
            return false;
        }
        *self.writes.borrow_mut() = snapshot.writes;
        true
    }

    /// Drops pending writes (the operation they belonged to failed).
    pub fn discard_writes(&self) {
        self.written.set(self.written.get() + 1);
        self.writes.borrow_mut().clear();
    }

    fn key<K: Serialize>(&self, label: &str, key: &K) -> Result<Vec<u8>, MlsStorageError> {
        let mut k = Vec::with_capacity(8 + label.len() + 1 + 64);
        k.extend_from_slice(&self.namespace);
        k.extend_from_slice(label.as_bytes());
        k.push(0);
        serde_json::to_writer(&mut k, key)?;
        Ok(k)
    }

    fn raw_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MlsStorageError> {
        if let Some(pending) = self.writes.borrow().get(key) {
            return Ok(pending.clone());
        }
        Ok(self.store.read(|tx| {
            let table = tx.open_table(tables::MLS)?;
            Ok(table.get(key)?.map(|v| v.value().to_vec()))
        })?)
    }

    /// Counts a change to the pending writes as begun: a write that fails
    /// half-way (openmls has changed its group in memory before it asks)
    /// must still have the failed step reload the group.
    fn attempt(&self) {
        self.written.set(self.written.get() + 1);
    }

    fn raw_put(&self, key: Vec<u8>, value: Vec<u8>) {
        self.written.set(self.written.get() + 1);
        self.writes.borrow_mut().insert(key, Some(value));
    }

    fn raw_delete(&self, key: Vec<u8>) {
        self.written.set(self.written.get() + 1);
        self.writes.borrow_mut().insert(key, None);
    }

    fn write<K: Serialize, V: Serialize>(
        &self,
        label: &str,
        key: &K,
        value: &V,
    ) -> Result<(), MlsStorageError> {
        self.attempt();
        let k = self.key(label, key)?;
        self.raw_put(k, pack(value)?);
        Ok(())
    }

    fn read<K: Serialize, V: DeserializeOwned>(
        &self,
        label: &str,
        key: &K,
    ) -> Result<Option<V>, MlsStorageError> {
        let k = self.key(label, key)?;
        match self.raw_get(&k)? {
            Some(bytes) => Ok(Some(unpack(&bytes)?)),
            None => Ok(None),
        }
    }

    fn delete<K: Serialize>(&self, label: &str, key: &K) -> Result<(), MlsStorageError> {
        self.attempt();
        let k = self.key(label, key)?;
        self.raw_delete(k);
        Ok(())
    }

    /// Writes a group's message secrets as a head and one value per past
    /// epoch, rewriting only the past epochs that changed.
    fn write_message_secrets_in_parts<K: Serialize, V: Serialize>(
        &self,
        group_id: &K,
        value: &V,
    ) -> Result<(), MlsStorageError> {
        self.attempt();
        let k = self.key(MESSAGE_SECRETS, group_id)?;
        #[cfg(test)]
        if WRITE_WHOLE.get() {
            self.raw_put(k, pack(value)?);
            return Ok(());
        }
        let bytes = pack_binaries(value)?;
        let parts = match bytes.split_first() {
            Some((&PACKED, packed)) => past_epochs::split(packed)?,
            _ => None,
        };
        let before = self.stored_past_epochs(&k)?;
        let Some(parts) = parts else {
            for epoch in before {
                self.delete(PAST_EPOCH, &(group_id, epoch))?;
            }
            self.raw_put(k, bytes);
            return Ok(());
        };
        for (epoch, tree) in &parts.epochs {
            let ek = self.key(PAST_EPOCH, &(group_id, epoch))?;
            if self.raw_get(&ek)?.as_deref() != Some(*tree) {
                self.raw_put(ek, tree.to_vec());
            }
        }
        for epoch in before {
            if !parts.epochs.iter().any(|(e, _)| *e == epoch) {
                self.delete(PAST_EPOCH, &(group_id, epoch))?;
            }
        }
        let mut head = Vec::with_capacity(1 + parts.head.len());
        head.push(PACKED);
        head.extend_from_slice(&parts.head);
        self.raw_put(k, head);
        Ok(())
    }

    fn read_message_secrets_in_parts<K: Serialize, V: DeserializeOwned>(
        &self,
        group_id: &K,
    ) -> Result<Option<V>, MlsStorageError> {
        let k = self.key(MESSAGE_SECRETS, group_id)?;
        let Some(bytes) = self.raw_get(&k)? else {
            return Ok(None);
        };
        let Some((&PACKED, head)) = bytes.split_first() else {
            return Ok(Some(unpack(&bytes)?));
        };
        let whole = past_epochs::join(head, |epoch| {
            self.raw_get(&self.key(PAST_EPOCH, &(group_id, epoch))?)?
                .ok_or(MlsStorageError::Parts(past_epochs::Malformed::MISSING))
        })?;
        Ok(Some(rmp_serde::from_slice(&whole)?))
    }

    /// The past epochs stored apart for the message secrets at `k`.
    fn stored_past_epochs(&self, k: &[u8]) -> Result<Vec<u64>, MlsStorageError> {
        Ok(match self.raw_get(k)? {
            Some(bytes) => match bytes.split_first() {
                Some((&PACKED, head)) => past_epochs::listed(head)?.unwrap_or_default(),
                _ => Vec::new(),
            },
            None => Vec::new(),
        })
    }

    fn read_list<K: Serialize, V: DeserializeOwned>(
        &self,
        label: &str,
        key: &K,
    ) -> Result<Vec<V>, MlsStorageError> {
        Ok(self.read(label, key)?.unwrap_or_default())
    }

    fn append<K: Serialize, V: Serialize + DeserializeOwned>(
        &self,
        label: &str,
        key: &K,
        value: &V,
    ) -> Result<(), MlsStorageError> {
        self.attempt();
        let k = self.key(label, key)?;
        let stored = self.raw_get(&k)?;
        // A list written as JSON stays JSON.
        let in_json = match &stored {
            Some(bytes) => bytes.first() != Some(&PACKED),
            None => begin_lists_in_json(),
        };
        let list = if in_json {
            let mut list: Vec<serde_json::Value> = match &stored {
                Some(json) => serde_json::from_slice(json)?,
                None => Vec::new(),
            };
            list.push(serde_json::to_value(value)?);
            serde_json::to_vec(&list)?
        } else {
            // A packed array is its length, then its items: one more item
            // is a new length, the same items, and the new one after them.
            let (len, items) = match &stored {
                Some(bytes) => packed_items(bytes.get(1..).unwrap_or_default())?,
                None => (0, &[][..]),
            };
            let mut list = vec![PACKED];
            rmp::encode::write_array_len(&mut list, len.saturating_add(1))
                .map_err(|_| MlsStorageError::List)?;
            list.extend_from_slice(items);
            pack_into(&mut list, value)?;
            list
        };
        self.raw_put(k, list);
        Ok(())
    }
}

/// Applies a write set inside the caller's write transaction.
pub fn apply_writes(tx: &WriteTransaction, writes: &WriteSet) -> Result<(), StoreError> {
    if writes.is_empty() {
        return Ok(());
    }
    let mut table = tx.open_table(tables::MLS)?;
    for (key, value) in writes {
        match value {
            Some(v) => {
                table.insert(key.as_slice(), v.as_slice())?;
            }
            None => {
                table.remove(key.as_slice())?;
            }
        }
    }
    Ok(())
}

/// Deletes every openmls entry of one namespace.
pub fn delete_namespace(tx: &WriteTransaction, namespace: [u8; 8]) -> Result<(), StoreError> {
    let mut table = tx.open_table(tables::MLS)?;
    // Keys start with the fixed-size namespace, so the namespace's keys sort
    // below the next namespace value (or run to the end for the last one).
    let keys: Vec<Vec<u8>> = match u64::from_be_bytes(namespace).checked_add(1) {
        Some(next) => table
            .range(namespace.as_slice()..next.to_be_bytes().as_slice())?
            .map(|entry| entry.map(|(k, _)| k.value().to_vec()))
            .collect::<Result<_, _>>()?,
        None => table
            .range(namespace.as_slice()..)?
            .map(|entry| entry.map(|(k, _)| k.value().to_vec()))
            .collect::<Result<_, _>>()?,
    };
    for k in keys {
        table.remove(k.as_slice())?;
    }
    Ok(())
}

// Labels of the stored entities. One per method family.
const JOIN_CONFIG: &str = "join_config";
const OWN_LEAF_NODES: &str = "own_leaf_nodes";
const PROPOSAL: &str = "proposal";
const PROPOSAL_REFS: &str = "proposal_refs";
const TREE: &str = "tree";
const INTERIM_TRANSCRIPT_HASH: &str = "interim_transcript_hash";
const CONTEXT: &str = "context";
const CONFIRMATION_TAG: &str = "confirmation_tag";
const GROUP_STATE: &str = "group_state";
const MESSAGE_SECRETS: &str = "message_secrets";
/// One past epoch of a group's message secrets (see [`past_epochs`]).
const PAST_EPOCH: &str = "message_secrets_past_epoch";
const RESUMPTION_PSK_STORE: &str = "resumption_psk_store";
const OWN_LEAF_INDEX: &str = "own_leaf_index";
const EPOCH_SECRETS: &str = "epoch_secrets";
const SIGNATURE_KEY_PAIR: &str = "signature_key_pair";
const ENCRYPTION_KEY_PAIR: &str = "encryption_key_pair";
const EPOCH_KEY_PAIRS: &str = "epoch_key_pairs";
const KEY_PACKAGE: &str = "key_package";
const PSK: &str = "psk";

impl StorageProvider<CURRENT_VERSION> for MlsStorage {
    type Error = MlsStorageError;

    fn write_mls_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        config: &MlsGroupJoinConfig,
    ) -> Result<(), Self::Error> {
        self.write(JOIN_CONFIG, group_id, config)
    }

    fn append_own_leaf_node<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        leaf_node: &LeafNode,
    ) -> Result<(), Self::Error> {
        self.append(OWN_LEAF_NODES, group_id, leaf_node)
    }

    fn queue_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
        proposal: &QueuedProposal,
    ) -> Result<(), Self::Error> {
        self.write(PROPOSAL, &(group_id, proposal_ref), proposal)?;
        self.append(PROPOSAL_REFS, group_id, proposal_ref)
    }

    fn write_tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        tree: &TreeSync,
    ) -> Result<(), Self::Error> {
        self.write(TREE, group_id, tree)
    }

    fn write_interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        interim_transcript_hash: &InterimTranscriptHash,
    ) -> Result<(), Self::Error> {
        self.write(INTERIM_TRANSCRIPT_HASH, group_id, interim_transcript_hash)
    }

    fn write_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_context: &GroupContext,
    ) -> Result<(), Self::Error> {
        self.write(CONTEXT, group_id, group_context)
    }

    fn write_confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        confirmation_tag: &ConfirmationTag,
    ) -> Result<(), Self::Error> {
        self.write(CONFIRMATION_TAG, group_id, confirmation_tag)
    }

    fn write_group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_state: &GroupState,
    ) -> Result<(), Self::Error> {
        self.write(GROUP_STATE, group_id, group_state)
    }

    fn write_message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        message_secrets: &MessageSecrets,
    ) -> Result<(), Self::Error> {
        self.write_message_secrets_in_parts(group_id, message_secrets)
    }

    fn write_resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        resumption_psk_store: &ResumptionPskStore,
    ) -> Result<(), Self::Error> {
        self.write(RESUMPTION_PSK_STORE, group_id, resumption_psk_store)
    }

    fn write_own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        own_leaf_index: &LeafNodeIndex,
    ) -> Result<(), Self::Error> {
        self.write(OWN_LEAF_INDEX, group_id, own_leaf_index)
    }

    fn write_group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_epoch_secrets: &GroupEpochSecrets,
    ) -> Result<(), Self::Error> {
        self.write(EPOCH_SECRETS, group_id, group_epoch_secrets)
    }

    fn write_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
        signature_key_pair: &SignatureKeyPair,
    ) -> Result<(), Self::Error> {
        self.write(SIGNATURE_KEY_PAIR, public_key, signature_key_pair)
    }

    fn write_encryption_key_pair<
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
        key_pair: &HpkeKeyPair,
    ) -> Result<(), Self::Error> {
        self.write(ENCRYPTION_KEY_PAIR, public_key, key_pair)
    }

    fn write_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
        key_pairs: &[HpkeKeyPair],
    ) -> Result<(), Self::Error> {
        self.write(EPOCH_KEY_PAIRS, &(group_id, epoch, leaf_index), &key_pairs)
    }

    fn write_key_package<
        HashReference: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &HashReference,
        key_package: &KeyPackage,
    ) -> Result<(), Self::Error> {
        self.write(KEY_PACKAGE, hash_ref, key_package)
    }

    fn write_psk<
        PskId: traits::PskId<CURRENT_VERSION>,
        PskBundle: traits::PskBundle<CURRENT_VERSION>,
    >(
        &self,
        psk_id: &PskId,
        psk: &PskBundle,
    ) -> Result<(), Self::Error> {
        self.write(PSK, psk_id, psk)
    }

    fn mls_group_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MlsGroupJoinConfig>, Self::Error> {
        self.read(JOIN_CONFIG, group_id)
    }

    fn own_leaf_nodes<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<LeafNode>, Self::Error> {
        self.read_list(OWN_LEAF_NODES, group_id)
    }

    fn queued_proposal_refs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<ProposalRef>, Self::Error> {
        self.read_list(PROPOSAL_REFS, group_id)
    }

    fn queued_proposals<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<(ProposalRef, QueuedProposal)>, Self::Error> {
        let refs: Vec<ProposalRef> = self.read_list(PROPOSAL_REFS, group_id)?;
        let mut out = Vec::with_capacity(refs.len());
        for r in refs {
            if let Some(p) = self.read(PROPOSAL, &(group_id, &r))? {
                out.push((r, p));
            }
        }
        Ok(out)
    }

    fn tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<TreeSync>, Self::Error> {
        self.read(TREE, group_id)
    }

    fn group_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupContext>, Self::Error> {
        self.read(CONTEXT, group_id)
    }

    fn interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<InterimTranscriptHash>, Self::Error> {
        self.read(INTERIM_TRANSCRIPT_HASH, group_id)
    }

    fn confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ConfirmationTag>, Self::Error> {
        self.read(CONFIRMATION_TAG, group_id)
    }

    fn group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupState>, Self::Error> {
        self.read(GROUP_STATE, group_id)
    }

    fn message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MessageSecrets>, Self::Error> {
        self.read_message_secrets_in_parts(group_id)
    }

    fn resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ResumptionPskStore>, Self::Error> {
        self.read(RESUMPTION_PSK_STORE, group_id)
    }

    fn own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<LeafNodeIndex>, Self::Error> {
        self.read(OWN_LEAF_INDEX, group_id)
    }

    fn group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupEpochSecrets>, Self::Error> {
        self.read(EPOCH_SECRETS, group_id)
    }

    fn signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<Option<SignatureKeyPair>, Self::Error> {
        self.read(SIGNATURE_KEY_PAIR, public_key)
    }

    fn encryption_key_pair<
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<Option<HpkeKeyPair>, Self::Error> {
        self.read(ENCRYPTION_KEY_PAIR, public_key)
    }

    fn encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<Vec<HpkeKeyPair>, Self::Error> {
        self.read_list(EPOCH_KEY_PAIRS, &(group_id, epoch, leaf_index))
    }

    fn key_package<
        KeyPackageRef: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<Option<KeyPackage>, Self::Error> {
        self.read(KEY_PACKAGE, hash_ref)
    }

    fn psk<PskBundle: traits::PskBundle<CURRENT_VERSION>, PskId: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskId,
    ) -> Result<Option<PskBundle>, Self::Error> {
        self.read(PSK, psk_id)
    }

    fn remove_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
    ) -> Result<(), Self::Error> {
        // Compared as values, whichever way the list was written.
        let target = serde_json::to_value(proposal_ref)?;
        let refs: Vec<ProposalRef> = self.read_list(PROPOSAL_REFS, group_id)?;
        let mut kept = Vec::with_capacity(refs.len());
        for r in refs {
            if serde_json::to_value(&r)? != target {
                kept.push(r);
            }
        }
        self.write(PROPOSAL_REFS, group_id, &kept)?;
        self.delete(PROPOSAL, &(group_id, proposal_ref))
    }

    fn delete_own_leaf_nodes<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(OWN_LEAF_NODES, group_id)
    }

    fn delete_group_config<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(JOIN_CONFIG, group_id)
    }

    fn delete_tree<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(TREE, group_id)
    }

    fn delete_confirmation_tag<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(CONFIRMATION_TAG, group_id)
    }

    fn delete_group_state<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(GROUP_STATE, group_id)
    }

    fn delete_context<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(CONTEXT, group_id)
    }

    fn delete_interim_transcript_hash<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(INTERIM_TRANSCRIPT_HASH, group_id)
    }

    fn delete_message_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.attempt();
        let k = self.key(MESSAGE_SECRETS, group_id)?;
        for epoch in self.stored_past_epochs(&k)? {
            self.delete(PAST_EPOCH, &(group_id, epoch))?;
        }
        self.raw_delete(k);
        Ok(())
    }

    fn delete_all_resumption_psk_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(RESUMPTION_PSK_STORE, group_id)
    }

    fn delete_own_leaf_index<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(OWN_LEAF_INDEX, group_id)
    }

    fn delete_group_epoch_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(EPOCH_SECRETS, group_id)
    }

    fn clear_proposal_queue<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        let refs: Vec<ProposalRef> = self.read_list(PROPOSAL_REFS, group_id)?;
        for r in refs {
            self.delete(PROPOSAL, &(group_id, &r))?;
        }
        self.delete(PROPOSAL_REFS, group_id)
    }

    fn delete_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<(), Self::Error> {
        self.delete(SIGNATURE_KEY_PAIR, public_key)
    }

    fn delete_encryption_key_pair<EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>>(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<(), Self::Error> {
        self.delete(ENCRYPTION_KEY_PAIR, public_key)
    }

    fn delete_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<(), Self::Error> {
        self.delete(EPOCH_KEY_PAIRS, &(group_id, epoch, leaf_index))
    }

    fn delete_key_package<KeyPackageRef: traits::HashReference<CURRENT_VERSION>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<(), Self::Error> {
        self.delete(KEY_PACKAGE, hash_ref)
    }

    fn delete_psk<PskKey: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskKey,
    ) -> Result<(), Self::Error> {
        self.delete(PSK, psk_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lists (appended item by item) in either format, and values of a
    /// type that needs a self-describing format.
    #[test]
    fn lists_and_untagged_values_round_trip_in_either_format() {
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(untagged)]
        enum Either {
            Number { n: u64 },
            Bytes { b: Vec<u8>, more: Option<String> },
        }
        let items = [
            Either::Number { n: 7 },
            Either::Bytes {
                b: vec![0, 200, 255],
                more: None,
            },
            Either::Bytes {
                b: vec![],
                more: Some("x".into()),
            },
        ];
        for json in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let s = MlsStorage::new(Store::open(&dir.path().join("db")).unwrap(), [1; 8]);
            WRITE_JSON.set(json);
            for item in &items {
                s.append("list", &1u8, item).unwrap();
            }
            s.write("one", &2u8, &items[1]).unwrap();
            WRITE_JSON.set(false);
            // One more, now, to a list begun either way.
            s.append("list", &1u8, &items[0]).unwrap();
            let list: Vec<Either> = s.read_list("list", &1u8).unwrap();
            assert_eq!(list.len(), 4);
            assert_eq!(list[..3], items[..]);
            assert_eq!(list[3], items[0]);
            let one: Option<Either> = s.read("one", &2u8).unwrap();
            assert_eq!(one.as_ref(), Some(&items[1]));
            // Committed and read back from the file, the same.
            let writes = s.take_writes();
            s.store()
                .write_blocking(|tx| apply_writes(tx, &writes))
                .unwrap();
            let list: Vec<Either> = s.read_list("list", &1u8).unwrap();
            assert_eq!(list.len(), 4);
        }
    }
}
