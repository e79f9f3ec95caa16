//! The relationship manager, proton and group proton actors, the protocol
//! logic they run, and the redb store they keep their state in.

pub mod attestation;
pub mod identity;
pub mod mls;
pub mod model;
pub mod store;
