//! Shared pieces of the benchmarks: timing statistics and node set-up.

use std::time::Duration;

/// Median and mean of a set of durations.
pub struct Stats {
    pub median: Duration,
    pub mean: Duration,
    pub p99: Duration,
    pub samples: usize,
}

impl Stats {
    pub fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let n = samples.len().max(1);
        let total: Duration = samples.iter().sum();
        Self {
            median: samples.get(n / 2).copied().unwrap_or_default(),
            mean: total / n as u32,
            p99: samples.get(n * 99 / 100).copied().unwrap_or_default(),
            samples: samples.len(),
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "median {:>8.3} ms  mean {:>8.3} ms  p99 {:>8.3} ms  (n={})",
            ms(self.median),
            ms(self.mean),
            ms(self.p99),
            self.samples
        )
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A node configuration for benchmarks: loopback only, mDNS off, quick retries.
pub fn loopback_config(name: &str) -> config::Config {
    let mut config = config::Config::new(name);
    config.network.mdns = false;
    config.network.listen = vec![
        "/ip4/127.0.0.1/tcp/0".into(),
        "/ip4/127.0.0.1/udp/0/quic-v1".into(),
    ];
    config.delivery.retry_initial_ms = 20;
    config.delivery.retry_max_ms = 500;
    config
}
