//! What the node shows: contacts, messages, status and events, as the
//! control API and the CLI print them (serde → JSON).

use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use crate::attestation::{Attestation, Kind};
use crate::identity::Ipk;
use crate::model::{Conversation, Picture, ProtonId};
use crate::records::{
    Author, GroupProtonRecord, GroupState, HistoryEntry, Member, MemberStatus, MergeRecord,
    MergeState, MessageStatus, ProtonRecord, ProtonState, Provenance, Trust,
};

/// Milliseconds since the Unix epoch as RFC 3339 (UTC, milliseconds).
pub fn rfc3339(ms: u64) -> String {
    // humantime cannot write years past 9999 (its Display fails, and
    // `to_string` panics on that); a peer's clock can say anything.
    const LAST_MS: u64 = 253_402_300_799_999;
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms.min(LAST_MS)))
        .to_string()
}

/// A duration as people say it ("3m 20s"), to the second.
pub fn human_duration(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs().max(1))).to_string()
}

/// A contact: the peer of one of our protons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContactView {
    pub id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pronouns: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub picture: Option<String>,
    /// "active", "pending" (our answer to their ticket is not yet
    /// acknowledged) or "refused" (their node refused it).
    pub state: &'static str,
    /// The peer's identity key fingerprint, to compare out of band.
    pub fingerprint: String,
    /// How the relationship started.
    pub origin: String,
    /// For a relationship from an introduction: who introduced it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub introduced_by: Option<String>,
    pub since: String,
    /// Merged into another relationship: it sends nothing more, and its
    /// history shows as that one's.
    pub retired: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
    /// "normal", or "flagged" when there is evidence of a meddler.
    pub trust: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ContactView {
    pub fn of(p: &ProtonRecord) -> Self {
        Self {
            id: p.id.to_string(),
            name: p.peer_display.name.clone(),
            pronouns: p.peer_display.pronouns.clone(),
            picture: p.peer_display.picture.as_ref().map(|pic| match pic {
                Picture::Emoji(e) => e.clone(),
                Picture::Monogram(m) => m.clone(),
            }),
            state: match p.state {
                ProtonState::Active => "active",
                ProtonState::Pending => "pending",
                ProtonState::Refused => "refused",
            },
            fingerprint: p.peer_ipk.fingerprint(),
            origin: match p.provenance {
                Provenance::InvitedByUs { .. } => "they accepted our invitation".into(),
                Provenance::AcceptedTicket { .. } => "we accepted their invitation".into(),
                Provenance::MetInGroup { group, member } => {
                    format!("met in group {group} (member {})", member.fingerprint())
                }
                Provenance::Merged { from: [a, b] } => format!("merged from {a} and {b}"),
            },
            since: rfc3339(p.created_at),
            introduced_by: None,
            retired: false,
            merged_into: None,
            trust: "normal",
            reason: None,
        }
    }

    /// With what others wrote about it: where it was merged, how trusted.
    pub fn marked(mut self, retired_into: Option<ProtonId>, trust: &Trust) -> Self {
        self.retired = retired_into.is_some();
        self.merged_into = retired_into.map(|p| p.to_string());
        if let Trust::Flagged { reason, .. } = trust {
            self.trust = "flagged";
            self.reason = Some(reason.clone());
        }
        self
    }
}

/// An attestation as the trust record shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttestationView {
    /// "follows" (`second` follows `first`) or "equivalent".
    pub kind: &'static str,
    pub first: String,
    pub second: String,
    pub at: String,
}

impl AttestationView {
    pub fn of(a: &Attestation) -> Self {
        Self {
            kind: match a.kind {
                Kind::Follows => "follows",
                Kind::Equivalent => "equivalent",
            },
            first: a.first.fingerprint(),
            second: a.second.fingerprint(),
            at: rfc3339(a.issued_at),
        }
    }
}

