//! Every input that once broke a fuzz target stays harmless: the files in
//! `fuzz/regressions/<target>/` are replayed on stable, in the normal test
//! run, through the very checks the targets run (`fuzz/src/checks.rs`,
//! included below). A crash found by `fuzz/run.sh` is copied there, fixed,
//! and from then on this test proves it stays fixed (see `fuzz/README.md`).
//!
//! Two steps need what this package does not depend on, so they are
//! replayed through the nearest public path to the same code:
//!
//! - `delivery_codec`: the codec's stream framing needs futures and libp2p's
//!   codec trait; the bytes after the 4-byte length prefix go through the
//!   decoders the codec hands them to (`decode_batch`, `decode_response`).
//! - the key packages of `mls_message`: `mls::decode_key_package` needs
//!   openmls's crypto provider; the bytes go into a ticket whose only flaw
//!   could be its key package, and `accept_invite` decodes it with
//!   `Ticket::parse`, which calls `decode_key_package` with RustCrypto.

#[path = "../../fuzz/src/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};

use actors::identity::IdentityKey;
use actors::mls::MlsError;
use actors::model::{AddressLease, DisplayIdentity, TicketId, TransportInfo, TransportKind};
use actors::relationship::{accept_invite, RelationshipError};
use actors::ticket::{Ticket, TicketError};
use transports::DeliveryAddress;

/// The targets in `fuzz/fuzz_targets/`, each replayed by a test below.
const TARGETS: [&str; 7] = [
    "attestation",
    "control_request",
    "delivery_codec",
    "envelope_batch",
    "mls_message",
    "payload",
    "ticket",
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The saved inputs of one target, in name order; the README that keeps
/// an empty directory in git is not one.
fn regressions(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = fuzz_dir().join("regressions").join(target);
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{} cannot be read: {e}", dir.display()));
    let mut inputs: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|entry| entry.expect("a directory entry reads").path())
        .filter(|path| path.is_file())
        .filter(|path| path.file_name().is_none_or(|n| n != "README.md"))
        .map(|path| {
            let bytes = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{} cannot be read: {e}", path.display()));
            (path, bytes)
        })
        .collect();
    inputs.sort();
    inputs
}

/// Replays every saved input of `target` through `check`, naming the file
/// before each so that a failure says which one.
fn replay(target: &str, mut check: impl FnMut(&[u8])) {
    let inputs = regressions(target);
    for (path, bytes) in &inputs {
        println!("replaying {}", path.display());
        check(bytes);
    }
    println!("{target}: {} saved inputs replayed", inputs.len());
}

#[test]
fn every_fuzz_target_has_its_regressions_replayed_here() {
    let mut targets: Vec<String> = std::fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .expect("fuzz/fuzz_targets reads")
        .map(|entry| entry.expect("a directory entry reads").path())
        .filter(|path| path.extension().is_some_and(|e| e == "rs"))
        .filter_map(|path| Some(path.file_stem()?.to_str()?.to_owned()))
        .collect();
    targets.sort();
    assert_eq!(
        targets, TARGETS,
        "a fuzz target was added or removed: replay its regressions in this file"
    );
    for target in TARGETS {
        let dir = fuzz_dir().join("regressions").join(target);
        assert!(dir.is_dir(), "{} is missing", dir.display());
    }
}

#[test]
fn saved_envelope_batches_are_refused_or_round_trip() {
    replay("envelope_batch", checks::envelope_batch);
}

#[test]
fn saved_delivery_frames_decode_or_are_refused() {
    replay("delivery_codec", |bytes| {
        checks::envelope_batch(bytes.get(4..).unwrap_or_default());
    });
}

#[test]
fn saved_tickets_are_refused_or_accepted() {
    let acceptor = checks::TicketFixture::new();
    replay("ticket", |bytes| {
        for text in checks::ticket_texts(bytes) {
            checks::ticket_acceptance(&acceptor, &text);
        }
    });
}

#[test]
fn saved_payloads_and_plaintexts_are_refused_or_round_trip() {
    replay("payload", checks::payload);
}

