//! Sealing to a published key (HPKE base mode: DHKEM-X25519, HKDF-SHA256,
//! AES-128-GCM, the primitives of our MLS ciphersuite), for two uses:
//!
//! - **Derived delivery addresses** (DESIGN.md "address diversification"):
//!   a node publishes a *service key* in its transports; anyone holding one
//!   of its long-term addresses can derive a new address by sealing that
//!   address (and a 16-byte context) to the service key. Only the node can
//!   resolve it, and two derived addresses of one base look unrelated. An
//!   introducer derives the group addresses of the people it introduces this
//!   way, so the group can start before they answer.
//! - **Sealed direct messages** between group members (a side relationship's
//!   ticket), readable by the one member they are sealed to.
//!
//! Every use has its own `info` label, so a ciphertext made for one can
//! never be opened as the other.

use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::types::{HpkeAeadType, HpkeCiphertext, HpkeConfig, HpkeKdfType, HpkeKemType};
use transports::{DeliveryAddress, DerivedAddress};

const CONFIG: HpkeConfig = HpkeConfig(
    HpkeKemType::DhKem25519,
    HpkeKdfType::HkdfSha256,
    HpkeAeadType::AesGcm128,
);
/// Length of an X25519 public key and of a KEM output.
const KEY_LEN: usize = 32;
const DERIVED_ADDRESS_INFO: &[u8] = b"protonode/v1/derived-address";
/// Length of the context sealed into a derived address.
pub const CONTEXT_LEN: usize = 16;

/// Why sealing failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the published key is not a valid X25519 key")]
    BadKey,
    #[error("sealing failed")]
    Seal,
}

/// A key pair others seal to. The secret is a seed from which the HPKE key
/// pair is derived, so only 32 bytes need storing.
#[derive(Clone)]
pub struct SealKey {
    seed: [u8; 32],
    private: Vec<u8>,
    public: [u8; KEY_LEN],
}

impl SealKey {
    pub fn generate() -> Self {
        Self::from_seed(rand::random())
    }

    /// The key pair of a stored seed (the derivation cannot fail for 32
    /// bytes of input; if it ever did, the key would open nothing).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let pair = RustCrypto::default()
            .derive_hpke_keypair(CONFIG, &seed)
            .ok();
        let (private, public) = match pair {
            Some(p) => (
                p.private.to_vec(),
                p.public.as_slice().try_into().unwrap_or([0; KEY_LEN]),
            ),
            None => (Vec::new(), [0; KEY_LEN]),
        };
        Self {
            seed,
            private,
            public,
        }
    }

    pub fn seed(&self) -> [u8; 32] {
        self.seed
    }

    pub fn public(&self) -> [u8; KEY_LEN] {
        self.public
    }

    /// Opens what was sealed to this key under `info`; `None` for anything
    /// else (garbage, another key, another use).
    pub fn open(&self, info: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < KEY_LEN {
            return None;
        }
        let (kem_output, ciphertext) = sealed.split_at(KEY_LEN);
        let input = HpkeCiphertext {
            kem_output: kem_output.to_vec().into(),
            ciphertext: ciphertext.to_vec().into(),
        };
        RustCrypto::default()
            .hpke_open(CONFIG, &input, &self.private, info, &[])
            .ok()
    }

    /// Resolves a derived address made for this key: the base address and
    /// the context it was derived with.
    pub fn resolve(
        &self,
        derived: &DerivedAddress,
    ) -> Option<(DeliveryAddress, [u8; CONTEXT_LEN])> {
        let plain = self.open(DERIVED_ADDRESS_INFO, derived.as_bytes())?;
        if plain.len() != 32 + CONTEXT_LEN {
            return None;
        }
        let (base, context) = plain.split_at(32);
        Some((
            DeliveryAddress::from_bytes(base.try_into().ok()?),
            context.try_into().ok()?,
        ))
    }
}

/// Most derived addresses a [`Resolver`] remembers before it starts over.
const RESOLVED_KEPT: usize = 4096;

