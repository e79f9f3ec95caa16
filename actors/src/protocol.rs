//! What travels inside envelopes.
//!
//! An envelope's payload is a [`Payload`]: either the answer to a ticket (an
//! MLS Welcome plus a first MLS application message carrying the
//! acceptor's [`Body::Hello`]) or an MLS message of an existing
//! conversation. MLS objects are in their TLS encoding; everything else is
//! postcard. Inside MLS application messages travels a [`Plaintext`].
//!
//! Every decoder here takes untrusted bytes: sizes are bounded before
//! decoding, decoding never panics, and decoded values are validated.

use serde::{Deserialize, Serialize};

use crate::model::{
    validate_text, validate_transports, DisplayIdentity, InvalidValue, MessageId, TransportInfo,
};

/// Version of [`Payload`] and [`Plaintext`].
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest plaintext inside one MLS application message.
pub const MAX_PLAINTEXT_BYTES: usize = 64 * 1024;

/// Why bytes from a peer were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{what} is too large ({size} bytes, at most {max})")]
    TooLarge {
        what: &'static str,
        size: usize,
        max: usize,
    },
    #[error("{what} is malformed: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("{what} has unsupported version {version}")]
    UnsupportedVersion { what: &'static str, version: u8 },
    #[error(transparent)]
    Invalid(#[from] InvalidValue),
}

/// An envelope's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// The answer to a ticket, sent to the ticket's one-time address.
    Welcome { welcome: Vec<u8>, hello: Vec<u8> },
    /// A message of an existing conversation (TLS-encoded MLSMessage).
    Mls(Vec<u8>),
}

/// The encoding of every payload and plaintext: a version byte, then the body.
#[derive(Deserialize)]
struct Versioned<T> {
    version: u8,
    body: T,
}

/// The same layout as [`Versioned`], borrowing the body for encoding.
#[derive(Serialize)]
struct VersionedRef<'a, T> {
    version: u8,
    body: &'a T,
}

impl Payload {
    pub fn encode(&self) -> Vec<u8> {
        encode_versioned(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_versioned(bytes, "payload", transports::MAX_PAYLOAD_BYTES)
    }
}

/// The plaintext of an MLS application message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plaintext {
    pub body: Body,
    /// The sender's transports, when they changed (new ephemeral address,
    /// new listen addresses). Piggybacked on any message.
    pub transports: Option<Vec<TransportInfo>>,
}

/// What a plaintext says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// The acceptor of a ticket introduces itself to the inviter.
    Hello {
        display: DisplayIdentity,
        transports: Vec<TransportInfo>,
    },
    /// A text message.
    Text {
        id: MessageId,
        text: String,
        sent_at: u64,
    },
    /// Nothing but the piggybacked transports.
    Transports,
}

impl Plaintext {
    pub fn encode(&self) -> Vec<u8> {
        encode_versioned(self)
    }

    /// Decodes and validates a plaintext.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let p: Self = decode_versioned(bytes, "plaintext", MAX_PLAINTEXT_BYTES)?;
        match &p.body {
            Body::Hello {
                display,
                transports,
            } => {
                display.validate()?;
                validate_transports(transports)?;
            }
            Body::Text { text, .. } => validate_text(text)?,
            Body::Transports => {}
        }
        if let Some(t) = &p.transports {
            validate_transports(t)?;
        }
        Ok(p)
    }
}

fn encode_versioned<T: Serialize>(body: &T) -> Vec<u8> {
    // Serialising these plain types (no maps, no unsized sequences) into a
    // Vec cannot fail; an empty result would be refused by every decoder.
    postcard::to_allocvec(&VersionedRef {
        version: PROTOCOL_VERSION,
        body,
    })
    .unwrap_or_default()
}

fn decode_versioned<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    what: &'static str,
    max: usize,
) -> Result<T, DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooLarge {
            what,
            size: bytes.len(),
            max,
        });
    }
    let version = *bytes.first().ok_or(DecodeError::Malformed {
        what,
        detail: "empty".into(),
    })?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion { what, version });
    }
    let v: Versioned<T> = postcard::from_bytes(bytes).map_err(|e| DecodeError::Malformed {
        what,
        detail: e.to_string(),
    })?;
    if v.version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            what,
            version: v.version,
        });
    }
    Ok(v.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_garbage_is_refused() {
        let p = Plaintext {
            body: Body::Text {
                id: MessageId::random(),
                text: "hi".into(),
                sent_at: 1,
            },
            transports: None,
        };
        assert_eq!(Plaintext::decode(&p.encode()).unwrap(), p);
        let bytes = p.encode();
        for cut in 0..bytes.len() {
            assert!(Plaintext::decode(&bytes[..cut]).is_err());
        }
        let mut wrong_version = bytes.clone();
        wrong_version[0] = 9;
        assert!(matches!(
            Plaintext::decode(&wrong_version),
            Err(DecodeError::UnsupportedVersion { version: 9, .. })
        ));
    }

    #[test]
    fn oversize_plaintext_is_refused_before_decoding() {
        let big = vec![PROTOCOL_VERSION; MAX_PLAINTEXT_BYTES + 1];
        assert!(matches!(
            Plaintext::decode(&big),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn empty_text_is_refused() {
        let p = Plaintext {
            body: Body::Text {
                id: MessageId::random(),
                text: String::new(),
                sent_at: 1,
            },
            transports: None,
        };
        assert!(matches!(
            Plaintext::decode(&p.encode()),
            Err(DecodeError::Invalid(_))
        ));
    }
}
