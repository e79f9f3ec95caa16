//! The checks behind the fuzz targets: one function per decoder of untrusted
//! bytes. Every check returns for any input (a decoder's error is a fine
//! answer) and panics only when the decoder panics or breaks a property it
//! promises: what it accepts respects the size limits, and what it accepts
//! encodes to bytes that decode to the same value.
//!
//! This file is shared: the fuzz crate compiles it as `protonode_fuzz::checks`
//! and `tests/tests/fuzz_regressions.rs` includes it with `#[path]`, so the
//! saved crashing inputs are replayed on stable through these very functions.
//! It may therefore use only what both crates depend on: `actors`,
//! `transports`, `protonode`, `serde_json`, `tempfile` and std. Where a
//! decoder needs more (openmls's crypto provider to decode a key package),
//! the caller passes that step in.
//!
//! Fixtures ([`TicketFixture`], [`MlsFixture`]) are built once per process;
//! a check leaves them as it found them, so every input is judged alone.

use std::time::Duration;

use actors::attestation::Attestation;
use actors::identity::{IdentityKey, Ipk};
use actors::mls::{self, Incoming, MlsError, Provider};
use actors::model::{
    DisplayIdentity, MessageId, TransportInfo, MAX_ADDRS_PER_TRANSPORT, MAX_MULTIADDR_BYTES,
    MAX_NAME_CHARS, MAX_TEXT_BYTES, MAX_TRANSPORTS, MIN_TRANSPORTS,
};
use actors::protocol::{Body, Payload, Plaintext, MAX_PLAINTEXT_BYTES};
use actors::relationship::{accept_invite, Lifetimes, NodeAddrs};
use actors::store::Store;
use protonode::control::{self, codes};
use transports::{DeliveryResponse, MAX_BATCH_ENVELOPES, MAX_PAYLOAD_BYTES, MAX_RESPONSE_BYTES};

/// `transports::decode_batch` and `transports::decode_response`.
pub fn envelope_batch(data: &[u8]) {
    if let Ok(envelopes) = transports::decode_batch(data) {
        assert!((1..=MAX_BATCH_ENVELOPES).contains(&envelopes.len()));
        assert!(envelopes
            .iter()
            .all(|e| e.payload.len() <= MAX_PAYLOAD_BYTES));
        let frame = transports::encode_batch(&envelopes).expect("a decoded batch encodes");
        assert_eq!(frame.len(), transports::encoded_batch_len(&envelopes));
        // The encoding is the shortest one, so never longer than what was read.
        assert!(frame.len() <= data.len());
        assert_eq!(
            transports::decode_batch(&frame).expect("an encoded batch decodes"),
            envelopes
        );
    }
    if let Ok(response) = transports::decode_response(data) {
        if let DeliveryResponse::Receipts(receipts) = &response {
            assert!(receipts.len() <= MAX_BATCH_ENVELOPES);
        }
        let bytes = transports::encode_response(&response).expect("a decoded response encodes");
        assert!(bytes.len() <= data.len() && bytes.len() <= MAX_RESPONSE_BYTES);
        assert_eq!(
            transports::decode_response(&bytes).expect("an encoded response decodes"),
            response
        );
    }
}

/// `Payload::decode` and `Plaintext::decode`.
pub fn payload(data: &[u8]) {
    if let Ok(payload) = Payload::decode(data) {
        assert!(data.len() <= MAX_PAYLOAD_BYTES);
        let bytes = payload.encode();
        assert!(bytes.len() <= data.len());
        assert_eq!(Payload::decode(&bytes), Ok(payload));
    }
    if let Ok(plaintext) = Plaintext::decode(data) {
        assert!(data.len() <= MAX_PLAINTEXT_BYTES);
        match &plaintext.body {
            Body::Hello {
                display,
                transports,
                ..
            } => {
                assert_display_within_limits(display);
                assert_transports_within_limits(transports);
            }
            Body::Text { text, .. } => assert!(!text.is_empty() && text.len() <= MAX_TEXT_BYTES),
            Body::MemberInfo(info) => {
                assert_display_within_limits(&info.display);
                assert_transports_within_limits(&info.transports);
            }
            Body::Introduction(introduction) => {
                assert_transports_within_limits(&introduction.introducer.transports);
                assert_transports_within_limits(&introduction.your_transports);
                assert!(introduction.members.len() <= actors::protocol::MAX_MEMBERS);
            }
            _ => {}
        }
        if let Some(transports) = &plaintext.transports {
            assert_transports_within_limits(transports);
        }
        let bytes = plaintext.encode();
        assert!(bytes.len() <= data.len());
        assert_eq!(Plaintext::decode(&bytes), Ok(plaintext));
    }
}

