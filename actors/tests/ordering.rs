//! One epoch order (DESIGN.md section 9): 3 to 5 members (each has
//! claimed its placeholder, so each votes and may order) commit
//! concurrently, again and again, over the real protocol code (real MLS,
//! real redb stores), with envelopes delivered in a random (seeded) order:
//! FIFO between one sender and one recipient, as the sending service
//! delivers, interleaved at random otherwise. Every member must end on the
//! same epoch and epoch authenticator, with every intent applied and none
//! stuck. A second run kills the ordering member part-way: the others time
//! out, move to the next one by rank, and still converge.
//!
//! Seeded: PROTONODE_SEED replays one run; the seed is printed on failure.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use actors::changes::Changes;
use actors::groups::{create_group, load_protons, GroupError, GroupSession};
use actors::identity::Ipk;
use actors::model::DisplayIdentity;
use actors::protocol::Payload;
use actors::records::{GroupState, Intent, ProtonState, Recipient};
use actors::relationship::{
    accept_invite, create_invite, receive_welcome, Lifetimes, NodeAddrs, ProtonSession, Received,
};
use actors::store::Store;
use rand::{Rng, SeedableRng};

const LIFETIMES: Lifetimes = Lifetimes {
    ephemeral: Duration::from_secs(3600),
    long_term: Duration::from_secs(365 * 24 * 3600),
};
const TIMEOUT_MS: u64 = 10_000;

struct Member {
    _dir: tempfile::TempDir,
    store: Store,
    node: NodeAddrs,
    group: Option<GroupSession>,
    /// Its group key while it is down (what others still send to).
    was: Option<Ipk>,
    alive: bool,
}

fn member() -> Member {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db")).unwrap();
    let node = NodeAddrs {
        peer: transports::PeerId::random(),
        addrs: vec![
            "/ip4/127.0.0.1/tcp/4001".parse().unwrap(),
            "/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap(),
        ],
        service_key: store.service_key().unwrap().public(),
    };
    Member {
        _dir: dir,
        store,
        node,
        group: None,
        was: None,
        alive: true,
    }
}

fn display(name: &str) -> DisplayIdentity {
    DisplayIdentity {
        name: name.into(),
        pronouns: None,
        picture: None,
    }
}

fn commit(store: &Store, changes: Changes) -> actors::changes::Applied {
    store.write_blocking(move |tx| changes.apply(tx)).unwrap()
}

/// The creator befriends every other member, then makes a group with a
/// placeholder for each; everyone joins. Returns the members, creator first.
fn form_group(n: usize) -> Vec<Member> {
    let mut members: Vec<Member> = (0..n).map(|_| member()).collect();
    let mut via = Vec::new();
    let mut theirs = Vec::new();
    for i in 1..n {
        let (creator, other) = (&members[0], &members[i]);
        let invite = create_invite(
            &creator.store,
            &creator.node,
            display("creator"),
            LIFETIMES,
            Duration::from_secs(60),
            None,
            1,
        )
        .unwrap();
        let ticket = invite.ticket.clone();
        commit(&creator.store, invite.changes);
        let acceptance = accept_invite(
            &other.store,
            &other.node,
            display(&format!("m{i}")),
            LIFETIMES,
            &invite.text,
            None,
            2,
        )
        .unwrap();
        let answer = acceptance.changes.outbox[0].payload.clone();
        let mut proton = acceptance.proton.clone();
        commit(&other.store, acceptance.changes);
        proton.state = ProtonState::Active;
        commit(
            &other.store,
            Changes {
                protons: vec![proton.clone()],
                ..Changes::default()
            },
        );
        let (ours, changes) = receive_welcome(
            &creator.store,
            &ticket,
            &Payload::decode(&answer).unwrap(),
            0,
            3,
        )
        .unwrap();
        commit(&creator.store, changes);
        via.push(ours);
        theirs.push(proton.id);
    }
    let (record, changes) = create_group(
        &members[0].store,
        &members[0].node,
        display("creator"),
        LIFETIMES,
        &via,
        None,
        5,
    )
    .unwrap();
    commit(&members[0].store, changes);
    for (i, relay) in record.relays.iter().enumerate() {
        let mut s = ProtonSession::load(&members[0].store, relay.via).unwrap();
        let mut c = Changes::default();
        s.send_control(relay.body.clone(), &members[0].node, LIFETIMES, 6, &mut c)
            .unwrap();
        s.drain_writes(&mut c);
        let payload = c.outbox[0].payload.clone();
        commit(&members[0].store, c);
        let to = &members[i + 1];
        let mut r = ProtonSession::load(&to.store, theirs[i]).unwrap();
        let mut c = Changes::default();
        assert!(matches!(
            r.receive(&payload, 7, &mut c).unwrap(),
            Received::Joined(_)
        ));
        r.drain_writes(&mut c);
        commit(&to.store, c);
    }
    for m in &mut members {
        let id = actors::groups::all_groups(&m.store).unwrap()[0].id;
        m.group = Some(GroupSession::load(&m.store, id).unwrap());
    }
    // Everyone claims its placeholder, all at once: until then the creator
    // votes for it, and an invitee never orders.
    let mut pool: Pool = BTreeMap::new();
    for i in 1..n {
        let proton = load_protons(&members[i].store, [theirs[i - 1]])
            .unwrap()
            .pop()
            .unwrap();
        let node = members[i].node.clone();
        let g = members[i].group.as_mut().unwrap();
        let mut c = Changes::default();
        g.claim(&proton, &node, LIFETIMES, 8, &mut c).unwrap();
        g.drain_writes(&mut c);
        run(c, i, &mut members, &mut pool);
    }
    let mut stalled = 0;
    while let Some(key) = pool.iter().find(|(_, q)| !q.is_empty()).map(|(k, _)| *k) {
        let payload = pool.get_mut(&key).and_then(|q| q.pop_front()).unwrap();
        let g = members[key.1].group.as_mut().unwrap();
        let mut c = Changes::default();
        match g.receive(&payload, None, 9, &mut c) {
            Ok(_) | Err(GroupError::WrongEpoch { .. }) => stalled = 0,
            Err(GroupError::Deferred) => {
                pool.entry(key).or_default().push_back(payload);
                stalled += 1;
                assert!(stalled < 1_000, "the claims do not settle");
            }
            Err(e) => panic!("claiming: {e}"),
        }
        g.drain_writes(&mut c);
        run(c, key.1, &mut members, &mut pool);
    }
    for m in &members {
        let g = m.group.as_ref().unwrap();
        assert_eq!(g.record().state, GroupState::Active, "claimed");
        assert_eq!(g.epoch(), members[0].group.as_ref().unwrap().epoch());
    }
    members
}