/// Who a contact is to us and why we believe it: `contact CONTACT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrustRecordView {
    pub contact: ContactView,
    /// Our own key in the relationship.
    pub own_fingerprint: String,
    /// How we got their key: "ticket", "introduced by X", "merged from ...".
    pub obtained: String,
    /// Contacts whose word this relationship rests on (introducers), by
    /// "id name".
    pub vouched_by: Vec<String>,
    /// Whose alias this contact may be, as far as this node can tell: the
    /// introducers, while we only have their word for the contact's key (no
    /// relationship in its lineage came from a ticket exchanged directly).
    /// Empty once one did.
    pub may_be_alias_of: Vec<String>,
    /// Groups (by name or id) in which we marked them verified (`group
    /// verify`: their key checked out of band).
    pub verified_in: Vec<String>,
    /// Signed statements tying this relationship's keys to others.
    pub attestations: Vec<AttestationView>,
}

/// A merge as `merge list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MergeView {
    pub id: String,
    /// "received" (the peer asks us) or "sent" (we asked).
    pub direction: &'static str,
    /// "request" (we had linked the two already) or "proposal" (the peer
    /// thinks our two relationships may be one identity).
    pub kind: &'static str,
    /// "pending", "accepted", "ignored" or "flagged".
    pub state: &'static str,
    /// Who asks (or whom we asked), by name.
    pub name: String,
    /// Our relationships it concerns.
    pub contacts: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub into: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: String,
}

impl MergeView {
    pub fn of(m: &MergeRecord, name: String) -> Self {
        Self {
            id: crate::merge::id_string(&m.id),
            direction: if m.from_us { "sent" } else { "received" },
            kind: if m.linked { "request" } else { "proposal" },
            state: crate::merge::state_name(&m.state),
            name,
            contacts: m.ours.iter().map(|p| p.to_string()).collect(),
            into: match &m.state {
                MergeState::Accepted { into } => Some(into.to_string()),
                _ => None,
            },
            reason: match &m.state {
                MergeState::Flagged { reason } => Some(reason.clone()),
                _ => None,
            },
            at: rfc3339(m.received_at),
        }
    }
}

/// One message of a history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MessageView {
    pub id: String,
    /// "me", or the contact id of the author (1:1), or their key's
    /// fingerprint (groups).
    pub from: String,
    /// The author's name as this node knows it (also for a member who has
    /// left the group since, while the group remembers them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// For a group message written with a placeholder's key: who asserts
    /// that the placeholder is `name`. Its introducer holds that key too,
    /// so the message may be theirs (this stays after the claim).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asserted_by: Option<String>,
    pub text: String,
    /// When it was sent (author's clock).
    pub at: String,
    /// "queued", "delivered", "failed" (ours) or "received" (theirs).
    pub status: &'static str,
    /// For a message just sent to a group: how many other members it goes
    /// to (0 when we are the only member: it is in the history, and no one
    /// else's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients: Option<u32>,
    /// For a message just sent: the contact or group id it went to (the
    /// command may have named it by a prefix or by name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

impl MessageView {
    pub fn of(conversation: Conversation, entry: &HistoryEntry) -> Self {
        Self {
            id: entry.id.to_string(),
            from: match (entry.author, conversation) {
                (Author::Me, _) => "me".into(),
                (Author::Peer(_), Conversation::Proton(id)) => id.to_string(),
                (Author::Peer(ipk), Conversation::Group(_)) => ipk.fingerprint(),
            },
            name: None,
            asserted_by: None,
            text: entry.text.clone(),
            at: rfc3339(entry.sent_at),
            status: status_name(entry.status),
            recipients: None,
            to: None,
        }
    }
}

/// The name of the author of a group message written with key `ipk` (a
/// current member, one the group still remembers, or a placeholder since
/// claimed), and, if the key is a placeholder's that someone else made, the
/// name of who asserts it: they hold that key too. `None` for a key the
/// group does not know.
pub fn group_author(g: &GroupProtonRecord, me: Ipk, ipk: Ipk) -> Option<(String, Option<String>)> {
    let known = || g.members.iter().chain(&g.former);
    let name_of = |k: Ipk| {
        known()
            .find(|m| m.ipk == k)
            .map(|m| m.display.name.clone())
            .unwrap_or_else(|| k.fingerprint())
    };
    let asserted = |by: Ipk| (by != me).then(|| name_of(by));
    if let Some(member) = known().find(|m| m.ipk == ipk) {
        let asserted_by = match member.status {
            MemberStatus::Placeholder { asserted_by } => asserted(asserted_by),
            _ => None,
        };
        return Some((member.display.name.clone(), asserted_by));
    }
    // A claim replaces the placeholder's key in its member's entry; what
    // was written with it stays its introducer's word.
    let claimed = known().find(|m| {
        matches!(m.status, MemberStatus::Claimed { placeholder } if placeholder == ipk)
            || m.claim
                .as_ref()
                .is_some_and(|a| a.kind == Kind::Follows && a.first == ipk)
    })?;
    Some((
        claimed.display.name.clone(),
        claimed.introduced_by.and_then(asserted),
    ))
}

