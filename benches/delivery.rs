//! 1:1 delivery: latency against its floor, and sustained throughput.
//!
//! Run: `cargo bench -p protonode-bench --bench delivery`
//! (PROTONODE_BENCH_SAMPLES and PROTONODE_BENCH_MESSAGES change the sizes).
//!
//! Everything is measured in this one run, on this machine:
//! - latency: `send` on Alex's node until Alex's node has Blair's node's
//!   acknowledgement, which Blair's node gives only after storing the
//!   envelope durably; two real nodes on loopback (libp2p over TCP, redb
//!   files, openmls);
//! - its floor: one openmls encrypt + decrypt, one bare libp2p
//!   request-response round trip (same transport stack, a responder that
//!   answers at once), and two durable redb commits;
//! - throughput: many sends at once, until every one is acknowledged.

use std::time::{Duration, Instant};

use actors::identity::IdentityKey;
use actors::manager::{AcceptInvite, CreateInvite, ListContacts, SendMessage};
use actors::mls::{self, Provider};
use actors::runtime::Node;
use actors::store::Store;
use actors::views::Event;
use protonode_bench::{env_usize, loopback_config, machine, ms, CommitProbe, Remote, Stats};
use transports::{DeliveryAddress, Envelope, Receipt};

/// Samples of one kind taken back to back before switching to the next kind.
const BLOCK: usize = 50;

fn main() {
    let samples = env_usize("PROTONODE_BENCH_SAMPLES", 300);
    let messages = env_usize("PROTONODE_BENCH_MESSAGES", 5_000);
    protonode_bench::timeline_from_env();
    // As the daemon runs: actors on the system's thread, the swarms and
    // services on tokio's worker threads.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let system = actix::System::with_tokio_rt(move || runtime);
    system.block_on(run(samples, messages));
}

async fn run(samples: usize, messages: usize) {
    println!("protonode delivery benchmark on {}", machine());
    println!(
        "(floor components and latency measured in alternating blocks of {BLOCK} back-to-back"
    );
    println!(
        " samples, so each is warm and drift hits both alike; medians over {samples} samples)"
    );
    println!();
    let mut mls = MlsPair::new();
    let rr = RoundTrip::new().await;
    let commit = CommitProbe::new();
    let (alex, blair, _dirs) = two_nodes().await;
    let mut latency = Latency::new(&alex, &blair).await;

    let (mut t_mls, mut t_rr, mut t_commit, mut t_latency) = (vec![], vec![], vec![], vec![]);
    // Warm-up: connections, caches, allocator.
    for round in 0..20 {
        mls.sample();
        rr.sample().await;
        commit.sample();
        latency.sample(&alex, round).await;
    }
    // Blocks of back-to-back samples, floor and latency alternating, so that
    // each is measured warm and drift of the machine hits both alike.
    let blocks = samples.div_ceil(BLOCK);
    for block in 0..blocks {
        for _ in 0..BLOCK {
            t_mls.push(mls.sample());
        }
        for _ in 0..BLOCK {
            t_rr.push(rr.sample().await);
        }
        for _ in 0..BLOCK {
            t_commit.push(commit.sample());
        }
        for i in 0..BLOCK {
            t_latency.push(latency.sample(&alex, block * BLOCK + i).await);
        }
    }
    rr.stop().await;
    let (mls, rr, commit, latency) = (
        Stats::of(t_mls),
        Stats::of(t_rr),
        Stats::of(t_commit),
        Stats::of(t_latency),
    );
    let floor = mls.median + rr.median + 2 * commit.median;
    println!("floor components:");
    println!("  openmls encrypt + decrypt        {mls}");
    println!("  libp2p request-response trip     {rr}");
    println!("  durable redb commit (x2 below)   {commit}");
    println!("  floor = sum of medians           {:>8.3} ms", ms(floor));
    println!();
    let ratio = latency.median.as_secs_f64() / floor.as_secs_f64();
    println!("1:1 message latency (send → stored at peer → ack back):");
    println!("  {latency}");
    println!("  ratio to floor: {ratio:.2}x (target <= 2.00x)");
    println!();

    let (sent, elapsed) = measure_throughput(&alex, &blair, messages).await;
    let rate = sent as f64 / elapsed.as_secs_f64();
    println!("sustained acknowledged throughput, Alex → Blair:");
    println!(
        "  {sent} messages acknowledged in {:.2} s = {rate:.0} msg/s (target >= 4000 msg/s)",
        elapsed.as_secs_f64()
    );
    println!();
    println!("| operation | measured | floor | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| 1:1 latency (median) | {:.3} ms | {:.3} ms | {ratio:.2}x |",
        ms(latency.median),
        ms(floor)
    );
    println!("| 1:1 throughput | {rate:.0} msg/s | | |");
    alex.stop().await;
    drop(blair);
}

