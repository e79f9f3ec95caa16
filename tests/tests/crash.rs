//! Nothing acknowledged is ever lost: `kill -9` of either daemon at random
//! moments during a stream of sends, each restarted at once. At the end,
//! every message whose `send` returned success is in both histories exactly
//! once, in the order sent, delivered on one side and received on the other.
//!
//! Seeded: set PROTONODE_SEED to replay a run; PROTONODE_SENDS changes the
//! number of acknowledged sends (default 200).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::{wait_for, Daemon, Person};
use rand::{Rng, SeedableRng};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

#[test]
fn kill_9_during_a_stream_of_sends_loses_and_doubles_nothing() {
    let seed = env_u64("PROTONODE_SEED").unwrap_or_else(rand::random);
    let target = env_u64("PROTONODE_SENDS").unwrap_or(200) as usize;
    println!("seed {seed} (replay with PROTONODE_SEED={seed})");

    let alex = Arc::new(Person::init("Alex"));
    let blair = Arc::new(Person::init("Blair"));
    let daemons = Arc::new([Mutex::new(alex.start()), Mutex::new(blair.start())]);
    let (blair_id, _) = alex.befriend(&blair);

    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicUsize::new(0));
    let killer = {
        let (daemons, stop, kills) = (daemons.clone(), stop.clone(), kills.clone());
        let people = [alex.clone(), blair.clone()];
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(rng.gen_range(150..700)));
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let who = rng.gen_range(0..2);
                let mut daemon = daemons[who].lock().unwrap();
                daemon.kill9();
                kills.fetch_add(1, Ordering::SeqCst);
                *daemon = people[who].start();
            }
        })
    };

    // (message id, text) of every send that returned success, in order.
    let mut acknowledged: Vec<(String, String)> = Vec::new();
    let mut attempts = 0;
    while acknowledged.len() < target && attempts < target * 20 {
        let text = format!("message {attempts}");
        match alex.json(&["send", &blair_id, &text]) {
            Ok(v) => acknowledged.push((v["message"].as_str().unwrap().to_string(), text)),
            // The daemon was down or died mid-request: not acknowledged.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
        attempts += 1;
    }
    stop.store(true, Ordering::SeqCst);
    killer.join().unwrap();
    assert_eq!(
        acknowledged.len(),
        target,
        "seed {seed}: too few sends succeeded"
    );

    // Let the outbox drain: every acknowledged message delivered and received.
    let alex_contact_at_blair = blair.ok(&["contacts"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let settled = wait_for(Duration::from_secs(90), || {
        let sent = alex.history(&blair_id);
        let got = blair.history(&alex_contact_at_blair);
        let delivered = |id: &str| {
            sent.iter()
                .any(|m| m["id"] == id && m["status"] == "delivered")
        };
        let received = |id: &str| {
            got.iter()
                .any(|m| m["id"] == id && m["status"] == "received")
        };
        acknowledged
            .iter()
            .all(|(id, _)| delivered(id) && received(id))
            .then_some((sent, got))
    });
    let Some((sent, got)) = settled else {
        panic!("seed {seed}: not every acknowledged message was delivered within 90 s");
    };

    let mut lost = 0;
    let mut duplicated = 0;
    for history in [&sent, &got] {
        let mut count: HashMap<&str, usize> = HashMap::new();
        for m in history.iter() {
            *count.entry(m["id"].as_str().unwrap()).or_default() += 1;
        }
        duplicated += count.values().filter(|&&n| n > 1).count();
        lost += acknowledged
            .iter()
            .filter(|(id, _)| !count.contains_key(id.as_str()))
            .count();
        // Acknowledged messages keep the order they were sent in.
        let order: Vec<&str> = history
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .filter(|id| acknowledged.iter().any(|(a, _)| a == id))
            .collect();
        let expected: Vec<&str> = acknowledged.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(order, expected, "seed {seed}: order differs");
        for (id, text) in &acknowledged {
            let m = history.iter().find(|m| m["id"] == id.as_str()).unwrap();
            assert_eq!(m["text"], text.as_str(), "seed {seed}: text differs");
        }
    }
    println!(
        "figures: sends attempted {attempts}, acknowledged {}, kills {}, lost {lost}, duplicated {duplicated}",
        acknowledged.len(),
        kills.load(Ordering::SeqCst)
    );
    assert_eq!((lost, duplicated), (0, 0), "seed {seed}");
    for d in daemons.iter() {
        let mut d = d.lock().unwrap();
        assert!(d.is_running());
        let _ = Daemon::stop(&mut d);
    }
}