fn assert_display_within_limits(display: &DisplayIdentity) {
    let name = display.name.chars().count();
    assert!((1..=MAX_NAME_CHARS).contains(&name), "name of {name} chars");
}

fn assert_transports_within_limits(transports: &[TransportInfo]) {
    assert!((MIN_TRANSPORTS..=MAX_TRANSPORTS).contains(&transports.len()));
    for t in transports {
        assert!(t.peer_id().is_ok());
        assert!(t.addrs.len() <= MAX_ADDRS_PER_TRANSPORT);
        assert!(t.addrs.iter().all(|a| a.len() <= MAX_MULTIADDR_BYTES));
        assert_eq!(t.multiaddrs().len(), t.addrs.len(), "every address parses");
    }
}

/// Attestations signed by fixed keys: the only ones any input may carry
/// that verify. The fuzz seeds are these, so the fuzzer starts from valid
/// signatures; an input that verifies and is not one of them is a forgery.
pub fn known_attestations() -> Vec<Attestation> {
    let key = |fill: u8| IdentityKey::from_secret(&[fill; 32]);
    let (a, b, c) = (key(1), key(2), key(3));
    vec![
        Attestation::follows(&a, &b, 1_700_000_000_000),
        Attestation::follows(&b, &c, 7),
        Attestation::equivalent(&a, &c, 1_700_000_000_000),
    ]
}

/// Postcard-decoding an [`Attestation`] (what `actors::store::decode` does,
/// `postcard::from_bytes`), then `verify`.
pub fn attestation(data: &[u8], known: &[Attestation]) {
    let Ok(attestation) = actors::store::decode::<Attestation>(data, "attestation") else {
        return;
    };
    let bytes = actors::store::encode(&attestation, "attestation").expect("an attestation encodes");
    assert!(bytes.len() <= data.len());
    let again: Attestation =
        actors::store::decode(&bytes, "attestation").expect("an encoded attestation decodes");
    assert_eq!(again, attestation);
    if attestation.verify().is_ok() {
        assert!(
            known.contains(&attestation),
            "an attestation nobody signed verifies: {attestation:?}"
        );
    }
}

/// `protonode::control::parse_request`, the control socket's request parser.
pub fn control_request(data: &[u8]) {
    match control::parse_request(data) {
        Ok((id, call)) => {
            // The call written back as a request line reads the same.
            let mut request = serde_json::to_value(&call).expect("a call serialises");
            request["jsonrpc"] = "2.0".into();
            request["id"] = id.clone();
            let line = request.to_string();
            assert_eq!(
                control::parse_request(line.as_bytes()),
                Ok((id, call)),
                "{line}"
            );
        }
        Err((id, error)) => {
            let expected = [
                codes::PARSE_ERROR,
                codes::INVALID_REQUEST,
                codes::METHOD_NOT_FOUND,
                codes::INVALID_PARAMS,
            ];
            assert!(expected.contains(&error.code), "{error:?}");
            if error.code == codes::PARSE_ERROR {
                assert_eq!(id, serde_json::Value::Null);
            }
            // The error answer is always writable.
            serde_json::to_string(&error).expect("an error serialises");
        }
    }
}

/// The texts a ticket input stands for: the bytes themselves when they are
/// UTF-8, and the bytes as a ticket body (`protonode:` and base64url), so
/// that the fuzzer reaches the postcard decoder behind the text encoding.
pub fn ticket_texts(data: &[u8]) -> Vec<String> {
    let mut texts = Vec::with_capacity(2);
    if let Ok(text) = std::str::from_utf8(data) {
        texts.push(text.to_owned());
    }
    texts.push(format!("{}{}", actors::ticket::PREFIX, base64url(data)));
    texts
}

