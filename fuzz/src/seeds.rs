//! Valid inputs to start each target's corpus from.
//!
//! Every target writes its seeds when it starts (libFuzzer's initialisation,
//! before the corpus is read) if `PROTONODE_FUZZ_SEED_DIR` names a
//! directory; `fuzz/run.sh` points it at the target's corpus. They are made
//! fresh on each run because some cannot be stored once and for all: a key
//! package expires, and the MLS fixture's keys are new in every process.
//! Files are named `seed-N` and overwritten on every run, so the corpus does
//! not collect stale copies.

use std::path::PathBuf;
use std::time::Duration;

use actors::model::{
    AddressLease, DisplayIdentity, MessageId, Picture, TransportInfo, TransportKind,
};
use actors::protocol::{Body, Payload, Plaintext};
use actors::relationship::{accept_invite, create_invite};
use serde_json::json;
use transports::{DeliveryAddress, DeliveryResponse, Envelope, Receipt, Refusal};

use crate::checks::{self, MlsEdit, MlsFixture, MlsStep, TicketFixture, LIFETIMES};

/// The environment variable naming the directory to write seeds to.
pub const SEED_DIR_VAR: &str = "PROTONODE_FUZZ_SEED_DIR";

/// Writes `seeds` to the directory named by [`SEED_DIR_VAR`], if set. A
/// failure to write is reported and the run goes on: seeds help, they are
/// not needed.
pub fn write(seeds: Vec<Vec<u8>>) {
    let Some(dir) = std::env::var_os(SEED_DIR_VAR).map(PathBuf::from) else {
        return;
    };
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        seeds
            .iter()
            .enumerate()
            .try_for_each(|(i, seed)| std::fs::write(dir.join(format!("seed-{i}")), seed))
    });
    match written {
        Ok(()) => eprintln!("wrote {} seeds to {}", seeds.len(), dir.display()),
        Err(e) => eprintln!("could not write seeds to {}: {e}", dir.display()),
    }
}

/// A real invitation ticket of a fresh node, as its text.
fn ticket_text() -> String {
    let inviter = TicketFixture::new();
    let invite = create_invite(
        &inviter.store,
        &inviter.node,
        DisplayIdentity {
            name: "Alex".into(),
            pronouns: Some("they/them".into()),
            picture: Some(Picture::Emoji("🦊".into())),
        },
        LIFETIMES,
        Duration::from_secs(3 * 24 * 3600),
        None,
        actors::model::now_ms(),
    )
    .expect("the seed ticket is made");
    invite.text
}

fn transports() -> Vec<TransportInfo> {
    let node = checks::node_addrs();
    let lease = AddressLease {
        address: DeliveryAddress::from_bytes([5; 32]).into(),
        valid_until: 1_800_000_000_000,
    };
    [TransportKind::Tcp, TransportKind::Quic]
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
        .collect()
}

pub fn envelope_batch() -> Vec<Vec<u8>> {
    let batch = vec![
        Envelope::new(DeliveryAddress::from_bytes([1; 32]), b"hello".to_vec()),
        Envelope::new(DeliveryAddress::from_bytes([2; 32]), vec![]),
        Envelope::new(DeliveryAddress::from_bytes([3; 32]), vec![0xab; 300]),
    ];
    let responses = [
        DeliveryResponse::Receipts(vec![
            Receipt::Stored,
            Receipt::Duplicate,
            Receipt::Refused(Refusal::UnknownAddress),
        ]),
        DeliveryResponse::Rejected(Refusal::TooLarge),
    ];
    let mut seeds = vec![
        transports::encode_batch(&batch).expect("the seed batch encodes"),
        transports::encode_batch(&batch[..1]).expect("the seed batch encodes"),
    ];
    seeds.extend(
        responses
            .iter()
            .map(|r| transports::encode_response(r).expect("the seed response encodes")),
    );
    seeds
}

/// Every envelope-batch seed behind the codec's 4-byte length prefix.
pub fn delivery_codec() -> Vec<Vec<u8>> {
    envelope_batch()
        .into_iter()
        .map(|body| {
            let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
            let mut framed = len.to_be_bytes().to_vec();
            framed.extend(body);
            framed
        })
        .collect()
}

