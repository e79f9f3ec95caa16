//! Shared pieces of the benchmarks: timing statistics and node set-up.

use std::time::Duration;

/// Median and mean of a set of durations.
pub struct Stats {
    pub median: Duration,
    pub mean: Duration,
    pub p99: Duration,
    pub samples: usize,
}

impl Stats {
    pub fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let n = samples.len().max(1);
        let total: Duration = samples.iter().sum();
        Self {
            median: samples.get(n / 2).copied().unwrap_or_default(),
            mean: total / n as u32,
            p99: samples.get(n * 99 / 100).copied().unwrap_or_default(),
            samples: samples.len(),
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "median {:>8.3} ms  mean {:>8.3} ms  p99 {:>8.3} ms  (n={})",
            ms(self.median),
            ms(self.mean),
            ms(self.p99),
            self.samples
        )
    }
}

/// A size from the environment (`PROTONODE_BENCH_…`), or its default.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// With `PROTONODE_BENCH_TIMELINE` set (to anything), every node's
/// timeline events ([`actors::TIMELINE`]) and the benchmark's own marks go
/// to stderr, with the thread and the time since the start: where an
/// operation's time goes, step by step. The events are formatted as they
/// happen, which slows the nodes a little; the figures of such a run are
/// not comparable with others.
pub fn timeline_from_env() {
    if std::env::var_os("PROTONODE_BENCH_TIMELINE").is_none() {
        return;
    }
    let filter = tracing_subscriber::EnvFilter::new(format!("{}=trace", actors::TIMELINE));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_thread_names(true)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .with_target(false)
        .with_ansi(false)
        .init();
}

/// A mark in the timeline (see [`timeline_from_env`]).
pub fn mark(what: &str) {
    tracing::trace!(target: actors::TIMELINE, "bench: {what}");
}

/// The start of a measured operation named `op`: a timeline mark and, with
/// `PROTONODE_BENCH_PERF_CONTROL` set (see [`Profiler`]), the profiler on.
pub fn measured_start(op: &str) {
    mark(&format!("{op} starts"));
    Profiler::switch(op, true);
}

/// The end of the measured operation `op` ([`measured_start`]): `what` is
/// the condition that ended it.
pub fn measured_end(op: &str, what: &str) {
    Profiler::switch(op, false);
    mark(&format!("{op} done: {what}"));
}

/// `perf record` driven through its control FIFOs, so that a profile holds
/// only the measured operations (not the set-up, floors, or checks between
/// them). `PROTONODE_BENCH_PERF_CONTROL=CTL,ACK` names the FIFOs given to
/// `perf record --control fifo:CTL,ACK -D -1`; `PROTONODE_BENCH_PERF_ONLY`
/// (optional) keeps only the operations whose name starts with it.
/// BENCHMARKS.md, "Commands", shows a whole run.
pub struct Profiler {
    control: std::fs::File,
    ack: std::io::BufReader<std::fs::File>,
    only: Option<String>,
}

impl Profiler {
    fn switch(op: &str, on: bool) {
        static PROFILER: std::sync::OnceLock<Option<std::sync::Mutex<Profiler>>> =
            std::sync::OnceLock::new();
        let profiler = PROFILER.get_or_init(|| {
            let fifos = std::env::var("PROTONODE_BENCH_PERF_CONTROL").ok()?;
            let (control, ack) = fifos
                .split_once(',')
                .expect("PROTONODE_BENCH_PERF_CONTROL is CTL,ACK (two FIFO paths)");
            let control = std::fs::OpenOptions::new()
                .write(true)
                .open(control)
                .expect("perf's control FIFO opens");
            let ack = std::fs::File::open(ack).expect("perf's ack FIFO opens");
            Some(std::sync::Mutex::new(Profiler {
                control,
                ack: std::io::BufReader::new(ack),
                only: std::env::var("PROTONODE_BENCH_PERF_ONLY").ok(),
            }))
        });
        let Some(profiler) = profiler else { return };
        let mut p = profiler.lock().expect("the profiler's lock");
        if p.only
            .as_ref()
            .is_some_and(|only| !op.starts_with(only.as_str()))
        {
            return;
        }
        use std::io::{BufRead as _, Write as _};
        let command = if on { "enable\n" } else { "disable\n" };
        p.control
            .write_all(command.as_bytes())
            .expect("perf takes a command");
        // perf answers "ack" once the command is in effect.
        let mut answer = String::new();
        p.ack.read_line(&mut answer).expect("perf acknowledges");
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A node configuration for benchmarks: loopback only, mDNS off, quick retries.
pub fn loopback_config(name: &str) -> config::Config {
    let mut config = config::Config::new(name);
    config.network.mdns = false;
    config.network.listen = vec![
        "/ip4/127.0.0.1/tcp/0".into(),
        "/ip4/127.0.0.1/udp/0/quic-v1".into(),
    ];
    config.delivery.retry_initial_ms = 20;
    config.delivery.retry_max_ms = 500;
    config
}

/// The machine, as the benchmarks print it: CPU model and cores.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

/// What this process uses now, from /proc (Linux): open file descriptors,
/// threads, and the peak resident memory.
pub struct ProcessUse {
    pub open_files: usize,
    pub threads: usize,
    pub peak_rss_mib: u64,
}

impl ProcessUse {
    pub fn now() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Self {
            open_files: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count()),
            threads: field("Threads:") as usize,
            peak_rss_mib: field("VmHWM:") / 1024,
        }
    }
}