pub fn status_name(status: MessageStatus) -> &'static str {
    match status {
        MessageStatus::Queued => "queued",
        MessageStatus::Delivered => "delivered",
        MessageStatus::Failed => "failed",
        MessageStatus::Received => "received",
    }
}

/// The node's state at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusView {
    pub peer_id: String,
    pub listen: Vec<String>,
    /// Peers with an open connection.
    pub peers: Vec<String>,
    pub contacts: usize,
    /// Envelopes waiting for their receiver's acknowledgement.
    pub outbox: usize,
    /// Things the user should know about.
    pub warnings: Vec<String>,
}

/// What a contact change was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ContactChange {
    Added,
    Active,
    Refused,
    Updated,
}

/// Something that happened, as `watch` streams it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A message arrived.
    Message {
        conversation: String,
        /// "contact" or "group": what `conversation` is.
        kind: &'static str,
        /// The contact's name (1:1) or the group's, if it has one.
        #[serde(skip_serializing_if = "Option::is_none")]
        conversation_name: Option<String>,
        message: MessageView,
    },
    /// One of our messages changed delivery state: for a group message,
    /// at one member's node (`member`, its key id); `kind` is "message",
    /// or "answer" for our answer to an invitation.
    Delivery {
        conversation: String,
        message: String,
        status: &'static str,
        kind: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        member: Option<String>,
        /// That member's name, when the sending service knows it.
        #[serde(skip_serializing_if = "Option::is_none")]
        member_name: Option<String>,
        /// For a placeholder, who asserts it ("you" for one we made):
        /// never the invitee's own word.
        #[serde(skip_serializing_if = "Option::is_none")]
        asserted_by: Option<String>,
        /// A 1:1 recipient's name, when the sending service knows it.
        #[serde(skip_serializing_if = "Option::is_none")]
        contact_name: Option<String>,
    },
    /// A contact appeared or changed.
    Contact {
        contact: ContactView,
        change: ContactChange,
    },
    /// A merge request arrived, or one changed state.
    Merge { merge: MergeView },
    /// A group's roster or epoch changed, we joined or left it, or someone
    /// introduced us in it.
    Group(GroupEvent),
}

/// What `watch` says of a group's change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupEvent {
    pub group: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub epoch: u64,
    pub change: GroupChange,
    /// For `introduced`: who introduced us (our contact's name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub introduced_by: Option<String>,
    /// Members new in the group (by name; a placeholder until claimed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub joined: Vec<String>,
    /// Placeholders their invitees claimed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub claimed: Vec<String>,
    /// Members no longer in the group (left, removed, or declined).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gone: Vec<String>,
    /// Those of `gone` who asked to leave.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub left: Vec<String>,
    /// Those of `gone` a member removed, and who ("me" for us): a
    /// placeholder removed by its introducer was declined or withdrawn.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<Removal>,
    /// For `left`: the member who removed us, if we did not leave.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed_by: Option<String>,
    /// Members who rotated their keys ("me" for us), by name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub updated: Vec<String>,
}

/// A member a commit removed, by name, and by whom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Removal {
    pub member: String,
    pub by: String,
    /// The member was a placeholder, not yet claimed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub placeholder: bool,
    /// A placeholder whose invitee declined, as its introducer (us) heard.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub declined: bool,
}

