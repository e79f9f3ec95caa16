//! Attestations: statements signed by the holders of two private keys.
//!
//! - *Follows* ("`second` follows `first`"): `first` signs the statement,
//!   then `second` signs the statement together with `first`'s signature.
//!   Trust flows from `first` to `second`; `second`'s messages continue
//!   `first`'s history.
//! - *Equivalent* ("`first` is equivalent to `second`"): each key signs the
//!   statement. Trust flows both ways; histories stay apart.
//!
//! Every signature is domain-separated by a label naming the kind and the
//! signer's role, so a signature made for one kind or role can never be
//! replayed as another, nor as an MLS signature by the same key (MLS labels
//! start with "MLS 1.0").

use serde::{Deserialize, Serialize};

use crate::identity::{IdentityKey, Ipk, SignatureError, SIGNATURE_LEN};

const LABEL_FOLLOWS_FIRST: &[u8] = b"protonode/v1/attestation/follows/predecessor";
const LABEL_FOLLOWS_SECOND: &[u8] = b"protonode/v1/attestation/follows/successor";
const LABEL_EQUIVALENT_FIRST: &[u8] = b"protonode/v1/attestation/equivalent/first";
const LABEL_EQUIVALENT_SECOND: &[u8] = b"protonode/v1/attestation/equivalent/second";

/// The two kinds of attestation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// `second` follows `first`.
    Follows,
    /// `first` and `second` are equivalent.
    Equivalent,
}

/// Which of the two signatures failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signer {
    First,
    Second,
}

/// Why an attestation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestationError {
    #[error("the {signer:?} signature of the {kind:?} attestation is invalid: {source}")]
    Signature {
        kind: Kind,
        signer: Signer,
        #[source]
        source: SignatureError,
    },
    #[error("expected a {expected:?} attestation, got {found:?}")]
    WrongKind { expected: Kind, found: Kind },
    #[error("the attestation is about other keys than expected")]
    Mismatch,
    #[error("an attestation needs two different keys")]
    SameKey,
}

/// A signed statement about two identity keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attestation {
    pub kind: Kind,
    pub first: Ipk,
    pub second: Ipk,
    /// When it was made, in milliseconds since the Unix epoch (signed, so it
    /// cannot be moved).
    pub issued_at: u64,
    #[serde(with = "crate::identity::signature_serde")]
    pub first_signature: [u8; SIGNATURE_LEN],
    #[serde(with = "crate::identity::signature_serde")]
    pub second_signature: [u8; SIGNATURE_LEN],
}

impl Attestation {
    /// "`successor` follows `predecessor`", signed by both.
    pub fn follows(predecessor: &IdentityKey, successor: &IdentityKey, issued_at: u64) -> Self {
        Self::sign(Kind::Follows, predecessor, successor, issued_at)
    }

    /// "`a` is equivalent to `b`", signed by both.
    pub fn equivalent(a: &IdentityKey, b: &IdentityKey, issued_at: u64) -> Self {
        Self::sign(Kind::Equivalent, a, b, issued_at)
    }

    fn sign(kind: Kind, first: &IdentityKey, second: &IdentityKey, issued_at: u64) -> Self {
        let (first_ipk, second_ipk) = (first.ipk(), second.ipk());
        let first_signature =
            first.sign_bytes(&first_message(kind, &first_ipk, &second_ipk, issued_at));
        let second_signature = second.sign_bytes(&second_message(
            kind,
            &first_ipk,
            &second_ipk,
            issued_at,
            &first_signature,
        ));
        Self {
            kind,
            first: first_ipk,
            second: second_ipk,
            issued_at,
            first_signature,
            second_signature,
        }
    }

    /// Checks both signatures.
    pub fn verify(&self) -> Result<(), AttestationError> {
        if self.first == self.second {
            return Err(AttestationError::SameKey);
        }
        let fail = |signer| {
            move |source| AttestationError::Signature {
                kind: self.kind,
                signer,
                source,
            }
        };
        self.first
            .verify(
                &first_message(self.kind, &self.first, &self.second, self.issued_at),
                &self.first_signature,
            )
            .map_err(fail(Signer::First))?;
        self.second
            .verify(
                &second_message(
                    self.kind,
                    &self.first,
                    &self.second,
                    self.issued_at,
                    &self.first_signature,
                ),
                &self.second_signature,
            )
            .map_err(fail(Signer::Second))
    }

    /// Checks the signatures and that this is exactly the statement expected:
    /// `second` follows `first`, or `first` and `second` are equivalent (in
    /// either order for equivalence).
    pub fn verify_as(&self, kind: Kind, first: &Ipk, second: &Ipk) -> Result<(), AttestationError> {
        if self.kind != kind {
            return Err(AttestationError::WrongKind {
                expected: kind,
                found: self.kind,
            });
        }
        let same = (&self.first, &self.second) == (first, second);
        let swapped = (&self.first, &self.second) == (second, first);
        if !(same || (kind == Kind::Equivalent && swapped)) {
            return Err(AttestationError::Mismatch);
        }
        self.verify()
    }

    /// Whether this attestation mentions `key`.
    pub fn mentions(&self, key: &Ipk) -> bool {
        &self.first == key || &self.second == key
    }
}

