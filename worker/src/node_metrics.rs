//! A node daemon's Prometheus metrics: `GET /metrics` on its metrics port (`ionet start
//! --metrics-port`, a free one by default; Prometheus reads it through the head, which
//! lists every node at `/api/prometheus/targets` and fetches it). Served over TLS with the node's
//! certificate whenever the cluster speaks TLS, behind the same row of
//! [`ionet_common::authz::HTTP_TABLE`] as the head's; a node's numbers are its provider's
//! machine, so they are shown to the operator, the node itself and the head, which
//! fetches them for Prometheus with a credential minted for this node alone
//! (`ionet_gcs::node_scrape`). A scraper's token (either role) is refused here, saying to
//! scrape through the head: a daemon's provider could replay whatever it is sent (it has
//! been sent it all the same, so the operator should make a new one).
//!
//! What it shows: workers (idle and leased), leases running, granted and waiting,
//! bundles, resources total and free, each GPU's share leased out, the object store's
//! use and spills, heartbeats sent and registrations, and the gRPC calls of the node's
//! servers (counted and timed by the authorization layer). GPU utilisation and memory as
//! the hardware sees them (NVML) are not read yet: machines here have no GPU.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use ionet_common::authz::{Authorizer, Principal};
use ionet_common::resources::{ResourceSet, ACCELERATOR_PREFIX};
use ionet_common::NodeId;
use ionet_object_store::StoreStats;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::lease::LeaseReadings;

/// What one scrape reads of the node.
#[derive(Clone, Debug, Default)]
pub struct NodeReadings {
    pub leases: LeaseReadings,
    pub total: ResourceSet,
    pub store: StoreStats,
    /// Each GPU index and its model.
    pub gpus: Vec<(u32, String)>,
    /// Each GPU's use as its hardware reports it (none without an NVIDIA driver).
    pub gpu_use: Vec<crate::gpu::GpuUse>,
    pub heartbeats_sent: u64,
    pub registrations: u64,
    pub connected: bool,
    pub uptime_seconds: f64,
}

type Labels = Vec<(&'static str, String)>;

fn gauge(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge<f64, AtomicU64>> {
    let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    registry.register(name, help, family.clone());
    family
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let family = Family::<Labels, Counter<u64>>::default();
    registry.register(name, help, family.clone());
    family.get_or_create(&vec![]).inc_by(value);
}

fn single(registry: &mut Registry, name: &str, help: &str, value: f64) {
    gauge(registry, name, help).get_or_create(&vec![]).set(value);
}

/// `readings` as OpenMetrics text, every family prefixed `ionet_daemon_` (the calls too):
/// a scrape of a provider's daemon keeps only those names, so a daemon cannot speak for
/// the head's families (costs, credits, fees).
pub fn render(readings: &NodeReadings) -> String {
    let mut registry = Registry::with_prefix("ionet_daemon");
    let node = &mut registry;
    let leases = &readings.leases;
    let workers = gauge(node, "workers", "Worker processes of this node, by state");
    workers.get_or_create(&vec![("state", "idle".into())]).set(leases.idle_workers as f64);
    let busy = leases.workers.saturating_sub(leases.idle_workers);
    workers.get_or_create(&vec![("state", "leased".into())]).set(busy as f64);
    single(node, "leases_running", "Leases this node holds granted now", leases.leases as f64);
    counter(node, "leases_granted", "Leases this node granted since it started", leases.granted_total);
    single(node, "lease_requests_waiting", "Lease requests waiting here for resources", leases.waiting as f64);
    single(node, "bundles", "Placement-group bundles reserved on this node", leases.bundles as f64);
    let total = gauge(node, "resources_total", "What this node offers, by resource");
    let available = gauge(node, "resources_available", "What this node has free, by resource");
    for (family, set) in [(&total, &readings.total), (&available, &leases.available)] {
        for (resource, quantity) in set.iter().filter(|(name, _)| !name.starts_with(ACCELERATOR_PREFIX)) {
            family.get_or_create(&vec![("resource", resource.to_string())]).set(quantity.as_f64());
        }
    }
    let gpus = gauge(node, "gpu_leased_ratio", "The share of each GPU leased out (0 to 1)");
    for (index, leased) in &leases.gpus_leased {
        let model = readings.gpus.iter().find(|(at, _)| at == index).map(|(_, model)| model.clone());
        gpus.get_or_create(&vec![("gpu", index.to_string()), ("gpu_type", model.unwrap_or_default())]).set(*leased);
    }
    let model_of = |index: u32| {
        readings.gpus.iter().find(|(at, _)| *at == index).map(|(_, model)| model.clone()).unwrap_or_default()
    };
    let utilisation =
        gauge(node, "gpu_utilization_ratio", "The share of the last sample a kernel ran on each GPU (NVML; 0 to 1)");
    let used = gauge(node, "gpu_memory_used_bytes", "Memory in use on each GPU (NVML)");
    let installed = gauge(node, "gpu_memory_total_bytes", "Memory installed on each GPU (NVML)");
    for gpu in &readings.gpu_use {
        let labels = vec![("gpu", gpu.index.to_string()), ("gpu_type", model_of(gpu.index))];
        utilisation.get_or_create(&labels).set(gpu.utilisation);
        used.get_or_create(&labels).set(gpu.memory_used_bytes as f64);
        installed.get_or_create(&labels).set(gpu.memory_total_bytes as f64);
    }
    let store = &readings.store;
    single(node, "object_store_capacity_bytes", "The object store's shared memory", store.capacity as f64);
    let bytes = gauge(node, "object_store_bytes", "Bytes of objects, by where they are");
    bytes.get_or_create(&vec![("location", "memory".into())]).set(store.bytes_in_memory as f64);
    bytes.get_or_create(&vec![("location", "spilled".into())]).set(store.bytes_spilled as f64);
    bytes.get_or_create(&vec![("location", "pinned".into())]).set(store.bytes_pinned as f64);
    let objects = gauge(node, "object_store_objects", "Objects, by where they are");
    objects.get_or_create(&vec![("location", "memory".into())]).set(store.objects_in_memory as f64);
    objects.get_or_create(&vec![("location", "spilled".into())]).set(store.objects_spilled as f64);
    objects.get_or_create(&vec![("location", "unsealed".into())]).set(store.objects_unsealed as f64);
    counter(
        node,
        "heartbeats_sent",
        "Heartbeats this node sent the head (on a stream: queued on it)",
        readings.heartbeats_sent,
    );
    counter(node, "registrations", "Times this node registered with the head", readings.registrations);
    single(
        node,
        "connected",
        "1 while the head answers this node's heartbeats",
        f64::from(u8::from(readings.connected)),
    );
    single(node, "uptime_seconds", "Seconds since this daemon started", readings.uptime_seconds);
    ionet_common::rpc_metrics::rpc_metrics().register(node);
    let mut text = String::new();
    if let Err(err) = encode(&mut text, &registry) {
        tracing::error!(error = %err, "could not encode the node's metrics");
    }
    text
}

#[derive(Clone)]
struct Served {
    node_id: NodeId,
    read: Arc<dyn Fn() -> NodeReadings + Send + Sync>,
}

/// The metrics server's routes: `/metrics`, behind the authorization table.
pub fn router(node_id: NodeId, read: Arc<dyn Fn() -> NodeReadings + Send + Sync>, authorizer: Authorizer) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(Arc::new(authorizer), ionet_gcs::http::authorize))
        .with_state(Served { node_id, read })
}

