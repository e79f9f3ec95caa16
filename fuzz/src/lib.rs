//! What protonode's fuzz targets run. Each target in `fuzz_targets/` is a
//! few lines that call one check here:
//!
//! - [`checks`]: the checks the regression test replays too (see its header);
//! - this module: the checks that need what that test cannot depend on
//!   (the codec's futures and libp2p traits, openmls's crypto provider);
//! - [`seeds`]: valid inputs for each target's corpus.

pub mod checks;
pub mod seeds;

use actors::mls::{self, MlsError};
use actors::model::{MAX_TRANSPORTS, MIN_TRANSPORTS};
use actors::ticket::{Ticket, MAX_TICKET_CHARS};
use futures::io::Cursor;
use libp2p::request_response::Codec as _;
use openmls_rust_crypto::RustCrypto;
use transports::codec::{Codec, Request, PROTOCOL};
use transports::{MAX_FRAME_BYTES, MAX_RESPONSE_BYTES};

/// Bytes of the codec's length prefix.
const LENGTH_PREFIX_BYTES: usize = 4;

/// The delivery protocol's stream framing (`transports::codec::Codec`), read
/// from a stream holding exactly `data`: as a request (what a receiver reads
/// from any peer) and as a response (what a sender reads back).
pub fn delivery_codec(data: &[u8]) {
    futures::executor::block_on(async {
        let mut stream = Cursor::new(data);
        match Codec.read_request(&PROTOCOL, &mut stream).await {
            Ok(Request::Frame(frame)) => {
                assert!(frame.len() <= MAX_FRAME_BYTES);
                let read = usize::try_from(stream.position()).unwrap_or(usize::MAX);
                assert_eq!(read, LENGTH_PREFIX_BYTES + frame.len());
                // Written back, the frame is exactly the bytes it was read from.
                let mut written = Cursor::new(Vec::new());
                Codec
                    .write_request(&PROTOCOL, &mut written, Request::Frame(frame.clone()))
                    .await
                    .expect("a frame read is written");
                assert_eq!(written.get_ref().as_slice(), &data[..read]);
                // What the receiver does next with it.
                checks::envelope_batch(&frame);
            }
            Ok(Request::Oversize { declared }) => {
                assert!(declared > MAX_FRAME_BYTES as u64);
                assert_eq!(
                    stream.position(),
                    LENGTH_PREFIX_BYTES as u64,
                    "an oversize body is not read"
                );
            }
            Err(_) => {}
        }

        let mut stream = Cursor::new(data);
        if let Ok(response) = Codec.read_response(&PROTOCOL, &mut stream).await {
            let read = usize::try_from(stream.position()).unwrap_or(usize::MAX);
            assert!(read <= LENGTH_PREFIX_BYTES + MAX_RESPONSE_BYTES);
            let mut written = Cursor::new(Vec::new());
            Codec
                .write_response(&PROTOCOL, &mut written, response.clone())
                .await
                .expect("a response read is written");
            let mut again = Cursor::new(written.into_inner());
            let reread = Codec
                .read_response(&PROTOCOL, &mut again)
                .await
                .expect("a response written is read");
            assert_eq!(reread, response);
        }
    });
}

/// `Ticket::parse` with openmls's RustCrypto, as `accept_invite` calls it.
pub fn ticket_parse(text: &str) {
    let Ok(verified) = Ticket::parse(text, &RustCrypto::default()) else {
        return;
    };
    assert!(text.trim().len() <= MAX_TICKET_CHARS);
    let ticket = &verified.ticket;
    assert!(ticket.display.validate().is_ok());
    assert!((MIN_TRANSPORTS..=MAX_TRANSPORTS).contains(&ticket.transports.len()));
    // The IPK is the key package's, and the key package is the ticket's bytes.
    assert_eq!(
        mls::key_package_ipk(&verified.key_package),
        Some(verified.ipk)
    );
    assert_eq!(
        mls::encode_key_package(&verified.key_package).expect("a key package encodes"),
        ticket.key_package
    );
}

/// `mls::decode_key_package` with openmls's RustCrypto, the step
/// [`checks::mls_message`] takes from its caller.
pub fn decode_key_package(bytes: &[u8]) -> Result<(), MlsError> {
    let key_package = mls::decode_key_package(&RustCrypto::default(), bytes)?;
    // A key package that validates is exactly the bytes it came from.
    assert_eq!(
        mls::encode_key_package(&key_package).expect("a key package encodes"),
        bytes
    );
    Ok(())
}
