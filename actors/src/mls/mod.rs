//! MLS (openmls) for every conversation: a 1:1 relationship is a 2-member
//! group, a group is a group. This module owns the provider (RustCrypto plus
//! our redb storage, see [`storage`]), the group configuration, and thin
//! helpers that turn openmls's many generic error types into [`MlsError`]
//! variants named for the step that failed.
//!
//! Every helper takes a provider whose storage collects writes; the caller
//! commits them together with its own rows (see `storage`'s module docs).

pub mod past_epochs;
pub mod storage;

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::storage::StorageProvider as _;

use crate::identity::{IdentityKey, Ipk};
use crate::store::Store;
pub use storage::{apply_writes, delete_namespace, MlsStorage, WriteSet};

/// The one ciphersuite protonode uses (DESIGN.md section 7).
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// How far ahead of the last seen message a sender's generation may be.
const MAX_FORWARD_DISTANCE: u32 = 5_000;
/// How many skipped generations are remembered for late arrivals.
const OUT_OF_ORDER_TOLERANCE: u32 = 64;
/// How many past epochs keep their secrets, for messages sent before the
/// commits that passed them. A message waits in its sender's outbox while
/// the receiver is down or unreachable, and the group may commit meanwhile
/// (a key rotation, a member added): 32 commits is the window it has. Each
/// kept epoch is also a window of old receive keys (forward secrecy is that
/// much weaker).
pub const MAX_PAST_EPOCHS: usize = 32;

/// What failed in an MLS step. openmls's errors are generic over the storage
/// error; they are kept as text, named by the step.
#[derive(Debug, thiserror::Error)]
pub enum MlsError {
    #[error("creating a key package failed: {0}")]
    KeyPackage(String),
    #[error("the key package is invalid: {0}")]
    InvalidKeyPackage(String),
    #[error("creating the group failed: {0}")]
    CreateGroup(String),
    #[error("adding a member failed: {0}")]
    AddMember(String),
    #[error("removing a member failed: {0}")]
    RemoveMember(String),
    #[error("updating our own leaf failed: {0}")]
    SelfUpdate(String),
    #[error("merging our commit failed: {0}")]
    MergeCommit(String),
    #[error("joining from the Welcome failed: {0}")]
    Welcome(String),
    #[error("encrypting failed: {0}")]
    Encrypt(String),
    #[error("processing an incoming message failed: {0}")]
    Process(String),
    #[error("the message was already processed (its key is used up): a retried delivery")]
    Replay,
    #[error("the message is from an epoch too long ago (more than {MAX_PAST_EPOCHS} commits): its keys are gone and it cannot be read")]
    Expired,
    #[error("loading the group from storage failed: {0}")]
    Load(String),
    #[error("the group is not in storage")]
    Missing,
    #[error("malformed MLS bytes: {0}")]
    Decode(String),
    #[error("unexpected MLS message: {0}")]
    Unexpected(&'static str),
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error("the sealed data does not open under this epoch's key")]
    Unseal,
}

/// openmls provider: RustCrypto for crypto and randomness, our redb storage.
pub struct Provider {
    crypto: RustCrypto,
    storage: MlsStorage,
}

impl Provider {
    /// A provider whose state lives under `namespace`.
    pub fn new(store: Store, namespace: [u8; 8]) -> Self {
        Self {
            crypto: RustCrypto::default(),
            storage: MlsStorage::new(store, namespace),
        }
    }

    pub fn mls_storage(&self) -> &MlsStorage {
        &self.storage
    }
}

impl OpenMlsProvider for Provider {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = MlsStorage;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        &self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        &self.crypto
    }
}

/// The credential of a (group) proton: a basic credential carrying the IPK,
/// whose signature key is that same IPK (DESIGN.md section 2).
pub fn credential(ipk: &Ipk) -> CredentialWithKey {
    CredentialWithKey {
        credential: BasicCredential::new(ipk.as_bytes().to_vec()).into(),
        signature_key: ipk.as_bytes().to_vec().into(),
    }
}

/// The IPK a member's credential names, if it is one of ours (a basic
/// credential whose identity is the signature key).
pub fn member_ipk(credential: &Credential, signature_key: &[u8]) -> Option<Ipk> {
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    let ipk = Ipk::from_slice(basic.identity())?;
    (ipk.as_bytes().as_slice() == signature_key).then_some(ipk)
}

fn create_config() -> MlsGroupCreateConfig {
    MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .use_ratchet_tree_extension(true)
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(
            OUT_OF_ORDER_TOLERANCE,
            MAX_FORWARD_DISTANCE,
        ))
        .build()
}

fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(
            OUT_OF_ORDER_TOLERANCE,
            MAX_FORWARD_DISTANCE,
        ))
        .build()
}

/// A fresh key package for `key`, its private parts written to the provider's storage.
pub fn new_key_package(
    provider: &Provider,
    key: &IdentityKey,
) -> Result<KeyPackageBundle, MlsError> {
    KeyPackage::builder()
        .build(CIPHERSUITE, provider, key, credential(&key.ipk()))
        .map_err(|e| MlsError::KeyPackage(e.to_string()))
}

/// Encodes a key package for the wire.
pub fn encode_key_package(kp: &KeyPackage) -> Result<Vec<u8>, MlsError> {
    kp.tls_serialize_detached()
        .map_err(|e| MlsError::Encode(e.to_string()))
}

