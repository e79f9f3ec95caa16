//! The delivery protocol's wire types and their encoding.
//!
//! This module owns what travels between nodes and nothing else: no
//! networking, no state. A request is one postcard-encoded batch of
//! [`Envelope`]s; the answer is one [`DeliveryResponse`]:
//!
//! ```text
//!   sender                                   receiver
//!   encode_batch(&[Envelope]) ── frame ──▶  decode_batch(frame)
//!                                             │ per envelope: Stored | Duplicate | Refused(..)
//!   decode_response(bytes) ◀── bytes ─────  encode_response(&DeliveryResponse)
//! ```
//!
//! Every size is bounded on both sides: the sender refuses to build a frame
//! the receiver would refuse, and the receiver checks the same limits before
//! it allocates anything in proportion to what a peer claims. The framing on
//! the stream (a length prefix) belongs to [`crate::codec`].
//!
//! The postcard encoding of these types *is* the wire format: field order and
//! enum variant order must never change. New fields or variants mean a new
//! [`DELIVERY_PROTOCOL`] version. The known-answer tests below pin the bytes.

use std::fmt;
use std::str::FromStr;

use rand::RngCore as _;
use serde::{Deserialize, Serialize};

/// Version carried in every envelope. A receiver answers
/// `Refused(UnsupportedVersion)` for an envelope of a version it does not know.
pub const PROTOCOL_VERSION: u8 = 1;
/// The libp2p protocol name of envelope delivery.
pub const DELIVERY_PROTOCOL: &str = "/protonode/delivery/1";
/// Largest payload of one envelope.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;
/// Most envelopes in one request.
pub const MAX_BATCH_ENVELOPES: usize = 1024;
/// Largest encoded request (one batch).
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
/// Largest encoded response. A full batch of refusals needs about 2 KiB, so
/// this leaves room and still bounds what a sender reads from a receiver.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Length of a delivery address in bytes.
pub const DELIVERY_ADDRESS_BYTES: usize = 32;
/// Longest derived address (see [`DerivedAddress`]).
pub const MAX_DERIVED_ADDRESS_BYTES: usize = 128;

/// Smallest encoded envelope: the version byte, a plain address (its variant
/// byte and 32 bytes) and a one-byte payload length.
const MIN_ENVELOPE_BYTES: usize = 1 + 1 + DELIVERY_ADDRESS_BYTES + 1;

/// Opaque 32 random bytes; a receiving node resolves it to one of its
/// relationships. Says nothing about the sender.
///
/// Shown to people as lowercase base32 without padding (52 characters). Its
/// `Debug` form shows only the first 8 characters so that logs do not carry
/// whole addresses.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeliveryAddress([u8; DELIVERY_ADDRESS_BYTES]);

impl DeliveryAddress {
    /// A fresh address from the operating system's random source, so that it
    /// cannot be guessed.
    pub fn random() -> Self {
        let mut bytes = [0u8; DELIVERY_ADDRESS_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    pub fn from_bytes(bytes: [u8; DELIVERY_ADDRESS_BYTES]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; DELIVERY_ADDRESS_BYTES] {
        &self.0
    }
}

impl fmt::Display for DeliveryAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = data_encoding::BASE32_NOPAD.encode(&self.0);
        f.write_str(&text.to_ascii_lowercase())
    }
}

impl fmt::Debug for DeliveryAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: String = self.to_string().chars().take(8).collect();
        write!(f, "{shown}…")
    }
}

/// Why a string is not a delivery address.
#[derive(Debug, thiserror::Error)]
pub enum AddressParseError {
    #[error("not a delivery address: expected base32 text ({0})")]
    Encoding(#[source] data_encoding::DecodeError),
    #[error("not a delivery address: it holds {len} bytes, not {DELIVERY_ADDRESS_BYTES}")]
    Length { len: usize },
}

impl FromStr for DeliveryAddress {
    type Err = AddressParseError;

