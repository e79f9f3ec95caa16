//! The seed's figures 3.3.4 to 3.3.6 over real daemons (separate processes
//! on loopback), driven through the CLI as a user would: two introducers
//! give Blair and Charlie two relationships; Charlie asks to merge them;
//! Blair consents (or ignores); and a meddling introducer is caught.

use std::time::Duration;

use harness::{wait_for, Person};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(30);

fn person(name: &str) -> Person {
    Person::init(name)
        .with_env("PROTONODE_DELIVERY_RETRY_MAX_MS", "1000")
        .with_env("PROTONODE_DELIVERY_ORDERING_TIMEOUT_MS", "1500")
}

fn contacts(p: &Person, all: bool) -> Vec<Value> {
    let args: &[&str] = if all {
        &["contacts", "--all"]
    } else {
        &["contacts"]
    };
    p.ok(args).as_array().cloned().unwrap_or_default()
}

fn ids(p: &Person) -> Vec<String> {
    contacts(p, true)
        .iter()
        .filter_map(|c| c["id"].as_str().map(String::from))
        .collect()
}

/// `inviter` invites `acceptor`; returns (contact id at inviter, at acceptor).
/// Names may repeat (a meddler's nodes), so the new contact is found by id.
fn befriend(inviter: &Person, acceptor: &Person) -> (String, String) {
    let before = ids(inviter);
    let ticket = inviter.ok(&["invite"])["ticket"]
        .as_str()
        .unwrap()
        .to_string();
    let theirs = acceptor.ok(&["accept", &ticket])["contact"]
        .as_str()
        .unwrap()
        .to_string();
    let ours = wait_for(SETTLE, || {
        ids(inviter).into_iter().find(|id| !before.contains(id))
    })
    .expect("the inviter sees the new contact");
    (ours, theirs)
}

