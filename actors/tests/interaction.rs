//! Alex and Blair talk through everything a network and a crash can do to
//! two nodes, in the style of libsignal's interaction fuzzer: no network, no
//! actors, just the protocol code and two redb stores. What Alex's outbox
//! holds is "in flight" to Blair and the other way round; the test hands
//! payloads over by hand, in order or not, more than once, or loses the
//! acknowledgement, and crashes either side before or after it commits.
//!
//! A seeded random number generator picks the actions. Every run prints its
//! seeds; `PROTONODE_SEED=N` replays one, `PROTONODE_STEPS=N` sets how many
//! actions each run takes.
//!
//! After every action: every text a side accepted is exactly the text that
//! was sent, under the same id; no text appears twice in a history; a copy
//! of a ciphertext already processed is refused as `MlsError::Replay` and
//! changes nothing; each side's history and outbox are what its committed
//! operations made them. At the end everything still in flight is
//! delivered, and every text whose send was committed arrived exactly once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use actors::changes::{Applied, Changes, StatusChange};
use actors::identity::Ipk;
use actors::manager::history;
use actors::mls::MlsError;
use actors::model::{Conversation, DisplayIdentity, MessageId, ProtonId};
use actors::protocol::Payload;
use actors::records::{
    Author, HistoryEntry, MessageStatus, OutboxEntry, OutboxKind, ProtonState, TicketRecord,
};
use actors::relationship::{
    accept_invite, create_invite, receive_welcome, Lifetimes, NodeAddrs, ProtonSession, Received,
    RelationshipError,
};
use actors::store::{self, tables, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redb::ReadableTable;

/// Actions per run when `PROTONODE_STEPS` does not say: a few seconds in a
/// debug build, where checking each message's signature dominates.
const DEFAULT_STEPS: u64 = 150;
/// Runs per `cargo test` when `PROTONODE_SEED` does not name one; they run
/// on threads of their own.
const RUNS: usize = 3;
/// How far ahead of the oldest text not yet received a delivery may reach.
/// MLS keeps the keys of skipped messages for a bounded number of
/// generations (64 here); a network that reorders further loses messages.
const REORDER_WINDOW: usize = 8;
/// Payloads a receiver accepted that the network may still duplicate.
const DUPLICATES_KEPT: usize = 32;
/// The clock moves one second per action, so ephemeral addresses (one hour)
/// rotate during a long run and the rotation rides on texts.
const LIFETIMES: Lifetimes = Lifetimes {
    ephemeral: Duration::from_secs(3600),
    long_term: Duration::from_secs(365 * 24 * 3600),
};
const TICK_MS: u64 = 1_000;

#[test]
fn alex_and_blair_survive_reordering_retries_and_crashes() {
    let steps = env_number("PROTONODE_STEPS").unwrap_or(DEFAULT_STEPS);
    let seeds = match env_number("PROTONODE_SEED") {
        Some(seed) => vec![seed],
        None => (0..RUNS).map(|_| rand::random()).collect(),
    };
    for seed in &seeds {
        println!("interaction run: PROTONODE_SEED={seed} PROTONODE_STEPS={steps}");
    }
    std::thread::scope(|runs| {
        for seed in seeds {
            runs.spawn(move || run(seed, steps));
        }
    });
}

/// One run: befriend, `steps` random actions with every check after each,
/// then heal the network and check that every text arrived once.
fn run(seed: u64, steps: u64) {
    let replay = Replay { seed, steps };
    let mut world = World::befriend(seed);
    for step in 0..steps {
        let action = world.pick();
        world.record(step, action);
        world.act(action);
        world.check();
    }
    world.deliver_everything();
    world.check_everything_arrived_once();
    drop(replay);
}

/// Prints how to replay a run that failed.
struct Replay {
    seed: u64,
    steps: u64,
}

impl Drop for Replay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "interaction run failed; replay it with: PROTONODE_SEED={} PROTONODE_STEPS={} \
                 cargo test -p protonode-actors --test interaction",
                self.seed, self.steps
            );
        }
    }
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Alex,
    Blair,
}

