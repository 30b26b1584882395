//! Every gRPC call a server of this process takes, counted and timed by the authorization
//! layer ([`crate::authz::Authorize`]) for the `/metrics` of the head and of node daemons:
//! calls and their time to the response's headers (a stream's first answer) by method,
//! and refusals by method and code.
//!
//! Methods are labelled by their row in [`crate::authz::TABLE`]; a path with no row (what
//! a stranger may send) counts as `unknown`, so no caller can grow the label set.

use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Method = Vec<(&'static str, &'static str)>;

fn latency_histogram() -> Histogram {
    // 50 µs to about 3 s.
    Histogram::new(exponential_buckets(0.000_05, 3.0, 11))
}

/// The calls of this process's servers.
pub struct RpcMetrics {
    calls: Family<Method, Counter<u64, AtomicU64>>,
    latency: Family<Method, Histogram, fn() -> Histogram>,
    refused: Family<Method, Counter<u64, AtomicU64>>,
}

static METRICS: LazyLock<RpcMetrics> = LazyLock::new(|| RpcMetrics {
    calls: Family::default(),
    latency: Family::new_with_constructor(latency_histogram),
    refused: Family::default(),
});

/// This process's call metrics.
pub fn rpc_metrics() -> &'static RpcMetrics {
    &METRICS
}

/// The label of `path`: its row's path, or `unknown`.
pub fn method_label(path: &str) -> &'static str {
    crate::authz::rule(path).map_or("unknown", |rule| rule.path)
}

impl RpcMetrics {
    /// An admitted call of `method` answered (its headers) after `elapsed`.
    pub fn answered(&self, method: &'static str, elapsed: Duration) {
        let labels = vec![("method", method)];
        self.calls.get_or_create(&labels).inc();
        self.latency.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    /// A call of `method` refused before any handler ran, with `code`.
    pub fn refused(&self, method: &'static str, code: tonic::Code) {
        let code = match code {
            tonic::Code::Unauthenticated => "unauthenticated",
            tonic::Code::PermissionDenied => "permission_denied",
            _ => "other",
        };
        self.refused.get_or_create(&vec![("method", method), ("code", code)]).inc();
    }

    /// Adds the families to `registry` (they keep counting: the registry shares them).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "rpc_server_calls",
            "gRPC calls this process's servers admitted, by method",
            self.calls.clone(),
        );
        registry.register(
            "rpc_server_latency_seconds",
            "Time from an admitted gRPC call to its answer's headers, by method",
            self.latency.clone(),
        );
        registry.register(
            "rpc_server_refused",
            "gRPC calls refused before any handler ran (credential, authorization), by method and code",
            self.refused.clone(),
        );
    }
}
