//! Merging parallel relationships and catching a meddler, with real redb
//! stores and real openmls but no network: what one side queues is handed
//! to the other by hand. `tests/tests/merge.rs` tells the same stories over
//! real daemons.

use std::time::Duration;

use actors::changes::Changes;
use actors::manager::history;
use actors::merge::{self, MergeError};
use actors::model::{Conversation, DisplayIdentity, ProtonId, TicketId};
use actors::protocol::{Body, MergeRequest, Payload};
use actors::records::{MergeState, OutboxKind, TicketRecord, Trust};
use actors::relationship::{
    accept_invite, create_invite, receive_welcome, Lifetimes, NodeAddrs, ProtonSession, Received,
    RelationshipError,
};
use actors::store::{self, tables, Store};

const LIFETIMES: Lifetimes = Lifetimes {
    ephemeral: Duration::from_secs(3600),
    long_term: Duration::from_secs(365 * 24 * 3600),
};
const TTL: Duration = Duration::from_secs(24 * 3600);

/// One person's node: a store and where it says it can be reached.
struct Person {
    _dir: tempfile::TempDir,
    name: &'static str,
    store: Store,
    node: NodeAddrs,
}

fn person(name: &'static str) -> Person {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db")).unwrap();
    let node = NodeAddrs {
        peer: transports::PeerId::random(),
        addrs: vec![
            "/ip4/127.0.0.1/tcp/4001".parse().unwrap(),
            "/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap(),
        ],
        service_key: actors::seal::SealKey::generate().public(),
    };
    Person {
        _dir: dir,
        name,
        store,
        node,
    }
}

fn display(name: &str) -> DisplayIdentity {
    DisplayIdentity {
        name: name.into(),
        pronouns: None,
        picture: None,
    }
}

fn commit(p: &Person, changes: Changes) {
    p.store.write_blocking(move |tx| changes.apply(tx)).unwrap();
}

fn ticket(p: &Person, id: TicketId) -> TicketRecord {
    p.store
        .read(|tx| store::get(&tx.open_table(tables::TICKETS)?, id.0, "ticket"))
        .unwrap()
        .unwrap()
}

/// `inviter` invites, `acceptor` accepts, the answer arrives. Returns
/// (inviter's proton, acceptor's proton).
fn befriend(inviter: &Person, acceptor: &Person, now: u64) -> (ProtonId, ProtonId) {
    let invite = create_invite(
        &inviter.store,
        &inviter.node,
        display(inviter.name),
        LIFETIMES,
        TTL,
        None,
        now,
    )
    .unwrap();
    let id = invite.ticket.id;
    commit(inviter, invite.changes);
    let acceptance = accept_invite(
        &acceptor.store,
        &acceptor.node,
        display(acceptor.name),
        LIFETIMES,
        &invite.text,
        None,
        now + 1,
    )
    .unwrap();
    let answer = acceptance.changes.outbox[0].payload.clone();
    let acceptor_proton = acceptance.proton.id;
    commit(acceptor, acceptance.changes);
    let (record, changes) = receive_welcome(
        &inviter.store,
        &ticket(inviter, id),
        &Payload::decode(&answer).unwrap(),
        0,
        now + 2,
    )
    .unwrap();
    commit(inviter, changes);
    (record.id, acceptor_proton)
}

/// Sends `body` (or a text when `None`) from `from`'s proton `a`; returns
/// the envelope's payload.
fn queue(from: &Person, a: ProtonId, body: Option<Body>, text: &str, now: u64) -> Vec<u8> {
    let mut session = ProtonSession::load(&from.store, a).unwrap();
    let mut changes = Changes::default();
    match body {
        Some(body) => session
            .send_control(body, &from.node, LIFETIMES, now, &mut changes)
            .unwrap(),
        None => {
            session
                .send_text(text, &from.node, LIFETIMES, now, &mut changes)
                .unwrap();
        }
    }
    session.drain_writes(&mut changes);
    let payload = changes.outbox.last().unwrap().payload.clone();
    commit(from, changes);
    payload
}

