//! MLS from outside: messages processed by a member of a real 2-member
//! group, Welcomes joined, key packages decoded (see `checks::MlsFixture`).
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use protonode_fuzz::{checks, seeds};

thread_local! {
    static GROUP: RefCell<checks::MlsFixture> = RefCell::new(checks::MlsFixture::new());
}

fuzz_target!(init: GROUP.with_borrow(|group| seeds::write(seeds::mls_message(group))), |data: &[u8]| {
    GROUP.with_borrow_mut(|group| {
        checks::mls_message(group, data, &protonode_fuzz::decode_key_package);
    });
});
