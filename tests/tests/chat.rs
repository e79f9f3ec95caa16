//! Two people, two daemons (separate processes) on loopback, driven
//! through the CLI: invitation, acceptance, messages both ways.

use std::time::Duration;

use harness::{wait_for, Daemon, Netns, Person};

fn chat(alex: &Person, blair: &Person) {
    let (blair_at_alex, alex_at_blair) = alex.befriend(blair);

    let sent = blair.ok(&["send", "Alex", "Hello from Blair", "--wait"]);
    assert_eq!(sent["status"], "delivered");
    // Delivered means in Alex's inbox; Alex replies once it is on screen,
    // so both histories have the same order.
    wait_for(Duration::from_secs(10), || {
        (alex.history("Blair").len() == 1).then_some(())
    })
    .expect("Alex sees Blair's message");
    // A message may begin with "-" (not taken for `-h`, help).
    let reply = alex.ok(&["send", &blair_at_alex, "-hi Blair!", "--wait"]);
    assert_eq!(reply["status"], "delivered");

    let at_alex = wait_for(Duration::from_secs(10), || {
        let h = alex.history("Blair");
        (h.len() == 2).then_some(h)
    })
    .expect("Alex has both messages");
    let at_blair = wait_for(Duration::from_secs(10), || {
        let h = blair.history(&alex_at_blair);
        (h.len() == 2).then_some(h)
    })
    .expect("Blair has both messages");

    // Same messages, same ids, same order on both sides.
    let ids = |h: &[serde_json::Value]| h.iter().map(|m| m["id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(&at_alex), ids(&at_blair));
    assert_eq!(at_alex[0]["text"], "Hello from Blair");
    assert_eq!(at_alex[0]["from"], blair_at_alex.as_str());
    assert_eq!(at_alex[0]["status"], "received");
    assert_eq!(at_alex[1]["text"], "-hi Blair!");
    assert_eq!(at_alex[1]["from"], "me");
    assert_eq!(at_alex[1]["status"], "delivered");
    assert_eq!(at_blair[0]["from"], "me");
    assert_eq!(at_blair[0]["status"], "delivered");
    assert_eq!(at_blair[1]["status"], "received");
    for m in at_alex.iter().chain(&at_blair) {
        let at = m["at"].as_str().expect("at");
        assert!(at.ends_with('Z') && at.contains('T'), "RFC 3339 time: {at}");
    }
}

#[test]
fn two_daemons_chat_both_ways_without_mdns() {
    let alex = Person::init("Alex");
    let blair = Person::init("Blair");
    let mut a = alex.start();
    let mut b = blair.start();
    chat(&alex, &blair);

    // What `send --wait` reports, the history right after it shows: the
    // sender records the receipt off the reply path, and a history read
    // waits for that record (this raced once in CI; the sharp test is
    // `actors::runtime::tests::history_right_after_send_wait_says_delivered`).
    for i in 0..5 {
        let text = format!("in order {i}");
        let sent = blair.ok(&["send", "Alex", &text, "--wait"]);
        assert_eq!(sent["status"], "delivered");
        let h = blair.history("Alex");
        let last = h.last().expect("a message");
        assert_eq!(last["text"], text.as_str());
        assert_eq!(
            last["status"], "delivered",
            "history right after send --wait"
        );
    }

    let status = alex.ok(&["status"]);
    assert_eq!(status["peer_id"], a.peer_id.as_str());
    assert!(status["listen"].as_array().is_some_and(|l| !l.is_empty()));
    assert!(a.stop(), "graceful stop exits 0");
    assert!(b.stop());
}

#[test]
fn two_daemons_chat_with_mdns_on() {
    // mDNS multicasts on every interface; inside a namespace with only
    // loopback, nothing leaves this machine.
    let Some(ns) = Netns::new() else {
        eprintln!("skipped: this machine does not allow network namespaces (ip netns add failed)");
        return;
    };
    let alex = Person::init("Alex");
    let blair = Person::init("Blair");
    let _a = Daemon::start(&alex, &alex.listen_args(), Some(&ns.name));
    let _b = Daemon::start(&blair, &blair.listen_args(), Some(&ns.name));
    chat(&alex, &blair);
}

#[test]
fn reused_and_expired_tickets_are_refused_with_a_clear_message() {
    let alex = Person::init("Alex");
    let blair = Person::init("Blair");
    let charlie = Person::init("Charlie");
    let _a = alex.start();
    let _b = blair.start();
    let _c = charlie.start();

    let ticket = alex.ok(&["invite"])["ticket"].as_str().unwrap().to_string();
    // As a mail program passes it on: wrapped at 76 columns and indented.
    let wrapped: String = ticket
        .as_bytes()
        .chunks(76)
        .map(|line| format!("  {}\r\n", String::from_utf8_lossy(line)))
        .collect();
    let accepted = blair.ok(&["accept", &wrapped]);
    assert_eq!(accepted["delivered"], true, "Alex's node stored the answer");
    let again = blair.json(&["accept", &ticket]).unwrap_err();
    assert!(again.contains("already accepted"), "{again}");
    let reused = charlie.json(&["accept", &ticket]).unwrap_err();
    assert!(reused.contains("already used or has expired"), "{reused}");
    assert_eq!(
        charlie.ok(&["contacts"]),
        serde_json::json!([]),
        "nothing left behind"
    );

    let short = alex.ok(&["invite", "--expires-in", "1"])["ticket"]
        .as_str()
        .unwrap()
        .to_string();
    std::thread::sleep(Duration::from_millis(1_100));
    let expired = charlie.json(&["accept", &short]).unwrap_err();
    assert!(expired.contains("expired"), "{expired}");

    let own = alex.ok(&["invite"])["ticket"].as_str().unwrap().to_string();
    let mine = alex.json(&["accept", &own]).unwrap_err();
    assert!(mine.contains("your own invitation"), "{mine}");

    let damaged = blair
        .json(&["accept", &ticket[..ticket.len() - 20]])
        .unwrap_err();
    assert!(damaged.contains("damaged"), "{damaged}");
}

#[test]
fn the_cli_says_what_to_do_next() {
    let alex = Person::init("Alex");
    let no_daemon = alex.json(&["contacts"]).unwrap_err();
    assert!(no_daemon.contains("no daemon is running"), "{no_daemon}");

    let nowhere = tempfile::tempdir().unwrap();
    let out = harness::run_cli(nowhere.path(), &["contacts"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not initialised"));
    // A file is no data directory: `init` would fail on it too.
    let file = nowhere.path().join("a-file");
    std::fs::write(&file, "mine").unwrap();
    for args in [["contacts"].as_slice(), &["init", "--name", "Alex"]] {
        let out = harness::run_cli(&file, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("is a file, not a data directory"), "{said}");
    }

    let again = alex.json(&["init", "--name", "Alex"]).unwrap_err();
    assert!(again.contains("already initialised"), "{again}");
    // init makes its directory private: never a folder of other files.
    let full = tempfile::tempdir().unwrap();
    std::fs::write(full.path().join("notes.txt"), "mine").unwrap();
    let out = harness::run_cli(full.path(), &["init", "--name", "Alex"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
    assert!(!full.path().join("config.toml").exists());
    // A database moved away is not silently replaced by an empty one.
    let dana = Person::init("Dana");
    let db = dana.data_dir().join("protonode.redb");
    std::fs::rename(&db, dana.data_dir().join("elsewhere.redb")).unwrap();
    let out = harness::run_cli(
        dana.data_dir(),
        &["daemon", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is missing"));
    assert!(!db.exists());

    let usage = alex.cli(&["send", "only-one-arg"]);
    assert_eq!(usage.status.code(), Some(2), "usage errors exit 2");
    for args in [
        &["invite", "--expires-in", "18446744073709551615"][..],
        &["invite", "--expires-in", "0"],
        &["send", "Blair", "hi", "--wait", "--timeout", "0"],
        &[
            "send",
            "Blair",
            "hi",
            "--wait",
            "--timeout",
            "18446744073709551615",
        ],
        &["group", "update", "G", "--wait", "--timeout", "0"],
        &["group", "add", "G", "Blair", "--timeout", "5"],
    ] {
        let out = alex.cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?} is a usage error");
    }

    let mut a = alex.start();
    // The same bounds hold for a script on the control socket: these made
    // the daemon panic (a timestamp past year 9999, an Instant overflow).
    for (method, params) in [
        ("invite", r#"{"expires_in_secs":18446744073709551615}"#),
        (
            "send",
            r#"{"to":"Nobody","text":"hi","wait_secs":18446744073709551615}"#,
        ),
        (
            "group_update",
            r#"{"group":"Nobody","wait_secs":18446744073709551615}"#,
        ),
    ] {
        let answer = raw_call(&alex, method, params);
        assert_eq!(answer["error"]["code"], -32602, "{method}: {answer}");
    }
    assert_eq!(alex.ok(&["contacts"]), serde_json::json!([]));
    let second = Daemon::try_second(&alex);
    assert!(second.contains("already running"), "{second}");
    let unknown = alex.json(&["send", "Nobody", "hi"]).unwrap_err();
    assert!(unknown.contains("no contact or group matches"), "{unknown}");
    let unknown = alex.json(&["history", "Nobody"]).unwrap_err();
    assert!(unknown.contains("no contact or group matches"), "{unknown}");
    assert!(a.is_running());
}

#[test]
fn watch_streams_messages_deliveries_and_contacts_as_json_lines() {
    let alex = Person::init("Alex");
    let blair = Person::init("Blair");
    let _a = alex.start();
    let _b = blair.start();
    let watch = alex.watch(true);
    let words = alex.watch(false);
    let (blair_at_alex, _) = alex.befriend(&blair);
    blair.ok(&["send", "Alex", "watched", "--wait"]);
    alex.ok(&["send", "Blair", "back", "--wait"]);

    let mut kinds = std::collections::BTreeSet::new();
    let mut message = None;
    let mut delivery = None;
    watch.next_event(Duration::from_secs(20), |event| {
        kinds.insert(event["event"].as_str().unwrap().to_string());
        if event["event"] == "message" {
            message = Some(event.clone());
        }
        if event["event"] == "delivery" && event["kind"] == "message" {
            delivery = Some(event.clone());
        }
        kinds.len() == 3 && delivery.is_some()
    });
    let delivery = delivery.unwrap();
    assert_eq!(delivery["contact_name"], "Blair", "{delivery}");
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        ["contact", "delivery", "message"]
    );
    let message = message.unwrap();
    assert_eq!(message["message"]["text"], "watched");
    assert_eq!(message["kind"], "contact", "{message}");
    assert_eq!(message["conversation_name"], "Blair", "{message}");
    assert_eq!(message["message"]["name"], "Blair", "{message}");
    // In words: who wrote what.
    let line = words.next(Duration::from_secs(20), |line| {
        line.contains("watched").then(|| line.to_string())
    });
    assert!(
        line.as_deref()
            .is_some_and(|l| l.ends_with("  Blair: watched")),
        "{line:?}"
    );
    // And whose node has what we sent.
    let line = words.next(Duration::from_secs(20), |line| {
        line.contains("delivered").then(|| line.to_string())
    });
    assert!(
        line.as_deref()
            .is_some_and(|l| l.ends_with("delivered to Blair's node")),
        "{line:?}"
    );

    // Sent by an id prefix, said by name; the JSON names the contact's id.
    let out = alex.cli(&["send", &blair_at_alex[..6], "by prefix"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("queued to Blair (message "), "{said}");
    let sent = alex.ok(&["send", "blair", "by name"]);
    assert_eq!(sent["to"], blair_at_alex.as_str(), "{sent}");
}

/// Without --follow, watch ends when its daemon stops and says how to
/// follow it; with --follow it waits for the daemon to come back, also
/// after `kill -9`, and watches again.
#[test]
fn watch_follow_outlives_a_daemon_restart() {
    let alex = Person::init("Alex");
    let blair = Person::init("Blair");
    let mut a = alex.start();
    let _b = blair.start();
    alex.befriend(&blair);
    let following = alex.watch_with(true, &["--follow"]);
    let mut plain = std::process::Command::new(harness::protonode_bin())
        .arg("--data-dir")
        .arg(alex.data_dir())
        .arg("watch")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = std::io::BufRead::lines(std::io::BufReader::new(plain.stderr.take().unwrap()));
    let first = said.next().unwrap().unwrap();
    assert!(first.starts_with("Watching"), "{first}");
    a.kill9();
    let ended = harness::wait_for(Duration::from_secs(20), || plain.try_wait().ok().flatten())
        .expect("a plain watch ends with its daemon");
    assert_eq!(ended.code(), Some(1));
    let rest: Vec<String> = said.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l.contains("watch --follow")),
        "{rest:?}"
    );

    let _a = alex.start();
    assert!(
        following.subscribed_again(Duration::from_secs(20)),
        "--follow watches again once the daemon is back"
    );
    blair.ok(&["send", "Alex", "after the restart", "--wait"]);
    following
        .next_event(Duration::from_secs(20), |e| {
            e["event"] == "message" && e["message"]["text"] == "after the restart"
        })
        .expect("the following watch shows what came after the restart");
}

/// `protonode status | head -1` and the like: the reader goes away, and the
/// command ends quietly, neither panicking nor writing colour codes into
/// a log.
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    use std::process::{Command, Stdio};
    let alex = Person::init("Alex").with_env("RUST_LOG", "info");
    let a = alex.start();
    let mut child = Command::new(harness::protonode_bin())
        .arg("--data-dir")
        .arg(alex.data_dir())
        .arg("status")
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // gone before anything is written
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {said}", out.status);
    assert!(!said.contains("panicked"), "{said}");
    let log = a.stderr_lines();
    assert!(!log.is_empty(), "the daemon logs");
    assert!(
        log.iter().all(|l| !l.contains('\u{1b}')),
        "no colour codes in a log: {log:?}"
    );
}

#[test]
fn invite_draws_a_qr_code_of_the_ticket() {
    let alex = Person::init("Alex");
    let _a = alex.start();
    let out = alex.cli(&["invite", "--qr"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("protonode:"));
    let qr: Vec<&str> = lines.collect();
    assert!(qr.len() > 20, "a QR code follows the ticket");
    assert!(
        qr.iter().all(|l| l.chars().all(|c| " ▀▄█".contains(c))),
        "drawn with half blocks"
    );
}

/// One JSON-RPC call on `person`'s control socket, as a script would make it.
fn raw_call(person: &Person, method: &str, params: &str) -> serde_json::Value {
    use std::io::{BufRead as _, Write as _};
    let mut socket =
        std::os::unix::net::UnixStream::connect(person.data_dir().join("control.sock")).unwrap();
    writeln!(
        socket,
        r#"{{"jsonrpc":"2.0","id":1,"method":"{method}","params":{params}}}"#
    )
    .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(socket)
        .read_line(&mut line)
        .unwrap();
    serde_json::from_str(&line).unwrap()
}

/// Two people accept one ticket while its maker is offline. The second
/// answer is refused when he is back: what its acceptor wrote meanwhile
/// was never read, and must neither show as delivered nor vanish.
#[test]
fn a_refused_answer_keeps_what_its_acceptor_wrote_marked_failed() {
    let quick = |name| Person::init(name).with_env("PROTONODE_DELIVERY_ACCEPT_WAIT_SECS", "1");
    let gil = quick("Gil");
    let ivo = quick("Ivo");
    // One envelope per batch: what follows the answer is not in its batch.
    let erin = quick("Erin").with_env("PROTONODE_DELIVERY_MAX_BATCH", "1");
    let mut g = gil.start();
    let ticket = gil.ok(&["invite"])["ticket"].as_str().unwrap().to_string();
    assert!(g.stop());

    let _i = ivo.start();
    let mut e = erin.start();
    assert_eq!(ivo.ok(&["accept", &ticket])["delivered"], false);
    let erin_at_gil = erin.ok(&["accept", &ticket]);
    assert_eq!(erin_at_gil["delivered"], false);
    let gil_id = erin_at_gil["contact"].as_str().unwrap().to_string();
    erin.ok(&["send", "Gil", "hello, are you there?"]);
    erin.ok(&["send", "Gil", "hello?"]);
    // Ivo's answer reaches Gil first; then Erin's.
    assert!(e.stop());
    let _g = gil.start();
    wait_for(Duration::from_secs(20), || {
        (gil.ok(&["contacts"]).as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .expect("Gil files Ivo's answer");
    let _e = erin.start();

    let refused = wait_for(Duration::from_secs(20), || {
        erin.ok(&["contacts", "--all"])
            .as_array()
            .and_then(|all| all.iter().find(|c| c["state"] == "refused").cloned())
    })
    .expect("Erin's node learns that Gil's refused her answer");
    assert_eq!(refused["id"], gil_id.as_str());
    assert_eq!(erin.ok(&["contacts"]), serde_json::json!([]));
    // Gone from `contacts`, the refusal is said in `status`.
    let warnings = erin.ok(&["status"])["warnings"].to_string();
    assert!(
        warnings.contains("Gil's node refused your answer") && warnings.contains(&gil_id),
        "{warnings}"
    );
    let history = erin.ok(&["history", &gil_id]);
    assert_eq!(history[0]["text"], "hello, are you there?", "{history}");
    assert_eq!(history[0]["status"], "failed", "{history}");
    assert_eq!(history[1]["status"], "failed", "{history}");
    let send = erin.json(&["send", &gil_id, "again?"]).unwrap_err();
    assert!(send.contains("refused our answer"), "{send}");
    // By name too, as no live contact goes by it; and it is not offered
    // for a group as if it could become active.
    assert_eq!(erin.history("Gil").len(), 2);
    let create = erin.json(&["group", "create", "Pals", "Gil"]).unwrap_err();
    assert!(
        create.contains("never started on their side") && create.contains("new ticket"),
        "{create}"
    );
    assert_eq!(gil.history("Ivo").len(), 0);
    assert_eq!(gil.ok(&["contacts"]).as_array().map(Vec::len), Some(1));
}

/// Blair's node is killed (-9) and comes back. Over QUIC nothing tells
/// Alex's node that its connection with the old process is dead (until the
/// idle timeout, 10 s), and a delivery sent over it waited out its request
/// timeout. Blair's node dials Alex's at start, which only a node without a
/// connection does: Alex's node closes the older connection then, and what
/// Alex sends next goes at once. Each round gives the delivery 4 s, less
/// than either timeout: without the fix about half the rounds took 5 to
/// 10 s. (A connection younger than half a second is not taken for dead,
/// since two nodes dialing each other at once make two; so each round
/// lets the connection age a second before the kill.)
#[test]
fn a_peer_killed_and_restarted_is_reached_at_once() {
    let (alex, blair) = (Person::init("Alex"), Person::init("Blair"));
    // Blair's node speaks QUIC only, so Alex's connection with it is one
    // that a killed process leaves open on Alex's side.
    let quic_only = vec![
        "--listen".to_string(),
        format!("/ip4/127.0.0.1/udp/{}/quic-v1", blair.port),
        "--no-mdns".to_string(),
    ];
    let _a = alex.start();
    let mut b = Daemon::start(&blair, &quic_only, None);
    let (_, at_alex) = blair.befriend(&alex);
    alex.ok(&["send", &at_alex, "hello", "--wait"]);
    for round in 0..6 {
        std::thread::sleep(Duration::from_secs(1));
        b.kill9();
        b = Daemon::start(&blair, &quic_only, None);
        let text = format!("after restart {round}");
        let sent = alex.cli(&["send", &at_alex, &text, "--wait", "--timeout", "4"]);
        assert!(
            sent.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&sent.stderr)
        );
    }
}

/// `send --wait --json` that runs out of time: the error on stderr as
/// always, and on stdout the message, queued, so that a script knows which
/// one to look for. It is delivered once the peer's node is back.
#[test]
fn a_send_wait_that_runs_out_still_names_the_message_in_json() {
    let alex = Person::init("Alex");
    let blair = Person::init("Blair");
    let _a = alex.start();
    let mut b = blair.start();
    let (at_alex, _) = alex.befriend(&blair);
    b.kill9();
    let out = alex.cli(&[
        "--json",
        "send",
        &at_alex,
        "are you there?",
        "--wait",
        "--timeout",
        "1",
    ]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("stays queued"), "{said}");
    let sent: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(sent["status"], "queued", "{sent}");
    let id = sent["message"].as_str().unwrap().to_string();
    let _b = blair.start();
    let delivered = wait_for(Duration::from_secs(30), || {
        alex.history(&at_alex)
            .into_iter()
            .find(|m| m["id"] == id.as_str() && m["status"] == "delivered")
    });
    assert!(
        delivered.is_some(),
        "message {id} is delivered once Blair is back"
    );
}
