//! Prometheus metrics, kept in atomics (no locks, no allocation on the request path once a
//! thread has counted its first request) and rendered as text on `GET /metrics` of the admin
//! listener.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use thread_local::ThreadLocal;

/// Upper bounds of the upstream latency histogram, in nanoseconds (a request's latency is
/// compared in them; `/metrics` shows them in seconds).
const BUCKET_NANOS: [u64; 11] = [
    1_000_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    10_000_000_000,
];

/// Where the latency counters keep the count and the sum (after the buckets).
const LATENCY_COUNT: usize = BUCKET_NANOS.len();
const LATENCY_SUM: usize = LATENCY_COUNT + 1;

/// Auth outcomes counted, by code.
const AUTH_CODES: [&str; 9] = [
    "ok",
    "missing_key",
    "invalid_key",
    "key_expired",
    "ambiguous_credentials",
    "deployment_forbidden",
    "insufficient_scope",
    "too_many_failures",
    "rate_limited",
];

/// Where `code` is counted among the auth outcomes.
fn auth_index(code: &str) -> Option<usize> {
    AUTH_CODES.iter().position(|c| *c == code)
}

/// Counters every request bumps, kept per thread: a thread adds to its own copy with a plain
/// load and store (no locked instruction, no cache line shared with another core) and a
/// scrape sums the copies. With two threads deciding at once, shared counters cost 60–90 ns
/// a decision on this project's VM. A thread's copy outlives the thread (a later thread
/// given its id carries on counting in it), so nothing counted is lost.
struct PerThread<const N: usize> {
    copies: ThreadLocal<ThreadCopy<N>>,
}

/// One thread's counters, on lines of their own (CPUs fetch lines in pairs: 128 bytes).
#[repr(align(128))]
struct ThreadCopy<const N: usize>([AtomicU64; N]);

impl<const N: usize> Default for PerThread<N> {
    fn default() -> Self {
        PerThread {
            copies: ThreadLocal::new(),
        }
    }
}

impl<const N: usize> PerThread<N> {
    /// Adds `n` to counter `i` (out-of-range indices are ignored).
    fn add(&self, i: usize, n: u64) {
        let own = self
            .copies
            .get_or(|| ThreadCopy(std::array::from_fn(|_| AtomicU64::new(0))));
        if let Some(c) = own.0.get(i) {
            // Only this thread writes its copy: a load and a store lose nothing.
            c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
        }
    }

    /// Counter `i` summed over the threads.
    fn sum(&self, i: usize) -> u64 {
        self.copies
            .iter()
            .filter_map(|c| c.0.get(i))
            .fold(0u64, |sum, c| sum.wrapping_add(c.load(Ordering::Relaxed)))
    }
}

/// Request counters of one deployment, by status class.
#[derive(Default)]
pub struct DeploymentCounters {
    by_class: PerThread<5>,
}

impl DeploymentCounters {
    /// Counts a response status.
    pub fn count(&self, status: u16) {
        let i = match status {
            0..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        self.by_class.add(i, 1);
    }
}

/// All metrics of a gateway.
pub struct Metrics {
    deployments: DashMap<Arc<str>, Arc<DeploymentCounters>>,
    unrouted: DeploymentCounters,
    /// By code, in `AUTH_CODES` order (`rate_limited` also makes `keygate_rate_limited_total`).
    auth: PerThread<{ AUTH_CODES.len() }>,
    /// Requests by the first bucket their latency fits in (Prometheus's cumulative `le`
    /// buckets are summed at render time: one increment per request, where incrementing
    /// every bucket a latency fits in was up to 11 atomic adds per request), then the count
    /// and the sum in microseconds.
    latency: PerThread<{ LATENCY_SUM + 1 }>,
    /// Config reloads that applied.
    pub reloads_ok: AtomicU64,
    /// Config reloads rejected (bad file).
    pub reloads_failed: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            deployments: DashMap::new(),
            unrouted: DeploymentCounters::default(),
            auth: PerThread::default(),
            latency: PerThread::default(),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
        }
    }
}

