//! protonode's network: it moves envelopes to delivery addresses on other
//! nodes, and knows nothing of actors, relationships or MLS.
//!
//! ```text
//!   node / actors                    transports
//!   ─────────────                    ──────────────────────────────────────────
//!   Client (clone per actor) ──Command──▶ EventLoop task ◀──▶ libp2p Swarm
//!        ▲  oneshot replies ◀──────────┘      │           (TCP+Noise+Yamux, QUIC,
//!        │                                    │            identify, ping, mDNS,
//!   node's event reader ◀──────Event──────────┘            delivery request-response)
//!        └── InboundBatch::respond(receipts) ──▶ EventLoop answers the peer
//! ```
//!
//! - [`wire`]: envelopes, receipts, their postcard encoding and size limits.
//! - [`codec`]: the length-prefixed stream framing of the delivery protocol.
//! - [`network`]: the swarm, its event loop task and the [`Client`] handle.
//! - [`conduct`]: the scores that throttle, then disconnect, a peer that
//!   sends unresolvable addresses or invalid frames.
//!
//! The libp2p types a caller needs ([`PeerId`], [`Multiaddr`], [`identity`])
//! are re-exported so that other crates need not depend on libp2p.

pub mod codec;
pub mod conduct;
pub mod network;
pub mod wire;

pub use libp2p::{identity, Multiaddr, PeerId};
pub use network::{spawn, Client, DeliveryError, Error, Event, InboundBatch, Status};
pub use wire::*;
