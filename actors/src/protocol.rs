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

use crate::attestation::Attestation;
use crate::identity::{Ipk, SecretKey};
use crate::model::{
    validate_text, validate_transports, DisplayIdentity, InvalidValue, MessageId, TransportInfo,
};

/// Checks a group name.
pub fn validate_group_name(name: &str) -> Result<(), InvalidValue> {
    if name.trim().is_empty() {
        return Err(InvalidValue::Empty { what: "group name" });
    }
    let len = name.chars().count();
    if len > MAX_GROUP_NAME_CHARS {
        return Err(InvalidValue::TooLong {
            what: "group name",
            len,
            max: MAX_GROUP_NAME_CHARS,
        });
    }
    if config::misleading_text(name) {
        return Err(InvalidValue::ControlCharacters { what: "group name" });
    }
    Ok(())
}

/// Version of [`Payload`] and [`Plaintext`].
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest plaintext inside one MLS application message (an introduction
/// to a large group carries its Welcome and roster).
pub const MAX_PLAINTEXT_BYTES: usize = 224 * 1024;
/// Most members one introduction or roster may list.
pub const MAX_MEMBERS: usize = 1024;
/// Longest group name, in characters.
pub const MAX_GROUP_NAME_CHARS: usize = 64;

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
    /// A member's commit, sent to the group's ordering service: the one at
    /// `rank` as the member sees it (a higher rank than the receiver's
    /// tells it the group is failing over).
    Commit { commit: Vec<u8>, rank: u32 },
    /// A commit the ordering service accepted for its epoch, fanned out to
    /// every member, signed by the ordering member's group key.
    Ordered {
        commit: Vec<u8>,
        rank: u32,
        #[serde(with = "crate::identity::signature_serde")]
        signature: [u8; crate::identity::SIGNATURE_LEN],
    },
    /// A member that fell behind asks for the commits it missed since this
    /// epoch (answered from the log of accepted commits; they are signed and
    /// encrypted, so answering anyone costs only bandwidth).
    CatchUp { epoch: u64, from: Ipk },
    /// A control message our own proton received from its peer for a group
    /// (an equivalence, a decline). Only in inbox rows our proton wrote.
    Relayed(Box<Body>),
    /// A message sealed to one member's direct key, signed by the sender's
    /// group key (a side relationship's invitation).
    Sealed {
        from: Ipk,
        sealed: Vec<u8>,
        #[serde(with = "crate::identity::signature_serde")]
        signature: [u8; crate::identity::SIGNATURE_LEN],
    },
    /// The ordering service at `rank` proposes a commit for its epoch; a
    /// member that has promised no higher rank keeps it and accepts it.
    /// Once a majority has, the commit is ordered (`Ordered`).
    Propose {
        commit: Vec<u8>,
        rank: u32,
        #[serde(with = "crate::identity::signature_serde")]
        signature: [u8; crate::identity::SIGNATURE_LEN],
    },
    /// A step of a view change of the ordering service, or a member's
    /// acceptance of a proposal (DESIGN.md section 9), signed by `from`.
    View {
        step: ViewStep,
        rank: u32,
        epoch: u64,
        from: Ipk,
        /// `Promise`: the commit we accepted for `epoch`, if any.
        accepted: Option<Accepted>,
        /// SHA-256 of the commit accepted (`Accept`, `Promise`); zeros else.
        digest: [u8; 32],
        #[serde(with = "crate::identity::signature_serde")]
        signature: [u8; crate::identity::SIGNATURE_LEN],
    },
}

/// A commit a member accepted, and the rank of the ordering service that
/// proposed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub rank: u32,
    pub commit: Vec<u8>,
}

/// The steps of ordering a commit (DESIGN.md section 9): a view change
/// (`Sync`, `Promise`) when another member takes over as ordering service,
/// or when it comes back from a crash, and the acceptance of a proposal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ViewStep {
    /// "I order at `rank`; I am at `epoch`: send me the commits you have
    /// after it, and promise to accept no proposal of a lower rank."
    Sync,
    /// "I promise `rank` (a higher one than asked: step down); I am at
    /// `epoch`, and this is what I accepted for it."
    Promise,
    /// "I accept your proposal for `epoch` at `rank` (its digest)."
    Accept,
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

    /// Its variant's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Payload::Welcome { .. } => "welcome",
            Payload::Mls(_) => "mls",
            Payload::Commit { .. } => "commit",
            Payload::Ordered { .. } => "ordered",
            Payload::CatchUp { .. } => "catch-up",
            Payload::Relayed(_) => "relayed",
            Payload::Sealed { .. } => "sealed",
            Payload::Propose { .. } => "propose",
            Payload::View { .. } => "view",
        }
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
        /// Ties the acceptor's new key to its others: for a side
        /// relationship, its equivalence to the acceptor's group proton; for
        /// a merge, "follows" from each of the acceptor's two old keys.
        link: Option<HelloLink>,
    },
    /// A text message.
    Text {
        id: MessageId,
        text: String,
        sent_at: u64,
    },
    /// Nothing but the piggybacked transports.
    Transports,
    /// (1:1) The sender introduces us into a group (DESIGN.md section 8.2).
    Introduction(Box<Introduction>),
    /// (1:1) "My group proton in this group is equivalent to my proton
    /// here": how a claim (or a side relationship) is linked.
    Equivalence {
        group_id: Vec<u8>,
        attestation: Attestation,
    },
    /// (1:1) We decline the sender's introduction into this group.
    Decline { group_id: Vec<u8> },
    /// (1:1) The sender asks to merge two relationships with us.
    MergeRequest(Box<MergeRequest>),
    /// (group) Who the sender is and how to reach it.
    MemberInfo(MemberInfo),
    /// (group) The sender leaves; the ordering service removes it. It
    /// will accept no proposal again; what it last accepted for its epoch
    /// comes along, so that it counts as having promised any later
    /// ordering service.
    Leave { accepted: Option<Accepted> },
    /// (group, from the ordering node to one member) "I read your text
    /// `message` at `epoch`, later than the epoch you wrote it in": the
    /// members who joined in between cannot read it, and its author sends
    /// it to them (see `GroupSession::send_to_joined`). (Last, so that
    /// stored values decode as before.)
    Unread { message: MessageId, epoch: u64 },
}

