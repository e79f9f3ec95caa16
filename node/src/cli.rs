//! The command line: global flags and one subcommand per action.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// protonode: a peer-to-peer, end-to-end encrypted messaging node.
///
/// Relationships, not global identities, are the unit: every contact gets
/// its own fresh keys and delivery addresses. Start with `init`, run
/// `daemon`, then `invite` someone and let them `accept`.
#[derive(Debug, Parser)]
#[command(name = "protonode", version, propagate_version = true)]
pub struct Cli {
    /// Data directory (config, database, node key, control socket).
    /// Default: $XDG_DATA_HOME/protonode.
    #[arg(long, global = true, env = config::DATA_DIR_ENV, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Print one JSON document on stdout instead of text (JSON lines for `watch`).
    #[arg(long, global = true)]
    pub json: bool,

    /// Log format on stderr (filter with RUST_LOG, e.g. RUST_LOG=debug).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the data directory, its configuration and the node key.
    Init {
        /// Your preferred name, shown to the people you invite.
        #[arg(long)]
        name: String,
        /// Optional pronouns, e.g. "she/her".
        #[arg(long)]
        pronouns: Option<String>,
        /// Optional emoji picture, e.g. "🦊".
        #[arg(long)]
        emoji: Option<String>,
    },
    /// Run the node in the foreground until SIGINT or SIGTERM.
    Daemon {
        /// Listen on this multiaddr instead of the configured ports (repeatable),
        /// e.g. /ip4/0.0.0.0/tcp/4001 and /ip4/0.0.0.0/udp/4001/quic-v1.
        #[arg(long, value_name = "MULTIADDR")]
        listen: Vec<String>,
        /// Do not discover peers on the local network with mDNS.
        #[arg(long)]
        no_mdns: bool,
    },
    /// Make an invitation ticket for one person (it works once).
    Invite {
        /// Also draw the ticket as a QR code.
        #[arg(long)]
        qr: bool,
        /// Seconds until the ticket expires (default from the config: 3 days).
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
        expires_in: Option<u64>,
    },
    /// Accept someone's invitation ticket and start the relationship.
    Accept {
        /// The ticket, as given (starts with "protonode:").
        ticket: String,
    },
    /// List your contacts.
    Contacts,
    /// Send a text message to a contact.
    Send {
        /// Contact id or unambiguous name.
        contact: String,
        /// The message.
        text: String,
        /// Return only once the contact's node acknowledged the message.
        #[arg(long)]
        wait: bool,
        /// With --wait, give up waiting after this many seconds (the message stays queued).
        #[arg(long, value_name = "SECONDS", default_value_t = 60, requires = "wait")]
        timeout: u64,
    },
    /// Show the conversation with a contact, oldest first.
    History {
        /// Contact id or unambiguous name.
        contact: String,
    },
    /// Show the node's state: peer id, addresses, connections, warnings.
    Status,
    /// Stream events (messages, deliveries, contacts) until interrupted.
    Watch,
    /// Run the seed's story on real nodes on loopback in temporary data dirs.
    Demo,
}