async fn metrics(State(served): State<Served>, request: Request) -> Response {
    match ionet_gcs::http::principal(request.extensions()) {
        Some(Principal::Admin) => {}
        Some(Principal::Node(node) | Principal::Inspect(node)) if node == served.node_id => {}
        // A scraper's token is for the head alone (a daemon's provider could replay it):
        // node daemons are scraped through the head.
        Some(Principal::Metrics | Principal::NodeMetrics) => {
            let why = format!(
                "node daemons are scraped through the head (GET /api/nodes/{}/metrics there, as its \
                 /api/prometheus/targets lists them), never sent a scraper's token: this node's provider \
                 has been sent it, so make a new one",
                served.node_id.hex()
            );
            return (StatusCode::FORBIDDEN, why).into_response();
        }
        Some(other) => {
            let why = format!(
                "{other} may not read node {}'s metrics: the operator's credential, its own, or the head's for it",
                served.node_id.short()
            );
            return (StatusCode::FORBIDDEN, why).into_response();
        }
        None => return (StatusCode::FORBIDDEN, "the request did not pass authorization").into_response(),
    }
    let read = served.read.clone();
    match tokio::task::spawn_blocking(move || render(&read())).await {
        Ok(text) => ([(axum::http::header::CONTENT_TYPE, ionet_gcs::metrics::CONTENT_TYPE)], text).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("reading the metrics failed: {err}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_gpus_own_readings_are_shown_with_its_model() {
        let readings = NodeReadings {
            gpus: vec![(0, "A100-80GB".into()), (1, "A100-80GB".into())],
            gpu_use: vec![crate::gpu::GpuUse {
                index: 1,
                utilisation: 0.75,
                memory_used_bytes: 1 << 30,
                memory_total_bytes: 80 << 30,
            }],
            ..NodeReadings::default()
        };
        let text = render(&readings);
        assert!(text.contains(r#"ionet_daemon_gpu_utilization_ratio{gpu="1",gpu_type="A100-80GB"} 0.75"#), "{text}");
        assert!(text.contains(r#"ionet_daemon_gpu_memory_used_bytes{gpu="1",gpu_type="A100-80GB"} 1073741824"#));
        assert!(text.contains(r#"ionet_daemon_gpu_memory_total_bytes{gpu="1",gpu_type="A100-80GB"} 85899345920"#));
        assert!(!text.contains(r#"gpu_utilization_ratio{gpu="0""#), "a GPU without readings shows none");
        // Without a driver there are no readings, and the families are empty.
        let bare = render(&NodeReadings::default());
        assert!(!bare.contains("ionet_daemon_gpu_utilization_ratio{"), "{bare}");

        // The Grafana dashboard's node panels ask for families a daemon serves (its GPU
        // panels, empty where no GPU is real, included: Prometheus cannot check those names).
        let mut readings = readings;
        readings.leases.gpus_leased = vec![(1, 0.5)];
        let text = render(&readings);
        let dashboard = include_str!("../../examples/monitoring/grafana-dashboard.json");
        let asked: std::collections::BTreeSet<&str> = dashboard
            .match_indices("ionet_daemon_")
            .map(|(at, _)| {
                let name = &dashboard[at..];
                &name[..name.find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(name.len())]
            })
            .collect();
        assert!(asked.contains("ionet_daemon_gpu_utilization_ratio"), "{asked:?}");
        for name in asked {
            let served =
                text.lines().any(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])));
            assert!(served, "{name} is asked by the dashboard but not served: {text}");
        }
    }
}
