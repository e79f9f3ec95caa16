//! How the receiver treats a peer that wastes its work: envelopes for
//! addresses that resolve to nothing, frames that are malformed or too
//! large, and requests sent anyway while it was told to back off.
//!
//! Each peer has a score (a leaky bucket): every offence adds to it, and it
//! drains at [`Rules::drain_per_sec`]. Above [`Rules::throttle_at`] the
//! peer's requests are answered `Rejected(Unavailable)` without reaching
//! the node (no decoding of envelopes, no storage transaction), and each
//! such request adds to the score too. Above [`Rules::disconnect_at`] the
//! peer is disconnected and its connections are closed on arrival for
//! [`Rules::ban`].
//!
//! An honest peer is not hurt: an envelope for an address that expired
//! while it was offline costs a little, capped per request, so a large
//! queued batch to one stale address stays below the throttle; and a
//! throttled honest peer treats `Unavailable` as "retry later" and backs
//! off, which lets its score drain before it would ever be banned.
//!
//! The meter knows nothing of the network; the event loop passes it the
//! time, so it is tested without one. It tracks at most
//! [`Rules::max_tracked`] peers, forgetting the least suspicious first.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// The thresholds of the meter.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// Score added per unresolvable envelope...
    pub per_unknown_address: f64,
    /// ...but at most this much per request, so an honest batch of queued
    /// envelopes to one expired address is not mistaken for a flood.
    pub max_per_request: f64,
    /// Score added per malformed or oversize frame.
    pub per_invalid_frame: f64,
    /// Score added per request sent while throttled.
    pub per_throttled_request: f64,
    /// How fast the score drains.
    pub drain_per_sec: f64,
    /// Above this, requests are refused unread.
    pub throttle_at: f64,
    /// Above this, the peer is disconnected and banned.
    pub disconnect_at: f64,
    /// How long a ban lasts.
    pub ban: Duration,
    /// Peers tracked at most.
    pub max_tracked: usize,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            per_unknown_address: 1.0,
            max_per_request: 16.0,
            per_invalid_frame: 16.0,
            per_throttled_request: 4.0,
            drain_per_sec: 2.0,
            throttle_at: 64.0,
            disconnect_at: 128.0,
            ban: Duration::from_secs(60),
            max_tracked: 4096,
        }
    }
}

/// What the event loop should do with a peer after an offence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it as usual.
    Serve,
    /// Refuse its requests unread until its score drains.
    Throttle,
    /// Disconnect it now; it is banned until the ban ends.
    Disconnect,
}

/// What a peer did wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offence {
    /// A request whose envelopes included this many unresolvable addresses.
    UnknownAddresses(usize),
    /// A frame refused before its envelopes were looked at.
    InvalidFrame,
    /// A request sent while throttled.
    WhileThrottled,
}

#[derive(Clone, Copy, Debug)]
struct Record {
    score: f64,
    at: Instant,
    banned_until: Option<Instant>,
}

/// Per-peer scores; see the module header.
#[derive(Debug)]
pub struct Meter {
    rules: Rules,
    peers: HashMap<PeerId, Record>,
    throttled_total: u64,
    disconnected_total: u64,
}

impl Meter {
    pub fn new(rules: Rules) -> Self {
        Self {
            rules,
            peers: HashMap::new(),
            throttled_total: 0,
            disconnected_total: 0,
        }
    }

    /// Adds `offence` to `peer`'s score and says what to do with it.
    pub fn offend(&mut self, peer: PeerId, offence: Offence, now: Instant) -> Verdict {
        let rules = self.rules;
        let cost = match offence {
            Offence::UnknownAddresses(0) => return self.verdict(peer, now),
            Offence::UnknownAddresses(n) => {
                (n as f64 * rules.per_unknown_address).min(rules.max_per_request)
            }
            Offence::InvalidFrame => rules.per_invalid_frame,
            Offence::WhileThrottled => rules.per_throttled_request,
        };
        if !self.peers.contains_key(&peer) && self.peers.len() >= rules.max_tracked {
            self.forget_one(now);
        }
        let record = self.peers.entry(peer).or_insert(Record {
            score: 0.0,
            at: now,
            banned_until: None,
        });
        record.score = drained(record, &rules, now) + cost;
        record.at = now;
        if record.score > rules.disconnect_at {
            record.banned_until = Some(now + rules.ban);
            // Start the ban's end from a clean slate.
            record.score = 0.0;
            self.disconnected_total += 1;
            return Verdict::Disconnect;
        }
        if offence == Offence::WhileThrottled {
            self.throttled_total += 1;
        }
        self.verdict(peer, now)
    }

    /// What to do with a request from `peer` now, before reading it.
    pub fn verdict(&mut self, peer: PeerId, now: Instant) -> Verdict {
        let rules = self.rules;
        let Some(record) = self.peers.get_mut(&peer) else {
            return Verdict::Serve;
        };
        match record.banned_until {
            Some(until) if now < until => return Verdict::Disconnect,
            Some(_) => record.banned_until = None,
            None => {}
        }
        if drained(record, &rules, now) > rules.throttle_at {
            Verdict::Throttle
        } else {
            Verdict::Serve
        }
    }

    /// Whether `peer` is banned now (its connections are closed on arrival).
    pub fn is_banned(&self, peer: &PeerId, now: Instant) -> bool {
        self.peers
            .get(peer)
            .and_then(|r| r.banned_until)
            .is_some_and(|until| now < until)
    }

    /// Peers tracked now (bounded by [`Rules::max_tracked`]).
    pub fn tracked(&self) -> usize {
        self.peers.len()
    }

