//! Crash soak: 3 to 5 daemons (separate processes on loopback), all
//! befriended pairwise and in two plain groups. A seeded driver sends 1:1
//! and group messages from random nodes (and now and then rotates a group
//! member's keys, a commit), while a killer `kill -9`s a random daemon at a
//! random moment, leaves it down for a random while and restarts it, K
//! times. A send whose command returned success is *acknowledged*.
//!
//! At the end, once everything has drained, every acknowledged message is
//! exactly once in its sender's history (delivered) and in every
//! recipient's history (received), each sender's messages keep their order
//! in every history, no history holds any copy twice (acknowledged or not),
//! every daemon is still running, and every group's members are on one
//! epoch with one epoch authenticator. The figures are printed:
//!
//! ```text
//! soak: seed S, nodes N, kills K, messages M (1:1 A, group G), commits C,
//!   lost L, duplicated D, out of order O, unsettled U, groups on one epoch: yes, …
//! ```
//!
//! The small run is part of the test suite:
//!
//! ```sh
//! cargo test -p protonode-tests --test soak -- --nocapture
//! ```
//!
//! The long run (100 kills; release build, so the daemons are release too):
//!
//! ```sh
//! PROTONODE_SOAK_KILLS=100 cargo test --release -p protonode-tests --test soak -- --nocapture
//! ```
//!
//! Environment: `PROTONODE_SEED` replays a run (the seed is printed first;
//! the driver's and the killer's choices follow it, their timing against
//! the daemons does not), `PROTONODE_SOAK_KILLS` (default 6),
//! `PROTONODE_SOAK_NODES` (default 4, 3 to 5), `PROTONODE_SOAK_MESSAGES`
//! (least number of acknowledged messages, default 40), `PROTONODE_SOAK_LOG`
//! (the daemons' `RUST_LOG`, default `warn`, e.g. `warn,actors=debug` to
//! see why messages were dropped; on failure the end of their stderr is
//! printed and all of it saved as `$TMPDIR/protonode-soak-SEED-NAME.log`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{try_run_cli, wait_for, Daemon, Person};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const NAMES: [&str; 5] = ["Alex", "Blair", "Charlie", "Dana", "Emery"];
/// How long setup steps (groups showing up, agreeing) may take.
const SETTLE: Duration = Duration::from_secs(30);
/// How long the end may take to drain every outbox.
const DRAIN: Duration = Duration::from_secs(120);

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

fn person(name: &str) -> Person {
    let p = Person::init(name)
        .with_env("PROTONODE_DELIVERY_RETRY_MAX_MS", "1000")
        .with_env("PROTONODE_DELIVERY_ORDERING_TIMEOUT_MS", "1500");
    match std::env::var("PROTONODE_SOAK_LOG") {
        Ok(filter) => p.with_env("RUST_LOG", &filter),
        Err(_) => p,
    }
}

/// `protonode --json ARGS` for `p`, parsed; the error is its stderr. Like
/// [`Person::json`], but a command that hangs is an error, not a panic.
fn json(p: &Person, args: &[&str]) -> Result<Value, String> {
    let args: Vec<&str> = std::iter::once("--json")
        .chain(args.iter().copied())
        .collect();
    let out = try_run_cli(p.data_dir(), &args).map_err(|e| format!("{}: {e}", p.name))?;
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

/// A conversation as seen from one node: with another node, or a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Target {
    Peer(usize),
    Group(usize),
}

struct Group {
    name: String,
    /// Node indices; the first created it.
    members: Vec<usize>,
    /// The group's id at each member (ids are local to a node).
    ids: HashMap<usize, String>,
}

/// An acknowledged send.
struct Sent {
    sender: usize,
    target: Target,
    id: String,
    text: String,
    /// When `send` returned, since the start of the run.
    at: Duration,
}

/// What the run knows about its nodes.
struct World {
    people: Arc<Vec<Person>>,
    /// `contact[i][j]`: node j's contact id at node i.
    contact: Vec<Vec<String>>,
    groups: Vec<Group>,
}

