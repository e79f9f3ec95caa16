//! Shared vocabulary: identifiers, time, display identities and transports.
//!
//! These types travel on the wire (inside MLS messages and tickets) and are
//! stored in redb, so every one that can come from outside has a `validate`
//! that bounds its sizes; decoding plus `validate` is the only way in.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use transports::{Address, DeliveryAddress, Multiaddr, PeerId};

/// Longest display name, in characters.
pub const MAX_NAME_CHARS: usize = config::MAX_NAME_CHARS;
/// Longest text message, in bytes of UTF-8.
pub const MAX_TEXT_BYTES: usize = 32 * 1024;
/// Most transports one end of a relationship may list.
pub const MAX_TRANSPORTS: usize = 8;
/// Most listen addresses one transport may list.
pub const MAX_ADDRS_PER_TRANSPORT: usize = 16;
/// Longest encoded multiaddr.
pub const MAX_MULTIADDR_BYTES: usize = 256;
/// Fewest transports a relationship end must list (DESIGN.md: at least 2).
pub const MIN_TRANSPORTS: usize = 2;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why a value received from outside was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidValue {
    #[error("{what} is too long ({len}, at most {max})")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("the message is {len} bytes long (in UTF-8), more than the {max} one message holds: send it in parts")]
    MessageTooLong { len: usize, max: usize },
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} shows nothing, or contains control characters, invisible ones, or ones that override the direction of the text")]
    ControlCharacters { what: &'static str },
    #[error("{what} is not valid: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("at least {min} transports are needed, got {got}")]
    TooFewTransports { min: usize, got: usize },
}

pub fn check_text(what: &'static str, value: &str, max_chars: usize) -> Result<(), InvalidValue> {
    if value.is_empty() {
        return Err(InvalidValue::Empty { what });
    }
    let len = value.chars().count();
    if len > max_chars {
        return Err(InvalidValue::TooLong {
            what,
            len,
            max: max_chars,
        });
    }
    if config::misleading_text(value) {
        return Err(InvalidValue::ControlCharacters { what });
    }
    Ok(())
}

macro_rules! local_id {
    ($(#[$doc:meta])* $name:ident, $len:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            pub fn random() -> Self {
                Self(rand::random())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }

        impl FromStr for $name {
            type Err = InvalidValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let bad = || InvalidValue::Malformed {
                    what: stringify!($name),
                    detail: format!("{s:?} is not {} hex digits", $len * 2),
                };
                let bytes = data_encoding::HEXLOWER_PERMISSIVE
                    .decode(s.as_bytes())
                    .map_err(|_| bad())?;
                bytes.try_into().map(Self).map_err(|_| bad())
            }
        }
    };
}

local_id!(
    /// A proton (one end of a 1:1 relationship), as its owner names it locally.
    ProtonId,
    8
);
local_id!(
    /// A group proton (one membership of a group), as its owner names it locally.
    GroupProtonId,
    8
);
local_id!(
    /// An invitation ticket.
    TicketId,
    16
);
local_id!(
    /// A message. Both ends of a conversation know a message by the same id.
    MessageId,
    16
);

/// Which conversation a stored item belongs to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub enum Conversation {
    Proton(ProtonId),
    Group(GroupProtonId),
}

impl Conversation {
    /// The key prefix under which this conversation's rows are stored.
    pub fn key(&self) -> [u8; 8] {
        match self {
            Self::Proton(id) => id.0,
            Self::Group(id) => id.0,
        }
    }
}

impl fmt::Display for Conversation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Proton(id) => id.fmt(f),
            Self::Group(id) => id.fmt(f),
        }
    }
}

/// A small picture: an emoji or a monogram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Picture {
    Emoji(String),
    Monogram(String),
}

/// How a person presents themselves in one relationship.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisplayIdentity {
    pub name: String,
    pub pronouns: Option<String>,
    pub picture: Option<Picture>,
}

impl DisplayIdentity {
    pub fn from_profile(profile: &config::Profile) -> Self {
        let picture = match (&profile.emoji, &profile.monogram) {
            (Some(emoji), _) => Some(Picture::Emoji(emoji.clone())),
            (None, Some(monogram)) => Some(Picture::Monogram(monogram.clone())),
            (None, None) => None,
        };
        Self {
            name: profile.name.clone(),
            pronouns: profile.pronouns.clone(),
            picture,
        }
    }

