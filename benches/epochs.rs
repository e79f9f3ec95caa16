//! What a group's past epochs cost each message a member reads.
//!
//! Run: `cargo bench -p protonode-bench --bench epochs`
//! (PROTONODE_BENCH_MEMBERS, default 21, and PROTONODE_BENCH_SAMPLES,
//! default 300, change the sizes).
//!
//! openmls keeps the secrets of up to `mls::MAX_PAST_EPOCHS` past epochs,
//! to read a message sent before a commit that arrives after it, and hands
//! them to storage with the current epoch's after every message. Two groups
//! of the same size, in which every member writes, are measured in this one
//! run, in alternating blocks:
//! - the floor: a group with no past epoch (right after it was made);
//! - measured: a group after `MAX_PAST_EPOCHS + 1` commits, so that it keeps
//!   as many past epochs as it ever does.
//!
//! One sample: another member's message is read (openmls process) and what
//! it changed is committed durably to the member's redb file, as a node
//! does. Also printed: the bytes each message writes to the database.

use std::time::{Duration, Instant};

use actors::identity::IdentityKey;
use actors::mls::{self, Incoming, Provider, MAX_PAST_EPOCHS};
use actors::store::Store;
use openmls::prelude::MlsGroup;
use protonode_bench::{env_usize, machine, ms, Stats};

/// Samples of one kind taken back to back before switching to the other.
const BLOCK: usize = 25;

fn main() {
    let members = env_usize("PROTONODE_BENCH_MEMBERS", 21).max(3);
    let samples = env_usize("PROTONODE_BENCH_SAMPLES", 300);
    println!("protonode past-epochs benchmark on {}", machine());
    println!("a message read by a member of a {members}-member group where every member writes,");
    println!("processed by openmls and committed durably (medians over {samples} samples,");
    println!(" in alternating blocks of {BLOCK})");
    println!();
    eprintln!("setting up two groups of {members}");
    let mut fresh = Group::new(members, 0);
    let mut aged = Group::new(members, MAX_PAST_EPOCHS + 1);
    for _ in 0..BLOCK {
        fresh.sample();
        aged.sample();
    }
    let (mut t_fresh, mut t_aged) = (Vec::new(), Vec::new());
    let (mut b_fresh, mut b_aged) = (0usize, 0usize);
    for _ in 0..samples.div_ceil(BLOCK) {
        for _ in 0..BLOCK {
            let (t, b) = fresh.sample();
            t_fresh.push(t);
            b_fresh += b;
        }
        for _ in 0..BLOCK {
            let (t, b) = aged.sample();
            t_aged.push(t);
            b_aged += b;
        }
    }
    let per = |b: usize, n: usize| b / n.max(1);
    let (n_fresh, n_aged) = (t_fresh.len(), t_aged.len());
    let (fresh_s, aged_s) = (Stats::of(t_fresh), Stats::of(t_aged));
    let (bytes_fresh, bytes_aged) = (per(b_fresh, n_fresh), per(b_aged, n_aged));
    println!("floor: no past epoch");
    println!("  {fresh_s}");
    println!("  {bytes_fresh} bytes written per message");
    println!(
        "measured: after {} commits ({} past epochs kept)",
        MAX_PAST_EPOCHS + 1,
        aged.past_epochs()
    );
    println!("  {aged_s}");
    println!("  {bytes_aged} bytes written per message");
    let ratio = ms(aged_s.median) / ms(fresh_s.median);
    println!(
        "ratio to floor: {ratio:.2}x in time, {:.2}x in bytes written",
        bytes_aged as f64 / bytes_fresh.max(1) as f64
    );
    println!();
    println!("| operation | measured | floor | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| read a message, {members} members, {} past epochs | {:.3} ms, {bytes_aged} B | {:.3} ms, {bytes_fresh} B | {ratio:.2}x |",
        aged.past_epochs(),
        ms(aged_s.median),
        ms(fresh_s.median),
    );
}

