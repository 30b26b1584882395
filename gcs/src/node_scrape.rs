//! Node daemons' metrics, scraped through the head.
//!
//! A provider's daemon is a stranger's machine: whatever credential a scraper sends it,
//! its provider can read and replay. So Prometheus never sends one there. Its service
//! discovery (`GET /api/prometheus/targets`) lists every live node as the head itself
//! with the path `/api/nodes/{node_id}/metrics`, and the head fetches that node's
//! `/metrics` with a credential minted for that node alone, for a few seconds
//! (`Role::Inspect`, which every other node refuses), then hands the text back as it is.
//! A provider learns nothing it could use against another provider, and the scraper's
//! token (`--role node-metrics`) stays between Prometheus and the head.
//!
//! The head fetches a node only at the metrics address it named when it registered, and
//! only when that address is the very IP its registration came from (loopback for a node
//! on the head's machine), over https in a cluster that speaks TLS (trusting the cluster
//! CA only): a provider cannot point the head at another machine, nor make it speak
//! plain HTTP. An answer is read up to [`MAX_BODY`] within [`FETCH_TIMEOUT`], at most
//! [`MAX_FETCHES`] at once; the scrapers' tokens alone (and the operator's) make the head
//! fetch. Registrations that reach the head through a proxy on its own machine all come
//! from loopback, and may then name any loopback port: run none in front of it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use ionet_common::credential::Issuer;
use ionet_common::rpc::proto::common::{NodeInfo, NodeState};
use ionet_common::NodeId;

use crate::state::GcsState;

/// How long the head waits for a node's metrics (less than Prometheus's own 10 s, so its
/// scrape sees why).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(8);
/// The most fetches at once (more wait their turn, within [`FETCH_TIMEOUT`]).
const MAX_FETCHES: usize = 32;
/// The most of a refusal's text kept.
const MAX_REFUSAL: usize = 512;
/// The largest answer taken from a node (Prometheus's `body_size_limit` for a daemon).
pub const MAX_BODY: usize = 4 << 20;
/// How long the credential the head sends a node is good for.
const CREDENTIAL_TTL: Duration = Duration::from_secs(30);

/// The head's side of scraping node daemons.
pub struct NodeScrape {
    state: Arc<GcsState>,
    issuer: Issuer,
    /// One HTTP client for every fetch (its connections are kept), trusting the cluster
    /// CAs this process trusts: made again when it trusts more (the count it was made for).
    client: Mutex<Option<(usize, reqwest::Client)>>,
    fetches: tokio::sync::Semaphore,
}

/// Why a node's metrics could not be given: the HTTP status and what to say.
pub type Refusal = (StatusCode, String);

impl NodeScrape {
    pub fn new(state: Arc<GcsState>, issuer: Issuer) -> Self {
        Self { state, issuer, client: Mutex::new(None), fetches: tokio::sync::Semaphore::new(MAX_FETCHES) }
    }

    /// Every live node as Prometheus's HTTP service discovery lists targets: the head at
    /// `head` (the address the scraper reached it by) with each node's path, labelled with
    /// the node's id, GPU model, whether it is the head's, and its own address as
    /// `instance`. A node whose metrics address the head would not fetch is left out.
    pub fn targets(&self, head: &str) -> Vec<serde_json::Value> {
        let mut targets = Vec::new();
        for node in self.state.nodes(false) {
            let Ok(id) = NodeId::from_bytes(&node.node_id) else { continue };
            match self.target(&id, &node) {
                Ok((scheme, host_port)) => {
                    let gpu_type = node.gpus.first().map_or(node.accelerator_type.clone(), |gpu| gpu.model.clone());
                    targets.push(serde_json::json!({
                        "targets": [head],
                        "labels": {
                            "__scheme__": scheme,
                            "__metrics_path__": format!("/api/nodes/{}/metrics", id.hex()),
                            "instance": host_port,
                            "node_id": id.hex(),
                            "gpu_type": crate::metrics::label_text(&gpu_type),
                            "is_head": node.is_head.to_string(),
                        },
                    }));
                }
                Err(why) if node.metrics_address.is_empty() => tracing::trace!(node = %id.short(), why),
                Err(why) => {
                    tracing::warn!(node = %id.short(), metrics = %node.metrics_address, "not listed for scraping: {why}")
                }
            }
        }
        targets
    }