/// One encrypt by Blair and one decrypt by Alex, in a 2-member group.
struct MlsPair {
    _dir: tempfile::TempDir,
    alex: (Provider, IdentityKey, openmls::prelude::MlsGroup),
    blair: (Provider, IdentityKey, openmls::prelude::MlsGroup),
}

impl MlsPair {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("mls.redb")).unwrap();
        let (alex_key, blair_key) = (IdentityKey::generate(), IdentityKey::generate());
        let alex = Provider::new(store.clone(), [1; 8]);
        let blair = Provider::new(store.clone(), [2; 8]);
        let kp = mls::new_key_package(&alex, &alex_key).unwrap();
        let mut blair_group = mls::create_group(&blair, &blair_key).unwrap();
        let (_, welcome) = mls::add_members(
            &mut blair_group,
            &blair,
            &blair_key,
            &[kp.key_package().clone()],
        )
        .unwrap();
        let alex_group = mls::join_from_welcome(&alex, &welcome).unwrap();
        Self {
            _dir: dir,
            alex: (alex, alex_key, alex_group),
            blair: (blair, blair_key, blair_group),
        }
    }

    fn sample(&mut self) -> Duration {
        let text = [b'x'; 100];
        let t = Instant::now();
        let (bp, bk, bg) = &mut self.blair;
        let ct = mls::encrypt(bg, bp, bk, &text).unwrap();
        let (ap, _, ag) = &mut self.alex;
        mls::process(ag, ap, &ct).unwrap();
        let elapsed = t.elapsed();
        // Keep the write sets small, as commits would.
        bp.mls_storage().take_writes();
        ap.mls_storage().take_writes();
        elapsed
    }
}

/// A bare round trip of one envelope over the same libp2p stack (TCP, as
/// the nodes' first transport), to a responder that answers at once.
struct RoundTrip {
    client: transports::Client,
    server: transports::Client,
    addrs: Vec<transports::Multiaddr>,
}

impl RoundTrip {
    async fn new() -> Self {
        let net = loopback_config("x").network;
        let (server, mut events, _) =
            transports::spawn(&net, transports::identity::Keypair::generate_ed25519())
                .await
                .unwrap();
        let (client, _client_events, _) =
            transports::spawn(&net, transports::identity::Keypair::generate_ed25519())
                .await
                .unwrap();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let transports::Event::Inbound(batch) = event {
                    let n = batch.envelopes.len();
                    batch.respond(vec![Receipt::Stored; n]);
                }
            }
        });
        let addrs = server
            .status()
            .await
            .unwrap()
            .listen_addrs
            .into_iter()
            .filter(|a| a.to_string().contains("/tcp/"))
            .collect();
        Self {
            client,
            server,
            addrs,
        }
    }

    async fn sample(&self) -> Duration {
        let envelope = [Envelope::new(DeliveryAddress::random(), vec![7; 250])];
        let t = Instant::now();
        self.client
            .deliver(self.server.peer_id(), self.addrs.clone(), &envelope)
            .await
            .unwrap();
        t.elapsed()
    }

    async fn stop(self) {
        self.client.shutdown().await;
        self.server.shutdown().await;
    }
}