/// Every history of every node: (holder, conversation) → messages.
type Snapshot = HashMap<(usize, Target), Vec<Value>>;

impl World {
    fn name(&self, i: usize) -> &str {
        &self.people[i].name
    }

    fn conversation(&self, holder: usize, target: Target) -> &str {
        match target {
            Target::Peer(j) => &self.contact[holder][j],
            Target::Group(g) => &self.groups[g].ids[&holder],
        }
    }

    fn describe(&self, target: Target) -> String {
        match target {
            Target::Peer(j) => self.name(j).to_string(),
            Target::Group(g) => format!("group {:?}", self.groups[g].name),
        }
    }

    /// Where a message from `sender` to `target` must end up, and with
    /// which status.
    fn holders(&self, sender: usize, target: Target) -> Vec<(usize, Target, &'static str)> {
        match target {
            Target::Peer(r) => vec![
                (sender, Target::Peer(r), "delivered"),
                (r, Target::Peer(sender), "received"),
            ],
            Target::Group(g) => self.groups[g]
                .members
                .iter()
                .map(|&m| {
                    let status = if m == sender { "delivered" } else { "received" };
                    (m, Target::Group(g), status)
                })
                .collect(),
        }
    }

    /// Every conversation of every node.
    fn conversations(&self) -> Vec<(usize, Target)> {
        let n = self.people.len();
        let mut all = Vec::new();
        for h in 0..n {
            all.extend((0..n).filter(|&j| j != h).map(|j| (h, Target::Peer(j))));
            for (g, group) in self.groups.iter().enumerate() {
                if group.members.contains(&h) {
                    all.push((h, Target::Group(g)));
                }
            }
        }
        all
    }

    fn snapshot(&self) -> Result<Snapshot, String> {
        let mut snapshot = Snapshot::new();
        for (h, target) in self.conversations() {
            let history = json(&self.people[h], &["history", self.conversation(h, target)])
                .map_err(|e| format!("{} history {}: {e}", self.name(h), self.describe(target)))?;
            let history = history.as_array().cloned().unwrap_or_default();
            snapshot.insert((h, target), history);
        }
        Ok(snapshot)
    }

    /// Whether every group's members agree (one epoch and authenticator,
    /// everyone claimed, nobody pending), and how each member sees it.
    fn groups_agree(&self) -> Result<(bool, Vec<String>), String> {
        let mut listed: HashMap<usize, Vec<Value>> = HashMap::new();
        for i in 0..self.people.len() {
            let groups = json(&self.people[i], &["groups"])
                .map_err(|e| format!("{} groups: {e}", self.name(i)))?;
            listed.insert(i, groups.as_array().cloned().unwrap_or_default());
        }
        let mut all = true;
        let mut seen = Vec::new();
        for group in &self.groups {
            let views: Vec<Option<&Value>> = group
                .members
                .iter()
                .map(|m| listed[m].iter().find(|g| g["id"] == group.ids[m].as_str()))
                .collect();
            let mut agree = views.iter().all(|v| {
                v.is_some_and(|v| {
                    v["pending"] == false
                        && v["members"].as_array().is_some_and(|ms| {
                            ms.len() == group.members.len()
                                && ms.iter().all(|m| m["status"] != "placeholder")
                        })
                })
            });
            agree &= views.windows(2).all(|w| match (w[0], w[1]) {
                (Some(a), Some(b)) => {
                    a["epoch"] == b["epoch"] && a["epoch_authenticator"] == b["epoch_authenticator"]
                }
                _ => false,
            });
            all &= agree;
            for (m, v) in group.members.iter().zip(&views) {
                seen.push(match v {
                    Some(v) => format!(
                        "{:?} at {}: epoch {} authenticator {} pending {} members {}",
                        group.name,
                        self.name(*m),
                        v["epoch"],
                        v["epoch_authenticator"],
                        v["pending"],
                        v["members"].as_array().map_or(0, Vec::len)
                    ),
                    None => format!("{:?} at {}: not listed", group.name, self.name(*m)),
                });
            }
        }
        Ok((all, seen))
    }
}

