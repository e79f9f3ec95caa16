//! Test harness: real `protonode` daemons as separate processes, driven
//! through the CLI exactly as a person would.
//!
//! Every wait has a deadline; a daemon is killed when its handle drops, so
//! a failing test leaves nothing running. Daemons listen on 127.0.0.1 at
//! fixed ports chosen here, so that a restarted daemon is found again at
//! the addresses its contacts already have.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a daemon may take to print its ready line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one CLI command may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// The `protonode` binary of this build, built on first use if missing.
pub fn protonode_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/<profile>/deps/<test binary> → target/<profile>/protonode
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile> directory");
        let bin = profile_dir.join("protonode");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "protonode", "--bin", "protonode"])
            .args(if profile_dir.ends_with("release") {
                &["--release"][..]
            } else {
                &[][..]
            })
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            // Cargo sets this for the test; passed on, it changes what some
            // build scripts see and costs a rebuild of the binary per test file.
            .env_remove("CARGO_MANIFEST_DIR")
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building protonode failed");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
}

/// A port free for both TCP and UDP on 127.0.0.1, and never handed out
/// before in this process: the kernel may offer a port again once the
/// probe is closed, while the first person given it has not started yet.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = tcp.local_addr().expect("addr").port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port)
        {
            return port;
        }
    }
}

/// An initialised data directory of one person, removed when dropped.
pub struct Person {
    pub name: String,
    dir: tempfile::TempDir,
    pub port: u16,
    /// Extra environment for this person's daemon (config overrides).
    pub env: Vec<(String, String)>,
}

impl Person {
    /// `protonode init --name NAME` in a fresh temporary directory.
    pub fn init(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("pn-{}-", name.to_lowercase()))
            .tempdir()
            .expect("tempdir");
        let p = Self {
            name: name.to_string(),
            dir,
            port: free_port(),
            env: Vec::new(),
        };
        let out = p.cli(&["init", "--name", name]);
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        p
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sets a configuration override for this person's daemon, e.g.
    /// `("PROTONODE_DELIVERY_RETRY_MAX_MS", "1000")`.
    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// `groups --json`.
    pub fn groups(&self) -> Vec<Value> {
        self.ok(&["groups"]).as_array().cloned().unwrap_or_default()
    }

    /// The listen flags of this person's daemon (loopback, fixed ports).
    pub fn listen_args(&self) -> Vec<String> {
        vec![
            "--listen".into(),
            format!("/ip4/127.0.0.1/tcp/{}", self.port),
            "--listen".into(),
            format!("/ip4/127.0.0.1/udp/{}/quic-v1", self.port),
        ]
    }

    /// Starts this person's daemon with mDNS off.
    pub fn start(&self) -> Daemon {
        let mut args = self.listen_args();
        args.push("--no-mdns".into());
        Daemon::start(self, &args, None)
    }

    /// Runs a CLI command against this person's data directory.
    pub fn cli(&self, args: &[&str]) -> Output {
        run_cli(self.data_dir(), args)
    }

    /// Runs a CLI command with `--json` and parses its output; the error is
    /// the command's stderr.
    pub fn json(&self, args: &[&str]) -> Result<Value, String> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "stdout is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Like [`Person::json`], panicking with the error.
    pub fn ok(&self, args: &[&str]) -> Value {
        self.json(args)
            .unwrap_or_else(|e| panic!("{} `{}` failed: {e}", self.name, args.join(" ")))
    }

    /// This person invites `other`, who accepts; returns (contact id at self, contact id at other).
    pub fn befriend(&self, other: &Person) -> (String, String) {
        let ticket = self.ok(&["invite"])["ticket"]
            .as_str()
            .expect("ticket")
            .to_string();
        let accepted = other.ok(&["accept", &ticket]);
        let theirs = accepted["contact"].as_str().expect("contact").to_string();
        let ours = wait_for(Duration::from_secs(20), || {
            self.ok(&["contacts"])
                .as_array()?
                .iter()
                .find(|c| c["name"] == other.name.as_str())
                .and_then(|c| c["id"].as_str().map(String::from))
        })
        .expect("the inviter sees the new contact");
        (ours, theirs)
    }