/// Who of `before`'s members left and who was removed, by whom, from the
/// departures a group noted (see `GroupSession::take_departures`); and who
/// removed us (`own`), if someone did. Names are looked up in `before` and
/// `after`; `own` is "me".
pub fn departures_named(
    before: &[Member],
    after: &[Member],
    departures: &[(Ipk, Option<Ipk>)],
    own: Ipk,
    declined: &[Ipk],
) -> (Vec<String>, Vec<Removal>, Option<String>) {
    let name = |ipk: Ipk| {
        if ipk == own {
            return "me".to_string();
        }
        before
            .iter()
            .chain(after)
            .find(|m| m.ipk == ipk)
            .map(|m| m.display.name.clone())
            .unwrap_or_else(|| format!("member {}", ipk.fingerprint()))
    };
    let (mut left, mut removed, mut removed_by) = (Vec::new(), Vec::new(), None);
    for (member, by) in departures {
        if *member == own {
            removed_by = by.map(name);
            continue;
        }
        let Some(m) = before.iter().find(|m| m.ipk == *member) else {
            continue;
        };
        match by {
            None => left.push(m.display.name.clone()),
            Some(by) => removed.push(Removal {
                member: m.display.name.clone(),
                by: name(*by),
                placeholder: matches!(m.status, MemberStatus::Placeholder { .. }),
                declined: declined.contains(member),
            }),
        }
    }
    (left, removed, removed_by)
}

/// Who joined, claimed and went between two member lists of a group (us
/// excluded), by name. A claim replaces its placeholder's key in the same
/// entry: the claimed member names the placeholder it follows.
pub fn roster_change(
    before: &[Member],
    after: &[Member],
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let had = |ipk: Ipk| before.iter().any(|m| m.ipk == ipk);
    let follows = |m: &Member| match (&m.status, &m.claim) {
        (MemberStatus::Claimed { placeholder }, _) => Some(*placeholder),
        (_, Some(a)) if a.kind == Kind::Follows => Some(a.first),
        _ => None,
    };
    let (mut joined, mut claimed) = (Vec::new(), Vec::new());
    let mut claimed_keys = Vec::new();
    for m in after.iter().filter(|m| !had(m.ipk)) {
        match follows(m).filter(|p| had(*p)) {
            Some(placeholder) => {
                claimed.push(m.display.name.clone());
                claimed_keys.push(placeholder);
            }
            None => joined.push(m.display.name.clone()),
        }
    }
    let gone = before
        .iter()
        .filter(|m| !after.iter().any(|a| a.ipk == m.ipk) && !claimed_keys.contains(&m.ipk))
        .map(|m| m.display.name.clone())
        .collect();
    (joined, claimed, gone)
}

/// What a group change was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupChange {
    /// We made it.
    Joined,
    /// Someone introduced us: the group waits for our claim or decline.
    Introduced,
    /// Our claim was ordered: we are in the group under our own key.
    Entered,
    Changed,
    Left,
}

/// A member of a group as `groups` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberView {
    /// The member's key fingerprint: how `connect` and `group remove` name it.
    pub id: String,
    pub name: String,
    /// "self", "placeholder", "claimed", "linked", "verified" or "vouched".
    pub status: &'static str,
    /// Who brought the member in (for a placeholder: who asserts it is this
    /// person), by the name we know them by.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub introduced_by: Option<String>,
    /// We brought the member in (`introduced_by` is then "me", which a
    /// peer could also be called).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub introduced_by_me: bool,
}

/// A group as `groups` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupView {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub epoch: u64,
    /// Members compare this to know they are in the same state.
    pub epoch_authenticator: String,
    /// An introduction we have not claimed or declined yet.
    pub pending: bool,
    /// Our claim of a pending introduction is on its way (the group has
    /// not ordered it yet).
    pub claiming: bool,
    /// Our changes (a claim, an add, a removal, a key update) waiting for
    /// the group's ordering service: asked for, not made yet.
    pub queued_changes: usize,
    /// "invited", "active" or "gone".
    pub state: &'static str,
    pub members: Vec<MemberView>,
}

