//! Malformed and oversize frames sent to a daemon's delivery protocol get
//! an error; the daemon stays up and its store is unchanged.

use std::time::Duration;

use harness::{delivery_target, raw_client, store_digest, wait_for, Person};
use transports::{DeliveryAddress, DeliveryResponse, Envelope, Receipt, Refusal};

#[test]
fn malformed_and_oversize_frames_are_refused_and_change_nothing() {
    let alex = Person::init("Alex");
    let blair = Person::init("Blair");
    {
        let mut a = alex.start();
        let mut b = blair.start();
        alex.befriend(&blair);
        blair.ok(&["send", "Alex", "something to keep", "--wait"]);
        // Acknowledged means stored in Alex's inbox; wait until it is filed
        // too, or the next start would file it and change the store.
        wait_for(Duration::from_secs(20), || {
            let h = alex.history("Blair");
            h.iter()
                .any(|m| m["text"] == "something to keep")
                .then_some(())
        })
        .expect("Alex's node files the message");
        assert!(a.stop() && b.stop());
    }
    let before = store_digest(alex.data_dir());

    let mut daemon = alex.start();
    let (peer, addrs) = delivery_target(&alex);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = raw_client(&rt, 5);
    let raw = |frame: Vec<u8>| rt.block_on(client.deliver_raw(peer, addrs.clone(), frame));

    // Bytes that are no frame at all (here they claim an absurd envelope count).
    assert!(matches!(
        raw(b"\xff\xff\xff\xff garbage".to_vec()).unwrap(),
        DeliveryResponse::Rejected(Refusal::Malformed | Refusal::TooMany)
    ));
    // A valid frame cut short.
    let good = transports::encode_batch(&[Envelope::new(DeliveryAddress::random(), vec![1; 100])])
        .unwrap();
    assert_eq!(
        raw(good[..good.len() - 10].to_vec()).unwrap(),
        DeliveryResponse::Rejected(Refusal::Malformed)
    );
    // Well formed, but for addresses this node does not know; and a version it does not speak.
    let unknown = vec![
        Envelope::new(DeliveryAddress::random(), vec![1; 10]),
        Envelope {
            version: 9,
            to: DeliveryAddress::random().into(),
            payload: vec![2; 10],
        },
    ];
    let receipts = rt
        .block_on(client.deliver(peer, addrs.clone(), &unknown))
        .unwrap();
    assert_eq!(
        receipts,
        vec![
            Receipt::Refused(Refusal::UnknownAddress),
            Receipt::Refused(Refusal::UnsupportedVersion)
        ]
    );
    // Larger than any frame may be: refused, one way or another.
    let oversize = raw(vec![0u8; transports::MAX_FRAME_BYTES + 1]);
    assert!(
        !matches!(oversize, Ok(DeliveryResponse::Receipts(_))),
        "an oversize frame must not be accepted: {oversize:?}"
    );

    // Still up and answering.
    assert!(daemon.is_running());
    assert_eq!(alex.ok(&["status"])["peer_id"], peer.to_string());
    assert!(daemon.stop());
    assert_eq!(
        store_digest(alex.data_dir()),
        before,
        "the store is unchanged"
    );
}