    /// The history with a contact, as JSON messages.
    pub fn history(&self, contact: &str) -> Vec<Value> {
        self.ok(&["history", contact])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Runs `protonode watch` (`--json` when `json`), returned once it says
    /// it is subscribed: nothing that happens after is missed.
    pub fn watch(&self, json: bool) -> Watch {
        self.watch_with(json, &[])
    }

    /// [`Person::watch`] with more arguments (`--follow`).
    pub fn watch_with(&self, json: bool, more: &[&str]) -> Watch {
        let mut child = Command::new(protonode_bin())
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(if json {
                &["--json", "watch"][..]
            } else {
                &["watch"][..]
            })
            .args(more)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning protonode watch");
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.into_iter().flat_map(|e| BufReader::new(e).lines()) {
                match line {
                    Ok(line) if line.starts_with("Watching") => {
                        let _ = ready_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.into_iter().flat_map(|o| BufReader::new(o).lines()) {
                match line {
                    Ok(line) => {
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        ready_rx
            .recv_timeout(START_TIMEOUT)
            .expect("watch says when it is subscribed");
        Watch {
            child,
            lines,
            ready: ready_rx,
        }
    }
}

/// A running `protonode watch`. Killed when dropped.
pub struct Watch {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// One `()` each time it says it is subscribed (again, with --follow).
    ready: mpsc::Receiver<()>,
}

impl Watch {
    /// Whether it said it is subscribed again within `limit`.
    pub fn subscribed_again(&self, limit: Duration) -> bool {
        self.ready.recv_timeout(limit).is_ok()
    }

    /// The next line that `pick` keeps (skipping the others), or `None`
    /// after `limit`.
    pub fn next<T>(&self, limit: Duration, mut pick: impl FnMut(&str) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            if let Some(kept) = pick(&self.lines.recv_timeout(left).ok()?) {
                return Some(kept);
            }
        }
    }

    /// The next JSON event that `pick` keeps (a `--json` watch).
    pub fn next_event(
        &self,
        limit: Duration,
        mut pick: impl FnMut(&Value) -> bool,
    ) -> Option<Value> {
        self.next(limit, |line| {
            let event: Value = serde_json::from_str(line).expect("each line is JSON");
            pick(&event).then_some(event)
        })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `protonode --data-dir DIR ARGS...`; panics past [`CLI_TIMEOUT`].
pub fn run_cli(data_dir: &Path, args: &[&str]) -> Output {
    try_run_cli(data_dir, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `protonode --data-dir DIR ARGS...`, reading its output while it
/// runs (a long history is more than a pipe holds); past [`CLI_TIMEOUT`]
/// it is killed and this is an error, for callers that expect commands to
/// fail now and then (a daemon being killed under them).
pub fn try_run_cli(data_dir: &Path, args: &[&str]) -> Result<Output, String> {
    let child = Command::new(protonode_bin())
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning protonode: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(CLI_TIMEOUT) {
        Ok(out) => out.map_err(|e| format!("running protonode: {e}")),
        Err(_) => {
            // SAFETY: a signal to our own child, not reaped yet (the thread
            // waiting for it has not returned).
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
            Err(format!(
                "`protonode {}` did not finish within {CLI_TIMEOUT:?}",
                args.join(" ")
            ))
        }
    }
}

/// Polls `f` until it returns `Some`, or `None` after `limit`.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running daemon. Killed (SIGKILL) when dropped.
pub struct Daemon {
    child: Child,
    pub peer_id: String,
    stderr: mpsc::Receiver<String>,
}

impl Daemon {
    /// Starts `protonode daemon ARGS`, optionally inside a network
    /// namespace, and waits for its ready line.
    pub fn start(person: &Person, args: &[String], netns: Option<&str>) -> Self {
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(protonode_bin());
                c
            }
            None => Command::new(protonode_bin()),
        };
        let mut child = command
            .arg("--data-dir")
            .arg(person.data_dir())
            .arg("daemon")
            .args(args)
            // PROTONODE_DAEMON_LOG (a RUST_LOG filter) to see more of a run.
            .env(
                "RUST_LOG",
                std::env::var("PROTONODE_DAEMON_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(person.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the daemon");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = err_tx.send(line);
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let mut peer_id = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match line_rx.recv_timeout(left) {
                Ok(line) if line.starts_with("peer id: ") => {
                    peer_id = line["peer id: ".len()..].to_string()
                }
                Ok(line) if line == "protonode ready" => break,
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    let errors: Vec<String> = err_rx.try_iter().collect();
                    panic!(
                        "{}'s daemon did not become ready: {}",
                        person.name,
                        errors.join("\n")
                    );
                }
            }
        }
        Self {
            child,
            peer_id,
            stderr: err_rx,
        }
    }

    /// The daemon's process id (for reading `/proc/PID/status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for a graceful exit; returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        // SAFETY: sending a signal to our own child process by its pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    self.kill9();
                    return false;
                }
            }
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What the daemon wrote to stderr so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A digest of every table of a node's database (the daemon must be stopped).
pub fn store_digest(data_dir: &Path) -> [u8; 32] {
    let store = actors::store::Store::open(&data_dir.join("protonode.redb")).expect("open db");
    store.digest().expect("digest")
}

/// A network namespace with only loopback up, deleted when dropped. `None`
/// where the machine does not allow namespaces (the caller skips, saying why).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Option<Self> {
        let name = format!("pn-{:08x}", rand::random::<u32>());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .ok()?
            .success();
        if !ok {
            return None;
        }
        let ns = Self { name };
        let up = Command::new("ip")
            .args(["-n", &ns.name, "link", "set", "lo", "up"])
            .status()
            .ok()?
            .success();
        up.then_some(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

impl Daemon {
    /// Starts a second daemon on the same data directory, which must refuse;
    /// returns what it said.
    pub fn try_second(person: &Person) -> String {
        let out = run_cli(
            person.data_dir(),
            &["daemon", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"],
        );
        assert!(!out.status.success(), "a second daemon must not start");
        String::from_utf8_lossy(&out.stderr).to_string()
    }
}

/// Where `person`'s running daemon takes deliveries: its peer id and listen
/// addresses, from `status`.
pub fn delivery_target(person: &Person) -> (transports::PeerId, Vec<transports::Multiaddr>) {
    let status = person.ok(&["status"]);
    let peer = status["peer_id"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .expect("status shows a peer id");
    let addrs = status["listen"]
        .as_array()
        .expect("status shows listen addresses")
        .iter()
        .filter_map(|a| a.as_str()?.parse().ok())
        .collect();
    (peer, addrs)
}

/// A bare network client on loopback (no node behind it), for sending raw
/// frames and envelopes to a daemon's delivery protocol.
pub fn raw_client(rt: &tokio::runtime::Runtime, request_timeout_secs: u64) -> transports::Client {
    let network = config::Network {
        mdns: false,
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        request_timeout_secs,
        ..Default::default()
    };
    let keypair = transports::identity::Keypair::generate_ed25519();
    let (client, _events, _task) = rt
        .block_on(transports::spawn(&network, keypair))
        .expect("starting a network client on loopback");
    client
}