    /// Accepts the `Display` form. Upper case is accepted too (it names the
    /// same bytes), which helps when an address was retyped by hand.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let decoded = data_encoding::BASE32_NOPAD
            .decode(s.to_ascii_uppercase().as_bytes())
            .map_err(AddressParseError::Encoding)?;
        let bytes: [u8; DELIVERY_ADDRESS_BYTES] = decoded
            .as_slice()
            .try_into()
            .map_err(|_| AddressParseError::Length { len: decoded.len() })?;
        Ok(Self(bytes))
    }
}

/// An address derived by a third party from one of the receiver's
/// addresses, that only the receiving service can resolve (DESIGN.md
/// "address diversification"): opaque bytes, at most
/// [`MAX_DERIVED_ADDRESS_BYTES`]. What is inside is the receiver's business
/// (protonode seals a long-term address to the service's published key).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DerivedAddress(Vec<u8>);

impl DerivedAddress {
    /// Wraps derived bytes; `None` if they are empty or too long.
    pub fn new(bytes: Vec<u8>) -> Option<Self> {
        (!bytes.is_empty() && bytes.len() <= MAX_DERIVED_ADDRESS_BYTES).then_some(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for DerivedAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DerivedAddress({} bytes)", self.0.len())
    }
}

/// Where an envelope goes: one of the receiver's own addresses, or one
/// derived from it by a third party.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Address {
    Plain(DeliveryAddress),
    Derived(DerivedAddress),
}

impl From<DeliveryAddress> for Address {
    fn from(a: DeliveryAddress) -> Self {
        Address::Plain(a)
    }
}

impl From<DerivedAddress> for Address {
    fn from(a: DerivedAddress) -> Self {
        Address::Derived(a)
    }
}

impl Address {
    /// Bytes this address takes encoded: the variant, then the address.
    fn encoded_len(&self) -> usize {
        1 + match self {
            Address::Plain(_) => DELIVERY_ADDRESS_BYTES,
            Address::Derived(d) => varint_len(d.0.len()) + d.0.len(),
        }
    }
}

/// One message between nodes: protocol version, the recipient's delivery
/// address and an opaque payload. There is no sender field on purpose.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u8,
    pub to: Address,
    pub payload: Vec<u8>,
}

impl Envelope {
    /// An envelope of the current [`PROTOCOL_VERSION`].
    pub fn new(to: impl Into<Address>, payload: Vec<u8>) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            to: to.into(),
            payload,
        }
    }

    /// Bytes this envelope takes in an encoded batch.
    pub fn encoded_len(&self) -> usize {
        1 + self.to.encoded_len() + varint_len(self.payload.len()) + self.payload.len()
    }
}

/// An envelope as decoded straight from a frame, its payload borrowed.
///
/// Postcard encodes a `Vec<u8>` (a sequence of bytes) and a `&[u8]` (bytes)
/// identically: a varint length, then the bytes. Decoding through this type
/// lets [`decode_batch`] check a payload's length before copying it.
#[derive(Deserialize)]
struct EnvelopeRef<'a> {
    version: u8,
    to: AddressRef<'a>,
    #[serde(borrow)]
    payload: &'a [u8],
}

/// An address as decoded from a frame, a derived one borrowed so that its
/// length is checked before it is copied. Same encoding as [`Address`].
#[derive(Deserialize)]
enum AddressRef<'a> {
    Plain(DeliveryAddress),
    Derived(#[serde(borrow)] &'a [u8]),
}

/// The receiver's answer for one envelope.
///
/// `Stored` and `Duplicate` both mean "durably held by the receiver": the
/// sender may drop the envelope from its outbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Receipt {
    Stored,
    Duplicate,
    Refused(Refusal),
}

impl Receipt {
    /// Whether the receiver now holds the envelope, so the sender may forget it.
    pub fn is_held(&self) -> bool {
        matches!(self, Receipt::Stored | Receipt::Duplicate)
    }
}

