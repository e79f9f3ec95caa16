//! `protonode demo`: the story on real nodes on loopback.
//!
//! Each person gets a real node: its own temporary data directory and redb
//! file, its own libp2p swarm listening on 127.0.0.1 (TCP and QUIC), real
//! openmls groups. mDNS is off so the demo never reaches past this machine;
//! the addresses in tickets are enough. Everything is removed at the end.

use std::time::{Duration, Instant};

use actix::Addr;
use actors::manager::{
    AcceptInvite, AcceptMerge, Connect, CreateGroup, CreateInvite, GetHistory, GroupAction,
    GroupCommand, Link, ListAllContacts, ListContacts, ListGroups, ListMerges, RelationshipManager,
    RequestMerge, SendMessage,
};
use actors::runtime::Node;
use actors::store::Store;
use actors::views::{ContactView, GroupView, MergeView, MessageView};
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

    async fn contact_ids(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .rm()
            .send(ListAllContacts)
            .await??
            .into_iter()
            .map(|c| c.id)
            .collect())
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
            let _ = crate::say!("[{}] {}", self.step, text);
        }
    }

    fn detail(&self, text: &str) {
        if !self.json {
            let _ = crate::say!("    {text}");
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
        let _ = crate::say!(
            "protonode demo: the seed's story on real nodes on loopback, each with its own"
        );
        let _ = crate::say!(
            "data directory, redb file and libp2p swarm (TCP and QUIC on 127.0.0.1).\n"
        );
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
    let (ticket, alex_blair, _) = befriend(&mut say, &alex, &blair).await?;
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
        &[],
    )
    .await?;
    let (_, alex_charlie, _) = befriend(&mut say, &alex, &charlie).await?;
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
            contacts: vec![alex_blair.clone(), alex_charlie.clone()],
            name: Some("Trio".into()),
        })
        .await??;
    say.step("Alex introduces Blair and Charlie: a new group key for Alex (attested equivalent to");
    say.detail(
        "the key each of them knows), placeholder identities made for Blair and Charlie, and",
    );
    say.detail("addresses for them derived from theirs, so the group starts before they answer.");
    say.detail(&format!(
        "Alex's node calls the group {} (each node names groups and contacts with ids of its",
        group.id
    ));
    say.detail(&format!(
        "own); it is at epoch {}. Blair's node, as soon as the introduction arrives:",
        group.epoch
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
        &[],
    )
    .await?;

    // Figure 3.3.3: a side relationship.
    let blair_before = blair.contact_ids().await?;
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
    let blair_via_alex = wait_for_new_contact(&blair, &blair_before).await?;
    let charlie_via_alex = side.contact.clone();
    talk(
        &mut say,
        &[
            (&charlie, "Blair", "Just between us."),
            (&blair, "Charlie", "Alex can't see this."),
        ],
        &[],
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

    // Figures 3.3.4 and 3.3.5: Dani introduces them too; Charlie merges.
    let dani = Person::start("Dani").await?;
    let (_, dani_blair, _) = befriend(&mut say, &dani, &blair).await?;
    let (_, dani_charlie, _) = befriend(&mut say, &dani, &charlie).await?;
    let (blair_via_dani, charlie_via_dani) = introduce_and_connect(
        &dani,
        (&blair, &dani_blair),
        (&charlie, &dani_charlie),
        "Via Dani",
    )
    .await?;
    say.step("Dani, a friend of both, introduces them too; they claim and connect on the side");
    say.detail("again. Blair and Charlie now hold two parallel relationships, each with its");
    say.detail("provenance:");
    for c in blair.contacts().await? {
        if c.name == "Charlie" {
            say.detail(&format!("  Blair's {} \"Charlie\": {}", c.id, c.origin));
        }
    }
    talk(
        &mut say,
        &[
            (&charlie, charlie_via_dani.as_str(), "Dani says hi too!"),
            (&blair, blair_via_dani.as_str(), "Small world."),
        ],
        &[
            "Blair (the relationship via Dani)",
            "Charlie (the relationship via Dani)",
        ],
    )
    .await?;
    blair
        .rm()
        .send(Link {
            a: blair_via_alex.id.clone(),
            b: blair_via_dani.clone(),
            force: false,
        })
        .await??;
    say.step("Blair records that both are her towards Charlie (`protonode link`): her two keys,");
    say.detail("attested equivalent, kept by her relationship manager.");
    let asked = charlie
        .rm()
        .send(RequestMerge {
            a: charlie_via_alex.clone(),
            b: charlie_via_dani.clone(),
            force: false,
        })
        .await??;
    say.step(
        "Charlie asks to merge (`protonode merge request`): his two keys attested equivalent,",
    );
    say.detail(
        "each followed by a new key P_C, with a ticket for it, sent inside both relationships.",
    );
    let request = wait_for_merge(&blair).await?;
    say.detail(&format!(
        "Blair's node checks the keys it names against her own: they match. A {} waits: {}.",
        request.kind, request.id
    ));
    let merged = blair
        .rm()
        .send(AcceptMerge {
            id: request.id.clone(),
        })
        .await??;
    say.step(
        "Blair consents (`protonode merge accept`): her new key P_B follows both of hers; the",
    );
    say.detail(
        "old relationships retire and the histories merge, in the order each node had them.",
    );
    let charlie_merged = wait_for_contacts_named(&charlie, "Blair", 1).await?;
    let mut merged_views = Vec::new();
    for (p, name) in [(&blair, "Charlie"), (&charlie, "Blair")] {
        let live = p.contacts().await?;
        let all = p.rm().send(ListAllContacts).await??;
        say.detail(&format!(
            "{}: {} live relationship(s) with {name}, {} retired; the merged history:",
            p.name,
            live.iter().filter(|c| c.name == name).count(),
            all.iter().filter(|c| c.retired).count()
        ));
        let history = p.history(name).await?;
        for m in &history {
            say.detail(&format!(
                "  {}  {}: {}",
                &m.at[11..19.min(m.at.len())],
                if m.from == "me" { p.name } else { name },
                m.text
            ));
        }
        merged_views.push(json!({ "person": p.name, "history": history }));
    }
    let merged_ok = merged.delivered
        && charlie_merged.len() == 1
        && asked.direction == "sent"
        && merged_views
            .iter()
            .all(|v| v["history"].as_array().map_or(0, Vec::len) == 4);

    for p in [dani, charlie, blair, alex] {
        p.node.stop().await;
    }

    // Figure 3.3.6: a meddling introducer, caught.
    let caught = meddler_act(&mut say).await?;

    let elapsed = started.elapsed();
    if !json_output {
        let _ = crate::say!("\nDone in {:.1} s. The nodes are stopped and their temporary data directories removed.", elapsed.as_secs_f64());
    }
    if !reuse_refused || !agree || !merged_ok || !caught {
        anyhow::bail!(
            "the demo did not go as it should (reuse refused: {reuse_refused}, agreement: {agree}, merged: {merged_ok}, meddler caught: {caught})"
        );
    }
    Ok(json!({
        "reused_ticket_refused": reuse_refused,
        "group": views,
        "group_history": group_history,
        "merged": merged_views,
        "meddler_caught": caught,
        "seconds": elapsed.as_secs_f64(),
    }))
}

/// The second act: Alex, asked to introduce Blair and Charlie, puts two
/// nodes of his own in the middle, one calling itself Charlie and one
/// calling itself Blair. Dani introduces them honestly. Charlie's merge
/// request shows Blair's node the mismatch. Returns whether it was caught.
async fn meddler_act(say: &mut Narrator) -> anyhow::Result<bool> {
    say.step("Second act, with a new cast. This time Alex meddles: asked to introduce Blair and");
    say.detail("Charlie, he introduces Blair to a node of his own that calls itself Charlie, and");
    say.detail("Charlie to one that calls itself Blair, to relay between them (figure 3.3.6).");
    let alex = Person::start("Alex").await?;
    let blair = Person::start("Blair").await?;
    let charlie = Person::start("Charlie").await?;
    let dani = Person::start("Dani").await?;
    let fake_charlie = Person::start("Charlie").await?;
    let fake_blair = Person::start("Blair").await?;
    let quiet = &mut Narrator {
        json: true,
        step: 0,
    };
    let (_, ab, _) = befriend(quiet, &alex, &blair).await?;
    let (_, ac, _) = befriend(quiet, &alex, &charlie).await?;
    let (_, a_fc, _) = befriend(quiet, &alex, &fake_charlie).await?;
    let (_, a_fb, _) = befriend(quiet, &alex, &fake_blair).await?;
    let (_, db, _) = befriend(quiet, &dani, &blair).await?;
    let (_, dc, _) = befriend(quiet, &dani, &charlie).await?;
    let (blair_via_alex, _) =
        introduce_and_connect(&alex, (&blair, &ab), (&fake_charlie, &a_fc), "Meet Charlie").await?;
    let (_, charlie_via_alex) =
        introduce_and_connect(&alex, (&fake_blair, &a_fb), (&charlie, &ac), "Meet Blair").await?;
    let (_, charlie_via_dani) =
        introduce_and_connect(&dani, (&blair, &db), (&charlie, &dc), "Via Dani").await?;
    say.detail("Blair and Charlie each hold a relationship \"via Alex\" (with Alex's nodes) and");
    say.detail("one via Dani (with each other). Nothing looks wrong to either of them yet.");
    charlie
        .rm()
        .send(RequestMerge {
            a: charlie_via_alex,
            b: charlie_via_dani,
            force: false,
        })
        .await??;
    say.step("Charlie asks to merge his two relationships with \"Blair\". Through Dani's, Blair's");
    say.detail("node reads that Charlie's other one is with a key that is not Blair's:");
    let flagged = wait_for_merge(&blair).await?;
    let contacts = blair.rm().send(ListAllContacts).await??;
    let mut caught = flagged.state == "flagged";
    for c in contacts.iter().filter(|c| c.trust == "flagged") {
        say.detail(&format!(
            "  FLAGGED {} ({}): {}",
            c.name,
            c.id,
            c.reason.as_deref().unwrap_or("")
        ));
    }
    caught &= contacts
        .iter()
        .any(|c| c.id == blair_via_alex && c.trust == "flagged")
        && contacts
            .iter()
            .any(|c| c.name == "Alex" && c.trust == "flagged")
        && contacts.iter().all(|c| !c.retired);
    say.detail(
        "The relationship from Alex's introduction is not merged; `protonode status` warns.",
    );
    say.detail("Only if Dani colluded with Alex would this go unseen.");
    for p in [fake_blair, fake_charlie, dani, charlie, blair, alex] {
        p.node.stop().await;
    }
    Ok(caught)
}

/// `inviter` invites `other`, who accepts. Returns the (used) ticket and
/// the contact ids at the inviter and at `other`.
async fn befriend(
    say: &mut Narrator,
    inviter: &Person,
    other: &Person,
) -> anyhow::Result<(String, String, String)> {
    let before = inviter.contact_ids().await?;
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
    let ours = wait_for_new_contact(inviter, &before).await?;
    Ok((invite.ticket, ours.id, accepted.contact))
}

/// `introducer` introduces `b` and `c` (their contact ids at the
/// introducer); both claim; `c` connects to `b` on the side. Returns the
/// side relationship's contact ids at `b` and at `c`.
async fn introduce_and_connect(
    introducer: &Person,
    (b, b_id): (&Person, &str),
    (c, c_id): (&Person, &str),
    group: &str,
) -> anyhow::Result<(String, String)> {
    introducer
        .rm()
        .send(CreateGroup {
            contacts: vec![b_id.into(), c_id.into()],
            name: Some(group.into()),
        })
        .await??;
    for p in [b, c] {
        wait_for_group(p, |g| g.name.as_deref() == Some(group)).await?;
        p.rm()
            .send(GroupCommand {
                group: group.into(),
                action: GroupAction::Claim,
            })
            .await??;
    }
    for p in [introducer, b, c] {
        wait_for_group(p, |g| {
            g.name.as_deref() == Some(group)
                && !g.pending
                && g.members.len() == 3
                && g.members.iter().all(|m| m.status != "placeholder")
        })
        .await?;
    }
    let before = b.contact_ids().await?;
    let side = c
        .rm()
        .send(Connect {
            group: group.into(),
            member: b.name.into(),
        })
        .await??;
    let at_b = wait_for_new_contact(b, &before).await?;
    Ok((at_b.id, side.contact))
}

/// Each line sent and acknowledged, printed.
/// `labels`, when given, name the recipients (where `to` is an id).
async fn talk(
    say: &mut Narrator,
    lines: &[(&Person, &str, &str)],
    labels: &[&str],
) -> anyhow::Result<()> {
    say.step("They talk (each message acknowledged by the receiving nodes once durably stored):");
    for (i, (from, to, text)) in lines.iter().enumerate() {
        let sent = from.send(to, text).await?;
        say.detail(&format!(
            "{} → {}: \"{}\" [{}]",
            from.name,
            labels.get(i).unwrap_or(to),
            text,
            sent.status
        ));
    }
    Ok(())
}

fn roster(say: &Narrator, g: &GroupView) {
    for m in &g.members {
        // As `protonode groups` says it: a placeholder is its introducer's
        // word, and maybe its key.
        let by = match (m.status, &m.introduced_by) {
            ("placeholder", _) if m.introduced_by_me => {
                " (as asserted by you, who hold its key)".to_string()
            }
            ("placeholder", Some(b)) => format!(" (as asserted by {b}, who may hold its key)"),
            (_, Some(b)) => format!(" (introduced by {b})"),
            (_, None) => String::new(),
        };
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

/// Waits until `p` has exactly `n` live contacts called `name`.
async fn wait_for_contacts_named(
    p: &Person,
    name: &str,
    n: usize,
) -> anyhow::Result<Vec<ContactView>> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut events = p.node.subscribe();
    loop {
        let named: Vec<ContactView> = p
            .contacts()
            .await?
            .into_iter()
            .filter(|c| c.name == name && c.state == "active")
            .collect();
        if named.len() == n {
            return Ok(named);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            anyhow::bail!("{} never had {n} contact(s) called {name}", p.name);
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), events.recv()).await;
    }
}

/// Waits until `p` has an active contact not among `before`.
async fn wait_for_new_contact(p: &Person, before: &[String]) -> anyhow::Result<ContactView> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut events = p.node.subscribe();
    loop {
        if let Some(c) = p
            .contacts()
            .await?
            .into_iter()
            .find(|c| !before.contains(&c.id) && c.state == "active")
        {
            return Ok(c);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            anyhow::bail!("{} never saw the new contact", p.name);
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), events.recv()).await;
    }
}

/// Waits until `p` holds a merge request from someone else.
async fn wait_for_merge(p: &Person) -> anyhow::Result<MergeView> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut events = p.node.subscribe();
    loop {
        let merges = p.rm().send(ListMerges).await??;
        if let Some(m) = merges.into_iter().find(|m| m.direction == "received") {
            return Ok(m);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            anyhow::bail!("{} never received the merge request", p.name);
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), events.recv()).await;
    }
}