    pub fn validate(&self) -> Result<(), InvalidValue> {
        check_text("name", &self.name, MAX_NAME_CHARS)?;
        if let Some(p) = &self.pronouns {
            check_text("pronouns", p, config::MAX_PRONOUNS_CHARS)?;
        }
        match &self.picture {
            Some(Picture::Emoji(e)) => check_text("emoji", e, config::MAX_EMOJI_CHARS),
            Some(Picture::Monogram(m)) => check_text("monogram", m, config::MAX_MONOGRAM_CHARS),
            None => Ok(()),
        }
    }
}

/// Checks a text message's size and content.
pub fn validate_text(text: &str) -> Result<(), InvalidValue> {
    if text.is_empty() {
        return Err(InvalidValue::Empty { what: "message" });
    }
    if text.len() > MAX_TEXT_BYTES {
        return Err(InvalidValue::MessageTooLong {
            len: text.len(),
            max: MAX_TEXT_BYTES,
        });
    }
    Ok(())
}

/// A delivery address and the time until which its receiving service
/// guarantees to accept envelopes for it. Our own leases hold plain
/// addresses; a lease an introducer gives for someone else may hold an
/// address derived from theirs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressLease {
    pub address: Address,
    /// Milliseconds since the Unix epoch.
    pub valid_until: u64,
}

impl AddressLease {
    /// A fresh random address, valid for `valid_for` from `now` (ms).
    pub fn new(now: u64, valid_for: std::time::Duration) -> Self {
        Self {
            address: Address::Plain(DeliveryAddress::random()),
            valid_until: now.saturating_add(valid_for.as_millis() as u64),
        }
    }

    /// The plain address of this lease, if it is one.
    pub fn plain(&self) -> Option<DeliveryAddress> {
        match &self.address {
            Address::Plain(a) => Some(*a),
            Address::Derived(_) => None,
        }
    }

    pub fn is_valid_at(&self, now: u64) -> bool {
        now < self.valid_until
    }
}

/// The kind of network path a transport uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TransportKind {
    Tcp,
    Quic,
}

impl TransportKind {
    /// Which kind a listen address belongs to, if any we offer.
    pub fn of(addr: &Multiaddr) -> Option<Self> {
        use multiaddr::Protocol;
        let mut kind = None;
        for p in addr.iter() {
            match p {
                Protocol::QuicV1 => return Some(Self::Quic),
                Protocol::Tcp(_) => kind = Some(Self::Tcp),
                _ => {}
            }
        }
        kind
    }
}

/// One way to reach one end of a relationship: the receiving service (a
/// libp2p peer and where it listens) and the delivery addresses it resolves
/// to that end, one long-term (for recovery) and one ephemeral (rotated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportInfo {
    pub kind: TransportKind,
    /// The receiving service's libp2p peer id, as bytes.
    pub service: Vec<u8>,
    /// The receiving service's key for derived addresses (see `seal`).
    pub service_key: Option<[u8; 32]>,
    /// Multiaddrs of the receiving service, as bytes.
    pub addrs: Vec<Vec<u8>>,
    pub long_term: AddressLease,
    pub ephemeral: AddressLease,
}

impl TransportInfo {
    pub fn new(
        kind: TransportKind,
        service: PeerId,
        service_key: [u8; 32],
        addrs: &[Multiaddr],
        long_term: AddressLease,
        ephemeral: AddressLease,
    ) -> Self {
        Self {
            kind,
            service: service.to_bytes(),
            service_key: Some(service_key),
            addrs: addrs.iter().map(|a| a.to_vec()).collect(),
            long_term,
            ephemeral,
        }
    }

    pub fn peer_id(&self) -> Result<PeerId, InvalidValue> {
        PeerId::from_bytes(&self.service).map_err(|e| InvalidValue::Malformed {
            what: "service peer id",
            detail: e.to_string(),
        })
    }

    /// The multiaddrs; entries that do not parse are skipped (`validate`
    /// refuses them on the way in).
    pub fn multiaddrs(&self) -> Vec<Multiaddr> {
        self.addrs
            .iter()
            .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
            .collect()
    }