/// Base64url without padding, the ticket body's encoding (written out here
/// because the regression test cannot depend on `data-encoding`; the fuzz
/// target checks it against `data-encoding`).
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let bits = chunk
            .iter()
            .fold(0u32, |bits, byte| bits << 8 | u32::from(*byte))
            << (8 * (3 - chunk.len()));
        // n bytes carry n + 1 characters' worth of bits.
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(bits >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// Lifetimes of the addresses an acceptance makes; any will do.
pub const LIFETIMES: Lifetimes = Lifetimes {
    ephemeral: Duration::from_secs(3600),
    long_term: Duration::from_secs(365 * 24 * 3600),
};

/// The clock of every acceptance: early, so that no ticket has expired and
/// the fuzzer gets past the expiry check.
const ACCEPT_AT: u64 = 1_000;

/// A node that accepts tickets: a store (never written to: an acceptance
/// only computes its changes) and the addresses it offers.
pub struct TicketFixture {
    _dir: tempfile::TempDir,
    pub store: Store,
    pub node: NodeAddrs,
}

impl TicketFixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Store::open(&dir.path().join("db")).expect("a fresh store opens");
        Self {
            _dir: dir,
            store,
            node: node_addrs(),
        }
    }
}

impl Default for TicketFixture {
    fn default() -> Self {
        Self::new()
    }
}

/// A node listening on TCP and QUIC on loopback.
pub fn node_addrs() -> NodeAddrs {
    NodeAddrs {
        peer: transports::PeerId::random(),
        addrs: ["/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/udp/4001/quic-v1"]
            .iter()
            .map(|a| a.parse().expect("a constant multiaddr parses"))
            .collect(),
        service_key: actors::seal::SealKey::generate().public(),
    }
}

fn display(name: &str) -> DisplayIdentity {
    DisplayIdentity {
        name: name.into(),
        pronouns: None,
        picture: None,
    }
}

/// `accept_invite`, whose first step is `Ticket::parse` with openmls's
/// RustCrypto: what the daemon does with a ticket someone pastes. Returns
/// whether the ticket was accepted.
pub fn ticket_acceptance(fixture: &TicketFixture, text: &str) -> bool {
    let Ok(acceptance) = accept_invite(
        &fixture.store,
        &fixture.node,
        display("Blair"),
        LIFETIMES,
        text,
        None,
        ACCEPT_AT,
    ) else {
        return false;
    };
    assert!(acceptance.proton.peer_display.validate().is_ok());
    assert_transports_within_limits(&acceptance.proton.peer_transports);
    let [answer] = acceptance.changes.outbox.as_slice() else {
        panic!("an acceptance queues exactly one answer");
    };
    assert!(answer.payload.len() <= MAX_PAYLOAD_BYTES);
    assert!(matches!(
        Payload::decode(&answer.payload),
        Ok(Payload::Welcome { .. })
    ));
    true
}

/// What an [`MlsFixture`] input asks for (see [`mls_message`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlsStep {
    /// `mls::process` into Alex's group.
    Process,
    /// `mls::join_from_welcome` with Carol's key package in storage.
    Join,
    /// Decoding and validating a key package.
    KeyPackage,
}

/// How an [`MlsFixture`] input is built from the fuzzer's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlsEdit {
    /// The bytes as they are.
    Raw,
    /// A valid input of the fixture with the bytes written over it at an offset.
    Overwrite,
    /// ... with the bytes XORed into it at an offset.
    Xor,
    /// ... cut at an offset, the bytes appended.
    Truncate,
    /// ... with the bytes inserted at an offset.
    Insert,
}

const MLS_STEPS: [MlsStep; 3] = [MlsStep::Process, MlsStep::Join, MlsStep::KeyPackage];
const MLS_EDITS: [MlsEdit; 5] = [
    MlsEdit::Raw,
    MlsEdit::Overwrite,
    MlsEdit::Xor,
    MlsEdit::Truncate,
    MlsEdit::Insert,
];

/// The header byte of an [`MlsFixture`] input.
pub fn mls_header(step: MlsStep, edit: MlsEdit) -> u8 {
    let step = MLS_STEPS.iter().position(|s| *s == step).unwrap_or(0);
    let edit = MLS_EDITS.iter().position(|e| *e == edit).unwrap_or(0);
    (edit * MLS_STEPS.len() + step) as u8
}