/// Envelopes in flight, FIFO per (sender, recipient), by member index so
/// that a seed replays exactly.
type Pool = BTreeMap<(usize, usize), VecDeque<Vec<u8>>>;

fn run(changes: Changes, from: usize, members: &mut [Member], pool: &mut Pool) {
    let applied = commit(&members[from].store, changes);
    for (_, row) in applied.outbox {
        if let Recipient::Member(ipk) = row.recipient {
            if let Some(to) = index_of(members, ipk) {
                pool.entry((from, to)).or_default().push_back(row.payload);
            }
        }
    }
}

/// Which member a row is for: by its group key, or the key it claims
/// with (its node routes both), or the key it had when it went down.
fn index_of(members: &[Member], ipk: Ipk) -> Option<usize> {
    members.iter().position(|m| match &m.group {
        Some(g) => {
            g.own_ipk() == ipk
                || g.record().pending.as_ref().is_some_and(
                    |p| matches!(&p.intent, Intent::Claim { key, .. } if key.key().ipk() == ipk),
                )
        }
        None => m.was == Some(ipk),
    })
}

/// What happens to members during a run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Faults {
    None,
    /// The ordering member (rank 0: the creator) dies for good part-way;
    /// what it had queued is lost with it.
    OrdererDies,
    /// Members crash (`kill -9`) at random moments and come back later,
    /// with what they had stored: their state and their queued envelopes
    /// (the outbox is durable). Envelopes to a member that is down wait
    /// for it (the sender's outbox retries). Time moves on while one is
    /// down, so the others fail over to the next ordering member and the
    /// crashed one may come back still believing it orders.
    Crashes(usize),
}

