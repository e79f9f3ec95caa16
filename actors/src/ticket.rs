//! Invitation tickets: how a relationship starts (DESIGN.md section 8.1).
//!
//! A ticket is one line of text (`protonode:` then base64url) that the
//! inviter shows the invitee out of band, also as a QR code. It carries a
//! fresh IPK's key package, the inviter's display identity for this
//! relationship, at least two transports with the addresses the new
//! relationship will use, a one-time address for the answer, and an expiry.
//! It is signed by the IPK, so a damaged or altered ticket is refused.

use openmls::prelude::KeyPackage;
use openmls_traits::crypto::OpenMlsCrypto;
use serde::{Deserialize, Serialize};
use transports::DeliveryAddress;

use crate::identity::{IdentityKey, Ipk, SIGNATURE_LEN};
use crate::mls;
use crate::model::{validate_transports, DisplayIdentity, InvalidValue, TicketId, TransportInfo};

/// What every ticket starts with.
pub const PREFIX: &str = "protonode:";
/// Version of the ticket encoding.
pub const TICKET_VERSION: u8 = 1;
/// Longest ticket text accepted.
pub const MAX_TICKET_CHARS: usize = 16 * 1024;

const SIGNATURE_LABEL: &[u8] = b"protonode/v1/ticket";

/// Why a ticket was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("this is not a protonode ticket (tickets start with \"{PREFIX}\")")]
    NotATicket,
    #[error("the ticket is too long to be a protonode ticket")]
    TooLong,
    #[error("the ticket is damaged: was it copied in full? ({0})")]
    Damaged(String),
    #[error("the ticket is damaged, or was made by a newer protonode (it says ticket version {0}); check that it was copied whole, else update protonode")]
    UnsupportedVersion(u8),
    #[error("the ticket's signature does not match its contents: it was altered or damaged")]
    BadSignature,
    #[error("the ticket was altered or damaged: its key package does not check out ({0}); ask for a new one")]
    InvalidKeyPackage(String),
    #[error("the ticket is invalid: {0}")]
    Invalid(#[from] InvalidValue),
    #[error("the ticket expired {0}; ask for a new one")]
    Expired(String),
}

/// The signed contents of a ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub id: TicketId,
    pub display: DisplayIdentity,
    /// TLS-encoded MLS KeyPackage of the inviter's new proton.
    pub key_package: Vec<u8>,
    pub transports: Vec<TransportInfo>,
    /// Where the answer goes; accepts one envelope.
    pub welcome_address: DeliveryAddress,
    /// Milliseconds since the Unix epoch.
    pub expires_at: u64,
}

#[derive(Serialize)]
struct SignedRef<'a> {
    version: u8,
    ticket: &'a Ticket,
    #[serde(with = "crate::identity::signature_serde")]
    signature: [u8; SIGNATURE_LEN],
}

#[derive(Deserialize)]
struct Signed {
    version: u8,
    ticket: Ticket,
    #[serde(with = "crate::identity::signature_serde")]
    signature: [u8; SIGNATURE_LEN],
}

/// A ticket that parsed and verified: its contents, the validated key
/// package and the inviter's IPK for the new relationship.
pub struct VerifiedTicket {
    pub ticket: Ticket,
    pub key_package: KeyPackage,
    pub ipk: Ipk,
}

impl Ticket {
    /// The ticket as one line of text, signed with `key` (the key package's key).
    pub fn encode(&self, key: &IdentityKey) -> String {
        let signature = key.sign_bytes(&signed_message(self));
        let bytes = postcard::to_allocvec(&SignedRef {
            version: TICKET_VERSION,
            ticket: self,
            signature,
        })
        .unwrap_or_default();
        format!("{PREFIX}{}", data_encoding::BASE64URL_NOPAD.encode(&bytes))
    }

    /// Parses and verifies a ticket; expiry is checked separately
    /// ([`VerifiedTicket::check_expiry`]) so the caller chooses the clock.
    pub fn parse(text: &str, crypto: &impl OpenMlsCrypto) -> Result<VerifiedTicket, TicketError> {
        // A ticket passed through mail or chat comes back wrapped, indented
        // or with spaces where lines broke; none of that is in its alphabet.
        if text.len() > 2 * MAX_TICKET_CHARS {
            return Err(TicketError::TooLong);
        }
        let text: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        if text.len() > MAX_TICKET_CHARS {
            return Err(TicketError::TooLong);
        }
        let body = text.strip_prefix(PREFIX).ok_or(TicketError::NotATicket)?;
        let bytes = data_encoding::BASE64URL_NOPAD
            .decode(body.as_bytes())
            .map_err(|e| TicketError::Damaged(e.to_string()))?;
        match bytes.first() {
            Some(&TICKET_VERSION) => {}
            Some(&v) if v > TICKET_VERSION => return Err(TicketError::UnsupportedVersion(v)),
            Some(_) => return Err(TicketError::Damaged("no ticket version".into())),
            None => return Err(TicketError::Damaged("empty".into())),
        }
        let signed: Signed =
            postcard::from_bytes(&bytes).map_err(|e| TicketError::Damaged(e.to_string()))?;
        debug_assert_eq!(signed.version, TICKET_VERSION);
        let ticket = signed.ticket;
        ticket.display.validate()?;
        validate_transports(&ticket.transports)?;
        let key_package =
            mls::decode_key_package(crypto, &ticket.key_package).map_err(|e| match e {
                mls::MlsError::InvalidKeyPackage(why) => TicketError::InvalidKeyPackage(why),
                other => TicketError::InvalidKeyPackage(other.to_string()),
            })?;
        let ipk = mls::key_package_ipk(&key_package).ok_or_else(|| {
            TicketError::InvalidKeyPackage("its credential is not a protonode identity".into())
        })?;
        ipk.verify(&signed_message(&ticket), &signed.signature)
            .map_err(|_| TicketError::BadSignature)?;
        Ok(VerifiedTicket {
            ticket,
            key_package,
            ipk,
        })
    }
}

impl VerifiedTicket {
    pub fn check_expiry(&self, now: u64) -> Result<(), TicketError> {
        if now >= self.ticket.expires_at {
            let ago = std::time::Duration::from_millis(now - self.ticket.expires_at);
            return Err(TicketError::Expired(format!(
                "{} ago",
                crate::views::human_duration(ago)
            )));
        }
        Ok(())
    }
}

fn signed_message(ticket: &Ticket) -> Vec<u8> {
    let mut m = SIGNATURE_LABEL.to_vec();
    m.push(0);
    m.extend(postcard::to_allocvec(ticket).unwrap_or_default());
    m
}