/// Why a receiver refused an envelope or a whole frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The address resolves to nothing here. This is the one answer for every
    /// address the node cannot resolve (never existed, expired, used up), so
    /// that it reveals nothing about which addresses once existed.
    UnknownAddress,
    /// The bytes are not a valid batch or envelope.
    Malformed,
    /// A payload or the frame is over its size limit.
    TooLarge,
    /// More envelopes than [`MAX_BATCH_ENVELOPES`].
    TooMany,
    /// The envelope's version is not one this node speaks.
    UnsupportedVersion,
    /// The receiver cannot take it now (busy, shutting down, storage
    /// failing). Retry later.
    Unavailable,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::UnknownAddress => "unknown delivery address",
            Refusal::Malformed => "malformed request",
            Refusal::TooLarge => "over the size limit",
            Refusal::TooMany => "too many envelopes in one request",
            Refusal::UnsupportedVersion => "unsupported protocol version",
            Refusal::Unavailable => "receiver unavailable, retry later",
        })
    }
}

/// The answer to one delivery request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryResponse {
    /// One receipt per envelope, in the order of the request.
    Receipts(Vec<Receipt>),
    /// The whole frame was refused; no envelope in it was looked at.
    Rejected(Refusal),
}

/// What is wrong with a batch or response being encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("a delivery request must hold at least one envelope")]
    Empty,
    #[error("{count} envelopes in one request; at most {MAX_BATCH_ENVELOPES} are allowed, split the batch")]
    TooMany { count: usize },
    #[error("an envelope payload of {size} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit")]
    PayloadTooLarge { size: usize },
    #[error("an encoded message of {size} bytes is over its size limit, split the batch")]
    FrameTooLarge { size: usize },
    #[error("the bytes are not a valid message: {0}")]
    Malformed(#[source] postcard::Error),
    #[error("{count} unexpected bytes after the end of the message")]
    TrailingBytes { count: usize },
    #[error("a derived address of {len} bytes (1 to {MAX_DERIVED_ADDRESS_BYTES} allowed)")]
    BadAddress { len: usize },
}

impl WireError {
    /// The refusal a receiver answers with when it meets this error.
    pub fn refusal(&self) -> Refusal {
        match self {
            WireError::Empty
            | WireError::Malformed(_)
            | WireError::TrailingBytes { .. }
            | WireError::BadAddress { .. } => Refusal::Malformed,
            WireError::TooMany { .. } => Refusal::TooMany,
            WireError::PayloadTooLarge { .. } | WireError::FrameTooLarge { .. } => {
                Refusal::TooLarge
            }
        }
    }
}

/// Bytes that `envelopes` take as one encoded batch, for a sender that fills
/// batches up to [`MAX_FRAME_BYTES`].
pub fn encoded_batch_len(envelopes: &[Envelope]) -> usize {
    varint_len(envelopes.len()) + envelopes.iter().map(Envelope::encoded_len).sum::<usize>()
}

/// Encodes a batch for one delivery request, refusing what the receiver would
/// refuse: no envelopes, more than [`MAX_BATCH_ENVELOPES`], a payload over
/// [`MAX_PAYLOAD_BYTES`], or a frame over [`MAX_FRAME_BYTES`]. The limits are
/// checked before anything is encoded.
pub fn encode_batch(envelopes: &[Envelope]) -> Result<Vec<u8>, WireError> {
    check_count(envelopes.len())?;
    if let Some(big) = envelopes
        .iter()
        .find(|e| e.payload.len() > MAX_PAYLOAD_BYTES)
    {
        return Err(WireError::PayloadTooLarge {
            size: big.payload.len(),
        });
    }
    let size = encoded_batch_len(envelopes);
    if size > MAX_FRAME_BYTES {
        return Err(WireError::FrameTooLarge { size });
    }
    // Postcard cannot fail on these types; the error is mapped, not assumed away.
    let frame = postcard::to_stdvec(envelopes).map_err(WireError::Malformed)?;
    debug_assert_eq!(frame.len(), size, "encoded_batch_len must match postcard");
    Ok(frame)
}

