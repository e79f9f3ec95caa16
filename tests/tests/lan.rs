//! Three people on one LAN with no other route: they find each other by
//! mDNS alone, and messages queued while a cable is out arrive once it is
//! back, each exactly once and in order.
//!
//! The LAN is made of network namespaces this test creates, so nothing
//! touches the machine's own interfaces or routes:
//!
//! ```text
//!                switch namespace: bridge "lan", multicast snooping off
//!               to-alex            to-blair            to-charlie     (veth ends)
//!                  │                  │                   │
//!   alex ns: eth0 198.18.0.1  blair ns: eth0 198.18.0.2  charlie ns: eth0 198.18.0.3
//! ```
//!
//! Each host has `lo` up, one address in 198.18.0.0/24, a `224.0.0.0/4`
//! route on its link for mDNS, and no default route. Every namespace is
//! deleted when the test ends, also when it fails: the harness's `Netns`
//! deletes its namespace when dropped, and deleting a namespace deletes the
//! veth ends in it. Where `ip netns add` is not allowed, the test says so
//! and skips.
//!
//! Data directories live on the shared filesystem and the CLI reaches each
//! daemon through its Unix socket, so only the daemons run in namespaces.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{wait_for, Daemon, Netns, Person};
use serde_json::Value;

/// The LAN's first three octets. 198.18.0.0/15 is reserved for network
/// tests (RFC 2544), so no real host can be reached by mistake.
const LAN_PREFIX: [u8; 3] = [198, 18, 0];
/// The host's end of its veth pair, inside the host's namespace.
const LINK: &str = "eth0";
/// The bridge, inside the switch namespace.
const BRIDGE: &str = "lan";
/// How long one `ip` command may take.
const IP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a delivery may take once its receiver can be found: a dial
/// stalled on a stale QUIC address (5 s handshake timeout), then the longest
/// retry backoff (`delivery.retry_max_ms`, 15 s + 20 % jitter), with room
/// for a slow machine. Below the harness's 60 s limit for one command.
const DELIVERY_LIMIT: Duration = Duration::from_secs(45);
/// How long Charlie's cable stays out. Longer than one stalled delivery
/// attempt (libp2p gives up opening a stream after 10 s), so that Alex's
/// node fails at least once and retries while the cable is out.
const CABLE_OUT: Duration = Duration::from_secs(12);
/// Messages Alex sends while Charlie's cable is out.
const WHILE_AWAY: usize = 5;

