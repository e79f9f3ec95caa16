//! Typed configuration of a protonode node.
//!
//! A node keeps everything in one data directory ([`Paths`]): the TOML
//! configuration file, the redb database, the libp2p node key, the control
//! socket and the daemon lock. [`Config::load`] reads the file, applies
//! environment overrides (`PROTONODE_<SECTION>_<KEY>`, e.g.
//! `PROTONODE_NETWORK_MDNS=false`), and validates the result once, so the rest
//! of the node can trust every value it is handed.
//!
//! Flags are applied by the binary on top of the loaded value (they win over
//! the environment, which wins over the file, which wins over the defaults
//! documented on each field).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use multiaddr::Multiaddr;
use serde::{Deserialize, Serialize};

/// Name of the environment variable that selects the data directory.
pub const DATA_DIR_ENV: &str = "PROTONODE_DATA_DIR";

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "PROTONODE_";

/// Longest display name, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Longest pronouns string, in characters.
pub const MAX_PRONOUNS_CHARS: usize = 32;
/// Longest emoji picture, in characters (emoji sequences can be several code points).
pub const MAX_EMOJI_CHARS: usize = 8;
/// Longest monogram picture, in characters.
pub const MAX_MONOGRAM_CHARS: usize = 3;
/// Longest lifetime of an invitation ticket (s): a year. The config's
/// default lifetime is at least a minute; `invite --expires-in` may be as
/// short as a second.
pub const MAX_TICKET_TTL_SECS: u64 = 365 * 24 * 3600;
/// Longest `delivery.accept_wait_secs`.
pub const MAX_ACCEPT_WAIT_SECS: u64 = 600;
/// Longest `send --wait` (s): a day.
pub const MAX_SEND_WAIT_SECS: u64 = 24 * 3600;

/// What went wrong while locating, reading, overriding or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no data directory: pass --data-dir DIR or set {DATA_DIR_ENV} (no home directory was found to default to)")]
    NoDataDir,
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write config file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}={value:?} is not valid: expected {expected}")]
    Env {
        var: String,
        value: String,
        expected: String,
    },
    #[error("invalid configuration value {key}: {problem}")]
    Invalid { key: &'static str, problem: String },
    #[error("the data directory {path} is too long a path for its control socket ({len} bytes with \"/control.sock\"; Unix sockets take at most {max}): choose a shorter --data-dir")]
    DataDirTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },
    #[error("environment variable {var} names no configuration section; did you mean {suggested}? (the sections are {known})")]
    MisspeltEnvSection {
        var: String,
        /// The variable with the section spelt right.
        suggested: String,
        known: String,
    },
    #[error("environment variable {var} names no configuration key; [{section}] has: {known}")]
    UnknownEnv {
        var: String,
        section: &'static str,
        /// The section's variables.
        known: String,
    },
}

/// Where a node keeps its files. Everything lives in one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    data_dir: PathBuf,
}

impl Paths {
    /// Uses `dir` as the data directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: dir.into(),
        }
    }

    /// Resolves the data directory: the flag if given, else `PROTONODE_DATA_DIR`,
    /// else `$XDG_DATA_HOME/protonode` (on Linux `~/.local/share/protonode`).
    pub fn resolve(
        flag: Option<PathBuf>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, Error> {
        if let Some(dir) = flag {
            return Ok(Self::new(dir));
        }
        if let Some(dir) = env(DATA_DIR_ENV).filter(|d| !d.is_empty()) {
            return Ok(Self::new(dir));
        }
        let base = directories::BaseDirs::new().ok_or(Error::NoDataDir)?;
        Ok(Self::new(base.data_dir().join("protonode")))
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
    /// The TOML configuration file.
    pub fn config_file(&self) -> PathBuf {
        self.data_dir.join("config.toml")
    }
    /// The redb database holding all of the node's state.
    pub fn database(&self) -> PathBuf {
        self.data_dir.join("protonode.redb")
    }
    /// The libp2p node key (protobuf encoding of an Ed25519 keypair).
    pub fn node_key(&self) -> PathBuf {
        self.data_dir.join("node.key")
    }
    /// The Unix socket of the control API.
    pub fn control_socket(&self) -> PathBuf {
        self.data_dir.join("control.sock")
    }
    /// Refuses a data directory whose control socket's path is too long
    /// for a Unix socket address (108 bytes with its final NUL on Linux):
    /// the daemon could not open it, nor a command reach it.
    pub fn check_socket_path(&self) -> Result<(), Error> {
        const MAX: usize = 107;
        let len = self.control_socket().as_os_str().len();
        if len > MAX {
            return Err(Error::DataDirTooLong {
                path: self.data_dir.clone(),
                len,
                max: MAX,
            });
        }
        Ok(())
    }
    /// The lock file that keeps a second daemon off this data directory.
    pub fn lock_file(&self) -> PathBuf {
        self.data_dir.join("daemon.lock")
    }
}

/// The whole configuration of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub profile: Profile,
    pub network: Network,
    pub delivery: Delivery,
}