impl Who {
    fn other(self) -> Self {
        match self {
            Who::Alex => Who::Blair,
            Who::Blair => Who::Alex,
        }
    }
}

impl fmt::Display for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What can happen next. Deliveries are named by their receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// The sender writes a text; once committed it is in flight.
    Send(Who),
    /// The oldest payload in flight to this side arrives and is acknowledged.
    DeliverNext(Who),
    /// A later payload (within the reordering window) overtakes the others.
    DeliverOutOfOrder(Who),
    /// A payload arrives and is processed, but the acknowledgement is lost:
    /// it stays in the sender's outbox and will come again.
    DeliverLosingAck(Who),
    /// The network hands over again a payload already received.
    Duplicate(Who),
    /// The side crashes in the middle of a send or a receive, before its
    /// transaction commits, and restarts from its store.
    CrashBeforeCommit(Who),
    /// The side restarts from its store (every operation so far committed).
    CrashAfterCommit(Who),
}

/// One side: its store (reopened on a crash) and its proton's session.
struct Party {
    who: Who,
    _dir: tempfile::TempDir,
    path: PathBuf,
    /// `None` only while crashed.
    store: Option<Store>,
    node: NodeAddrs,
    proton: ProtonId,
    /// The key the peer knows this side by (deriving it costs a scalar
    /// multiplication, so it is kept).
    ipk: Option<Ipk>,
    session: Option<ProtonSession>,
}

impl Party {
    fn open(who: Who) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("db");
        let store = Store::open(&path).expect("a fresh store opens");
        Self {
            who,
            _dir: dir,
            path,
            store: Some(store),
            node: NodeAddrs {
                peer: transports::PeerId::random(),
                addrs: vec![
                    "/ip4/127.0.0.1/tcp/4001".parse().expect("a multiaddr"),
                    "/ip4/127.0.0.1/udp/4001/quic-v1"
                        .parse()
                        .expect("a multiaddr"),
                ],
                service_key: actors::seal::SealKey::generate().public(),
            },
            proton: ProtonId([0; 8]),
            ipk: None,
            session: None,
        }
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("the store is open")
    }

    fn session(&mut self) -> &mut ProtonSession {
        self.session.as_mut().expect("the session is loaded")
    }

    fn commit(&self, changes: Changes) -> Applied {
        self.store()
            .write_blocking(move |tx| changes.apply(tx))
            .unwrap_or_else(|e| panic!("{}'s commit failed: {e}", self.who))
    }

    /// Kills the process: what was not committed is gone. The database file
    /// is closed and opened again, and the session restored from it.
    fn restart(&mut self) {
        self.session = None;
        self.store = None;
        self.store = Some(Store::open(&self.path).expect("the store reopens"));
        self.session = Some(
            ProtonSession::load(self.store(), self.proton)
                .unwrap_or_else(|e| panic!("{}'s session does not load: {e}", self.who)),
        );
    }

    fn conversation(&self) -> Conversation {
        Conversation::Proton(self.proton)
    }

    fn history(&self) -> Vec<HistoryEntry> {
        history(self.store(), self.conversation()).expect("the history reads")
    }

    /// The texts in flight from this side: its outbox rows, oldest first.
    fn outbox(&self) -> Vec<(u64, OutboxEntry)> {
        let conversation = self.conversation();
        self.store()
            .read(|tx| {
                let table = tx.open_table(tables::OUTBOX)?;
                let mut rows = Vec::new();
                for row in table.iter()? {
                    let (seq, value) = row?;
                    let entry: OutboxEntry = store::decode(value.value(), "outbox entry")?;
                    if entry.conversation == conversation {
                        rows.push((seq.value(), entry));
                    }
                }
                Ok(rows)
            })
            .expect("the outbox reads")
    }

    /// Records that the peer's node acknowledged an outbox row, as the
    /// sending service does.
    fn acknowledge(&self, seq: u64, entry: &OutboxEntry) {
        let mut changes = Changes {
            outbox_done: vec![seq],
            ..Changes::default()
        };
        if let Some(position) = entry.history {
            changes
                .statuses
                .push((entry.conversation, position, StatusChange::Acknowledged));
        }
        self.commit(changes);
    }

    fn ipk(&mut self) -> Ipk {
        match self.ipk {
            Some(ipk) => ipk,
            None => {
                let ipk = self.session().record().own_key.key().ipk();
                *self.ipk.insert(ipk)
            }
        }
    }
}