#[test]
fn saved_attestations_never_verify_unless_signed() {
    let known = checks::known_attestations();
    replay("attestation", |bytes| checks::attestation(bytes, &known));
}

#[test]
fn saved_control_requests_parse_or_get_an_error() {
    replay("control_request", checks::control_request);
}

#[test]
fn saved_mls_inputs_are_refused_by_a_real_group() {
    let mut group = checks::MlsFixture::new();
    let acceptor = checks::TicketFixture::new();
    let decode_key_package = |bytes: &[u8]| key_package_in_a_ticket(&acceptor, bytes);
    replay("mls_message", |bytes| {
        checks::mls_message(&mut group, bytes, &decode_key_package);
    });
}

/// The replays above are not vacuous: each path takes a valid input all
/// the way (a fresh ticket is accepted; the MLS fixture's own messages,
/// Welcome and key packages are taken by the same checks).
#[test]
fn valid_inputs_go_all_the_way_through_the_replayed_checks() {
    let inviter = checks::TicketFixture::new();
    let invite = actors::relationship::create_invite(
        &inviter.store,
        &inviter.node,
        DisplayIdentity {
            name: "Alex".into(),
            pronouns: None,
            picture: None,
        },
        checks::LIFETIMES,
        std::time::Duration::from_secs(60),
        None,
        actors::model::now_ms(),
    )
    .expect("Alex makes a ticket");
    let acceptor = checks::TicketFixture::new();
    assert!(checks::ticket_acceptance(&acceptor, &invite.text));

    let mut group = checks::MlsFixture::new();
    let decode_key_package = |bytes: &[u8]| key_package_in_a_ticket(&acceptor, bytes);
    for step in [
        checks::MlsStep::Process,
        checks::MlsStep::Join,
        checks::MlsStep::KeyPackage,
    ] {
        for which in 0..group.valid(step).len() {
            let unchanged = [
                checks::mls_header(step, checks::MlsEdit::Overwrite),
                which as u8,
                0,
                0,
            ];
            assert!(
                checks::mls_message(&mut group, &unchanged, &decode_key_package),
                "{step:?} refused valid input {which}"
            );
            // Every input meets the same state: the same message is taken twice.
            assert!(checks::mls_message(
                &mut group,
                &unchanged,
                &decode_key_package
            ));
        }
    }
}

/// Decodes `key_package` the way a ticket's is decoded: inside an otherwise
/// valid ticket (signed by a key that is not the key package's, so it is
/// refused in the end either way).
fn key_package_in_a_ticket(
    acceptor: &checks::TicketFixture,
    key_package: &[u8],
) -> Result<(), MlsError> {
    let lease = AddressLease {
        address: DeliveryAddress::from_bytes([3; 32]).into(),
        valid_until: u64::MAX,
    };
    let node = checks::node_addrs();
    let transports = [TransportKind::Tcp, TransportKind::Quic]
        .into_iter()
        .map(|kind| {
            TransportInfo::new(
                kind,
                node.peer,
                node.service_key,
                &node.addrs,
                lease.clone(),
                lease.clone(),
            )
        })
        .collect();
    let ticket = Ticket {
        id: TicketId([1; 16]),
        display: DisplayIdentity {
            name: "Alex".into(),
            pronouns: None,
            picture: None,
        },
        key_package: key_package.to_vec(),
        transports,
        welcome_address: DeliveryAddress::from_bytes([2; 32]),
        expires_at: u64::MAX,
    };
    let text = ticket.encode(&IdentityKey::generate());
    match accept_invite(
        &acceptor.store,
        &acceptor.node,
        DisplayIdentity {
            name: "Blair".into(),
            pronouns: None,
            picture: None,
        },
        checks::LIFETIMES,
        &text,
        None,
        1_000,
    ) {
        Err(RelationshipError::Ticket(TicketError::InvalidKeyPackage(why))) => {
            Err(MlsError::InvalidKeyPackage(why))
        }
        _ => Ok(()),
    }
}