#[test]
fn three_hosts_on_a_lan_find_each_other_by_mdns_alone() {
    let setup = Instant::now();
    let Some(lan) = Lan::build(&["Alex", "Blair", "Charlie"]) else {
        println!("skipped: this machine does not allow network namespaces (ip netns add failed)");
        return;
    };
    let alex = Person::init("Alex");
    let blair = Person::init("Blair");
    let charlie = Person::init("Charlie");
    let mut alex_node = lan.start(&alex, alex.port);
    let mut blair_node = lan.start(&blair, blair.port);
    let charlie_node = lan.start(&charlie, charlie.port);
    println!("LAN and daemons up in {:.1}s: {lan}", secs(setup));
    let started = Instant::now();

    // Everyone meets everyone and says hello. Tickets carry addresses, so
    // this part does not need mDNS yet.
    let (blair_at_alex, _) = alex.befriend(&blair);
    let (charlie_at_alex, alex_at_charlie) = alex.befriend(&charlie);
    blair.befriend(&charlie);
    for (from, to) in [
        (&alex, &blair),
        (&blair, &alex),
        (&alex, &charlie),
        (&charlie, &alex),
        (&blair, &charlie),
        (&charlie, &blair),
    ] {
        let sent = from.ok(&["send", &to.name, &format!("hello {}", to.name), "--wait"]);
        assert_eq!(sent["status"], "delivered", "{} to {}", from.name, to.name);
    }
    let everyone = [
        (&alex, &alex_node.peer_id),
        (&blair, &blair_node.peer_id),
        (&charlie, &charlie_node.peer_id),
    ];
    for (person, own) in everyone {
        let others: BTreeSet<String> = everyone
            .iter()
            .map(|(_, id)| id.to_string())
            .filter(|id| id != own)
            .collect();
        wait_for(Duration::from_secs(10), || {
            others.is_subset(&peers(person)).then_some(())
        })
        .unwrap_or_else(|| panic!("{} is not connected to both others", person.name));
        assert_mdns_on(person);
    }
    println!(
        "{:>5.1}s  each pair exchanged tickets and messages; each host sees the other two",
        secs(started)
    );

    // Alex and Blair both move to new ports, so every address either holds
    // for the other is stale, and they can meet again only if mDNS finds
    // them. Moving Blair alone would not show that: Blair's node announces
    // its new addresses to Alex's unchanged ones as soon as it starts.
    assert!(alex_node.stop(), "Alex's daemon stops gracefully");
    assert!(blair_node.stop(), "Blair's daemon stops gracefully");
    let alex_port = another_port(alex.port);
    let blair_port = another_port(blair.port);
    alex_node = lan.start(&alex, alex_port);
    blair_node = lan.start(&blair, blair_port);
    assert_listens_on(&alex, alex_port);
    assert_listens_on(&blair, blair_port);
    let moved = Instant::now();
    let sent = alex.ok(&[
        "send",
        &blair_at_alex,
        "found you by mDNS",
        "--wait",
        "--timeout",
        &DELIVERY_LIMIT.as_secs().to_string(),
    ]);
    assert_eq!(sent["status"], "delivered");
    let found_after = moved.elapsed();
    assert!(peers(&alex).contains(&blair_node.peer_id));
    assert!(peers(&blair).contains(&alex_node.peer_id));
    // Blair's node acknowledges once a message is stored, and files it in
    // the history just after.
    let at_blair = wait_for(Duration::from_secs(10), || {
        blair
            .history("Alex")
            .into_iter()
            .find(|m| m["id"] == sent["message"])
    })
    .expect("Blair's history shows the message");
    assert_eq!(at_blair["text"], "found you by mDNS");
    assert_eq!(at_blair["status"], "received");
    println!(
        "{:>5.1}s  Alex (port {} -> {alex_port}) and Blair (port {} -> {blair_port}) moved; \
         Alex's message reached Blair {:.1}s later, found by mDNS",
        secs(started),
        alex.port,
        blair.port,
        found_after.as_secs_f64()
    );

    // Charlie's cable is pulled: Alex's messages are accepted and queued.
    let charlie_host = lan.host("Charlie");
    charlie_host.link_down();
    let texts: Vec<String> = (1..=WHILE_AWAY)
        .map(|i| format!("while you were away {i}"))
        .collect();
    let ids: Vec<String> = texts
        .iter()
        .map(|text| {
            let sent = alex.ok(&["send", &charlie_at_alex, text]);
            assert_eq!(sent["status"], "queued", "acknowledged to Alex as queued");
            sent["message"].as_str().expect("message id").to_string()
        })
        .collect();
    let outbox = alex.ok(&["status"])["outbox"].as_u64().expect("outbox");
    assert!(
        outbox >= ids.len() as u64,
        "Alex's outbox holds them: {outbox}"
    );
    let statuses = || statuses_of(&alex.history(&charlie_at_alex), &ids);
    // Watched for a while: nothing can get through, however Alex retries.
    let cable_out = Instant::now();
    while cable_out.elapsed() < CABLE_OUT {
        assert_eq!(statuses(), ["queued"; WHILE_AWAY], "while the cable is out");
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "{:>5.1}s  Charlie's link down: Alex's {WHILE_AWAY} messages stayed queued \
         for {CABLE_OUT:?} (Alex's outbox: {outbox})",
        secs(started)
    );

    // The cable is back: everything arrives, each exactly once, in order.
    charlie_host.link_up();
    let back = Instant::now();
    wait_for(DELIVERY_LIMIT, || {
        (statuses() == ["delivered"; WHILE_AWAY]).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "not all delivered within {DELIVERY_LIMIT:?} of the link coming back: {:?}",
            statuses()
        )
    });
    let delivered_after = back.elapsed();
    // Charlie's node acknowledges once a message is stored, and files it in
    // the history just after.
    let received: Vec<Value> = wait_for(Duration::from_secs(10), || {
        let ours: Vec<Value> = charlie
            .history(&alex_at_charlie)
            .into_iter()
            .filter(|m| ids.iter().any(|id| m["id"] == id.as_str()))
            .collect();
        (ours.len() >= WHILE_AWAY).then_some(ours)
    })
    .expect("Charlie's history shows Alex's messages");
    let field = |name: &str| -> Vec<String> {
        received
            .iter()
            .map(|m| m[name].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(field("id"), ids, "each exactly once, in the order sent");
    assert_eq!(field("text"), texts);
    assert_eq!(field("status"), ["received"; WHILE_AWAY]);
    assert_eq!(field("from"), [alex_at_charlie.as_str(); WHILE_AWAY]);
    wait_for(Duration::from_secs(10), || {
        (alex.ok(&["status"])["outbox"] == 0).then_some(())
    })
    .expect("Alex's outbox empties");
    println!(
        "{:>5.1}s  Charlie's link up: all {WHILE_AWAY} delivered {:.1}s later, once each, in order",
        secs(started),
        delivered_after.as_secs_f64()
    );
}

fn secs(since: Instant) -> f64 {
    since.elapsed().as_secs_f64()
}

/// The peer ids the person's node is connected to (`status`'s "peers").
fn peers(person: &Person) -> BTreeSet<String> {
    person.ok(&["status"])["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str().map(String::from))
        .collect()
}

/// mDNS runs in the person's daemon (the node warns when it could not start).
fn assert_mdns_on(person: &Person) {
    let warnings = person.ok(&["status"])["warnings"].to_string();
    assert!(
        !warnings.contains("mDNS"),
        "{}'s mDNS is not running: {warnings}",
        person.name
    );
}

/// The person's daemon listens at `port` on the LAN, and no longer at the
/// port it had before.
fn assert_listens_on(person: &Person, port: u16) {
    let status = person.ok(&["status"]);
    let listen: Vec<&str> = status["listen"]
        .as_array()
        .expect("listen addresses")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        listen.iter().any(|a| a.ends_with(&format!("/tcp/{port}"))),
        "{}: {listen:?}",
        person.name
    );
    assert!(
        !listen
            .iter()
            .any(|a| a.ends_with(&format!("/tcp/{}", person.port))),
        "{}: {listen:?}",
        person.name
    );
}

/// The statuses of the messages `ids` in a history, in the order of `ids`.
fn statuses_of(history: &[Value], ids: &[String]) -> Vec<String> {
    ids.iter()
        .map(|id| {
            history
                .iter()
                .find(|m| m["id"] == id.as_str())
                .and_then(|m| m["status"].as_str())
                .unwrap_or("missing")
                .to_string()
        })
        .collect()
}

/// A port other than `old` (ports are per namespace, so any free one will do).
fn another_port(old: u16) -> u16 {
    loop {
        let port = harness::free_port();
        if port != old {
            return port;
        }
    }
}

/// The switch and its hosts. Every namespace is deleted when this drops.
struct Lan {
    hosts: Vec<Host>,
    /// Deleting it also removes the bridge and the switch's veth ends.
    switch: Netns,
}

/// One host: a namespace joined to the switch by a veth pair.
struct Host {
    person: String,
    ns: Netns,
    addr: Ipv4Addr,
}

impl Lan {
    /// Builds the LAN, one host per name; `None` where namespaces are not
    /// allowed. Panics (deleting what it made) if anything else fails.
    fn build(names: &[&str]) -> Option<Self> {
        let switch = Netns::new()?;
        let sw = &switch.name;
        // Snooping off: mDNS multicast reaches every port, whatever IGMP
        // memberships the bridge has (or has not yet) learned.
        ip(&format!(
            "-n {sw} link add {BRIDGE} type bridge mcast_snooping 0"
        ));
        ip(&format!("-n {sw} link set {BRIDGE} up"));
        let mut hosts = Vec::new();
        for (i, name) in (1u8..).zip(names) {
            let ns = Netns::new()?;
            let host = &ns.name;
            let addr = Ipv4Addr::new(LAN_PREFIX[0], LAN_PREFIX[1], LAN_PREFIX[2], i);
            let port = format!("to-{}", name.to_lowercase());
            // Both ends are made inside our namespaces: the switch's end
            // there, the host's end straight in the host's namespace.
            ip(&format!(
                "-n {sw} link add {port} type veth peer name {LINK} netns {host}"
            ));
            ip(&format!("-n {sw} link set {port} master {BRIDGE} up"));
            ip(&format!("-n {host} addr add {addr}/24 dev {LINK}"));
            let host = Host {
                person: name.to_string(),
                ns,
                addr,
            };
            host.link_up();
            hosts.push(host);
        }
        Some(Self { hosts, switch })
    }

    fn host(&self, person: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.person == person)
            .unwrap_or_else(|| panic!("no host for {person}"))
    }

    /// Starts `person`'s daemon in their host's namespace, listening on all
    /// of its interfaces at `port` (TCP and QUIC), with mDNS on.
    fn start(&self, person: &Person, port: u16) -> Daemon {
        let listen = [
            "--listen".to_string(),
            format!("/ip4/0.0.0.0/tcp/{port}"),
            "--listen".to_string(),
            format!("/ip4/0.0.0.0/udp/{port}/quic-v1"),
        ];
        Daemon::start(person, &listen, Some(&self.host(&person.name).ns.name))
    }
}

