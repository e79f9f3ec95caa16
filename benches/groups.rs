//! Groups: an introduction, two claims, and one message to a large group,
//! each against a floor measured in the same run (issue 3's acceptance).
//!
//! Run: `cargo bench -p protonode-bench --bench groups`
//! (PROTONODE_BENCH_SAMPLES, PROTONODE_BENCH_CLAIM_SAMPLES,
//! PROTONODE_BENCH_GROUP_SIZE and PROTONODE_BENCH_FANOUT_SAMPLES change the
//! sizes).
//!
//! Real nodes on loopback (libp2p over TCP, a redb file each, openmls). Alex
//! runs in this process's actix system; every other node runs on its own
//! thread with its own actix system and tokio runtime, as a separate
//! process would have ([`Remote`]).
//!
//! 1. Introduction: from Alex's `CreateGroup` with Blair and Charlie until
//!    both their nodes list the group with its 3 members: each invitee's
//!    node tells of the introduction (`GroupChange::Introduced`) once its
//!    group is durably stored; `ListGroups` then checks the new group,
//!    untimed. (Until 2026-11-28 a thread polled the invitees' GROUPS
//!    tables every 50 µs instead, taking CPU from the nodes it timed.)
//!    Floor: openmls create group + 2 placeholder key packages + the add
//!    commit, one invitee's join from the Welcome, 2 durable redb commits,
//!    one bare libp2p request-response round trip.
//! 2. Both claims: after an (untimed) introduction, from issuing Blair's
//!    and Charlie's `Claim` at once until all three nodes have emitted the
//!    group's event for the epoch after both claims; `ListGroups` then
//!    checks that the three agree (epoch, epoch authenticator) and that no
//!    member is a placeholder. Floor, per claim (the ordering service puts
//!    them one after the other): staging the claim commit, processing and
//!    merging it at the ordering member and at the other member, 3 durable
//!    commits, 2 round trips; times two.
//! 3. One message to a group of PROTONODE_BENCH_GROUP_SIZE (128) nodes, all
//!    in this process, the members on one host thread per core ([`Hosts`]:
//!    a thread pool per node would be 500 threads on 2 cores, a cost of
//!    this harness that no deployed node pays and the floor does not
//!    have): the creator's `SendMessage` with `wait`, which returns
//!    once every member's node acknowledged, i.e. stored it durably. The time
//!    until every member's node has also processed it (`Event::Message`) is
//!    shown too. Floor: one encrypt in a group of that size, one durable
//!    commit (the sender's, before anything leaves), one envelope to 127
//!    responder swarms at once until every answer is in, and 127 durable
//!    commits at once on 127 redb files.
//!
//! Each floor component is measured in blocks of back-to-back samples that
//! alternate with blocks of the measurement it belongs to, so that each is
//! warm and drift of the machine hits both alike; medians throughout.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use actix::Addr;
use actors::identity::IdentityKey;
use actors::manager::{
    AcceptInvite, AcceptView, CreateGroup, CreateInvite, GetStatus, GroupAction, GroupCommand,
    ListContacts, ListGroups, RelationshipManager, SendMessage,
};
use actors::mls::{self, Incoming, Provider};
use actors::runtime::Node;
use actors::store::{tables, Store};
use actors::views::{Event, GroupChange, GroupView};
use openmls::prelude::MlsGroup;
use protonode_bench::{
    env_usize, load_average, loopback_config, machine, measured_end, measured_start, ms,
    open_files_limit, CommitFleet, CommitProbe, FanOut, Hosts, ProcessUse, Remote, Stats,
};
use redb::ReadableTableMetadata;
use tokio::sync::broadcast;

/// Samples of one kind taken back to back before switching to the next kind
/// (introductions and claims).
const BLOCK: usize = 10;
/// The same for the large group, whose samples are longer.
const FANOUT_BLOCK: usize = 5;
/// The longest any one wait may take before the benchmark gives up.
const WAIT: Duration = Duration::from_secs(30);
/// The longest the large group's introduction may take to reach everyone.
const SETUP_WAIT: Duration = Duration::from_secs(600);
/// Relationships made at once while setting up the large group.
const BEFRIEND_AT_ONCE: usize = 16;
/// The size of a claim's authenticated data (a signed "follows" attestation).
const CLAIM_AAD_LEN: usize = 136;

fn main() {
    let sizes = Sizes {
        introductions: env_usize("PROTONODE_BENCH_SAMPLES", 100),
        claims: env_usize("PROTONODE_BENCH_CLAIM_SAMPLES", 60),
        group: env_usize("PROTONODE_BENCH_GROUP_SIZE", 128).max(2),
        fanouts: env_usize("PROTONODE_BENCH_FANOUT_SAMPLES", 60),
    };
    protonode_bench::timeline_from_env();
    // As the daemon runs: actors on the system's thread, the swarms and
    // services on tokio's worker threads.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let system = actix::System::with_tokio_rt(move || runtime);
    system.block_on(run(sizes));
}

