//! The relationship manager, proton and group proton actors, the protocol
//! logic they run, and the redb store they keep their state in.

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