fn first_message(kind: Kind, first: &Ipk, second: &Ipk, issued_at: u64) -> Vec<u8> {
    let label = match kind {
        Kind::Follows => LABEL_FOLLOWS_FIRST,
        Kind::Equivalent => LABEL_EQUIVALENT_FIRST,
    };
    statement(label, first, second, issued_at, None)
}

fn second_message(
    kind: Kind,
    first: &Ipk,
    second: &Ipk,
    issued_at: u64,
    first_signature: &[u8; SIGNATURE_LEN],
) -> Vec<u8> {
    match kind {
        // The successor countersigns the predecessor's signature: "that".
        Kind::Follows => statement(
            LABEL_FOLLOWS_SECOND,
            first,
            second,
            issued_at,
            Some(first_signature),
        ),
        // Equivalence is two independent signatures of the statement.
        Kind::Equivalent => statement(LABEL_EQUIVALENT_SECOND, first, second, issued_at, None),
    }
}

/// label || 0 || first || second || issued_at (big endian) [|| first signature].
/// Every field has a fixed length after the label, so the encoding is unambiguous.
fn statement(
    label: &[u8],
    first: &Ipk,
    second: &Ipk,
    issued_at: u64,
    first_signature: Option<&[u8; SIGNATURE_LEN]>,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(label.len() + 1 + 32 + 32 + 8 + SIGNATURE_LEN);
    m.extend_from_slice(label);
    m.push(0);
    m.extend_from_slice(first.as_bytes());
    m.extend_from_slice(second.as_bytes());
    m.extend_from_slice(&issued_at.to_be_bytes());
    if let Some(sig) = first_signature {
        m.extend_from_slice(sig);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (IdentityKey, IdentityKey, IdentityKey) {
        (
            IdentityKey::generate(),
            IdentityKey::generate(),
            IdentityKey::generate(),
        )
    }

    #[test]
    fn honest_attestations_verify() {
        let (a, b, _) = keys();
        let follows = Attestation::follows(&a, &b, 7);
        assert_eq!(follows.verify_as(Kind::Follows, &a.ipk(), &b.ipk()), Ok(()));
        let equivalent = Attestation::equivalent(&a, &b, 7);
        assert_eq!(
            equivalent.verify_as(Kind::Equivalent, &b.ipk(), &a.ipk()),
            Ok(()),
            "equivalence holds in either order"
        );
    }

    #[test]
    fn follows_is_directional() {
        let (a, b, _) = keys();
        let follows = Attestation::follows(&a, &b, 7);
        assert_eq!(
            follows.verify_as(Kind::Follows, &b.ipk(), &a.ipk()),
            Err(AttestationError::Mismatch)
        );
    }

    #[test]
    fn forged_signatures_are_refused() {
        let (a, b, mallory) = keys();
        // Mallory claims that her key follows A, signing both halves herself.
        let mut forged = Attestation::follows(&mallory, &b, 7);
        forged.first = a.ipk();
        assert!(matches!(
            forged.verify(),
            Err(AttestationError::Signature {
                signer: Signer::First,
                ..
            })
        ));
        // A real first signature, with the second half signed by the wrong key.
        let honest = Attestation::follows(&a, &b, 7);
        let by_mallory = Attestation::follows(&a, &mallory, 7);
        let mut swapped = honest.clone();
        swapped.second_signature = by_mallory.second_signature;
        assert!(matches!(
            swapped.verify(),
            Err(AttestationError::Signature {
                signer: Signer::Second,
                ..
            })
        ));
        // Any change of the signed content breaks it.
        let mut moved = honest.clone();
        moved.issued_at += 1;
        assert!(moved.verify().is_err());
    }

    #[test]
    fn one_kind_cannot_be_replayed_as_the_other() {
        let (a, b, _) = keys();
        let equivalent = Attestation::equivalent(&a, &b, 7);
        let mut replayed = equivalent.clone();
        replayed.kind = Kind::Follows;
        assert!(replayed.verify().is_err());
        let follows = Attestation::follows(&a, &b, 7);
        let mut replayed = follows.clone();
        replayed.kind = Kind::Equivalent;
        assert!(replayed.verify().is_err());
        assert_eq!(
            follows.verify_as(Kind::Equivalent, &a.ipk(), &b.ipk()),
            Err(AttestationError::WrongKind {
                expected: Kind::Equivalent,
                found: Kind::Follows
            })
        );
    }

    #[test]
    fn mismatched_keys_are_refused() {
        let (a, b, c) = keys();
        let att = Attestation::equivalent(&a, &b, 7);
        assert_eq!(
            att.verify_as(Kind::Equivalent, &a.ipk(), &c.ipk()),
            Err(AttestationError::Mismatch)
        );
    }

    #[test]
    fn a_key_cannot_attest_to_itself() {
        let (a, _, _) = keys();
        assert_eq!(
            Attestation::equivalent(&a, &a, 7).verify(),
            Err(AttestationError::SameKey)
        );
    }

    #[test]
    fn survives_postcard_and_refuses_truncation() {
        let (a, b, _) = keys();
        let att = Attestation::follows(&a, &b, 7);
        let bytes = postcard::to_allocvec(&att).unwrap();
        let back: Attestation = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, att);
        for cut in 0..bytes.len() {
            assert!(postcard::from_bytes::<Attestation>(&bytes[..cut]).is_err());
        }
    }
}
