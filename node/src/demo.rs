//! `protonode demo`: the story on real nodes on loopback.
//!
//! Each person gets a real node: its own temporary data directory and redb
//! file, its own libp2p swarm listening on 127.0.0.1 (TCP and QUIC), real
//! openmls groups. mDNS is off so the demo never reaches past this machine;
//! the addresses in tickets are enough. Everything is removed at the end.

use std::time::{Duration, Instant};

use actix::Addr;
use actors::manager::{
    AcceptInvite, CreateInvite, GetHistory, ListContacts, RelationshipManager, SendMessage,
};
use actors::runtime::Node;
use actors::store::Store;
use actors::views::{ContactView, MessageView};
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
        println!("protonode demo: real nodes on loopback, each with its own data directory, redb file and libp2p swarm.\n");
    }

    let alex = Person::start("Alex").await?;
    let blair = Person::start("Blair").await?;
    for p in [&alex, &blair] {
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

    let invite = alex.rm().send(CreateInvite { ttl: None }).await??;
    say.step(&format!(
        "Alex makes an invitation ticket ({} characters, valid until {}):",
        invite.ticket.len(),
        invite.expires_at
    ));
    say.detail(&format!(
        "{}…{}",
        &invite.ticket[..48.min(invite.ticket.len())],
        &invite.ticket[invite.ticket.len().saturating_sub(12)..]
    ));
    say.detail(
        "It carries a fresh identity key (just for Blair), an MLS key package, two transports",
    );
    say.detail(
        "(TCP and QUIC) with new delivery addresses, and a one-time address for the answer.",
    );

    let accepted = blair
        .rm()
        .send(AcceptInvite {
            ticket: invite.ticket.clone(),
        })
        .await??;
    say.step("Blair accepts: a fresh key of her own, a 2-member MLS group, and the Welcome");
    say.detail(&format!(
        "sent to the ticket's one-time address; Alex's node {} it.",
        if accepted.delivered {
            "acknowledged"
        } else {
            "has not yet acknowledged"
        }
    ));
    let alex_sees = wait_for_contact(&alex).await?;
    let blair_sees = blair.contacts().await?;
    say.detail(&format!(
        "Alex now has contact {} \"{}\" (key fingerprint {}).",
        alex_sees.id, alex_sees.name, alex_sees.fingerprint
    ));
    if let Some(c) = blair_sees.first() {
        say.detail(&format!(
            "Blair now has contact {} \"{}\" (key fingerprint {}).",
            c.id, c.name, c.fingerprint
        ));
    }

    let lines = [
        (&blair, "Alex", "Hi Alex! Got your invitation."),
        (
            &alex,
            "Blair",
            "Hi Blair, welcome. This is end-to-end encrypted with MLS.",
        ),
        (
            &blair,
            "Alex",
            "And every message is acknowledged only once it is stored.",
        ),
    ];
    say.step("They talk; each message is acknowledged by the other node only after it is durably stored:");
    for (from, to, text) in lines {
        let sent = from.send(to, text).await?;
        say.detail(&format!(
            "{} → {}: \"{}\" [{}]",
            from.name, to, text, sent.status
        ));
    }

    let charlie = Person::start("Charlie").await?;
    let reuse = charlie
        .rm()
        .send(AcceptInvite {
            ticket: invite.ticket.clone(),
        })
        .await?;
    say.step("Charlie tries to use the same ticket:");
    let reuse_refused = match &reuse {
        Err(e) => {
            say.detail(&format!("refused: {e}"));
            true
        }
        Ok(_) => {
            say.detail("it was accepted, which must not happen");
            false
        }
    };

    let alex_history = alex.history("Blair").await?;
    let blair_history = blair.history("Alex").await?;
    say.step("Both histories, as each node stored them:");
    for (who, history) in [("Alex", &alex_history), ("Blair", &blair_history)] {
        say.detail(&format!("{who}'s node:"));
        for m in history {
            let from = if m.from == "me" {
                who
            } else if who == "Alex" {
                "Blair"
            } else {
                "Alex"
            };
            say.detail(&format!(
                "  {}  {}: {} [{}]",
                &m.at[..19.min(m.at.len())],
                from,
                m.text,
                m.status
            ));
        }
    }
    let same_ids = alex_history
        .iter()
        .map(|m| &m.id)
        .eq(blair_history.iter().map(|m| &m.id));

    let elapsed = started.elapsed();
    charlie.node.stop().await;
    blair.node.stop().await;
    alex.node.stop().await;
    if !json_output {
        println!(
            "\nDone in {:.1} s. The nodes are stopped and their temporary data directories removed.",
            elapsed.as_secs_f64()
        );
    }
    if !reuse_refused || !same_ids {
        anyhow::bail!("the demo did not go as it should (reuse refused: {reuse_refused}, same history: {same_ids})");
    }
    Ok(json!({
        "ticket_chars": invite.ticket.len(),
        "alex_history": alex_history,
        "blair_history": blair_history,
        "reused_ticket_refused": reuse_refused,
        "seconds": elapsed.as_secs_f64(),
    }))
}

/// Alex's node learns of Blair when the answer is processed, just after
/// acknowledging it.
async fn wait_for_contact(p: &Person) -> anyhow::Result<ContactView> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut events = p.node.subscribe();
    loop {
        if let Some(c) = p.contacts().await?.into_iter().next() {
            return Ok(c);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            anyhow::bail!("{} never saw the new contact", p.name);
        }
        let _ = tokio::time::timeout(left, events.recv()).await;
    }
}