/// One direction of the conversation as the test knows it.
#[derive(Default)]
struct Flow {
    /// Texts whose send committed, in the order sent (their MLS generations).
    sent: Vec<(MessageId, String)>,
    ordinal: HashMap<MessageId, usize>,
    /// Texts the receiver accepted and committed.
    received: HashSet<MessageId>,
    /// Texts whose acknowledgement the sender committed.
    acknowledged: HashSet<MessageId>,
    /// Payloads the receiver accepted, for the network to duplicate.
    accepted_payloads: VecDeque<(MessageId, Vec<u8>)>,
}

impl Flow {
    fn text(&self, id: &MessageId) -> &str {
        let ordinal = self.ordinal[id];
        &self.sent[ordinal].1
    }

    /// The send order of the oldest text the receiver has not accepted.
    fn oldest_unreceived(&self) -> Option<usize> {
        self.sent
            .iter()
            .position(|(id, _)| !self.received.contains(id))
    }
}

struct World {
    seed: u64,
    rng: StdRng,
    alex: Party,
    blair: Party,
    /// What Alex sent to Blair, and what Blair sent to Alex.
    to_blair: Flow,
    to_alex: Flow,
    now: u64,
    texts: usize,
    /// The last actions, shown when a check fails.
    recent: VecDeque<String>,
}

impl World {
    /// Alex invites Blair, Blair accepts, Alex receives the answer, and
    /// Blair's node learns that its answer arrived.
    fn befriend(seed: u64) -> Self {
        let mut alex = Party::open(Who::Alex);
        let mut blair = Party::open(Who::Blair);
        let now = 1_700_000_000_000;
        let invite = create_invite(
            alex.store(),
            &alex.node,
            display("Alex"),
            LIFETIMES,
            Duration::from_secs(3600),
            None,
            now,
        )
        .expect("Alex makes a ticket");
        let ticket_id = invite.ticket.id;
        alex.commit(invite.changes);

        let acceptance = accept_invite(
            blair.store(),
            &blair.node,
            display("Blair"),
            LIFETIMES,
            &invite.text,
            None,
            now,
        )
        .expect("Blair accepts Alex's ticket");
        blair.proton = acceptance.proton.id;
        let applied = blair.commit(acceptance.changes);
        let [(answer_seq, answer)] = applied.outbox.as_slice() else {
            panic!("accepting queues exactly one answer");
        };
        assert_eq!(answer.kind, OutboxKind::Welcome);

        let ticket: TicketRecord = alex
            .store()
            .read(|tx| store::get(&tx.open_table(tables::TICKETS)?, ticket_id.0, "ticket"))
            .expect("the ticket reads")
            .expect("Alex's ticket is stored");
        let payload = Payload::decode(&answer.payload).expect("the answer decodes");
        let (proton, changes) = receive_welcome(alex.store(), &ticket, &payload, 0, now)
            .expect("Alex takes Blair's answer");
        alex.proton = proton.id;
        alex.commit(changes);

        blair.acknowledge(*answer_seq, answer);
        blair.restart();
        let active = blair.session().set_state(ProtonState::Active);
        blair.commit(active);
        alex.restart();
        blair.restart();

        Self {
            seed,
            rng: StdRng::seed_from_u64(seed),
            alex,
            blair,
            to_blair: Flow::default(),
            to_alex: Flow::default(),
            now,
            texts: 0,
            recent: VecDeque::new(),
        }
    }

    /// The sender, the receiver and the flow between them, by receiver.
    fn towards(&mut self, receiver: Who) -> (&mut Party, &mut Party, &mut Flow) {
        match receiver {
            Who::Blair => (&mut self.alex, &mut self.blair, &mut self.to_blair),
            Who::Alex => (&mut self.blair, &mut self.alex, &mut self.to_alex),
        }
    }

