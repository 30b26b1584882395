//! What a node keeping a sampled view asks the head for (bounded views, see the head's
//! `node_changes`): on a large cluster the head sends each node the rows of its own hash
//! bucket only, so a node it must know of outside its sample (a pull's source, a holder,
//! a node a request is pinned to) is looked up by id or address, and a request nothing
//! in the sample fits, or none has room for, is matched by the head against the whole
//! table (`FindNodes`). Rows found so are kept in the view for `FOUND_KEPT` (deltas of the
//! sample do not carry them), then dropped.

use std::time::{Duration, Instant};

use ionet_common::rpc::proto::common::{NodeInfo, ResourceQuantities};
use ionet_common::rpc::proto::gcs::{FindNodesRequest, GetAllNodesRequest};
use ionet_common::NodeId;
use ionet_common::ResourceSet;

use super::{Leases, Needs};

/// How long a row found outside the sample stays in the view.
pub(super) const FOUND_KEPT: Duration = Duration::from_secs(10);
/// How often a node asks the head for nodes with room while its requests wait.
const ROOM_SEARCH_EVERY: Duration = Duration::from_secs(1);
/// Nodes one search for a demand nothing in the sample fits asks for.
const FOUND_PER_SEARCH: u32 = 8;
/// Nodes one search for room asks for: a burst waiting here spreads over them.
const ROOM_PER_SEARCH: u32 = 32;
/// How long a look-up or search may take: requests wait on it.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an address the head said is no node's is not asked about again.
const UNKNOWN_KEPT: Duration = Duration::from_secs(5);
/// Most addresses remembered as no node's.
const UNKNOWN_MAX: usize = 10_000;
/// Most nodes one look-up names (the head's limit).
const LOOKED_UP_PER_CALL: usize = 1_000;

/// A request to the head that gives up after `ASK_TIMEOUT`.
fn asking<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(ASK_TIMEOUT);
    request
}

impl Leases {
    /// Whether the view holds only this node's sample of the table.
    pub fn view_is_sampled(&self) -> bool {
        self.lock().view_sampled
    }

    /// Learns the addresses of the nodes named (by id or address) from the head: what a
    /// sampled view does not hold. One look-up at a time, none of an address the head
    /// said lately is no node's; whether the head answered.
    pub(super) async fn look_up(&self, ids: &[NodeId], addresses: &[String]) -> bool {
        let Some(mut client) = self.control_store() else { return false };
        let unknown_lately =
            |address: &String| self.unknown_addresses.get(address).is_some_and(|at| at.elapsed() < UNKNOWN_KEPT);
        if ids.is_empty() && addresses.iter().all(unknown_lately) {
            return true; // asked lately: no node's
        }
        let _one = self.looking_up.lock().await;
        let ids: Vec<Vec<u8>> = ids.iter().filter(|id| self.address_of(id).is_none()).map(|id| id.to_vec()).collect();
        let addresses: Vec<String> = addresses
            .iter()
            .filter(|address| !self.node_addresses.contains(*address) && !unknown_lately(address))
            .cloned()
            .collect();
        if ids.is_empty() && addresses.is_empty() {
            return true; // another caller's look-up found them meanwhile
        }
        let request = GetAllNodesRequest {
            include_dead: false,
            node_ids: ids,
            addresses: addresses.clone(),
            ..Default::default()
        };
        match client.get_all_nodes(asking(request)).await {
            Ok(reply) => {
                self.learn_rows(&reply.into_inner().nodes);
                if self.unknown_addresses.len() >= UNKNOWN_MAX {
                    self.unknown_addresses.retain(|_, at| at.elapsed() < UNKNOWN_KEPT);
                }
                for address in addresses.into_iter().filter(|address| !self.node_addresses.contains(address)) {
                    if self.unknown_addresses.len() < UNKNOWN_MAX {
                        self.unknown_addresses.insert(address, Instant::now());
                    }
                }
                true
            }
            Err(status) => {
                tracing::debug!(%status, "the head did not answer a look-up of nodes");
                false
            }
        }
    }

