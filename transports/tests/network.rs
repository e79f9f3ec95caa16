//! Two real nodes on loopback deliver envelopes to each other.
//!
//! Every node listens on 127.0.0.1 only, with mDNS off, and every wait is
//! under [`WAIT`].

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use transports::identity::Keypair;
use transports::{
    spawn, Client, DeliveryAddress, DeliveryError, DeliveryResponse, Envelope, Error, Event,
    InboundBatch, Multiaddr, PeerId, Receipt, Refusal, MAX_FRAME_BYTES,
};

/// The longest any single step may take.
const WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug)]
enum Via {
    Tcp,
    Quic,
}

struct Node {
    client: Client,
    events: mpsc::Receiver<Event>,
    task: JoinHandle<()>,
    tcp: Multiaddr,
    quic: Multiaddr,
}

impl Node {
    async fn start() -> Node {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let config = config::Network {
            listen: vec![
                "/ip4/127.0.0.1/tcp/0".into(),
                "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            ],
            mdns: false,
            // Short, so that a test of a peer that never answers ends quickly.
            request_timeout_secs: 5,
            ..Default::default()
        };
        let (client, events, task) = within(spawn(&config, Keypair::generate_ed25519()))
            .await
            .unwrap();
        let status = within(client.status()).await.unwrap();
        let find = |transport: &str| {
            status
                .listen_addrs
                .iter()
                .find(|a| a.to_string().contains(transport))
                .cloned()
                .unwrap_or_else(|| panic!("no {transport} address in {:?}", status.listen_addrs))
        };
        Node {
            tcp: find("/tcp/"),
            quic: find("/quic-v1"),
            client,
            events,
            task,
        }
    }

    /// This node's one address on the transport `via`.
    fn addr(&self, via: Via) -> Multiaddr {
        match via {
            Via::Tcp => self.tcp.clone(),
            Via::Quic => self.quic.clone(),
        }
    }

    fn peer_id(&self) -> PeerId {
        self.client.peer_id()
    }

    /// The next event `pick` accepts; other events are dropped (an inbound
    /// batch dropped this way is answered `Unavailable` by the event loop).
    async fn next_event<T>(&mut self, mut pick: impl FnMut(Event) -> Option<T>) -> T {
        within(async {
            loop {
                match self.events.recv().await {
                    Some(event) => {
                        if let Some(picked) = pick(event) {
                            return picked;
                        }
                    }
                    None => panic!("the event stream ended"),
                }
            }
        })
        .await
    }

    async fn next_inbound(&mut self) -> InboundBatch {
        self.next_event(|event| match event {
            Event::Inbound(batch) => Some(batch),
            _ => None,
        })
        .await
    }
}

/// Runs `future` under [`WAIT`], failing the test if it takes longer.
async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .expect("timed out waiting")
}

fn letters(count: usize) -> Vec<Envelope> {
    (0..count)
        .map(|i| {
            Envelope::new(
                DeliveryAddress::random(),
                format!("letter {i}").into_bytes(),
            )
        })
        .collect()
}

/// What Blair saw of a batch: who sent it and what it held.
struct Seen {
    peer: PeerId,
    envelopes: Vec<Envelope>,
}

/// Alex delivers `envelopes` to Blair knowing only her address `via`; Blair answers with
/// `receipts`. Returns what Alex got back and what Blair saw.
async fn deliver_and_answer(
    alex: &Node,
    blair: &mut Node,
    via: Via,
    envelopes: Vec<Envelope>,
    receipts: Vec<Receipt>,
) -> (Result<Vec<Receipt>, DeliveryError>, Seen) {
    let sending = {
        let client = alex.client.clone();
        let (peer, addrs) = (blair.peer_id(), vec![blair.addr(via)]);
        tokio::spawn(async move { client.deliver(peer, addrs, &envelopes).await })
    };
    let batch = blair.next_inbound().await;
    let seen = Seen {
        peer: batch.peer,
        envelopes: batch.envelopes.clone(),
    };
    batch.respond(receipts);
    let result = within(sending).await.unwrap();
    (result, seen)
}

async fn delivers_a_batch_over(via: Via) {
    let alex = Node::start().await;
    let mut blair = Node::start().await;
    let envelopes = letters(3);
    let answers = vec![
        Receipt::Stored,
        Receipt::Duplicate,
        Receipt::Refused(Refusal::UnknownAddress),
    ];

    let (receipts, seen) =
        deliver_and_answer(&alex, &mut blair, via, envelopes.clone(), answers.clone()).await;

    assert_eq!(receipts.unwrap(), answers);
    assert_eq!(seen.peer, alex.peer_id());
    assert_eq!(seen.envelopes, envelopes);
}