impl std::fmt::Display for ProcessUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} open files, {} threads, peak RSS {} MiB",
            self.open_files, self.threads, self.peak_rss_mib
        )
    }
}

/// The soft and hard limits on open files (`ulimit -n`), from /proc.
pub fn open_files_limit() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut values = line["Max open files".len()..].split_whitespace();
    let soft = values.next()?.parse().ok()?;
    let hard = values.next()?.parse().ok()?;
    Some((soft, hard))
}

/// One durable redb commit of a small row.
pub struct CommitProbe {
    _dir: tempfile::TempDir,
    db: redb::Database,
    next: std::cell::Cell<u64>,
}

const PROBE_TABLE: redb::TableDefinition<'static, u64, &'static [u8]> =
    redb::TableDefinition::new("t");

/// Commits one small row (as an inbox or outbox row is) durably.
fn commit_row(db: &redb::Database, key: u64) -> Duration {
    let value = [9u8; 300];
    let t = std::time::Instant::now();
    let tx = db.begin_write().expect("begin a write");
    tx.open_table(PROBE_TABLE)
        .expect("open the table")
        .insert(key, value.as_slice())
        .expect("insert a row");
    tx.commit().expect("commit durably");
    t.elapsed()
}

impl Default for CommitProbe {
    fn default() -> Self {
        Self::new()
    }
}

impl CommitProbe {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let db = redb::Database::create(dir.path().join("commit.redb")).expect("a database");
        Self {
            _dir: dir,
            db,
            next: std::cell::Cell::new(0),
        }
    }

    pub fn sample(&self) -> Duration {
        let i = self.next.get();
        self.next.set(i + 1);
        commit_row(&self.db, i)
    }
}

/// `n` durable commits at once, each on its own redb file and its own
/// (warm, waiting) thread: what `n` receiving nodes do when one envelope
/// reaches all of them.
pub struct CommitFleet {
    _dir: tempfile::TempDir,
    go: Vec<std::sync::mpsc::SyncSender<u64>>,
    done: tokio::sync::mpsc::Receiver<()>,
    next: u64,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CommitFleet {
    pub fn new(n: usize) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (done_tx, done) = tokio::sync::mpsc::channel(n.max(1));
        let mut go = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let db = redb::Database::create(dir.path().join(format!("fleet-{i}.redb")))
                .expect("a database");
            let (tx, rx) = std::sync::mpsc::sync_channel::<u64>(1);
            let done = done_tx.clone();
            threads.push(std::thread::spawn(move || {
                for key in rx {
                    commit_row(&db, key);
                    if done.blocking_send(()).is_err() {
                        break;
                    }
                }
            }));
            go.push(tx);
        }
        Self {
            _dir: dir,
            go,
            done,
            next: 0,
            threads,
        }
    }

    /// From telling every thread to commit until the last commit is durable.
    pub async fn sample(&mut self) -> Duration {
        self.next += 1;
        let t = std::time::Instant::now();
        for go in &self.go {
            go.send(self.next).expect("a commit thread stopped");
        }
        for _ in 0..self.go.len() {
            self.done.recv().await.expect("a commit thread stopped");
        }
        t.elapsed()
    }
}

