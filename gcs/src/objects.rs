//! `ionet memory` on the head (`Gcs/ListObjects`): who holds which object, where, how
//! large and why, asked now and never stored.
//!
//! Invariants:
//! - Each live node is asked (`NodeManager/ListObjects`) for its store's sealed objects
//!   and its worker processes' reference tables, with a credential minted for that node
//!   alone and living seconds (`Role::Inspect`): a node that keeps it can ask no other
//!   node. The node asks each worker with the job's credential it already holds; the head
//!   hands no job's credential to a node's word. Running jobs' drivers are asked by the
//!   head itself (`CoreWorker/ListReferences`, which a process answers for its own job
//!   only), each with a credential of its own job living seconds, at the one address its
//!   job registered.
//! - What a caller sees is its account's (the operator: all): nodes are told the account
//!   and every row is checked again here, by the payer of its holder's job or the
//!   account its store recorded, so a node answering for another tenant shows nothing.
//! - Asks go out at once, at most [`MAX_CONCURRENT`] at a time across every listing, and
//!   at most [`MAX_LISTINGS`] listings at once and one per account (others wait their
//!   turn: one tenant cannot hold every slot), each ask bounded
//!   by [`ASK_TIMEOUT`]; those that do not answer in time are counted, not waited for.
//! - What a holder says is its word on itself: a worker's rows count only for the job
//!   its node started it for, a reference's kind and state are one of the known words,
//!   and a stored object's size is the store's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ionet_common::auth::Bearer;
use ionet_common::credential::Issuer;
use ionet_common::rpc::proto::common::{JobState, NodeState};
use ionet_common::rpc::proto::gcs::{ListObjectsReply, ObjectRow};
use ionet_common::rpc::proto::node::{ListNodeObjectsRequest, NodeObject};
use ionet_common::rpc::proto::worker::{ListReferencesReply, ListReferencesRequest, ReferenceRow};
use ionet_common::rpc::{self, CoreWorkerClient, NodeManagerClient};
use ionet_common::JobId;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::state::GcsState;

/// How long one node or driver has to answer.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// The most asks in flight at once, across listings.
pub const MAX_CONCURRENT: usize = 64;
/// The most listings at once.
pub const MAX_LISTINGS: usize = 4;
/// The most rows one listing returns.
pub const MAX_ROWS: usize = 10_000;
/// How long the credentials a node or a driver is asked with live.
const ASK_CREDENTIAL_TTL: Duration = Duration::from_secs(10);
/// The most bytes one answer may carry.
const MAX_ANSWER_BYTES: usize = ionet_common::rpc::DEFAULT_MAX_MESSAGE_BYTES;
/// The words a reference's kind may be, and its state.
const REFERENCE_TYPES: [&str; 5] = ["LOCAL_REFERENCE", "CAPTURED_IN_OBJECT", "ACTOR_ARGUMENT", "LENT", "BORROWED"];
const STATES: [&str; 4] = ["PENDING", "INLINE", "IN_STORE", "FAILED"];

/// Whose objects a listing shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every account's (the operator).
    All,
    /// One account's.
    Account(String),
}

impl Scope {
    fn sees(&self, account: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Account(own) => own == account,
        }
    }
}

pub struct ObjectListing {
    state: Arc<GcsState>,
    /// Mints each ask's credential (a node's, a driver's job's).
    issuer: Issuer,
    /// Asks in flight, and listings running, across callers.
    asks: Arc<Semaphore>,
    listings: Semaphore,
    /// One listing at a time per account (the operator's is `""`).
    per_account: dashmap::DashMap<String, Arc<Semaphore>>,
}

/// One holder's answer: where it runs and what it holds.
struct Holder {
    kind: &'static str,
    address: String,
    node_id: Vec<u8>,
    references: ListReferencesReply,
}

impl ObjectListing {
    pub fn new(state: Arc<GcsState>, issuer: Issuer) -> Arc<Self> {
        Arc::new(Self {
            state,
            issuer,
            asks: Arc::new(Semaphore::new(MAX_CONCURRENT)),
            listings: Semaphore::new(MAX_LISTINGS),
            per_account: dashmap::DashMap::new(),
        })
    }

    /// The objects `scope` may see, largest first (at most `limit`, and [`MAX_ROWS`]);
    /// only `job`'s holders when one is named.
    pub async fn list(&self, scope: &Scope, job: Option<JobId>, limit: usize) -> ListObjectsReply {
        let limit = limit.clamp(1, MAX_ROWS);
        let account = match scope {
            Scope::All => String::new(),
            Scope::Account(account) => account.clone(),
        };
        // The account's own turn first, then one of the cluster's slots. An account's gate
        // is dropped from the map once nobody holds or waits for it (bounded by callers).
        let own = self.per_account.entry(account.clone()).or_insert_with(|| Arc::new(Semaphore::new(1))).clone();
        let Ok(own_turn) = own.clone().acquire_owned().await else { return ListObjectsReply::default() };
        let Ok(slot) = self.listings.acquire().await else { return ListObjectsReply::default() };
        let reply = self.ask_all(scope, &account, job, limit).await;
        drop(slot);
        drop(own_turn);
        self.per_account.remove_if(&account, |_, gate| Arc::strong_count(gate) <= 2 && gate.available_permits() == 1);
        reply
    }