/// How this person presents themselves in new relationships. Every
/// relationship gets its own copy, so changing it later affects only new ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    /// Preferred name shown to contacts. Set by `protonode init --name`.
    pub name: String,
    /// Optional pronouns, e.g. "she/her". Default: none.
    pub pronouns: Option<String>,
    /// Optional emoji picture, e.g. "🦊". Default: none.
    pub emoji: Option<String>,
    /// Optional monogram picture (1 to 3 characters), used when there is no emoji. Default: none.
    pub monogram: Option<String>,
}

/// The libp2p network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Network {
    /// TCP port on all IPv4 interfaces. Default 0: a random port. `init`
    /// writes a fixed free port so that contacts can find the node again
    /// after a restart.
    pub tcp_port: u16,
    /// UDP port for QUIC on all IPv4 interfaces. Default 0: a random port
    /// (`init` writes a fixed one, as for TCP).
    pub quic_port: u16,
    /// Listen addresses that replace the two defaults above when not empty,
    /// e.g. ["/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/udp/4001/quic-v1"].
    /// Default: empty.
    pub listen: Vec<String>,
    /// Extra addresses to advertise in invitations, e.g. a port forwarded on
    /// a router. Default: empty.
    pub announce: Vec<String>,
    /// Discover peers on the local network with mDNS. Default: true.
    pub mdns: bool,
    /// Seconds a connection with no open stream stays open. Default: 120.
    pub idle_connection_timeout_secs: u64,
    /// Seconds to wait for a peer to answer a delivery. Default: 20.
    pub request_timeout_secs: u64,
    /// Most established connections in total. Default: 256.
    pub max_connections: u32,
    /// Most established connections with one peer. Default: 4.
    pub max_connections_per_peer: u32,
    /// Most outgoing connections being set up at once. Default: 32.
    pub max_pending_dials: u32,
    /// Most incoming connections being set up at once. Default: 64.
    pub max_pending_incoming: u32,
}

impl Default for Network {
    fn default() -> Self {
        Self {
            tcp_port: 0,
            quic_port: 0,
            listen: Vec::new(),
            announce: Vec::new(),
            mdns: true,
            idle_connection_timeout_secs: 120,
            request_timeout_secs: 20,
            max_connections: 256,
            max_connections_per_peer: 4,
            max_pending_dials: 32,
            max_pending_incoming: 64,
        }
    }
}

impl Network {
    /// The addresses to listen on: `listen` if set, else TCP and QUIC on all
    /// IPv4 interfaces at the configured ports.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        if !self.listen.is_empty() {
            // Validated at load; an unparsable entry cannot reach here.
            return self.listen.iter().filter_map(|a| a.parse().ok()).collect();
        }
        [
            format!("/ip4/0.0.0.0/tcp/{}", self.tcp_port),
            format!("/ip4/0.0.0.0/udp/{}/quic-v1", self.quic_port),
        ]
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect()
    }

    /// Extra addresses to advertise.
    pub fn announce_addrs(&self) -> Vec<Multiaddr> {
        self.announce
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    }

    pub fn idle_connection_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_connection_timeout_secs)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}

/// Delivery of envelopes: retries, batching, address and ticket lifetimes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Delivery {
    /// First retry delay after a failed delivery, in milliseconds. Default: 250.
    pub retry_initial_ms: u64,
    /// Longest retry delay (backoff doubles up to this), in milliseconds.
    /// A reconnecting peer is retried at once whatever the delay. Default: 15000.
    pub retry_max_ms: u64,
    /// Most envelopes sent to one peer in one request. Default: 128.
    pub max_batch: u32,
    /// How long an invitation ticket stays valid, in seconds. Default: 259200 (3 days).
    pub ticket_ttl_secs: u64,
    /// How long an ephemeral delivery address stays valid, in seconds; it is
    /// rotated when half of that has passed. Default: 604800 (7 days).
    pub ephemeral_address_ttl_secs: u64,
    /// How long a long-term delivery address stays valid, in seconds.
    /// Default: 31536000 (365 days).
    pub long_term_address_ttl_secs: u64,
    /// How long `accept` waits for the inviter's node to answer before
    /// leaving the answer queued, in seconds. Default: 10.
    pub accept_wait_secs: u64,
    /// How long a group commit waits for the group's ordering service before
    /// moving to the next member in line, in milliseconds. Default: 10000.
    pub ordering_timeout_ms: u64,
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            retry_initial_ms: 250,
            retry_max_ms: 15_000,
            max_batch: 128,
            ticket_ttl_secs: 3 * 24 * 3600,
            ephemeral_address_ttl_secs: 7 * 24 * 3600,
            long_term_address_ttl_secs: 365 * 24 * 3600,
            accept_wait_secs: 10,
            ordering_timeout_ms: 10_000,
        }
    }
}

