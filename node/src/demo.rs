//! `protonode demo`: the story on real nodes on loopback.
//!
//! Each person gets a real node: its own temporary data directory and redb
//! file, its own libp2p swarm listening on 127.0.0.1 (TCP and QUIC), real
//! openmls groups. mDNS is off so the demo never reaches past this machine;
//! the addresses in tickets are enough. Everything is removed at the end.

use std::time::{Duration, Instant};

use actix::Addr;
use actors::manager::{
    AcceptInvite, Connect, CreateGroup, CreateInvite, GetHistory, GroupAction, GroupCommand,
    ListContacts, ListGroups, RelationshipManager, SendMessage,
};
use actors::runtime::Node;
use actors::store::Store;
use actors::views::{ContactView, GroupView, MessageView};
use anyhow::Context as _;
use serde_json::json;

/// How long the demo waits for any one delivery before giving up.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

struct Person {
    name: &'static str,
    node: Node,
    // Dropped (and removed) after the node stops.
    _dir: tempfile::TempDir,
}

impl Person {
    async fn start(name: &'static str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("protonode-demo-{}-", name.to_lowercase()))
            .tempdir()
            .context("creating a temporary data directory failed")?;
        let store = Store::open(&dir.path().join("protonode.redb"))?;
        let mut config = config::Config::new(name);
        config.network.mdns = false;
        config.network.listen = vec![
            "/ip4/127.0.0.1/tcp/0".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
        ];
        config.delivery.retry_initial_ms = 50;
        config.delivery.retry_max_ms = 1_000;
        let keypair = transports::identity::Keypair::generate_ed25519();
        let node = Node::start(store, config, keypair).await?;
        Ok(Self {
            name,
            node,
            _dir: dir,
        })
    }

    fn rm(&self) -> &Addr<RelationshipManager> {
        &self.node.manager
    }

    async fn contacts(&self) -> anyhow::Result<Vec<ContactView>> {
        Ok(self.rm().send(ListContacts).await??)
    }

    async fn send(&self, to: &str, text: &str) -> anyhow::Result<MessageView> {
        Ok(self
            .rm()
            .send(SendMessage {
                to: to.into(),
                text: text.into(),
                wait: Some(STEP_TIMEOUT),
            })
            .await??)
    }

    async fn history(&self, of: &str) -> anyhow::Result<Vec<MessageView>> {
        Ok(self.rm().send(GetHistory { of: of.into() }).await??)
    }
}

/// Prints a step (unless the output is JSON).
struct Narrator {
    json: bool,
    step: u32,
}

impl Narrator {
    fn step(&mut self, text: &str) {
        if !self.json {
            self.step += 1;
            println!("[{}] {}", self.step, text);
        }
    }

    fn detail(&self, text: &str) {
        if !self.json {
            println!("    {text}");
        }
    }
}

/// Runs the demo; returns a JSON summary (printed by the caller with `--json`).
pub fn run(json_output: bool) -> anyhow::Result<serde_json::Value> {
    let system = actix::System::new();
    system.block_on(story(json_output))
}