/// One MLS step of a fixture member on an input. A closure, so that the
/// member's openmls group is held without naming openmls's types, which the
/// regression test cannot (it does not depend on openmls).
type Step<T> = Box<dyn FnMut(&[u8]) -> Result<T, MlsError>>;

/// A real 2-member MLS group, built once, and valid MLS inputs of it.
///
/// Blair made the group and added Alex; Alex joined from the Welcome. Then
/// Blair sent application messages, and last added Carol (a commit for Alex,
/// a Welcome for Carol). Inputs are processed by Alex and joined by Carol;
/// after each, their pending writes are dropped and Alex's group reloaded
/// from the store, so every input meets the same state.
///
/// The group's keys are random, so a valid message of one run is garbage to
/// the next: inputs that edit a valid message ([`MlsEdit`]) name it by its
/// index, which finds the same kind of message in every run.
pub struct MlsFixture {
    _dir: tempfile::TempDir,
    process: Step<Incoming>,
    join: Step<Vec<Ipk>>,
    blair: Ipk,
    carol: Ipk,
    /// Messages for Alex: Blair's application messages, then the commit that adds Carol.
    pub messages: Vec<Vec<u8>>,
    /// The Welcome that adds Carol.
    pub welcomes: Vec<Vec<u8>>,
    /// Alex's and Carol's key packages.
    pub key_packages: Vec<Vec<u8>>,
}

impl MlsFixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Store::open(&dir.path().join("db")).expect("a fresh store opens");
        let commit = |provider: &Provider| {
            let writes = provider.mls_storage().take_writes();
            store
                .write_blocking(|tx| mls::apply_writes(tx, &writes))
                .expect("the fixture's writes commit");
        };
        let (alex, blair, carol) = (
            IdentityKey::from_secret(&[0xa1; 32]),
            IdentityKey::from_secret(&[0xb1; 32]),
            IdentityKey::from_secret(&[0xc1; 32]),
        );
        let alex_p = Provider::new(store.clone(), *b"alex\0\0\0\0");
        let blair_p = Provider::new(store.clone(), *b"blair\0\0\0");
        let carol_p = Provider::new(store.clone(), *b"carol\0\0\0");
        let fixture = "the MLS fixture builds";

        let alex_kp = mls::new_key_package(&alex_p, &alex).expect(fixture);
        commit(&alex_p);
        let carol_kp = mls::new_key_package(&carol_p, &carol).expect(fixture);
        commit(&carol_p);
        let key_packages = vec![
            mls::encode_key_package(alex_kp.key_package()).expect(fixture),
            mls::encode_key_package(carol_kp.key_package()).expect(fixture),
        ];

        let mut blair_group = mls::create_group(&blair_p, &blair).expect(fixture);
        let (_, welcome) = mls::add_members(
            &mut blair_group,
            &blair_p,
            &blair,
            &[alex_kp.key_package().clone()],
        )
        .expect(fixture);
        commit(&blair_p);
        let alex_group = mls::join_from_welcome(&alex_p, &welcome).expect(fixture);
        commit(&alex_p);

        let texts = [
            Body::Text {
                id: MessageId([7; 16]),
                text: "hello Alex".into(),
                sent_at: 1_700_000_000_000,
            },
            Body::Transports,
        ];
        let mut messages: Vec<Vec<u8>> = texts
            .into_iter()
            .map(|body| {
                let plaintext = Plaintext {
                    body,
                    transports: None,
                };
                mls::encrypt(&mut blair_group, &blair_p, &blair, &plaintext.encode())
                    .expect(fixture)
            })
            .collect();
        let (add_carol, welcome_carol) = mls::add_members(
            &mut blair_group,
            &blair_p,
            &blair,
            &[carol_kp.key_package().clone()],
        )
        .expect(fixture);
        commit(&blair_p);
        messages.push(add_carol);

        let mut group = alex_group;
        let group_id = group.group_id().clone();
        let process = move |bytes: &[u8]| {
            let result = mls::process(&mut group, &alex_p, bytes);
            // Bytes that are no MLS message leave the group untouched; for
            // anything else, drop what processing wrote or changed.
            if !matches!(result, Err(MlsError::Decode(_))) {
                alex_p.mls_storage().discard_writes();
                group = mls::load_group(&alex_p, &group_id).expect("the fixture's group reloads");
            }
            result
        };
        let join = move |bytes: &[u8]| {
            let joined = mls::join_from_welcome(&carol_p, bytes).map(|g| mls::member_ipks(&g));
            carol_p.mls_storage().discard_writes();
            joined
        };
        Self {
            _dir: dir,
            process: Box::new(process),
            join: Box::new(join),
            blair: blair.ipk(),
            carol: carol.ipk(),
            messages,
            welcomes: vec![welcome_carol],
            key_packages,
        }
    }

    /// The fixture's valid inputs for one step.
    pub fn valid(&self, step: MlsStep) -> &[Vec<u8>] {
        match step {
            MlsStep::Process => &self.messages,
            MlsStep::Join => &self.welcomes,
            MlsStep::KeyPackage => &self.key_packages,
        }
    }
}