/// Gauges read at render time.
pub struct Gauges {
    /// Digests in the live index.
    pub keys_loaded: u64,
    /// Usage requests counted but not yet flushed.
    pub usage_pending: u64,
    /// Duration of the last usage flush.
    pub usage_flush_seconds: f64,
}

impl Metrics {
    /// The counters of a deployment (kept across reloads by name).
    pub fn deployment(&self, name: &str) -> Arc<DeploymentCounters> {
        if let Some(c) = self.deployments.get(name) {
            return c.clone();
        }
        self.deployments.entry(Arc::from(name)).or_default().clone()
    }

    /// Counts a request that matched no deployment.
    pub fn count_unrouted(&self, status: u16) {
        self.unrouted.count(status);
    }

    /// Counts an authentication outcome (`ok` or an error code).
    pub fn count_auth(&self, code: &str) {
        if let Some(i) = auth_index(code) {
            self.auth.add(i, 1);
        }
    }

    /// Observes an upstream round trip (to response headers).
    pub fn observe_upstream(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        if let Some(i) = BUCKET_NANOS.iter().position(|&bound| nanos <= bound) {
            self.latency.add(i, 1);
        }
        self.latency.add(LATENCY_COUNT, 1);
        self.latency.add(LATENCY_SUM, d.as_micros() as u64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let classes = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        out.push_str("# HELP keygate_requests_total Data-plane requests by deployment and status class.\n# TYPE keygate_requests_total counter\n");
        let mut deps: Vec<(Arc<str>, Arc<DeploymentCounters>)> = self
            .deployments
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        deps.sort_by(|a, b| a.0.cmp(&b.0));
        let unrouted: (&str, &DeploymentCounters) = ("", &self.unrouted);
        for (name, c) in deps
            .iter()
            .map(|(n, c)| (&**n, &**c))
            .chain(std::iter::once(unrouted))
        {
            for (i, class) in classes.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "keygate_requests_total{{deployment=\"{}\",status=\"{class}\"}} {}",
                    escape(name),
                    c.by_class.sum(i)
                );
            }
        }
        out.push_str("# HELP keygate_auth_total Authentication outcomes by result code.\n# TYPE keygate_auth_total counter\n");
        for (i, code) in AUTH_CODES.iter().enumerate() {
            let _ = writeln!(
                out,
                "keygate_auth_total{{result=\"{code}\"}} {}",
                self.auth.sum(i)
            );
        }
        out.push_str("# HELP keygate_rate_limited_total Requests refused by a key's rate limit.\n# TYPE keygate_rate_limited_total counter\n");
        let _ = writeln!(
            out,
            "keygate_rate_limited_total {}",
            auth_index("rate_limited").map_or(0, |i| self.auth.sum(i))
        );
        out.push_str("# HELP keygate_upstream_latency_seconds Time from forwarding to the upstream's response headers.\n# TYPE keygate_upstream_latency_seconds histogram\n");
        let mut cumulative = 0;
        for (i, nanos) in BUCKET_NANOS.iter().enumerate() {
            cumulative += self.latency.sum(i);
            let bound = *nanos as f64 / 1e9;
            let _ = writeln!(
                out,
                "keygate_upstream_latency_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        // Loaded after the buckets, a request observed meanwhile may have reached its bucket
        // and not yet the count: +Inf never shows less than the buckets below it.
        let count = self.latency.sum(LATENCY_COUNT).max(cumulative);
        let _ = writeln!(
            out,
            "keygate_upstream_latency_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "keygate_upstream_latency_seconds_sum {}",
            self.latency.sum(LATENCY_SUM) as f64 / 1e6
        );
        let _ = writeln!(out, "keygate_upstream_latency_seconds_count {count}");
        out.push_str("# HELP keygate_keys_loaded Secret digests in the live key index.\n# TYPE keygate_keys_loaded gauge\n");
        let _ = writeln!(out, "keygate_keys_loaded {}", gauges.keys_loaded);
        out.push_str("# HELP keygate_usage_pending_requests Counted requests not yet flushed to the store.\n# TYPE keygate_usage_pending_requests gauge\n");
        let _ = writeln!(
            out,
            "keygate_usage_pending_requests {}",
            gauges.usage_pending
        );
        out.push_str("# HELP keygate_usage_flush_seconds Duration of the last usage flush.\n# TYPE keygate_usage_flush_seconds gauge\n");
        let _ = writeln!(
            out,
            "keygate_usage_flush_seconds {}",
            gauges.usage_flush_seconds
        );
        out.push_str("# HELP keygate_config_reloads_total Configuration reloads by result.\n# TYPE keygate_config_reloads_total counter\n");
        let _ = writeln!(
            out,
            "keygate_config_reloads_total{{result=\"ok\"}} {}",
            self.reloads_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "keygate_config_reloads_total{{result=\"failed\"}} {}",
            self.reloads_failed.load(Ordering::Relaxed)
        );
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition with zero gauges.
    fn render(m: &Metrics) -> String {
        m.render(&Gauges {
            keys_loaded: 0,
            usage_pending: 0,
            usage_flush_seconds: 0.0,
        })
    }

    fn bucket_lines(m: &Metrics) -> Vec<String> {
        render(m)
            .lines()
            .filter(|l| l.starts_with("keygate_upstream_latency_seconds_bucket"))
            .map(|l| {
                l.trim_start_matches("keygate_upstream_latency_seconds_bucket")
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn counts_from_every_thread_are_summed_including_exited_ones() {
        let m = Arc::new(Metrics::default());
        let app = m.deployment("app");
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (m, app) = (m.clone(), app.clone());
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        app.count(200);
                        m.count_auth("ok");
                    }
                    app.count(503);
                    m.count_auth("rate_limited");
                    m.observe_upstream(Duration::from_millis(2));
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // And this thread, after the others have exited (one may have left it its id).
        app.count(200);
        let text = render(&m);
        for line in [
            "keygate_requests_total{deployment=\"app\",status=\"2xx\"} 4001",
            "keygate_requests_total{deployment=\"app\",status=\"5xx\"} 4",
            "keygate_auth_total{result=\"ok\"} 4000",
            "keygate_auth_total{result=\"rate_limited\"} 4",
            "keygate_rate_limited_total 4",
            "keygate_upstream_latency_seconds_bucket{le=\"0.005\"} 4",
            "keygate_upstream_latency_seconds_count 4",
            "keygate_upstream_latency_seconds_sum 0.008",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn latency_buckets_are_cumulative_and_bounds_inclusive() {
        let m = Metrics::default();
        for d in [
            Duration::from_micros(500),
            Duration::from_millis(1),
            Duration::from_nanos(1_000_001),
            Duration::from_millis(20),
            Duration::from_secs(20),
        ] {
            m.observe_upstream(d);
        }
        let lines = bucket_lines(&m);
        let bounds: Vec<&str> = lines
            .iter()
            .map(|l| l.split('"').nth(1).unwrap_or(""))
            .collect();
        assert_eq!(
            bounds,
            [
                "0.001", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "10",
                "+Inf"
            ],
            "the bounds as shown, in seconds"
        );
        assert_eq!(lines.len(), BUCKET_NANOS.len() + 1);
        assert_eq!(lines[0], "{le=\"0.001\"} 2", "a bound holds what equals it");
        assert_eq!(lines[1], "{le=\"0.005\"} 3");
        assert_eq!(lines[2], "{le=\"0.01\"} 3");
        assert_eq!(lines[3], "{le=\"0.025\"} 4");
        assert_eq!(lines[10], "{le=\"10\"} 4");
        assert_eq!(lines[11], "{le=\"+Inf\"} 5");
    }
}