/// Decodes one delivery request from untrusted bytes.
///
/// Never panics. Checks the same limits as [`encode_batch`], each before it
/// allocates for it: the envelope count is read and checked first, and each
/// payload is checked while still borrowed from `frame`. So memory use is
/// bounded by `frame.len()` whatever lengths the frame claims. Trailing bytes
/// are refused. Envelope versions are *not* checked here: the receiver
/// answers `Refused(UnsupportedVersion)` per envelope.
pub fn decode_batch(frame: &[u8]) -> Result<Vec<Envelope>, WireError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(WireError::FrameTooLarge { size: frame.len() });
    }
    // A sequence's length is a varint of a usize, which on the wire is the
    // same as a varint u64 (the known-answer test pins this).
    let (declared, mut rest) =
        postcard::take_from_bytes::<u64>(frame).map_err(WireError::Malformed)?;
    let count = usize::try_from(declared).unwrap_or(usize::MAX);
    check_count(count)?;
    // Reserve only for envelopes the frame can actually hold, not for the
    // count it claims.
    let mut envelopes = Vec::with_capacity(count.min(rest.len() / MIN_ENVELOPE_BYTES));
    for _ in 0..count {
        let (envelope, after) =
            postcard::take_from_bytes::<EnvelopeRef<'_>>(rest).map_err(WireError::Malformed)?;
        if envelope.payload.len() > MAX_PAYLOAD_BYTES {
            return Err(WireError::PayloadTooLarge {
                size: envelope.payload.len(),
            });
        }
        let to = match envelope.to {
            AddressRef::Plain(a) => Address::Plain(a),
            AddressRef::Derived(bytes) => Address::Derived(
                DerivedAddress::new(bytes.to_vec())
                    .ok_or(WireError::BadAddress { len: bytes.len() })?,
            ),
        };
        envelopes.push(Envelope {
            version: envelope.version,
            to,
            payload: envelope.payload.to_vec(),
        });
        rest = after;
    }
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes { count: rest.len() });
    }
    Ok(envelopes)
}

/// Encodes a response, refusing one the sender would refuse to read.
pub fn encode_response(response: &DeliveryResponse) -> Result<Vec<u8>, WireError> {
    if let DeliveryResponse::Receipts(receipts) = response {
        if receipts.len() > MAX_BATCH_ENVELOPES {
            return Err(WireError::TooMany {
                count: receipts.len(),
            });
        }
    }
    let bytes = postcard::to_stdvec(response).map_err(WireError::Malformed)?;
    if bytes.len() > MAX_RESPONSE_BYTES {
        return Err(WireError::FrameTooLarge { size: bytes.len() });
    }
    Ok(bytes)
}

/// Decodes a response from untrusted bytes. Never panics; like
/// [`decode_batch`] it reads and checks the receipt count before allocating
/// for it, so memory is bounded by `bytes.len()`.
pub fn decode_response(bytes: &[u8]) -> Result<DeliveryResponse, WireError> {
    if bytes.len() > MAX_RESPONSE_BYTES {
        return Err(WireError::FrameTooLarge { size: bytes.len() });
    }
    let (head, mut rest) =
        postcard::take_from_bytes::<ResponseHead>(bytes).map_err(WireError::Malformed)?;
    let response = match head {
        ResponseHead::Rejected(refusal) => DeliveryResponse::Rejected(refusal),
        ResponseHead::Receipts(declared) => {
            let count = usize::try_from(declared).unwrap_or(usize::MAX);
            if count > MAX_BATCH_ENVELOPES {
                return Err(WireError::TooMany { count });
            }
            // Every receipt takes at least one byte.
            let mut receipts = Vec::with_capacity(count.min(rest.len()));
            for _ in 0..count {
                let (receipt, after) =
                    postcard::take_from_bytes::<Receipt>(rest).map_err(WireError::Malformed)?;
                receipts.push(receipt);
                rest = after;
            }
            DeliveryResponse::Receipts(receipts)
        }
    };
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes { count: rest.len() });
    }
    Ok(response)
}