    /// Requests refused unread so far, and disconnections.
    pub fn totals(&self) -> (u64, u64) {
        (self.throttled_total, self.disconnected_total)
    }

    /// Makes room: forgets a peer whose score has drained away and that is
    /// not banned, else the one with the lowest score.
    fn forget_one(&mut self, now: Instant) {
        let rules = self.rules;
        let victim = self
            .peers
            .iter()
            .map(|(peer, r)| {
                let banned = r.banned_until.is_some_and(|until| now < until);
                (*peer, banned, drained(r, &rules, now))
            })
            .min_by(|a, b| {
                (a.1, a.2)
                    .partial_cmp(&(b.1, b.2))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .map(|(peer, ..)| peer);
        if let Some(peer) = victim {
            self.peers.remove(&peer);
        }
    }
}

/// The record's score drained to `now`.
fn drained(record: &Record, rules: &Rules, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(record.at).as_secs_f64();
    (record.score - elapsed * rules.drain_per_sec).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_flood_of_unknown_addresses_is_throttled_then_disconnected() {
        let mut meter = Meter::new(Rules::default());
        let peer = PeerId::random();
        let t0 = Instant::now();
        let mut verdicts = Vec::new();
        for i in 0..20 {
            let now = t0 + secs(i as f64 * 0.01);
            let v = match meter.verdict(peer, now) {
                Verdict::Serve => meter.offend(peer, Offence::UnknownAddresses(1), now),
                Verdict::Throttle => meter.offend(peer, Offence::WhileThrottled, now),
                Verdict::Disconnect => Verdict::Disconnect,
            };
            verdicts.push(v);
        }
        // One unresolvable envelope at a time, 20 of them: below the throttle.
        assert!(
            verdicts.iter().all(|v| *v == Verdict::Serve),
            "{verdicts:?}"
        );

        let mut meter = Meter::new(Rules::default());
        let mut seen = Vec::new();
        for i in 0..40 {
            let now = t0 + secs(i as f64 * 0.01);
            let v = match meter.verdict(peer, now) {
                Verdict::Serve => meter.offend(peer, Offence::UnknownAddresses(1024), now),
                Verdict::Throttle => meter.offend(peer, Offence::WhileThrottled, now),
                Verdict::Disconnect => Verdict::Disconnect,
            };
            seen.push(v);
        }
        let first_throttle = seen.iter().position(|v| *v == Verdict::Throttle);
        let first_disconnect = seen.iter().position(|v| *v == Verdict::Disconnect);
        // 64 / 16: the fifth batch crosses the throttle.
        assert_eq!(first_throttle, Some(4), "{seen:?}");
        // (128 - 80) / 4: a dozen more requests while throttled.
        let first_disconnect = first_disconnect.expect("the flooder was never disconnected");
        assert!((15..20).contains(&first_disconnect), "{seen:?}");
        assert!(seen[first_disconnect..]
            .iter()
            .all(|v| *v == Verdict::Disconnect));
        assert!(meter.is_banned(&peer, t0 + secs(1.0)));
        assert_eq!(meter.totals(), (first_disconnect as u64 - 5, 1));
    }

    #[test]
    fn a_ban_ends_and_the_peer_starts_clean() {
        let rules = Rules::default();
        let mut meter = Meter::new(rules);
        let peer = PeerId::random();
        let t0 = Instant::now();
        let mut now = t0;
        while meter.offend(peer, Offence::InvalidFrame, now) != Verdict::Disconnect {
            now += secs(0.001);
        }
        assert_eq!(
            meter.verdict(peer, now + rules.ban - secs(0.1)),
            Verdict::Disconnect
        );
        let after = now + rules.ban;
        assert!(!meter.is_banned(&peer, after));
        assert_eq!(meter.verdict(peer, after), Verdict::Serve);
    }

    #[test]
    fn an_honest_peer_with_stale_addresses_backing_off_is_never_banned() {
        // A peer back from a week offline: its whole outbox (1024 envelopes
        // per request) goes to addresses that expired. It tries the two
        // other transports at once, then backs off as the outbox does
        // (doubling from 0.5 s up to 15 s), whatever the answer.
        let mut meter = Meter::new(Rules::default());
        let peer = PeerId::random();
        let mut now = Instant::now();
        let mut backoff: f64 = 0.5;
        for _ in 0..200 {
            for _ in 0..3 {
                match meter.verdict(peer, now) {
                    Verdict::Serve => {
                        meter.offend(peer, Offence::UnknownAddresses(1024), now);
                    }
                    Verdict::Throttle => {
                        meter.offend(peer, Offence::WhileThrottled, now);
                    }
                    Verdict::Disconnect => panic!("an honest peer was banned"),
                }
            }
            now += secs(backoff);
            backoff = (backoff * 2.0).min(15.0);
        }
        assert_eq!(meter.totals().1, 0);
    }

    #[test]
    fn the_table_of_peers_stays_bounded_and_keeps_the_banned() {
        let rules = Rules {
            max_tracked: 8,
            ..Rules::default()
        };
        let mut meter = Meter::new(rules);
        let now = Instant::now();
        let banned = PeerId::random();
        while meter.offend(banned, Offence::InvalidFrame, now) != Verdict::Disconnect {}
        for _ in 0..10_000 {
            meter.offend(PeerId::random(), Offence::UnknownAddresses(1), now);
        }
        assert_eq!(meter.tracked(), 8);
        assert!(meter.is_banned(&banned, now));
    }
}
