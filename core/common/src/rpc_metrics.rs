//! Every gRPC call a server of this process takes, counted and timed by the authorization
//! layer ([`crate::authz::Authorize`]) for the `/metrics` of the head and of node daemons:
//! calls and their time to the response's headers (a stream's first answer) by method,
//! and refusals by method and code.
//!
//! Methods are labelled by their row in [`crate::authz::TABLE`]; a path with no row (what
//! a stranger may send) counts as `unknown`, so no caller can grow the label set. Every
//! call of every server passes here (a core worker's task streams too): a method's
//! counter and histogram are looked up by its `&'static str` once made, so an answered
//! call allocates nothing.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{LazyLock, RwLock};
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
    /// Each method's counter and histogram in the families above (shared handles).
    by_method: RwLock<HashMap<&'static str, (Counter<u64, AtomicU64>, Histogram)>>,
}

static METRICS: LazyLock<RpcMetrics> = LazyLock::new(|| RpcMetrics {
    calls: Family::default(),
    latency: Family::new_with_constructor(latency_histogram),
    refused: Family::default(),
    by_method: RwLock::new(HashMap::new()),
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
        let seconds = elapsed.as_secs_f64();
        if let Some((calls, latency)) = self.by_method.read().unwrap_or_else(|p| p.into_inner()).get(method) {
            calls.inc();
            latency.observe(seconds);
            return;
        }
        // A method's first call: its series are made, and kept at hand.
        let labels = vec![("method", method)];
        let calls = self.calls.get_or_create(&labels).clone();
        let latency = self.latency.get_or_create(&labels).clone();
        calls.inc();
        latency.observe(seconds);
        self.by_method.write().unwrap_or_else(|p| p.into_inner()).insert(method, (calls, latency));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_and_timed_by_method_and_unknown_paths_share_one_label() {
        let metrics = RpcMetrics {
            calls: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            refused: Family::default(),
            by_method: RwLock::new(HashMap::new()),
        };
        let get = method_label("/ionet.gcs.Gcs/GetAllNodes");
        for _ in 0..3 {
            metrics.answered(get, Duration::from_millis(2));
        }
        metrics.answered(method_label("/made.up/Path"), Duration::from_micros(10));
        metrics.answered(method_label("/another.made.up/Path"), Duration::from_micros(10));
        let mut registry = Registry::with_prefix("ionet");
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("ionet_rpc_server_calls_total{method=\"/ionet.gcs.Gcs/GetAllNodes\"} 3"), "{text}");
        assert!(text.contains("ionet_rpc_server_calls_total{method=\"unknown\"} 2"), "{text}");
        assert!(
            text.contains("ionet_rpc_server_latency_seconds_count{method=\"/ionet.gcs.Gcs/GetAllNodes\"} 3"),
            "{text}"
        );
    }
}