/// One seeded run: every member queues `rounds` updates at once; random
/// delivery until quiet, with the given faults.
fn simulate(seed: u64, n: usize, rounds: usize, faults: Faults) {
    // RUST_LOG=info shows what the members decide.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut members = form_group(n);
    let formed = members[0].group.as_ref().unwrap().epoch();
    let mut pool: Pool = BTreeMap::new();
    let mut now = 100u64;
    for i in 0..n {
        for _ in 0..rounds {
            let g = members[i].group.as_mut().unwrap();
            let mut c = Changes::default();
            g.push_intent(Intent::Update, now, &mut c).unwrap();
            g.drain_writes(&mut c);
            run(c, i, &mut members, &mut pool);
        }
    }
    let mut steps = 0;
    let mut killed = false;
    // Crashes still to come, and when each crashed member comes back.
    let mut crashes_left = match faults {
        Faults::Crashes(k) => k,
        _ => 0,
    };
    let mut back_at: Vec<Option<u64>> = vec![None; n];
    // Deliveries in a row that were only deferred: when every envelope left
    // waits for something, time has to pass.
    let mut stalled = 0usize;
    loop {
        steps += 1;
        assert!(steps < 200_000, "seed {seed}: no quiescence");
        if faults == Faults::OrdererDies && !killed && steps == 3 * n {
            members[0].alive = false;
            pool.retain(|(from, _), _| *from != 0);
            killed = true;
        }
        if crashes_left > 0 && rng.gen_range(0..(4 * n)) == 0 {
            let who = rng.gen_range(0..n);
            if members[who].alive {
                crashes_left -= 1;
                tracing::info!(who, now, "--- crash");
                members[who].alive = false;
                members[who].was = members[who].group.take().map(|g| g.own_ipk());
                back_at[who] = Some(now + rng.gen_range(0..3) * (TIMEOUT_MS + 1) + 1);
            }
        }
        for (who, at) in back_at.iter_mut().enumerate() {
            if at.is_some_and(|t| now >= t) {
                *at = None;
                tracing::info!(who, now, "--- back");
                let id = actors::groups::all_groups(&members[who].store).unwrap()[0].id;
                members[who].group = Some(GroupSession::load(&members[who].store, id).unwrap());
                members[who].alive = true;
            }
        }
        let up: Vec<bool> = members.iter().map(|m| m.alive).collect();
        let live: Vec<(usize, usize)> = pool
            .iter()
            .filter(|((from, to), q)| {
                // A crashed member neither sends nor receives until it is
                // back; what was queued for it waits.
                !q.is_empty() && (!matches!(faults, Faults::Crashes(_)) || (up[*from] && up[*to]))
            })
            .map(|(k, _)| *k)
            .collect();
        let in_flight: usize = live.iter().map(|k| pool[k].len()).sum();
        if live.is_empty() || stalled > 2 * in_flight {
            stalled = 0;
            // Quiet: if someone still waits (for a dead ordering service, or
            // to finish syncing as the new one, or to come back), time moves on.
            let waiting = members
                .iter()
                .any(|m| m.alive && m.group.as_ref().unwrap().needs_tick())
                || back_at.iter().any(Option::is_some);
            if !waiting && live.is_empty() {
                break;
            }
            now += TIMEOUT_MS + 1;
            for i in 0..n {
                if !members[i].alive {
                    continue;
                }
                let g = members[i].group.as_mut().unwrap();
                let mut c = Changes::default();
                g.check_ordering(now, TIMEOUT_MS, &mut c).unwrap();
                g.drain_writes(&mut c);
                run(c, i, &mut members, &mut pool);
            }
            continue;
        }
        let key = live[rng.gen_range(0..live.len())];
        let payload = pool.get_mut(&key).and_then(|q| q.pop_front()).unwrap();
        let to = key.1;
        if !members[to].alive {
            continue;
        }
        now += 1;
        let g = members[to].group.as_mut().unwrap();
        let mut c = Changes::default();
        match g.receive(&payload, None, now, &mut c) {
            Ok(_) => stalled = 0,
            // Not yet: back to the end of its queue.
            Err(GroupError::Deferred) => {
                pool.entry(key).or_default().push_back(payload);
                g.request_catch_up(now, TIMEOUT_MS, &mut c);
                stalled += 1;
            }
            // Lost the race or arrived late: its author learns from the
            // winner. Or ordered under a view the group has left.
            Err(GroupError::WrongEpoch { .. } | GroupError::NotOrderer) => {}
            Err(e) => panic!("seed {seed}: member {to}: {e}"),
        }
        g.drain_writes(&mut c);
        run(c, to, &mut members, &mut pool);
    }
    let live: Vec<&GroupSession> = members
        .iter()
        .filter(|m| m.alive)
        .map(|m| m.group.as_ref().unwrap())
        .collect();
    let first = live[0];
    for (i, g) in live.iter().enumerate() {
        println!(
            "member {i}: epoch {}, rank {}, pending {}, intents {}, needs tick {}",
            g.epoch(),
            g.record().orderer_rank,
            g.record().pending.is_some(),
            g.record().intents.len(),
            g.needs_tick()
        );
    }
    for g in &live {
        assert_eq!(g.epoch(), first.epoch(), "seed {seed}: epochs differ");
        assert_eq!(
            g.epoch_authenticator(),
            first.epoch_authenticator(),
            "seed {seed}: authenticators differ"
        );
        assert!(
            g.record().pending.is_none() && g.record().intents.is_empty(),
            "seed {seed}: a member is stuck"
        );
    }
    // Every update of every live member was applied (and the dead one's
    // that were accepted before it died): one epoch each. Members that
    // crash and come back lose nothing.
    let live_updates = (live.len() * rounds) as u64;
    assert!(
        first.epoch() >= formed + live_updates,
        "seed {seed}: epoch {} < {}",
        first.epoch(),
        formed + live_updates
    );
    if faults != Faults::OrdererDies {
        assert_eq!(first.epoch(), formed + (n * rounds) as u64, "seed {seed}");
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("PROTONODE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => vec![seed],
        None => (0..6).map(|_| rand::random()).collect(),
    }
}

#[test]
fn concurrent_commits_converge_on_one_epoch() {
    for seed in seeds() {
        let n = 3 + (seed % 3) as usize;
        println!("seed {seed}: {n} members, 3 updates each");
        simulate(seed, n, 3, Faults::None);
    }
}

#[test]
fn the_group_continues_when_the_ordering_member_dies() {
    for seed in seeds() {
        let n = 3 + (seed % 3) as usize;
        println!("seed {seed}: {n} members, the ordering member dies");
        simulate(seed, n, 2, Faults::OrdererDies);
    }
}

#[test]
fn members_that_crash_and_come_back_do_not_fork_the_group() {
    for seed in seeds() {
        let n = 3 + (seed % 3) as usize;
        println!("seed {seed}: {n} members, 4 crashes");
        simulate(seed, n, 3, Faults::Crashes(4));
    }
}