/// Resolves derived addresses with a [`SealKey`], remembering the ones
/// that resolved: a group member receives every group message at the same
/// derived address, and opening it is an X25519 operation and more, per
/// envelope. Only addresses that resolved are kept (junk costs what it
/// did), and at most [`RESOLVED_KEPT`] of them.
#[derive(Debug)]
pub struct Resolver {
    key: SealKey,
    known: std::sync::Mutex<std::collections::HashMap<Vec<u8>, Resolved>>,
}

/// What a derived address resolves to: its base address and context.
type Resolved = (DeliveryAddress, [u8; CONTEXT_LEN]);

impl Resolver {
    pub fn new(key: SealKey) -> Self {
        Self {
            key,
            known: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// As [`SealKey::resolve`].
    pub fn resolve(&self, derived: &DerivedAddress) -> Option<Resolved> {
        let bytes = derived.as_bytes();
        if let Some(found) = self.known.lock().ok()?.get(bytes) {
            return Some(*found);
        }
        let found = self.key.resolve(derived)?;
        if let Ok(mut known) = self.known.lock() {
            if known.len() >= RESOLVED_KEPT {
                known.clear();
            }
            known.insert(bytes.to_vec(), found);
        }
        Some(found)
    }
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SealKey({})",
            data_encoding::HEXLOWER.encode(&self.public[..8])
        )
    }
}

/// Seals `plaintext` to `public` under `info`: KEM output then ciphertext.
pub fn seal(public: &[u8; KEY_LEN], info: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
    let sealed = RustCrypto::default()
        .hpke_seal(CONFIG, public, info, &[], plaintext)
        .map_err(|_| SealError::BadKey)?;
    let mut out = sealed.kem_output.as_slice().to_vec();
    if out.len() != KEY_LEN {
        return Err(SealError::Seal);
    }
    out.extend_from_slice(sealed.ciphertext.as_slice());
    Ok(out)
}

/// Derives a new address from `base` for the node whose service key is
/// `service`, bound to `context` (e.g. the group it is for).
pub fn derive_address(
    service: &[u8; KEY_LEN],
    base: &DeliveryAddress,
    context: &[u8; CONTEXT_LEN],
) -> Result<DerivedAddress, SealError> {
    let mut plain = base.as_bytes().to_vec();
    plain.extend_from_slice(context);
    let sealed = seal(service, DERIVED_ADDRESS_INFO, &plain)?;
    DerivedAddress::new(sealed).ok_or(SealError::Seal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_service_resolves_its_derived_addresses() {
        let service = SealKey::generate();
        let other = SealKey::generate();
        let base = DeliveryAddress::random();
        let context = [7u8; CONTEXT_LEN];
        let one = derive_address(&service.public(), &base, &context).unwrap();
        let two = derive_address(&service.public(), &base, &context).unwrap();
        assert_ne!(one, two, "two derivations of one base look unrelated");
        assert!(one.as_bytes().len() <= transports::MAX_DERIVED_ADDRESS_BYTES);
        assert_eq!(service.resolve(&one), Some((base, context)));
        assert_eq!(service.resolve(&two), Some((base, context)));
        assert_eq!(other.resolve(&one), None);
        // The resolver answers the same, the first time and from memory.
        let resolver = Resolver::new(service.clone());
        for _ in 0..2 {
            assert_eq!(resolver.resolve(&one), Some((base, context)));
            assert_eq!(resolver.resolve(&two), Some((base, context)));
        }
        assert_eq!(Resolver::new(other).resolve(&one), None);
        // A ciphertext sealed for another use is not an address.
        let sealed = seal(&service.public(), b"another use", &[0; 48]).unwrap();
        assert_eq!(service.resolve(&DerivedAddress::new(sealed).unwrap()), None);
        assert_eq!(
            service.resolve(&DerivedAddress::new(vec![1; 40]).unwrap()),
            None
        );
    }

    #[test]
    fn a_key_survives_through_its_seed() {
        let key = SealKey::generate();
        let again = SealKey::from_seed(key.seed());
        assert_eq!(again.public(), key.public());
        let sealed = seal(&key.public(), b"x", b"hello").unwrap();
        assert_eq!(again.open(b"x", &sealed).as_deref(), Some(&b"hello"[..]));
    }
}
