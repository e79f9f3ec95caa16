//! Records stored in redb (postcard). Changing one incompatibly means
//! bumping `store::SCHEMA_VERSION`.

use serde::{Deserialize, Serialize};
use transports::{Address, DeliveryAddress};

use crate::identity::{Ipk, SecretKey};
use crate::model::{
    Conversation, DisplayIdentity, GroupProtonId, MessageId, ProtonId, TicketId, TransportInfo,
};

/// Where a relationship came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Provenance {
    /// We made a ticket and the peer accepted it.
    InvitedByUs { ticket: TicketId },
    /// The peer made a ticket and we accepted it.
    AcceptedTicket { ticket: TicketId },
    /// A side relationship with a member of one of our groups (each end
    /// attested equivalent to its group proton).
    MetInGroup { group: GroupProtonId, member: Ipk },
    /// The merge of two parallel relationships with the same person (this
    /// proton follows both).
    Merged { from: [ProtonId; 2] },
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

/// How far a relationship is trusted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trust {
    Normal,
    /// Evidence of a meddling introducer (or of a meddler in this
    /// relationship itself): do not rely on it.
    Flagged {
        reason: String,
        at: u64,
    },
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
    /// Why the ticket was made, when not by `invite`.
    pub origin: Option<TicketOrigin>,
}

/// What a ticket made by the node itself is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TicketOrigin {
    /// A side relationship, sealed to this member of this group.
    Group { group: GroupProtonId, member: Ipk },
    /// The follow-on of two of our relationships with one person (a merge
    /// we requested): the answer must carry their "follows" attestations
    /// from the keys they hold there.
    Merge {
        request: [u8; 16],
        old: [ProtonId; 2],
        peers: [Ipk; 2],
    },
}

/// A merge of two relationships that a peer asked us for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeRecord {
    pub id: [u8; 16],
    pub received_at: u64,
    pub request: crate::protocol::MergeRequest,
    /// Our relationships it arrived through.
    pub via: Vec<ProtonId>,
    /// Our two relationships it would merge (our keys named in the request).
    pub ours: Vec<ProtonId>,
    /// Whether we had attested those two equivalent before it came.
    pub linked: bool,
    pub state: MergeState,
    /// We asked for it (the peer decides); `via` is then empty.
    pub from_us: bool,
}

/// Where a merge request stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MergeState {
    Pending,
    Accepted {
        into: ProtonId,
    },
    Ignored,
    /// It named a key that is not ours where we hold a relationship with the
    /// same person: the introducer of that relationship meddles.
    Flagged {
        reason: String,
    },
    /// Moot: a newer request over the same two relationships replaced it,
    /// or one of them was merged through another request.
    Replaced,
}

/// What a delivery address resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Owner {
    Proton(ProtonId),
    /// The one-time address a ticket's Welcome goes to.
    Ticket(TicketId),
    Group(GroupProtonId),
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
    /// One member of a group, by its group IPK.
    Member(Ipk),
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
    /// A group text (one row per recipient; its history entry counts them).
    GroupText,
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
    pub address: Option<Address>,
    pub payload: Vec<u8>,
    pub created_at: u64,
}

/// Where an inbox row came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// An envelope from the network.
    Network,
    /// Written by our own proton: a control message its peer sent through
    /// the relationship, for the group it concerns. Only these rows may
    /// carry `Payload::Relayed`.
    Relationship(ProtonId),
}

/// An envelope acknowledged to its sender and waiting to be processed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxEntry {
    pub owner: Owner,
    pub source: Source,
    /// Set when the envelope came to an address derived from one of the
    /// owner's: the context it was derived with (the group it is for). The
    /// proton leaves such rows alone; they wait for their group.
    pub context: Option<[u8; 16]>,
    pub payload: Vec<u8>,
    pub received_at: u64,
}

/// How the owner of a group proton knows another member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberStatus {
    /// An identity an introducer made for someone; the introducer may still
    /// hold its private key, so it is never trusted as that person.
    Placeholder { asserted_by: Ipk },
    /// The member replaced a placeholder with its own key and proved it with
    /// a verified "follows" attestation signed by both.
    Claimed { placeholder: Ipk },
    /// Attested equivalent to the peer of one of our relationships.
    Linked { proton: ProtonId },
    /// Checked out of band by us.
    Verified,
    /// A member the introducer who brought us in described, and says holds
    /// its own key: not a placeholder (no one claims it, its own node
    /// votes for it), but known only by `by`'s word, as a claimed member
    /// is. A group's creator, or anyone its introducer has no claim of,
    /// is this to members added later. (Last, so that stored records
    /// decode as before.)
    Vouched { by: Ipk },
}

/// Another member of a group, as we know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub ipk: Ipk,
    pub display: DisplayIdentity,
    pub transports: Vec<TransportInfo>,
    pub status: MemberStatus,
    /// Who brought this member in (an introducer's group IPK).
    pub introduced_by: Option<Ipk>,
    /// Key to seal direct messages to this member (side relationships).
    pub direct_key: Option<[u8; 32]>,
    /// For a placeholder we made: the relationship with the person it is for.
    pub via: Option<ProtonId>,
    /// The member's "follows" attestation from its placeholder, once claimed.
    pub claim: Option<crate::attestation::Attestation>,
}

impl Member {
    /// A verified member with a fresh key and no transports, for tests.
    #[cfg(test)]
    pub fn for_test(name: &str) -> Self {
        Self {
            ipk: crate::identity::IdentityKey::generate().ipk(),
            display: crate::model::DisplayIdentity {
                name: name.into(),
                pronouns: None,
                picture: None,
            },
            transports: Vec::new(),
            status: MemberStatus::Verified,
            introduced_by: None,
            direct_key: None,
            via: None,
            claim: None,
        }
    }

