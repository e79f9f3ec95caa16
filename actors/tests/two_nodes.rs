//! Two real nodes on loopback in one process: real libp2p sockets, real
//! redb files, real openmls. Alex invites, Blair accepts, they talk.

use std::time::Duration;

use actors::manager::{AcceptInvite, CreateInvite, GetHistory, ListContacts, SendMessage};
use actors::runtime::Node;
use actors::store::Store;
use actors::views::Event;
use tokio::sync::broadcast;

const WAIT: Duration = Duration::from_secs(20);

struct TestNode {
    _dir: tempfile::TempDir,
    node: Node,
}

impl TestNode {
    async fn history_of(&self, of: &str) -> Vec<actors::views::MessageView> {
        self.node
            .manager
            .send(GetHistory { of: of.into() })
            .await
            .unwrap()
            .unwrap()
    }
}

async fn start(name: &str) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db")).unwrap();
    let mut config = config::Config::new(name);
    config.network.mdns = false;
    config.network.listen = vec![
        "/ip4/127.0.0.1/tcp/0".into(),
        "/ip4/127.0.0.1/udp/0/quic-v1".into(),
    ];
    config.delivery.retry_initial_ms = 50;
    config.delivery.retry_max_ms = 500;
    let node = Node::start(
        store,
        config,
        transports::identity::Keypair::generate_ed25519(),
    )
    .await
    .unwrap();
    TestNode { _dir: dir, node }
}

async fn next_message(events: &mut broadcast::Receiver<Event>) -> (String, String) {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event::Message {
                conversation,
                message,
                ..
            }) = events.recv().await
            {
                return (conversation, message.text);
            }
        }
    })
    .await
    .expect("a message arrives in time")
}

#[actix_rt::test]
async fn alex_invites_blair_and_they_talk_both_ways() {
    let alex = start("Alex").await;
    let blair = start("Blair").await;
    let mut alex_events = alex.node.subscribe();
    let mut blair_events = blair.node.subscribe();

    let invite = alex
        .node
        .manager
        .send(CreateInvite { ttl: None })
        .await
        .unwrap()
        .unwrap();
    assert!(invite.ticket.starts_with("protonode:"));
    let accepted = blair
        .node
        .manager
        .send(AcceptInvite {
            ticket: invite.ticket.clone(),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(accepted.name, "Alex");
    assert!(accepted.delivered, "Alex's node acknowledged the answer");

    // The same ticket again, by someone else: Alex's node refuses it.
    let charlie = start("Charlie").await;
    let refused = charlie
        .node
        .manager
        .send(AcceptInvite {
            ticket: invite.ticket.clone(),
        })
        .await
        .unwrap();
    assert!(
        matches!(refused, Err(actors::manager::Error::TicketRefused)),
        "{refused:?}"
    );
    let charlie_contacts = charlie
        .node
        .manager
        .send(ListContacts)
        .await
        .unwrap()
        .unwrap();
    assert!(
        charlie_contacts.is_empty(),
        "a refused acceptance leaves nothing behind"
    );

    let sent = blair
        .node
        .manager
        .send(SendMessage {
            to: "Alex".into(),
            text: "hi Alex".into(),
            wait: Some(WAIT),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sent.status, "delivered");
    // Delivered means stored at Alex's node; Alex's history has it at
    // once, also if his node has not processed it yet.
    let history = alex.history_of("Blair").await;
    let texts: Vec<&str> = history.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["hi Alex"]);
    let (_, text) = next_message(&mut alex_events).await;
    assert_eq!(text, "hi Alex");

    alex.node
        .manager
        .send(SendMessage {
            to: "blair".into(),
            text: "hi Blair".into(),
            wait: None,
        })
        .await
        .unwrap()
        .unwrap();
    let (_, text) = next_message(&mut blair_events).await;
    assert_eq!(text, "hi Blair");

    let history = alex.history_of("Blair").await;
    let texts: Vec<&str> = history.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["hi Alex", "hi Blair"]);
    assert_eq!(history[0].status, "received");
    assert_eq!(
        history[0].id, sent.id,
        "both sides know the message by one id"
    );

    let contacts = alex.node.manager.send(ListContacts).await.unwrap().unwrap();
    assert_eq!(contacts.len(), 1);
    assert_eq!(contacts[0].name, "Blair");
    assert_eq!(contacts[0].state, "active");

    charlie.node.stop().await;
    blair.node.stop().await;
    alex.node.stop().await;
}