    fn party(&mut self, who: Who) -> &mut Party {
        match who {
            Who::Alex => &mut self.alex,
            Who::Blair => &mut self.blair,
        }
    }

    fn pick(&mut self) -> Action {
        let who = if self.rng.gen_bool(0.5) {
            Who::Alex
        } else {
            Who::Blair
        };
        match self.rng.gen_range(0..100) {
            0..30 => Action::Send(who),
            30..55 => Action::DeliverNext(who),
            55..70 => Action::DeliverOutOfOrder(who),
            70..78 => Action::DeliverLosingAck(who),
            78..86 => Action::Duplicate(who),
            86..93 => Action::CrashBeforeCommit(who),
            _ => Action::CrashAfterCommit(who),
        }
    }

    fn record(&mut self, step: u64, action: Action) {
        if self.recent.len() == 20 {
            self.recent.pop_front();
        }
        self.recent.push_back(format!("step {step}: {action:?}"));
    }

    fn act(&mut self, action: Action) {
        self.now += TICK_MS;
        match action {
            Action::Send(who) => self.send(who, true),
            Action::DeliverNext(receiver) => self.deliver(receiver, Order::Next, true),
            Action::DeliverOutOfOrder(receiver) => self.deliver(receiver, Order::Any, true),
            Action::DeliverLosingAck(receiver) => self.deliver(receiver, Order::Any, false),
            Action::Duplicate(receiver) => self.duplicate(receiver),
            Action::CrashBeforeCommit(who) => {
                if self.rng.gen_bool(0.5) {
                    self.send(who, false);
                } else {
                    self.receive_and_crash(who);
                }
                self.party(who).restart();
            }
            Action::CrashAfterCommit(who) => self.party(who).restart(),
        }
    }

    /// A text of random length and script, unique by its prefix.
    fn text(&mut self, from: Who) -> String {
        self.texts += 1;
        let mut text = format!("{from} #{}:", self.texts);
        let words = [
            "hello",
            "ça va",
            "日本語",
            "🦊",
            "a",
            "reordering",
            "\u{202e}rtl",
        ];
        for _ in 0..self.rng.gen_range(0..40) {
            text.push(' ');
            text.push_str(words[self.rng.gen_range(0..words.len())]);
        }
        text
    }

    /// `from` writes a text; with `commit`, it is durably queued and in
    /// flight; without, the side crashes first and the text never existed.
    fn send(&mut self, from: Who, commit: bool) {
        let text = self.text(from);
        let now = self.now;
        let (sender, _, flow) = self.towards(from.other());
        let node = sender.node.clone();
        let mut changes = Changes::default();
        let entry = sender
            .session()
            .send_text(&text, &node, LIFETIMES, now, &mut changes)
            .unwrap_or_else(|e| panic!("{from} cannot send: {e}"));
        sender.session().drain_writes(&mut changes);
        assert_eq!(entry.text, text);
        let [queued] = changes.outbox.as_slice() else {
            panic!("a text queues one envelope: {changes:?}");
        };
        assert_eq!(queued.message, Some(entry.id));
        if !commit {
            return;
        }
        sender.commit(changes);
        flow.ordinal.insert(entry.id, flow.sent.len());
        flow.sent.push((entry.id, text));
    }