    /// One listing's asks and merge (the caller holds its turns).
    async fn ask_all(&self, scope: &Scope, account: &str, job: Option<JobId>, limit: usize) -> ListObjectsReply {
        let account = account.to_string();
        let gate = &self.asks;
        let mut asks = tokio::task::JoinSet::new();
        for node in self.state.nodes(false) {
            if node.state != NodeState::Alive as i32 {
                continue;
            }
            let Ok(credential) = Bearer::new(&self.issuer.issue_inspect(&node.node_id, ASK_CREDENTIAL_TTL)) else {
                continue;
            };
            let Ok(channel) = rpc::connect_lazy(&node.address, &credential, ASK_TIMEOUT) else { continue };
            let (gate, request) =
                (gate.clone(), ListNodeObjectsRequest { account: account.clone(), limit: limit as u32 });
            asks.spawn(async move {
                let _turn = gate.acquire_owned().await;
                let mut client = NodeManagerClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES);
                let answer = tokio::time::timeout(ASK_TIMEOUT, client.list_objects(request)).await;
                match answer {
                    Ok(Ok(reply)) => Answer::Node(node.node_id, reply.into_inner()),
                    _ => Answer::Unanswered,
                }
            });
        }
        for driver in self.state.jobs() {
            let job_id = driver.job_id.clone();
            let Ok(driver_job) = JobId::from_bytes(&job_id) else { continue };
            let payer = self.state.payer_of(&driver_job);
            // One address, as the job registered it (no list for the head to go round).
            if driver.state != JobState::Running as i32
                || driver.driver_address.is_empty()
                || driver.driver_address.contains(',')
                || !scope.sees(&payer)
                || job.is_some_and(|job| job.as_bytes() != job_id.as_slice())
            {
                continue;
            }
            let Ok(credential) = Bearer::new(&self.issuer.issue_job(&job_id, &payer, ASK_CREDENTIAL_TTL)) else {
                continue;
            };
            let Ok(channel) = rpc::connect_lazy(&driver.driver_address, &credential, ASK_TIMEOUT) else { continue };
            let (gate, address) = (gate.clone(), driver.driver_address.clone());
            let request = ListReferencesRequest { limit: limit as u32 };
            asks.spawn(async move {
                let _turn = gate.acquire_owned().await;
                let mut client = CoreWorkerClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES);
                let answer = tokio::time::timeout(ASK_TIMEOUT, client.list_references(request)).await;
                match answer {
                    // A driver speaks for its own job only.
                    Ok(Ok(reply)) if reply.get_ref().job_id == job_id => {
                        let references = reply.into_inner();
                        Answer::Holder(Holder {
                            kind: "DRIVER",
                            address,
                            node_id: references.node_id.clone(),
                            references,
                        })
                    }
                    _ => Answer::Unanswered,
                }
            });
        }
        let mut merged = Merge::default();
        while let Some(answer) = asks.join_next().await {
            match answer {
                Ok(Answer::Node(node_id, reply)) => {
                    merged.truncated |= reply.truncated;
                    for object in reply.objects {
                        if scope.sees(&object.account) {
                            merged.store.entry(object.object_id.clone()).or_default().push((node_id.clone(), object));
                        }
                    }
                    for worker in reply.workers {
                        let Some(references) = worker.references.filter(|_| worker.answered) else {
                            merged.unanswered += 1;
                            continue;
                        };
                        // A worker speaks for the job its node started it for, no other.
                        if references.job_id != worker.job_id {
                            merged.unanswered += 1;
                            continue;
                        }
                        merged.holders.push(Holder {
                            kind: "WORKER",
                            address: worker.address,
                            node_id: node_id.clone(),
                            references,
                        });
                    }
                }
                Ok(Answer::Holder(holder)) => merged.holders.push(holder),
                Ok(Answer::Unanswered) | Err(_) => merged.unanswered += 1,
            }
        }
        // A holder's rows count when its job is one the caller may see (a node's word on
        // which job a worker runs is checked against the head's own table).
        merged.holders.retain(|holder| {
            JobId::from_bytes(&holder.references.job_id).is_ok_and(|holder_job| {
                scope.sees(&self.state.payer_of(&holder_job)) && job.is_none_or(|job| job == holder_job)
            })
        });
        merged.rows(job.is_none(), limit)
    }
}