/// Decodes and validates a key package received from outside: its
/// signature, ciphersuite and lifetime.
pub fn decode_key_package(
    crypto: &impl OpenMlsCrypto,
    bytes: &[u8],
) -> Result<KeyPackage, MlsError> {
    let kp =
        KeyPackageIn::tls_deserialize_exact(bytes).map_err(|e| MlsError::Decode(e.to_string()))?;
    let kp = kp
        .validate(crypto, ProtocolVersion::Mls10)
        .map_err(|e| MlsError::InvalidKeyPackage(e.to_string()))?;
    if kp.ciphersuite() != CIPHERSUITE {
        return Err(MlsError::InvalidKeyPackage(format!(
            "ciphersuite {:?} is not {:?}",
            kp.ciphersuite(),
            CIPHERSUITE
        )));
    }
    Ok(kp)
}

/// The IPK a key package's leaf credential names.
pub fn key_package_ipk(kp: &KeyPackage) -> Option<Ipk> {
    let leaf = kp.leaf_node();
    member_ipk(leaf.credential(), leaf.signature_key().as_slice())
}

/// Creates a group with `key` as its only member.
pub fn create_group(provider: &Provider, key: &IdentityKey) -> Result<MlsGroup, MlsError> {
    MlsGroup::new(provider, key, &create_config(), credential(&key.ipk()))
        .map_err(|e| MlsError::CreateGroup(e.to_string()))
}

/// Adds members, merges the commit at once (the caller is the only one who
/// can commit in this epoch, or has been ordered first), and returns the
/// commit to fan out to existing members and the Welcome for the new ones.
pub fn add_members(
    group: &mut MlsGroup,
    provider: &Provider,
    key: &IdentityKey,
    key_packages: &[KeyPackage],
) -> Result<(Vec<u8>, Vec<u8>), MlsError> {
    let (commit, welcome, _group_info) = group
        .add_members(provider, key, key_packages)
        .map_err(|e| MlsError::AddMember(e.to_string()))?;
    group
        .merge_pending_commit(provider)
        .map_err(|e| MlsError::MergeCommit(e.to_string()))?;
    Ok((encode_message(&commit)?, encode_message(&welcome)?))
}

/// Joins a group from an encoded Welcome, using a key package whose private
/// parts are in the provider's storage.
pub fn join_from_welcome(provider: &Provider, welcome: &[u8]) -> Result<MlsGroup, MlsError> {
    let message = MlsMessageIn::tls_deserialize_exact(welcome)
        .map_err(|e| MlsError::Decode(e.to_string()))?;
    let welcome = match message.extract() {
        MlsMessageBodyIn::Welcome(w) => w,
        _ => return Err(MlsError::Unexpected("expected a Welcome")),
    };
    StagedWelcome::new_from_welcome(provider, &join_config(), welcome, None)
        .map_err(|e| MlsError::Welcome(e.to_string()))?
        .into_group(provider)
        .map_err(|e| MlsError::Welcome(e.to_string()))
}

#[cfg(test)]
thread_local! {
    /// How many times this thread loaded a group from storage: decoding a
    /// group's state (with its past epochs' secrets) is the costly part of
    /// a reload, so tests count them.
    pub static LOADS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Loads a group from the provider's storage.
pub fn load_group(provider: &Provider, group_id: &GroupId) -> Result<MlsGroup, MlsError> {
    #[cfg(test)]
    LOADS.set(LOADS.get() + 1);
    MlsGroup::load(provider.storage(), group_id)
        .map_err(|e| MlsError::Load(e.to_string()))?
        .ok_or(MlsError::Missing)
}

/// Encrypts an application message.
pub fn encrypt(
    group: &mut MlsGroup,
    provider: &Provider,
    key: &IdentityKey,
    plaintext: &[u8],
) -> Result<Vec<u8>, MlsError> {
    let out = group
        .create_message(provider, key, plaintext)
        .map_err(|e| MlsError::Encrypt(e.to_string()))?;
    encode_message(&out)
}

/// What an incoming protocol message turned out to be.
pub enum Incoming {
    /// An application message from the member with this IPK.
    Application { sender: Option<Ipk>, bytes: Vec<u8> },
    /// A commit, staged but not merged: the caller checks it (its sender, its
    /// authenticated data), then merges it or drops it.
    Commit {
        staged: Box<StagedCommit>,
        sender: Option<Ipk>,
        aad: Vec<u8>,
    },
    /// A proposal, already stored in the group's proposal queue.
    Proposal,
}

/// Decrypts and verifies an incoming protocol message.
pub fn process(
    group: &mut MlsGroup,
    provider: &Provider,
    bytes: &[u8],
) -> Result<Incoming, MlsError> {
    let message =
        MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| MlsError::Decode(e.to_string()))?;
    let protocol = message
        .try_into_protocol_message()
        .map_err(|_| MlsError::Unexpected("expected a protocol message"))?;
    let processed = group.process_message(provider, protocol).map_err(|e| {
        use openmls::framing::errors::{MessageDecryptionError, SecretTreeError};
        match e {
            // Each message key decrypts once; this is how retried
            // deliveries are told apart from new messages.
            ProcessMessageError::ValidationError(ValidationError::UnableToDecrypt(
                MessageDecryptionError::SecretTreeError(SecretTreeError::SecretReuseError),
            )) => MlsError::Replay,
            // Not a retry: a message that waited longer than the group kept
            // its epoch's keys. Told apart so that it is never dropped
            // silently.
            ProcessMessageError::ValidationError(
                ValidationError::UnableToDecrypt(MessageDecryptionError::SecretTreeError(
                    SecretTreeError::TooDistantInThePast,
                ))
                | ValidationError::NoPastEpochData,
            ) => MlsError::Expired,
            other => MlsError::Process(other.to_string()),
        }
    })?;
    // The sender's credential was checked by openmls against its leaf; ours
    // name the leaf's signature key, which `member_ipk` insists on.
    let credential = processed.credential();
    let past = processed.epoch() < group.epoch();
    let sender = group
        .members()
        .find(|m| &m.credential == credential)
        .and_then(|m| member_ipk(&m.credential, &m.signature_key))
        // A message of a past epoch from a leaf whose key changed since (a
        // claim): openmls checked it against that epoch's leaf, which our
        // checks let in only with its key as its credential's identity.
        .or_else(|| {
            past.then(|| BasicCredential::try_from(credential.clone()).ok())
                .flatten()
                .and_then(|basic| Ipk::from_slice(basic.identity()))
        });
    let aad = processed.aad().to_vec();
    match processed.into_content() {
        ProcessedMessageContent::ApplicationMessage(app) => Ok(Incoming::Application {
            sender,
            bytes: app.into_bytes(),
        }),
        ProcessedMessageContent::StagedCommitMessage(staged) => Ok(Incoming::Commit {
            staged,
            sender,
            aad,
        }),
        ProcessedMessageContent::ProposalMessage(proposal) => {
            group
                .store_pending_proposal(provider.storage(), *proposal)
                .map_err(|e| MlsError::Process(e.to_string()))?;
            Ok(Incoming::Proposal)
        }
        _ => Err(MlsError::Unexpected("external proposals are not used")),
    }
}

