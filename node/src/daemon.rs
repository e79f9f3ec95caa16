//! `protonode init` and `protonode daemon`.
//!
//! The daemon runs the actix system on a multi-threaded tokio runtime
//! (actors on the system's arbiter; the swarm and services on tokio's
//! workers), holds an exclusive lock on the data directory, serves the
//! control socket, and on SIGINT/SIGTERM stops accepting work, stops the
//! node and removes the socket. Nothing needs flushing at shutdown: every
//! acknowledged operation is already committed.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use actors::runtime::Node;
use actors::store::Store;
use anyhow::{bail, Context as _};
use config::{Config, Paths};
use serde_json::json;
use tokio::net::UnixListener;
use transports::identity::Keypair;

/// Creates a data directory: configuration (with fixed free ports), node
/// key and an empty database. Refuses to touch an initialised one.
pub fn init(
    paths: &Paths,
    name: &str,
    pronouns: Option<String>,
    emoji: Option<String>,
) -> anyhow::Result<serde_json::Value> {
    let dir = paths.data_dir();
    not_a_file(dir)?;
    paths.check_socket_path()?;
    if paths.config_file().exists() || paths.node_key().exists() {
        bail!(
            "{} is already initialised; remove it or choose another --data-dir",
            dir.display()
        );
    }
    // init makes the directory private (0700): never someone's home or a
    // folder of other files.
    if fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
        bail!(
            "{} is not empty; choose a new or empty directory for --data-dir",
            dir.display()
        );
    }
    let mut config = Config::new(name);
    config.profile.pronouns = pronouns;
    config.profile.emoji = emoji;
    config.validate().context("the profile is not valid")?;
    let (tcp_port, quic_port) = free_ports().context("finding free ports failed")?;
    config.network.tcp_port = tcp_port;
    config.network.quic_port = quic_port;

    fs::create_dir_all(dir).with_context(|| format!("creating {} failed", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {} failed", dir.display()))?;
    let keypair = Keypair::generate_ed25519();
    write_node_key(&paths.node_key(), &keypair)?;
    config.write_new(paths)?;
    Store::open(&paths.database()).context("creating the database failed")?;
    // Private like the node key (the directory is 0700 too).
    fs::set_permissions(paths.database(), fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} failed", paths.database().display()))?;
    Ok(json!({
        "data_dir": dir.display().to_string(),
        "name": name,
        "peer_id": keypair.public().to_peer_id().to_string(),
        "tcp_port": tcp_port,
        "quic_port": quic_port,
    }))
}

/// A TCP port free on all interfaces, and a UDP port for QUIC (the same
/// number when it is free too).
fn free_ports() -> std::io::Result<(u16, u16)> {
    let tcp = std::net::TcpListener::bind("0.0.0.0:0")?;
    let port = tcp.local_addr()?.port();
    let udp = std::net::UdpSocket::bind(("0.0.0.0", port))
        .or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))?;
    Ok((port, udp.local_addr()?.port()))
}

fn write_node_key(path: &Path, keypair: &Keypair) -> anyhow::Result<()> {
    let bytes = keypair
        .to_protobuf_encoding()
        .context("encoding the node key failed")?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {} failed", path.display()))?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    Ok(())
}

/// Reads the node key.
pub fn read_node_key(path: &Path) -> anyhow::Result<Keypair> {
    let bytes = fs::read(path)
        .with_context(|| format!("reading the node key {} failed", path.display()))?;
    Keypair::from_protobuf_encoding(&bytes)
        .with_context(|| format!("the node key {} is damaged", path.display()))
}

/// Refuses a data directory path that names something other than a
/// directory (a file, say), which neither `init` nor the daemon can use.
fn not_a_file(dir: &Path) -> anyhow::Result<()> {
    match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => bail!(
            "{} is a file, not a data directory; choose another --data-dir",
            dir.display()
        ),
        _ => Ok(()),
    }
}

/// Loads the configuration of an initialised data directory.
pub fn load_config(paths: &Paths) -> anyhow::Result<Config> {
    not_a_file(paths.data_dir())?;
    if !paths.config_file().exists() {
        // `init` makes only a new or empty directory its own.
        let used = fs::read_dir(paths.data_dir()).is_ok_and(|mut d| d.next().is_some());
        if used {
            bail!(
                "{} is not a protonode data directory (it has no config.toml); name the data \
                 directory with --data-dir, or make a new one with `protonode --data-dir NEW_DIR \
                 init --name NAME`",
                paths.data_dir().display()
            );
        }
        bail!(
            "{} is not initialised; run `protonode --data-dir {} init --name NAME` first",
            paths.data_dir().display(),
            crate::shell_word(paths.data_dir())
        );
    }
    config::check_env_names(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()))?;
    Ok(Config::load(paths, |k| std::env::var(k).ok())?)
}