impl Delivery {
    pub fn retry_initial(&self) -> Duration {
        Duration::from_millis(self.retry_initial_ms)
    }
    pub fn retry_max(&self) -> Duration {
        Duration::from_millis(self.retry_max_ms)
    }
    pub fn ticket_ttl(&self) -> Duration {
        Duration::from_secs(self.ticket_ttl_secs)
    }
    pub fn ephemeral_address_ttl(&self) -> Duration {
        Duration::from_secs(self.ephemeral_address_ttl_secs)
    }
    pub fn long_term_address_ttl(&self) -> Duration {
        Duration::from_secs(self.long_term_address_ttl_secs)
    }
    pub fn accept_wait(&self) -> Duration {
        Duration::from_secs(self.accept_wait_secs)
    }
    pub fn ordering_timeout(&self) -> Duration {
        Duration::from_millis(self.ordering_timeout_ms)
    }
}

impl Config {
    /// A configuration for a new node of `name`, otherwise all defaults.
    pub fn new(name: &str) -> Self {
        let mut config = Self::default();
        config.profile.name = name.to_string();
        config
    }

    /// Reads `config.toml` from the data directory (a missing file means all
    /// defaults), applies `PROTONODE_<SECTION>_<KEY>` overrides read through
    /// `env`, and validates the result.
    pub fn load(paths: &Paths, env: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let path = paths.config_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(Error::Read { path, source }),
        };
        Self::from_toml_with_env(&text, &path, env)
    }

    /// Parses TOML text, applies environment overrides and validates.
    /// `origin` names the text in error messages.
    pub fn from_toml_with_env(
        text: &str,
        origin: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, Error> {
        let parse_error = |message: String| Error::Parse {
            path: origin.to_path_buf(),
            message,
        };
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            parse_error(e.message().to_string() + &line_hint(text, e.span()))
        })?;
        let from_env = apply_env_overrides(&mut table, &env)?;
        let config: Config = match table.clone().try_into() {
            Ok(config) => config,
            Err(e) => {
                let e: toml::de::Error = e;
                // serde names the wrong type or range, not where it is.
                return Err(match culprit(&table) {
                    Some((section, key, message)) => {
                        match from_env
                            .into_iter()
                            .find(|o| o.section == section && o.key == key)
                        {
                            Some(o) => Error::Env {
                                var: o.var,
                                value: o.raw,
                                expected: format!("a valid {section}.{key} ({message})"),
                            },
                            None => parse_error(format!(
                                "{section}.{key}: {message}{}",
                                key_line_hint(text, &section, &key)
                            )),
                        }
                    }
                    None => parse_error(e.message().to_string()),
                });
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks every value once, so that later code can rely on them.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |key: &'static str, problem: String| Err(Error::Invalid { key, problem });
        let p = &self.profile;
        check_text("profile.name", &p.name, 1, MAX_NAME_CHARS)?;
        if let Some(pronouns) = &p.pronouns {
            check_text("profile.pronouns", pronouns, 1, MAX_PRONOUNS_CHARS)?;
        }
        if let Some(emoji) = &p.emoji {
            check_text("profile.emoji", emoji, 1, MAX_EMOJI_CHARS)?;
            // Letters and digits are a monogram's; an emoji is a picture.
            if emoji.is_ascii() {
                return invalid(
                    "profile.emoji",
                    format!("{emoji:?} is not an emoji; for letters, set profile.monogram"),
                );
            }
        }
        if let Some(monogram) = &p.monogram {
            check_text("profile.monogram", monogram, 1, MAX_MONOGRAM_CHARS)?;
        }
        let n = &self.network;
        for (key, list) in [
            ("network.listen", &n.listen),
            ("network.announce", &n.announce),
        ] {
            for addr in list {
                if let Err(e) = Multiaddr::from_str(addr) {
                    return invalid(key, format!("{addr:?} is not a multiaddr ({e})"));
                }
            }
        }
        for (key, value) in [
            (
                "network.idle_connection_timeout_secs",
                n.idle_connection_timeout_secs,
            ),
            ("network.request_timeout_secs", n.request_timeout_secs),
            ("network.max_connections", u64::from(n.max_connections)),
            (
                "network.max_connections_per_peer",
                u64::from(n.max_connections_per_peer),
            ),
            ("network.max_pending_dials", u64::from(n.max_pending_dials)),
            (
                "network.max_pending_incoming",
                u64::from(n.max_pending_incoming),
            ),
        ] {
            if value == 0 {
                return invalid(key, "must be at least 1".into());
            }
        }
        let d = &self.delivery;
        if d.retry_initial_ms == 0 {
            return invalid("delivery.retry_initial_ms", "must be at least 1".into());
        }
        if d.retry_max_ms < d.retry_initial_ms {
            return invalid(
                "delivery.retry_max_ms",
                format!(
                    "{} is less than delivery.retry_initial_ms ({})",
                    d.retry_max_ms, d.retry_initial_ms
                ),
            );
        }
        if d.ordering_timeout_ms < 100 {
            return invalid(
                "delivery.ordering_timeout_ms",
                format!("{} ms is too short (at least 100)", d.ordering_timeout_ms),
            );
        }
        // A command waits this long for the other node; its client gives
        // up on the daemon a while after that (node's `answer_within`).
        if d.accept_wait_secs > MAX_ACCEPT_WAIT_SECS {
            return invalid(
                "delivery.accept_wait_secs",
                format!(
                    "{} seconds is more than {MAX_ACCEPT_WAIT_SECS} (ten minutes)",
                    d.accept_wait_secs
                ),
            );
        }
        if !(1..=1024).contains(&d.max_batch) {
            return invalid(
                "delivery.max_batch",
                format!("{} is not in 1..=1024", d.max_batch),
            );
        }
        if !(60..=MAX_TICKET_TTL_SECS).contains(&d.ticket_ttl_secs) {
            return invalid(
                "delivery.ticket_ttl_secs",
                format!(
                    "{} seconds is not in 60..={MAX_TICKET_TTL_SECS} (a minute to a year)",
                    d.ticket_ttl_secs
                ),
            );
        }
        for (key, value) in [
            (
                "delivery.ephemeral_address_ttl_secs",
                d.ephemeral_address_ttl_secs,
            ),
            (
                "delivery.long_term_address_ttl_secs",
                d.long_term_address_ttl_secs,
            ),
        ] {
            if value < 60 {
                return invalid(key, format!("{value} seconds is too short (at least 60)"));
            }
        }
        if d.long_term_address_ttl_secs < d.ephemeral_address_ttl_secs {
            return invalid(
                "delivery.long_term_address_ttl_secs",
                "must not be shorter than delivery.ephemeral_address_ttl_secs".into(),
            );
        }
        Ok(())
    }

    /// Writes a new configuration file, documented with comments. Refuses to
    /// overwrite an existing file.
    pub fn write_new(&self, paths: &Paths) -> Result<(), Error> {
        use std::io::Write as _;
        let path = paths.config_file();
        let write_error = |source| Error::Write {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(write_error)?;
        file.write_all(self.to_documented_toml().as_bytes())
            .map_err(write_error)?;
        file.sync_all().map_err(write_error)
    }

    /// The configuration as TOML, every key preceded by what it means.
    pub fn to_documented_toml(&self) -> String {
        let mut out = String::from(
            "# protonode configuration. Every key can be overridden by an environment\n\
             # variable PROTONODE_<SECTION>_<KEY>, e.g. PROTONODE_NETWORK_MDNS=false.\n\n",
        );
        let table = toml::Table::try_from(self).unwrap_or_default();
        for (section, docs) in SECTION_DOCS {
            let _ = writeln!(out, "[{section}]");
            let values = table.get(*section).and_then(|v| v.as_table());
            for (key, doc) in *docs {
                let _ = writeln!(out, "# {doc}");
                match values.and_then(|t| t.get(*key)) {
                    Some(value) => {
                        let _ = writeln!(out, "{key} = {value}");
                    }
                    None => {
                        let _ = writeln!(out, "# {key} =");
                    }
                }
            }
            out.push('\n');
        }
        out
    }
}

/// Documentation of each key, in the order the file lists them. The field
/// docs above are the source of truth; these are their one-line forms.
const SECTION_DOCS: &[(&str, &[(&str, &str)])] = &[
    (
        "profile",
        &[
            ("name", "Preferred name shown to new contacts."),
            ("pronouns", "Optional pronouns, e.g. \"she/her\"."),
            ("emoji", "Optional emoji picture, e.g. \"🦊\"."),
            ("monogram", "Optional monogram picture (1 to 3 characters)."),
        ],
    ),
    (
        "network",
        &[
            (
                "tcp_port",
                "TCP port on all IPv4 interfaces (0: random at each start).",
            ),
            (
                "quic_port",
                "UDP port for QUIC on all IPv4 interfaces (0: random at each start).",
            ),
            (
                "listen",
                "Listen multiaddrs replacing the two above when not empty.",
            ),
            (
                "announce",
                "Extra multiaddrs to advertise in invitations (e.g. a forwarded port).",
            ),
            ("mdns", "Discover peers on the local network with mDNS."),
            (
                "idle_connection_timeout_secs",
                "Seconds an idle connection stays open.",
            ),
            (
                "request_timeout_secs",
                "Seconds to wait for a peer to answer a delivery.",
            ),
            ("max_connections", "Most established connections in total."),
            (
                "max_connections_per_peer",
                "Most established connections with one peer.",
            ),
            (
                "max_pending_dials",
                "Most outgoing connections being set up at once.",
            ),
            (
                "max_pending_incoming",
                "Most incoming connections being set up at once.",
            ),
        ],
    ),
    (
        "delivery",
        &[
            (
                "retry_initial_ms",
                "First retry delay after a failed delivery (ms).",
            ),
            (
                "retry_max_ms",
                "Longest retry delay (ms); a reconnecting peer is retried at once.",
            ),
            (
                "max_batch",
                "Most envelopes sent to one peer in one request.",
            ),
            (
                "ticket_ttl_secs",
                "How long an invitation ticket stays valid (s).",
            ),
            (
                "ephemeral_address_ttl_secs",
                "Lifetime of an ephemeral delivery address (s); rotated at half.",
            ),
            (
                "long_term_address_ttl_secs",
                "Lifetime of a long-term delivery address (s).",
            ),
            (
                "accept_wait_secs",
                "How long `accept` waits for the inviter's node before queueing (s).",
            ),
            (
                "ordering_timeout_ms",
                "How long a group change waits for the group's ordering node before trying the next member in line (ms).",
            ),
        ],
    ),
];

/// Whether a name (or pronouns, a monogram, a group name) could display
/// as something it is not, or as nothing:
///
/// - a control character;
/// - a character that embeds, overrides or isolates the direction of the
///   text around it (U+202A to U+202E, U+2066 to U+2069: "\u{202e}evil"
///   displays as "live");
/// - an invisible one: any Unicode format character (zero-width space,
///   word joiner, BOM, soft hyphen, tags, ...) but those below, and those
///   that show as blank (Hangul fillers, the braille blank, the combining
///   grapheme joiner, Khmer's inherent vowels, Mongolian variation
///   selectors, the ideographic variation selectors);
/// - a joiner (U+200C, U+200D) not between two characters beyond ASCII,
///   or a variation selector (U+FE00 to U+FE0F) after an ASCII letter:
///   between Latin letters they change nothing, so "A\u{200d}B" would pass
///   for "AB";
/// - nothing visible at all (only spaces, joiners and marks).
///
/// Allowed: the direction marks U+200E, U+200F and U+061C, which a
/// right-to-left name may need, and the joiners and variation selectors
/// where scripts and emoji sequences use them ("👩\u{200d}🔬", Persian
/// "\u{200c}").
pub fn misleading_text(value: &str) -> bool {
    let chars: Vec<char> = value.chars().collect();
    let beyond_ascii = |c: Option<&char>| c.is_some_and(|c| !c.is_ascii() && !c.is_whitespace());
    let mut visible = false;
    for (i, c) in chars.iter().enumerate() {
        let (before, after) = (
            i.checked_sub(1).and_then(|j| chars.get(j)),
            chars.get(i + 1),
        );
        let refused = match *c {
            '\u{200c}' | '\u{200d}' => !(beyond_ascii(before) && beyond_ascii(after)),
            '\u{fe00}'..='\u{fe0f}' => before.is_none_or(|b| b.is_ascii_alphabetic()),
            '\u{200e}' | '\u{200f}' | '\u{061c}' => false,
            c => c.is_control() || invisible(c),
        };
        if refused {
            return true;
        }
        visible |= !c.is_whitespace()
            && !matches!(c, '\u{200c}'..='\u{200f}' | '\u{061c}' | '\u{fe00}'..='\u{fe0f}');
    }
    !visible
}

/// Format characters (general category Cf) and characters that show as
/// blank; see [`misleading_text`].
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00ad}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061c}'
            | '\u{06dd}'
            | '\u{070f}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08e2}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{110bd}'
            | '\u{110cd}'
            | '\u{13430}'..='\u{1343f}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0001}'
            | '\u{e0020}'..='\u{e007f}'
            // Not format characters, but blank or invisible on their own.
            | '\u{034f}'
            | '\u{115f}'
            | '\u{1160}'
            | '\u{17b4}'
            | '\u{17b5}'
            | '\u{180b}'..='\u{180d}'
            | '\u{180f}'
            | '\u{2800}'
            | '\u{3164}'
            | '\u{ffa0}'
            | '\u{e0100}'..='\u{e01ef}'
    )
}