/// `to`'s proton `b` processes one envelope, committed like its actor does.
fn deliver(
    to: &Person,
    b: ProtonId,
    payload: &[u8],
    now: u64,
) -> Result<Received, RelationshipError> {
    let mut session = ProtonSession::load(&to.store, b).unwrap();
    let mut changes = Changes::default();
    let received = session.receive(payload, now, &mut changes);
    session.drain_writes(&mut changes);
    commit(to, changes);
    received
}

fn text(from: &Person, a: ProtonId, to: &Person, b: ProtonId, words: &str, now: u64) {
    let payload = queue(from, a, None, words, now);
    assert!(matches!(
        deliver(to, b, &payload, now + 1),
        Ok(Received::Text(_))
    ));
}

fn trust(p: &Person, id: ProtonId) -> Trust {
    merge::trust_of(&p.store, id).unwrap()
}

fn texts(p: &Person, id: ProtonId) -> Vec<String> {
    history(&p.store, Conversation::Proton(id))
        .unwrap()
        .into_iter()
        .map(|e| e.text)
        .collect()
}

/// Blair and Charlie with two relationships (as if from two introducers),
/// a few messages in each, interleaved in time.
fn parallel() -> (Person, Person, [ProtonId; 2], [ProtonId; 2]) {
    let (blair, charlie) = (person("Blair"), person("Charlie"));
    let (c1, b1) = befriend(&charlie, &blair, 1_000);
    let (b2, c2) = befriend(&blair, &charlie, 2_000);
    text(&charlie, c1, &blair, b1, "1 via A: hi Blair", 10_000);
    text(&blair, b2, &charlie, c2, "2 via D: hi Charlie", 11_000);
    text(&blair, b1, &charlie, c1, "3 via A: how are you", 12_000);
    text(&charlie, c2, &blair, b2, "4 via D: well", 13_000);
    (blair, charlie, [b1, b2], [c1, c2])
}

/// Charlie asks; the request goes inside both relationships.
fn request(charlie: &Person, c: [ProtonId; 2], now: u64) -> (MergeRequest, [Vec<u8>; 2]) {
    let outgoing = merge::request(
        &charlie.store,
        &charlie.node,
        display("Charlie"),
        LIFETIMES,
        TTL,
        c[0],
        c[1],
        now,
    )
    .unwrap();
    let request = outgoing.request.clone();
    commit(charlie, outgoing.changes);
    let body = || Some(Body::MergeRequest(Box::new(request.clone())));
    let p1 = queue(charlie, c[0], body(), "", now + 1);
    let p2 = queue(charlie, c[1], body(), "", now + 2);
    (request, [p1, p2])
}