/// Ticket texts as they are, and their bodies (base64url-decoded), which
/// the target turns back into a ticket text.
pub fn ticket() -> Vec<Vec<u8>> {
    let texts = [ticket_text(), ticket_text()];
    let mut seeds: Vec<Vec<u8>> = texts.iter().map(|t| t.clone().into_bytes()).collect();
    seeds.extend(texts.iter().filter_map(|t| {
        let body = t.strip_prefix(actors::ticket::PREFIX)?;
        data_encoding::BASE64URL_NOPAD.decode(body.as_bytes()).ok()
    }));
    seeds
}

/// Payloads (a real answer to a ticket, an MLS message) and plaintexts of
/// every kind.
pub fn payload() -> Vec<Vec<u8>> {
    let acceptor = TicketFixture::new();
    let answer = accept_invite(
        &acceptor.store,
        &acceptor.node,
        DisplayIdentity {
            name: "Blair".into(),
            pronouns: None,
            picture: Some(Picture::Monogram("B".into())),
        },
        LIFETIMES,
        &ticket_text(),
        None,
        actors::model::now_ms(),
    )
    .expect("the seed ticket is accepted");
    let mut seeds: Vec<Vec<u8>> = answer
        .changes
        .outbox
        .iter()
        .map(|e| e.payload.clone())
        .collect();
    seeds.push(Payload::Mls(vec![0, 1, 2, 3]).encode());
    let bodies = [
        Body::Text {
            id: MessageId([9; 16]),
            text: "hello, 世界".into(),
            sent_at: 1_700_000_000_000,
        },
        Body::Hello {
            display: DisplayIdentity {
                name: "Blair".into(),
                pronouns: Some("she/her".into()),
                picture: None,
            },
            transports: transports(),
            link: None,
        },
        Body::Transports,
    ];
    for body in bodies {
        for piggybacked in [None, Some(transports())] {
            seeds.push(
                Plaintext {
                    body: body.clone(),
                    transports: piggybacked,
                }
                .encode(),
            );
        }
    }
    seeds
}

pub fn attestation() -> Vec<Vec<u8>> {
    checks::known_attestations()
        .iter()
        .map(|a| actors::store::encode(a, "attestation").expect("the seed attestation encodes"))
        .collect()
}

pub fn control_request() -> Vec<Vec<u8>> {
    let requests = [
        json!({"jsonrpc": "2.0", "id": 1, "method": "invite", "params": {"expires_in_secs": 60}}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "accept", "params": {"ticket": "protonode:AQ"}}),
        json!({"jsonrpc": "2.0", "id": "x", "method": "contacts"}),
        json!({"jsonrpc": "2.0", "id": 4, "method": "send", "params": {"to": "Alex", "text": "hi", "wait_secs": 5}}),
        json!({"jsonrpc": "2.0", "id": null, "method": "history", "params": {"of": "9238"}}),
        json!({"jsonrpc": "2.0", "id": 6, "method": "status", "params": null}),
        json!({"jsonrpc": "2.0", "id": [1], "method": "watch", "params": {}}),
        json!({"jsonrpc": "1.0", "id": 8, "method": "reboot"}),
    ];
    requests
        .iter()
        .map(|r| r.to_string().into_bytes())
        .collect()
}

/// For each step, every valid input of the fixture unchanged (an edit of
/// nothing, which names the same kind of input in every run) and as raw
/// bytes (valid in this run only).
pub fn mls_message(fixture: &MlsFixture) -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for step in [MlsStep::Process, MlsStep::Join, MlsStep::KeyPackage] {
        for (which, input) in fixture.valid(step).iter().enumerate() {
            let which = u8::try_from(which).unwrap_or(u8::MAX);
            seeds.push(vec![
                checks::mls_header(step, MlsEdit::Overwrite),
                which,
                0,
                0,
            ]);
            let mut raw = vec![checks::mls_header(step, MlsEdit::Raw)];
            raw.extend_from_slice(input);
            seeds.push(raw);
        }
    }
    seeds
}
