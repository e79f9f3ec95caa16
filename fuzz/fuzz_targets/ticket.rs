//! Invitation tickets: `Ticket::parse`, and `accept_invite` around it. Each
//! input is tried as text and as a ticket body (see `checks::ticket_texts`).
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use protonode_fuzz::{checks, seeds};

thread_local! {
    static ACCEPTOR: RefCell<checks::TicketFixture> = RefCell::new(checks::TicketFixture::new());
}

fuzz_target!(init: seeds::write(seeds::ticket()), |data: &[u8]| {
    assert_eq!(
        checks::base64url(data),
        data_encoding::BASE64URL_NOPAD.encode(data)
    );
    for text in checks::ticket_texts(data) {
        protonode_fuzz::ticket_parse(&text);
        ACCEPTOR.with_borrow(|acceptor| checks::ticket_acceptance(acceptor, &text));
    }
});