/// `introducer` introduces its contacts `b` and `c` (ids there) in a group
/// called `name`; the two people behind them claim, and `c_person` connects
/// to `b_person` on the side. Returns the side relationship's contact ids
/// (at `b_person`, at `c_person`).
fn introduce_and_connect(
    introducer: &Person,
    (b_person, b): (&Person, &str),
    (c_person, c): (&Person, &str),
    name: &str,
) -> (String, String) {
    let group = introducer.ok(&["introduce", b, c, "--name", name])["group"]
        .as_str()
        .unwrap()
        .to_string();
    for p in [b_person, c_person] {
        // The invitee's group proton has its own id; find it by name.
        wait_for(SETTLE, || {
            p.groups()
                .into_iter()
                .any(|g| g["name"] == name)
                .then_some(())
        })
        .unwrap_or_else(|| panic!("{} was not introduced in {name}", p.name));
        p.ok(&["claim", name]);
    }
    // Everyone has claimed once each sees no placeholder.
    for p in [introducer, b_person, c_person] {
        wait_for(SETTLE, || {
            let g = p
                .groups()
                .into_iter()
                .find(|g| g["name"] == name || g["id"] == group.as_str())?;
            let members = g["members"].as_array()?;
            (g["pending"] == false
                && members.len() == 3
                && members.iter().all(|m| m["status"] != "placeholder"))
            .then_some(())
        })
        .unwrap_or_else(|| panic!("{name}: {} never saw both claims", p.name));
    }
    let b_name = b_person.name.as_str();
    let before = ids(b_person);
    let connected = c_person.ok(&["connect", name, b_name]);
    let at_c = connected["contact"].as_str().unwrap().to_string();
    let at_b = wait_for(SETTLE, || {
        contacts(b_person, true)
            .into_iter()
            .find(|x| {
                !before.contains(&x["id"].as_str().unwrap_or("").to_string())
                    && x["state"] == "active"
            })
            .and_then(|x| x["id"].as_str().map(String::from))
    })
    .unwrap_or_else(|| panic!("{name}: {} never got the side relationship", b_person.name));
    // `connect` waits for the answer only so long; the caller sends next.
    wait_for(SETTLE, || {
        contacts(c_person, true)
            .iter()
            .any(|x| x["id"] == at_c.as_str() && x["state"] == "active")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("{name}: {} never saw the answer", c_person.name));
    (at_b, at_c)
}

fn texts(p: &Person, contact: &str) -> Vec<String> {
    p.history(contact)
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect()
}

fn send(p: &Person, contact: &str, text: &str) {
    p.ok(&["send", contact, text, "--wait"]);
}

/// Blair and Charlie with two relationships, one from Alex's introduction
/// and one from Dani's, and a conversation in each.
struct Parallel {
    blair: Person,
    charlie: Person,
    /// Blair's and Charlie's relationships: [via Alex, via Dani].
    b: [String; 2],
    c: [String; 2],
    _daemons: Vec<harness::Daemon>,
    _introducers: Vec<Person>,
}

fn parallel() -> Parallel {
    let (alex, dani) = (person("Alex"), person("Dani"));
    let (blair, charlie) = (person("Blair"), person("Charlie"));
    let daemons = vec![alex.start(), dani.start(), blair.start(), charlie.start()];
    let (ab, _) = befriend(&alex, &blair);
    let (ac, _) = befriend(&alex, &charlie);
    let (db, _) = befriend(&dani, &blair);
    let (dc, _) = befriend(&dani, &charlie);
    let (b1, c1) = introduce_and_connect(&alex, (&blair, &ab), (&charlie, &ac), "via Alex");
    let (b2, c2) = introduce_and_connect(&dani, (&blair, &db), (&charlie, &dc), "via Dani");
    send(&charlie, &c1, "1 via Alex: hello Blair");
    send(&blair, &b2, "2 via Dani: hello Charlie");
    send(&blair, &b1, "3 via Alex: small world");
    send(&charlie, &c2, "4 via Dani: indeed");
    // Every message has arrived before the merge.
    for (p, id, n) in [(&blair, &b1, 2), (&blair, &b2, 2), (&charlie, &c1, 2)] {
        wait_for(SETTLE, || (texts(p, id).len() == n).then_some(()))
            .unwrap_or_else(|| panic!("{}: {:?}", p.name, texts(p, id)));
    }
    wait_for(SETTLE, || (texts(&charlie, &c2).len() == 2).then_some(())).unwrap();
    Parallel {
        blair,
        charlie,
        b: [b1, b2],
        c: [c1, c2],
        _daemons: daemons,
        _introducers: vec![alex, dani],
    }
}

/// The merge request `p` received, once it arrived.
fn received_merge(p: &Person) -> Value {
    wait_for(SETTLE, || {
        p.ok(&["merge", "list"])
            .as_array()?
            .iter()
            .find(|m| m["direction"] == "received")
            .cloned()
    })
    .unwrap_or_else(|| panic!("{} received no merge request", p.name))
}

fn assert_unflagged(p: &Person) {
    for c in contacts(p, true) {
        assert_eq!(c["trust"], "normal", "{}: {c}", p.name);
    }
    let status = p.ok(&["status"]);
    assert!(
        !status["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("flagged")),
        "{status}"
    );
}

#[test]
fn charlie_asks_blair_consents_and_the_two_relationships_become_one() {
    let Parallel {
        blair,
        charlie,
        b,
        c,
        _daemons,
        _introducers,
    } = parallel();
    // Figure 3.3.4: two relationships each, each with its provenance.
    let at_blair = contacts(&blair, false);
    assert_eq!(
        at_blair.iter().filter(|x| x["name"] == "Charlie").count(),
        2
    );
    let record = blair.ok(&["contact", &b[1]]);
    assert!(
        record["obtained"]
            .as_str()
            .unwrap()
            .starts_with("introduced by"),
        "{record}"
    );
    assert!(
        record["vouched_by"][0].as_str().unwrap().ends_with("Dani"),
        "{record}"
    );

    // Blair had said the two are both her towards Charlie: a request.
    blair.ok(&["link", &b[0], &b[1]]);
    let asked = charlie.ok(&["merge", "request", &c[0], &c[1]]);
    assert_eq!(asked["direction"], "sent");
    let request = received_merge(&blair);
    assert_eq!(request["kind"], "request");
    assert_eq!(request["state"], "pending");
    assert_eq!(request["name"], "Charlie");
    let status = blair.ok(&["status"]);
    assert!(
        status["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("merge request")),
        "{status}"
    );

    let id = request["id"].as_str().unwrap();
    let merged = blair.ok(&["merge", "accept", id]);
    assert_eq!(merged["delivered"], true, "{merged}");
    let b_new = merged["contact"].as_str().unwrap().to_string();

    // Each side: one live relationship with the other, the old two retired.
    let c_new = wait_for(SETTLE, || {
        let live: Vec<Value> = contacts(&charlie, false)
            .into_iter()
            .filter(|x| x["name"] == "Blair")
            .collect();
        match live.as_slice() {
            [one] if !c.contains(&one["id"].as_str()?.to_string()) => {
                one["id"].as_str().map(String::from)
            }
            _ => None,
        }
    })
    .expect("Charlie ends with one relationship with Blair");
    for (p, old, name) in [(&blair, &b, "Charlie"), (&charlie, &c, "Blair")] {
        let live: Vec<Value> = contacts(p, false)
            .into_iter()
            .filter(|x| x["name"] == name)
            .collect();
        assert_eq!(live.len(), 1, "{}: {live:?}", p.name);
        assert_eq!(live[0]["retired"], false);
        assert_eq!(
            p.ok(&["status"])["contacts"].as_u64(),
            Some(contacts(p, false).len() as u64),
            "{}: status counts the contacts `contacts` lists",
            p.name
        );
        let all = contacts(p, true);
        for o in old.iter() {
            let x = all.iter().find(|x| x["id"] == o.as_str()).unwrap();
            assert_eq!(x["retired"], true, "{}: {x}", p.name);
        }
        // A retired relationship is not one to bring into a group, and
        // its record says where it went.
        let refused = p.cli(&["group", "create", "Old times", &old[0]]);
        assert_eq!(refused.status.code(), Some(1), "{}", p.name);
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(said.contains("was merged into"), "{said}");
        let record = p.cli(&["contact", &old[0]]);
        let said = String::from_utf8_lossy(&record.stdout);
        assert!(
            said.contains("state:        retired: merged into "),
            "{said}"
        );
    }

    // The whole history of both, oldest first, nothing lost or doubled:
    // by name now, since only the merged relationship answers to it.
    let whole = [
        "1 via Alex: hello Blair",
        "2 via Dani: hello Charlie",
        "3 via Alex: small world",
        "4 via Dani: indeed",
    ];
    assert_eq!(texts(&blair, "Charlie"), whole);
    assert_eq!(texts(&charlie, "Blair"), whole);
    assert_eq!(texts(&blair, &b_new), whole);
    assert_eq!(texts(&charlie, &c_new), whole);

    // And it goes on as one.
    send(&charlie, "Blair", "5 merged: one thread now");
    send(&blair, "Charlie", "6 merged: yes");
    for p in [&blair, &charlie] {
        let name = if p.name == "Blair" {
            "Charlie"
        } else {
            "Blair"
        };
        let t = wait_for(SETTLE, || {
            let t = texts(p, name);
            (t.len() == 6).then_some(t)
        })
        .unwrap_or_else(|| panic!("{}: {:?}", p.name, texts(p, name)));
        assert_eq!(t[4], "5 merged: one thread now");
        assert_eq!(t[5], "6 merged: yes");
    }

    // The trust record of the merged relationship says where it came from.
    let record = blair.ok(&["contact", "Charlie"]);
    assert!(
        record["obtained"]
            .as_str()
            .unwrap()
            .starts_with("merged from"),
        "{record}"
    );
    let vouched: Vec<&str> = record["vouched_by"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        vouched.iter().any(|v| v.ends_with("Alex")) && vouched.iter().any(|v| v.ends_with("Dani")),
        "{record}"
    );
    let kinds: Vec<&str> = record["attestations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"follows") && kinds.contains(&"equivalent"),
        "{record}"
    );

    // An old relationship sends no more; accepting twice or an unknown id
    // is a clear error.
    let old = blair.cli(&["send", &b[0], "through the old one"]);
    assert!(!old.status.success());
    assert!(
        String::from_utf8_lossy(&old.stderr).contains("merged into"),
        "{}",
        String::from_utf8_lossy(&old.stderr)
    );
    for bad in [id, "0123456789abcdef"] {
        let out = blair.cli(&["merge", "accept", bad]);
        assert!(!out.status.success());
    }
    assert_unflagged(&blair);
    assert_unflagged(&charlie);
}

#[test]
fn a_proposal_can_be_ignored_and_a_later_one_accepted() {
    let Parallel {
        blair,
        charlie,
        b,
        c,
        _daemons,
        _introducers,
    } = parallel();
    // Blair has not linked the two: Charlie's request is a proposal.
    charlie.ok(&["merge", "request", &c[0], &c[1]]);
    let first = received_merge(&blair);
    assert_eq!(first["kind"], "proposal");
    blair.ok(&["merge", "ignore", first["id"].as_str().unwrap()]);
    assert_eq!(
        contacts(&blair, false).len(),
        4,
        "Alex, Dani, Charlie twice"
    );
    send(&blair, &b[0], "still two threads");

    // Asked again, twice (the newer request replaces the older on both
    // sides), Blair agrees: the equivalence is attested then.
    charlie.ok(&["merge", "request", &c[0], &c[1]]);
    let third = charlie.ok(&["merge", "request", &c[0], &c[1]]);
    let pending = |p: &Person| -> Vec<Value> {
        p.ok(&["merge", "list"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["state"] == "pending")
            .cloned()
            .collect()
    };
    assert_eq!(pending(&charlie).len(), 1, "the newest request stands");
    let second = wait_for(SETTLE, || {
        blair
            .ok(&["merge", "list"])
            .as_array()?
            .iter()
            .find(|m| m["id"] == third["id"])
            .cloned()
    })
    .expect("the third request");
    assert_eq!(second["state"], "pending");
    assert_eq!(pending(&blair).len(), 1, "the older request was replaced");
    blair.ok(&["merge", "accept", second["id"].as_str().unwrap()]);
    wait_for(SETTLE, || {
        (contacts(&charlie, false)
            .iter()
            .filter(|x| x["name"] == "Blair")
            .count()
            == 1)
            .then_some(())
    })
    .expect("Charlie ends with one relationship with Blair");
    let t = wait_for(SETTLE, || {
        let t = texts(&charlie, "Blair");
        (t.len() == 5).then_some(t)
    })
    .unwrap_or_else(|| panic!("{:?}", texts(&charlie, "Blair")));
    assert_eq!(t[4], "still two threads");
    let record = blair.ok(&["contact", "Charlie"]);
    assert!(
        record["attestations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "equivalent"),
        "{record}"
    );
    let _ = b;
    assert_unflagged(&blair);
    assert!(pending(&blair).is_empty());
    wait_for(SETTLE, || pending(&charlie).is_empty().then_some(()))
        .expect("Charlie's request is done once the merge is");
    let status = blair.ok(&["status"]);
    assert!(
        !status["warnings"].to_string().contains("merge request"),
        "{status}"
    );
}

/// Figure 3.3.6. Alex, asked to introduce Blair and Charlie, introduces each
/// of them to one of Alex's own nodes instead: "Charlie" to Blair and
/// "Blair" to Charlie, relaying between them. Dani introduces them
/// honestly. Charlie's merge shows Blair that the "Charlie" from Alex's
/// introduction is not Charlie.
#[test]
fn a_merge_reveals_a_meddling_introducer() {
    let (alex, dani) = (person("Alex"), person("Dani"));
    let (blair, charlie) = (person("Blair"), person("Charlie"));
    // Alex's two extra nodes, each wearing someone else's name.
    let (alex_as_charlie, alex_as_blair) = (person("Charlie"), person("Blair"));
    let _d: Vec<harness::Daemon> = [
        &alex,
        &dani,
        &blair,
        &charlie,
        &alex_as_charlie,
        &alex_as_blair,
    ]
    .iter()
    .map(|p| p.start())
    .collect();
    let (ab, ba) = befriend(&alex, &blair);
    let (ac, _) = befriend(&alex, &charlie);
    let (a_fc, _) = befriend(&alex, &alex_as_charlie);
    let (a_fb, _) = befriend(&alex, &alex_as_blair);
    let (db, bd) = befriend(&dani, &blair);
    let (dc, _) = befriend(&dani, &charlie);

    // Alex's "introductions": Blair meets the fake Charlie, Charlie the fake Blair.
    let (b_via_a, _) = introduce_and_connect(
        &alex,
        (&blair, &ab),
        (&alex_as_charlie, &a_fc),
        "Blair meets Charlie",
    );
    let (_, c_via_a) = introduce_and_connect(
        &alex,
        (&alex_as_blair, &a_fb),
        (&charlie, &ac),
        "Charlie meets Blair",
    );
    let (b_via_d, c_via_d) =
        introduce_and_connect(&dani, (&blair, &db), (&charlie, &dc), "via Dani");
    send(&charlie, &c_via_a, "hi Blair (through Alex's middle)");
    send(&charlie, &c_via_d, "hi Blair (through Dani)");
    assert_unflagged(&blair);

    charlie.ok(&["merge", "request", &c_via_a, &c_via_d]);
    let flagged = wait_for(SETTLE, || {
        let all = contacts(&blair, true);
        let f = all.iter().find(|x| x["id"] == b_via_a.as_str())?;
        (f["trust"] == "flagged").then_some(all)
    })
    .expect("Blair's node flags the relationship from Alex's introduction");
    let get = |id: &str| {
        flagged
            .iter()
            .find(|x| x["id"] == id)
            .unwrap_or_else(|| panic!("{id} in {flagged:?}"))
            .clone()
    };
    let meddled = get(&b_via_a);
    assert!(
        meddled["reason"].as_str().unwrap().contains("poses as you"),
        "{meddled}"
    );
    let introducer = get(&ba);
    assert_eq!(introducer["name"], "Alex");
    assert_eq!(introducer["trust"], "flagged", "{introducer}");
    assert!(
        introducer["reason"]
            .as_str()
            .unwrap()
            .contains("introduced"),
        "{introducer}"
    );
    let honest = get(&b_via_d);
    assert_eq!(honest["trust"], "normal", "Dani's introduction is fine");
    assert_eq!(get(&bd)["trust"], "normal", "Dani is fine");

    // Blair is told, and the meddled relationship is not merged.
    let status = blair.ok(&["status"]);
    let warnings: Vec<&str> = status["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("Alex") && w.contains("flagged")),
        "{warnings:?}"
    );
    let merge = received_merge(&blair);
    assert_eq!(merge["state"], "flagged");
    let refused = blair.cli(&["merge", "accept", merge["id"].as_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(contacts(&blair, true).iter().all(|x| x["retired"] == false));
    let record = blair.ok(&["contact", &b_via_a]);
    assert_eq!(record["contact"]["trust"], "flagged");
}

/// Taking two people for one is a mistake a merge request would spread:
/// each of them would be told that someone poses as them.
#[test]
fn two_contacts_with_different_names_are_not_merged_or_linked_by_mistake() {
    let gil = person("Gil");
    let hana = person("Hana");
    let ivo = person("Ivo");
    let _g = gil.start();
    let _h = hana.start();
    let _i = ivo.start();
    let (at_gil_hana, _) = befriend(&gil, &hana);
    let (at_gil_ivo, _) = befriend(&gil, &ivo);

    for args in [
        &["merge", "request", &at_gil_hana, &at_gil_ivo][..],
        &["link", &at_gil_hana, &at_gil_ivo],
    ] {
        let refused = gil.json(args).unwrap_err();
        assert!(
            refused.contains("different names") && refused.contains("--force"),
            "{args:?}: {refused}"
        );
    }
    assert_eq!(gil.ok(&["merge", "list"]), serde_json::json!([]));
    assert_eq!(contacts(&gil, false).len(), 2);
    assert_eq!(hana.ok(&["merge", "list"]), serde_json::json!([]));

    // Someone who goes by another name in one relationship can still be linked.
    let linked = gil.ok(&["link", &at_gil_hana, &at_gil_ivo, "--force"]);
    assert_eq!(linked["linked"], true, "{linked}");
}

/// Blair and Charlie each ask the other to merge their two relationships,
/// and each accepts the other's request at the same moment. One merge
/// happens: the acceptance of the request with the higher id is refused
/// (it crossed the other), and what either sends afterwards arrives.
#[test]
fn crossed_merge_requests_accepted_at_once_make_one_merge() {
    let (blair, charlie) = (person("Blair"), person("Charlie"));
    let _daemons = [blair.start(), charlie.start()];
    let (b1, c1) = befriend(&blair, &charlie);
    let (c2, b2) = befriend(&charlie, &blair);
    blair.ok(&["merge", "request", &b1, &b2]);
    charlie.ok(&["merge", "request", &c1, &c2]);
    let (to_blair, to_charlie) = (received_merge(&blair), received_merge(&charlie));
    let (accepted_by_blair, accepted_by_charlie) = std::thread::scope(|s| {
        let by_blair =
            s.spawn(|| blair.cli(&["merge", "accept", to_blair["id"].as_str().unwrap()]));
        let by_charlie =
            s.spawn(|| charlie.cli(&["merge", "accept", to_charlie["id"].as_str().unwrap()]));
        (by_blair.join().unwrap(), by_charlie.join().unwrap())
    });
    let outcomes = [&accepted_by_blair, &accepted_by_charlie];
    let refused: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert_eq!(
        refused.len(),
        1,
        "exactly one acceptance goes through: {refused:?}"
    );
    assert!(refused[0].contains("crossed"), "{}", refused[0]);

    // One live relationship each side, and it carries messages both ways.
    let live = |p: &Person, name: &str, old: [&String; 2]| {
        wait_for(SETTLE, || {
            let live: Vec<Value> = contacts(p, false)
                .into_iter()
                .filter(|x| x["name"] == name)
                .collect();
            match live.as_slice() {
                [one] if !old.contains(&&one["id"].as_str()?.to_string()) => {
                    one["id"].as_str().map(String::from)
                }
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("{} ends with one merged relationship", p.name))
    };
    let b_new = live(&blair, "Charlie", [&b1, &b2]);
    let c_new = live(&charlie, "Blair", [&c1, &c2]);
    send(&blair, &b_new, "after the crossing, from Blair");
    send(&charlie, &c_new, "after the crossing, from Charlie");
    for (p, id, text) in [
        (&charlie, &c_new, "after the crossing, from Blair"),
        (&blair, &b_new, "after the crossing, from Charlie"),
    ] {
        wait_for(SETTLE, || {
            texts(p, id).iter().any(|t| t == text).then_some(())
        })
        .unwrap_or_else(|| panic!("{} never read {text:?}: {:?}", p.name, texts(p, id)));
    }
}