#[test]
fn an_honest_merge_makes_one_relationship_with_the_whole_history() {
    let (blair, charlie, b, c) = parallel();
    // Blair had linked the two: a plain request.
    commit(
        &blair,
        merge::link(&blair.store, b[0], b[1], 20_000).unwrap(),
    );
    let (request, [p1, p2]) = request(&charlie, c, 21_000);

    let Ok(Received::Merge(first)) = deliver(&blair, b[0], &p1, 22_000) else {
        panic!("a merge request")
    };
    assert!(first.first && first.flagged.is_empty());
    assert_eq!(first.state, MergeState::Pending);
    let Ok(Received::Merge(second)) = deliver(&blair, b[1], &p2, 22_001) else {
        panic!("a merge request")
    };
    assert!(
        !second.first,
        "the same request through the other relationship"
    );
    let merges = merge::all_merges(&blair.store).unwrap();
    assert_eq!(merges.len(), 1);
    assert!(merges[0].linked, "Blair had linked the two: a request");
    assert_eq!(merges[0].ours, b.to_vec());
    assert_eq!(merges[0].via.len(), 2);

    // Still in flight when Blair consents.
    let in_flight = queue(&blair, b[1], None, "4b via D: in flight", 22_500);

    // Blair consents (by an id prefix, as a user would type it).
    let id = merge::id_string(&request.id);
    let acceptance = merge::accept(
        &blair.store,
        &blair.node,
        display("Blair"),
        LIFETIMES,
        &id[..8],
        23_000,
    )
    .unwrap();
    let answer = acceptance
        .changes
        .outbox
        .iter()
        .find(|e| e.kind == OutboxKind::Welcome)
        .unwrap()
        .payload
        .clone();
    let b_new = acceptance.proton.id;
    commit(&blair, acceptance.changes);

    // Charlie's node receives the answer to the merge's ticket.
    let ticket_id =
        actors::ticket::Ticket::parse(&request.ticket, &openmls_rust_crypto::RustCrypto::default())
            .unwrap()
            .ticket
            .id;
    let (c_new, changes) = receive_welcome(
        &charlie.store,
        &ticket(&charlie, ticket_id),
        &Payload::decode(&answer).unwrap(),
        0,
        24_000,
    )
    .unwrap();
    commit(&charlie, changes);
    let c_new = c_new.id;

    // Each side: the old ones retired into the new one, history merged
    // oldest first, nothing lost or doubled.
    let all = [
        "1 via A: hi Blair",
        "2 via D: hi Charlie",
        "3 via A: how are you",
        "4 via D: well",
    ];
    for (p, old, new) in [(&blair, b, b_new), (&charlie, c, c_new)] {
        for o in old {
            assert_eq!(merge::retired_into(&p.store, o).unwrap(), Some(new));
        }
        let mut got = texts(p, new);
        // Blair's history has the in-flight message already; Charlie's not yet.
        got.retain(|t| !t.starts_with("4b"));
        assert_eq!(got, all, "{}'s merged history", p.name);
        for id in old.iter().chain([&new]) {
            assert_eq!(
                trust(p, *id),
                Trust::Normal,
                "an honest merge raises no flag"
            );
        }
    }
    let record = merge::all_merges(&charlie.store).unwrap();
    assert_eq!(record[0].state, MergeState::Accepted { into: c_new });
    // Both sides' trust records of the merged relationship hold what ties
    // each side's new key to its old ones.
    for (p, new) in [(&blair, b_new), (&charlie, c_new)] {
        let links = merge::links_of(&p.store, new).unwrap();
        let count = |kind| links.iter().filter(|l| l.kind == kind).count();
        use actors::attestation::Kind;
        assert!(count(Kind::Follows) >= 4, "{}: {links:?}", p.name);
        assert!(count(Kind::Equivalent) >= 1, "{}: {links:?}", p.name);
    }

    // The new relationship works both ways; the old ones send no more.
    text(
        &charlie,
        c_new,
        &blair,
        b_new,
        "5 merged: one thread",
        30_000,
    );
    text(&blair, b_new, &charlie, c_new, "6 merged: indeed", 31_000);
    assert_eq!(texts(&blair, b_new).len(), 7);
    assert_eq!(texts(&charlie, c_new).len(), 6);
    let mut session = ProtonSession::load(&blair.store, b[0]).unwrap();
    let refused = session.send_text(
        "old",
        &blair.node,
        LIFETIMES,
        32_000,
        &mut Changes::default(),
    );
    assert!(matches!(refused, Err(RelationshipError::Retired(id)) if id == b_new));

    // A message sent through an old relationship before the merge, that
    // arrives after it, shows in the merged one.
    assert!(deliver(&charlie, c[1], &in_flight, 35_000).is_ok());
    assert_eq!(texts(&charlie, c_new).len(), 7);
    assert_eq!(texts(&charlie, c_new)[4], "4b via D: in flight");

    // Accepting again, or an unknown id: typed errors, nothing changes.
    let before = blair.store.digest().unwrap();
    for query in [id.as_str(), "ffffffffffffffff"] {
        let err = merge::accept(
            &blair.store,
            &blair.node,
            display("Blair"),
            LIFETIMES,
            query,
            36_000,
        )
        .err()
        .expect("refused");
        assert!(
            matches!(
                err,
                RelationshipError::Merge(MergeError::NotPending { .. } | MergeError::Unknown(_))
            ),
            "{err}"
        );
    }
    assert_eq!(blair.store.digest().unwrap(), before);
}

#[test]
fn an_unlinked_pair_gets_a_proposal_and_accepting_it_links_them() {
    let (blair, charlie, b, c) = parallel();
    let (request, [p1, _]) = request(&charlie, c, 21_000);
    assert!(matches!(
        deliver(&blair, b[0], &p1, 22_000),
        Ok(Received::Merge(_))
    ));
    let record = &merge::all_merges(&blair.store).unwrap()[0];
    assert!(!record.linked, "Blair had not linked them: a proposal");
    let acceptance = merge::accept(
        &blair.store,
        &blair.node,
        display("Blair"),
        LIFETIMES,
        &merge::id_string(&request.id),
        23_000,
    )
    .unwrap();
    commit(&blair, acceptance.changes);
    // Consenting attested Blair's two keys equivalent.
    let links = merge::links_of(&blair.store, b[0]).unwrap();
    assert!(links
        .iter()
        .any(|l| l.kind == actors::attestation::Kind::Equivalent));
}

