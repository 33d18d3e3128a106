//! What the proxy adds to a request's latency on loopback.
//!
//! Starts the real simulator and the real proxy in front of it, then sends the same IMDSv2
//! credential GET directly and through the proxy, interleaved one by one so both sides see the
//! same machine noise. Each request opens its own connection, as SDKs do against IMDS. Reports
//! median and p99 of both, and the differences and ratios. Run with
//! `cargo bench --bench latency` (`IMDS_HOP_PROXY_BENCH_REQUESTS` sets the count per side).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{proxy, request, simulator, token};

const DEFAULT_REQUESTS_PER_SIDE: usize = 3_000;
const WARM_UP_REQUESTS: usize = 200;
const PATH: &str = "/latest/meta-data/iam/security-credentials/imds-hop-proxy-demo";

fn main() {
    let requests: usize = std::env::var("IMDS_HOP_PROXY_BENCH_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_REQUESTS_PER_SIDE);
    let sim = simulator(&[]);
    let proxy = proxy(&sim.url(), &[]);
    let token = token(sim.addr());
    let headers = [("X-aws-ec2-metadata-token", token.as_str())];

    let mut direct = Vec::with_capacity(requests);
    let mut proxied = Vec::with_capacity(requests);
    for i in 0..WARM_UP_REQUESTS + requests {
        for (addr, samples) in [(sim.addr(), &mut direct), (proxy.addr(), &mut proxied)] {
            let started = Instant::now();
            let answer = request(addr, "GET", PATH, &headers);
            let took = started.elapsed();
            assert_eq!(answer.status, 200, "{answer:?}");
            if i >= WARM_UP_REQUESTS {
                samples.push(took);
            }
        }
    }

    let (d50, d99) = percentiles(&mut direct);
    let (p50, p99) = percentiles(&mut proxied);
    println!(
        "requests per side: {requests} (after {WARM_UP_REQUESTS} warm-up), new connection each"
    );
    println!(
        "direct to simulator : median {:>8.1} us   p99 {:>8.1} us",
        us(d50),
        us(d99)
    );
    println!(
        "through the proxy   : median {:>8.1} us   p99 {:>8.1} us",
        us(p50),
        us(p99)
    );
    println!(
        "proxy adds          : median {:>8.1} us   p99 {:>8.1} us",
        us(p50) - us(d50),
        us(p99) - us(d99)
    );
    println!(
        "ratio proxied/direct: median {:>8.2}x     p99 {:>8.2}x",
        us(p50) / us(d50),
        us(p99) / us(d99)
    );
}

fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99))
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