impl GroupView {
    pub fn of(g: &GroupProtonRecord) -> Self {
        // Deriving our public key is a scalar multiplication: once per group.
        let me = g.own_key.key().ipk();
        let name_of = |ipk: &Ipk| {
            if *ipk == me {
                return "me".to_string();
            }
            // Members who went are remembered for a while (`former`).
            g.members
                .iter()
                .chain(g.former.iter())
                .find(|m| m.ipk == *ipk)
                .map(|m| m.display.name.clone())
                .unwrap_or_else(|| ipk.fingerprint())
        };
        let mut members = vec![MemberView {
            id: me.fingerprint(),
            name: g.own_display.name.clone(),
            status: "self",
            introduced_by: g.introduced.as_ref().map(|(_, by)| name_of(by)),
            introduced_by_me: false,
        }];
        for m in g.members.iter() {
            members.push(MemberView {
                id: m.ipk.fingerprint(),
                name: m.display.name.clone(),
                status: match m.status {
                    MemberStatus::Placeholder { .. } => "placeholder",
                    MemberStatus::Claimed { .. } => "claimed",
                    MemberStatus::Linked { .. } => "linked",
                    MemberStatus::Verified => "verified",
                    MemberStatus::Vouched { .. } => "vouched",
                },
                introduced_by: m.introduced_by.as_ref().map(name_of),
                introduced_by_me: m.introduced_by == Some(me),
            });
        }
        Self {
            id: g.id.to_string(),
            name: g.name.clone(),
            epoch: g.epoch,
            epoch_authenticator: data_encoding::HEXLOWER.encode(&g.authenticator),
            pending: g.state == GroupState::Invited,
            claiming: g.state == GroupState::Invited && g.claiming(),
            queued_changes: g.intents.len() + usize::from(g.pending.is_some()),
            state: match g.state {
                GroupState::Invited => "invited",
                GroupState::Active => "active",
                GroupState::Gone => "gone",
            },
            members,
        }
    }
}

impl Event {
    /// A message of group `g` arrived (`me`: our key in it).
    pub fn group_message(g: &GroupProtonRecord, me: Ipk, entry: &HistoryEntry) -> Self {
        let (name, asserted_by) = match entry.author {
            Author::Peer(ipk) => group_author(g, me, ipk)
                .map(|(name, by)| (Some(name), by))
                .unwrap_or_default(),
            Author::Me => (None, None),
        };
        Self::Message {
            conversation: g.id.to_string(),
            kind: "group",
            conversation_name: g.name.clone(),
            message: MessageView {
                name,
                asserted_by,
                ..MessageView::of(Conversation::Group(g.id), entry)
            },
        }
    }

    /// A message from the peer of relationship `p` arrived.
    pub fn message(p: &ProtonRecord, entry: &HistoryEntry) -> Self {
        Self::Message {
            conversation: p.id.to_string(),
            kind: "contact",
            conversation_name: Some(p.peer_display.name.clone()),
            message: MessageView {
                name: Some(p.peer_display.name.clone()),
                ..MessageView::of(Conversation::Proton(p.id), entry)
            },
        }
    }

    /// A change of group `g`, now at `epoch`.
    pub fn group(g: &GroupProtonRecord, epoch: u64, change: GroupChange) -> Self {
        Self::Group(Self::group_change(g, epoch, change))
    }

    pub fn group_change(g: &GroupProtonRecord, epoch: u64, change: GroupChange) -> GroupEvent {
        GroupEvent {
            group: g.id.to_string(),
            name: g.name.clone(),
            epoch,
            change,
            introduced_by: None,
            joined: Vec::new(),
            claimed: Vec::new(),
            gone: Vec::new(),
            left: Vec::new(),
            removed: Vec::new(),
            removed_by: None,
            updated: Vec::new(),
        }
    }

    /// `by` (our contact's name) introduced us in group `g`, which waits
    /// for our claim or decline.
    /// `joined` lists whom we meet there (by the names the introducer
    /// asserts), the introducer aside.
    pub fn introduced(g: &GroupProtonRecord, by: &str) -> Self {
        let introducer = g.introduced.map(|(_, ipk)| ipk);
        Self::Group(GroupEvent {
            introduced_by: Some(by.to_string()),
            joined: g
                .members
                .iter()
                .filter(|m| Some(m.ipk) != introducer)
                .map(|m| m.display.name.clone())
                .collect(),
            ..Self::group_change(g, g.epoch, GroupChange::Introduced)
        })
    }

    pub fn contact(p: &ProtonRecord, change: ContactChange) -> Self {
        Self::Contact {
            contact: ContactView::of(p),
            change,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timestamp_past_year_9999_is_written_without_panicking() {
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    }
}