impl std::fmt::Display for Lan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "switch netns {}", self.switch.name)?;
        for h in &self.hosts {
            write!(f, "; {} {} (netns {})", h.person, h.addr, h.ns.name)?;
        }
        Ok(())
    }
}

impl Host {
    /// Pulls the cable: the host's end of its veth pair goes down.
    fn link_down(&self) {
        ip(&format!("-n {} link set {LINK} down", self.ns.name));
    }

    /// Plugs the cable in, with the multicast route mDNS needs. Taking a
    /// link down drops every route through it, so the route is made again
    /// each time.
    fn link_up(&self) {
        let ns = &self.ns.name;
        ip(&format!("-n {ns} link set {LINK} up"));
        ip(&format!("-n {ns} route replace 224.0.0.0/4 dev {LINK}"));
    }
}

/// Runs `ip COMMAND` (words separated by spaces), panicking with its error
/// if it fails or hangs.
fn ip(command: &str) {
    let mut child = Command::new("ip")
        .args(command.split_whitespace())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ip");
    let exited = wait_for(IP_TIMEOUT, || child.try_wait().expect("waiting for ip"));
    if exited.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("`ip {command}` did not finish within {IP_TIMEOUT:?}");
    }
    let out = child.wait_with_output().expect("ip's output");
    assert!(
        out.status.success(),
        "`ip {command}` failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