/// Each member's node: its own redb file, as in a real group.
struct Member {
    _dir: tempfile::TempDir,
    store: Store,
    provider: Provider,
    key: IdentityKey,
    group: MlsGroup,
}

impl Member {
    /// Commits what openmls wrote, durably; the bytes written.
    fn commit(&self) -> usize {
        let writes = self.provider.mls_storage().take_writes();
        let bytes = writes.values().flatten().map(Vec::len).sum();
        self.store
            .write_blocking(|tx| mls::apply_writes(tx, &writes))
            .expect("commit");
        bytes
    }
}

struct Group {
    members: Vec<Member>,
    /// The next member to write.
    next: usize,
    commits: usize,
}

impl Group {
    /// A group of `size`, every member writing once in each epoch, after
    /// `commits` commits (members' self-updates, in turn).
    fn new(size: usize, commits: usize) -> Self {
        let open = || {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = Store::open(&dir.path().join("node.redb")).expect("store");
            let provider = Provider::new(store.clone(), rand_namespace());
            (dir, store, provider, IdentityKey::generate())
        };
        let (dir, store, provider, key) = open();
        let mut first = mls::create_group(&provider, &key).expect("group");
        let mut joining = Vec::new();
        let mut packages = Vec::new();
        for _ in 1..size {
            let (dir, store, provider, key) = open();
            let kp = mls::new_key_package(&provider, &key).expect("key package");
            packages.push(kp.key_package().clone());
            joining.push((dir, store, provider, key));
        }
        let (_, welcome) = mls::add_members(&mut first, &provider, &key, &packages).expect("add");
        let mut members = vec![Member {
            _dir: dir,
            store,
            provider,
            key,
            group: first,
        }];
        for (dir, store, provider, key) in joining {
            let group = mls::join_from_welcome(&provider, &welcome).expect("join");
            members.push(Member {
                _dir: dir,
                store,
                provider,
                key,
                group,
            });
        }
        for m in &members {
            m.commit();
        }
        let mut group = Self {
            members,
            next: 1,
            commits: 0,
        };
        for round in 0..commits {
            for _ in 1..size {
                group.sample();
            }
            group.commit(round % size);
        }
        group
    }

    /// Member `by` updates its keys; everyone else merges the commit.
    fn commit(&mut self, by: usize) {
        let m = &mut self.members[by];
        let commit = mls::stage_self_update(&mut m.group, &m.provider, &m.key).expect("update");
        mls::merge_pending(&mut m.group, &m.provider).expect("merge");
        m.commit();
        for (i, m) in self.members.iter_mut().enumerate() {
            if i == by {
                continue;
            }
            let Ok(Incoming::Commit { staged, .. }) =
                mls::process(&mut m.group, &m.provider, &commit)
            else {
                panic!("a commit");
            };
            mls::merge_staged(&mut m.group, &m.provider, *staged).expect("merge");
            m.commit();
        }
        self.commits += 1;
    }

    /// The next member writes (not timed); member 0 reads it and commits
    /// durably (timed): the time and the bytes written.
    fn sample(&mut self) -> (Duration, usize) {
        let writer = &mut self.members[self.next];
        let text = [b'x'; 100];
        let ct =
            mls::encrypt(&mut writer.group, &writer.provider, &writer.key, &text).expect("encrypt");
        writer.commit();
        self.next = if self.next + 1 == self.members.len() {
            1
        } else {
            self.next + 1
        };
        let reader = &mut self.members[0];
        let t = Instant::now();
        let read = mls::process(&mut reader.group, &reader.provider, &ct);
        let bytes = reader.commit();
        let elapsed = t.elapsed();
        assert!(matches!(read, Ok(Incoming::Application { .. })));
        (elapsed, bytes)
    }

    fn past_epochs(&self) -> usize {
        self.commits.min(MAX_PAST_EPOCHS)
    }
}

fn rand_namespace() -> [u8; 8] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes()
}