impl Drop for CommitFleet {
    fn drop(&mut self) {
        self.go.clear();
        self.done.close();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One envelope to each of `n` responders at once over the nodes' libp2p
/// stack (TCP, as their first transport), until every answer is in. A
/// responder answers at once or, made `with_commits`, only after a durable
/// commit on its own redb file (as a receiving node does).
pub struct FanOut {
    client: transports::Client,
    responders: Vec<(transports::Client, Vec<transports::Multiaddr>)>,
    _dir: Option<tempfile::TempDir>,
}

impl FanOut {
    pub async fn new(n: usize) -> Self {
        Self::start(n, false).await
    }

    pub async fn with_commits(n: usize) -> Self {
        Self::start(n, true).await
    }

    async fn start(n: usize, commits: bool) -> Self {
        let mut net = loopback_config("x").network;
        // Connections are made once, below; they must not close between
        // blocks of samples, or a sample would time the dials.
        net.idle_connection_timeout_secs = 24 * 3600;
        net.max_connections = (2 * n as u32).max(net.max_connections);
        let dir = commits.then(|| tempfile::tempdir().expect("a temporary directory"));
        let (client, _client_events, _) =
            transports::spawn(&net, transports::identity::Keypair::generate_ed25519())
                .await
                .expect("the client's swarm");
        let mut responders = Vec::with_capacity(n);
        for i in 0..n {
            let (server, mut events, _) =
                transports::spawn(&net, transports::identity::Keypair::generate_ed25519())
                    .await
                    .expect("a responder's swarm");
            let committer = dir.as_ref().map(|d| {
                let db = redb::Database::create(d.path().join(format!("responder-{i}.redb")))
                    .expect("a database");
                let (tx, rx) = std::sync::mpsc::sync_channel::<transports::InboundBatch>(16);
                std::thread::spawn(move || {
                    for (key, batch) in (0u64..).zip(rx) {
                        commit_row(&db, key);
                        let n = batch.envelopes.len();
                        batch.respond(vec![transports::Receipt::Stored; n]);
                    }
                });
                tx
            });
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    if let transports::Event::Inbound(batch) = event {
                        match &committer {
                            Some(c) => {
                                if c.send(batch).is_err() {
                                    break;
                                }
                            }
                            None => {
                                let n = batch.envelopes.len();
                                batch.respond(vec![transports::Receipt::Stored; n]);
                            }
                        }
                    }
                }
            });
            let addrs: Vec<transports::Multiaddr> = server
                .status()
                .await
                .expect("a responder's status")
                .listen_addrs
                .into_iter()
                .filter(|a| a.to_string().contains("/tcp/"))
                .collect();
            // Connect now, one at a time: a sample then times deliveries,
            // not dials (which the swarm limits to a few at once).
            client
                .dial(server.peer_id(), addrs.clone())
                .await
                .expect("dialing a responder");
            responders.push((server, addrs));
        }
        Self {
            client,
            responders,
            _dir: dir,
        }
    }

    pub fn len(&self) -> usize {
        self.responders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.responders.is_empty()
    }

    pub async fn sample(&self) -> Duration {
        let envelope = [transports::Envelope::new(
            transports::DeliveryAddress::random(),
            vec![7; 250],
        )];
        let t = std::time::Instant::now();
        let deliveries = self.responders.iter().map(|(server, addrs)| {
            self.client
                .deliver(server.peer_id(), addrs.clone(), &envelope)
        });
        for receipts in futures::future::join_all(deliveries).await {
            receipts.expect("a delivery of the fan-out failed");
        }
        t.elapsed()
    }

    pub async fn stop(self) {
        self.client.shutdown().await;
        for (server, _) in self.responders {
            server.shutdown().await;
        }
    }
}

/// What a [`Remote`] hands back once its node runs.
type Started = (
    actix::Addr<actors::manager::RelationshipManager>,
    actors::store::Store,
    tokio::sync::broadcast::Sender<actors::views::Event>,
);