#[tokio::test(flavor = "multi_thread")]
async fn alex_delivers_a_batch_to_blair_knowing_only_her_tcp_address() {
    delivers_a_batch_over(Via::Tcp).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn alex_delivers_a_batch_to_blair_knowing_only_her_quic_address() {
    delivers_a_batch_over(Via::Quic).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_is_refused_as_malformed_and_blair_stays_up() {
    let alex = Node::start().await;
    let mut blair = Node::start().await;

    let answer = within(alex.client.deliver_raw(
        blair.peer_id(),
        vec![blair.tcp.clone()],
        b"\x01 not a batch".to_vec(),
    ))
    .await;
    assert_eq!(
        answer.unwrap(),
        DeliveryResponse::Rejected(Refusal::Malformed)
    );

    let (peer, refusal) = blair
        .next_event(|event| match event {
            Event::InvalidFrame { peer, refusal } => Some((peer, refusal)),
            _ => None,
        })
        .await;
    assert_eq!((peer, refusal), (alex.peer_id(), Refusal::Malformed));

    let (receipts, _) = deliver_and_answer(
        &alex,
        &mut blair,
        Via::Tcp,
        letters(1),
        vec![Receipt::Stored],
    )
    .await;
    assert_eq!(receipts.unwrap(), vec![Receipt::Stored]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversize_frame_is_refused_and_blair_stays_up() {
    let alex = Node::start().await;
    let mut blair = Node::start().await;

    let answer = within(alex.client.deliver_raw(
        blair.peer_id(),
        vec![blair.tcp.clone()],
        vec![0; MAX_FRAME_BYTES + 1],
    ))
    .await;
    // Blair answers `Rejected(TooLarge)` without reading the body; whether
    // Alex, still writing it, reads that answer or sees her stream fail
    // depends on the muxer. Either way it is not accepted.
    match answer {
        Ok(DeliveryResponse::Rejected(Refusal::TooLarge)) | Err(_) => {}
        Ok(other) => panic!("an oversize frame got {other:?}"),
    }
    let refusal = blair
        .next_event(|event| match event {
            Event::InvalidFrame { refusal, .. } => Some(refusal),
            _ => None,
        })
        .await;
    assert_eq!(refusal, Refusal::TooLarge);

    let (receipts, _) = deliver_and_answer(
        &alex,
        &mut blair,
        Via::Tcp,
        letters(2),
        vec![Receipt::Stored, Receipt::Stored],
    )
    .await;
    assert_eq!(receipts.unwrap(), vec![Receipt::Stored, Receipt::Stored]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_dropped_unanswered_tells_alex_to_retry() {
    let alex = Node::start().await;
    let mut blair = Node::start().await;

    let sending = {
        let client = alex.client.clone();
        let (peer, addrs) = (blair.peer_id(), vec![blair.tcp.clone()]);
        tokio::spawn(async move { client.deliver(peer, addrs, &letters(3)).await })
    };
    drop(blair.next_inbound().await);

    let receipts = within(sending).await.unwrap().unwrap();
    assert_eq!(receipts, vec![Receipt::Refused(Refusal::Unavailable); 3]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_number_of_receipts_is_fixed_up_for_alex() {
    let alex = Node::start().await;
    let mut blair = Node::start().await;

    let (receipts, _) = deliver_and_answer(
        &alex,
        &mut blair,
        Via::Tcp,
        letters(3),
        vec![Receipt::Stored],
    )
    .await;

    let unavailable = Receipt::Refused(Refusal::Unavailable);
    assert_eq!(
        receipts.unwrap(),
        vec![Receipt::Stored, unavailable, unavailable]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_stopped_reading_events_asks_senders_to_retry() {
    let alex = Node::start().await;
    let blair = Node::start().await;
    let Node {
        client: blair_client,
        events,
        tcp,
        ..
    } = blair;
    drop(events);

    let answer = within(
        alex.client
            .deliver(blair_client.peer_id(), vec![tcp], &letters(1)),
    )
    .await;

    assert!(
        matches!(answer, Err(DeliveryError::Rejected(Refusal::Unavailable))),
        "{answer:?}"
    );
    assert!(answer.unwrap_err().is_transient());
}

#[tokio::test(flavor = "multi_thread")]
async fn delivering_where_nothing_listens_fails_to_dial() {
    let alex = Node::start().await;
    // A port that was free a moment ago and is closed now.
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let nowhere: Multiaddr = format!("/ip4/127.0.0.1/tcp/{closed_port}").parse().unwrap();

    let answer = within(
        alex.client
            .deliver(PeerId::random(), vec![nowhere.clone()], &letters(1)),
    )
    .await;
    assert!(
        matches!(answer, Err(DeliveryError::Dial(_) | DeliveryError::Timeout)),
        "{answer:?}"
    );

    let dialed = within(alex.client.dial(PeerId::random(), vec![nowhere])).await;
    assert!(matches!(dialed, Err(DeliveryError::Dial(_))), "{dialed:?}");

    // Nor to itself.
    let answer = within(
        alex.client
            .deliver(alex.peer_id(), vec![alex.tcp.clone()], &letters(1)),
    )
    .await;
    assert!(matches!(answer, Err(DeliveryError::Dial(_))), "{answer:?}");

    // And with no address at all.
    let answer = within(alex.client.deliver(PeerId::random(), vec![], &letters(1))).await;
    assert!(matches!(answer, Err(DeliveryError::Dial(_))), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_over_the_limits_is_refused_before_sending() {
    let alex = Node::start().await;
    let blair = Node::start().await;

    let answer = within(
        alex.client
            .deliver(blair.peer_id(), vec![blair.tcp.clone()], &[]),
    )
    .await;

    assert!(
        matches!(answer, Err(DeliveryError::Encode(_))),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn after_shutdown_every_call_says_stopped() {
    let alex = Node::start().await;
    let Node {
        client,
        mut events,
        task,
        ..
    } = alex;
    let other_handle = client.clone();

    within(client.shutdown()).await;
    within(task).await.unwrap();

    assert!(matches!(
        within(other_handle.status()).await,
        Err(Error::Stopped)
    ));
    assert!(matches!(
        within(other_handle.disconnect(PeerId::random())).await,
        Err(Error::Stopped)
    ));
    assert!(matches!(
        within(other_handle.deliver(PeerId::random(), vec![], &letters(1))).await,
        Err(DeliveryError::Stopped)
    ));
    assert!(matches!(
        within(other_handle.dial(PeerId::random(), vec![])).await,
        Err(DeliveryError::Stopped)
    ));
    within(other_handle.shutdown()).await;
    // The node's event stream ends once the loop is gone.
    within(async { while events.recv().await.is_some() {} }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn blair_hears_when_alex_first_connects_and_when_he_leaves() {
    let alex = Node::start().await;
    let mut blair = Node::start().await;

    within(alex.client.dial(blair.peer_id(), vec![blair.tcp.clone()]))
        .await
        .unwrap();
    let connected = blair
        .next_event(|event| match event {
            Event::PeerConnected { peer } => Some(peer),
            _ => None,
        })
        .await;
    assert_eq!(connected, alex.peer_id());
    let status = within(alex.client.status()).await.unwrap();
    assert_eq!(status.connected_peers, vec![blair.peer_id()]);
    assert!(!status.mdns);

    // Dialing again while connected is immediate and changes nothing.
    within(alex.client.dial(blair.peer_id(), vec![]))
        .await
        .unwrap();

    within(alex.client.disconnect(blair.peer_id()))
        .await
        .unwrap();
    let disconnected = blair
        .next_event(|event| match event {
            Event::PeerDisconnected { peer } => Some(peer),
            Event::PeerConnected { peer } => panic!("{peer} connected twice"),
            _ => None,
        })
        .await;
    assert_eq!(disconnected, alex.peer_id());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_in_use_is_an_error_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("/ip4/127.0.0.1/tcp/{}", taken.local_addr().unwrap().port());
    let config = config::Network {
        listen: vec![addr.clone()],
        mdns: false,
        ..Default::default()
    };

    let started = within(spawn(&config, Keypair::generate_ed25519())).await;

    match started {
        Err(Error::InUse { addr: failed }) => assert_eq!(failed.to_string(), addr),
        Err(other) => panic!("expected an in-use error, got {other}"),
        Ok(_) => panic!("listened on a port that is taken"),
    }
}

/// libp2p listens on TCP with SO_REUSEPORT, which would let a second node
/// bind the same port and take a share of the first one's connections.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_node_on_a_running_nodes_ports_is_refused() {
    let blair = Node::start().await;
    for taken in [blair.addr(Via::Tcp), blair.addr(Via::Quic)] {
        let config = config::Network {
            listen: vec![taken.to_string()],
            mdns: false,
            ..Default::default()
        };

        let started = within(spawn(&config, Keypair::generate_ed25519())).await;

        match started {
            Err(Error::InUse { addr }) => assert_eq!(addr, taken),
            Err(other) => panic!("expected an in-use error, got {other}"),
            Ok(_) => panic!("listened on {taken}, which Blair's node holds"),
        }
    }
}

/// One node on every IPv4 and IPv6 address at the same port: its own IPv4
/// listener does not make the IPv6 port look taken (libp2p binds IPv6
/// alone, where a plain bind of `::` would take IPv4 too).
#[tokio::test(flavor = "multi_thread")]
async fn one_node_listens_on_ipv4_and_ipv6_at_the_same_port() {
    let Ok(v6) = std::net::TcpListener::bind("[::]:0") else {
        eprintln!("no IPv6 loopback here; nothing to check");
        return;
    };
    let port = v6.local_addr().unwrap().port();
    drop(v6);
    let config = config::Network {
        listen: vec![
            format!("/ip4/0.0.0.0/tcp/{port}"),
            format!("/ip6/::/tcp/{port}"),
        ],
        mdns: false,
        ..Default::default()
    };

    let started = within(spawn(&config, Keypair::generate_ed25519())).await;

    let (client, _events, _task) = started.unwrap_or_else(|e| panic!("{e}"));
    let status = within(client.status()).await.unwrap();
    let v6 = |a: &Multiaddr| a.to_string().starts_with("/ip6/");
    assert!(
        status.listen_addrs.iter().any(v6) && !status.listen_addrs.iter().all(v6),
        "{:?}",
        status.listen_addrs
    );
}