    /// Looks up the addresses among `addresses` that a sampled view does not know (the
    /// holders of copies a leaving node hands over), so that they are known as nodes'.
    pub async fn look_up_addresses(&self, addresses: impl IntoIterator<Item = &String>) {
        if !self.view_is_sampled() {
            return;
        }
        let mut unknown: Vec<String> =
            addresses.into_iter().filter(|address| !self.knows_node_address(address)).cloned().collect();
        unknown.sort_unstable();
        unknown.dedup();
        for chunk in unknown.chunks(LOOKED_UP_PER_CALL) {
            if !self.look_up(&[], chunk).await {
                return;
            }
        }
    }

    /// Looks up node `node_id` and keeps its row in the view for a while (a request is
    /// pinned to it); whether it is there now.
    pub(super) async fn find_node(&self, node_id: &NodeId) -> bool {
        let Some(mut client) = self.control_store() else { return false };
        let request =
            GetAllNodesRequest { include_dead: false, node_ids: vec![node_id.to_vec()], ..Default::default() };
        match client.get_all_nodes(asking(request)).await {
            Ok(reply) => self.keep_found(&reply.into_inner().nodes) > 0,
            Err(_) => false,
        }
    }

    /// Asks the head for nodes of the whole table that fit `demand` with `needs` (with
    /// that much free now, when `free_now`: at most once a `ROOM_SEARCH_EVERY` per node),
    /// and keeps them in the view for a while; whether any was found.
    pub(super) async fn search(&self, demand: &ResourceSet, needs: &Needs, avoid: &[NodeId], free_now: bool) -> bool {
        let Some(mut client) = self.control_store() else { return false };
        let _one = if free_now {
            let mut last = self.room_searched.lock().await;
            if last.is_some_and(|at| at.elapsed() < ROOM_SEARCH_EVERY) {
                return false;
            }
            *last = Some(Instant::now());
            Some(last)
        } else {
            None
        };
        let mut avoided: Vec<Vec<u8>> = avoid.iter().map(|node| node.to_vec()).collect();
        avoided.push(self.node_id.to_vec());
        let request = FindNodesRequest {
            resources: Some(ResourceQuantities::from_set(demand)),
            label_selectors: needs.selectors.iter().map(ToString::to_string).collect(),
            min_reliability_bps: needs.min_reliability_bps,
            free_now,
            limit: if free_now { ROOM_PER_SEARCH } else { FOUND_PER_SEARCH },
            avoid: avoided,
        };
        match client.find_nodes(asking(request)).await {
            Ok(reply) => self.keep_found(&reply.into_inner().nodes) > 0,
            Err(status) => {
                tracing::debug!(%status, "the head did not answer a search of nodes");
                false
            }
        }
    }

    /// Puts rows found outside the sample in the view, until `FOUND_KEPT` has passed. A
    /// row found again replaces the one held (fresher; the requests sent there since are
    /// in it, so they no longer count against it here); a row the sample holds stays as
    /// it is (deltas keep it fresh). Returns how many rows the view holds of those found.
    pub(super) fn keep_found(&self, nodes: &[NodeInfo]) -> usize {
        let views = self.learn_rows(nodes);
        let now = Instant::now();
        let mut state = self.lock();
        let mut kept = 0;
        for view in views {
            let node_id = view.node_id;
            if node_id == self.node_id {
                continue;
            }
            let sampled = state.view.node(&node_id).is_some() && !state.found.contains_key(&node_id);
            if sampled {
                kept += 1;
                continue;
            }
            state.spilled.retain(|(spilled_to, _)| *spilled_to != node_id);
            if state.view.upsert_node(view).is_ok() {
                state.found.insert(node_id, now);
                kept += 1;
            }
        }
        kept
    }
}

impl super::state::LeaseState {
    /// Drops rows found outside the sample once `FOUND_KEPT` has passed, and forgets as
    /// found those `rows` (a delta of the sample) now carry.
    pub(super) fn expire_found(&mut self, rows: &[NodeId]) {
        for node_id in rows {
            self.found.remove(node_id);
        }
        let expired: Vec<NodeId> =
            self.found.iter().filter(|(_, at)| at.elapsed() >= FOUND_KEPT).map(|(node_id, _)| *node_id).collect();
        for node_id in expired {
            self.found.remove(&node_id);
            self.view.remove_node(&node_id);
        }
    }
}