enum Answer {
    Node(Vec<u8>, ionet_common::rpc::proto::node::ListNodeObjectsReply),
    Holder(Holder),
    Unanswered,
}

#[derive(Default)]
struct Merge {
    /// Each stored object's copies: (node id, the node's row).
    store: HashMap<Vec<u8>, Vec<(Vec<u8>, NodeObject)>>,
    holders: Vec<Holder>,
    unanswered: u32,
    truncated: bool,
}

impl Merge {
    /// One row per holder's reference (sized and located by the stores), then one per
    /// stored copy nobody who answered holds (when `store_rows`); largest first.
    fn rows(self, store_rows: bool, limit: usize) -> ListObjectsReply {
        let Merge { store, holders, unanswered, truncated } = self;
        let mut held: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
        let mut rows = Vec::new();
        for holder in &holders {
            for reference in &holder.references.rows {
                held.insert(&reference.object_id);
                rows.push(holder_row(holder, reference, store.get(&reference.object_id)));
            }
        }
        if store_rows {
            for (object_id, copies) in &store {
                if held.contains(object_id.as_slice()) {
                    continue;
                }
                let store_node_ids: Vec<Vec<u8>> = copies.iter().map(|(node, _)| node.clone()).collect();
                for (node_id, object) in copies {
                    rows.push(ObjectRow {
                        object_id: object_id.clone(),
                        size: object.size,
                        reference_type: if object.primary { "PINNED_IN_MEMORY" } else { "COPY" }.into(),
                        holder_type: "STORE".into(),
                        node_id: node_id.clone(),
                        store_node_ids: store_node_ids.clone(),
                        spilled: object.spilled,
                        state: "IN_STORE".into(),
                        owner_address: object.owner_address.clone(),
                        ..ObjectRow::default()
                    });
                }
            }
        }
        let truncated = truncated || rows.len() > limit || holders.iter().any(|holder| holder.references.truncated);
        rows.sort_unstable_by(|a, b| {
            b.size.cmp(&a.size).then_with(|| a.object_id.cmp(&b.object_id)).then_with(|| a.pid.cmp(&b.pid))
        });
        rows.truncate(limit);
        ListObjectsReply { objects: rows, unanswered, truncated }
    }
}

fn holder_row(holder: &Holder, reference: &ReferenceRow, copies: Option<&Vec<(Vec<u8>, NodeObject)>>) -> ObjectRow {
    let copies = copies.map(Vec::as_slice).unwrap_or_default();
    let stored_size = copies.iter().map(|(_, object)| object.size).max().unwrap_or(0);
    let known = |word: &str, words: &[&str]| if words.contains(&word) { word.to_string() } else { String::new() };
    ObjectRow {
        object_id: reference.object_id.clone(),
        // The store's word on a stored object's size, the holder's on a value it keeps.
        size: if stored_size > 0 { stored_size } else { reference.size },
        reference_type: known(&reference.reference_type, &REFERENCE_TYPES),
        job_id: holder.references.job_id.clone(),
        holder_address: holder.address.clone(),
        pid: holder.references.pid,
        holder_type: holder.kind.into(),
        node_id: holder.node_id.clone(),
        store_node_ids: copies.iter().map(|(node, _)| node.clone()).collect(),
        spilled: copies.iter().any(|(_, object)| object.spilled),
        state: known(&reference.state, &STATES),
        owned: reference.owned,
        handles: reference.handles,
        lent: reference.lent,
        owner_address: reference.owner_address.clone(),
    }
}

/// The host part of a process's address (`https://10.0.0.2:4000` → `10.0.0.2`).
fn host_of(address: &str) -> &str {
    let bare = address.split("://").last().unwrap_or(address);
    match bare.rsplit_once(':') {
        Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => bare,
    }
}