#[derive(Default, Debug)]
struct Report {
    /// (acknowledged message, holder) pairs where the message is missing.
    lost: usize,
    /// Extra copies of a message (by id or text) in one history.
    duplicated: usize,
    /// (sender stream, holder) pairs whose order differs from the send order.
    out_of_order: usize,
    /// (acknowledged message, holder) pairs present but not yet delivered /
    /// received, or with another id.
    unsettled: usize,
    details: Vec<String>,
}

impl Report {
    fn clean(&self) -> bool {
        self.lost + self.duplicated + self.out_of_order + self.unsettled == 0
    }
}

fn check(world: &World, sent: &[Sent], snapshot: &Snapshot) -> Report {
    let mut report = Report::default();
    // No history holds anything twice, acknowledged or not.
    for ((h, target), history) in snapshot {
        let mut ids: HashMap<&str, usize> = HashMap::new();
        let mut texts: HashMap<&str, usize> = HashMap::new();
        for m in history {
            *ids.entry(m["id"].as_str().unwrap_or("?")).or_default() += 1;
            *texts.entry(m["text"].as_str().unwrap_or("?")).or_default() += 1;
        }
        let extra_ids: usize = ids.values().map(|n| n - 1).sum();
        let extra_texts: usize = texts.values().map(|n| n - 1).sum();
        let extra = extra_ids.max(extra_texts);
        if extra > 0 {
            report.duplicated += extra;
            for (text, n) in texts.iter().filter(|(_, &n)| n > 1) {
                report.details.push(format!(
                    "duplicated: {text:?} {n} times at {} with {}",
                    world.name(*h),
                    world.describe(*target)
                ));
            }
            for (id, n) in ids.iter().filter(|(_, &n)| n > 1) {
                report.details.push(format!(
                    "duplicated: id {id} {n} times at {} with {}",
                    world.name(*h),
                    world.describe(*target)
                ));
            }
        }
    }
    // Every acknowledged message is at each holder, settled.
    let by_text: HashMap<(usize, Target), HashMap<&str, &Value>> = snapshot
        .iter()
        .map(|(k, history)| {
            let index = history
                .iter()
                .rev()
                .map(|m| (m["text"].as_str().unwrap_or(""), m))
                .collect();
            (*k, index)
        })
        .collect();
    for s in sent {
        for (h, target, status) in world.holders(s.sender, s.target) {
            match by_text[&(h, target)].get(s.text.as_str()) {
                None => {
                    report.lost += 1;
                    report.details.push(format!(
                        "lost: {:?} (id {}, {} to {}, acknowledged at {:.1?}) missing at {}",
                        s.text,
                        s.id,
                        world.name(s.sender),
                        world.describe(s.target),
                        s.at,
                        world.name(h)
                    ));
                }
                Some(m) if m["status"] != status || m["id"] != s.id.as_str() => {
                    report.unsettled += 1;
                    report.details.push(format!(
                        "unsettled: {:?} (id {}) at {} is {} with id {} (expected {status})",
                        s.text,
                        s.id,
                        world.name(h),
                        m["status"],
                        m["id"]
                    ));
                }
                Some(_) => {}
            }
        }
    }
    // Each sender's messages to each target keep their order everywhere.
    let mut streams: HashMap<(usize, Target), Vec<&str>> = HashMap::new();
    for s in sent {
        streams
            .entry((s.sender, s.target))
            .or_default()
            .push(&s.text);
    }
    for ((sender, target), texts) in &streams {
        let wanted: HashSet<&str> = texts.iter().copied().collect();
        for (h, conversation, _) in world.holders(*sender, *target) {
            let mut seen: Vec<&str> = Vec::new();
            let mut once: HashSet<&str> = HashSet::new();
            for m in &snapshot[&(h, conversation)] {
                let t = m["text"].as_str().unwrap_or("");
                if wanted.contains(t) && once.insert(t) {
                    seen.push(t);
                }
            }
            let present: HashSet<&str> = seen.iter().copied().collect();
            let expected: Vec<&str> = texts
                .iter()
                .copied()
                .filter(|t| present.contains(t))
                .collect();
            if seen != expected {
                report.out_of_order += 1;
                let at = seen
                    .iter()
                    .zip(&expected)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                let when = |t: &str| {
                    sent.iter()
                        .find(|s| s.text == t)
                        .map_or(String::new(), |s| format!("{:.1?}", s.at))
                };
                let window = |v: &[&str]| {
                    v[at.saturating_sub(2)..(at + 4).min(v.len())]
                        .iter()
                        .map(|t| format!("{t:?} (acknowledged at {})", when(t)))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                report.details.push(format!(
                    "out of order: {}'s messages to {} at {}: first difference at position {at}:\n  seen     {}\n  expected {}",
                    world.name(*sender),
                    world.describe(*target),
                    world.name(h),
                    window(&seen),
                    window(&expected),
                ));
            }
        }
    }
    report
}

/// What happened when, for a failure's diagnosis.
#[derive(Default)]
struct Timeline {
    events: Vec<(Duration, String)>,
    /// Each node's daemon stderr, across its lives.
    logs: Vec<Vec<String>>,
}

#[test]
fn soak_kill_9_random_daemons_while_sending_one_to_one_and_in_groups() {
    let seed = env_u64("PROTONODE_SEED").unwrap_or_else(rand::random);
    println!("seed {seed} (replay with PROTONODE_SEED={seed})");
    let kills_wanted = env_u64("PROTONODE_SOAK_KILLS").unwrap_or(6) as usize;
    let n = env_u64("PROTONODE_SOAK_NODES").unwrap_or(4).clamp(3, 5) as usize;
    let min_messages = env_u64("PROTONODE_SOAK_MESSAGES").unwrap_or(40) as usize;
    let started = Instant::now();

    // Setup: n people, pairwise contacts, two plain groups with different
    // creators (the first orders its group's commits).
    let people: Arc<Vec<Person>> = Arc::new(NAMES[..n].iter().map(|name| person(name)).collect());
    let daemons: Arc<Vec<Mutex<Daemon>>> =
        Arc::new(people.iter().map(|p| Mutex::new(p.start())).collect());
    // (The first CLI call builds the daemon binary when it is stale.)
    let daemons_up = started.elapsed();
    let mut contact = vec![vec![String::new(); n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let (at_i, at_j) = people[i].befriend(&people[j]);
            contact[i][j] = at_i;
            contact[j][i] = at_j;
        }
    }
    let contacts_made = started.elapsed();
    let mut world = World {
        people: people.clone(),
        contact,
        groups: Vec::new(),
    };
    let mut second: Vec<usize> = vec![n - 1];
    second.extend([1, 2].into_iter().filter(|&m| m != n - 1));
    for (name, members) in [("Everyone", (0..n).collect::<Vec<_>>()), ("Some", second)] {
        let creator = &people[members[0]];
        let mut args = vec!["group", "create", name];
        args.extend(members[1..].iter().map(|&m| people[m].name.as_str()));
        let created = creator.ok(&args);
        let mut ids = HashMap::new();
        ids.insert(
            members[0],
            created["id"]
                .as_str()
                .unwrap_or_else(|| panic!("group create answered {created}"))
                .to_string(),
        );
        for &m in &members[1..] {
            let p = &people[m];
            let id = wait_for(SETTLE, || {
                p.groups()
                    .iter()
                    .find(|g| g["name"] == name)
                    .and_then(|g| g["id"].as_str().map(String::from))
            })
            .unwrap_or_else(|| panic!("{} never saw group {name}", p.name));
            p.ok(&["claim", &id]);
            ids.insert(m, id);
        }
        world.groups.push(Group {
            name: name.to_string(),
            members,
            ids,
        });
    }
    let groups_claimed = started.elapsed();
    wait_for(SETTLE, || world.groups_agree().ok()?.0.then_some(()))
        .unwrap_or_else(|| panic!("the groups never agreed: {:#?}", world.groups_agree()));
    let world = world;
    println!(
        "set up {n} nodes, {} contacts, {} groups in {:.1?} (daemons up at {daemons_up:.1?}, contacts made at {contacts_made:.1?}, groups claimed at {groups_claimed:.1?})",
        n * (n - 1) / 2,
        world.groups.len(),
        started.elapsed()
    );

    // The killer: its own rng, derived from the seed.
    let run = Instant::now();
    let up: Arc<Vec<Mutex<bool>>> = Arc::new((0..n).map(|_| Mutex::new(true)).collect());
    let timeline = Arc::new(Mutex::new(Timeline {
        events: Vec::new(),
        logs: vec![Vec::new(); n],
    }));
    let killer = {
        let (people, daemons, up, timeline) = (
            people.clone(),
            daemons.clone(),
            up.clone(),
            timeline.clone(),
        );
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
            for k in 0..kills_wanted {
                std::thread::sleep(Duration::from_millis(rng.gen_range(200..2000)));
                let who = rng.gen_range(0..n);
                let down_for = Duration::from_millis(rng.gen_range(0..1500));
                let mut daemon = daemons[who].lock().unwrap();
                *up[who].lock().unwrap() = false;
                daemon.kill9();
                std::thread::sleep(Duration::from_millis(20));
                {
                    let mut t = timeline.lock().unwrap();
                    let lines = daemon.stderr_lines();
                    t.logs[who].extend(lines);
                    t.logs[who].push(format!("--- kill -9 #{k} at {:.1?}", run.elapsed()));
                    t.events.push((
                        run.elapsed(),
                        format!("kill #{k}: {} down for {down_for:?}", people[who].name),
                    ));
                }
                std::thread::sleep(down_for);
                *daemon = people[who].start();
                *up[who].lock().unwrap() = true;
                timeline
                    .lock()
                    .unwrap()
                    .events
                    .push((run.elapsed(), format!("{} up again", people[who].name)));
            }
        })
    };

    // The driver: seeded choices; a node that is down is skipped without
    // consuming extra randomness, so the sequence of choices is the seed's.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sent: Vec<Sent> = Vec::new();
    let (mut attempts, mut refused, mut skipped, mut commits) = (0usize, 0usize, 0usize, 0usize);
    while !killer.is_finished() || sent.len() < min_messages {
        attempts += 1;
        let sender = rng.gen_range(0..n);
        let roll = rng.gen_range(0..100);
        let other = (sender + rng.gen_range(1..n)) % n;
        let mine: Vec<usize> = (0..world.groups.len())
            .filter(|&g| world.groups[g].members.contains(&sender))
            .collect();
        let group = mine[rng.gen_range(0..mine.len())];
        let pause = Duration::from_millis(rng.gen_range(0..40));
        if !*up[sender].lock().unwrap() {
            skipped += 1;
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let p = &people[sender];
        if roll < 3 {
            // A commit: rotate the sender's keys in one of its groups.
            match json(p, &["group", "update", &world.groups[group].ids[&sender]]) {
                Ok(_) => {
                    commits += 1;
                    timeline.lock().unwrap().events.push((
                        run.elapsed(),
                        format!("{} updated {:?}", p.name, world.groups[group].name),
                    ));
                }
                Err(_) => refused += 1,
            }
        } else {
            let target = if roll < 40 {
                Target::Group(group)
            } else {
                Target::Peer(other)
            };
            let text = format!("{} #{attempts} to {}", p.name, world.describe(target));
            let conversation = world.conversation(sender, target);
            match json(p, &["send", conversation, &text]) {
                Ok(v) => match v["message"].as_str() {
                    Some(id) => sent.push(Sent {
                        sender,
                        target,
                        id: id.to_string(),
                        text,
                        at: run.elapsed(),
                    }),
                    None => panic!("seed {seed}: send answered {v}"),
                },
                // Down, or killed mid-request: not acknowledged.
                Err(_) => refused += 1,
            }
        }
        std::thread::sleep(pause);
    }
    if let Err(e) = killer.join() {
        std::panic::resume_unwind(Box::new(format!(
            "seed {seed}: the killer failed (a daemon did not restart?): {e:?}"
        )));
    }
    let driven = run.elapsed();
    let kills = kills_wanted;
    let one_to_one = sent
        .iter()
        .filter(|s| matches!(s.target, Target::Peer(_)))
        .count();
    println!(
        "driven for {driven:.1?}: {attempts} attempts, {} acknowledged, {refused} refused, {skipped} skipped (node down), {commits} commits, {kills} kills",
        sent.len()
    );

    // Drain: every acknowledged message settled, every group agreed.
    let drain_start = Instant::now();
    let mut last: Option<(Report, (bool, Vec<String>))> = None;
    let mut last_error = String::new();
    let deadline = Instant::now() + DRAIN;
    loop {
        match world
            .snapshot()
            .and_then(|s| Ok((s, world.groups_agree()?)))
        {
            Ok((snapshot, agree)) => {
                let report = check(&world, &sent, &snapshot);
                // Once every acknowledged message is everywhere and settled,
                // waiting longer changes nothing (duplicates or a wrong
                // order stay); until then, missing ones may still arrive.
                let done = report.lost + report.unsettled == 0 && agree.0;
                last = Some((report, agree));
                if done {
                    break;
                }
            }
            Err(e) => last_error = e,
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let Some((report, (agree, epochs))) = last else {
        panic!("seed {seed}: no snapshot could be taken: {last_error}");
    };
    let mut crashed = Vec::new();
    for (i, d) in daemons.iter().enumerate() {
        if !d.lock().unwrap().is_running() {
            crashed.push(people[i].name.clone());
        }
    }
    let took = started.elapsed();
    println!(
        "soak: seed {seed}, nodes {n}, kills {kills}, messages {} (1:1 {one_to_one}, group {}), commits {commits}, lost {}, duplicated {}, out of order {}, unsettled {}, groups on one epoch: {}, crashed: {}, drained in {:.1?}, took {took:.1?}",
        sent.len(),
        sent.len() - one_to_one,
        report.lost,
        report.duplicated,
        report.out_of_order,
        report.unsettled,
        if agree { "yes" } else { "no" },
        if crashed.is_empty() { "none".to_string() } else { crashed.join(", ") },
        drain_start.elapsed(),
    );
    if report.clean() && agree && crashed.is_empty() {
        for d in daemons.iter() {
            let _ = d.lock().unwrap().stop();
        }
        return;
    }

    // Diagnosis: what went wrong, when the kills were, what the daemons said.
    println!("--- details (seed {seed})");
    for d in report.details.iter().take(40) {
        println!("{d}");
    }
    if report.details.len() > 40 {
        println!("… and {} more", report.details.len() - 40);
    }
    println!("--- groups");
    for e in &epochs {
        println!("{e}");
    }
    let mut t = timeline.lock().unwrap();
    for (i, d) in daemons.iter().enumerate() {
        let lines = d.lock().unwrap().stderr_lines();
        t.logs[i].extend(lines);
    }
    println!("--- timeline");
    for (at, e) in &t.events {
        println!("{at:>10.1?} {e}");
    }
    for (i, lines) in t.logs.iter().enumerate() {
        let file = std::env::temp_dir().join(format!(
            "protonode-soak-{seed}-{}.log",
            people[i].name.to_lowercase()
        ));
        let saved = std::fs::write(&file, lines.join("\n"));
        println!(
            "--- {}'s daemon stderr (last 60 lines; all in {}: {saved:?})",
            people[i].name,
            file.display()
        );
        for l in lines.iter().skip(lines.len().saturating_sub(60)) {
            println!("{l}");
        }
    }
    assert!(
        crashed.is_empty(),
        "seed {seed}: daemons died on their own: {crashed:?}"
    );
    assert_eq!(report.lost, 0, "seed {seed}: acknowledged messages lost");
    assert_eq!(report.duplicated, 0, "seed {seed}: duplicated messages");
    assert_eq!(
        report.out_of_order, 0,
        "seed {seed}: per-sender order broken"
    );
    assert_eq!(
        report.unsettled, 0,
        "seed {seed}: messages not delivered within {DRAIN:?}"
    );
    assert!(
        agree,
        "seed {seed}: the groups' members are not on one epoch"
    );
}