/// Holds the data directory's lock for the daemon's lifetime.
pub struct DirLock {
    _file: File,
}

/// Takes the data directory's lock, or says which process holds it.
pub fn lock(paths: &Paths) -> anyhow::Result<DirLock> {
    let path = paths.lock_file();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {} failed", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            // The other daemon may hold the lock and not have written its
            // pid yet: both started at once.
            let pid = match pid.trim() {
                "" => "just starting".to_string(),
                pid => format!("pid {pid}"),
            };
            bail!(
                "a daemon is already running on {} ({pid}); stop it first or use another --data-dir",
                paths.data_dir().display(),
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {} failed", path.display()))
        }
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    file.sync_all()?;
    Ok(DirLock { _file: file })
}

/// Runs the daemon in the foreground until SIGINT or SIGTERM.
pub fn run(
    paths: Paths,
    mut config: Config,
    listen: Vec<String>,
    no_mdns: bool,
    json_output: bool,
) -> anyhow::Result<()> {
    let flags = !listen.is_empty();
    if flags {
        config.network.listen = listen;
    }
    if no_mdns {
        config.network.mdns = false;
    }
    // A wrong --listen is the flag's, not the file's.
    config.validate().map_err(|e| match e {
        config::Error::Invalid { key, problem } if flags && key == "network.listen" => {
            anyhow::anyhow!("--listen: {problem}")
        }
        e => e.into(),
    })?;
    paths.check_socket_path()?;
    let _lock = lock(&paths)?;
    let keypair = read_node_key(&paths.node_key())?;
    // init made it: a database gone missing was moved or deleted, and a new
    // empty one would silently start the node with no relationships.
    if !paths.database().exists() {
        bail!(
            "the database {} is missing (moved or deleted?): put it back, or make a new node \
             with `protonode --data-dir NEW_DIR init`",
            paths.database().display()
        );
    }
    let store = Store::open(&paths.database()).context("opening the database failed")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("protonode")
        .build()
        .context("starting the async runtime failed")?;
    let system = actix::System::with_tokio_rt(move || runtime);
    system.block_on(serve(paths, config, store, keypair, json_output))
}

async fn serve(
    paths: Paths,
    config: Config,
    store: Store,
    keypair: Keypair,
    json_output: bool,
) -> anyhow::Result<()> {
    // The control socket first: a node that cannot be reached is not
    // started (and has nothing to stop if it cannot be).
    let socket = paths.control_socket();
    if socket.is_dir() {
        bail!(
            "{} is a directory, where the daemon puts its control socket: remove it",
            socket.display()
        );
    }
    // We hold the lock, so a socket file left here is from a dead daemon.
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .with_context(|| format!("opening the control socket {} failed", socket.display()))?;
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o600))?;
    let node = Node::start(store.clone(), config, keypair).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(crate::control::serve(
        listener,
        node.manager.clone(),
        node.event_sender(),
        stop_rx,
    ));

    let listen: Vec<String> = node
        .listen_addrs()
        .await
        .iter()
        .map(|a| a.to_string())
        .collect();
    if json_output {
        let _ = crate::say!(
            "{}",
            json!({ "peer_id": node.peer_id().to_string(), "listen": listen, "control_socket": socket.display().to_string(), "ready": true })
        );
    } else {
        let _ = crate::say!("peer id: {}", node.peer_id());
        for addr in &listen {
            let _ = crate::say!("listening on {addr}");
        }
        let _ = crate::say!("control socket: {}", socket.display());
        let _ = crate::say!("protonode ready");
    }

    wait_for_signal().await?;
    tracing::info!("stopping");
    // What was acknowledged but not yet processed is processed now, while
    // `watch` clients still listen, rather than at the next start.
    settle_inbox(&store, std::time::Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    node.stop().await;
    let _ = fs::remove_file(&socket);
    if !json_output {
        let _ = crate::say!("protonode stopped");
    }
    Ok(())
}

/// Waits (at most `limit`) until the inbox is empty, or stays as it is for
/// a moment: rows that wait for something (a group's later epoch, an
/// introduction) stay for the next start.
async fn settle_inbox(store: &Store, limit: std::time::Duration) {
    const STEP: std::time::Duration = std::time::Duration::from_millis(20);
    const STILL: u32 = 10;
    let count = || store.inbox_len().unwrap_or(0);
    let deadline = tokio::time::Instant::now() + limit;
    let (mut last, mut still) = (count(), 0);
    while last > 0 && still < STILL && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(STEP).await;
        let now = count();
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM failed")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT failed")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
