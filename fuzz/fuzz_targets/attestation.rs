//! Attestations: postcard decoding, then `verify`, which must refuse
//! anything its keys did not sign.
#![no_main]

use std::sync::LazyLock;

use actors::attestation::Attestation;
use libfuzzer_sys::fuzz_target;
use protonode_fuzz::{checks, seeds};

static KNOWN: LazyLock<Vec<Attestation>> = LazyLock::new(checks::known_attestations);

fuzz_target!(init: seeds::write(seeds::attestation()), |data: &[u8]| {
    checks::attestation(data, &KNOWN);
});
