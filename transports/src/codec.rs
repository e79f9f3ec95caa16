//! The stream framing of [`DELIVERY_PROTOCOL`] for libp2p's request-response.
//!
//! This module owns how one request and one response sit on a stream: a
//! 4-byte big-endian length, then that many bytes. It does not decode a
//! request's envelopes: the event loop does that (with
//! [`crate::wire::decode_batch`]) so that a bad frame can be answered with a
//! typed refusal instead of a dropped stream.
//!
//! ```text
//!   sender stream                      receiver stream
//!   write_request(Frame) ─ len|bytes ─▶ read_request → Frame(bytes)
//!                                                     | Oversize { declared } (body not read)
//!   read_response ◀───── len|postcard ─ write_response(DeliveryResponse)
//! ```
//!
//! Memory: a request body is read as it arrives, never preallocated from the
//! peer's claimed length, so a peer that claims 4 MiB and sends nothing costs
//! nothing. A response is capped at [`MAX_RESPONSE_BYTES`].

use std::io;

use futures::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use libp2p::{request_response, StreamProtocol};

use crate::wire::{
    decode_response, encode_response, DeliveryResponse, DELIVERY_PROTOCOL, MAX_FRAME_BYTES,
    MAX_RESPONSE_BYTES,
};

/// The protocol name as libp2p negotiates it.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new(DELIVERY_PROTOCOL);

/// Bytes of the length prefix before every request and response.
const LENGTH_PREFIX_BYTES: usize = 4;

/// A delivery request as read off a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// The bytes of one encoded batch, not yet decoded.
    Frame(Vec<u8>),
    /// The peer announced a frame over [`MAX_FRAME_BYTES`]. Its body was not
    /// read; the receiver answers `Rejected(TooLarge)`. Only ever read, never
    /// written.
    Oversize { declared: u64 },
}

/// The request-response codec of [`DELIVERY_PROTOCOL`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Codec;

impl request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = DeliveryResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        let declared = read_length(io).await?;
        if declared > MAX_FRAME_BYTES as u64 {
            return Ok(Request::Oversize { declared });
        }
        // Grows with the bytes that actually arrive (see the module header).
        let mut frame = Vec::new();
        (&mut *io).take(declared).read_to_end(&mut frame).await?;
        if frame.len() as u64 != declared {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "delivery request ended after {} of {declared} bytes",
                    frame.len()
                ),
            ));
        }
        Ok(Request::Frame(frame))
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<DeliveryResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let declared = read_length(io).await?;
        if declared > MAX_RESPONSE_BYTES as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("delivery response of {declared} bytes is over the {MAX_RESPONSE_BYTES}-byte limit"),
            ));
        }
        // At most 64 KiB, so reading into a buffer of the claimed size is fine.
        let mut bytes = vec![0; declared as usize];
        io.read_exact(&mut bytes).await?;
        decode_response(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match request {
            // No size check here on purpose: `Client::deliver_raw` may send
            // anything so that tests can prove the receiver's limits.
            Request::Frame(frame) => write_framed(io, &frame).await,
            Request::Oversize { declared } => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "an oversize request ({declared} bytes declared) is only ever read, never sent"
                ),
            )),
        }
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: DeliveryResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = encode_response(&response)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        write_framed(io, &bytes).await
    }
}

async fn read_length<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<u64> {
    let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
    io.read_exact(&mut prefix).await?;
    Ok(u64::from(u32::from_be_bytes(prefix)))
}

async fn write_framed<T: AsyncWrite + Unpin>(io: &mut T, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} bytes do not fit a 4-byte length prefix", bytes.len()),
        )
    })?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(bytes).await?;
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Receipt, Refusal};
    use futures::io::Cursor;
    use request_response::Codec as _;

    fn framed(len: u32, body: &[u8]) -> Vec<u8> {
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    #[tokio::test]
    async fn a_request_round_trips_through_the_framing() {
        let mut written = Cursor::new(Vec::new());
        Codec
            .write_request(&PROTOCOL, &mut written, Request::Frame(b"batch".to_vec()))
            .await
            .unwrap();
        assert_eq!(written.get_ref(), &framed(5, b"batch"));
        let mut reader = Cursor::new(written.into_inner());
        let request = Codec.read_request(&PROTOCOL, &mut reader).await.unwrap();
        assert_eq!(request, Request::Frame(b"batch".to_vec()));
    }

    #[tokio::test]
    async fn an_oversize_length_is_reported_without_reading_the_body() {
        let declared = MAX_FRAME_BYTES as u32 + 1;
        let mut stream = Cursor::new(framed(declared, &[0xee; 1000]));
        let request = Codec.read_request(&PROTOCOL, &mut stream).await.unwrap();
        assert_eq!(
            request,
            Request::Oversize {
                declared: u64::from(declared)
            }
        );
        assert_eq!(
            stream.position(),
            LENGTH_PREFIX_BYTES as u64,
            "body was read"
        );
    }

    #[tokio::test]
    async fn a_frame_at_the_limit_is_read() {
        let body = vec![1u8; MAX_FRAME_BYTES];
        let mut stream = Cursor::new(framed(MAX_FRAME_BYTES as u32, &body));
        let request = Codec.read_request(&PROTOCOL, &mut stream).await.unwrap();
        assert_eq!(request, Request::Frame(body));
    }

    #[tokio::test]
    async fn a_request_cut_short_is_an_error() {
        let mut stream = Cursor::new(framed(10, b"short"));
        let err = Codec
            .read_request(&PROTOCOL, &mut stream)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let mut stream = Cursor::new(vec![0, 0]);
        let err = Codec
            .read_request(&PROTOCOL, &mut stream)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn an_oversize_request_is_never_written() {
        let mut written = Cursor::new(Vec::new());
        let err = Codec
            .write_request(
                &PROTOCOL,
                &mut written,
                Request::Oversize { declared: 1 << 30 },
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(written.get_ref().is_empty());
    }

    #[tokio::test]
    async fn a_response_round_trips_through_the_framing() {
        let response = DeliveryResponse::Receipts(vec![
            Receipt::Stored,
            Receipt::Refused(Refusal::UnknownAddress),
        ]);
        let mut written = Cursor::new(Vec::new());
        Codec
            .write_response(&PROTOCOL, &mut written, response.clone())
            .await
            .unwrap();
        let mut reader = Cursor::new(written.into_inner());
        let read = Codec.read_response(&PROTOCOL, &mut reader).await.unwrap();
        assert_eq!(read, response);
    }

    #[tokio::test]
    async fn an_oversize_or_malformed_response_is_invalid_data() {
        let mut oversize = Cursor::new(framed(MAX_RESPONSE_BYTES as u32 + 1, &[]));
        let err = Codec
            .read_response(&PROTOCOL, &mut oversize)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        let mut garbage = Cursor::new(framed(3, &[0x09, 0x09, 0x09]));
        let err = Codec
            .read_response(&PROTOCOL, &mut garbage)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
