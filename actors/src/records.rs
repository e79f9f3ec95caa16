//! Records stored in redb (postcard). Changing one incompatibly means
//! bumping `store::SCHEMA_VERSION`.

use serde::{Deserialize, Serialize};
use transports::DeliveryAddress;

use crate::identity::{Ipk, SecretKey};
use crate::model::{Conversation, DisplayIdentity, MessageId, ProtonId, TicketId, TransportInfo};

/// Where a relationship came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Provenance {
    /// We made a ticket and the peer accepted it.
    InvitedByUs { ticket: TicketId },
    /// The peer made a ticket and we accepted it.
    AcceptedTicket { ticket: TicketId },
}

/// Life cycle of a proton.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProtonState {
    /// We accepted a ticket; the inviter's node has not acknowledged our answer yet.
    Pending,
    /// Both ends exist.
    Active,
    /// The inviter's node refused our answer (ticket used or expired).
    Refused,
}

/// One end of a 1:1 relationship, as its owner stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProtonRecord {
    pub id: ProtonId,
    pub created_at: u64,
    pub state: ProtonState,
    pub provenance: Provenance,
    /// Our private identity key for this relationship.
    pub own_key: SecretKey,
    /// How we present ourselves in it.
    pub own_display: DisplayIdentity,
    /// How the peer reaches us (our addresses), as last told to the peer.
    pub own_transports: Vec<TransportInfo>,
    /// The peer's display identity.
    pub peer_display: DisplayIdentity,
    /// The peer's IPK.
    pub peer_ipk: Ipk,
    /// How we reach the peer.
    pub peer_transports: Vec<TransportInfo>,
    /// The MLS group id of the 2-member group.
    pub group_id: Vec<u8>,
    /// Our own transports changed since the peer last heard of them.
    pub transports_dirty: bool,
}

/// An invitation we made and that is not yet used.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TicketRecord {
    pub id: TicketId,
    pub created_at: u64,
    pub expires_at: u64,
    /// The proton this ticket becomes when accepted; its MLS namespace holds
    /// the key package's private parts.
    pub proton: ProtonId,
    pub own_key: SecretKey,
    pub own_display: DisplayIdentity,
    pub own_transports: Vec<TransportInfo>,
    pub welcome_address: DeliveryAddress,
    /// Set when the Welcome arrived; a ticket works once.
    pub used: bool,
}

/// What a delivery address resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Owner {
    Proton(ProtonId),
    /// The one-time address a ticket's Welcome goes to.
    Ticket(TicketId),
}

/// Kinds of address, so that one-time ones can be consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddressKind {
    LongTerm,
    Ephemeral,
    /// Accepts exactly one envelope, then disappears.
    OneTime,
}

/// A delivery address this node's receiving service resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressRecord {
    pub owner: Owner,
    pub kind: AddressKind,
    pub valid_until: u64,
    /// For a one-time address: the hash of the payload that used it, so a
    /// retry of that same payload is answered "duplicate", not "unknown".
    pub used_by: Option<[u8; 32]>,
}

/// Who wrote a history entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Author {
    Me,
    Peer(Ipk),
}

/// Delivery state of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageStatus {
    /// Ours, stored and waiting in the outbox.
    Queued,
    /// Ours, acknowledged by every recipient's node.
    Delivered,
    /// Ours, refused by the recipient's node for good.
    Failed,
    /// Theirs.
    Received,
}

/// One message in a conversation's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub id: MessageId,
    pub author: Author,
    pub text: String,
    /// When the author sent it (author's clock, ms).
    pub sent_at: u64,
    /// When this node stored it (ms).
    pub stored_at: u64,
    pub status: MessageStatus,
    /// Recipients whose nodes have not acknowledged it yet (ours only).
    pub pending: u32,
}

/// Who an outbox entry goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Recipient {
    /// The peer of a 1:1 relationship.
    Peer,
}

/// What an outbox entry carries, when that matters after delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutboxKind {
    /// A text message (its id is in `message`).
    Text,
    /// Our answer to a ticket: on acknowledgement the proton becomes active,
    /// on refusal it is marked refused.
    Welcome,
    /// Protocol traffic with no history entry.
    Control,
}

/// An envelope waiting for its receiver's acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub conversation: Conversation,
    pub recipient: Recipient,
    pub kind: OutboxKind,
    /// The history entry this delivers, if any, and its position in the
    /// conversation's history (set when the entry is stored).
    pub message: Option<MessageId>,
    pub history: Option<u64>,
    /// Send to this address instead of the recipient's current ones (a
    /// ticket's one-time address).
    pub address: Option<DeliveryAddress>,
    pub payload: Vec<u8>,
    pub created_at: u64,
}

/// An envelope acknowledged to its sender and waiting to be processed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxEntry {
    pub owner: Owner,
    pub payload: Vec<u8>,
    pub received_at: u64,
}
