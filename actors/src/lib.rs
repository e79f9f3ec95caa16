//! The relationship manager, proton and group proton actors, the protocol
//! logic they run, and the redb store they keep their state in.

/// The tracing target of the timeline events: one at each step of an
/// envelope's way through a node (in, processed, committed, out, answered),
/// at trace level, each naming the node's store. Off, they cost a check
/// each; `RUST_LOG=info,protonode::timeline=trace` shows where an operation's
/// time goes (`PROTONODE_BENCH_TIMELINE=1` in the benchmarks).
pub const TIMELINE: &str = "protonode::timeline";

pub mod attestation;
pub mod changes;
pub mod group_proton;
pub mod groups;
pub mod identity;
pub mod inbound;
pub mod manager;
pub mod merge;
pub mod mls;
pub mod model;
pub mod outbox;
pub mod protocol;
pub mod proton;
pub mod records;
pub mod relationship;
pub mod runtime;
pub mod seal;
pub mod store;
pub mod ticket;
pub mod views;