/// Blair and Charlie each ask the other to merge the same two
/// relationships, and each accepts the other's request. Both acceptances
/// going through would leave each with a merged relationship the other
/// never took (and messages in it that nobody reads): the request with the
/// lower id stands, the acceptance of the other is refused, and the two end
/// with one merged relationship that works both ways.
#[test]
fn crossed_requests_make_one_merge() {
    let (blair, charlie, b, c) = parallel();
    let (from_charlie, [p1, _]) = request(&charlie, c, 21_000);
    let (from_blair, [q1, _]) = request(&blair, b, 21_000);
    assert!(matches!(
        deliver(&blair, b[0], &p1, 22_000),
        Ok(Received::Merge(_))
    ));
    assert!(matches!(
        deliver(&charlie, c[0], &q1, 22_000),
        Ok(Received::Merge(_))
    ));
    let accept = |p: &Person, request: &MergeRequest| {
        merge::accept(
            &p.store,
            &p.node,
            display(p.name),
            LIFETIMES,
            &merge::id_string(&request.id),
            23_000,
        )
    };
    // The one who made the lower request waits for the other to accept it.
    let (stands, acceptor, requester, loses) = if from_charlie.id < from_blair.id {
        (&from_charlie, (&blair, b), (&charlie, c), &from_blair)
    } else {
        (&from_blair, (&charlie, c), (&blair, b), &from_charlie)
    };
    let before = requester.0.store.digest().unwrap();
    let crossed = accept(requester.0, loses).err().expect("refused");
    assert!(
        matches!(&crossed, RelationshipError::Merge(MergeError::Crossed { ours }) if *ours == merge::id_string(&stands.id)),
        "{crossed}"
    );
    assert_eq!(
        requester.0.store.digest().unwrap(),
        before,
        "nothing changed"
    );

    let acceptance = accept(acceptor.0, stands).unwrap();
    let answer = acceptance
        .changes
        .outbox
        .iter()
        .find(|e| e.kind == OutboxKind::Welcome)
        .unwrap()
        .payload
        .clone();
    let at_acceptor = acceptance.proton.id;
    commit(acceptor.0, acceptance.changes);
    // The acceptor's own request is moot, and its ticket gone: an answer to
    // it would find no address.
    let moot = merge::all_merges(&acceptor.0.store)
        .unwrap()
        .into_iter()
        .find(|m| m.id == loses.id)
        .unwrap();
    assert_eq!(moot.state, MergeState::Replaced);
    let crypto = openmls_rust_crypto::RustCrypto::default();
    let loses_ticket = actors::ticket::Ticket::parse(&loses.ticket, &crypto)
        .unwrap()
        .ticket
        .id;
    let gone = acceptor
        .0
        .store
        .read(|tx| {
            store::get::<_, TicketRecord, _>(
                &tx.open_table(tables::TICKETS)?,
                loses_ticket.0,
                "ticket",
            )
        })
        .unwrap();
    assert!(gone.is_none(), "the moot request's ticket is revoked");

    let stands_ticket = actors::ticket::Ticket::parse(&stands.ticket, &crypto)
        .unwrap()
        .ticket
        .id;
    let (at_requester, changes) = receive_welcome(
        &requester.0.store,
        &ticket(requester.0, stands_ticket),
        &Payload::decode(&answer).unwrap(),
        0,
        24_000,
    )
    .unwrap();
    commit(requester.0, changes);
    let at_requester = at_requester.id;
    for (p, old, new) in [
        (acceptor.0, acceptor.1, at_acceptor),
        (requester.0, requester.1, at_requester),
    ] {
        for o in old {
            assert_eq!(merge::retired_into(&p.store, o).unwrap(), Some(new));
        }
    }
    text(
        requester.0,
        at_requester,
        acceptor.0,
        at_acceptor,
        "one thread",
        30_000,
    );
    text(
        acceptor.0,
        at_acceptor,
        requester.0,
        at_requester,
        "indeed",
        31_000,
    );
    // The other request is moot on the requester's side too.
    let err = accept(requester.0, loses).err().expect("refused");
    assert!(
        matches!(err, RelationshipError::Merge(MergeError::NotPending { .. })),
        "{err}"
    );
}

