//! The seed's introductions over real daemons (separate processes on
//! loopback), driven through the CLI: Alex introduces Blair and Charlie,
//! they see placeholders, claim them, talk in the group and on the side.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use harness::{wait_for, Person};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(60);

fn person(name: &str) -> Person {
    Person::init(name)
        .with_env("PROTONODE_DELIVERY_RETRY_MAX_MS", "1000")
        .with_env("PROTONODE_DELIVERY_ORDERING_TIMEOUT_MS", "1500")
}

/// Alex befriends each of `others`, waiting until Alex's node knows them.
fn befriend_all(alex: &Person, others: &[&Person]) {
    for o in others {
        alex.befriend(o);
    }
}

/// `p`'s contact named `name`, as `contacts --json` shows it.
fn contact_named(p: &Person, name: &str) -> Value {
    p.ok(&["contacts"])
        .as_array()
        .and_then(|l| l.iter().find(|c| c["name"] == name).cloned())
        .unwrap_or_else(|| panic!("{} has no contact {name}", p.name))
}

/// The one group `p` is in (waits for it to show up).
fn the_group(p: &Person) -> Value {
    wait_for(SETTLE, || p.groups().into_iter().next())
        .unwrap_or_else(|| panic!("{} has no group", p.name))
}

fn statuses(group: &Value) -> HashMap<String, String> {
    group["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Waits until every person's group agrees: same epoch and authenticator,
/// `n` members, exactly one self, no placeholder.
fn wait_for_agreement(people: &[&Person], n: usize) -> Vec<Value> {
    wait_for(SETTLE, || {
        let groups: Vec<Value> = people.iter().map(|p| the_group(p)).collect();
        let same = groups.windows(2).all(|w| {
            w[0]["epoch"] == w[1]["epoch"]
                && w[0]["epoch_authenticator"] == w[1]["epoch_authenticator"]
        });
        let shaped = groups.iter().all(|g| {
            let members = g["members"].as_array().unwrap();
            members.len() == n
                && members.iter().filter(|m| m["status"] == "self").count() == 1
                && members.iter().all(|m| m["status"] != "placeholder")
        });
        (same && shaped).then_some(groups)
    })
    .unwrap_or_else(|| {
        let now: Vec<Value> = people.iter().map(|p| the_group(p)).collect();
        panic!("the members never agreed: {now:#?}")
    })
}

/// The texts of a group history, in order.
fn texts(p: &Person, group: &str) -> Vec<String> {
    p.history(group)
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn alex_introduces_blair_and_charlie_who_claim_talk_and_connect() {
    let (alex, blair, charlie) = (person("Alex"), person("Blair"), person("Charlie"));
    let mut a = alex.start();
    let _b = blair.start();
    let _c = charlie.start();
    befriend_all(&alex, &[&blair, &charlie]);
    let blair_watches = blair.watch(true);

    let introduced = alex.ok(&["introduce", "Blair", "Charlie", "--name", "Trio"]);
    assert!(introduced["group"].is_string());
    let mut named: Vec<&str> = introduced["introduced"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    named.sort();
    assert_eq!(named, ["Blair", "Charlie"], "{introduced}");
    // Blair is told, as it happens, what to do about it.
    let told = blair_watches
        .next_event(SETTLE, |e| {
            e["event"] == "group" && e["change"] == "introduced"
        })
        .expect("watch tells Blair of the introduction");
    assert_eq!(told["introduced_by"], "Alex", "{told}");
    assert_eq!(told["name"], "Trio", "{told}");
    let asked = |p: &Person| {
        p.ok(&["status"])["warnings"].as_array().is_some_and(|w| {
            w.iter()
                .any(|w| w.as_str().is_some_and(|w| w.contains("claim or decline")))
        })
    };
    assert!(asked(&blair), "status reminds Blair of the introduction");

    // Figure 3.3.1: a group of three with two placeholders Alex asserts.
    let at_blair = the_group(&blair);
    assert_eq!(told["group"], at_blair["id"], "{told}");
    assert_eq!(at_blair["pending"], true, "Blair has not claimed yet");
    assert_eq!(at_blair["claiming"], false, "no claim is on its way");
    let seen = statuses(&at_blair);
    assert_eq!(seen["Blair"], "self");
    assert_eq!(
        seen["Alex"], "linked",
        "Alex's equivalence to the relationship Blair has with Alex"
    );
    assert_eq!(
        seen["Charlie"], "placeholder",
        "only Alex's word that this is Charlie"
    );
    let at_alex = statuses(&the_group(&alex));
    assert_eq!(
        (at_alex["Blair"].as_str(), at_alex["Charlie"].as_str()),
        ("placeholder", "placeholder")
    );

    // All three can message at once, before anyone answers. (Once Charlie's
    // node has the introduction too: a message that comes first is kept for
    // the group, but `history Trio` would not find the group yet.)
    the_group(&charlie);
    alex.ok(&["send", "Trio", "welcome, you two", "--wait"]);
    for p in [&blair, &charlie] {
        wait_for(SETTLE, || {
            (texts(p, "Trio") == ["welcome, you two"]).then_some(())
        })
        .unwrap_or_else(|| panic!("{} did not get the first message", p.name));
    }
    // A message written with a placeholder's key may be its introducer's
    // (Alex holds that key too): Blair's node says whose word it is that
    // Charlie wrote it, live and in the history, also after the claim.
    charlie.ok(&["send", "Trio", "Charlie here, unclaimed", "--wait"]);
    let live = blair_watches
        .next_event(SETTLE, |e| {
            e["event"] == "message" && e["message"]["text"] == "Charlie here, unclaimed"
        })
        .expect("Blair watches Charlie's message arrive");
    assert_eq!(live["kind"], "group", "{live}");
    assert_eq!(live["conversation_name"], "Trio", "{live}");
    assert_eq!(live["message"]["name"], "Charlie", "{live}");
    assert_eq!(live["message"]["asserted_by"], "Alex", "{live}");
    let asserted = |p: &Person, text: &str| {
        p.history("Trio")
            .into_iter()
            .find(|m| m["text"] == text)
            .map(|m| m["asserted_by"].clone())
    };
    assert_eq!(
        asserted(&blair, "Charlie here, unclaimed"),
        Some(Value::from("Alex"))
    );
    assert_eq!(
        asserted(&alex, "Charlie here, unclaimed"),
        Some(Value::Null),
        "Alex made the placeholder: no one else's word"
    );

    // Figure 3.3.2: both claim; everyone agrees, nobody is a placeholder.
    let claimed = blair.ok(&["claim", "Trio"]);
    assert!(!asked(&blair), "answered: no more reminder");
    assert!(
        claimed["claiming"] == true || claimed["pending"] == false,
        "the claim is on its way, or already ordered: {claimed}"
    );
    // A side relationship with a placeholder could be one with Alex, who
    // holds its key: refused, and nothing changes.
    wait_for(SETTLE, || {
        (the_group(&blair)["pending"] == false).then_some(())
    })
    .expect("Blair's claim is ordered");
    let early = blair.cli(&["connect", "Trio", "Charlie"]);
    assert_eq!(early.status.code(), Some(1));
    let said = String::from_utf8_lossy(&early.stderr);
    assert!(
        said.contains("still a placeholder that Alex asserts"),
        "{said}"
    );
    // Nor can it be verified out of band: Alex holds that key too.
    let early = blair.cli(&["group", "verify", "Trio", "Charlie"]);
    assert_eq!(early.status.code(), Some(1));
    let said = String::from_utf8_lossy(&early.stderr);
    assert!(
        said.contains("verify once Charlie has claimed it"),
        "{said}"
    );
    assert_eq!(statuses(&the_group(&blair))["Charlie"], "placeholder");
    let entered = blair_watches
        .next_event(SETTLE, |e| {
            e["event"] == "group" && e["change"] == "entered"
        })
        .expect("Blair's watch says her claim was ordered");
    assert_eq!(entered["name"], "Trio", "{entered}");
    charlie.ok(&["claim", "Trio"]);
    let groups = wait_for_agreement(&[&alex, &blair, &charlie], 3);
    // Introducing the two again, now that they are in the group under
    // their own keys, is refused too.
    let twice = alex.cli(&["introduce", "Blair", "Charlie"]);
    assert_eq!(twice.status.code(), Some(1));
    let said = String::from_utf8_lossy(&twice.stderr);
    assert!(
        said.contains("already in a group with you") && !said.contains("not everyone"),
        "{said}"
    );
    let epoch = groups[0]["epoch"].as_u64().unwrap();
    assert!(epoch >= 3, "creation plus two claims: {epoch}");
    // Each claimer's equivalence reaches Alex inside their relationship,
    // in no fixed order with the group's commits: Alex links each once it
    // has read it.
    let linked = wait_for(SETTLE, || {
        let at_alex = statuses(&the_group(&alex));
        (at_alex["Blair"] == "linked" && at_alex["Charlie"] == "linked").then_some(())
    });
    assert!(
        linked.is_some(),
        "Alex never linked both claims: {:?}",
        statuses(&the_group(&alex))
    );
    let at_blair = statuses(&groups[1]);
    assert_eq!(
        at_blair["Charlie"], "claimed",
        "a verified claim, but no new trust that Charlie is not Alex"
    );
    assert_eq!(at_blair["Alex"], "linked");

    // Group messages reach everyone exactly once, in order per sender.
    blair.ok(&["send", "Trio", "hi from Blair", "--wait"]);
    charlie.ok(&["send", "Trio", "hi from Charlie", "--wait"]);
    for p in [&alex, &blair, &charlie] {
        let all = wait_for(SETTLE, || {
            let t = texts(p, "Trio");
            (t.len() == 4).then_some(t)
        })
        .unwrap_or_else(|| {
            panic!(
                "{} does not have the four messages: {:?}",
                p.name,
                texts(p, "Trio")
            )
        });
        for text in [
            "welcome, you two",
            "Charlie here, unclaimed",
            "hi from Blair",
            "hi from Charlie",
        ] {
            assert_eq!(
                all.iter().filter(|t| *t == text).count(),
                1,
                "{}: {text:?} exactly once",
                p.name
            );
        }
    }
    // Claimed, Charlie writes as Charlie; what the placeholder wrote stays
    // Alex's word.
    assert_eq!(asserted(&blair, "hi from Charlie"), Some(Value::Null));
    assert_eq!(
        asserted(&blair, "Charlie here, unclaimed"),
        Some(Value::from("Alex"))
    );

    // Figure 3.3.3: a side relationship Alex learns nothing of. Both ask
    // at once: their invitations cross, and they end with one
    // relationship (each command connects, or finds the one the other's
    // invitation made).
    std::thread::scope(|s| {
        for (who, whom) in [(&charlie, "Blair"), (&blair, "Charlie")] {
            s.spawn(move || {
                let out = who.cli(&["--json", "connect", "Trio", whom]);
                let said = String::from_utf8_lossy(&out.stderr);
                if out.status.success() {
                    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                    assert_eq!(v["name"], whom, "{v}");
                    // The contact it names is the one that exists, whichever
                    // invitation made it.
                    wait_for(SETTLE, || {
                        who.ok(&["contacts"])
                            .as_array()?
                            .iter()
                            .any(|c| c["id"] == v["contact"] && c["state"] == "active")
                            .then_some(())
                    })
                    .unwrap_or_else(|| panic!("{}'s contact {v} never shows", who.name));
                } else {
                    assert!(
                        said.contains("already have a relationship with"),
                        "{} → {whom}: {said}",
                        who.name
                    );
                }
            });
        }
    });
    wait_for(SETTLE, || {
        let b = blair.ok(&["contacts"]);
        b.as_array()?
            .iter()
            .find(|c| c["name"] == "Charlie" && c["state"] == "active")?;
        Some(())
    })
    .expect("Blair sees Charlie as a contact");
    // `connect` waits for Blair's answer only so long: wait for it here.
    wait_for(SETTLE, || {
        let c = charlie.ok(&["contacts"]);
        c.as_array()?
            .iter()
            .find(|c| c["name"] == "Blair" && c["state"] == "active")?;
        Some(())
    })
    .expect("Charlie sees Blair as a contact");
    // A second side relationship with the same person, or one with the
    // introducer (already a contact), is refused: contacts stay unambiguous.
    for (who, whom) in [(&charlie, "Blair"), (&blair, "Alex"), (&blair, "Charlie")] {
        let again = who.cli(&["connect", "Trio", whom]);
        assert_eq!(again.status.code(), Some(1), "{} → {whom}", who.name);
        let said = String::from_utf8_lossy(&again.stderr);
        assert!(
            said.contains(&format!("already have a relationship with {whom}")),
            "{said}"
        );
    }
    charlie.ok(&["send", "Blair", "just between us", "--wait"]);
    let side = wait_for(SETTLE, || {
        let h = blair.history("Charlie");
        (!h.is_empty()).then_some(h)
    })
    .unwrap();
    assert_eq!(side[0]["text"], "just between us");
    for (who, whom) in [(&charlie, "Blair"), (&blair, "Charlie")] {
        let named = who
            .ok(&["contacts"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["name"] == whom)
            .count();
        assert_eq!(named, 1, "{} has one contact {whom}", who.name);
    }
    let alex_contacts = alex.ok(&["contacts"]);
    assert_eq!(
        alex_contacts.as_array().unwrap().len(),
        2,
        "Alex's contacts are unchanged"
    );
    let origin = contact_named(&blair, "Charlie")["origin"].clone();
    assert!(
        origin
            .as_str()
            .unwrap()
            .starts_with("introduced by Alex in group \"Trio\""),
        "{origin}"
    );

    // Blair and Charlie have no new trust that the other is not Alex's
    // alias, and their trust records say so, until they verify each other.
    let record = charlie.ok(&["contact", "Blair"]);
    let aliases = record["may_be_alias_of"].as_array().unwrap();
    assert!(
        aliases.len() == 1 && aliases[0].as_str().unwrap().ends_with(" Alex"),
        "{record}"
    );
    assert_eq!(
        charlie.ok(&["contact", "Alex"])["may_be_alias_of"],
        serde_json::json!([]),
        "Alex's key came by a ticket"
    );
    let shown = charlie.cli(&["contact", "Blair"]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("may be an alias"));
    charlie.ok(&["group", "verify", "Trio", "Blair"]);
    let record = charlie.ok(&["contact", "Blair"]);
    assert_eq!(
        record["may_be_alias_of"],
        serde_json::json!([]),
        "Charlie checked Blair's key out of band"
    );
    assert_eq!(
        record["verified_in"],
        serde_json::json!(["Trio"]),
        "{record}"
    );
    let shown = charlie.cli(&["contact", "Blair"]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("verified:     you checked"));
    assert_eq!(
        blair.ok(&["contact", "Charlie"])["may_be_alias_of"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // Every message Alex's group handed to a relationship (the two
    // introductions, the equivalences of the claims) was recorded as
    // queued: none would be sent again after a restart.
    assert!(a.stop(), "Alex's daemon stops");
    let store = actors::store::Store::open(&alex.data_dir().join("protonode.redb")).unwrap();
    let pending: Vec<usize> = actors::groups::all_groups(&store)
        .unwrap()
        .iter()
        .map(|g| g.relays.len())
        .collect();
    assert_eq!(pending, [0], "one group, no relay left to send");
}

#[test]
fn a_declined_introduction_removes_the_placeholder() {
    let (alex, blair, charlie) = (person("Alex"), person("Blair"), person("Charlie"));
    let _a = alex.start();
    let _b = blair.start();
    let _c = charlie.start();
    befriend_all(&alex, &[&blair, &charlie]);
    let alex_watches = alex.watch(true);
    alex.ok(&["introduce", "Blair", "Charlie"]);
    let group = the_group(&blair);
    blair.ok(&["decline", group["id"].as_str().unwrap()]);
    // Alex's node heard the decline itself, and says so.
    let removed = alex_watches
        .next_event(SETTLE, |e| e["event"] == "group" && e["removed"].is_array())
        .expect("Alex's watch tells of the removal");
    assert_eq!(
        removed["removed"],
        serde_json::json!([{"member": "Blair", "by": "me", "placeholder": true, "declined": true}]),
        "{removed}"
    );
    assert!(
        wait_for(SETTLE, || blair.groups().is_empty().then_some(())).is_some(),
        "Blair no longer lists it"
    );
    // Changing one's mind after is not on offer, and the error says why.
    let id = group["id"].as_str().unwrap();
    for again in ["decline", "claim"] {
        let out = blair.cli(&[again, id]);
        assert_eq!(out.status.code(), Some(1));
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("no longer in this group"), "{again}: {said}");
    }
    // The introducer has nothing to claim or decline.
    let out = alex.cli(&["claim", alex.groups()[0]["id"].as_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("you made this group"), "{said}");

    // Once Blair's placeholder is gone from Alex's group, introducing the
    // two again is no repeat.
    wait_for(SETTLE, || {
        (alex.groups()[0]["members"].as_array()?.len() == 2).then_some(())
    })
    .expect("Alex's node removes Blair's placeholder");
    // Two introductions under one name: `claim NAME` is ambiguous while
    // both wait, and means the one still waiting once the other is claimed.
    alex.ok(&["introduce", "Blair", "Charlie", "--name", "Pair"]);
    // A second introduction of the same two is refused unless asked for
    // with --again, and makes nothing.
    let blair_id = contact_named(&alex, "Blair")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let twice = alex.cli(&["introduce", "Charlie", "Blair"]);
    assert_eq!(twice.status.code(), Some(1));
    let said = String::from_utf8_lossy(&twice.stderr);
    assert!(
        said.contains("are already in a group with you and no one else")
            && said.contains("\"Pair\" (not everyone has claimed their place yet)")
            && said.contains("--again"),
        "{said}"
    );
    assert_eq!(alex.groups().len(), 2, "no group made");
    // Named by id, they are told by name.
    let out = alex.cli(&[
        "introduce",
        &blair_id,
        "Charlie",
        "--name",
        "Pair",
        "--again",
    ]);
    let noted = String::from_utf8_lossy(&out.stderr);
    assert!(
        noted.contains("you are in 2 groups called \"Pair\""),
        "{noted}"
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("Introduced Blair and Charlie in group ")
            || said.starts_with("Introduced Charlie and Blair in group "),
        "{said}"
    );
    let pending = wait_for(SETTLE, || {
        let g = blair.groups();
        (g.len() == 2).then_some(g)
    })
    .expect("Blair has both introductions");
    let out = blair.cli(&["claim", "Pair"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("matches several groups"));
    blair.ok(&["claim", pending[0]["id"].as_str().unwrap()]);
    let second = blair.ok(&["claim", "Pair"]);
    assert_eq!(second["id"], pending[1]["id"], "{second}");

    // Charlie has claimed nothing: Alex's node alone votes for Charlie's
    // placeholders, so Alex may neither leave nor be removed (Charlie's
    // claim could never be ordered), and Charlie, pending, may not change
    // the group with the placeholder's key. Each refusal changes nothing.
    let first = alex.groups()[0]["id"].as_str().unwrap().to_string();
    let refused = |p: &Person, args: &[&str], says: &str| {
        // args[2] is the group's id.
        let group = |p: &Person| p.groups().into_iter().find(|g| g["id"] == args[2]);
        let before = group(p);
        let out = p.cli(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains(says), "{args:?}: {said}");
        assert_eq!(group(p), before, "{args:?} changed nothing");
    };
    refused(
        &alex,
        &["group", "leave", &first],
        "your node still votes for Charlie",
    );
    let at_charlie = charlie.groups()[0]["id"].as_str().unwrap().to_string();
    for args in [
        ["group", "remove", &at_charlie, "Alex"].as_slice(),
        &["group", "update", &at_charlie],
    ] {
        refused(&charlie, args, "claim it (or decline it) first");
    }
    wait_for(SETTLE, || {
        (blair.groups()[1]["pending"] == false).then_some(())
    })
    .expect("Blair's second claim is ordered");
    refused(
        &blair,
        &[
            "group",
            "remove",
            pending[1]["id"].as_str().unwrap(),
            "Alex",
        ],
        "Alex's node still votes for Charlie",
    );
    for p in [&alex, &charlie] {
        wait_for(SETTLE, || {
            let g = the_group(p);
            (g["members"].as_array()?.len() == 2 && !statuses(&g).contains_key("Blair"))
                .then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "{} still has Blair's placeholder: {:#?}",
                p.name,
                the_group(p)
            )
        });
    }
}

#[test]
fn a_plain_group_grows_and_shrinks() {
    let (alex, blair, charlie) = (person("Alex"), person("Blair"), person("Charlie"));
    let _a = alex.start();
    let _b = blair.start();
    let _c = charlie.start();
    befriend_all(&alex, &[&blair, &charlie]);
    let alex_watches = alex.watch(true);
    let roster_event = |key: &str, name: &str| {
        alex_watches
            .next_event(SETTLE, |e| {
                e["event"] == "group"
                    && e[key]
                        .as_array()
                        .is_some_and(|l| l.iter().any(|n| n == name))
            })
            .unwrap_or_else(|| panic!("Alex's watch never said {name} {key}"))
    };

    // Spaces around a name are not part of it.
    alex.ok(&["group", "create", "  Book club ", "Blair"]);
    the_group(&blair);
    // With --wait, the claim is answered once Alex's node has ordered it.
    let claimed = blair.ok(&["claim", "Book club", "--wait"]);
    assert_eq!(claimed["claiming"], false, "{claimed}");
    assert_eq!(claimed["pending"], false, "{claimed}");
    wait_for_agreement(&[&alex, &blair], 2);
    roster_event("claimed", "Blair");
    // Asked again (a retry, say), the claim is done: an answer, no error,
    // and no second claim.
    let again = blair.ok(&["claim", "Book club", "--wait"]);
    assert_eq!(again["claiming"], false, "{again}");
    assert_eq!(again["epoch"], claimed["epoch"], "{again}");
    let said = blair.cli(&["send", "Book club", "hello Alex", "--wait"]);
    let said = String::from_utf8_lossy(&said.stdout);
    assert!(
        said.starts_with("delivered to Book club, 1 other member "),
        "{said}"
    );
    let blank = alex.cli(&["send", "Book club", "   "]);
    assert_eq!(blank.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&blank.stderr).contains("only spaces"));
    let long = "é".repeat(20_000);
    let too_long = alex.cli(&["send", "Book club", &long]);
    assert_eq!(too_long.status.code(), Some(1));
    let said = String::from_utf8_lossy(&too_long.stderr);
    assert!(
        said.contains("40000 bytes long") && said.contains("send it in parts"),
        "{said}"
    );
    alex.ok(&["send", "Book club", "hello Blair", "--wait"]);
    let delivered = alex_watches
        .next_event(SETTLE, |e| {
            e["event"] == "delivery" && e["kind"] == "message"
        })
        .expect("Alex's watch tells of the delivery");
    assert_eq!(delivered["member_name"], "Blair", "{delivered}");
    // A key update says whose.
    blair.ok(&["group", "update", "Book club", "--wait"]);
    roster_event("updated", "Blair");

    // Blair, not the creator, adds Charlie. To Charlie, Alex is a member
    // Blair vouches for, not a placeholder: no one holds Alex's key but
    // Alex, and Alex's node alone votes for him.
    blair.befriend(&charlie);
    // With --wait, the answer comes once Alex's node (the ordering
    // service) has ordered the change: Charlie is in it, a placeholder.
    let added = blair.ok(&["group", "add", "Book club", "Charlie", "--wait"]);
    assert_eq!(statuses(&added)["Charlie"], "placeholder", "{added}");
    assert_eq!(
        added["members"].as_array().map(Vec::len),
        Some(3),
        "{added}"
    );
    // Alex orders Blair's addition: the commit itself says whom the
    // placeholder stands for (Blair's announcement comes after it).
    roster_event("joined", "Charlie");
    wait_for(SETTLE, || (!charlie.groups().is_empty()).then_some(()))
        .expect("Charlie is introduced");
    let at_charlie = statuses(&the_group(&charlie));
    assert_eq!(at_charlie["Alex"], "vouched");
    assert_eq!(at_charlie["Blair"], "linked");
    charlie.ok(&["claim", "Book club"]);
    wait_for_agreement(&[&alex, &blair, &charlie], 3);
    // Adding someone already in the group is refused, and changes nothing.
    let again = blair.cli(&["group", "add", "Book club", "Charlie"]);
    assert_eq!(again.status.code(), Some(1));
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.contains("Charlie is already in this group"), "{said}");
    let declined = charlie.cli(&["decline", "Book club"]);
    let said = String::from_utf8_lossy(&declined.stderr);
    assert!(said.contains("`protonode group leave` leaves it"), "{said}");
    let again = alex.cli(&["group", "add", "Book club", "Blair"]);
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(
        the_group(&alex)["members"].as_array().map(Vec::len),
        Some(3)
    );
    charlie.ok(&["send", "Book club", "thanks for adding me", "--wait"]);
    wait_for(SETTLE, || {
        texts(&blair, "Book club")
            .contains(&"thanks for adding me".to_string())
            .then_some(())
    })
    .expect("Blair reads Charlie");

    // Removing oneself is leaving, and the error says so; nothing changes.
    let own = alex.cli(&["group", "remove", "Book club", "Alex"]);
    assert_eq!(own.status.code(), Some(1));
    let said = String::from_utf8_lossy(&own.stderr);
    assert!(
        said.contains("is you") && said.contains("group leave"),
        "{said}"
    );
    assert_eq!(
        the_group(&alex)["members"].as_array().map(Vec::len),
        Some(3)
    );

    roster_event("claimed", "Charlie");
    let last_shared = the_group(&charlie);
    let charlie_watches = charlie.watch(true);
    let removed = alex.ok(&["group", "remove", "Book club", "Charlie", "--wait"]);
    assert_eq!(
        removed["members"].as_array().map(Vec::len),
        Some(2),
        "{removed}"
    );
    wait_for_agreement(&[&alex, &blair], 2);
    // `watch` says who removed whom, to each.
    let gone = roster_event("gone", "Charlie");
    assert_eq!(
        gone["removed"],
        serde_json::json!([{"member": "Charlie", "by": "me"}]),
        "{gone}"
    );
    let expelled = charlie_watches
        .next_event(SETTLE, |e| e["event"] == "group" && e["change"] == "left")
        .expect("Charlie's watch says she is out");
    assert_eq!(expelled["removed_by"], "Alex", "{expelled}");
    wait_for(SETTLE, || charlie.groups().is_empty().then_some(()))
        .expect("Charlie learns she was removed");

    // Alex's history still names Charlie, who is no longer a member.
    let said = alex
        .history("Book club")
        .into_iter()
        .find(|m| m["text"] == "thanks for adding me")
        .expect("Charlie's message in Alex's history");
    assert_eq!(said["name"], "Charlie", "{said}");

    // What Charlie read stays hers: `groups --all` lists the group she was
    // removed from, and its history still reads.
    let all = charlie.ok(&["groups", "--all"]);
    assert_eq!(all[0]["state"], "gone", "{all}");
    // At the last epoch she was in, as the others knew it: her node cannot
    // derive the epoch that removed her.
    for key in ["epoch", "epoch_authenticator"] {
        assert_eq!(all[0][key], last_shared[key], "{key}: {all} {last_shared}");
    }
    assert!(texts(&charlie, "Book club").contains(&"thanks for adding me".to_string()));

    blair.ok(&["group", "leave", "Book club"]);
    assert!(blair.groups().is_empty());
    assert!(texts(&blair, "Book club").contains(&"thanks for adding me".to_string()));
    for args in [
        ["send", "Book club", "still here?"].as_slice(),
        &["group", "add", "Book club", "Charlie"],
        &["group", "update", "Book club"],
    ] {
        let out = blair.cli(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("no longer in this group"), "{args:?}: {said}");
    }
    wait_for(SETTLE, || {
        (the_group(&alex)["members"].as_array()?.len() == 1).then_some(())
    })
    .expect("Alex is alone in the group");
    let left = roster_event("gone", "Blair");
    assert_eq!(left["left"], serde_json::json!(["Blair"]), "{left}");
    assert!(left.get("removed").is_none(), "{left}");

    // Alone in a group, a message goes to no one, and `send` says so
    // rather than "delivered".
    let sent = alex.ok(&["send", "Book club", "anyone left?", "--wait"]);
    assert_eq!(sent["recipients"], 0, "{sent}");
    let said = alex.cli(&["send", "Book club", "hello?"]);
    assert_eq!(said.status.code(), Some(0));
    let said = String::from_utf8_lossy(&said.stdout);
    assert!(said.contains("only member"), "{said}");
}

/// Alex, Blair and Charlie in a claimed group "Trio"; their daemons.
fn trio() -> ([Person; 3], [harness::Daemon; 3]) {
    trio_of([person("Alex"), person("Blair"), person("Charlie")])
}

/// As [`trio`], with these three people.
fn trio_of([alex, blair, charlie]: [Person; 3]) -> ([Person; 3], [harness::Daemon; 3]) {
    let daemons = [alex.start(), blair.start(), charlie.start()];
    befriend_all(&alex, &[&blair, &charlie]);
    alex.ok(&["introduce", "Blair", "Charlie", "--name", "Trio"]);
    the_group(&blair);
    the_group(&charlie);
    blair.ok(&["claim", "Trio"]);
    charlie.ok(&["claim", "Trio"]);
    wait_for_agreement(&[&alex, &blair, &charlie], 3);
    ([alex, blair, charlie], daemons)
}

#[test]
fn group_messages_reach_everyone_once_across_kill_9_of_any_member() {
    let (people, mut daemons) = trio();
    let mut acknowledged: Vec<(usize, String)> = Vec::new();
    let mut n = 0;
    let mut send_round = |people: &[Person; 3], acknowledged: &mut Vec<(usize, String)>| {
        for _ in 0..4 {
            for (i, p) in people.iter().enumerate() {
                n += 1;
                let text = format!("{} #{n}", p.name);
                // A daemon that is down does not acknowledge: not counted.
                if p.json(&["send", "Trio", &text]).is_ok() {
                    acknowledged.push((i, text));
                }
            }
        }
    };
    // Blair, then Alex (the ordering member), are killed and come back.
    for victim in [1, 0] {
        send_round(&people, &mut acknowledged);
        daemons[victim].kill9();
        send_round(&people, &mut acknowledged);
        daemons[victim] = people[victim].start();
        send_round(&people, &mut acknowledged);
    }
    for p in &people {
        let history = wait_for(Duration::from_secs(60), || {
            let t = texts(p, "Trio");
            acknowledged.iter().all(|(_, a)| t.contains(a)).then_some(t)
        })
        .unwrap_or_else(|| panic!("{} is missing acknowledged messages", p.name));
        for (_, text) in &acknowledged {
            assert_eq!(
                history.iter().filter(|t| *t == text).count(),
                1,
                "{}: {text:?} exactly once",
                p.name
            );
        }
        // Each sender's messages keep their order.
        for (sender, who) in people.iter().enumerate() {
            let sent: Vec<&String> = acknowledged
                .iter()
                .filter(|(s, _)| *s == sender)
                .map(|(_, t)| t)
                .collect();
            let seen: Vec<&String> = history.iter().filter(|t| sent.contains(t)).collect();
            assert_eq!(seen, sent, "{}: order of {}'s messages", p.name, who.name);
        }
    }
    println!(
        "{} acknowledged group messages, each in every history exactly once",
        acknowledged.len()
    );
}

#[test]
fn the_group_goes_on_when_the_ordering_node_dies() {
    let ([alex, blair, charlie], [mut a, _b, _c]) = trio();
    let before = the_group(&blair)["epoch"].as_u64().unwrap();
    a.kill9();
    drop(alex);
    // Both rotate their keys: commits that need an ordering service.
    blair.ok(&["group", "update", "Trio"]);
    charlie.ok(&["group", "update", "Trio"]);
    let groups = wait_for(SETTLE, || {
        let (b, c) = (the_group(&blair), the_group(&charlie));
        let done = b["epoch"].as_u64()? >= before + 2
            && b["epoch"] == c["epoch"]
            && b["epoch_authenticator"] == c["epoch_authenticator"];
        done.then_some((b, c))
    })
    .unwrap_or_else(|| {
        panic!(
            "Blair and Charlie did not move on: {:#?} {:#?}",
            the_group(&blair),
            the_group(&charlie)
        )
    });
    println!(
        "epoch {before} -> {} without the ordering node",
        groups.0["epoch"]
    );
    // Not --wait: "delivered" means every member's node has it, and Alex's
    // node is gone; it stays queued for Alex.
    blair.ok(&["send", "Trio", "still here"]);
    wait_for(SETTLE, || {
        texts(&charlie, "Trio")
            .contains(&"still here".to_string())
            .then_some(())
    })
    .expect("Charlie reads Blair");
}

#[test]
fn a_change_that_is_not_ordered_in_time_stays_queued() {
    let (alex, blair) = (person("Alex"), person("Blair"));
    let mut a = alex.start();
    let _b = blair.start();
    befriend_all(&alex, &[&blair]);
    alex.ok(&["group", "create", "Pair", "Blair"]);
    the_group(&blair);
    blair.ok(&["claim", "Pair", "--wait"]);
    let before = wait_for_agreement(&[&alex, &blair], 2)[0]["epoch"]
        .as_u64()
        .unwrap();
    assert_eq!(the_group(&blair)["queued_changes"], 0);

    // Alex's node orders the group's changes, and Blair alone is no
    // majority of two: with Alex's node down, nothing is ordered.
    assert!(a.stop(), "Alex's daemon stops cleanly");
    let asked = Instant::now();
    let waited = blair.cli(&["group", "update", "Pair", "--wait", "--timeout", "2"]);
    let took = asked.elapsed();
    assert_eq!(waited.status.code(), Some(1), "{waited:?}");
    let said = String::from_utf8_lossy(&waited.stderr);
    assert!(
        said.contains("within 2s") && said.contains("stays queued"),
        "{said}"
    );
    // It waited for the timeout (a lower bound, not a speed check).
    assert!(took >= Duration::from_secs(2), "answered after {took:?}");
    let queued = the_group(&blair);
    assert_eq!(queued["epoch"], before, "{queued}");
    assert_eq!(queued["queued_changes"], 1, "{queued}");
    let text = blair.cli(&["groups"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("1 change not yet ordered"), "{text}");
    // A change that waits long (here, a few ordering timeouts of 1.5 s)
    // shows in status.
    let overdue = |p: &Person| {
        p.ok(&["status"])["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| {
                w.as_str()
                    .unwrap()
                    .contains("a key update this node asked for has waited")
            })
    };
    wait_for(SETTLE, || overdue(&blair).then_some(()))
        .expect("status tells of the change that waits");
    // Meanwhile Blair's node, ordering in Alex's place, asks Alex's node
    // again every 2 s: the copies do not pile up in its outbox.
    let outbox = || blair.ok(&["status"])["outbox"].as_u64().unwrap();
    let waiting = outbox();
    std::thread::sleep(Duration::from_secs(7));
    let later = outbox();
    println!("Blair's outbox: {waiting} rows, then {later} 7 s later");
    assert!(later <= waiting, "{waiting} rows, then {later}");

    // Back, Alex's node orders the queued update: both move on by one.
    let _a = alex.start();
    wait_for(SETTLE, || {
        let (a, b) = (the_group(&alex), the_group(&blair));
        let done = b["epoch"].as_u64()? == before + 1
            && a["epoch"] == b["epoch"]
            && a["epoch_authenticator"] == b["epoch_authenticator"]
            && b["queued_changes"] == 0;
        done.then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the queued update was not made: {:#?} {:#?}",
            the_group(&alex),
            the_group(&blair)
        )
    });
    assert!(!overdue(&blair), "made: status no longer mentions it");
}

/// In a group of four, a member who votes for a placeholder not yet
/// claimed may leave when the others are still a majority: they order the
/// claim without it. And a contact met there through a member someone
/// else added says who added them, since their key rests on that word.
#[test]
fn a_member_may_leave_before_its_invitee_claims_when_the_rest_are_a_majority() {
    let ([alex, blair, charlie], _daemons) = trio();
    let dana = person("Dana");
    let _d = dana.start();
    blair.befriend(&dana);
    let added = blair.ok(&["group", "add", "Trio", "Dana", "--wait"]);
    assert_eq!(statuses(&added)["Dana"], "placeholder", "{added}");
    wait_for(SETTLE, || (!dana.groups().is_empty()).then_some(())).expect("Dana is introduced");

    // Blair's node votes for Dana's placeholder; without Blair, Alex and
    // Charlie are two of three, a majority.
    blair.ok(&["group", "leave", "Trio"]);
    assert!(blair.groups().is_empty());
    wait_for(SETTLE, || {
        [&alex, &charlie]
            .iter()
            .all(|p| {
                let g = the_group(p);
                let s = statuses(&g);
                s.len() == 3
                    && !s.contains_key("Blair")
                    && s.get("Dana").map(String::as_str) == Some("placeholder")
            })
            .then_some(())
    })
    .expect("Alex and Charlie see Blair gone and Dana's placeholder");

    let claimed = dana.ok(&["claim", "Trio", "--wait"]);
    assert_eq!(claimed["claiming"], false, "{claimed}");
    wait_for_agreement(&[&alex, &charlie, &dana], 3);
    dana.ok(&["send", "Trio", "hello, both of you", "--wait"]);
    for p in [&alex, &charlie] {
        wait_for(SETTLE, || {
            texts(p, "Trio")
                .contains(&"hello, both of you".to_string())
                .then_some(())
        })
        .unwrap_or_else(|| panic!("{} reads Dana", p.name));
    }

    // Charlie met Dana in a group Alex introduced Charlie to, and it was
    // Blair, who has left since, who added Dana.
    let out = charlie.ok(&["connect", "Trio", "Dana"]);
    assert_eq!(out["name"], "Dana", "{out}");
    let record = wait_for(SETTLE, || {
        let r = charlie.ok(&["contact", "Dana"]);
        (r["contact"]["state"] == "active").then_some(r)
    })
    .expect("Charlie's contact Dana becomes active");
    let obtained = record["obtained"].as_str().unwrap();
    assert!(
        obtained.starts_with("added by Blair to group \"Trio\" (")
            && obtained.ends_with(" Alex introduced us to"),
        "{record}"
    );
    let vouched: Vec<&str> = record["vouched_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        vouched.iter().any(|v| v.ends_with(" Alex"))
            && vouched.contains(&"Blair (the group member who added them)"),
        "{record}"
    );
    assert_eq!(record["may_be_alias_of"], record["vouched_by"], "{record}");
    let origin = contact_named(&charlie, "Dana")["origin"].clone();
    assert!(
        origin
            .as_str()
            .unwrap()
            .starts_with("added by Blair to group \"Trio\""),
        "{origin}"
    );
}

/// Blair and Charlie each ask for a side relationship while the other's
/// node is down, so that each has its own invitation out when the other's
/// arrives: the invitations cross for certain. Both keep the invitation of
/// the member whose group key is the lower, and end with one relationship.
#[test]
fn crossed_side_invitations_make_one_relationship() {
    let quick = |name| person(name).with_env("PROTONODE_DELIVERY_ACCEPT_WAIT_SECS", "1");
    let ([_alex, blair, charlie], [_a, mut b, mut c]) =
        trio_of([quick("Alex"), quick("Blair"), quick("Charlie")]);
    assert!(c.stop(), "Charlie's daemon stops");
    let asked = blair.ok(&["connect", "Trio", "Charlie"]);
    assert_eq!(asked["delivered"], false, "{asked}");
    assert!(b.stop(), "Blair's daemon stops");
    c = charlie.start();
    let asked = charlie.ok(&["connect", "Trio", "Blair"]);
    assert_eq!(asked["delivered"], false, "{asked}");
    b = blair.start();

    let named = |p: &Person, whom: &str| -> Vec<Value> {
        p.ok(&["contacts", "--all"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["name"] == whom)
            .cloned()
            .collect()
    };
    wait_for(SETTLE, || {
        [(&blair, "Charlie"), (&charlie, "Blair")]
            .iter()
            .all(|(p, whom)| named(p, whom).iter().any(|c| c["state"] == "active"))
            .then_some(())
    })
    .expect("both see the other as a contact");
    // Both invitations have arrived by now (each side has answered one):
    // neither made a second relationship, nor left one waiting.
    for (p, whom) in [(&blair, "Charlie"), (&charlie, "Blair")] {
        let contacts = named(p, whom);
        assert_eq!(contacts.len(), 1, "{}: {contacts:#?}", p.name);
        assert_eq!(contacts[0]["state"], "active", "{}: {contacts:#?}", p.name);
    }
    charlie.ok(&["send", "Blair", "one of us", "--wait"]);
    blair.ok(&["send", "Charlie", "one of us, too", "--wait"]);
    assert_eq!(texts(&blair, "Charlie"), ["one of us", "one of us, too"]);
    drop((b, c));
}

/// Alex introduces Blair and Charlie, who both claim: Blair's node stops
/// after her claim, before Charlie's is ordered, and Alex's (the ordering
/// node) after Charlie's. Charlie's daemon runs; Blair's node has not seen
/// Charlie's claim.
fn claimed_while_blair_was_down() -> ([Person; 3], harness::Daemon) {
    let (alex, blair, charlie) = (person("Alex"), person("Blair"), person("Charlie"));
    let mut a = alex.start();
    let mut b = blair.start();
    let c = charlie.start();
    befriend_all(&alex, &[&blair, &charlie]);
    alex.ok(&["introduce", "Blair", "Charlie", "--name", "Trio"]);
    the_group(&blair);
    the_group(&charlie);
    blair.ok(&["claim", "Trio", "--wait"]);
    assert!(b.stop(), "Blair's daemon stops");
    charlie.ok(&["claim", "Trio", "--wait"]);
    assert!(a.stop(), "Alex's daemon stops");
    ([alex, blair, charlie], c)
}

/// Charlie's claim is ordered while Blair's node is down, and Charlie
/// asks Blair for a side relationship at once. Back up while Alex (the
/// ordering node, who holds the claim's commit for her) is still down,
/// Blair's node gets the invitation from a key it does not know yet
/// (Charlie's own, not the placeholder's): it keeps it until the commit
/// comes, rather than dropping what it acknowledged.
#[test]
fn a_side_invitation_from_a_claim_not_yet_seen_waits_for_it() {
    let ([alex, blair, charlie], _c) = claimed_while_blair_was_down();
    let queued = || charlie.ok(&["status"])["outbox"].as_u64().unwrap();
    let before = queued();
    let asked = charlie.ok(&["connect", "Trio", "Blair"]);
    assert_eq!(queued(), before + 1, "the invitation waits for Blair");
    // The id `connect` gave says what it is, until Blair's node answers.
    let id = asked["contact"].as_str().unwrap();
    let out = charlie.cli(&["contact", id]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("your invitation to Blair in group \"Trio\""),
        "{said}"
    );
    assert!(said.contains("not answered yet"), "{said}");
    // Nor can a second invitation be sent meanwhile (both could arrive and
    // make two relationships), and `send` names it as `contact` does.
    for args in [
        &["connect", "Trio", "Blair"][..],
        &["send", id, "are you there?"][..],
    ] {
        let out = charlie.cli(args);
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {said}");
        assert!(said.contains("not answered yet"), "{args:?}: {said}");
    }
    assert_eq!(queued(), before + 1, "one invitation");
    // Left unanswered a while (a few ordering timeouts), `status` says so.
    wait_for(SETTLE, || {
        let status = charlie.ok(&["status"]);
        status["warnings"]
            .as_array()?
            .iter()
            .filter_map(Value::as_str)
            .any(|w| w.contains("your invitation to Blair in group") && w.contains(id))
            .then_some(())
    })
    .expect("status tells of the unanswered invitation");
    let b = blair.start();
    // Blair's node acknowledges it before it can know who sent it.
    wait_for(SETTLE, || (queued() == before).then_some(()))
        .expect("Blair's node takes the invitation");
    let a = alex.start();
    wait_for_agreement(&[&alex, &blair, &charlie], 3);
    let knows = |p: &Person, whom: &str| {
        p.ok(&["contacts"])
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == whom && c["state"] == "active")
    };
    wait_for(SETTLE, || {
        (knows(&blair, "Charlie") && knows(&charlie, "Blair")).then_some(())
    })
    .expect("Blair and Charlie are each other's contacts");
    charlie.ok(&["send", "Blair", "on the side", "--wait"]);
    assert_eq!(texts(&blair, "Charlie"), ["on the side"]);
    // Each side's trust record holds the other's signed word that the
    // contact's key is equivalent to the member's key in the group.
    for (p, whom) in [(&blair, "Charlie"), (&charlie, "Blair")] {
        let record = p.ok(&["contact", whom]);
        let theirs = &record["contact"]["fingerprint"];
        let attested = record["attestations"].as_array().unwrap().iter().any(|a| {
            a["kind"] == "equivalent" && (a["first"] == *theirs || a["second"] == *theirs)
        });
        assert!(attested, "{}: {record:#}", p.name);
    }
    drop((a, b));
}

/// Blair's node goes down before Charlie's claim is ordered, and Alex's
/// (the ordering node) after it. Back up, Blair's node holds Charlie's
/// next text for an epoch it has not reached: it asks Alex for the commit
/// it missed, then, with no answer, Charlie too, whose node keeps the
/// commits it applied. The text shows without Alex.
#[test]
fn a_member_behind_catches_up_from_another_while_the_ordering_node_is_down() {
    let ([_alex, blair, charlie], _c) = claimed_while_blair_was_down();
    charlie.ok(&["send", "Trio", "while Alex is away"]);
    let _b = blair.start();
    wait_for(SETTLE, || {
        texts(&blair, "Trio")
            .contains(&"while Alex is away".to_string())
            .then_some(())
    })
    .unwrap_or_else(|| panic!("Blair never caught up: {:#?}", the_group(&blair)));
    assert_eq!(the_group(&blair)["epoch"], the_group(&charlie)["epoch"]);
}

/// Someone removed and added again is reached at the same derived
/// address as before (it comes from their relationship with whoever adds
/// them, and the group). A message sent to them before their node has
/// taken the new introduction waits for it, instead of reaching the
/// membership that ended and being dropped there.
#[test]
fn a_member_added_again_gets_what_was_sent_before_their_node_knew() {
    let ([alex, blair, _charlie], _daemons) = trio();
    let dana = person("Dana");
    let _d = dana.start();
    alex.befriend(&dana);
    alex.ok(&["group", "add", "Trio", "Dana", "--wait"]);
    wait_for(SETTLE, || (!dana.groups().is_empty()).then_some(())).expect("Dana is introduced");
    dana.ok(&["claim", "Trio", "--wait"]);
    alex.ok(&["group", "remove", "Trio", "Dana", "--wait"]);
    wait_for(SETTLE, || dana.groups().is_empty().then_some(()))
        .expect("Dana's node learns she was removed");

    // Added again, and a message at once: it reaches Dana's node while
    // the introduction is still on its way (through her relationship with
    // Alex, stored before it is processed).
    alex.ok(&["group", "add", "Trio", "Dana", "--wait"]);
    blair.ok(&["send", "Trio", "welcome back, Dana"]);
    wait_for(SETTLE, || (!dana.groups().is_empty()).then_some(()))
        .expect("Dana is introduced again");
    dana.ok(&["claim", "Trio", "--wait"]);
    wait_for(SETTLE, || {
        texts(&dana, "Trio")
            .contains(&"welcome back, Dana".to_string())
            .then_some(())
    })
    .unwrap_or_else(|| panic!("Dana never read Blair: {:?}", texts(&dana, "Trio")));
}

/// Dani's node is down while Fay joins the group. Back up, Dani writes at
/// once, before her node has caught up: the message is written for the
/// group as her node knew it, without Fay. The ordering node reads it
/// after Fay's addition and tells Dani's node, which, caught up, sends it
/// to Fay too. Fay gets it once, the others once, and Dani's history says
/// delivered only once Fay's node has it.
#[test]
fn a_message_written_before_catching_up_reaches_who_joined_meanwhile() {
    let (alex, blair, dani, fay) = (
        person("Alex"),
        person("Blair"),
        person("Dani"),
        person("Fay"),
    );
    let _a = alex.start();
    let _b = blair.start();
    let mut d = dani.start();
    let _f = fay.start();
    befriend_all(&alex, &[&blair, &dani, &fay]);
    alex.ok(&["group", "create", "Club", "Blair", "Dani"]);
    the_group(&blair);
    the_group(&dani);
    blair.ok(&["claim", "Club", "--wait"]);
    dani.ok(&["claim", "Club", "--wait"]);
    wait_for_agreement(&[&alex, &blair, &dani], 3);
    d.kill9();
    alex.ok(&["group", "add", "Club", "Fay", "--wait"]);
    the_group(&fay);
    fay.ok(&["claim", "Club", "--wait"]);
    wait_for_agreement(&[&alex, &blair, &fay], 4);
    let _d = dani.start();
    dani.ok(&["send", "Club", "back again"]);
    let copies = |p: &Person| {
        p.history("Club")
            .iter()
            .filter(|m| m["text"] == "back again")
            .count()
    };
    for p in [&fay, &alex, &blair] {
        assert!(
            wait_for(SETTLE, || (copies(p) > 0).then_some(())).is_some(),
            "{} gets Dani's message",
            p.name
        );
    }
    let sent = wait_for(SETTLE, || {
        let h = dani.history("Club");
        let m = h.into_iter().find(|m| m["text"] == "back again")?;
        (m["status"] == "delivered").then_some(m)
    });
    assert!(sent.is_some(), "Dani's history says delivered at last");
    wait_for_agreement(&[&alex, &blair, &dani, &fay], 4);
    for p in [&fay, &alex, &blair] {
        assert_eq!(copies(p), 1, "{} has it once", p.name);
    }
}