    /// The scheme and `host:port` node `id` serves its metrics at, or why the head would
    /// not fetch them there.
    fn target(&self, id: &NodeId, node: &NodeInfo) -> Result<(String, String), String> {
        let (scheme, host_port) = node.metrics_address.split_once("://").ok_or("no metrics address")?;
        let tls = ionet_common::rpc::is_tls_address(&node.address);
        if scheme != if tls { "https" } else { "http" } {
            return Err(format!(
                "a node of a {} cluster serves its metrics over {}",
                if tls { "TLS" } else { "plain" },
                if tls { "https" } else { "http" }
            ));
        }
        let (host, port) = host_port.rsplit_once(':').ok_or("no port")?;
        port.parse::<u16>().map_err(|_| "no port")?;
        let host: std::net::IpAddr =
            host.trim_start_matches('[').trim_end_matches(']').parse().map_err(|_| "its host is not an IP address")?;
        let from = self.state.registered_from(id).ok_or("its registration's address is unknown to this head")?;
        let same = if from.is_loopback() { host.is_loopback() } else { host == from };
        if !same {
            return Err(format!("it names {host}, and registered from {from}"));
        }
        Ok((scheme.to_string(), host_port.to_string()))
    }

    fn client(&self) -> Result<reqwest::Client, Refusal> {
        let mut cached = self.client.lock().unwrap_or_else(|p| p.into_inner());
        let trusting = ionet_common::tls::trusted_count();
        if let Some((_, client)) = cached.as_ref().filter(|(count, _)| *count == trusting) {
            return Ok(client.clone());
        }
        let trusted = ionet_common::tls::trusted_pems();
        let failed = |why: String| (StatusCode::INTERNAL_SERVER_ERROR, format!("the head's HTTP client: {why}"));
        let mut builder = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .tls_built_in_root_certs(false)
            .redirect(reqwest::redirect::Policy::none());
        for pem in &trusted {
            let certificate = reqwest::Certificate::from_pem(pem.as_bytes()).map_err(|err| failed(err.to_string()))?;
            builder = builder.add_root_certificate(certificate);
        }
        let client = builder.build().map_err(|err| failed(err.to_string()))?;
        *cached = Some((trusted.len(), client.clone()));
        Ok(client)
    }

    /// Node `id`'s metrics text, fetched now with a credential minted for it alone.
    pub async fn fetch(&self, id: &NodeId) -> Result<String, Refusal> {
        let unknown = || (StatusCode::NOT_FOUND, format!("no live node has the id {}", id.hex()));
        let node = self.state.node(id).ok_or_else(unknown)?;
        if node.state == NodeState::Dead as i32 {
            return Err(unknown());
        }
        let (scheme, host_port) = self
            .target(id, &node)
            .map_err(|why| (StatusCode::NOT_FOUND, format!("node {} is not scraped: {why}", id.short())))?;
        let busy = || (StatusCode::SERVICE_UNAVAILABLE, format!("the head is fetching {MAX_FETCHES} nodes' metrics"));
        let _turn = tokio::time::timeout(FETCH_TIMEOUT, self.fetches.acquire())
            .await
            .map_err(|_| busy())?
            .map_err(|_| busy())?;
        let credential = self.issuer.issue_inspect(&node.node_id, CREDENTIAL_TTL);
        let unreachable = |why: String| (StatusCode::BAD_GATEWAY, format!("node {}'s metrics: {why}", id.short()));
        let mut response = self
            .client()?
            .get(format!("{scheme}://{host_port}/metrics"))
            .bearer_auth(credential)
            .send()
            .await
            .map_err(|err| unreachable(err.to_string()))?;
        let status = response.status();
        let limit = if status.is_success() { MAX_BODY } else { MAX_REFUSAL };
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|err| unreachable(err.to_string()))? {
            if body.len() + chunk.len() > limit {
                if !status.is_success() {
                    body.extend_from_slice(&chunk[..limit - body.len()]);
                    break;
                }
                return Err(unreachable(format!("its answer is larger than {MAX_BODY} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            return Err(unreachable(format!("it answered {status}: {}", String::from_utf8_lossy(&body))));
        }
        String::from_utf8(body).map_err(|_| unreachable("its answer is not UTF-8 text".into()))
    }
}