    /// Delivers one payload in flight to `receiver`; with `acknowledge`, the
    /// sender then records the acknowledgement.
    fn deliver(&mut self, receiver: Who, order: Order, acknowledge: bool) {
        let now = self.now;
        let choice: f64 = self.rng.gen();
        let (sender, to, flow) = self.towards(receiver);
        let rows = sender.outbox();
        let Some((seq, entry)) = choose(&rows, flow, order, choice) else {
            return;
        };
        let id = entry.message.expect("a text's row names its message");
        let already = flow.received.contains(&id);
        let sender_ipk = sender.ipk();
        let mut changes = Changes::default();
        let result = to.session().receive(&entry.payload, now, &mut changes);
        to.session().drain_writes(&mut changes);
        match result {
            Ok(Received::Text(got)) => {
                assert!(!already, "{receiver} accepted {id} a second time");
                assert_eq!(got.id, id, "{receiver} got another message than was sent");
                assert_eq!(got.text, flow.text(&id), "{receiver} read another text");
                assert_eq!(got.author, Author::Peer(sender_ipk));
                to.commit(changes);
                flow.received.insert(id);
                if flow.accepted_payloads.len() == DUPLICATES_KEPT {
                    flow.accepted_payloads.pop_front();
                }
                flow.accepted_payloads
                    .push_back((id, entry.payload.clone()));
            }
            Err(RelationshipError::Mls(MlsError::Replay)) => {
                assert!(
                    already,
                    "{receiver} refused {id} as a replay, but never had it"
                );
                assert!(changes.is_empty(), "a refused copy changed {changes:?}");
            }
            other => panic!("{receiver} could not take {id}: {other:?}"),
        }
        if acknowledge {
            sender.acknowledge(*seq, entry);
            flow.acknowledged.insert(id);
        }
    }

    /// The network hands `receiver` a copy of a payload it accepted before.
    fn duplicate(&mut self, receiver: Who) {
        let now = self.now;
        let pick: usize = self.rng.gen();
        let (_, to, flow) = self.towards(receiver);
        if flow.accepted_payloads.is_empty() {
            return;
        }
        let (id, payload) = flow.accepted_payloads[pick % flow.accepted_payloads.len()].clone();
        let before = to.history().len();
        let mut changes = Changes::default();
        let result = to.session().receive(&payload, now, &mut changes);
        to.session().drain_writes(&mut changes);
        assert!(
            matches!(result, Err(RelationshipError::Mls(MlsError::Replay))),
            "a copy of {id} was not refused as a replay: {result:?}"
        );
        assert!(changes.is_empty(), "a refused copy changed {changes:?}");
        assert_eq!(to.history().len(), before);
    }

    /// `who` processes a payload in flight to it, then crashes before its
    /// transaction commits: the payload is still in flight, unprocessed.
    fn receive_and_crash(&mut self, who: Who) {
        let now = self.now;
        let choice: f64 = self.rng.gen();
        let (sender, to, flow) = self.towards(who);
        let rows = sender.outbox();
        let Some((_, entry)) = choose(&rows, flow, Order::Any, choice) else {
            return;
        };
        let mut changes = Changes::default();
        let _ = to.session().receive(&entry.payload, now, &mut changes);
        to.session().drain_writes(&mut changes);
        drop(changes);
    }

    /// Every check that holds between any two actions.
    fn check(&mut self) {
        let recent: Vec<String> = self.recent.iter().cloned().collect();
        let context = recent.join("\n  ");
        for receiver in [Who::Alex, Who::Blair] {
            let (sender, to, flow) = self.towards(receiver);
            check_receiver(to, flow, &context);
            check_sender(sender, flow, &context);
        }
    }

    /// The network heals: everything in flight is delivered in order and
    /// acknowledged, both ways.
    fn deliver_everything(&mut self) {
        for receiver in [Who::Alex, Who::Blair] {
            let (sender, _, _) = self.towards(receiver);
            let in_flight = sender.outbox().len();
            for _ in 0..in_flight {
                self.now += TICK_MS;
                self.deliver(receiver, Order::Next, true);
            }
            let (sender, _, _) = self.towards(receiver);
            assert!(sender.outbox().is_empty(), "{} still has rows", sender.who);
        }
        self.check();
    }

    fn check_everything_arrived_once(&mut self) {
        let seed = self.seed;
        for receiver in [Who::Alex, Who::Blair] {
            let (sender, to, flow) = self.towards(receiver);
            let sent: HashSet<MessageId> = flow.sent.iter().map(|(id, _)| *id).collect();
            assert_eq!(
                flow.received, sent,
                "{receiver} did not get every text {} sent",
                sender.who
            );
            let received = to
                .history()
                .into_iter()
                .filter(|e| matches!(e.author, Author::Peer(_)))
                .count();
            assert_eq!(received, flow.sent.len(), "each text arrived exactly once");
            assert!(
                sender
                    .history()
                    .iter()
                    .filter(|e| e.author == Author::Me)
                    .all(|e| e.status == MessageStatus::Delivered),
                "every text of {} is delivered",
                sender.who
            );
            println!(
                "  {} → {receiver}: {} texts sent, all received once (seed {})",
                sender.who,
                flow.sent.len(),
                seed
            );
        }
    }
}