async fn story(json_output: bool) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    let mut say = Narrator {
        json: json_output,
        step: 0,
    };
    if !json_output {
        println!("protonode demo: the seed's story on real nodes on loopback, each with its own");
        println!("data directory, redb file and libp2p swarm (TCP and QUIC on 127.0.0.1).\n");
    }
    let alex = Person::start("Alex").await?;
    let blair = Person::start("Blair").await?;
    let charlie = Person::start("Charlie").await?;
    for p in [&alex, &blair, &charlie] {
        let addrs: Vec<String> = p
            .node
            .listen_addrs()
            .await
            .iter()
            .map(|a| a.to_string())
            .collect();
        say.step(&format!(
            "{}'s node is up: peer {}",
            p.name,
            p.node.peer_id()
        ));
        say.detail(&format!("listening on {}", addrs.join(" and ")));
    }

    // Figure 3.3.0: two independent relationships, AB and AC.
    let ticket = befriend(&mut say, &alex, &blair).await?;
    talk(
        &mut say,
        &[
            (&blair, "Alex", "Hi Alex! Got your invitation."),
            (
                &alex,
                "Blair",
                "Welcome, Blair. End-to-end encrypted with MLS.",
            ),
        ],
    )
    .await?;
    befriend(&mut say, &alex, &charlie).await?;
    let reuse = charlie.rm().send(AcceptInvite { ticket }).await?;
    say.step("Charlie tries to use Blair's ticket too:");
    let reuse_refused = reuse.is_err();
    match &reuse {
        Err(e) => say.detail(&format!("refused: {e}")),
        Ok(_) => say.detail("it was accepted, which must not happen"),
    }

    // Figure 3.3.1: Alex introduces Blair and Charlie.
    let group = alex
        .rm()
        .send(CreateGroup {
            contacts: vec!["Blair".into(), "Charlie".into()],
            name: Some("Trio".into()),
        })
        .await??;
    say.step("Alex introduces Blair and Charlie: a new group key for Alex (attested equivalent to");
    say.detail(
        "the key each of them knows), placeholder identities made for Blair and Charlie, and",
    );
    say.detail("addresses for them derived from theirs, so the group starts before they answer.");
    say.detail(&format!(
        "Group {} is at epoch {}. Blair's node, as soon as the introduction arrives:",
        group.id, group.epoch
    ));
    let pending = wait_for_group(&blair, |_| true).await?;
    roster(&say, &pending);
    alex.send("Trio", "Blair, Charlie: meet each other!")
        .await?;
    say.detail("Alex writes to the group at once: both placeholders receive it.");

    // Figure 3.3.2: both claim.
    for p in [&blair, &charlie] {
        p.rm()
            .send(GroupCommand {
                group: "Trio".into(),
                action: GroupAction::Claim,
            })
            .await??;
    }
    say.step("Blair and Charlie claim: each makes a fresh group key, attests to Alex (inside the");
    say.detail(
        "relationship) that it is equivalent to the key Alex knows, and replaces the placeholder",
    );
    say.detail("in one commit carrying \"new key follows placeholder\", ordered by Alex's node.");
    let mut views = Vec::new();
    for p in [&alex, &blair, &charlie] {
        let g = wait_for_group(p, |g| {
            g.members.iter().all(|m| m.status != "placeholder") && g.epoch >= 3
        })
        .await?;
        views.push(g);
    }
    for (p, g) in [&alex, &blair, &charlie].iter().zip(&views) {
        say.detail(&format!(
            "{}'s view (epoch {}, authenticator {}…):",
            p.name,
            g.epoch,
            &g.epoch_authenticator[..12]
        ));
        roster(&say, g);
    }
    let agree = views
        .windows(2)
        .all(|w| w[0].epoch_authenticator == w[1].epoch_authenticator);
    say.detail(if agree {
        "All three share one epoch authenticator."
    } else {
        "The views disagree, which must not happen."
    });
    say.detail(
        "Blair and Charlie see each other as claimed: no new trust that the other is not Alex.",
    );
    talk(
        &mut say,
        &[
            (
                &blair,
                "Trio",
                "Hi Charlie, Blair here, with my own key now.",
            ),
            (&charlie, "Trio", "Hi Blair! Hi Alex!"),
        ],
    )
    .await?;

    // Figure 3.3.3: a side relationship.
    let side = charlie
        .rm()
        .send(Connect {
            group: "Trio".into(),
            member: "Blair".into(),
        })
        .await??;
    say.step("Charlie starts a 1:1 relationship with Blair: a fresh ticket and its equivalence to");
    say.detail(
        "Charlie's group key, sealed to a key only Blair's group proton holds, sent straight",
    );
    say.detail(&format!(
        "to Blair's node. Alex is not on the path. New contact: {} ({}).",
        side.name, side.contact
    ));
    wait_for_contact_named(&blair, "Charlie").await?;
    talk(
        &mut say,
        &[
            (&charlie, "Blair", "Just between us."),
            (&blair, "Charlie", "Alex can't see this."),
        ],
    )
    .await?;
    let alex_contacts = alex.contacts().await?;
    say.detail(&format!(
        "Alex still has {} contacts: {}.",
        alex_contacts.len(),
        alex_contacts
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));

    let group_history = charlie.history("Trio").await?;
    say.step("The group as Charlie's node stored it:");
    for m in &group_history {
        say.detail(&format!(
            "  {}  {}: {}",
            &m.at[11..19.min(m.at.len())],
            author(&views[2], &m.from),
            m.text
        ));
    }

    let elapsed = started.elapsed();
    for p in [charlie, blair, alex] {
        p.node.stop().await;
    }
    if !json_output {
        println!("\nDone in {:.1} s. The nodes are stopped and their temporary data directories removed.", elapsed.as_secs_f64());
    }
    if !reuse_refused || !agree {
        anyhow::bail!(
            "the demo did not go as it should (reuse refused: {reuse_refused}, agreement: {agree})"
        );
    }
    Ok(json!({
        "reused_ticket_refused": reuse_refused,
        "group": views,
        "group_history": group_history,
        "seconds": elapsed.as_secs_f64(),
    }))
}