async fn two_nodes() -> (Node, Remote, (tempfile::TempDir, tempfile::TempDir)) {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let start = |dir: &tempfile::TempDir, name: &str| {
        let store = Store::open(&dir.path().join("protonode.redb")).unwrap();
        Node::start(
            store,
            loopback_config(name),
            transports::identity::Keypair::generate_ed25519(),
        )
    };
    let alex = start(&a_dir, "Alex").await.unwrap();
    let blair = Remote::start(b_dir.path().to_path_buf());
    let invite = blair
        .manager
        .send(CreateInvite { ttl: None })
        .await
        .unwrap()
        .unwrap();
    let accepted = alex
        .manager
        .send(AcceptInvite {
            ticket: invite.ticket,
        })
        .await
        .unwrap()
        .unwrap();
    assert!(accepted.delivered);
    // Blair's node knows Alex once it processed the answer.
    for _ in 0..200 {
        if !blair
            .manager
            .send(ListContacts)
            .await
            .unwrap()
            .unwrap()
            .is_empty()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (alex, blair, (a_dir, b_dir))
}

/// `send` with `wait` on Alex's node: until Blair's node acknowledged.
struct Latency {
    contact: String,
    arrivals: tokio::sync::broadcast::Receiver<Event>,
}

impl Latency {
    async fn new(alex: &Node, blair: &Remote) -> Self {
        let contact = alex.manager.send(ListContacts).await.unwrap().unwrap()[0]
            .id
            .clone();
        Self {
            contact,
            arrivals: blair.subscribe(),
        }
    }

    async fn sample(&mut self, alex: &Node, round: usize) -> Duration {
        let t = Instant::now();
        let sent = alex
            .manager
            .send(SendMessage {
                to: self.contact.clone(),
                text: format!("latency probe {round} with some text to carry"),
                wait: Some(Duration::from_secs(10)),
            })
            .await
            .unwrap()
            .unwrap();
        let elapsed = t.elapsed();
        assert_eq!(sent.status, "delivered");
        // The next sample starts with Blair's node idle, as each floor
        // component is measured alone: it has finished processing this one.
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.arrivals.recv()).await {
                Ok(Ok(Event::Message { .. })) => break,
                Ok(Ok(_)) => {}
                other => panic!("Blair's node did not process a message: {other:?}"),
            }
        }
        elapsed
    }
}

async fn measure_throughput(alex: &Node, blair: &Remote, messages: usize) -> (usize, Duration) {
    let contact = alex.manager.send(ListContacts).await.unwrap().unwrap()[0]
        .id
        .clone();
    let mut deliveries = alex.subscribe();
    let mut arrivals = blair.subscribe();
    let start = Instant::now();
    let sends = (0..messages).map(|i| {
        alex.manager.send(SendMessage {
            to: contact.clone(),
            text: format!("throughput message {i}"),
            wait: None,
        })
    });
    for result in futures::future::join_all(sends).await {
        result.unwrap().unwrap();
    }
    let mut acked = 0;
    while acked < messages {
        match tokio::time::timeout(Duration::from_secs(60), deliveries.recv()).await {
            Ok(Ok(Event::Delivery {
                status: "delivered",
                ..
            })) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(n))) => acked += n as usize,
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let elapsed = start.elapsed();
    // Blair's node processes what it acknowledged; count it to be sure.
    let mut received = 0;
    while received < messages {
        match tokio::time::timeout(Duration::from_secs(30), arrivals.recv()).await {
            Ok(Ok(Event::Message { .. })) => received += 1,
            Ok(Ok(_)) => {}
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(n))) => received += n as usize,
            Ok(Err(_)) | Err(_) => break,
        }
    }
    assert!(
        received >= messages,
        "Blair received {received} of {messages}"
    );
    (acked.min(messages), elapsed)
}