/// Two acceptances prepared from the same state (two `merge accept`s at
/// once, of one request or of two over a shared relationship): the check
/// that runs again in the committing transaction refuses the second.
#[test]
fn a_request_accepted_twice_at_once_is_merged_once() {
    let (blair, charlie, b, c) = parallel();
    let (request, [p1, _]) = request(&charlie, c, 21_000);
    deliver(&blair, b[0], &p1, 22_000).unwrap();
    let id = merge::id_string(&request.id);
    let accept = || {
        merge::accept(
            &blair.store,
            &blair.node,
            display("Blair"),
            LIFETIMES,
            &id,
            23_000,
        )
        .unwrap()
    };
    let (first, second) = (accept(), accept());
    let may = |p: &Person| {
        p.store
            .read(|tx| {
                Ok(merge::may_accept(
                    &tx.open_table(tables::MERGES)?,
                    &tx.open_table(tables::RETIRED)?,
                    request.id,
                ))
            })
            .unwrap()
    };
    assert!(may(&blair).is_ok());
    commit(&blair, first.changes);
    let Err(err) = may(&blair) else {
        panic!("the second acceptance is refused")
    };
    assert!(matches!(err, MergeError::NotPending { .. }), "{err}");
    // Nor may it be ignored any more (`merge ignore` at the same moment).
    let ignored = blair
        .store
        .read(|tx| {
            Ok(merge::may_decide(
                &tx.open_table(tables::MERGES)?,
                request.id,
                "ignored",
            ))
        })
        .unwrap();
    assert!(matches!(ignored, Err(MergeError::NotPending { .. })));
    drop(second);
    for o in b {
        assert_eq!(
            merge::retired_into(&blair.store, o).unwrap(),
            Some(first.proton.id)
        );
    }
}

#[test]
fn ignoring_leaves_both_relationships_as_they_were() {
    let (blair, charlie, b, c) = parallel();
    let (request, [p1, _]) = request(&charlie, c, 21_000);
    deliver(&blair, b[0], &p1, 22_000).unwrap();
    commit(
        &blair,
        merge::ignore(&blair.store, &merge::id_string(&request.id)).unwrap(),
    );
    assert_eq!(
        merge::all_merges(&blair.store).unwrap()[0].state,
        MergeState::Ignored
    );
    for id in b {
        assert_eq!(merge::retired_into(&blair.store, id).unwrap(), None);
    }
    text(&blair, b[0], &charlie, c[0], "still here", 30_000);
}

/// Mallory, asked to introduce Blair and Charlie, puts her own keys in the
/// middle: a relationship with Blair in which she poses as Charlie, and one
/// with Charlie in which she poses as Blair. Dani introduces them honestly.
#[test]
fn a_merge_reveals_a_meddler_in_the_middle() {
    let (blair, charlie) = (person("Blair"), person("Charlie"));
    let mallory_as_charlie = person("Charlie");
    let mallory_as_blair = person("Blair");
    let (_, b_via_a) = befriend(&mallory_as_charlie, &blair, 1_000);
    let (m_b, c_via_a) = befriend(&mallory_as_blair, &charlie, 2_000);
    text(
        &mallory_as_blair,
        m_b,
        &charlie,
        c_via_a,
        "hi, Blair here",
        2_500,
    );
    let (c_via_d, b_via_d) = befriend(&charlie, &blair, 3_000);

    let (request, [_, through_d]) = request(&charlie, [c_via_a, c_via_d], 10_000);
    let before_b_via_d = trust(&blair, b_via_d);
    let Ok(Received::Merge(outcome)) = deliver(&blair, b_via_d, &through_d, 11_000) else {
        panic!("a merge request")
    };
    assert_eq!(outcome.flagged, vec![b_via_a], "the meddled relationship");
    assert!(matches!(outcome.state, MergeState::Flagged { .. }));
    let Trust::Flagged { reason, .. } = trust(&blair, b_via_a) else {
        panic!("flagged")
    };
    assert!(reason.contains("poses as you"), "{reason}");
    assert_eq!(before_b_via_d, Trust::Normal);
    assert_eq!(trust(&blair, b_via_d), Trust::Normal, "Dani's is fine");

    // A flagged merge cannot be accepted: the meddled relationship stays out.
    let err = merge::accept(
        &blair.store,
        &blair.node,
        display("Blair"),
        LIFETIMES,
        &merge::id_string(&request.id),
        12_000,
    )
    .err()
    .expect("refused");
    assert!(matches!(
        err,
        RelationshipError::Merge(MergeError::NotPending { .. })
    ));
}