/// `inviter` invites `other`, who accepts; returns the (used) ticket.
async fn befriend(say: &mut Narrator, inviter: &Person, other: &Person) -> anyhow::Result<String> {
    let invite = inviter.rm().send(CreateInvite { ttl: None }).await??;
    say.step(&format!(
        "{} invites {}: a ticket of {} characters (a fresh key just for them, an MLS key package,",
        inviter.name,
        other.name,
        invite.ticket.len()
    ));
    say.detail(
        "TCP and QUIC transports with new delivery addresses, a one-time address for the answer).",
    );
    let accepted = other
        .rm()
        .send(AcceptInvite {
            ticket: invite.ticket.clone(),
        })
        .await??;
    say.detail(&format!(
        "{} accepts: a fresh key, a 2-member MLS group, the Welcome to the one-time address ({}).",
        other.name,
        if accepted.delivered {
            "acknowledged"
        } else {
            "queued"
        }
    ));
    wait_for_contact_named(inviter, other.name).await?;
    Ok(invite.ticket)
}

/// Each line sent and acknowledged, printed.
async fn talk(say: &mut Narrator, lines: &[(&Person, &str, &str)]) -> anyhow::Result<()> {
    say.step("They talk (each message acknowledged by the receiving nodes once durably stored):");
    for (from, to, text) in lines {
        let sent = from.send(to, text).await?;
        say.detail(&format!(
            "{} → {}: \"{}\" [{}]",
            from.name, to, text, sent.status
        ));
    }
    Ok(())
}

fn roster(say: &Narrator, g: &GroupView) {
    for m in &g.members {
        let by = m
            .introduced_by
            .as_ref()
            .map(|b| format!(" (introduced by {b})"))
            .unwrap_or_default();
        say.detail(&format!("  {:<8} {:<12}{}", m.name, m.status, by));
    }
}

fn author(g: &GroupView, from: &str) -> String {
    if from == "me" {
        return "me".into();
    }
    g.members
        .iter()
        .find(|m| m.id == from)
        .map(|m| m.name.clone())
        .unwrap_or_else(|| from.to_string())
}

/// Waits until `p` has a group that satisfies `ok`.
async fn wait_for_group(p: &Person, ok: impl Fn(&GroupView) -> bool) -> anyhow::Result<GroupView> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut events = p.node.subscribe();
    loop {
        let groups = p.rm().send(ListGroups).await??;
        if let Some(g) = groups.into_iter().find(|g| ok(g)) {
            return Ok(g);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            anyhow::bail!("{}'s group never got there", p.name);
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), events.recv()).await;
    }
}

/// Waits until `p` has an active contact called `name`.
async fn wait_for_contact_named(p: &Person, name: &str) -> anyhow::Result<ContactView> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut events = p.node.subscribe();
    loop {
        if let Some(c) = p
            .contacts()
            .await?
            .into_iter()
            .find(|c| c.name == name && c.state == "active")
        {
            return Ok(c);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            anyhow::bail!("{} never saw {name} as a contact", p.name);
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), events.recv()).await;
    }
}