/// The start of an encoded [`DeliveryResponse`]: its variant, and for
/// `Receipts` only the count. Postcard writes an enum as its variant index
/// followed by the variant's content, and a sequence as its length followed by
/// the items, so this reads exactly the bytes before the first receipt. The
/// variants must stay in the order of [`DeliveryResponse`]'s.
#[derive(Deserialize)]
enum ResponseHead {
    Receipts(u64),
    Rejected(Refusal),
}

fn check_count(count: usize) -> Result<(), WireError> {
    match count {
        0 => Err(WireError::Empty),
        n if n > MAX_BATCH_ENVELOPES => Err(WireError::TooMany { count: n }),
        _ => Ok(()),
    }
}

/// Bytes postcard's varint (7 bits per byte) takes for `n`.
fn varint_len(n: usize) -> usize {
    let bits = usize::BITS - n.leading_zeros();
    (bits.max(1) as usize).div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn address(fill: u8) -> DeliveryAddress {
        DeliveryAddress::from_bytes([fill; 32])
    }

    fn sample_batch() -> Vec<Envelope> {
        vec![
            Envelope::new(address(1), b"hello".to_vec()),
            Envelope::new(address(2), vec![]),
            Envelope::new(DeliveryAddress::random(), vec![7; 300]),
        ]
    }

    /// Postcard's varint of `n`, written by hand so tests can build frames
    /// that claim anything.
    fn varint(mut n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    /// One envelope encoded by hand: version, address, payload length, payload.
    fn raw_envelope(payload_len: usize) -> Vec<u8> {
        let mut out = vec![PROTOCOL_VERSION, 0x00]; // version; a plain address
        out.extend_from_slice(&[9; 32]);
        out.extend(varint(payload_len as u64));
        out.extend(std::iter::repeat_n(0xab, payload_len));
        out
    }

    #[test]
    fn a_batch_survives_the_round_trip() {
        let batch = sample_batch();
        let frame = encode_batch(&batch).unwrap();
        assert_eq!(frame.len(), encoded_batch_len(&batch));
        assert_eq!(decode_batch(&frame).unwrap(), batch);
    }

    #[test]
    fn the_batch_format_is_pinned() {
        let batch = [Envelope::new(address(0xaa), vec![1, 2, 3])];
        let frame = encode_batch(&batch).unwrap();
        let mut expected = vec![0x01, 0x01, 0x00]; // one envelope; version 1; a plain address
        expected.extend_from_slice(&[0xaa; 32]); // address
        expected.extend_from_slice(&[0x03, 1, 2, 3]); // payload length, payload
        assert_eq!(frame, expected);

        let derived = DerivedAddress::new(vec![0xbb; 5]).unwrap();
        let batch = [Envelope::new(derived, vec![9])];
        let frame = encode_batch(&batch).unwrap();
        // one envelope; version 1; a derived address of 5 bytes; payload
        assert_eq!(
            frame,
            [0x01, 0x01, 0x01, 0x05, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0x01, 0x09]
        );
        assert_eq!(frame.len(), encoded_batch_len(&batch));
        assert_eq!(decode_batch(&frame).unwrap(), batch);
    }

    #[test]
    fn a_derived_address_over_the_limit_is_refused() {
        assert!(DerivedAddress::new(vec![1; MAX_DERIVED_ADDRESS_BYTES + 1]).is_none());
        assert!(DerivedAddress::new(Vec::new()).is_none());
        let mut frame = vec![0x01, 0x01, 0x01];
        frame.extend(varint(MAX_DERIVED_ADDRESS_BYTES as u64 + 1));
        frame.extend(vec![0xcc; MAX_DERIVED_ADDRESS_BYTES + 1]);
        frame.extend([0x00]);
        let err = decode_batch(&frame).unwrap_err();
        assert!(matches!(err, WireError::BadAddress { .. }), "{err}");
        assert_eq!(err.refusal(), Refusal::Malformed);
    }

    #[test]
    fn the_response_format_is_pinned() {
        let receipts = DeliveryResponse::Receipts(vec![
            Receipt::Stored,
            Receipt::Duplicate,
            Receipt::Refused(Refusal::UnknownAddress),
            Receipt::Refused(Refusal::Unavailable),
        ]);
        assert_eq!(
            encode_response(&receipts).unwrap(),
            [0x00, 0x04, 0x00, 0x01, 0x02, 0x00, 0x02, 0x05]
        );
        let rejected = DeliveryResponse::Rejected(Refusal::TooLarge);
        assert_eq!(encode_response(&rejected).unwrap(), [0x01, 0x02]);
        for response in [receipts, rejected] {
            let bytes = encode_response(&response).unwrap();
            assert_eq!(decode_response(&bytes).unwrap(), response);
        }
    }

    #[test]
    fn encoded_length_matches_postcard_across_varint_boundaries() {
        for len in [0, 1, 127, 128, 16_383, 16_384, MAX_PAYLOAD_BYTES] {
            let batch = [Envelope::new(address(3), vec![0; len])];
            let frame = postcard::to_stdvec(&batch[..]).unwrap();
            assert_eq!(encoded_batch_len(&batch), frame.len(), "payload {len}");
        }
    }

    #[test]
    fn an_empty_batch_is_refused_both_ways() {
        assert!(matches!(encode_batch(&[]), Err(WireError::Empty)));
        let err = decode_batch(&[0x00]).unwrap_err();
        assert!(matches!(err, WireError::Empty));
        assert_eq!(err.refusal(), Refusal::Malformed);
    }

    #[test]
    fn too_many_envelopes_are_refused_both_ways() {
        let batch = vec![Envelope::new(address(4), vec![]); MAX_BATCH_ENVELOPES + 1];
        assert!(matches!(
            encode_batch(&batch),
            Err(WireError::TooMany { count }) if count == MAX_BATCH_ENVELOPES + 1
        ));
        // The count alone decides: the receiver refuses before reading any envelope.
        let frame = varint(MAX_BATCH_ENVELOPES as u64 + 1);
        let err = decode_batch(&frame).unwrap_err();
        assert!(matches!(err, WireError::TooMany { .. }), "{err}");
        assert_eq!(err.refusal(), Refusal::TooMany);
        // And a full batch is fine.
        let full = vec![Envelope::new(address(4), vec![]); MAX_BATCH_ENVELOPES];
        assert_eq!(decode_batch(&encode_batch(&full).unwrap()).unwrap(), full);
    }

    #[test]
    fn an_oversize_payload_is_refused_both_ways() {
        let batch = [Envelope::new(address(5), vec![0; MAX_PAYLOAD_BYTES + 1])];
        assert!(matches!(
            encode_batch(&batch),
            Err(WireError::PayloadTooLarge { size }) if size == MAX_PAYLOAD_BYTES + 1
        ));
        let mut frame = varint(1);
        frame.extend(raw_envelope(MAX_PAYLOAD_BYTES + 1));
        let err = decode_batch(&frame).unwrap_err();
        assert!(matches!(err, WireError::PayloadTooLarge { .. }), "{err}");
        assert_eq!(err.refusal(), Refusal::TooLarge);
    }

    #[test]
    fn an_oversize_frame_is_refused_both_ways() {
        // 17 payloads at the limit: each fine, together over 4 MiB.
        let batch = vec![Envelope::new(address(6), vec![0; MAX_PAYLOAD_BYTES]); 17];
        assert!(matches!(
            encode_batch(&batch),
            Err(WireError::FrameTooLarge { .. })
        ));
        let frame = vec![0u8; MAX_FRAME_BYTES + 1];
        let err = decode_batch(&frame).unwrap_err();
        assert!(matches!(err, WireError::FrameTooLarge { .. }), "{err}");
        assert_eq!(err.refusal(), Refusal::TooLarge);
    }

    #[test]
    fn truncated_frames_are_malformed() {
        let frame = encode_batch(&sample_batch()).unwrap();
        for cut in 0..frame.len() {
            let err = decode_batch(&frame[..cut]).unwrap_err();
            assert_eq!(err.refusal(), Refusal::Malformed, "cut at {cut}: {err}");
        }
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut frame = encode_batch(&sample_batch()).unwrap();
        frame.push(0);
        let err = decode_batch(&frame).unwrap_err();
        assert!(
            matches!(err, WireError::TrailingBytes { count: 1 }),
            "{err}"
        );
        assert_eq!(err.refusal(), Refusal::Malformed);

        let mut response =
            encode_response(&DeliveryResponse::Receipts(vec![Receipt::Stored])).unwrap();
        response.push(0);
        assert!(matches!(
            decode_response(&response),
            Err(WireError::TrailingBytes { count: 1 })
        ));
    }

    #[test]
    fn envelope_versions_are_left_to_the_receiver() {
        let mut envelope = Envelope::new(address(7), b"from the future".to_vec());
        envelope.version = 200;
        let frame = encode_batch(std::slice::from_ref(&envelope)).unwrap();
        assert_eq!(decode_batch(&frame).unwrap(), vec![envelope]);
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for _ in 0..20_000 {
            let len = rng.gen_range(0..200);
            let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let _ = decode_batch(&bytes);
            let _ = decode_response(&bytes);
        }
    }

    #[test]
    fn mutated_valid_frames_never_panic_and_stay_within_limits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xf11b);
        let frame = encode_batch(&sample_batch()).unwrap();
        for _ in 0..20_000 {
            let mut bytes = frame.clone();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..bytes.len());
                bytes[i] = rng.gen();
            }
            if let Ok(envelopes) = decode_batch(&bytes) {
                assert!((1..=MAX_BATCH_ENVELOPES).contains(&envelopes.len()));
                assert!(envelopes
                    .iter()
                    .all(|e| e.payload.len() <= MAX_PAYLOAD_BYTES));
            }
        }
    }

    #[test]
    fn malformed_responses_are_refused() {
        // An unknown variant, a bad varint, and nothing at all.
        for bytes in [
            &[0x07][..],
            &[
                0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
            &[],
        ] {
            assert!(matches!(
                decode_response(bytes),
                Err(WireError::Malformed(_))
            ));
        }
        // More receipts than a batch can hold.
        let mut bytes = vec![0x00];
        bytes.extend(varint(MAX_BATCH_ENVELOPES as u64 + 1));
        bytes.extend(std::iter::repeat_n(0x00, MAX_BATCH_ENVELOPES + 1));
        assert!(matches!(
            decode_response(&bytes),
            Err(WireError::TooMany { .. })
        ));
    }

    #[test]
    fn an_address_reads_back_from_its_text() {
        let addr = DeliveryAddress::random();
        let text = addr.to_string();
        assert_eq!(text.len(), 52);
        assert_eq!(text, text.to_ascii_lowercase());
        assert_eq!(text.parse::<DeliveryAddress>().unwrap(), addr);
        assert_eq!(
            text.to_ascii_uppercase()
                .parse::<DeliveryAddress>()
                .unwrap(),
            addr
        );
    }

    #[test]
    fn bad_address_text_is_refused() {
        let good = DeliveryAddress::random().to_string();
        let cases = [
            String::new(),
            "not base32!".to_string(),
            good[..51].to_string(),         // one character short
            format!("{good}aa"),            // too long
            "mfrgg".to_string(),            // valid base32 of 3 bytes
            format!("{}1", &good[..51]),    // '1' is not in the alphabet
            format!("{}====", &good[..52]), // padding is not our form
        ];
        for case in cases {
            assert!(case.parse::<DeliveryAddress>().is_err(), "{case:?}");
        }
        assert!(matches!(
            "mfrgg".parse::<DeliveryAddress>(),
            Err(AddressParseError::Length { len: 3 })
        ));
    }

    #[test]
    fn an_address_debug_form_hides_most_of_it() {
        let addr = DeliveryAddress::random();
        let debug = format!("{addr:?}");
        assert_eq!(debug, format!("{}…", &addr.to_string()[..8]));
    }

    #[test]
    fn varint_lengths_match_postcard() {
        for n in [
            0usize,
            1,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            usize::MAX,
        ] {
            assert_eq!(varint_len(n), postcard::to_stdvec(&n).unwrap().len(), "{n}");
        }
    }
}