/// Merges a staged commit that the caller has checked.
pub fn merge_staged(
    group: &mut MlsGroup,
    provider: &Provider,
    staged: StagedCommit,
) -> Result<(), MlsError> {
    group
        .merge_staged_commit(provider, staged)
        .map_err(|e| MlsError::MergeCommit(e.to_string()))
}

/// A key package made for someone else (a placeholder): the public key
/// package to add, and its private parts (serialised `KeyPackageBundle`) to
/// hand over. The provider's pending writes hold the bundle too; the caller
/// drops them (an honest introducer keeps nothing of the placeholder).
pub fn placeholder_key_package(
    provider: &Provider,
    key: &IdentityKey,
) -> Result<(KeyPackage, Vec<u8>), MlsError> {
    let bundle = new_key_package(provider, key)?;
    let bytes = serde_json::to_vec(&bundle).map_err(|e| MlsError::Encode(e.to_string()))?;
    Ok((bundle.key_package().clone(), bytes))
}

/// Installs a handed-over placeholder's key package so that its Welcome can
/// be joined; checks that it is a key package of `expected`.
pub fn install_placeholder(
    provider: &Provider,
    bundle: &[u8],
    expected: &Ipk,
) -> Result<(), MlsError> {
    let bundle: KeyPackageBundle =
        serde_json::from_slice(bundle).map_err(|e| MlsError::Decode(e.to_string()))?;
    let kp = bundle.key_package();
    if key_package_ipk(kp) != Some(*expected) {
        return Err(MlsError::InvalidKeyPackage(
            "the placeholder's key package is not for the placeholder's key".into(),
        ));
    }
    let hash_ref = kp
        .hash_ref(provider.crypto())
        .map_err(|e| MlsError::InvalidKeyPackage(e.to_string()))?;
    provider
        .storage()
        .write_key_package(&hash_ref, &bundle)
        .map_err(|e| MlsError::Welcome(e.to_string()))
}

/// Stages (does not merge) a commit adding `key_packages`, with `aad` in
/// its authenticated data (empty for none); returns the commit and the
/// Welcome for the new members. Merged once the group's ordering service
/// accepted it ([`merge_pending`]).
pub fn stage_add(
    group: &mut MlsGroup,
    provider: &Provider,
    key: &IdentityKey,
    key_packages: &[KeyPackage],
    aad: Vec<u8>,
) -> Result<(Vec<u8>, Vec<u8>), MlsError> {
    group.set_aad(aad);
    let (commit, welcome, _) = group
        .add_members(provider, key, key_packages)
        .map_err(|e| MlsError::AddMember(e.to_string()))
        // As in `stage_claim`: no AAD left over for the next message.
        .inspect_err(|_| group.set_aad(Vec::new()))?;
    Ok((encode_message(&commit)?, encode_message(&welcome)?))
}

/// Stages a commit removing the members with these IPKs, with `aad` in
/// its authenticated data (empty for none).
pub fn stage_remove(
    group: &mut MlsGroup,
    provider: &Provider,
    key: &IdentityKey,
    members: &[Ipk],
    aad: Vec<u8>,
) -> Result<Vec<u8>, MlsError> {
    let leaves: Vec<LeafNodeIndex> = group
        .members()
        .filter(|m| {
            member_ipk(&m.credential, &m.signature_key).is_some_and(|i| members.contains(&i))
        })
        .map(|m| m.index)
        .collect();
    if leaves.is_empty() {
        return Err(MlsError::RemoveMember("no such member".into()));
    }
    group.set_aad(aad);
    let (commit, _, _) = group
        .remove_members(provider, key, &leaves)
        .map_err(|e| MlsError::RemoveMember(e.to_string()))
        // As in `stage_claim`: no AAD left over for the next message.
        .inspect_err(|_| group.set_aad(Vec::new()))?;
    encode_message(&commit)
}