fn check_text(key: &'static str, value: &str, min: usize, max: usize) -> Result<(), Error> {
    let chars = value.chars().count();
    if chars == 0 && min > 0 {
        return Err(Error::Invalid {
            key,
            problem: "is missing or empty".into(),
        });
    }
    if chars < min || chars > max {
        return Err(Error::Invalid {
            key,
            problem: format!("must be {min} to {max} characters, not {chars}"),
        });
    }
    if !value.is_empty() && misleading_text(value) {
        return Err(Error::Invalid {
            key,
            problem: "must show something, and not contain control characters, invisible ones, or ones that override the direction of the text".into(),
        });
    }
    if value.trim() != value {
        return Err(Error::Invalid {
            key,
            problem: "must not start or end with white space".into(),
        });
    }
    Ok(())
}

/// A key set by an environment variable.
struct EnvOverride {
    section: &'static str,
    key: &'static str,
    var: String,
    raw: String,
}

/// Refuses a variable among `names` that starts like an override of a
/// section (`PROTONODE_NETWORK_…`) but names none of its keys, such as a
/// misspelt one, which would otherwise be ignored without a word, as an
/// unknown key in the file is refused. Other `PROTONODE_` variables (the
/// data directory, the tests' and benchmarks' own) are not overrides.
pub fn check_env_names(names: impl IntoIterator<Item = String>) -> Result<(), Error> {
    for var in names {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if let Some(suggested) = misspelt_section(rest) {
            return Err(Error::MisspeltEnvSection {
                var,
                suggested,
                known: SECTION_DOCS
                    .iter()
                    .map(|(s, _)| format!("{ENV_PREFIX}{}_…", s.to_uppercase()))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        for (section, keys) in SECTION_DOCS {
            let Some(key) = rest
                .strip_prefix(&section.to_uppercase())
                .and_then(|r| r.strip_prefix('_'))
            else {
                continue;
            };
            let env_name = |k: &str| format!("{ENV_PREFIX}{section}_{k}").to_uppercase();
            // Overrides are looked up by their upper-case names only.
            if !keys.iter().any(|(k, _)| k.to_uppercase() == key) {
                return Err(Error::UnknownEnv {
                    known: keys
                        .iter()
                        .map(|(k, _)| env_name(k))
                        .collect::<Vec<_>>()
                        .join(", "),
                    var,
                    section,
                });
            }
        }
    }
    Ok(())
}

/// For the part of a variable's name after `PROTONODE_` whose first word
/// is no section but a near miss of one (`NETWRK_MDNS`): the variable
/// with that word spelt right. Words far from every section (`DATA_DIR`,
/// the tests' `SEED`) are other variables, none of the config's business.
fn misspelt_section(rest: &str) -> Option<String> {
    let (word, tail) = rest.split_once('_')?;
    let word = word.to_lowercase();
    if SECTION_DOCS.iter().any(|(s, _)| *s == word) {
        return None;
    }
    SECTION_DOCS
        .iter()
        .find(|(s, _)| strsim::damerau_levenshtein(s, &word) <= 2)
        .map(|(s, _)| format!("{ENV_PREFIX}{}_{tail}", s.to_uppercase()))
}

/// Applies `PROTONODE_<SECTION>_<KEY>` to `table`. The type of each key is
/// taken from the defaults, so that a value such as "false" or "4001" is read
/// as the right TOML type; lists are comma-separated.
fn apply_env_overrides(
    table: &mut toml::Table,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Vec<EnvOverride>, Error> {
    let mut applied = Vec::new();
    let defaults = toml::Table::try_from(Config::new("-")).unwrap_or_default();
    for (section, keys) in SECTION_DOCS {
        for (key, _) in *keys {
            let var = format!("{ENV_PREFIX}{}_{}", section, key).to_uppercase();
            let Some(raw) = env(&var) else { continue };
            let default = defaults
                .get(*section)
                .and_then(|s| s.as_table())
                .and_then(|s| s.get(*key));
            let value = env_value(&var, &raw, default)?;
            applied.push(EnvOverride {
                section,
                key,
                var,
                raw,
            });
            let entry = table
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry.as_table_mut() {
                Some(section_table) => {
                    section_table.insert(key.to_string(), value);
                }
                None => {
                    return Err(Error::Invalid {
                        key: section,
                        problem: "must be a table".into(),
                    })
                }
            }
        }
    }
    Ok(applied)
}

fn env_value(var: &str, raw: &str, default: Option<&toml::Value>) -> Result<toml::Value, Error> {
    let bad = |expected: &str| Error::Env {
        var: var.to_string(),
        value: raw.to_string(),
        expected: expected.to_string(),
    };
    Ok(match default {
        Some(toml::Value::Boolean(_)) => match raw.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => toml::Value::Boolean(true),
            "0" | "false" | "no" | "off" => toml::Value::Boolean(false),
            _ => return Err(bad("true or false")),
        },
        Some(toml::Value::Integer(_)) => toml::Value::Integer(
            raw.trim()
                .parse::<i64>()
                .ok()
                .filter(|v| *v >= 0)
                .ok_or_else(|| bad("a non-negative whole number"))?,
        ),
        Some(toml::Value::Array(_)) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
        // Strings and optional strings (absent from the defaults).
        _ => toml::Value::String(raw.to_string()),
    })
}

/// The first key of `table` whose value alone, among defaults, makes a
/// configuration that does not decode, with serde's reason.
fn culprit(table: &toml::Table) -> Option<(String, String, String)> {
    let defaults = toml::Table::try_from(Config::new("-")).ok()?;
    for (section, values) in table {
        let Some(values) = values.as_table() else {
            continue;
        };
        for (key, value) in values {
            let mut one = defaults.clone();
            if let Some(t) = one.get_mut(section).and_then(|s| s.as_table_mut()) {
                t.insert(key.clone(), value.clone());
            }
            if let Err(e) = one.try_into::<Config>() {
                let e: toml::de::Error = e;
                return Some((section.clone(), key.clone(), plain_types(e.message())));
            }
        }
    }
    None
}

/// serde's message with Rust's type names said in words ("expected u16"
/// means a port number or the like to whoever edits a config file).
fn plain_types(message: &str) -> String {
    [
        ("expected u16", "expected a whole number from 0 to 65535"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected usize", "expected a whole number, 0 or more"),
    ]
    .iter()
    .fold(message.to_string(), |m, (rust, words)| {
        m.replace(rust, words)
    })
}

/// " (line N)" of `key` in `section` of the file, when it can be found.
fn key_line_hint(text: &str, section: &str, key: &str) -> String {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.trim().to_string();
        } else if current == section
            && line
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            return format!(" (line {})", i + 1);
        }
    }
    String::new()
}

fn line_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    /// A misspelt override is refused, naming the section's variables;
    /// other `PROTONODE_` variables are none of the config's business.
    #[test]
    fn a_misspelt_override_is_refused() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_env_names(names(&[
            "PROTONODE_NETWORK_MDNS",
            "PROTONODE_DELIVERY_ORDERING_TIMEOUT_MS",
            "PROTONODE_DATA_DIR",
            "PROTONODE_BENCH_SAMPLES",
            "PROTONODE_SEED",
            "HOME",
        ]))
        .is_ok());
        assert!(check_env_names(names(&["PROTONODE_NETWORK_Mdns"])).is_err());
        let err = check_env_names(names(&["PATH", "PROTONODE_NETWORK_MDSN"])).unwrap_err();
        assert!(
            matches!(&err, Error::UnknownEnv { var, section: "network", .. } if var == "PROTONODE_NETWORK_MDSN"),
            "{err:?}"
        );
        assert!(err.to_string().contains("PROTONODE_NETWORK_MDNS"), "{err}");
        // A misspelt section too, with the spelling meant.
        for (var, meant) in [
            ("PROTONODE_NETWRK_MDNS", "PROTONODE_NETWORK_MDNS"),
            (
                "PROTONODE_DELIVRY_ORDERING_TIMEOUT_MS",
                "PROTONODE_DELIVERY_ORDERING_TIMEOUT_MS",
            ),
            ("PROTONODE_PROFLE_NAME", "PROTONODE_PROFILE_NAME"),
        ] {
            let err = check_env_names(names(&[var])).unwrap_err();
            assert!(
                matches!(&err, Error::MisspeltEnvSection { suggested, .. } if suggested == meant),
                "{err:?}"
            );
        }
    }

    #[test]
    fn every_key_is_written_to_a_new_file_and_read_from_the_environment() {
        let defaults = toml::Table::try_from(Config::new("Alex")).unwrap();
        for (section, values) in &defaults {
            let documented = SECTION_DOCS
                .iter()
                .find(|(s, _)| s == section)
                .map(|(_, keys)| keys.iter().map(|(k, _)| *k).collect::<Vec<_>>())
                .unwrap_or_default();
            for key in values.as_table().unwrap().keys() {
                assert!(
                    documented.contains(&key.as_str()),
                    "{section}.{key} is missing from SECTION_DOCS"
                );
            }
        }
        let bad = Config::from_toml_with_env(
            "[profile]\nname = \"Alex\"\n",
            Path::new("t"),
            env_of(&[("PROTONODE_DELIVERY_ORDERING_TIMEOUT_MS", "abc")]),
        );
        assert!(
            matches!(&bad, Err(Error::Env { var, .. }) if var == "PROTONODE_DELIVERY_ORDERING_TIMEOUT_MS"),
            "{bad:?}"
        );
    }

    #[test]
    fn a_value_of_the_wrong_type_or_range_is_named_with_its_source() {
        let text = "[profile]\nname = \"Alex\"\n\n[network]\nmdns = true\ntcp_port = \"abc\"\n";
        let err = Config::from_toml_with_env(text, Path::new("t"), env_of(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("network.tcp_port") && err.contains("(line 6)"),
            "{err}"
        );

        let text = "[profile]\nname = \"Alex\"\n";
        let err = Config::from_toml_with_env(
            text,
            Path::new("t"),
            env_of(&[("PROTONODE_NETWORK_TCP_PORT", "70000")]),
        )
        .unwrap_err();
        match err {
            Error::Env { var, expected, .. } => {
                assert_eq!(var, "PROTONODE_NETWORK_TCP_PORT");
                assert!(expected.contains("network.tcp_port"), "{expected}");
            }
            other => panic!("the environment variable is to blame, not the file: {other}"),
        }

        let text = "[profile]\nname = \"Alex\"\n[delivery]\nbogus = 1\n";
        let err = Config::from_toml_with_env(text, Path::new("t"), env_of(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("delivery.bogus") && err.contains("(line 4)"),
            "{err}"
        );
    }

    #[test]
    fn documented_file_round_trips_to_the_same_config() {
        let mut config = Config::new("Alex");
        config.network.tcp_port = 4001;
        config.profile.emoji = Some("🦊".into());
        let text = config.to_documented_toml();
        let back = Config::from_toml_with_env(&text, Path::new("t"), env_of(&[])).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn environment_overrides_file_with_typed_values() {
        let text = "[profile]\nname = \"Alex\"\n[network]\nmdns = true\n";
        let env = env_of(&[
            ("PROTONODE_NETWORK_MDNS", "false"),
            ("PROTONODE_NETWORK_TCP_PORT", "4100"),
            (
                "PROTONODE_NETWORK_LISTEN",
                "/ip4/127.0.0.1/tcp/0, /ip4/127.0.0.1/udp/0/quic-v1",
            ),
            ("PROTONODE_PROFILE_PRONOUNS", "they/them"),
        ]);
        let config = Config::from_toml_with_env(text, Path::new("t"), env).unwrap();
        assert!(!config.network.mdns);
        assert_eq!(config.network.tcp_port, 4100);
        assert_eq!(config.network.listen_addrs().len(), 2);
        assert_eq!(config.profile.pronouns.as_deref(), Some("they/them"));
    }

    #[test]
    fn bad_environment_value_names_the_variable() {
        let env = env_of(&[("PROTONODE_NETWORK_MDNS", "maybe")]);
        let err =
            Config::from_toml_with_env("[profile]\nname = \"A\"", Path::new("t"), env).unwrap_err();
        assert!(err.to_string().contains("PROTONODE_NETWORK_MDNS"), "{err}");
    }

    #[test]
    fn unknown_key_is_refused_with_its_name() {
        let text = "[profile]\nname = \"A\"\n[network]\nmnds = false\n";
        let err = Config::from_toml_with_env(text, Path::new("t"), env_of(&[])).unwrap_err();
        assert!(err.to_string().contains("mnds"), "{err}");
    }

    #[test]
    fn invalid_values_are_refused_with_the_key() {
        let cases = [
            ("[profile]\nname = \"\"", "profile.name"),
            (
                "[profile]\nname = \"A\"\n[network]\nlisten = [\"nope\"]",
                "network.listen",
            ),
            (
                "[profile]\nname = \"A\"\n[delivery]\nretry_max_ms = 1",
                "delivery.retry_max_ms",
            ),
            (
                "[profile]\nname = \"A\"\n[delivery]\nmax_batch = 0",
                "delivery.max_batch",
            ),
            (
                "[profile]\nname = \"A\"\n[network]\nmax_connections = 0",
                "network.max_connections",
            ),
            (
                "[profile]\nname = \"A\"\n[delivery]\nticket_ttl_secs = 0",
                "delivery.ticket_ttl_secs",
            ),
            ("[profile]\nname = \"A\"\nemoji = \"abc\"", "profile.emoji"),
            // "\u{202e}evil" shows as "live".
            ("[profile]\nname = \"\\u202eevil\"", "profile.name"),
            ("[profile]\nname = \"A\\u2066B\"", "profile.name"),
            // Shows as "Alex", as another contact may.
            ("[profile]\nname = \"Al\\u200bex\"", "profile.name"),
            ("[profile]\nname = \"\\u3164\"", "profile.name"),
            // "AB", and blank.
            ("[profile]\nname = \"A\\u200dB\"", "profile.name"),
            ("[profile]\nname = \"\\u200d\"", "profile.name"),
            ("[profile]\nname = \"\\u2800\"", "profile.name"),
            (
                "[profile]\nname = \"A\"\n[delivery]\nticket_ttl_secs = 31536001",
                "delivery.ticket_ttl_secs",
            ),
        ];
        for (text, key) in cases {
            let err = Config::from_toml_with_env(text, Path::new("t"), env_of(&[])).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn a_data_dir_too_long_for_a_socket_is_refused() {
        let ok = Paths::new("/tmp/".to_string() + &"d".repeat(102 - "/control.sock".len()));
        assert_eq!(ok.control_socket().as_os_str().len(), 107);
        assert!(ok.check_socket_path().is_ok());
        let long = Paths::new("/tmp/".to_string() + &"d".repeat(103 - "/control.sock".len()));
        let err = long.check_socket_path().unwrap_err();
        assert!(err.to_string().contains("108 bytes"), "{err}");
    }

    #[test]
    fn malformed_toml_reports_the_line() {
        let err = Config::from_toml_with_env("[profile]\nname = ", Path::new("t"), env_of(&[]))
            .unwrap_err();
        assert!(err.to_string().contains("line"), "{err}");
    }

    #[test]
    fn data_dir_comes_from_flag_then_env() {
        let env = env_of(&[(DATA_DIR_ENV, "/from/env")]);
        let flag = Paths::resolve(Some("/from/flag".into()), &env).unwrap();
        assert_eq!(flag.data_dir(), Path::new("/from/flag"));
        let from_env = Paths::resolve(None, &env).unwrap();
        assert_eq!(from_env.data_dir(), Path::new("/from/env"));
    }

    #[test]
    fn write_new_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        Config::new("Alex").write_new(&paths).unwrap();
        assert!(matches!(
            Config::new("Blair").write_new(&paths),
            Err(Error::Write { .. })
        ));
        let loaded = Config::load(&paths, |_| None).unwrap();
        assert_eq!(loaded.profile.name, "Alex");
    }
}