/// Runs a node (its database in `dir`) until told to stop, or until the
/// handle that could tell it is gone.
async fn run_node(
    dir: std::path::PathBuf,
    config: config::Config,
    started: std::sync::mpsc::Sender<Started>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let store =
        actors::store::Store::open(&dir.join("protonode.redb")).expect("the node's database");
    let node = actors::runtime::Node::start(
        store.clone(),
        config,
        transports::identity::Keypair::generate_ed25519(),
    )
    .await
    .expect("the node starts");
    started
        .send((node.manager.clone(), store, node.event_sender()))
        .expect("the benchmark waits for the node");
    let _ = stop.await;
    node.stop().await;
}

/// A node on its own thread with its own actix system and tokio runtime,
/// as a separate process would have.
pub struct Remote {
    pub manager: actix::Addr<actors::manager::RelationshipManager>,
    /// The node's store, for benchmarks that watch it change (reads only).
    pub store: actors::store::Store,
    events: tokio::sync::broadcast::Sender<actors::views::Event>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    stopped: Stopped,
}

/// How a [`Remote`]'s end is awaited.
enum Stopped {
    /// Its own thread ends.
    Thread(Option<std::thread::JoinHandle<()>>),
    /// It says so (it shares an arbiter with other nodes).
    Told(std::sync::mpsc::Receiver<()>),
}

impl Remote {
    /// Blair's node.
    pub fn start(dir: std::path::PathBuf) -> Self {
        Self::start_as(dir, loopback_config("Blair"))
    }

    /// A node with this configuration, its database in `dir`.
    pub fn start_as(dir: std::path::PathBuf, config: config::Config) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("node {}", config.profile.name))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                let system = actix::System::with_tokio_rt(move || runtime);
                system.block_on(run_node(dir, config, tx, stop_rx));
            })
            .expect("a thread for the node");
        Self::started(&rx, stop_tx, Stopped::Thread(Some(thread)))
    }

    /// A node with this configuration on `host`, a thread it shares with
    /// other nodes (see [`Hosts`]).
    pub fn start_on(
        host: &actix::ArbiterHandle,
        dir: std::path::PathBuf,
        config: config::Config,
    ) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let started = host.spawn(async move {
            run_node(dir, config, tx, stop_rx).await;
            let _ = done_tx.send(());
        });
        assert!(started, "the host thread runs");
        Self::started(&rx, stop_tx, Stopped::Told(done_rx))
    }

    /// The handle of a node once it says it runs.
    fn started(
        started: &std::sync::mpsc::Receiver<Started>,
        stop: tokio::sync::oneshot::Sender<()>,
        stopped: Stopped,
    ) -> Self {
        let (manager, store, events) = started.recv().expect("the node started");
        Self {
            manager,
            store,
            events,
            stop: Some(stop),
            stopped,
        }
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<actors::views::Event> {
        self.events.subscribe()
    }

    /// Asks the node to stop without waiting for it (dropping waits), so
    /// that many nodes stop at once.
    pub fn signal_stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.signal_stop();
        match &mut self.stopped {
            Stopped::Thread(t) => {
                if let Some(t) = t.take() {
                    let _ = t.join();
                }
            }
            Stopped::Told(done) => {
                let _ = done.recv();
            }
        }
    }
}

/// Threads that host many nodes each, one per core: many nodes in one
/// process without a thread pool each (an actix arbiter is a thread with
/// a single-threaded tokio runtime, plus its blocking pool for the
/// store's writer). A node's actors, swarm and services then share its
/// host's thread with the other nodes there, and the process runs about
/// as many busy threads as there are cores.
pub struct Hosts {
    arbiters: Vec<actix::Arbiter>,
    next: usize,
}

impl Hosts {
    pub fn new() -> Self {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            arbiters: (0..n).map(|_| actix::Arbiter::new()).collect(),
            next: 0,
        }
    }

    /// A node on the next host, round robin.
    pub fn start(&mut self, dir: std::path::PathBuf, config: config::Config) -> Remote {
        let host = self.arbiters[self.next % self.arbiters.len()].handle();
        self.next += 1;
        Remote::start_on(&host, dir, config)
    }

    /// Stops the hosts (after their nodes were dropped).
    pub fn stop(self) {
        for a in self.arbiters {
            a.stop();
            let _ = a.join();
        }
    }
}

impl Default for Hosts {
    fn default() -> Self {
        Self::new()
    }
}

/// The load average (1, 5 and 15 minutes), to show other work on the machine.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}