/// Each bad request: a typed error and Blair's store exactly as before.
#[test]
fn bad_merge_requests_are_refused_and_change_nothing() {
    let (blair, charlie, b, c) = parallel();
    let outgoing = merge::request(
        &charlie.store,
        &charlie.node,
        display("Charlie"),
        LIFETIMES,
        TTL,
        c[0],
        c[1],
        20_000,
    )
    .unwrap();
    let good = outgoing.request.clone();
    commit(&charlie, outgoing.changes);

    let mut forged = good.clone();
    forged.equivalence.second_signature[0] ^= 1;
    let mut mismatched = good.clone();
    // An equivalence of other keys than the pairs name.
    mismatched.equivalence = good.follows[0].clone();
    let mut not_theirs = good.clone();
    let stranger = actors::identity::IdentityKey::generate().ipk();
    not_theirs.pairs[0].0 = stranger;
    not_theirs.pairs[1].0 = actors::identity::IdentityKey::generate().ipk();
    let mut wrong_receiver = good.clone();
    wrong_receiver.pairs[0].1 = stranger;
    let mut three = good.clone();
    three.pairs.push(three.pairs[0]);
    let mut bad_ticket = good.clone();
    bad_ticket.ticket = "protonode:AAAA".into();

    type Expected = fn(&RelationshipError) -> bool;
    let cases: [(&str, MergeRequest, Expected); 6] = [
        ("forged equivalence", forged, |e| {
            matches!(
                e,
                RelationshipError::Merge(MergeError::Attestation {
                    what: "equivalence",
                    ..
                })
            )
        }),
        ("mismatched equivalence", mismatched, |e| {
            matches!(e, RelationshipError::Merge(MergeError::Attestation { .. }))
        }),
        ("relationships the sender does not hold", not_theirs, |e| {
            matches!(e, RelationshipError::Merge(MergeError::NotTheSenders))
        }),
        ("a key that is not ours here", wrong_receiver, |e| {
            matches!(e, RelationshipError::Merge(MergeError::Mismatch))
        }),
        ("three relationships", three, |e| {
            matches!(e, RelationshipError::Decode(_))
        }),
        ("a damaged ticket", bad_ticket, |e| {
            matches!(e, RelationshipError::Merge(MergeError::Ticket(_)))
        }),
    ];
    for (what, request, expected) in cases {
        let payload = queue(
            &charlie,
            c[0],
            Some(Body::MergeRequest(Box::new(request))),
            "",
            21_000,
        );
        let before = blair.store.digest().unwrap();
        let mut session = ProtonSession::load(&blair.store, b[0]).unwrap();
        let mut changes = Changes::default();
        let err = session
            .receive(&payload, 22_000, &mut changes)
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        assert!(expected(&err), "{what}: {err}");
        session.drain_writes(&mut changes);
        assert!(changes.is_empty(), "{what}: nothing to commit");
        assert_eq!(blair.store.digest().unwrap(), before, "{what}");
    }

    // The good one, then the same request again in a new message: a replay.
    let body = || Some(Body::MergeRequest(Box::new(good.clone())));
    let p = queue(&charlie, c[0], body(), "", 23_000);
    assert!(matches!(
        deliver(&blair, b[0], &p, 23_500),
        Ok(Received::Merge(_))
    ));
    let again = queue(&charlie, c[0], body(), "", 24_000);
    let before = blair.store.digest().unwrap();
    let mut session = ProtonSession::load(&blair.store, b[0]).unwrap();
    let err = session
        .receive(&again, 24_500, &mut Changes::default())
        .expect_err("a replay is refused");
    assert!(
        matches!(err, RelationshipError::Merge(MergeError::Replayed(_))),
        "{err}"
    );
    assert_eq!(blair.store.digest().unwrap(), before);
    // And the same envelope twice is MLS's replay.
    assert!(deliver(&blair, b[0], &p, 25_000).is_err());
}