/// A row as Ray's state API names its fields (plus ionet's: where it is stored, whether
/// its holder owns it, its handles and lends).
pub fn object_json(row: &ObjectRow) -> Value {
    // Addresses are the holders' and nodes' words: no control characters reach a terminal.
    let text = |value: &str| {
        let clean: String = value.chars().filter(|c| !c.is_control()).collect();
        (!clean.is_empty()).then_some(clean)
    };
    json!({
        "object_id": hex::encode(&row.object_id),
        "object_size": row.size,
        "reference_type": row.reference_type,
        "type": row.holder_type,
        "pid": (row.pid != 0).then_some(row.pid),
        "ip": text(host_of(&row.holder_address)),
        "node_id": (!row.node_id.is_empty()).then(|| hex::encode(&row.node_id)),
        "job_id": (!row.job_id.is_empty()).then(|| hex::encode(&row.job_id)),
        "task_status": text(&row.state),
        "owned": row.owned,
        "handles": row.handles,
        "lent": row.lent,
        "owner_address": text(&row.owner_address),
        "holder_address": text(&row.holder_address),
        "store_node_ids": row.store_node_ids.iter().map(hex::encode).collect::<Vec<_>>(),
        "spilled": row.spilled,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holders_host_is_read_from_its_address() {
        assert_eq!(host_of("https://10.0.0.2:4000"), "10.0.0.2");
        assert_eq!(host_of("127.0.0.1:80"), "127.0.0.1");
        assert_eq!(host_of("[::1]:80"), "::1");
    }

    fn reference(id: u8, size: u64, kind: &str) -> ReferenceRow {
        ReferenceRow { object_id: vec![id], size, reference_type: kind.into(), ..ReferenceRow::default() }
    }

    fn stored(id: u8, size: u64, primary: bool) -> NodeObject {
        NodeObject { object_id: vec![id], size, primary, account: "acme".into(), ..NodeObject::default() }
    }

    #[test]
    fn holders_are_sized_by_the_stores_and_unheld_copies_are_listed_largest_first() {
        let mut merge = Merge::default();
        merge.store.insert(vec![1], vec![(vec![0xa], stored(1, 800, true)), (vec![0xb], stored(1, 800, false))]);
        merge.store.insert(vec![2], vec![(vec![0xa], stored(2, 300, true))]);
        let references = ListReferencesReply {
            rows: vec![reference(1, 0, "BORROWED"), reference(3, 50, "LOCAL_REFERENCE")],
            pid: 42,
            job_id: vec![0, 0, 0, 1],
            ..ListReferencesReply::default()
        };
        merge.holders.push(Holder { kind: "WORKER", address: "10.0.0.1:5".into(), node_id: vec![0xb], references });
        let reply = merge.rows(true, 10);
        let listed: Vec<(u8, u64, &str, &str)> = reply
            .objects
            .iter()
            .map(|row| (row.object_id[0], row.size, row.reference_type.as_str(), row.holder_type.as_str()))
            .collect();
        assert_eq!(
            listed,
            vec![
                (1, 800, "BORROWED", "WORKER"),
                (2, 300, "PINNED_IN_MEMORY", "STORE"),
                (3, 50, "LOCAL_REFERENCE", "WORKER")
            ]
        );
        assert_eq!(reply.objects[0].store_node_ids, vec![vec![0xa], vec![0xb]]);
        assert_eq!(reply.objects[0].pid, 42);
        assert!(!reply.truncated);
    }

    #[test]
    fn a_listing_past_its_limit_keeps_the_largest_and_says_so() {
        let mut merge = Merge::default();
        for id in 0..5u8 {
            merge.store.insert(vec![id], vec![(vec![0xa], stored(id, u64::from(id) * 10, true))]);
        }
        let reply = merge.rows(true, 2);
        assert!(reply.truncated);
        assert_eq!(reply.objects.iter().map(|row| row.size).collect::<Vec<_>>(), vec![40, 30]);
        assert!(Merge::default().rows(false, 2).objects.is_empty());
    }

    /// One listing at a time per account: another account's goes ahead meanwhile, and an
    /// account's gate goes once nobody holds it.
    #[tokio::test]
    async fn an_account_lists_one_at_a_time_and_others_go_ahead() {
        let clock = ionet_common::clock::ManualClock::new(1_000_000);
        let config = ionet_common::config::ClusterConfig::default();
        let storage = Arc::new(crate::storage::MemoryStorage::new());
        let state = GcsState::open(config, storage, Arc::new(clock)).await.unwrap();
        let listing = ObjectListing::new(state, Issuer::generate());
        let acme = Scope::Account("acme".into());
        // Acme's turn is taken (a listing of acme's under way).
        let gate = listing.per_account.entry("acme".into()).or_insert_with(|| Arc::new(Semaphore::new(1))).clone();
        let held = gate.clone().acquire_owned().await.unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(200), listing.list(&acme, None, 10)).await;
        assert!(waiting.is_err(), "acme's second listing waits its turn");
        let rival = Scope::Account("rival".into());
        let theirs = tokio::time::timeout(Duration::from_secs(10), listing.list(&rival, None, 10)).await;
        assert!(theirs.is_ok(), "another account's goes ahead");
        drop(held);
        drop(gate);
        let done = tokio::time::timeout(Duration::from_secs(10), listing.list(&acme, None, 10)).await;
        assert!(done.is_ok(), "acme's turn comes once the first is done");
        assert!(listing.per_account.is_empty(), "no gate is kept for nobody");
    }

    #[test]
    fn a_scope_sees_its_own_account_only() {
        assert!(Scope::All.sees("anyone"));
        assert!(Scope::Account("acme".into()).sees("acme"));
        assert!(!Scope::Account("acme".into()).sees("rival"));
    }
}