struct Sizes {
    introductions: usize,
    claims: usize,
    group: usize,
    fanouts: usize,
}

/// One line of the final table.
struct Row {
    operation: String,
    measured: Duration,
    floor: Option<Duration>,
}

impl Row {
    fn ratio(&self) -> Option<f64> {
        self.floor
            .map(|f| self.measured.as_secs_f64() / f.as_secs_f64())
    }
}

async fn run(sizes: Sizes) {
    println!("protonode groups benchmark on {}", machine());
    if let Some((soft, hard)) = open_files_limit() {
        println!("open files limit (ulimit -n): soft {soft}, hard {hard}");
    }
    println!("(floor components and measurements in alternating blocks of back-to-back samples,");
    println!(" so each is warm and drift hits both alike; medians)");
    println!("load average at the start: {}", load_average());
    println!();

    let mut rows = Vec::new();
    let mut trio = Trio::start().await;
    let rr = FanOut::new(1).await;
    let commit = CommitProbe::new();
    rows.push(measure_introductions(&mut trio, &rr, &commit, sizes.introductions).await);
    rows.push(measure_claims(&mut trio, &rr, &commit, sizes.claims).await);
    println!(
        "(after these, each of the three nodes holds {} groups)",
        groups_len(&trio.blair.store)
    );
    println!();
    trio.stop().await;
    rr.stop().await;

    rows.extend(measure_fan_out(sizes.group, sizes.fanouts).await);
    println!("load average at the end: {}", load_average());
    println!();

    println!("| operation | measured | floor | ratio |");
    println!("|---|---|---|---|");
    for row in &rows {
        match (row.floor, row.ratio()) {
            (Some(floor), Some(ratio)) => println!(
                "| {} | {:.3} ms | {:.3} ms | {ratio:.2}x |",
                row.operation,
                ms(row.measured),
                ms(floor)
            ),
            _ => println!("| {} | {:.3} ms | | |", row.operation, ms(row.measured)),
        }
    }
}

/// Measurement 1: introductions, against their floor.
async fn measure_introductions(
    trio: &mut Trio,
    rr: &FanOut,
    commit: &CommitProbe,
    samples: usize,
) -> Row {
    let floor_mls = IntroFloor::new();
    let (mut t_mls, mut t_rr, mut t_commit, mut t_intro) = (vec![], vec![], vec![], vec![]);
    for _ in 0..3 {
        floor_mls.sample();
        rr.sample().await;
        commit.sample();
        trio.introduce().await;
    }
    let groups_before = groups_len(&trio.blair.store);
    for _ in 0..samples.div_ceil(BLOCK) {
        for _ in 0..BLOCK {
            t_mls.push(floor_mls.sample());
        }
        for _ in 0..BLOCK {
            t_rr.push(rr.sample().await);
        }
        for _ in 0..BLOCK {
            t_commit.push(commit.sample());
        }
        for _ in 0..BLOCK {
            t_intro.push(trio.introduce().await.0);
        }
    }
    // Every sample leaves a group behind on each node: does the time grow
    // with the number of groups a node holds?
    let drift = (t_intro.len() >= 2 * BLOCK).then(|| {
        (
            Stats::of(t_intro[..BLOCK].to_vec()).median,
            Stats::of(t_intro[t_intro.len() - BLOCK..].to_vec()).median,
        )
    });
    let groups_after = groups_len(&trio.blair.store);
    let (mls, rr, commit, intro) = (
        Stats::of(t_mls),
        Stats::of(t_rr),
        Stats::of(t_commit),
        Stats::of(t_intro),
    );
    let floor = mls.median + rr.median + 2 * commit.median;
    println!("1. introduction: Alex's CreateGroup(Blair, Charlie) until both their nodes list it with 3 members");
    println!("  floor components:");
    println!("    openmls create + 2 placeholders + add + 1 join   {mls}");
    println!("    libp2p request-response trip                    {rr}");
    println!("    durable redb commit (x2 below)                  {commit}");
    println!(
        "    floor = sum of medians                          {:>8.3} ms",
        ms(floor)
    );
    let ratio = intro.median.as_secs_f64() / floor.as_secs_f64();
    println!("  measured: {intro}");
    if let Some((first, last)) = drift {
        println!(
            "  first block's median {:.3} ms (each node held {groups_before} groups), last block's {:.3} ms ({groups_after})",
            ms(first),
            ms(last)
        );
    }
    println!("  ratio to floor: {ratio:.2}x (target <= 2.00x)");
    println!();
    Row {
        operation: "introduction: CreateGroup → both invitees list the group (median)".into(),
        measured: intro.median,
        floor: Some(floor),
    }
}