/// An answer to a merge we asked for whose relationships were merged since,
/// another way, is refused on arrival (as a used ticket's answer is), not
/// stored and then dropped: the peer's node, told "stored", would keep a
/// merged relationship that ours never takes.
#[test]
fn an_answer_to_a_merge_made_moot_is_refused_on_arrival() {
    let (_blair, charlie, _, c) = parallel();
    let outgoing = merge::request(
        &charlie.store,
        &charlie.node,
        display("Charlie"),
        LIFETIMES,
        TTL,
        c[0],
        c[1],
        21_000,
    )
    .unwrap();
    let ticket_id = actors::ticket::Ticket::parse(
        &outgoing.request.ticket,
        &openmls_rust_crypto::RustCrypto::default(),
    )
    .unwrap()
    .ticket
    .id;
    commit(&charlie, outgoing.changes);
    let welcome_address = ticket(&charlie, ticket_id).welcome_address;
    let resolver = actors::seal::Resolver::new(charlie.store.service_key().unwrap());
    let arrive = |payload: &[u8]| {
        let envelope = transports::Envelope::new(welcome_address, payload.to_vec());
        charlie
            .store
            .write_blocking(|tx| {
                actors::inbound::store_batch(tx, std::slice::from_ref(&envelope), &resolver, 30_000)
            })
            .unwrap()
            .0
    };
    // Merged since (as by accepting Blair's own request for them).
    charlie
        .store
        .write_blocking(|tx| {
            tx.open_table(tables::RETIRED)?
                .insert(c[0].0, ProtonId::random().0)?;
            Ok(())
        })
        .unwrap();
    assert_eq!(
        arrive(b"an answer"),
        vec![transports::Receipt::Refused(
            transports::Refusal::UnknownAddress
        )]
    );
    // Not merged: stored.
    charlie
        .store
        .write_blocking(|tx| {
            tx.open_table(tables::RETIRED)?.remove(c[0].0)?;
            Ok(())
        })
        .unwrap();
    assert_eq!(arrive(b"an answer"), vec![transports::Receipt::Stored]);
}

/// A request still pending over relationships that a merge retires is moot,
/// also one written after the merge was prepared (`merge request` again at
/// the moment the peer accepts the first): it shows "replaced", not
/// "pending" for ever.
#[test]
fn a_merge_makes_requests_over_its_relationships_moot_in_its_transaction() {
    let (blair, charlie, b, c) = parallel();
    let (first, [p1, _]) = request(&charlie, c, 21_000);
    deliver(&blair, b[0], &p1, 22_000).unwrap();
    // Charlie asks again; Blair's node retires b[0] and b[1] meanwhile.
    let (again, [q1, _]) = request(&charlie, c, 23_000);
    let state = |p: &Person, id: [u8; 16]| {
        merge::all_merges(&p.store)
            .unwrap()
            .into_iter()
            .find(|m| m.id == id)
            .unwrap()
            .state
    };
    assert_eq!(state(&charlie, first.id), MergeState::Replaced);
    assert_eq!(state(&charlie, again.id), MergeState::Pending);
    let into = ProtonId::random();
    commit(
        &charlie,
        Changes {
            retired: vec![(c[0], into), (c[1], into)],
            ..Changes::default()
        },
    );
    assert_eq!(state(&charlie, again.id), MergeState::Replaced);
    // At Blair: the first request pending; a merge of b[0] retires it too.
    commit(
        &blair,
        Changes {
            retired: vec![(b[0], into)],
            ..Changes::default()
        },
    );
    assert_eq!(state(&blair, first.id), MergeState::Replaced);
    // The second request, recorded after: replaced at once, not pending.
    let _ = deliver(&blair, b[0], &q1, 24_000);
    if let Some(m) = merge::all_merges(&blair.store)
        .unwrap()
        .into_iter()
        .find(|m| m.id == again.id)
    {
        assert_eq!(m.state, MergeState::Replaced);
    }
}
