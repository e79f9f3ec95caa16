//! The `protonode` binary's parts: command line, daemon, control API,
//! human output and the demo. Kept as a library so integration tests can
//! drive the same code.

pub mod cli;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod output;
