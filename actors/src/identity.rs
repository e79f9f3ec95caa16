//! Identity keys.
//!
//! Every proton and every group proton gets a fresh Ed25519 key pair; its
//! public half is the IPK (Identity Public Key) the peer knows it by, and in
//! MLS it is the leaf signature key. Keys are never reused across
//! conversations.

use std::fmt;

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use openmls_traits::signatures::{Signer, SignerError};
use openmls_traits::types::SignatureScheme;
use serde::{Deserialize, Serialize};

/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Why a signature or key did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the public key is not a valid Ed25519 point")]
    BadKey,
    #[error("the signature does not verify under the public key")]
    BadSignature,
}

/// An Identity Public Key: the Ed25519 public key a peer knows one of our
/// protons (or group protons) by.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Ipk(pub [u8; 32]);

impl Ipk {
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Verifies `signature` over `message`. Uses strict verification so that
    /// a signature has exactly one valid encoding.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| SignatureError::BadKey)?;
        let signature = ed25519_dalek::Signature::from_slice(signature)
            .map_err(|_| SignatureError::BadSignature)?;
        key.verify_strict(message, &signature)
            .map_err(|_| SignatureError::BadSignature)
    }

    /// A short fingerprint for people to compare: 4 groups of 4 hex digits.
    pub fn fingerprint(&self) -> String {
        let hex = data_encoding::HEXLOWER.encode(&self.0[..8]);
        hex.as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join("-")
    }
}

impl fmt::Display for Ipk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

impl fmt::Debug for Ipk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ipk({})", self.fingerprint())
    }
}

/// A private identity key. The secret is zeroised on drop.
#[derive(Clone)]
pub struct IdentityKey(SigningKey);

impl IdentityKey {
    /// A fresh key pair from the OS random number generator.
    pub fn generate() -> Self {
        Self(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    pub fn from_secret(secret: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(secret))
    }

    /// The 32-byte secret, for storage.
    pub fn secret(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn ipk(&self) -> Ipk {
        Ipk(self.0.verifying_key().to_bytes())
    }

    pub fn sign_bytes(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.0.sign(message).to_bytes()
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityKey({:?})", self.ipk())
    }
}

/// The key signs for MLS as the leaf signature key of its (group) proton.
impl Signer for IdentityKey {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        Ok(self.sign_bytes(payload).to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// A stored secret key. Serialises as its 32 bytes; kept apart from `IdentityKey`
/// so that records can derive serde without exposing a signing type.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretKey(pub [u8; 32]);

impl SecretKey {
    pub fn key(&self) -> IdentityKey {
        IdentityKey::from_secret(&self.0)
    }
}

impl From<&IdentityKey> for SecretKey {
    fn from(key: &IdentityKey) -> Self {
        Self(key.secret())
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// serde for 64-byte signatures (serde derives arrays only up to 32).
pub mod signature_serde {
    use super::SIGNATURE_LEN;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; SIGNATURE_LEN], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; SIGNATURE_LEN], D::Error> {
        let bytes: &[u8] = Deserialize::deserialize(d)?;
        bytes
            .try_into()
            .map_err(|_| serde::de::Error::invalid_length(bytes.len(), &"64 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_under_their_key_and_message() {
        let key = IdentityKey::generate();
        let other = IdentityKey::generate();
        let sig = key.sign_bytes(b"hello");
        assert_eq!(key.ipk().verify(b"hello", &sig), Ok(()));
        assert_eq!(
            key.ipk().verify(b"hellO", &sig),
            Err(SignatureError::BadSignature)
        );
        assert_eq!(
            other.ipk().verify(b"hello", &sig),
            Err(SignatureError::BadSignature)
        );
        assert_eq!(
            key.ipk().verify(b"hello", &sig[..63]),
            Err(SignatureError::BadSignature)
        );
    }

    #[test]
    fn secret_round_trips() {
        let key = IdentityKey::generate();
        let back = SecretKey::from(&key).key();
        assert_eq!(back.ipk(), key.ipk());
    }
}