/// Measurement 2: both claims until the three nodes converge.
async fn measure_claims(trio: &mut Trio, rr: &FanOut, commit: &CommitProbe, samples: usize) -> Row {
    let floor_mls = ClaimFloor::new();
    let (mut t_mls, mut t_rr, mut t_commit, mut t_claims) = (vec![], vec![], vec![], vec![]);
    for _ in 0..2 {
        floor_mls.sample();
        rr.sample().await;
        commit.sample();
        trio.claim_both().await;
    }
    for _ in 0..samples.div_ceil(BLOCK) {
        for _ in 0..BLOCK {
            t_mls.push(floor_mls.sample());
        }
        for _ in 0..BLOCK {
            t_rr.push(rr.sample().await);
        }
        for _ in 0..BLOCK {
            t_commit.push(commit.sample());
        }
        for _ in 0..BLOCK {
            t_claims.push(trio.claim_both().await);
        }
    }
    let (mls, rr, commit, claims) = (
        Stats::of(t_mls),
        Stats::of(t_rr),
        Stats::of(t_commit),
        Stats::of(t_claims),
    );
    let floor = mls.median + 4 * rr.median + 6 * commit.median;
    println!("2. both claims at once, until all three nodes agree (epoch, authenticator, no placeholder)");
    println!("  floor components (per claim: stage it, process + merge it at the ordering member");
    println!(
        "  and at the other member, 3 durable commits, 2 round trips; the two claims in sequence):"
    );
    println!("    openmls: both claims' stage + 2x (process + merge)  {mls}");
    println!("    libp2p request-response trip (x4 below)             {rr}");
    println!("    durable redb commit (x6 below)                      {commit}");
    println!(
        "    floor = sum of medians                              {:>8.3} ms",
        ms(floor)
    );
    let ratio = claims.median.as_secs_f64() / floor.as_secs_f64();
    println!("  measured: {claims}");
    if trio.late_agreements > 0 {
        println!(
            "  note: {} samples agreed only after their last epoch event (timed until agreement)",
            trio.late_agreements
        );
    }
    println!("  ratio to floor: {ratio:.2}x (target <= 2.00x)");
    println!();
    Row {
        operation: "both claims → all three agree, no placeholder (median)".into(),
        measured: claims.median,
        floor: Some(floor),
    }
}

/// Measurement 3: one message to a group of `size` nodes in this process.
async fn measure_fan_out(size: usize, samples: usize) -> Vec<Row> {
    let others = size - 1;
    println!("3. one message to a group of {size} nodes in this process (setting up, see stderr)");
    let group = BigGroup::start(size).await;
    let encrypt = GroupEncrypt::new(size);
    let commit = CommitProbe::new();
    let fan = FanOut::new(others).await;
    let mut fleet = CommitFleet::new(others);
    let fan_committing = FanOut::with_commits(others).await;
    eprintln!("  floors ready ({})", ProcessUse::now());

    let mut t = FanOutTimes::default();
    for round in 0..3 {
        encrypt.sample();
        commit.sample();
        fan.sample().await;
        fleet.sample().await;
        fan_committing.sample().await;
        group.send_one(round).await;
    }
    for block in 0..samples.div_ceil(FANOUT_BLOCK) {
        for _ in 0..FANOUT_BLOCK {
            t.encrypt.push(encrypt.sample());
        }
        for _ in 0..FANOUT_BLOCK {
            t.commit.push(commit.sample());
        }
        for _ in 0..FANOUT_BLOCK {
            t.fan.push(fan.sample().await);
        }
        for _ in 0..FANOUT_BLOCK {
            t.fleet.push(fleet.sample().await);
        }
        for _ in 0..FANOUT_BLOCK {
            t.fan_committing.push(fan_committing.sample().await);
        }
        for i in 0..FANOUT_BLOCK {
            let (acked, processed) = group.send_one(3 + block * FANOUT_BLOCK + i).await;
            t.acked.push(acked);
            t.processed.push(processed);
        }
    }
    let in_use = ProcessUse::now();
    let (encrypt_s, commit_s, fan_s, fleet_s, fan_committing_s, acked, processed) = (
        Stats::of(t.encrypt),
        Stats::of(t.commit),
        Stats::of(t.fan),
        Stats::of(t.fleet),
        Stats::of(t.fan_committing),
        Stats::of(t.acked),
        Stats::of(t.processed),
    );
    let floor = encrypt_s.median + commit_s.median + fan_s.median + fleet_s.median;
    let together = encrypt_s.median + commit_s.median + fan_committing_s.median;
    println!("  floor components:");
    println!("    openmls encrypt in a {size}-member group            {encrypt_s}");
    println!("    durable redb commit (the sender's)                {commit_s}");
    println!("    one envelope to {others} responder swarms at once     {fan_s}");
    println!("    {others} durable commits at once, {others} redb files     {fleet_s}");
    println!(
        "    floor = sum of medians                            {:>8.3} ms",
        ms(floor)
    );
    println!("  for comparison, the fan-out to responders that each commit durably before");
    println!("  answering, timed as one:                            {fan_committing_s}");
    println!(
        "    encrypt + sender's commit + that                  {:>8.3} ms",
        ms(together)
    );
    let ratio = acked.median.as_secs_f64() / floor.as_secs_f64();
    println!("  measured, send → all {others} members' nodes stored it durably (acknowledged):");
    println!("    {acked}");
    println!("  ratio to floor: {ratio:.2}x (target <= 2.00x)");
    println!("  send → all {others} members' nodes processed it (Event::Message), no floor:");
    println!("    {processed}");
    println!("  process at the end: {in_use}");
    println!();

    fan.stop().await;
    fan_committing.stop().await;
    drop(fleet);
    group.stop().await;
    vec![
        Row {
            operation: format!(
                "one message to a {size}-member group → all {others} acknowledged (median)"
            ),
            measured: acked.median,
            floor: Some(floor),
        },
        Row {
            operation: format!(
                "one message to a {size}-member group → all {others} processed (median)"
            ),
            measured: processed.median,
            floor: None,
        },
    ]
}