    /// The address to send to now: the ephemeral one while it is valid, else
    /// the long-term one.
    pub fn current_address(&self, now: u64) -> Address {
        if self.ephemeral.is_valid_at(now) {
            self.ephemeral.address.clone()
        } else {
            self.long_term.address.clone()
        }
    }

    pub fn validate(&self) -> Result<(), InvalidValue> {
        self.peer_id()?;
        if self.addrs.len() > MAX_ADDRS_PER_TRANSPORT {
            return Err(InvalidValue::TooLong {
                what: "transport addresses",
                len: self.addrs.len(),
                max: MAX_ADDRS_PER_TRANSPORT,
            });
        }
        for a in &self.addrs {
            if a.len() > MAX_MULTIADDR_BYTES {
                return Err(InvalidValue::TooLong {
                    what: "multiaddr",
                    len: a.len(),
                    max: MAX_MULTIADDR_BYTES,
                });
            }
            Multiaddr::try_from(a.clone()).map_err(|e| InvalidValue::Malformed {
                what: "multiaddr",
                detail: e.to_string(),
            })?;
        }
        Ok(())
    }
}

/// Checks a list of transports offered by a peer.
pub fn validate_transports(transports: &[TransportInfo]) -> Result<(), InvalidValue> {
    if transports.len() < MIN_TRANSPORTS {
        return Err(InvalidValue::TooFewTransports {
            min: MIN_TRANSPORTS,
            got: transports.len(),
        });
    }
    if transports.len() > MAX_TRANSPORTS {
        return Err(InvalidValue::TooLong {
            what: "transports",
            len: transports.len(),
            max: MAX_TRANSPORTS,
        });
    }
    transports.iter().try_for_each(TransportInfo::validate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text() {
        let id = ProtonId::random();
        assert_eq!(id.to_string().parse::<ProtonId>().unwrap(), id);
        assert!("xyz".parse::<ProtonId>().is_err());
        assert!("00".parse::<ProtonId>().is_err());
    }

    #[test]
    fn display_identity_limits() {
        let ok = DisplayIdentity {
            name: "Blair".into(),
            pronouns: Some("she/her".into()),
            picture: Some(Picture::Emoji("🦊".into())),
        };
        assert!(ok.validate().is_ok());
        let long = DisplayIdentity {
            name: "x".repeat(MAX_NAME_CHARS + 1),
            ..ok.clone()
        };
        assert!(long.validate().is_err());
        let control = DisplayIdentity {
            name: "a\u{7}".into(),
            ..ok.clone()
        };
        assert!(control.validate().is_err());
        // What a peer's name may not hide: "Al\u{200b}ex" shows as "Alex".
        for name in [
            "Al\u{200b}ex",
            "\u{202e}evil",
            "\u{3164}",
            "A\u{feff}",
            // Walkthrough: each showed as nothing, or as "AB".
            "\u{200c}",
            "\u{200d}",
            "\u{2800}",
            "\u{17b4}",
            "\u{e0041}",
            "A\u{200d}B",
            "A\u{fe0f}",
            "\u{200f}",
        ] {
            let named = DisplayIdentity {
                name: name.into(),
                ..ok.clone()
            };
            assert!(
                matches!(
                    named.validate(),
                    Err(InvalidValue::ControlCharacters { .. })
                ),
                "{name:?}"
            );
        }
        // What names in some scripts and emoji sequences need stays.
        for name in [
            "\u{5e9}\u{5dc}\u{5d5}\u{5dd}\u{200f}",
            "می\u{200c}خواهم",
            "👩\u{200d}🔬 Ada",
            "❤\u{fe0f} Bo",
            "1\u{fe0f}\u{20e3}",
        ] {
            let named = DisplayIdentity {
                name: name.into(),
                ..ok.clone()
            };
            assert!(named.validate().is_ok(), "{name:?}");
        }
    }

    #[test]
    fn transport_kind_of_listen_addresses() {
        let tcp: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        let quic: Multiaddr = "/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap();
        assert_eq!(TransportKind::of(&tcp), Some(TransportKind::Tcp));
        assert_eq!(TransportKind::of(&quic), Some(TransportKind::Quic));
    }
}