/// Stages a commit updating our own leaf (fresh encryption keys).
pub fn stage_self_update(
    group: &mut MlsGroup,
    provider: &Provider,
    key: &IdentityKey,
) -> Result<Vec<u8>, MlsError> {
    let bundle = group
        .self_update(provider, key, LeafNodeParameters::default())
        .map_err(|e| MlsError::SelfUpdate(e.to_string()))?;
    encode_message(bundle.commit())
}

/// Stages a commit that replaces our leaf's identity: `old` (a placeholder)
/// is followed by `new`, with `aad` (the signed "new follows old"
/// attestation) in the commit's authenticated data, so that the two are one.
pub fn stage_claim(
    group: &mut MlsGroup,
    provider: &Provider,
    old: &IdentityKey,
    new: &IdentityKey,
    aad: Vec<u8>,
) -> Result<Vec<u8>, MlsError> {
    group.set_aad(aad);
    let bundle = group
        .self_update_with_new_signer(
            provider,
            old,
            NewSignerBundle {
                signer: new,
                credential_with_key: credential(&new.ipk()),
            },
            LeafNodeParameters::default(),
        )
        .map_err(|e| MlsError::SelfUpdate(e.to_string()));
    // openmls clears the AAD only when it builds the commit: a failed
    // claim must not leave its attestation on the next message we send
    // (a failed step keeps the group in memory, see `MlsStorage::restore`).
    let bundle = bundle.inspect_err(|_| group.set_aad(Vec::new()))?;
    encode_message(bundle.commit())
}

/// Length of the nonce in front of [`seal_for_epoch`]'s output.
const EPOCH_SEAL_NONCE_LEN: usize = 12;

/// The AES-128-GCM key of `label` and `context` for the members of the
/// group's current epoch (MLS's exporter: nobody outside that epoch can
/// derive it, nor can a later or earlier epoch's member).
fn epoch_key(
    group: &MlsGroup,
    provider: &Provider,
    label: &str,
    context: &[u8],
) -> Result<Vec<u8>, MlsError> {
    group
        .export_secret(
            provider.crypto(),
            label,
            context,
            AeadType::Aes128Gcm.key_size(),
        )
        .map_err(|e| MlsError::Encrypt(e.to_string()))
}