    /// Whether this member is the peer of our relationship `proton`: the
    /// placeholder we made for them, or a member linked to them.
    pub fn stands_for(&self, proton: crate::model::ProtonId) -> bool {
        self.via == Some(proton)
            || matches!(self.status, MemberStatus::Linked { proton: p } if p == proton)
    }
}

/// A control message waiting to go through one of our relationships
/// (an introduction, an equivalence); removed once the proton queued it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relay {
    pub id: [u8; 16],
    pub via: ProtonId,
    pub body: crate::protocol::Body,
}

/// Life cycle of a group proton.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupState {
    /// We were introduced and speak with the introducer's placeholder for
    /// us; claim it or decline.
    Invited,
    /// We are a member under our own key.
    Active,
    /// We declined, left, or were removed.
    Gone,
}

/// A placeholder made for someone we introduce, until the Welcome is out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invitee {
    /// The relationship through which the introduction goes.
    pub via: ProtonId,
    pub placeholder: SecretKey,
    /// The placeholder's serialised `KeyPackageBundle`.
    pub bundle: Vec<u8>,
    pub member: Member,
}

/// Something that needs a commit, waiting for its turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    /// Replace our placeholder with our own key; `follows` ("the new key
    /// follows the placeholder", signed by both) rides in the commit.
    Claim {
        key: SecretKey,
        transports: Vec<TransportInfo>,
        follows: Box<crate::attestation::Attestation>,
    },
    /// Add placeholders for these people.
    Add { invitees: Vec<Invitee> },
    /// Remove these members.
    Remove { members: Vec<Ipk> },
    /// Fresh keys for our own leaf.
    Update,
}

/// Our commit, staged and sent to the ordering service, not yet merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingCommit {
    pub epoch: u64,
    pub commit: Vec<u8>,
    pub welcome: Option<Vec<u8>>,
    pub intent: Intent,
    /// When it was sent to the current ordering service (ms).
    pub sent_at: u64,
}

/// A proposal for an epoch we accepted, and the rank that proposed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedCommit {
    pub epoch: u64,
    pub rank: u32,
    pub commit: Vec<u8>,
}

/// The first fields of a [`GroupProtonRecord`], in its order: postcard
/// decodes them from a whole record and leaves the rest unread.
#[derive(Deserialize)]
pub(crate) struct GroupHead {
    pub id: GroupProtonId,
    _created_at: u64,
    _name: Option<String>,
    pub group_id: Vec<u8>,
    _context: [u8; 16],
    pub state: GroupState,
}

/// One membership of a group, as its owner stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupProtonRecord {
    pub id: GroupProtonId,
    pub created_at: u64,
    pub name: Option<String>,
    /// The MLS group id.
    pub group_id: Vec<u8>,
    /// Binds derived addresses to this group (see `seal`).
    pub context: [u8; 16],
    pub state: GroupState,
    /// Our current leaf key: the placeholder's while invited.
    pub own_key: SecretKey,
    pub own_display: DisplayIdentity,
    /// How members reach us: derived addresses while invited, our own after.
    pub own_transports: Vec<TransportInfo>,
    /// Seed of our key for direct messages sealed to us.
    pub direct_seed: [u8; 32],
    /// How we came in: through which relationship, introduced by whom.
    pub introduced: Option<(ProtonId, Ipk)>,
    /// Everyone else. Shared, so that copying a record (a step that may be
    /// rolled back keeps one) costs nothing for a large group; changed
    /// through `Arc::make_mut`. Encoded as a plain list.
    pub members: std::sync::Arc<Vec<Member>>,
    /// Failover count of the ordering service: it is the member at this
    /// position (modulo the group's size) in leaf order.
    pub orderer_rank: u32,
    /// The highest rank at which we, as the ordering service, have synced
    /// (collected commits the previous one may have made) before ordering.
    pub synced_rank: u32,
    /// The last proposal we accepted (as a member, or as the ordering
    /// service that made it): a later ordering service learns it from our
    /// promise and proposes it again, so a commit a majority may have
    /// accepted is never replaced by another.
    pub accepted: Option<AcceptedCommit>,
    /// Members that told us they leave, and what they last accepted: they
    /// answer nothing again, so they count as having accepted every
    /// proposal (and promised every rank) until a commit removes them.
    pub left: Vec<(Ipk, Option<AcceptedCommit>)>,
    pub pending: Option<PendingCommit>,
    pub intents: Vec<Intent>,
    /// Equivalences heard through relationships before the member showed up
    /// in the group (group IPK → relationship).
    pub pending_links: Vec<(Ipk, ProtonId)>,
    /// Control messages to send through our relationships.
    pub relays: Vec<Relay>,
    /// Members removed lately, kept so that the commit removing them (and
    /// anything queued before) can still reach them. The last few only.
    pub former: Vec<Member>,
    /// The MLS epoch and its authenticator as of the last save, for views
    /// (members compare authenticators to know they agree).
    pub epoch: u64,
    pub authenticator: Vec<u8>,
}

impl GroupProtonRecord {
    /// Whether our claim of the placeholder is on its way: queued, or
    /// staged and waiting for the ordering service.
    pub fn claiming(&self) -> bool {
        let is_claim = |i: &Intent| matches!(i, Intent::Claim { .. });
        self.intents.iter().any(is_claim)
            || self.pending.as_ref().is_some_and(|p| is_claim(&p.intent))
    }
}
