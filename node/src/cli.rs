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
pub enum GroupCommand {
    /// Create a group with contacts (each is introduced and claims their place).
    Create {
        /// The group's name.
        name: String,
        /// Contacts to invite (ids or unambiguous names).
        #[arg(required = true)]
        contacts: Vec<String>,
    },
    /// Add a contact to a group: they are introduced and claim their place.
    Add {
        /// Group id or unambiguous name.
        group: String,
        /// The contact to add (id or unambiguous name).
        contact: String,
        /// Return only once the group has ordered the change (it shows in `groups`).
        #[arg(long)]
        wait: bool,
        /// With --wait, give up waiting after this many seconds, 1 to 86400 (the change stays queued).
        #[arg(long, value_name = "SECONDS", default_value_t = 60, requires = "wait",
              value_parser = clap::value_parser!(u64).range(1..=config::MAX_SEND_WAIT_SECS))]
        timeout: u64,
    },
    /// Remove a member from a group.
    Remove {
        /// Group id or unambiguous name.
        group: String,
        /// The member's id (as `groups` shows it) or unambiguous name.
        member: String,
        /// Return only once the group has ordered the change (it shows in `groups`).
        #[arg(long)]
        wait: bool,
        /// With --wait, give up waiting after this many seconds, 1 to 86400 (the change stays queued).
        #[arg(long, value_name = "SECONDS", default_value_t = 60, requires = "wait",
              value_parser = clap::value_parser!(u64).range(1..=config::MAX_SEND_WAIT_SECS))]
        timeout: u64,
    },
    /// Leave a group (its history stays readable).
    Leave {
        /// Group id or unambiguous name.
        group: String,
    },
    /// Rotate your keys in a group.
    Update {
        /// Group id or unambiguous name.
        group: String,
        /// Return only once the group has ordered the change (it shows in `groups`).
        #[arg(long)]
        wait: bool,
        /// With --wait, give up waiting after this many seconds, 1 to 86400 (the change stays queued).
        #[arg(long, value_name = "SECONDS", default_value_t = 60, requires = "wait",
              value_parser = clap::value_parser!(u64).range(1..=config::MAX_SEND_WAIT_SECS))]
        timeout: u64,
    },
    /// Mark a member as verified (you checked their key id with them out of band).
    ///
    /// Only once they have claimed their place: a placeholder's key is its
    /// introducer's too.
    Verify {
        /// Group id or unambiguous name.
        group: String,
        /// The member's id (as `groups` shows it) or unambiguous name.
        member: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum MergeCommand {
    /// Ask the person behind two of your contacts to merge them into one
    /// relationship; they accept or ignore it.
    Request {
        /// Your relationship with them through one introduction (id or name).
        contact_1: String,
        /// Your other relationship with them.
        contact_2: String,
        /// Ask even though the two contacts go by different names.
        #[arg(long)]
        force: bool,
    },
    /// List merge requests, sent and received.
    List,
    /// Consent to a merge: the two relationships become one, histories merged.
    Accept {
        /// The request's id (as `merge list` shows it, or its first 4 or more digits).
        id: String,
    },
    /// Keep the two relationships apart (the requester is not told).
    Ignore {
        /// The request's id (as `merge list` shows it, or its first 4 or more digits).
        id: String,
    },
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
        /// Seconds until the ticket expires, 1 to 31536000 (a year); default from the config, 3 days.
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=config::MAX_TICKET_TTL_SECS))]
        expires_in: Option<u64>,
    },
    /// Accept someone's invitation ticket and start the relationship.
    Accept {
        /// The ticket, as given (starts with "protonode:").
        ticket: String,
    },
    /// List your contacts (with --all, also relationships merged into others, and refused ones).
    Contacts {
        /// Also list relationships merged into others ("retired"), and those whose inviter's node refused your answer ("refused"; their history stays).
        #[arg(long)]
        all: bool,
    },
    /// Show one contact's trust record: how their key was obtained, who
    /// vouches for it, which attestations link it, whether it is flagged.
    Contact {
        /// Contact id or unambiguous name.
        contact: String,
    },
    /// Record that two of your relationships are both you towards the same
    /// person (a signed equivalence of your two keys, kept by this node).
    Link {
        /// One of your relationships with that person (id or unambiguous name).
        contact_1: String,
        /// Your other relationship with them.
        contact_2: String,
        /// Link even though the two contacts go by different names.
        #[arg(long)]
        force: bool,
    },
    /// Merge two parallel relationships with the same person (each side must consent).
    #[command(subcommand)]
    Merge(MergeCommand),
    /// Send a text message to a contact or a group.
    Send {
        /// Contact or group: id or unambiguous name.
        contact: String,
        /// The message. It may begin with "-" (`send Alex -hi` sends "-hi"); one
        /// that is exactly an option, such as -h, goes after `--`.
        #[arg(allow_hyphen_values = true)]
        text: String,
        /// Return only once the contact's node acknowledged the message.
        #[arg(long)]
        wait: bool,
        /// With --wait, give up waiting after this many seconds, 1 to 86400 (the message stays queued).
        #[arg(long, value_name = "SECONDS", default_value_t = 60, requires = "wait",
              value_parser = clap::value_parser!(u64).range(1..=config::MAX_SEND_WAIT_SECS))]
        timeout: u64,
    },
    /// Show the conversation with a contact or a group, in the order this node sent or received it.
    History {
        /// Contact or group: id or unambiguous name.
        contact: String,
    },
    /// Introduce two contacts to each other: a group of the three of you.
    Introduce {
        /// The first contact (id or unambiguous name).
        contact_b: String,
        /// The second contact.
        contact_c: String,
        /// A name for the group.
        #[arg(long)]
        name: Option<String>,
        /// Introduce them even if they are already in a group with you and
        /// no one else (a second introduction for each of them to answer).
        #[arg(long)]
        again: bool,
    },
    /// List your groups with their members and how far you trust each.
    Groups {
        /// Also list groups you left or were removed from (their history
        /// stays readable with `history`).
        #[arg(long)]
        all: bool,
    },
    /// Accept an introduction: replace the placeholder made for you with your own key.
    Claim {
        /// Group id or unambiguous name.
        group: String,
        /// Return only once the group has ordered the claim (members see you then).
        #[arg(long)]
        wait: bool,
        /// With --wait, give up waiting after this many seconds, 1 to 86400 (the claim stays queued).
        #[arg(long, value_name = "SECONDS", default_value_t = 60, requires = "wait",
              value_parser = clap::value_parser!(u64).range(1..=config::MAX_SEND_WAIT_SECS))]
        timeout: u64,
    },
    /// Decline an introduction: the introducer removes the placeholder made for you.
    Decline {
        /// Group id or unambiguous name.
        group: String,
    },
    /// Start a 1:1 relationship with a member of a group (the introducer learns nothing of it).
    ///
    /// Only once they have claimed their place: a placeholder's key is its
    /// introducer's too.
    Connect {
        /// Group id or unambiguous name.
        group: String,
        /// The member's id (as `groups` shows it) or unambiguous name.
        member: String,
    },
    /// Manage groups: create, add, remove, leave, update, verify.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Show the node's state: peer id, addresses, connections, warnings.
    ///
    /// The warnings include what waits for you: merge requests, and
    /// introductions to claim or decline.
    Status,
    /// Stream events (messages, deliveries, contacts, merges, groups) until interrupted.
    ///
    /// Messages say who wrote them and where; group events say when someone
    /// introduces you (and how to claim or decline) and who joined,
    /// claimed or went.
    Watch {
        /// Keep watching when the daemon stops: wait for it to come back and
        /// watch again. What happens while it is down, or in its first
        /// moments back (messages queued for it arrive then), is not shown:
        /// `protonode history` has the messages.
        #[arg(long)]
        follow: bool,
    },
    /// Run the seed's story on real nodes on loopback in temporary data dirs.
    Demo,
}