/// A member of a group as one member tells another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub ipk: Ipk,
    pub display: DisplayIdentity,
    pub transports: Vec<TransportInfo>,
    pub direct_key: Option<[u8; 32]>,
    /// `Some(introducer)` for a placeholder the introducer made.
    pub placeholder_of: Option<Ipk>,
    /// "This key follows the placeholder it claimed", signed by both.
    pub claim: Option<Attestation>,
}

impl MemberInfo {
    pub fn validate(&self) -> Result<(), InvalidValue> {
        self.display.validate()?;
        validate_transports(&self.transports)
    }
}

/// How an acceptor ties its new key to its others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloLink {
    Group(Attestation),
    Merge(Vec<Attestation>),
}

/// "These two relationships of mine with you are one person, me; let us go on
/// as one": sent inside both relationships (DESIGN.md 8.5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeRequest {
    pub id: [u8; 16],
    /// For each of the two relationships: (the sender's key there, the key
    /// the sender believes is the receiver's there).
    pub pairs: Vec<(Ipk, Ipk)>,
    /// For each relationship, the name of whoever introduced it as the
    /// sender knows them ("" when it began with a ticket): lets the receiver
    /// tell which of its relationships a mismatched key concerns.
    pub introducers: Vec<String>,
    /// The sender's two keys are equivalent, signed by both.
    pub equivalence: Attestation,
    /// Each of the sender's two keys is followed by its new one.
    pub follows: Vec<Attestation>,
    /// A ticket for the new relationship; its key is the sender's new key.
    pub ticket: String,
}

impl MergeRequest {
    /// The sender's new key must be the ticket's; the caller parses it.
    pub fn validate_shape(&self) -> Result<(), InvalidValue> {
        if self.pairs.len() != 2 || self.follows.len() != 2 {
            return Err(InvalidValue::Malformed {
                what: "merge request",
                detail: "a merge names exactly two relationships".into(),
            });
        }
        if self.introducers.len() != self.pairs.len() {
            return Err(InvalidValue::Malformed {
                what: "merge request",
                detail: "one introducer name per relationship".into(),
            });
        }
        for name in &self.introducers {
            if !name.is_empty() {
                crate::model::check_text("introducer", name, crate::model::MAX_NAME_CHARS)?;
            }
        }
        if self.ticket.len() > crate::ticket::MAX_TICKET_CHARS {
            return Err(InvalidValue::TooLong {
                what: "merge ticket",
                len: self.ticket.len(),
                max: crate::ticket::MAX_TICKET_CHARS,
            });
        }
        Ok(())
    }
}

/// A side relationship's invitation, sealed to one group member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideInvitation {
    /// A ticket, as `protonode invite` makes (for the receiver only).
    pub ticket: String,
    /// The ticket's key is equivalent to the sender's group proton.
    pub equivalence: Attestation,
}

/// What an introducer sends each person it introduces, inside their
/// relationship.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Introduction {
    pub group_id: Vec<u8>,
    pub name: Option<String>,
    /// The MLS Welcome that joins the placeholder.
    pub welcome: Vec<u8>,
    /// The placeholder made for the receiver: its private key and its key
    /// package's private parts (a serialised `KeyPackageBundle`).
    pub placeholder_key: SecretKey,
    pub placeholder_bundle: Vec<u8>,
    /// The introducer's own member identity in the group.
    pub introducer: MemberInfo,
    /// The introducer's group key is equivalent to its key in this
    /// relationship, signed by both.
    pub equivalence: Attestation,
    /// Everyone else in the group, as the introducer knows them.
    pub members: Vec<MemberInfo>,
    /// How the group reaches the receiver's placeholder (addresses derived
    /// from the receiver's own in this relationship).
    pub your_transports: Vec<TransportInfo>,
    pub orderer_rank: u32,
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
                ..
            } => {
                display.validate()?;
                validate_transports(transports)?;
            }
            Body::Text { text, .. } => validate_text(text)?,
            Body::Transports
            | Body::Decline { .. }
            | Body::Leave { .. }
            | Body::Unread { .. }
            | Body::Equivalence { .. } => {}
            Body::MergeRequest(m) => m.validate_shape()?,
            Body::MemberInfo(info) => info.validate()?,
            Body::Introduction(intro) => {
                intro.introducer.validate()?;
                if intro.members.len() > MAX_MEMBERS {
                    return Err(InvalidValue::TooLong {
                        what: "members",
                        len: intro.members.len(),
                        max: MAX_MEMBERS,
                    }
                    .into());
                }
                intro.members.iter().try_for_each(MemberInfo::validate)?;
                validate_transports(&intro.your_transports)?;
                if let Some(name) = &intro.name {
                    validate_group_name(name)?;
                }
            }
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