/// Seals `plaintext` for whoever is a member of the group's current epoch:
/// a random nonce, then AES-128-GCM under the epoch's key of `label` and
/// `context` ([`open_for_epoch`] is the other half). For what travels in
/// the clear beside an MLS message, such as a commit's authenticated data.
pub fn seal_for_epoch(
    group: &MlsGroup,
    provider: &Provider,
    label: &str,
    context: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, MlsError> {
    let key = epoch_key(group, provider, label, context)?;
    let nonce: [u8; EPOCH_SEAL_NONCE_LEN] = rand::random();
    let sealed = provider
        .crypto()
        .aead_encrypt(
            AeadType::Aes128Gcm,
            &key,
            plaintext,
            &nonce,
            label.as_bytes(),
        )
        .map_err(|e| MlsError::Encrypt(format!("{e:?}")))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Opens what [`seal_for_epoch`] sealed in the group's current epoch, with
/// the same `label` and `context`.
pub fn open_for_epoch(
    group: &MlsGroup,
    provider: &Provider,
    label: &str,
    context: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, MlsError> {
    if sealed.len() < EPOCH_SEAL_NONCE_LEN {
        return Err(MlsError::Unseal);
    }
    let (nonce, ciphertext) = sealed.split_at(EPOCH_SEAL_NONCE_LEN);
    let key = epoch_key(group, provider, label, context)?;
    provider
        .crypto()
        .aead_decrypt(
            AeadType::Aes128Gcm,
            &key,
            ciphertext,
            nonce,
            label.as_bytes(),
        )
        .map_err(|_| MlsError::Unseal)
}

/// Merges our own staged commit (the ordering service accepted it).
pub fn merge_pending(group: &mut MlsGroup, provider: &Provider) -> Result<(), MlsError> {
    group
        .merge_pending_commit(provider)
        .map_err(|e| MlsError::MergeCommit(e.to_string()))
}

/// Drops our own staged commit (another commit won its epoch).
pub fn clear_pending(group: &mut MlsGroup, provider: &Provider) -> Result<(), MlsError> {
    group
        .clear_pending_commit(provider.storage())
        .map_err(|e| MlsError::MergeCommit(e.to_string()))
}

/// What a staged commit changes, in IPKs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitSummary {
    pub added: Vec<Ipk>,
    pub removed: Vec<Ipk>,
    /// The committer's leaf identity changed from the first to the second.
    pub replaced: Option<(Ipk, Ipk)>,
}

/// Reads what a staged commit from `sender` does to the roster.
pub fn summarize(group: &MlsGroup, staged: &StagedCommit, sender: Option<Ipk>) -> CommitSummary {
    let added = staged
        .add_proposals()
        .filter_map(|p| key_package_ipk(p.add_proposal().key_package()))
        .collect();
    let removed = staged
        .remove_proposals()
        .filter_map(|p| group.member_at(p.remove_proposal().removed()))
        .filter_map(|m| member_ipk(&m.credential, &m.signature_key))
        .collect();
    let replaced = staged.update_path_leaf_node().and_then(|leaf| {
        let new = member_ipk(leaf.credential(), leaf.signature_key().as_slice())?;
        let old = sender?;
        (old != new).then_some((old, new))
    });
    CommitSummary {
        added,
        removed,
        replaced,
    }
}

/// The epoch of an encoded protocol message, read without decrypting it.
pub fn message_epoch(bytes: &[u8]) -> Result<u64, MlsError> {
    let message =
        MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| MlsError::Decode(e.to_string()))?;
    let protocol = message
        .try_into_protocol_message()
        .map_err(|_| MlsError::Unexpected("expected a protocol message"))?;
    Ok(protocol.epoch().as_u64())
}

/// The IPKs of the members, in leaf order.
pub fn member_ipks(group: &MlsGroup) -> Vec<Ipk> {
    group
        .members()
        .filter_map(|m| member_ipk(&m.credential, &m.signature_key))
        .collect()
}

/// The epoch authenticator, which all members of an epoch share.
pub fn epoch_authenticator(group: &MlsGroup) -> Vec<u8> {
    group.epoch_authenticator().as_slice().to_vec()
}

fn encode_message(message: &MlsMessageOut) -> Result<Vec<u8>, MlsError> {
    message
        .tls_serialize_detached()
        .map_err(|e| MlsError::Encode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Party {
        _dir: tempfile::TempDir,
        store: Store,
        key: IdentityKey,
        namespace: [u8; 8],
    }

    impl Party {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("db")).unwrap();
            Self {
                _dir: dir,
                store,
                key: IdentityKey::generate(),
                namespace: rand::random(),
            }
        }

        fn provider(&self) -> Provider {
            Provider::new(self.store.clone(), self.namespace)
        }

        /// Commits the provider's pending writes, as an operation would.
        fn commit(&self, provider: &Provider) {
            let writes = provider.mls_storage().take_writes();
            self.store
                .write_blocking(|tx| apply_writes(tx, &writes))
                .unwrap();
        }
    }

    /// Blair and Alex in one group, Blair having created it.
    fn pair() -> (Party, Party, MlsGroup, MlsGroup) {
        let (alex, blair) = (Party::new(), Party::new());
        let alex_p = alex.provider();
        let kp = new_key_package(&alex_p, &alex.key).unwrap();
        alex.commit(&alex_p);
        let blair_p = blair.provider();
        let mut blair_group = create_group(&blair_p, &blair.key).unwrap();
        let (_commit, welcome) = add_members(
            &mut blair_group,
            &blair_p,
            &blair.key,
            &[kp.key_package().clone()],
        )
        .unwrap();
        blair.commit(&blair_p);
        let alex_group = join_from_welcome(&alex_p, &welcome).unwrap();
        alex.commit(&alex_p);
        (alex, blair, alex_group, blair_group)
    }

    /// Blair commits an update of her keys, and Alex merges it.
    fn blair_updates(
        (blair_group, blair_p, blair_key): (&mut MlsGroup, &Provider, &IdentityKey),
        (alex_group, alex_p): (&mut MlsGroup, &Provider),
    ) {
        let commit = stage_self_update(blair_group, blair_p, blair_key).unwrap();
        merge_pending(blair_group, blair_p).unwrap();
        let Incoming::Commit { staged, .. } = process(alex_group, alex_p, &commit).unwrap() else {
            panic!("expected a commit");
        };
        merge_staged(alex_group, alex_p, *staged).unwrap();
    }

    /// What is sealed for an epoch opens for that epoch's members, with
    /// the same label and context, and for nobody after the next commit.
    #[test]
    fn sealed_for_an_epoch_opens_only_in_it() {
        let (alex, blair, mut alex_group, mut blair_group) = pair();
        let (alex_p, blair_p) = (alex.provider(), blair.provider());
        let sealed = seal_for_epoch(&blair_group, &blair_p, "label", b"ctx", b"secret").unwrap();
        assert_eq!(
            open_for_epoch(&alex_group, &alex_p, "label", b"ctx", &sealed).unwrap(),
            b"secret"
        );
        let refused = |label: &str, context: &[u8], sealed: &[u8]| {
            matches!(
                open_for_epoch(&alex_group, &alex_p, label, context, sealed),
                Err(MlsError::Unseal)
            )
        };
        assert!(refused("other label", b"ctx", &sealed));
        assert!(refused("label", b"other context", &sealed));
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(refused("label", b"ctx", &flipped));
        assert!(refused("label", b"ctx", &sealed[..5]));
        assert!(refused("label", b"ctx", &[]));

        let commit = stage_self_update(&mut blair_group, &blair_p, &blair.key).unwrap();
        merge_pending(&mut blair_group, &blair_p).unwrap();
        let Incoming::Commit { staged, .. } = process(&mut alex_group, &alex_p, &commit).unwrap()
        else {
            panic!("expected a commit");
        };
        merge_staged(&mut alex_group, &alex_p, *staged).unwrap();
        assert!(matches!(
            open_for_epoch(&alex_group, &alex_p, "label", b"ctx", &sealed),
            Err(MlsError::Unseal)
        ));
    }

    #[test]
    fn a_message_older_than_the_kept_epochs_is_expired_not_a_replay() {
        let (alex, blair, mut alex_group, mut blair_group) = pair();
        let (alex_p, blair_p) = (alex.provider(), blair.provider());
        let old = encrypt(&mut blair_group, &blair_p, &blair.key, b"old").unwrap();
        let mut kept = None;
        for i in 0..=MAX_PAST_EPOCHS {
            if i == MAX_PAST_EPOCHS - 1 {
                kept = Some(encrypt(&mut blair_group, &blair_p, &blair.key, b"kept").unwrap());
            }
            blair_updates(
                (&mut blair_group, &blair_p, &blair.key),
                (&mut alex_group, &alex_p),
            );
        }
        blair.commit(&blair_p);
        alex.commit(&alex_p);
        // Sent two commits ago, within the window: read.
        assert!(matches!(
            process(&mut alex_group, &alex_p, &kept.unwrap()),
            Ok(Incoming::Application { .. })
        ));
        // Sent more commits ago than the keys are kept: told apart from a
        // retried delivery, never mistaken for one.
        assert!(matches!(
            process(&mut alex_group, &alex_p, &old),
            Err(MlsError::Expired)
        ));
    }

    #[test]
    fn two_parties_talk_and_state_survives_reload() {
        let alex = Party::new();
        let blair = Party::new();

        let alex_p = alex.provider();
        let kp = new_key_package(&alex_p, &alex.key).unwrap();
        alex.commit(&alex_p);
        let kp_bytes = encode_key_package(kp.key_package()).unwrap();

        let blair_p = blair.provider();
        let kp = decode_key_package(blair_p.crypto(), &kp_bytes).unwrap();
        assert_eq!(key_package_ipk(&kp), Some(alex.key.ipk()));
        let mut blair_group = create_group(&blair_p, &blair.key).unwrap();
        let (_commit, welcome) =
            add_members(&mut blair_group, &blair_p, &blair.key, &[kp]).unwrap();
        blair.commit(&blair_p);

        // Alex joins from a fresh provider: the key package's private parts
        // must come from redb, not from memory.
        let alex_p = alex.provider();
        let mut alex_group = join_from_welcome(&alex_p, &welcome).unwrap();
        alex.commit(&alex_p);
        assert_eq!(
            epoch_authenticator(&alex_group),
            epoch_authenticator(&blair_group)
        );
        assert_eq!(member_ipks(&alex_group).len(), 2);

        for i in 0..3 {
            let text = format!("hello {i}");
            let ct = encrypt(&mut blair_group, &blair_p, &blair.key, text.as_bytes()).unwrap();
            blair.commit(&blair_p);
            // Reload Alex's group from redb before every message.
            let alex_p = alex.provider();
            alex_group = load_group(&alex_p, alex_group.group_id()).unwrap();
            match process(&mut alex_group, &alex_p, &ct).unwrap() {
                Incoming::Application { sender, bytes } => {
                    assert_eq!(sender, Some(blair.key.ipk()));
                    assert_eq!(bytes, text.as_bytes());
                }
                _ => panic!("expected an application message"),
            }
            alex.commit(&alex_p);
        }

        // A replayed ciphertext is refused (its key was used and deleted).
        let ct = encrypt(&mut blair_group, &blair_p, &blair.key, b"once").unwrap();
        blair.commit(&blair_p);
        let alex_p = alex.provider();
        assert!(process(&mut alex_group, &alex_p, &ct).is_ok());
        alex.commit(&alex_p);
        assert!(matches!(
            process(&mut alex_group, &alex_p, &ct),
            Err(MlsError::Replay)
        ));
    }

    /// The MLS table's values: how many are packed, how many JSON.
    fn formats(party: &Party) -> (usize, usize) {
        use redb::ReadableTable;
        party
            .store
            .read(|tx| {
                let t = tx.open_table(crate::store::tables::MLS)?;
                let (mut packed, mut json) = (0, 0);
                for row in t.iter()? {
                    if row?.1.value().first() == Some(&storage::PACKED) {
                        packed += 1;
                    } else {
                        json += 1;
                    }
                }
                Ok((packed, json))
            })
            .unwrap()
    }

    /// A node that stored its groups as JSON (before values were packed)
    /// goes on with them: reloaded, they read, send, commit and read again,
    /// the new values packed beside the old ones.
    #[test]
    fn groups_stored_as_json_by_an_older_node_go_on() {
        storage::WRITE_JSON.set(true);
        let (alex, blair, alex_group, blair_group) = pair();
        let (alex_p, blair_p) = (alex.provider(), blair.provider());
        let mut blair_group = blair_group;
        let before = encrypt(&mut blair_group, &blair_p, &blair.key, b"before").unwrap();
        blair.commit(&blair_p);
        storage::WRITE_JSON.set(false);
        for party in [&alex, &blair] {
            let (packed, json) = formats(party);
            assert_eq!(packed, 0);
            assert!(json > 5, "{json} JSON values");
        }
        // Reloaded by the new code from what the old one wrote.
        let mut alex_group = load_group(&alex_p, alex_group.group_id()).unwrap();
        let mut blair_group = load_group(&blair_p, blair_group.group_id()).unwrap();
        let read = |group: &mut MlsGroup, p: &Provider, ct: &[u8]| match process(group, p, ct) {
            Ok(Incoming::Application { bytes, .. }) => bytes,
            _ => panic!("expected an application message"),
        };
        assert_eq!(read(&mut alex_group, &alex_p, &before), b"before");
        alex.commit(&alex_p);
        let commit = stage_self_update(&mut alex_group, &alex_p, &alex.key).unwrap();
        merge_pending(&mut alex_group, &alex_p).unwrap();
        alex.commit(&alex_p);
        let Incoming::Commit { staged, .. } = process(&mut blair_group, &blair_p, &commit).unwrap()
        else {
            panic!("expected a commit");
        };
        merge_staged(&mut blair_group, &blair_p, *staged).unwrap();
        blair.commit(&blair_p);
        let after = encrypt(&mut alex_group, &alex_p, &alex.key, b"after").unwrap();
        alex.commit(&alex_p);
        let mut blair_group = load_group(&blair_p, blair_group.group_id()).unwrap();
        assert_eq!(read(&mut blair_group, &blair_p, &after), b"after");
        blair.commit(&blair_p);
        assert_eq!(
            epoch_authenticator(&load_group(&alex_p, alex_group.group_id()).unwrap()),
            epoch_authenticator(&blair_group)
        );
        assert!(formats(&alex).0 > 0, "new values are packed");
    }

    #[test]
    fn uncommitted_writes_are_not_visible_after_reload() {
        let party = Party::new();
        let p = party.provider();
        let group = create_group(&p, &party.key).unwrap();
        let id = group.group_id().clone();
        // Never committed: a fresh provider sees nothing.
        p.mls_storage().discard_writes();
        assert!(matches!(
            load_group(&party.provider(), &id),
            Err(MlsError::Missing)
        ));
    }

    /// The keys of one label among a write set's (`Some`: written,
    /// `None`: deleted), or among what a store holds.
    fn keys_of(writes: &WriteSet, label: &str) -> Vec<Option<usize>> {
        writes
            .iter()
            .filter(|(k, _)| k[8..].starts_with(label.as_bytes()) && k[8 + label.len()] == 0)
            .map(|(_, v)| v.as_ref().map(Vec::len))
            .collect()
    }

    fn stored_past_epochs(party: &Party) -> usize {
        party
            .store
            .read(|tx| {
                use redb::ReadableTable as _;
                let t = tx.open_table(crate::store::tables::MLS)?;
                let mut n = 0;
                for entry in t.iter()? {
                    let (k, _) = entry?;
                    n += usize::from(k.value()[8..].starts_with(b"message_secrets_past_epoch\0"));
                }
                Ok(n)
            })
            .unwrap()
    }

    /// A group's past epochs' secrets are stored apart from the current
    /// one's: a message rewrites none of them, a late message of a past
    /// epoch rewrites only that one, and all of it reads back after a
    /// restart (with the keys used so far still used). Secrets a node
    /// stored whole before are read, and stored in parts from then on.
    #[test]
    fn a_message_rewrites_no_past_epoch() {
        let (alex, blair, mut alex_group, mut blair_group) = pair();
        let (alex_p, blair_p) = (alex.provider(), blair.provider());
        storage::WRITE_WHOLE.set(true);
        let mut late = Vec::new();
        for i in 0..4 {
            let read = encrypt(&mut blair_group, &blair_p, &blair.key, b"read").unwrap();
            process(&mut alex_group, &alex_p, &read).unwrap();
            late.push(encrypt(&mut blair_group, &blair_p, &blair.key, &[i]).unwrap());
            blair_updates(
                (&mut blair_group, &blair_p, &blair.key),
                (&mut alex_group, &alex_p),
            );
        }
        blair.commit(&blair_p);
        alex.commit(&alex_p);
        storage::WRITE_WHOLE.set(false);
        assert_eq!(stored_past_epochs(&alex), 0, "stored whole");
        let alex_p = alex.provider();
        let mut alex_group = load_group(&alex_p, alex_group.group_id()).unwrap();

        let mut message = |text: &[u8]| {
            let m = encrypt(&mut blair_group, &blair_p, &blair.key, text).unwrap();
            blair.commit(&blair_p);
            m
        };
        process(&mut alex_group, &alex_p, &message(b"first")).unwrap();
        alex.commit(&alex_p);
        assert_eq!(stored_past_epochs(&alex), 4, "one value per past epoch");

        process(&mut alex_group, &alex_p, &message(b"now")).unwrap();
        let writes = alex_p.mls_storage().take_writes();
        assert_eq!(keys_of(&writes, "message_secrets").len(), 1);
        assert!(keys_of(&writes, "message_secrets_past_epoch").is_empty());
        alex.store
            .write_blocking(|tx| apply_writes(tx, &writes))
            .unwrap();

        let Ok(Incoming::Application { bytes, .. }) = process(&mut alex_group, &alex_p, &late[1])
        else {
            panic!("a late message of a kept epoch is read")
        };
        assert_eq!(bytes, [1]);
        let writes = alex_p.mls_storage().take_writes();
        assert_eq!(keys_of(&writes, "message_secrets_past_epoch").len(), 1);
        alex.store
            .write_blocking(|tx| apply_writes(tx, &writes))
            .unwrap();

        let alex_p = alex.provider();
        let mut again = load_group(&alex_p, alex_group.group_id()).unwrap();
        assert_eq!(
            epoch_authenticator(&again),
            epoch_authenticator(&alex_group)
        );
        assert!(
            process(&mut again, &alex_p, &late[1]).is_err(),
            "its key was used before the restart"
        );
        assert!(matches!(
            process(&mut again, &alex_p, &late[2]),
            Ok(Incoming::Application { bytes, .. }) if bytes == [2]
        ));
        assert!(process(&mut again, &alex_p, &message(b"next")).is_ok());

        // Leaving a group deletes its past epochs too.
        again.delete(alex_p.storage()).unwrap();
        let writes = alex_p.mls_storage().take_writes();
        assert_eq!(keys_of(&writes, "message_secrets_past_epoch"), [None; 4]);
        alex.store
            .write_blocking(|tx| apply_writes(tx, &writes))
            .unwrap();
        assert_eq!(stored_past_epochs(&alex), 0);
    }

    #[test]
    fn garbage_is_a_typed_error() {
        let party = Party::new();
        let p = party.provider();
        let mut group = create_group(&p, &party.key).unwrap();
        assert!(matches!(
            process(&mut group, &p, b"\x00\x01garbage"),
            Err(MlsError::Decode(_))
        ));
        assert!(decode_key_package(p.crypto(), b"nope").is_err());
        assert!(join_from_welcome(&p, b"").is_err());
    }
}

