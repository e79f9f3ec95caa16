//! MLS (openmls) for every conversation: a 1:1 relationship is a 2-member
//! group, a group is a group. This module owns the provider (RustCrypto plus
//! our redb storage, see [`storage`]), the group configuration, and thin
//! helpers that turn openmls's many generic error types into [`MlsError`]
//! variants named for the step that failed.
//!
//! Every helper takes a provider whose storage collects writes; the caller
//! commits them together with its own rows (see `storage`'s module docs).

pub mod storage;

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_rust_crypto::RustCrypto;

use crate::identity::{IdentityKey, Ipk};
use crate::store::Store;
pub use storage::{apply_writes, delete_namespace, MlsStorage, WriteSet};

/// The one ciphersuite protonode uses (DESIGN.md section 7).
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// How far ahead of the last seen message a sender's generation may be.
const MAX_FORWARD_DISTANCE: u32 = 5_000;
/// How many skipped generations are remembered for late arrivals.
const OUT_OF_ORDER_TOLERANCE: u32 = 64;
/// How many past epochs keep their secrets, for messages sent just before a commit.
const MAX_PAST_EPOCHS: usize = 8;

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

/// Loads a group from the provider's storage.
pub fn load_group(provider: &Provider, group_id: &GroupId) -> Result<MlsGroup, MlsError> {
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
    /// A commit, staged but not merged: the caller checks it, then merges.
    Commit(Box<StagedCommit>),
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
                MessageDecryptionError::SecretTreeError(
                    SecretTreeError::SecretReuseError | SecretTreeError::TooDistantInThePast,
                ),
            )) => MlsError::Replay,
            other => MlsError::Process(other.to_string()),
        }
    })?;
    // The sender's credential was checked by openmls against its leaf; ours
    // name the leaf's signature key, which `member_ipk` insists on.
    let credential = processed.credential();
    let sender = group
        .members()
        .find(|m| &m.credential == credential)
        .and_then(|m| member_ipk(&m.credential, &m.signature_key));
    match processed.into_content() {
        ProcessedMessageContent::ApplicationMessage(app) => Ok(Incoming::Application {
            sender,
            bytes: app.into_bytes(),
        }),
        ProcessedMessageContent::StagedCommitMessage(staged) => Ok(Incoming::Commit(staged)),
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
