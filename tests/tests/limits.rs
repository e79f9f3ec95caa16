//! One peer floods a daemon with 10,000 junk envelopes (random addresses,
//! 1 KiB of random bytes each): the daemon reads the first few, throttles
//! the peer, then disconnects it and refuses its connections for a while;
//! its memory stays bounded (measured from `/proc`), its store does not
//! change, and a real contact's message still gets through.
//!
//! Prints its figures: how many envelopes were refused after being read,
//! refused unread (throttled), or cut off (connection closed or refused),
//! and the daemon's resident memory before, at its peak, and after.
//!
//! `PROTONODE_FLOOD` changes the number of envelopes (default 10,000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{delivery_target, raw_client, store_digest, wait_for, Person};
use rand::RngCore;
use transports::{DeliveryAddress, DeliveryError, Envelope, Receipt, Refusal};

/// Requests in flight at once from the flooder.
const IN_FLIGHT: usize = 64;
/// Junk bytes per envelope.
const PAYLOAD: usize = 1024;
/// How much the daemon's peak resident memory may grow during the flood.
/// Its connections, queues and the meter's table are bounded; what it
/// holds at most is a few requests' frames per connection.
const MEMORY_GROWTH_LIMIT_KIB: u64 = 64 * 1024;

/// `VmRSS` and `VmHWM` (peak) of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[derive(Default, Debug)]
struct Outcomes {
    /// Read by the node and answered `UnknownAddress`.
    refused: usize,
    /// Answered `Unavailable` without being read.
    throttled: usize,
    /// The connection was closed or refused: the peer is banned.
    cut_off: usize,
    /// Anything else (should be none).
    other: Vec<String>,
}

#[test]
fn a_flood_of_junk_envelopes_is_throttled_then_cut_off_with_memory_bounded() {
    let total: usize = std::env::var("PROTONODE_FLOOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let alex = Person::init("Alex");
    let blair = Person::init("Blair");
    {
        let mut a = alex.start();
        let mut b = blair.start();
        alex.befriend(&blair);
        blair.ok(&["send", "Alex", "before the flood", "--wait"]);
        // Acknowledged means stored in Alex's inbox; wait until it is filed
        // too, or the next start would file it and change the store.
        wait_for(Duration::from_secs(20), || {
            let h = alex.history("Blair");
            h.iter()
                .any(|m| m["text"] == "before the flood")
                .then_some(())
        })
        .expect("Alex's node files the message");
        assert!(a.stop() && b.stop());
    }
    let before = store_digest(alex.data_dir());

    let mut daemon = alex.start();
    let (peer, addrs) = delivery_target(&alex);
    let (rss_before, _) = memory_kib(daemon.pid());

    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = raw_client(&rt, 10);

    let started = Instant::now();
    let outcomes = rt.block_on(async move {
        let gate = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..total {
            let permit = gate.clone().acquire_owned().await.unwrap();
            let (client, addrs) = (client.clone(), addrs.clone());
            tasks.spawn(async move {
                let mut junk = vec![0u8; PAYLOAD];
                rand::thread_rng().fill_bytes(&mut junk);
                let envelope = Envelope::new(DeliveryAddress::random(), junk);
                let answer = client.deliver(peer, addrs, &[envelope]).await;
                drop(permit);
                answer
            });
        }
        let mut outcomes = Outcomes::default();
        while let Some(answer) = tasks.join_next().await {
            match answer.unwrap() {
                Ok(receipts) if receipts == [Receipt::Refused(Refusal::UnknownAddress)] => {
                    outcomes.refused += 1
                }
                Err(DeliveryError::Rejected(Refusal::Unavailable)) => outcomes.throttled += 1,
                Err(
                    DeliveryError::ConnectionClosed | DeliveryError::Dial(_) | DeliveryError::Io(_),
                ) => outcomes.cut_off += 1,
                other => outcomes.other.push(format!("{other:?}")),
            }
        }
        outcomes
    });
    let took = started.elapsed();
    let (rss_after, peak) = memory_kib(daemon.pid());
    println!(
        "flood of {total} junk envelopes ({PAYLOAD} B each, {IN_FLIGHT} in flight) from one peer, in {:.1}s:",
        took.as_secs_f64()
    );
    println!(
        "  read and refused (unknown address): {}; refused unread (throttled): {}; cut off (disconnected, banned): {}; other: {}",
        outcomes.refused,
        outcomes.throttled,
        outcomes.cut_off,
        outcomes.other.len()
    );
    println!(
        "  daemon resident memory: {} KiB before, {} KiB peak, {} KiB after",
        rss_before, peak, rss_after
    );

    assert!(daemon.is_running(), "the daemon survived the flood");
    assert!(
        outcomes.other.is_empty(),
        "unexpected answers: {:?}",
        &outcomes.other[..outcomes.other.len().min(5)]
    );
    assert_eq!(
        outcomes.refused + outcomes.throttled + outcomes.cut_off,
        total
    );
    // The node reads a few batches' worth, and those already in flight when
    // the meter tipped; the rest never reaches it.
    assert!(
        outcomes.refused <= 64 + 2 * IN_FLIGHT,
        "the node read {} junk envelopes before throttling",
        outcomes.refused
    );
    assert!(
        outcomes.cut_off > 0,
        "the flooding peer was never disconnected"
    );
    assert!(
        peak.saturating_sub(rss_before) < MEMORY_GROWTH_LIMIT_KIB,
        "the daemon's peak memory grew by {} KiB during the flood",
        peak.saturating_sub(rss_before)
    );
    assert!(
        daemon
            .stderr_lines()
            .iter()
            .any(|l| l.contains("disconnected a peer that kept sending")),
        "the daemon logged the disconnection"
    );

    // Nothing the flood sent was stored.
    assert!(daemon.stop());
    assert_eq!(
        store_digest(alex.data_dir()),
        before,
        "the flood changed the store"
    );

    // A contact is still served: the ban is on the flooder's peer id only.
    let _a = alex.start();
    let _b = blair.start();
    blair.ok(&["send", "Alex", "after the flood", "--wait"]);
    // Acknowledged means stored at Alex's node; it is processed just after.
    let texts = || -> Vec<String> {
        alex.history("Blair")
            .iter()
            .filter_map(|m| m["text"].as_str().map(str::to_string))
            .collect()
    };
    let arrived = wait_for(Duration::from_secs(30), || {
        (texts().len() == 2).then_some(())
    });
    assert!(
        arrived.is_some(),
        "Blair's message did not arrive: {:?}",
        texts()
    );
    assert_eq!(texts(), ["before the flood", "after the flood"]);
    drop(rt);
}