impl Default for MlsFixture {
    fn default() -> Self {
        Self::new()
    }
}

/// Turns fuzzer bytes into one MLS step and its input.
///
/// Layout: a header byte ([`mls_header`]: the step and the edit), then for
/// [`MlsEdit::Raw`] the input itself; for the other edits, which valid input
/// (one byte), where (two bytes, little endian, modulo its length + 1) and
/// the bytes of the edit.
pub fn mls_input(fixture: &MlsFixture, data: &[u8]) -> Option<(MlsStep, Vec<u8>)> {
    let (&header, rest) = data.split_first()?;
    let header = usize::from(header);
    let step = MLS_STEPS[header % MLS_STEPS.len()];
    let edit = MLS_EDITS[(header / MLS_STEPS.len()) % MLS_EDITS.len()];
    if edit == MlsEdit::Raw {
        return Some((step, rest.to_vec()));
    }
    let [which, lo, hi, bytes @ ..] = rest else {
        return None;
    };
    let valid = fixture.valid(step);
    let mut input = valid.get(usize::from(*which) % valid.len().max(1))?.clone();
    let at = usize::from(u16::from_le_bytes([*lo, *hi])) % (input.len() + 1);
    match edit {
        MlsEdit::Raw => {}
        MlsEdit::Overwrite => {
            let end = (at + bytes.len()).min(input.len());
            input.splice(at..end, bytes.iter().copied());
        }
        MlsEdit::Xor => {
            for (byte, mask) in input[at..].iter_mut().zip(bytes) {
                *byte ^= mask;
            }
        }
        MlsEdit::Truncate => {
            input.truncate(at);
            input.extend_from_slice(bytes);
        }
        MlsEdit::Insert => {
            input.splice(at..at, bytes.iter().copied());
        }
    }
    Some((step, input))
}

/// MLS messages, Welcomes and key packages from outside: `mls::process`
/// against a real group, `mls::join_from_welcome`, and `decode_key_package`
/// (passed in, as it needs openmls's crypto provider). Returns whether the
/// step accepted the input.
pub fn mls_message(
    fixture: &mut MlsFixture,
    data: &[u8],
    decode_key_package: &dyn Fn(&[u8]) -> Result<(), MlsError>,
) -> bool {
    let Some((step, input)) = mls_input(fixture, data) else {
        return false;
    };
    match step {
        MlsStep::Process => match (fixture.process)(&input) {
            Ok(Incoming::Application { sender, bytes }) => {
                // Only Blair can have sent it: Alex's own messages do not
                // come back to Alex, and nobody else is in the group.
                assert_eq!(sender, Some(fixture.blair), "a message from a stranger");
                // What a proton does next with it.
                let _ = Plaintext::decode(&bytes);
                true
            }
            Ok(_) => true,
            Err(_) => false,
        },
        MlsStep::Join => match (fixture.join)(&input) {
            Ok(members) => {
                assert!(members.contains(&fixture.carol), "joined without Carol");
                true
            }
            Err(_) => false,
        },
        MlsStep::KeyPackage => decode_key_package(&input).is_ok(),
    }
}