#[derive(Default)]
struct FanOutTimes {
    encrypt: Vec<Duration>,
    commit: Vec<Duration>,
    fan: Vec<Duration>,
    fleet: Vec<Duration>,
    fan_committing: Vec<Duration>,
    acked: Vec<Duration>,
    processed: Vec<Duration>,
}

/// How many groups a node's store holds: the rows `ListGroups` reads.
fn groups_len(store: &Store) -> u64 {
    store
        .read(|tx| Ok(tx.open_table(tables::GROUPS)?.len()?))
        .expect("reading the groups table")
}

/// Starts a node in this process's actix system.
async fn start_local(dir: &tempfile::TempDir, name: &str) -> Node {
    let store = Store::open(&dir.path().join("protonode.redb")).expect("the node's database");
    Node::start(
        store,
        loopback_config(name),
        transports::identity::Keypair::generate_ed25519(),
    )
    .await
    .expect("the node starts")
}

/// `inviter` makes a ticket, `acceptor` accepts it.
async fn befriend(
    inviter: &Addr<RelationshipManager>,
    acceptor: &Addr<RelationshipManager>,
) -> AcceptView {
    let invite = inviter
        .send(CreateInvite { ttl: None })
        .await
        .expect("the inviter's manager runs")
        .expect("an invitation");
    acceptor
        .send(AcceptInvite {
            ticket: invite.ticket,
        })
        .await
        .expect("the acceptor's manager runs")
        .expect("the invitation is accepted")
}