/// Which payload in flight a delivery takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// The oldest.
    Next,
    /// Any within the reordering window.
    Any,
}

/// Picks an outbox row to deliver. Rows are in send order; a row may be
/// taken if it was sent less than [`REORDER_WINDOW`] texts after the oldest
/// text the receiver has not accepted (rows before that one were accepted
/// already, and their acknowledgements lost).
fn choose<'a>(
    rows: &'a [(u64, OutboxEntry)],
    flow: &Flow,
    order: Order,
    choice: f64,
) -> Option<&'a (u64, OutboxEntry)> {
    let limit = flow
        .oldest_unreceived()
        .map_or(usize::MAX, |oldest| oldest + REORDER_WINDOW);
    let candidates: Vec<&(u64, OutboxEntry)> = rows
        .iter()
        .filter(|(_, e)| {
            e.message
                .and_then(|id| flow.ordinal.get(&id))
                .is_some_and(|ordinal| *ordinal < limit)
        })
        .collect();
    match order {
        Order::Next => candidates.first().copied(),
        Order::Any if candidates.is_empty() => None,
        Order::Any => {
            let i = ((choice * candidates.len() as f64) as usize).min(candidates.len() - 1);
            Some(candidates[i])
        }
    }
}

/// The receiver's history holds exactly the texts it accepted, once each,
/// each as it was sent.
fn check_receiver(to: &Party, flow: &Flow, context: &str) {
    let mut seen = HashSet::new();
    for entry in to.history() {
        if !matches!(entry.author, Author::Peer(_)) {
            continue;
        }
        assert!(
            seen.insert(entry.id),
            "{} has {} twice in its history; last actions:\n  {context}",
            to.who,
            entry.id
        );
        assert!(
            flow.ordinal.contains_key(&entry.id),
            "{} has a text nobody sent: {entry:?}; last actions:\n  {context}",
            to.who
        );
        assert_eq!(
            entry.text,
            flow.text(&entry.id),
            "last actions:\n  {context}"
        );
        assert_eq!(entry.status, MessageStatus::Received);
    }
    assert_eq!(
        seen, flow.received,
        "{}'s history is not what it accepted; last actions:\n  {context}",
        to.who
    );
}

/// The sender's history holds its committed texts in order, delivered once
/// acknowledged; its outbox holds exactly those not acknowledged.
fn check_sender(sender: &Party, flow: &Flow, context: &str) {
    let own: Vec<(MessageId, String, MessageStatus)> = sender
        .history()
        .into_iter()
        .filter(|e| e.author == Author::Me)
        .map(|e| (e.id, e.text, e.status))
        .collect();
    let expected: Vec<(MessageId, String, MessageStatus)> = flow
        .sent
        .iter()
        .map(|(id, text)| {
            let status = if flow.acknowledged.contains(id) {
                MessageStatus::Delivered
            } else {
                MessageStatus::Queued
            };
            (*id, text.clone(), status)
        })
        .collect();
    assert_eq!(
        own, expected,
        "{}'s own history; last actions:\n  {context}",
        sender.who
    );
    let queued: Vec<MessageId> = sender
        .outbox()
        .iter()
        .filter_map(|(_, e)| e.message)
        .collect();
    let unacknowledged: Vec<MessageId> = flow
        .sent
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !flow.acknowledged.contains(id))
        .collect();
    assert_eq!(
        queued, unacknowledged,
        "{}'s outbox; last actions:\n  {context}",
        sender.who
    );
}

fn display(name: &str) -> DisplayIdentity {
    DisplayIdentity {
        name: name.into(),
        pronouns: None,
        picture: None,
    }
}