#[cfg(test)]
mod placeholder_tests {
    //! The seed's introduction at the MLS level, three stores: Alex makes a
    //! group with placeholders for Blair and Charlie, hands each theirs, and
    //! Blair replaces hers with her own key in one commit.
    use super::*;

    struct Node {
        _dir: tempfile::TempDir,
        store: Store,
    }

    fn node() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        Node { _dir: dir, store }
    }

    fn commit(node: &Node, p: &Provider) {
        let writes = p.mls_storage().take_writes();
        node.store
            .write_blocking(|tx| apply_writes(tx, &writes))
            .unwrap();
    }

    #[test]
    fn placeholders_are_handed_over_and_claimed_in_one_commit() {
        let (alex, blair, charlie) = (node(), node(), node());
        let gp_a = IdentityKey::generate();
        let (ph_b, ph_c) = (IdentityKey::generate(), IdentityKey::generate());

        // Alex: placeholders made in a scratch namespace that is never committed.
        let scratch = Provider::new(alex.store.clone(), [0xee; 8]);
        let (kp_b, bundle_b) = placeholder_key_package(&scratch, &ph_b).unwrap();
        let (kp_c, bundle_c) = placeholder_key_package(&scratch, &ph_c).unwrap();
        scratch.mls_storage().discard_writes();
        let a = Provider::new(alex.store.clone(), [1; 8]);
        let mut a_group = create_group(&a, &gp_a).unwrap();
        let (_, welcome) = stage_add(&mut a_group, &a, &gp_a, &[kp_b, kp_c], Vec::new()).unwrap();
        merge_pending(&mut a_group, &a).unwrap();
        commit(&alex, &a);

        // Blair and Charlie join as their placeholders.
        let b = Provider::new(blair.store.clone(), [2; 8]);
        install_placeholder(&b, &bundle_b, &ph_b.ipk()).unwrap();
        let mut b_group = join_from_welcome(&b, &welcome).unwrap();
        commit(&blair, &b);
        let c = Provider::new(charlie.store.clone(), [3; 8]);
        assert!(
            install_placeholder(&c, &bundle_b, &ph_c.ipk()).is_err(),
            "a bundle for someone else"
        );
        install_placeholder(&c, &bundle_c, &ph_c.ipk()).unwrap();
        let mut c_group = join_from_welcome(&c, &welcome).unwrap();
        commit(&charlie, &c);
        assert_eq!(member_ipks(&b_group).len(), 3);

        // Blair claims: GP_B replaces the placeholder, attestation in the AAD.
        let gp_b = IdentityKey::generate();
        let claim = stage_claim(&mut b_group, &b, &ph_b, &gp_b, b"follows".to_vec()).unwrap();
        for (group, provider) in [(&mut a_group, &a), (&mut c_group, &c)] {
            match process(group, provider, &claim).unwrap() {
                Incoming::Commit {
                    staged,
                    sender,
                    aad,
                } => {
                    assert_eq!(sender, Some(ph_b.ipk()));
                    assert_eq!(aad, b"follows");
                    let summary = summarize(group, &staged, sender);
                    assert_eq!(summary.replaced, Some((ph_b.ipk(), gp_b.ipk())));
                    merge_staged(group, provider, *staged).unwrap();
                }
                _ => panic!("expected a commit"),
            }
        }
        merge_pending(&mut b_group, &b).unwrap();
        let auth = epoch_authenticator(&a_group);
        assert_eq!(epoch_authenticator(&b_group), auth);
        assert_eq!(epoch_authenticator(&c_group), auth);
        assert!(member_ipks(&a_group).contains(&gp_b.ipk()));
        assert!(
            !member_ipks(&a_group).contains(&ph_b.ipk()),
            "the placeholder no longer signs"
        );

        // GP_B speaks; the placeholder's key can no longer speak for that leaf.
        let hi = encrypt(&mut b_group, &b, &gp_b, b"it's Blair").unwrap();
        match process(&mut c_group, &c, &hi).unwrap() {
            Incoming::Application { sender, .. } => assert_eq!(sender, Some(gp_b.ipk())),
            _ => panic!("expected an application message"),
        }
    }

    #[test]
    fn losing_a_race_clears_the_pending_commit() {
        let (alex, blair) = (node(), node());
        let (ka, kb) = (IdentityKey::generate(), IdentityKey::generate());
        let a = Provider::new(alex.store.clone(), [1; 8]);
        let b = Provider::new(blair.store.clone(), [2; 8]);
        let kp = new_key_package(&b, &kb).unwrap();
        let mut ga = create_group(&a, &ka).unwrap();
        let (_, welcome) =
            stage_add(&mut ga, &a, &ka, &[kp.key_package().clone()], Vec::new()).unwrap();
        merge_pending(&mut ga, &a).unwrap();
        let mut gb = join_from_welcome(&b, &welcome).unwrap();
        // Both commit in the same epoch; the ordering service takes Alex's.
        let winner = stage_self_update(&mut ga, &a, &ka).unwrap();
        let _loser = stage_self_update(&mut gb, &b, &kb).unwrap();
        merge_pending(&mut ga, &a).unwrap();
        clear_pending(&mut gb, &b).unwrap();
        match process(&mut gb, &b, &winner).unwrap() {
            Incoming::Commit { staged, .. } => merge_staged(&mut gb, &b, *staged).unwrap(),
            _ => panic!("expected a commit"),
        }
        assert_eq!(epoch_authenticator(&ga), epoch_authenticator(&gb));
        assert_eq!(message_epoch(&winner).unwrap(), 1);
    }
}