/// Waits until every one of these nodes has had every envelope it queued
/// acknowledged: the next sample starts with the network quiet.
async fn settle(managers: &[&Addr<RelationshipManager>]) {
    let deadline = Instant::now() + WAIT;
    for manager in managers {
        loop {
            let status = manager
                .send(GetStatus)
                .await
                .expect("the manager runs")
                .expect("the node's status");
            if status.outbox == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} envelopes stay unacknowledged",
                status.outbox
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

async fn groups_of(manager: &Addr<RelationshipManager>) -> Vec<GroupView> {
    manager
        .send(ListGroups)
        .await
        .expect("the manager runs")
        .expect("the node's groups")
}

/// Alex, with Blair and Charlie as contacts, each on their own node.
struct Trio {
    alex: Node,
    blair: Remote,
    charlie: Remote,
    /// Alex's contact ids of Blair and Charlie.
    contacts: Vec<String>,
    /// Groups Blair's and Charlie's nodes already list.
    known: [HashSet<String>; 2],
    /// Claims whose nodes agreed only after their last epoch event.
    late_agreements: usize,
    _dirs: [tempfile::TempDir; 3],
}

/// One introduction's group, by its id on each node.
struct Introduced {
    at_alex: String,
    at_blair: String,
    at_charlie: String,
    epoch: u64,
}

impl Trio {
    async fn start() -> Self {
        let dirs = [(); 3].map(|_| tempfile::tempdir().expect("a temporary directory"));
        let alex = start_local(&dirs[0], "Alex").await;
        let blair = Remote::start_as(dirs[1].path().to_path_buf(), loopback_config("Blair"));
        let charlie = Remote::start_as(dirs[2].path().to_path_buf(), loopback_config("Charlie"));
        for other in [&blair, &charlie] {
            assert!(befriend(&other.manager, &alex.manager).await.delivered);
        }
        // Both know Alex, and Alex's side of both is active (acknowledged).
        let deadline = Instant::now() + WAIT;
        loop {
            let alex_side = alex
                .manager
                .send(ListContacts)
                .await
                .expect("Alex's manager runs")
                .expect("Alex's contacts");
            let mut ready = alex_side.len() == 2 && alex_side.iter().all(|c| c.state == "active");
            for other in [&blair, &charlie] {
                ready &= !other
                    .manager
                    .send(ListContacts)
                    .await
                    .expect("the manager runs")
                    .expect("the contacts")
                    .is_empty();
            }
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the relationships did not settle"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let contacts = alex
            .manager
            .send(ListContacts)
            .await
            .expect("Alex's manager runs")
            .expect("Alex's contacts")
            .into_iter()
            .map(|c| c.id)
            .collect();
        Self {
            alex,
            blair,
            charlie,
            contacts,
            known: [HashSet::new(), HashSet::new()],
            late_agreements: 0,
            _dirs: dirs,
        }
    }

    /// Alex introduces Blair and Charlie: the time until both their nodes
    /// list the new group, and the group.
    async fn introduce(&mut self) -> (Duration, Introduced) {
        // Subscribed before: the invitees' nodes tell of the introduction
        // once its group is durably stored, and listed.
        let joined = futures::future::join(
            introduced(self.blair.subscribe()),
            introduced(self.charlie.subscribe()),
        );
        measured_start("introduction");
        let t = Instant::now();
        let create = self.alex.manager.send(CreateGroup {
            contacts: self.contacts.clone(),
            name: None,
        });
        let (created, (at_blair, at_charlie)) = futures::future::join(create, joined).await;
        let created = created
            .expect("Alex's manager runs")
            .expect("the group is created");
        let elapsed = at_blair.max(at_charlie).saturating_duration_since(t);
        measured_end("introduction", "both invitees list the group");

        // Untimed: the group each invitee's node lists now, with 3 members.
        let mut ids = Vec::new();
        for (i, node) in [&self.blair, &self.charlie].into_iter().enumerate() {
            let fresh: Vec<GroupView> = groups_of(&node.manager)
                .await
                .into_iter()
                .filter(|g| !self.known[i].contains(&g.id))
                .collect();
            assert_eq!(fresh.len(), 1, "one new group");
            let group = &fresh[0];
            assert_eq!(group.members.len(), 3, "the group lists 3 members");
            assert!(group.pending, "an introduction not yet claimed");
            self.known[i].insert(group.id.clone());
            ids.push((group.id.clone(), group.epoch));
        }
        settle(&[
            &self.alex.manager,
            &self.blair.manager,
            &self.charlie.manager,
        ])
        .await;
        let introduced = Introduced {
            at_alex: created.id,
            at_blair: ids[0].0.clone(),
            at_charlie: ids[1].0.clone(),
            epoch: ids[0].1,
        };
        (elapsed, introduced)
    }

    /// After an untimed introduction: Blair and Charlie claim at once; the
    /// time until all three nodes agree.
    async fn claim_both(&mut self) -> Duration {
        let (_, g) = self.introduce().await;
        // Creation was one epoch, each claim is one more.
        let target = g.epoch + 2;
        let converged = futures::future::join_all([
            reach_epoch(self.alex.subscribe(), g.at_alex.clone(), target),
            reach_epoch(self.blair.subscribe(), g.at_blair.clone(), target),
            reach_epoch(self.charlie.subscribe(), g.at_charlie.clone(), target),
        ]);
        measured_start("claims");
        let t = Instant::now();
        let claim = |node: &Remote, group: &str| {
            node.manager.send(GroupCommand {
                group: group.to_string(),
                action: GroupAction::Claim,
            })
        };
        let claims = futures::future::join(
            claim(&self.blair, &g.at_blair),
            claim(&self.charlie, &g.at_charlie),
        );
        let ((blair, charlie), times) = futures::future::join(claims, converged).await;
        blair.expect("Blair's manager runs").expect("Blair's claim");
        charlie
            .expect("Charlie's manager runs")
            .expect("Charlie's claim");
        let mut end = times.into_iter().max().expect("three nodes");
        measured_end("claims", "all three nodes at the epoch after both");

        // Untimed, unless they do not agree yet: same epoch and
        // authenticator everywhere, nobody a placeholder.
        let deadline = Instant::now() + WAIT;
        let mut late = false;
        loop {
            let views = [
                (&self.alex.manager, &g.at_alex),
                (&self.blair.manager, &g.at_blair),
                (&self.charlie.manager, &g.at_charlie),
            ];
            let mut seen = Vec::new();
            for (manager, id) in views {
                let view = groups_of(manager)
                    .await
                    .into_iter()
                    .find(|v| &v.id == id)
                    .expect("the group is listed");
                seen.push(view);
            }
            if agree(&seen) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the three never agreed: {seen:#?}"
            );
            late = true;
            end = Instant::now();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if late {
            self.late_agreements += 1;
        }
        let elapsed = end.saturating_duration_since(t);
        settle(&[
            &self.alex.manager,
            &self.blair.manager,
            &self.charlie.manager,
        ])
        .await;
        elapsed
    }

    async fn stop(self) {
        let Trio {
            alex,
            blair,
            charlie,
            _dirs,
            ..
        } = self;
        alex.stop().await;
        drop(blair);
        drop(charlie);
        drop(_dirs);
    }
}

/// Same epoch and epoch authenticator, 3 members, none a placeholder.
fn agree(views: &[GroupView]) -> bool {
    views
        .windows(2)
        .all(|w| w[0].epoch == w[1].epoch && w[0].epoch_authenticator == w[1].epoch_authenticator)
        && views
            .iter()
            .all(|v| v.members.len() == 3 && v.members.iter().all(|m| m.status != "placeholder"))
}

/// When a node told of its next introduction.
async fn introduced(mut events: broadcast::Receiver<Event>) -> Instant {
    loop {
        match tokio::time::timeout(WAIT, events.recv()).await {
            Ok(Ok(Event::Group(e))) if e.change == GroupChange::Introduced => {
                return Instant::now()
            }
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            other => panic!("an invitee's node was not introduced: {other:?}"),
        }
    }
}

/// When a node emitted the event of `group` reaching `epoch`.
async fn reach_epoch(mut events: broadcast::Receiver<Event>, group: String, epoch: u64) -> Instant {
    loop {
        match tokio::time::timeout(WAIT, events.recv()).await {
            Ok(Ok(Event::Group(change))) if change.group == group && change.epoch >= epoch => {
                return Instant::now()
            }
            Ok(Ok(_)) => {}
            other => panic!("group {group} did not reach epoch {epoch}: {other:?}"),
        }
    }
}

/// When a node emitted its next received message.
async fn next_message(mut events: broadcast::Receiver<Event>) -> Instant {
    loop {
        match tokio::time::timeout(WAIT, events.recv()).await {
            Ok(Ok(Event::Message { .. })) => return Instant::now(),
            Ok(Ok(_)) => {}
            other => panic!("a member's node did not process the message: {other:?}"),
        }
    }
}

/// A group of `size` nodes: a creator in this process's actix system, the
/// others each on their own thread, system and runtime; every member joined
/// as a placeholder (claims are not needed to receive).
struct BigGroup {
    creator: Node,
    members: Vec<Remote>,
    hosts: Hosts,
    group: String,
    _dirs: Vec<tempfile::TempDir>,
}

impl BigGroup {
    async fn start(size: usize) -> Self {
        let begun = Instant::now();
        let mut dirs = Vec::with_capacity(size);
        dirs.push(tempfile::tempdir().expect("a temporary directory"));
        let creator = start_local(&dirs[0], "Creator").await;
        let mut hosts = Hosts::new();
        let mut members = Vec::with_capacity(size - 1);
        for i in 1..size {
            let dir = tempfile::tempdir().expect("a temporary directory");
            members.push(hosts.start(
                dir.path().to_path_buf(),
                loopback_config(&format!("Member {i}")),
            ));
            dirs.push(dir);
        }
        eprintln!(
            "  {} nodes started in {:.1} s ({})",
            size,
            begun.elapsed().as_secs_f64(),
            ProcessUse::now()
        );

        let t = Instant::now();
        for chunk in members.chunks(BEFRIEND_AT_ONCE) {
            let accepted = futures::future::join_all(
                chunk.iter().map(|m| befriend(&m.manager, &creator.manager)),
            )
            .await;
            assert!(accepted.iter().all(|a| a.delivered));
        }
        let deadline = Instant::now() + SETUP_WAIT;
        let contacts = loop {
            let contacts = creator
                .manager
                .send(ListContacts)
                .await
                .expect("the creator's manager runs")
                .expect("the creator's contacts");
            if contacts.len() == size - 1 && contacts.iter().all(|c| c.state == "active") {
                break contacts;
            }
            assert!(
                Instant::now() < deadline,
                "the relationships did not settle"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        for m in &members {
            while m
                .manager
                .send(ListContacts)
                .await
                .expect("a member's manager runs")
                .expect("a member's contacts")
                .is_empty()
            {
                assert!(Instant::now() < deadline, "a member never knew the creator");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        eprintln!(
            "  {} relationships made in {:.1} s",
            size - 1,
            t.elapsed().as_secs_f64()
        );

        let t = Instant::now();
        let created = creator
            .manager
            .send(CreateGroup {
                contacts: contacts.into_iter().map(|c| c.id).collect(),
                name: Some(format!("{size} people")),
            })
            .await
            .expect("the creator's manager runs")
            .expect("the group is created");
        let create_took = t.elapsed();
        for m in &members {
            while groups_len(&m.store) == 0 {
                assert!(
                    Instant::now() < deadline,
                    "a member's node never joined the group"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let joined_took = t.elapsed();
        for m in &members {
            let groups = groups_of(&m.manager).await;
            assert_eq!(groups.len(), 1);
            assert_eq!(groups[0].members.len(), size, "every member lists everyone");
        }
        settle(&[&creator.manager]).await;
        eprintln!(
            "  group of {size} created in {:.1} s; every member's node joined {:.1} s after the CreateGroup ({})",
            create_took.as_secs_f64(),
            joined_took.as_secs_f64(),
            ProcessUse::now()
        );
        println!(
            "  (set-up: CreateGroup with {} placeholders answered in {:.2} s, every member's node joined after {:.2} s)",
            size - 1,
            create_took.as_secs_f64(),
            joined_took.as_secs_f64()
        );
        Self {
            creator,
            members,
            hosts,
            group: created.id,
            _dirs: dirs,
        }
    }

    /// One message from the creator: the time until every member's node
    /// acknowledged it, and until every member's node processed it.
    async fn send_one(&self, round: usize) -> (Duration, Duration) {
        let arrivals: Vec<_> = self
            .members
            .iter()
            .map(|m| next_message(m.subscribe()))
            .collect();
        let processed = tokio::spawn(async move {
            futures::future::join_all(arrivals)
                .await
                .into_iter()
                .max()
                .expect("members")
        });
        measured_start("group message");
        let t = Instant::now();
        let sent = self
            .creator
            .manager
            .send(SendMessage {
                to: self.group.clone(),
                text: format!("fan-out probe {round} with some text to carry"),
                wait: Some(WAIT),
            })
            .await
            .expect("the creator's manager runs")
            .expect("the message is sent");
        let acked = t.elapsed();
        measured_end("group message", "all members acknowledged");
        assert_eq!(sent.status, "delivered");
        let last = processed.await.expect("every member's node processed it");
        settle(&[&self.creator.manager]).await;
        (acked, last.saturating_duration_since(t))
    }

    async fn stop(self) {
        let BigGroup {
            creator,
            mut members,
            hosts,
            _dirs,
            ..
        } = self;
        for m in &mut members {
            m.signal_stop();
        }
        drop(members);
        hosts.stop();
        creator.stop().await;
        drop(_dirs);
    }
}

/// Distinct namespaces for the floors' MLS state.
fn namespace(counter: &std::cell::Cell<u64>) -> [u8; 8] {
    let n = counter.get();
    counter.set(n + 1);
    n.to_be_bytes()
}

/// An MLS group as an introduction leaves it: Alex's, Blair's joined as
/// her placeholder, and what Charlie needs to join as his.
struct Introduction {
    a: (Provider, MlsGroup),
    b: (Provider, IdentityKey, MlsGroup),
    welcome: Vec<u8>,
    charlie: (IdentityKey, Vec<u8>),
}

/// Alex creates the group with two placeholders and Blair joins: the
/// introduction's openmls work, one invitee's side of it.
fn introduce_mls(store: &Store, counter: &std::cell::Cell<u64>) -> Introduction {
    let alex = Provider::new(store.clone(), namespace(counter));
    let scratch = Provider::new(store.clone(), namespace(counter));
    let blair = Provider::new(store.clone(), namespace(counter));
    let gp_a = IdentityKey::generate();
    let (ph_b, ph_c) = (IdentityKey::generate(), IdentityKey::generate());
    let mut a_group = mls::create_group(&alex, &gp_a).expect("create");
    let (kp_b, bundle_b) = mls::placeholder_key_package(&scratch, &ph_b).expect("placeholder");
    let (kp_c, bundle_c) = mls::placeholder_key_package(&scratch, &ph_c).expect("placeholder");
    let (_, welcome) =
        mls::stage_add(&mut a_group, &alex, &gp_a, &[kp_b, kp_c], Vec::new()).expect("add");
    mls::merge_pending(&mut a_group, &alex).expect("merge");
    mls::install_placeholder(&blair, &bundle_b, &ph_b.ipk()).expect("install");
    let b_group = mls::join_from_welcome(&blair, &welcome).expect("join");
    Introduction {
        a: (alex, a_group),
        b: (blair, ph_b, b_group),
        welcome,
        charlie: (ph_c, bundle_c),
    }
}

/// A redb store for MLS state that only the floors use, and a counter
/// that gives each sample's providers their own namespace in it.
struct Scratch {
    _dir: tempfile::TempDir,
    store: Store,
    counter: std::cell::Cell<u64>,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Store::open(&dir.path().join("mls.redb")).expect("a store");
        Self {
            _dir: dir,
            store,
            counter: std::cell::Cell::new(0),
        }
    }
}

/// The introduction's openmls floor.
struct IntroFloor(Scratch);

impl IntroFloor {
    fn new() -> Self {
        Self(Scratch::new())
    }

    fn sample(&self) -> Duration {
        let t = Instant::now();
        let done = introduce_mls(&self.0.store, &self.0.counter);
        let elapsed = t.elapsed();
        drop(done);
        elapsed
    }
}

/// The two claims' openmls floor: for each, staging it, and processing and
/// merging it at the two other members. The claimer merging its own commit
/// happens at the same time as the other member's, so it is left out.
struct ClaimFloor(Scratch);

impl ClaimFloor {
    fn new() -> Self {
        Self(Scratch::new())
    }

    fn sample(&self) -> Duration {
        let Introduction {
            a: (a, mut ga),
            b: (b, ph_b, mut gb),
            welcome,
            charlie: (ph_c, bundle_c),
        } = introduce_mls(&self.0.store, &self.0.counter);
        let c = Provider::new(self.0.store.clone(), namespace(&self.0.counter));
        mls::install_placeholder(&c, &bundle_c, &ph_c.ipk()).expect("install");
        let mut gc = mls::join_from_welcome(&c, &welcome).expect("join");
        let aad = vec![0x5a; CLAIM_AAD_LEN];
        let (gp_b, gp_c) = (IdentityKey::generate(), IdentityKey::generate());

        let t = Instant::now();
        let claim = mls::stage_claim(&mut gb, &b, &ph_b, &gp_b, aad.clone()).expect("stage");
        apply(&mut ga, &a, &claim);
        apply(&mut gc, &c, &claim);
        let first = t.elapsed();
        mls::merge_pending(&mut gb, &b).expect("merge own");

        let t = Instant::now();
        let claim = mls::stage_claim(&mut gc, &c, &ph_c, &gp_c, aad).expect("stage");
        apply(&mut ga, &a, &claim);
        apply(&mut gb, &b, &claim);
        let second = t.elapsed();
        mls::merge_pending(&mut gc, &c).expect("merge own");

        let auth = mls::epoch_authenticator(&ga);
        assert_eq!(mls::epoch_authenticator(&gb), auth);
        assert_eq!(mls::epoch_authenticator(&gc), auth);
        first + second
    }
}

/// Processes and merges a commit.
fn apply(group: &mut MlsGroup, provider: &Provider, commit: &[u8]) {
    match mls::process(group, provider, commit).expect("process") {
        Incoming::Commit { staged, .. } => {
            mls::merge_staged(group, provider, *staged).expect("merge")
        }
        _ => panic!("expected a commit"),
    }
}

/// One encrypt by the creator of a group of `size` members.
struct GroupEncrypt {
    _dir: tempfile::TempDir,
    provider: Provider,
    key: IdentityKey,
    group: std::cell::RefCell<MlsGroup>,
}

impl GroupEncrypt {
    fn new(size: usize) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Store::open(&dir.path().join("mls.redb")).expect("a store");
        let provider = Provider::new(store.clone(), [1; 8]);
        let scratch = Provider::new(store.clone(), [2; 8]);
        let key = IdentityKey::generate();
        let mut group = mls::create_group(&provider, &key).expect("create");
        let packages: Vec<_> = (1..size)
            .map(|_| {
                mls::placeholder_key_package(&scratch, &IdentityKey::generate())
                    .expect("placeholder")
                    .0
            })
            .collect();
        scratch.mls_storage().discard_writes();
        mls::stage_add(&mut group, &provider, &key, &packages, Vec::new()).expect("add");
        mls::merge_pending(&mut group, &provider).expect("merge");
        let writes = provider.mls_storage().take_writes();
        store
            .write_blocking(|tx| mls::apply_writes(tx, &writes))
            .expect("commit the group");
        Self {
            _dir: dir,
            provider,
            key,
            group: std::cell::RefCell::new(group),
        }
    }

    fn sample(&self) -> Duration {
        let text = [b'x'; 100];
        let mut group = self.group.borrow_mut();
        let t = Instant::now();
        mls::encrypt(&mut group, &self.provider, &self.key, &text).expect("encrypt");
        let elapsed = t.elapsed();
        // Keep the write set small, as commits would.
        self.provider.mls_storage().take_writes();
        elapsed
    }
}
