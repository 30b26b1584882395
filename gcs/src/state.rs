//! The control store's tables and the rules that change them.
//!
//! Invariants:
//! - The node and job tables live in memory (DashMaps) and are written through to
//!   storage on every change of membership or state. Heartbeats touch memory only:
//!   they carry volatile data (available resources, liveness) that a restarted head
//!   learns again when the nodes register again (their streams break), or by calls
//!   within a quarter of the timeout.
//! - A node's `last_heartbeat_ms` and every time in the tables come from the control
//!   store's [`Clock`], never from a node's report.
//! - After a restart from storage, nodes that were alive get a fresh deadline, so a
//!   node that never comes back is declared dead one timeout later, and one that is
//!   still running re-registers and carries on.
//! - Every change of membership publishes exactly one [`ClusterEvent`], numbered in
//!   order by `sequence`.
//! - At most `max_dead_nodes` dead rows are kept once metering allows more to go (no
//!   lease open, the death in a closed epoch): the longest dead are forgotten, each
//!   leaving its trust record (key, reliability, GPU check history) in storage alone,
//!   taken back if the id registers again. A node id stays bound to its first key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use ionet_common::authz::Principal;
use ionet_common::clock::Clock;
use ionet_common::config::ClusterConfig;
use ionet_common::rpc::proto::common::{
    GpuCheck, GpuCheckState, JobInfo, JobState, NodeInfo, NodeState, ResourceQuantities,
};
use ionet_common::rpc::proto::gcs::{cluster_event::Event, ClusterEvent};
use ionet_common::{IonetError, JobId, NodeId, ObjectId};
use prost::Message;
use sha2::Digest;
use tokio::sync::broadcast;

use crate::error::{GcsError, GcsResult};
use crate::node_changes::NodeChanges;
use crate::storage::{GcsStorage, StorageWrite, Table};

const JOB_COUNTER_KEY: &[u8] = b"job_counter";
const CLUSTER_ID_KEY: &[u8] = b"cluster_id";
/// Set (in `Meta`) with the first node ever forgotten: until then no registration looks
/// for a forgotten record.
const NODES_FORGOTTEN_KEY: &[u8] = b"nodes_forgotten";
/// Most objects one `ObjectsMoved` call may record.
const MAX_MOVES_PER_CALL: usize = 100_000;
/// How many events a slow subscriber may fall behind before its stream is cut.
const EVENT_BUFFER: usize = 4096;
/// How far (in basis points) a node's reliability score moves before views learn it.
const SCORE_MOVE_LOGGED: u32 = 50;
/// How often the health check looks for scores that moved: a score moves slowly, and a
/// sweep at each check (four a second, every row) stood out in an idle 10,000-node
/// head's profile.
const SCORE_SWEEP_MS: u64 = 1_000;
/// How long a search of the node table that found nothing is answered from memory.
const NOTHING_FOUND_KEPT: std::time::Duration = std::time::Duration::from_secs(1);
/// Most searches remembered as having found nothing.
const NOTHING_FOUND_MAX: usize = 4_096;

/// The most head stalls excuse a node's silence: this many heartbeat timeouts.
const MAX_STALL_ALLOWANCE: u64 = 3;
/// Stalls remembered (the latest).
const MAX_STALLS_KEPT: usize = 256;

/// A node's row encoded once for every reply that carries it.
#[derive(Clone)]
struct EncodedRow {
    dead: bool,
    bytes: prost::bytes::Bytes,
}

/// A read of the node table as encoded rows (`NodeRows`): every living row, or those
/// changed since the reader's version.
pub struct NodeRowsRead {
    pub rows: Vec<prost::bytes::Bytes>,
    pub removed: Vec<NodeId>,
    pub version: u64,
    pub delta: bool,
    /// The rows are of the reader's sample only (see `node_changes`).
    pub sampled: bool,
}

/// Whether a row fits a search of the node table ([`GcsState::find_nodes`]).
pub enum Fit {
    Yes,
    No,
    /// It fits, but the asker left it out.
    Avoided,
}

/// A read of the node table: every row, or those changed since the reader's version.
pub struct NodesRead {
    pub nodes: Vec<NodeInfo>,
    pub removed: Vec<NodeId>,
    pub version: u64,
    pub delta: bool,
    /// The rows are of the reader's sample only (see `node_changes`).
    pub sampled: bool,
}

/// The rows a read of the node table carries, each with its latest change.
struct Wanted {
    rows: Vec<(NodeId, u64)>,
    version: u64,
    delta: bool,
    sampled: bool,
}

pub struct GcsState {
    pub(crate) config: ClusterConfig,
    storage: Arc<dyn GcsStorage>,
    clock: Arc<dyn Clock>,
    nodes: DashMap<NodeId, NodeInfo>,
    /// Each node id's key, bound at its first registration (taken atomically, before the
    /// registration is written, so two first registrations of one id cannot both win).
    node_keys: DashMap<NodeId, Vec<u8>>,
    jobs: DashMap<JobId, JobInfo>,
    events: broadcast::Sender<ClusterEvent>,
    sequence: AtomicU64,
    /// Serialises job id allocation (a read-modify-write of the stored counter).
    job_counter: tokio::sync::Mutex<()>,
    cluster_id: String,
    started_at_ms: u64,
    incarnation: u64,
    /// What each account keeps in the KV (its quota's use), counted from storage at
    /// open and kept with every tenant put and delete, which hold this lock throughout.
    kv_use: Arc<std::sync::Mutex<HashMap<String, KvUse>>>,
    /// Jobs whose payer cannot cover their leases, with why (kept by metering, told to
    /// every node with its heartbeat).
    unfunded: std::sync::RwLock<HashMap<JobId, String>>,
    /// Objects whose primary copy a node moved elsewhere before it left: (the address
    /// it moved from, the address holding it now).
    moves: DashMap<ObjectId, (String, String)>,
    /// Heartbeats taken since this process started (a metric).
    heartbeats: AtomicU64,
    /// Heartbeat streams nodes opened since this process started.
    heartbeat_streams: AtomicU64,
    /// Times this head stood still (its health checks ran late): (when it went on, for
    /// how long), the latest last. A node is not blamed for silence the head caused.
    stalls: std::sync::Mutex<std::collections::VecDeque<(u64, u64)>>,
    /// Reads of the node table answered whole, and by delta ([`GcsState::nodes_since`]).
    node_reads: [AtomicU64; 2],
    /// Which node rows changed when, for delta reads of the table.
    node_changes: std::sync::Mutex<NodeChanges>,
    /// Rows as [`GcsState::node_rows_since`] last encoded them, with the change they are of.
    encoded_rows: DashMap<NodeId, (u64, EncodedRow)>,
    /// Each node's reliability score as views last learnt it: the score moves with time
    /// and counts no row change logs, so a move of [`SCORE_MOVE_LOGGED`] is logged as one.
    listed_scores: DashMap<NodeId, u32>,
    /// When the health check last swept the scores (`u64::MAX`: never).
    scores_swept_ms: AtomicU64,
    /// The address each node's latest registration came from (this process's runs only):
    /// the one host a node may name for its metrics server.
    registered_from: DashMap<NodeId, std::net::IpAddr>,
    /// Held (shared) by each registration and each writer of a node row, and (alone) by
    /// [`GcsState::forget_dead_nodes`]: none meets a row half forgotten, none lands in a
    /// row while it is forgotten.
    membership: tokio::sync::RwLock<()>,
    /// Searches of [`GcsState::find_nodes`] that found nothing lately, by what they asked:
    /// asked again within `NOTHING_FOUND_KEPT`, they find nothing again without a scan
    /// (every node of a full cluster asking each second would scan it N times a second).
    nothing_found: std::sync::Mutex<HashMap<[u8; 32], std::time::Instant>>,
    /// Whether any node was ever forgotten ([`NODES_FORGOTTEN_KEY`]).
    nodes_forgotten: std::sync::atomic::AtomicBool,
}

/// One account's use of the KV.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvUse {
    /// Bytes of its keys (as stored) and values.
    pub bytes: u64,
    /// Its namespaces, with how many keys each holds.
    pub namespaces: HashMap<String, u64>,
}

impl KvUse {
    /// Counts a stored entry (`key` as stored, under the account's prefix already cut).
    fn add(&mut self, namespace: &str, stored: u64) {
        self.bytes += stored;
        *self.namespaces.entry(namespace.to_string()).or_default() += 1;
    }

    fn remove(&mut self, namespace: &str, stored: u64) {
        self.bytes = self.bytes.saturating_sub(stored);
        if let Some(keys) = self.namespaces.get_mut(namespace) {
            *keys = keys.saturating_sub(1);
            if *keys == 0 {
                self.namespaces.remove(namespace);
            }
        }
    }
}

/// The account and namespace of a tenant's stored KV key (`\x01account\x01[job\x01]ns\0key`);
/// `None` for the operator's.
fn tenant_of_stored_key(stored: &[u8]) -> Option<(String, String)> {
    let rest = stored.strip_prefix(&[1u8][..])?;
    let end = rest.iter().position(|&byte| byte == 1)?;
    let account = String::from_utf8_lossy(&rest[..end]).into_owned();
    let mut rest = &rest[end + 1..];
    let namespace_end = rest.iter().position(|&byte| byte == 0)?;
    // A job's exports carry the job between the account and the namespace.
    if let Some(job_end) = rest[..namespace_end].iter().position(|&byte| byte == 1) {
        rest = &rest[job_end + 1..];
    }
    let namespace_end = rest.iter().position(|&byte| byte == 0)?;
    Some((account, String::from_utf8_lossy(&rest[..namespace_end]).into_owned()))
}

/// What a forgotten node leaves behind: what its next registration takes from its row
/// (its key, first registration, reliability with the time it has been gone, GPU check
/// history and the GPUs it was checked with), and nothing else.
fn trust_record(row: &NodeInfo) -> NodeInfo {
    NodeInfo {
        node_id: row.node_id.clone(),
        public_key: row.public_key.clone(),
        registered_at_ms: row.registered_at_ms,
        last_heartbeat_ms: row.last_heartbeat_ms,
        state: row.state,
        death_cause: row.death_cause.clone(),
        gpus: row.gpus.clone(),
        accelerator_type: row.accelerator_type.clone(),
        gpu_check: row.gpu_check.clone(),
        reliability: row.reliability.clone(),
        ..Default::default()
    }
}

/// Runs a storage call on the blocking pool: storage does file I/O and fsync.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> GcsResult<T> + Send + 'static) -> GcsResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|err| GcsError::Storage(format!("storage task failed: {err}")))?
}

fn decode<M: Message + Default>(what: &str, bytes: &[u8]) -> GcsResult<M> {
    M::decode(bytes).map_err(|err| GcsError::Corrupt { what: what.to_string(), why: err.to_string() })
}

fn invalid(message: String) -> GcsError {
    GcsError::Ionet(IonetError::InvalidArgument(message))
}

impl GcsState {
    /// Loads the tables from `storage` (empty for a new store) and prepares the event stream.
    pub async fn open(
        config: ClusterConfig,
        storage: Arc<dyn GcsStorage>,
        clock: Arc<dyn Clock>,
    ) -> GcsResult<Arc<Self>> {
        let now = clock.now_ms();
        let loader = storage.clone();
        let (nodes, jobs, cluster_id, kv_use, moved, nodes_forgotten) = blocking(move || {
            let nodes = loader.scan_prefix(Table::Nodes, b"")?;
            let moved = loader.scan_prefix(Table::ObjectMoves, b"")?;
            let jobs = loader.scan_prefix(Table::Jobs, b"")?;
            let mut kv_use: HashMap<String, KvUse> = HashMap::new();
            for (key, value) in loader.scan_prefix(Table::Kv, &[1])? {
                if let Some((account, namespace)) = tenant_of_stored_key(&key) {
                    kv_use.entry(account).or_default().add(&namespace, (key.len() + value.len()) as u64);
                }
            }
            let fresh_id = hex::encode(rand::random::<[u8; 8]>());
            loader.put_if_absent(Table::Meta, CLUSTER_ID_KEY, fresh_id.as_bytes())?;
            let cluster_id = loader.get(Table::Meta, CLUSTER_ID_KEY)?.unwrap_or_default();
            let nodes_forgotten = loader.get(Table::Meta, NODES_FORGOTTEN_KEY)?.is_some();
            Ok((nodes, jobs, String::from_utf8_lossy(&cluster_id).into_owned(), kv_use, moved, nodes_forgotten))
        })
        .await?;

        let node_table = DashMap::new();
        let node_keys = DashMap::new();
        for (key, bytes) in nodes {
            let mut node: NodeInfo = decode(&format!("node {}", hex::encode(&key)), &bytes)?;
            let node_id = NodeId::from_bytes(&node.node_id).map_err(GcsError::from)?;
            if node.state != NodeState::Dead as i32 {
                // A fresh deadline: the node has one timeout to reach the restarted head.
                node.last_heartbeat_ms = now;
            }
            node_keys.insert(node_id, node.public_key.clone());
            node_table.insert(node_id, node);
        }
        let job_table = DashMap::new();
        for (_, bytes) in jobs {
            let job: JobInfo = decode("job", &bytes)?;
            let job_id = JobId::from_bytes(&job.job_id).map_err(GcsError::from)?;
            job_table.insert(job_id, job);
        }
        tracing::info!(
            storage = %storage.describe(),
            nodes = node_table.len(),
            jobs = job_table.len(),
            cluster_id = %cluster_id,
            "control store opened"
        );
        let moves = DashMap::new();
        for (key, value) in moved {
            let object = ObjectId::from_bytes(&key).map_err(GcsError::from)?;
            let text = String::from_utf8_lossy(&value);
            if let Some((from, holder)) = text.split_once('\n') {
                moves.insert(object, (from.to_string(), holder.to_string()));
            }
        }
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        // Every row is logged once, restored ones too: the log knows each bucket's nodes.
        let mut node_changes = NodeChanges::new(config.view_sample);
        for row in node_table.iter() {
            node_changes.changed(*row.key());
        }
        Ok(Arc::new(Self {
            config,
            storage,
            clock,
            nodes: node_table,
            node_keys,
            jobs: job_table,
            events,
            sequence: AtomicU64::new(0),
            job_counter: tokio::sync::Mutex::new(()),
            cluster_id,
            started_at_ms: now,
            incarnation: rand::random::<u64>().max(1),
            kv_use: Arc::new(std::sync::Mutex::new(kv_use)),
            unfunded: std::sync::RwLock::new(HashMap::new()),
            moves,
            heartbeats: AtomicU64::new(0),
            heartbeat_streams: AtomicU64::new(0),
            stalls: std::sync::Mutex::new(std::collections::VecDeque::new()),
            node_reads: [AtomicU64::new(0), AtomicU64::new(0)],
            node_changes: std::sync::Mutex::new(node_changes),
            encoded_rows: DashMap::new(),
            listed_scores: DashMap::new(),
            scores_swept_ms: AtomicU64::new(u64::MAX),
            registered_from: DashMap::new(),
            membership: tokio::sync::RwLock::new(()),
            nothing_found: std::sync::Mutex::new(HashMap::new()),
            nodes_forgotten: std::sync::atomic::AtomicBool::new(nodes_forgotten),
        }))
    }

    /// Notes that `node`'s row changed as a view of the cluster sees it (called after the
    /// change, possibly under the row's guard: the log's lock is taken last everywhere).
    fn node_changed(&self, node: NodeId) {
        self.node_changes.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).changed(node);
    }

    /// Which rows a reader holding `since` (a version of incarnation `since_incarnation`)
    /// needs, each with its latest change: those changed since, when this process still
    /// remembers every change since then; else every row. A node keeping a sampled view
    /// (`viewer`) is answered with the rows of its sample alone once the table is large
    /// enough (`ClusterConfig::view_sample`).
    fn wanted_rows(&self, since: u64, since_incarnation: u64, viewer: Option<&NodeId>) -> Wanted {
        // Each row's latest change is read before the row: a row read after it is at
        // least that new, so an encoding labelled with it is never older than its label.
        let (version, sampled, answered) = {
            let changes = self.node_changes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let changes = &*changes;
            let latest = |node: NodeId| (node, changes.latest.get(&node).copied().unwrap_or(0));
            let answered = match changes.since(since, since_incarnation, self.incarnation, viewer) {
                Some(changed) => Some((true, changed.into_iter().map(latest).collect::<Vec<_>>())),
                // A sample read whole: its bucket's nodes, which the log knows (every row
                // is logged once at least).
                None => viewer
                    .and_then(|viewer| changes.sample_of(viewer))
                    .map(|ids| (false, ids.into_iter().map(latest).collect())),
            };
            (changes.version, viewer.is_some() && changes.sampler().samples(), answered)
        };
        if let Some((delta, rows)) = answered {
            self.node_reads[usize::from(delta)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Wanted { rows, version, delta, sampled };
        }
        self.node_reads[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Row guards are never taken under the log's lock: the ids come first.
        let ids: Vec<NodeId> = self.nodes.iter().map(|row| *row.key()).collect();
        let changes = self.node_changes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let rows = ids.into_iter().map(|node| (node, changes.latest.get(&node).copied().unwrap_or(0))).collect();
        Wanted { rows, version, delta: false, sampled }
    }

    /// The node table as a reader holding `since` (a version of incarnation
    /// `since_incarnation`) needs it ([`Self::wanted_rows`]): the rows changed since, or
    /// every row, oldest registration first. Nodes dead since are listed in `removed`
    /// when dead ones are not asked for.
    pub fn nodes_since(
        &self,
        include_dead: bool,
        since: u64,
        since_incarnation: u64,
        viewer: Option<&NodeId>,
    ) -> NodesRead {
        let wanted = self.wanted_rows(since, since_incarnation, viewer);
        let (mut nodes, mut removed) = (Vec::new(), Vec::new());
        for (node_id, _) in wanted.rows {
            match self.nodes.get(&node_id) {
                Some(row) if include_dead || row.state != NodeState::Dead as i32 => nodes.push(row.clone()),
                _ if wanted.delta => removed.push(node_id),
                _ => {}
            }
        }
        if !wanted.delta {
            nodes.sort_by(|a, b| a.registered_at_ms.cmp(&b.registered_at_ms).then_with(|| a.node_id.cmp(&b.node_id)));
        }
        NodesRead { nodes, removed, version: wanted.version, delta: wanted.delta, sampled: wanted.sampled }
    }

    /// [`Self::nodes_since`] of living nodes as encoded rows, for the many nodes that keep
    /// a view: a row is encoded once per change of it and shared by every reply that
    /// carries it (`encoded_rows`), not cloned and encoded again for each reader. A row is
    /// as it was at its last change, `last_heartbeat_ms` included (a heartbeat that changes
    /// nothing is no change): a view's reliability score, which reads it, is as fresh as
    /// the sweep's logging of scores that moved by `SCORE_MOVE_LOGGED`. A dead row is kept
    /// without its bytes (a view of the living never carries it).
    pub fn node_rows_since(&self, since: u64, since_incarnation: u64, viewer: Option<&NodeId>) -> NodeRowsRead {
        let Wanted { rows: wanted, version, delta, sampled } = self.wanted_rows(since, since_incarnation, viewer);
        let (mut rows, mut removed) = (Vec::new(), Vec::new());
        for (node, at) in wanted {
            let cached = self.encoded_rows.get(&node).filter(|entry| entry.0 == at).map(|entry| entry.1.clone());
            let encoded = match cached {
                Some(encoded) => encoded,
                None => {
                    let Some(row) = self.nodes.get(&node) else {
                        removed.push(node);
                        continue;
                    };
                    let dead = row.state == NodeState::Dead as i32;
                    let bytes = if dead { Default::default() } else { row.encode_to_vec().into() };
                    let encoded = EncodedRow { dead, bytes };
                    drop(row);
                    let mut entry = self.encoded_rows.entry(node).or_insert_with(|| (at, encoded.clone()));
                    if entry.0 < at {
                        *entry = (at, encoded.clone());
                    }
                    encoded
                }
            };
            if encoded.dead {
                if delta {
                    removed.push(node);
                }
            } else {
                rows.push(encoded.bytes);
            }
        }
        NodeRowsRead { rows, removed, version, delta, sampled }
    }

    /// Notes that `node`'s registration came from `peer`.
    pub fn note_registered_from(&self, node: NodeId, peer: std::net::IpAddr) {
        let peer = match peer {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, std::net::IpAddr::V4),
            v4 => v4,
        };
        self.registered_from.insert(node, peer);
    }

    /// Where `node`'s latest registration with this process came from.
    pub fn registered_from(&self, node: &NodeId) -> Option<std::net::IpAddr> {
        self.registered_from.get(node).map(|peer| *peer)
    }

    /// How many reads of the node table this process answered (whole, by delta).
    pub fn node_reads(&self) -> (u64, u64) {
        let read = |index: usize| self.node_reads[index].load(std::sync::atomic::Ordering::Relaxed);
        (read(0), read(1))
    }

    /// Counts a heartbeat stream a node opened.
    pub fn note_heartbeat_stream(&self) {
        self.heartbeat_streams.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many heartbeat streams nodes opened with this process.
    pub fn heartbeat_streams_opened(&self) -> u64 {
        self.heartbeat_streams.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records that this head stood still for `stalled_ms` until now (its process was
    /// starved or its runtime busy): heartbeats that came meanwhile were not taken, so
    /// that time is not counted as any node's silence ([`GcsState::check_heartbeats`]).
    pub fn note_stall(&self, stalled_ms: u64) {
        if stalled_ms == 0 {
            return;
        }
        let now = self.clock.now_ms();
        if stalled_ms >= self.config.heartbeat_interval_ms {
            tracing::warn!(stalled_ms, "the control store stood still; its nodes' silence meanwhile is not counted");
        }
        let mut stalls = self.stalls.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        stalls.push_back((now, stalled_ms));
        // Only stalls within a few timeouts can excuse a silence still running.
        let horizon = now.saturating_sub(self.config.heartbeat_timeout_ms.saturating_mul(MAX_STALL_ALLOWANCE));
        while stalls.len() > MAX_STALLS_KEPT || stalls.front().is_some_and(|(at, _)| *at < horizon) {
            stalls.pop_front();
        }
    }

    /// How long the head stood still after `since`, of `stalls` (a stall under way at
    /// `since` counts from then; capped: a head that keeps stalling still finds dead
    /// nodes, later).
    fn stalled_since(&self, stalls: &[(u64, u64)], since: u64) -> u64 {
        let total: u64 = stalls
            .iter()
            .filter(|(at, _)| *at > since)
            .map(|(at, stalled)| at - at.saturating_sub(*stalled).max(since))
            .sum();
        total.min(self.config.heartbeat_timeout_ms.saturating_mul(MAX_STALL_ALLOWANCE))
    }

    /// How many heartbeats this process has taken.
    pub fn heartbeats_received(&self) -> u64 {
        self.heartbeats.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The account paying for `job` (`default` for the operator's, or an unknown job).
    pub fn payer_of(&self, job: &JobId) -> String {
        self.job(job).map(|row| payer_account(&row).to_string()).unwrap_or_else(|| "default".into())
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// Changes with every start of the control store process, storage or not.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    pub fn started_at_ms(&self) -> u64 {
        self.started_at_ms
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    pub(crate) fn storage(&self) -> &Arc<dyn GcsStorage> {
        &self.storage
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    pub fn job(&self, job_id: &JobId) -> Option<JobInfo> {
        self.jobs.get(job_id).map(|entry| entry.clone())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ClusterEvent> {
        self.events.subscribe()
    }

    fn publish(&self, event: Event) {
        let sequence = self.sequence.fetch_add(1, Ordering::SeqCst) + 1;
        // No subscriber is not an error: the event is simply not wanted by anyone.
        let _ = self.events.send(ClusterEvent { sequence, time_ms: self.clock.now_ms(), event: Some(event) });
    }

    async fn persist_node(&self, node: &NodeInfo) -> GcsResult<()> {
        let storage = self.storage.clone();
        let key = node.node_id.clone();
        let bytes = node.encode_to_vec();
        blocking(move || storage.put(Table::Nodes, &key, &bytes)).await
    }

    async fn persist_job(&self, job: &JobInfo) -> GcsResult<()> {
        let storage = self.storage.clone();
        let key = job.job_id.clone();
        let bytes = job.encode_to_vec();
        blocking(move || storage.put(Table::Jobs, &key, &bytes)).await
    }

    // ---- objects moved off nodes that left ----

    /// Node `node_id` moved the primary copies of `moves` (object, holder address) before
    /// leaving. Each holder must be an alive node of the cluster.
    pub async fn objects_moved(&self, node_id: &NodeId, moves: Vec<(ObjectId, String)>) -> GcsResult<()> {
        let from =
            self.node(node_id).ok_or_else(|| invalid(format!("node {} is not registered", node_id.short())))?.address;
        if moves.len() > MAX_MOVES_PER_CALL {
            return Err(invalid(format!("at most {MAX_MOVES_PER_CALL} objects may move in one call")));
        }
        let mut rows = Vec::with_capacity(moves.len());
        for (object, holder) in moves {
            let alive = self.nodes.iter().any(|node| node.address == holder && node.state != NodeState::Dead as i32);
            if !alive || holder == from {
                return Err(invalid(format!(
                    "object {} cannot move to {holder:?}: not another alive node",
                    object.short()
                )));
            }
            // An object that moved here before moves on: whoever knows where it was first
            // finds it. Only its holder moves it: no node redirects another's objects.
            let origin = match self.moves.get(&object) {
                Some(entry) if entry.1 == from => entry.0.clone(),
                Some(_) => {
                    // Not this node's to move (it went elsewhere): the others still are.
                    tracing::warn!(object = %object.short(), %from, "a node reported moving an object that moved elsewhere; ignored");
                    continue;
                }
                None => from.clone(),
            };
            rows.push((object, origin, holder));
        }
        let writes: Vec<crate::storage::StorageWrite> = rows
            .iter()
            .map(|(object, origin, holder)| crate::storage::StorageWrite::Put {
                table: Table::ObjectMoves,
                key: object.to_vec(),
                value: format!("{origin}\n{holder}").into_bytes(),
            })
            .collect();
        let storage = self.storage.clone();
        blocking(move || storage.write_all(&writes)).await?;
        for (object, origin, holder) in rows {
            self.moves.insert(object, (origin, holder));
        }
        Ok(())
    }

    /// Node `node_id`, holder of moved objects `objects`, freed them: their moves go.
    pub async fn forget_moves(&self, node_id: &NodeId, objects: Vec<ObjectId>) -> GcsResult<()> {
        let Some(holder) = self.node(node_id).map(|node| node.address) else { return Ok(()) };
        let gone: Vec<ObjectId> = objects
            .into_iter()
            .filter(|object| self.moves.get(object).is_some_and(|entry| entry.1 == holder))
            .collect();
        let writes: Vec<crate::storage::StorageWrite> = gone
            .iter()
            .map(|object| crate::storage::StorageWrite::Delete { table: Table::ObjectMoves, key: object.to_vec() })
            .collect();
        let storage = self.storage.clone();
        blocking(move || storage.write_all(&writes)).await?;
        for object in gone {
            self.moves.remove(&object);
        }
        Ok(())
    }

    /// Where each of `objects` went from `from` (empty: it did not move from there).
    pub fn object_moves(&self, from: &str, objects: &[ObjectId]) -> Vec<String> {
        objects
            .iter()
            .map(|object| {
                self.moves.get(object).filter(|entry| entry.0 == from).map(|entry| entry.1.clone()).unwrap_or_default()
            })
            .collect()
    }

    // ---- nodes ----

    /// Adds a node, or takes back one that registers again (after a head restart or
    /// a lost connection) under the same id.
    pub async fn register_node(&self, mut node: NodeInfo) -> GcsResult<()> {
        let node_id = NodeId::from_bytes(&node.node_id)?;
        if node.address.trim().is_empty() {
            return Err(invalid(format!("node {} registered without an address", node_id.short())));
        }
        let total = node.total.clone().unwrap_or_default().to_set()?;
        let available = node.available.clone().unwrap_or_default().to_set()?;
        if !total.contains(&available) {
            return Err(invalid(format!(
                "node {} reports available {available} beyond its total {total}",
                node_id.short()
            )));
        }
        if let Some(key) = node.labels.keys().find(|key| key.trim().is_empty()) {
            return Err(invalid(format!("node {} has a label with an empty name {key:?}", node_id.short())));
        }
        let _membership = self.membership.read().await;
        // Its row, or the trust record it left when it was forgotten after its death.
        let (known, forgotten) = match self.nodes.get(&node_id).map(|row| row.clone()) {
            Some(row) => (Some(row), false),
            None => {
                let record = self.forgotten_node(&node_id).await?;
                let forgotten = record.is_some();
                (record, forgotten)
            }
        };
        // The first registration binds the id to the key; only that key's holder may use
        // the id again (a provider cannot take over another's record, wallet or price).
        let first_key = known.as_ref().map_or(&node.public_key, |known| &known.public_key).clone();
        let bound = self.node_keys.entry(node_id).or_insert(first_key).clone();
        if bound != node.public_key {
            return Err(IonetError::PermissionDenied(format!(
                "node {} is bound to another key: a node id is registered again only by the key it first registered with",
                node_id.short()
            ))
            .into());
        }
        let now = self.clock.now_ms();
        node.registered_at_ms = known.as_ref().map(|known| known.registered_at_ms).unwrap_or(now);
        // The head's record of how it kept its word, never the node's: time it was gone
        // since it was declared dead counts against it.
        node.reliability = Some(match &known {
            Some(known) => {
                let mut record = known.reliability.clone().unwrap_or_default();
                if known.state == NodeState::Dead as i32 {
                    record.down_ms += now.saturating_sub(known.last_heartbeat_ms);
                }
                record
            }
            None => Default::default(),
        });
        // The head's word on the GPUs, never the node's: kept while the node declares the
        // same GPUs (a quarantined node does not clear itself by registering again), else
        // pending until the node passes a check; its history is kept whatever it declares
        // (registering without GPUs for a while clears nothing either).
        let known = known.and_then(|known| Some((known.gpus == node.gpus, known.gpu_check?)));
        let has_gpus = !node.gpus.is_empty() || !total.get(ionet_common::resources::GPU).is_zero();
        node.gpu_check = match known {
            Some((true, check)) => Some(check),
            None if !has_gpus => None,
            // Other GPUs (or none now): checked afresh, its record of failures kept (a
            // changed list does not wash an epoch's failure away).
            known => {
                let history = known.map(|(_, check)| check).unwrap_or_default();
                Some(GpuCheck {
                    state: if has_gpus { GpuCheckState::Pending } else { GpuCheckState::None } as i32,
                    simulated: node.gpus.iter().any(|gpu| gpu.simulated),
                    reason: history.reason,
                    passes: history.passes,
                    failures: history.failures,
                    last_failed_at_ms: history.last_failed_at_ms,
                    recent_failures_ms: history.recent_failures_ms,
                    untrusted_since_ms: history.untrusted_since_ms,
                    cleared_at_ms: history.cleared_at_ms,
                    ..Default::default()
                })
            }
        };
        node.last_heartbeat_ms = now;
        node.state = NodeState::Alive as i32;
        node.death_cause.clear();
        if forgotten {
            // Its row again, in place of the record it left (one commit: never both, never neither).
            let storage = self.storage.clone();
            let writes = vec![
                StorageWrite::Put { table: Table::Nodes, key: node.node_id.clone(), value: node.encode_to_vec() },
                StorageWrite::Delete { table: Table::ForgottenNodes, key: node.node_id.clone() },
            ];
            blocking(move || storage.write_all(&writes)).await?;
            tracing::info!(node = %node_id.short(), "a forgotten node registered again: its record is back");
        } else {
            self.persist_node(&node).await?;
        }
        tracing::info!(node = %node_id.short(), address = %node.address, resources = %total, "node registered");
        self.nodes.insert(node_id, node.clone());
        self.node_changed(node_id);
        self.publish(Event::NodeAdded(node));
        Ok(())
    }

    /// Registers a node as one whose GPUs then passed the head's check (unit tests of what
    /// a checked node may do; the check itself: `worker/tests/gpu_checks.rs`).
    #[cfg(test)]
    pub(crate) async fn register_checked_node(&self, node: NodeInfo) -> GcsResult<()> {
        let node_id = NodeId::from_bytes(&node.node_id)?;
        self.register_node(node).await?;
        self.record_gpu_check(&node_id, Ok((1.0, 1.0, 1))).await.map(drop)
    }

    /// What the heartbeat's check schedule needs of a node, read in place (no copy of the
    /// row on the heartbeat path): whether it offers GPUs, whether all were free at its last
    /// report, and whether it waits for a check to take work again (never checked, or
    /// overdue: not a failure, which waits for its next check as a pass does).
    pub fn gpu_check_view(&self, node_id: &NodeId) -> Option<(bool, bool, bool)> {
        let node = self.nodes.get(node_id)?;
        let gpus = |set: &Option<ResourceQuantities>| {
            set.as_ref().and_then(|set| set.units.get(ionet_common::resources::GPU)).copied().unwrap_or(0)
        };
        let total = gpus(&node.total);
        let waiting = node.gpu_check.as_ref().is_some_and(|check| {
            check.state == GpuCheckState::Pending as i32 || check.state == GpuCheckState::Overdue as i32
        });
        Some((total > 0, gpus(&node.available) >= total, waiting))
    }

    /// Records the verdict of a check of a node's GPUs: a pass (with the measured lower
    /// bounds and how long it took) or a failure (quarantined, with the reason).
    pub async fn record_gpu_check(
        &self,
        node_id: &NodeId,
        verdict: Result<(f64, f64, u64), String>,
    ) -> GcsResult<GpuCheck> {
        // Not while a row is forgotten (its trust record would miss this).
        let _membership = self.membership.read().await;
        let node = {
            let mut entry = self.nodes.get_mut(node_id).ok_or_else(|| {
                IonetError::NotFound(format!("node {} is not registered with this control store", node_id.short()))
            })?;
            let mut check = entry.gpu_check.clone().unwrap_or_default();
            check.simulated = entry.gpus.iter().any(|gpu| gpu.simulated);
            check.checked_at_ms = self.clock.now_ms();
            match &verdict {
                Ok((tflops, bandwidth, took_ms)) => {
                    if check.state != GpuCheckState::Passed as i32 {
                        check.passed_since_ms = check.checked_at_ms;
                    }
                    check.state = GpuCheckState::Passed as i32;
                    // Passes while untrusted earn nothing toward its score.
                    if check.untrusted_since_ms == 0 {
                        check.passes += 1;
                    }
                    check.tflops = *tflops;
                    check.bandwidth_gb_per_s = *bandwidth;
                    check.took_ms = *took_ms;
                }
                Err(reason) => {
                    let now = check.checked_at_ms;
                    check.state = GpuCheckState::Failed as i32;
                    check.last_failed_at_ms = now;
                    check.passed_since_ms = 0;
                    check.failures += 1;
                    check.reason = reason.clone();
                    // Failures within the window (at most as many as it takes); enough of
                    // them and only the operator trusts the node again. Once untrusted,
                    // the ones that made it so stay on record (with later ones, to 64).
                    let window = self.config.gpu_check_untrusted_window_ms;
                    let enough = self.config.gpu_check_untrusted_failures.max(1) as usize;
                    let kept = if check.untrusted_since_ms == 0 {
                        check.recent_failures_ms.retain(|&at| at.saturating_add(window) > now);
                        enough
                    } else {
                        enough.max(64)
                    };
                    check.recent_failures_ms.push(now);
                    let excess = check.recent_failures_ms.len().saturating_sub(kept);
                    check.recent_failures_ms.drain(..excess);
                    if check.recent_failures_ms.len() >= enough && check.untrusted_since_ms == 0 {
                        check.untrusted_since_ms = now;
                        tracing::warn!(
                            node = %node_id.short(),
                            failures = enough,
                            "node failed {enough} GPU checks within {} s: untrusted until the operator clears it",
                            window / 1000
                        );
                    }
                }
            }
            entry.gpu_check = Some(check);
            self.node_changed(*node_id);
            entry.clone()
        };
        self.persist_node(&node).await?;
        match &verdict {
            Ok((tflops, _, took_ms)) => {
                tracing::info!(node = %node_id.short(), tflops, took_ms, "node passed its GPU check")
            }
            Err(reason) => tracing::warn!(node = %node_id.short(), reason, "node failed its GPU check: quarantined"),
        }
        self.publish(Event::NodeAdded(node.clone()));
        Ok(node.gpu_check.unwrap_or_default())
    }

    /// Records that a lease of `node_id`'s GPUs has put its due check off for longer than
    /// allowed: `OVERDUE`, no new leases and no availability rewards until it passes (not
    /// a failure: its running leases finish, then the check runs). Only a passing node
    /// becomes overdue; one pending or quarantined is held back already.
    pub async fn record_gpu_check_overdue(&self, node_id: &NodeId) -> GcsResult<()> {
        // Not while a row is forgotten (its trust record would miss this).
        let _membership = self.membership.read().await;
        let node = {
            let Some(mut entry) = self.nodes.get_mut(node_id) else { return Ok(()) };
            let Some(check) = entry.gpu_check.as_mut().filter(|check| check.state == GpuCheckState::Passed as i32)
            else {
                return Ok(());
            };
            check.state = GpuCheckState::Overdue as i32;
            check.passed_since_ms = 0;
            self.node_changed(*node_id);
            entry.clone()
        };
        self.persist_node(&node).await?;
        tracing::warn!(
            node = %node_id.short(),
            max_defer_s = self.config.gpu_check_max_defer_ms / 1000,
            "a lease of the node's GPUs put its due check off too long: no new leases until it passes one"
        );
        self.publish(Event::NodeAdded(node));
        Ok(())
    }

    /// The operator's word that an untrusted node may be trusted again: its failures
    /// within the window are forgotten (its counts stay on record). It takes work again
    /// once its latest check passed.
    pub async fn clear_untrusted(&self, node_id: &NodeId) -> GcsResult<GpuCheck> {
        // Not while a row is forgotten (its trust record would miss this).
        let _membership = self.membership.read().await;
        let node = {
            let mut entry = self.nodes.get_mut(node_id).ok_or_else(|| {
                IonetError::NotFound(format!("node {} is not registered with this control store", node_id.short()))
            })?;
            let mut check = entry.gpu_check.clone().unwrap_or_default();
            if check.untrusted_since_ms == 0 {
                return Err(IonetError::FailedPrecondition(format!(
                    "node {} is not untrusted (its GPU check is {})",
                    node_id.short(),
                    ionet_common::gpu_proof::state_name(&check)
                ))
                .into());
            }
            check.untrusted_since_ms = 0;
            check.recent_failures_ms.clear();
            check.cleared_at_ms = self.clock.now_ms();
            entry.gpu_check = Some(check);
            self.node_changed(*node_id);
            entry.clone()
        };
        self.persist_node(&node).await?;
        tracing::info!(node = %node_id.short(), "the operator cleared an untrusted node");
        self.publish(Event::NodeAdded(node.clone()));
        Ok(node.gpu_check.unwrap_or_default())
    }

    /// Counts a lease both sides started on `node_id` toward its reliability (in memory:
    /// stored with the node's row at its next write; readers of deltas learn the score it
    /// moves at the heartbeat sweep, [`GcsState::check_heartbeats`]).
    pub fn note_lease(&self, node_id: &NodeId) {
        if let Some(mut node) = self.nodes.get_mut(node_id) {
            node.reliability.get_or_insert_with(Default::default).leases += 1;
        }
    }

    /// Counts leases that `node_id`'s death ended against its reliability (stored; the
    /// node is dead, so nothing is published until it registers again).
    pub async fn note_leases_lost(&self, node_id: &NodeId, lost: u64) -> GcsResult<()> {
        {
            let _membership = self.membership.read().await;
            if let Some(counted) = self.count_lost_on_row(node_id, lost).await {
                return counted;
            }
        }
        self.forgotten_lost(node_id, lost).await
    }

    /// Counts `lost` leases on `node_id`'s row and stores it; `None` when the head holds
    /// no row of it.
    async fn count_lost_on_row(&self, node_id: &NodeId, lost: u64) -> Option<GcsResult<()>> {
        let node = self.nodes.get_mut(node_id).map(|mut node| {
            node.reliability.get_or_insert_with(Default::default).leases_lost += lost;
            self.node_changed(*node_id);
            node.clone()
        })?;
        Some(self.persist_node(&node).await)
    }

    /// Counts leases lost against the trust record of a node forgotten since they were
    /// (metering ends a dead node's leases, then counts them: it may be forgotten between).
    async fn forgotten_lost(&self, node_id: &NodeId, lost: u64) -> GcsResult<()> {
        let _membership = self.membership.write().await;
        // Registered again meanwhile: counted on its row.
        if let Some(counted) = self.count_lost_on_row(node_id, lost).await {
            return counted;
        }
        let Some(mut record) = self.forgotten_node(node_id).await? else { return Ok(()) };
        record.reliability.get_or_insert_with(Default::default).leases_lost += lost;
        let (storage, key, value) = (self.storage.clone(), node_id.to_vec(), record.encode_to_vec());
        blocking(move || storage.put(Table::ForgottenNodes, &key, &value)).await
    }

    /// Records a heartbeat: the node is alive now and has `available` free.
    pub fn heartbeat(&self, node_id: &[u8], available: Option<ResourceQuantities>) -> GcsResult<()> {
        let node_id = NodeId::from_bytes(node_id)?;
        let available = available.map(|quantities| quantities.to_set()).transpose()?;
        let mut node = self.nodes.get_mut(&node_id).ok_or_else(|| {
            IonetError::NotFound(format!("node {} is not registered with this control store", node_id.short()))
        })?;
        if node.state == NodeState::Dead as i32 {
            return Err(IonetError::FailedPrecondition(format!(
                "node {} was declared dead ({}); register again",
                node_id.short(),
                node.death_cause
            ))
            .into());
        }
        if let Some(available) = available {
            let total = node.total.clone().unwrap_or_default().to_set()?;
            if !total.contains(&available) {
                return Err(invalid(format!(
                    "node {} reports available {available} beyond its total {total}",
                    node_id.short()
                )));
            }
            let available = Some(ResourceQuantities::from_set(&available));
            if node.available != available {
                node.available = available;
                self.node_changed(node_id);
            }
        }
        node.last_heartbeat_ms = self.clock.now_ms();
        self.heartbeats.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Marks a node draining (no new work) or, when `exiting`, gone.
    pub async fn drain_node(&self, node_id: &[u8], reason: &str, exiting: bool) -> GcsResult<()> {
        // Not while a row is forgotten (its trust record would miss this).
        let _membership = self.membership.read().await;
        let node_id = NodeId::from_bytes(node_id)?;
        let node = {
            let mut entry = self.nodes.get_mut(&node_id).ok_or_else(|| {
                IonetError::NotFound(format!("node {} is not registered with this control store", node_id.short()))
            })?;
            if entry.state == NodeState::Dead as i32 {
                return Ok(());
            }
            if exiting {
                entry.state = NodeState::Dead as i32;
                entry.death_cause = format!("drained: {reason}");
                self.listed_scores.remove(&node_id);
            } else {
                entry.state = NodeState::Draining as i32;
            }
            self.node_changed(node_id);
            entry.clone()
        };
        self.persist_node(&node).await?;
        tracing::info!(node = %node_id.short(), reason, exiting, "node drained");
        if exiting {
            self.publish(Event::NodeDead(node));
        } else {
            self.publish(Event::NodeDrained(node));
        }
        Ok(())
    }

    /// Declares dead every live node silent for longer than the heartbeat timeout (plus
    /// the time the head itself stood still meanwhile, up to three timeouts). Returns the
    /// nodes declared dead by this call.
    pub async fn check_heartbeats(&self) -> GcsResult<Vec<NodeId>> {
        // Not while a row is forgotten (its trust record would miss this).
        let _membership = self.membership.read().await;
        let now = self.clock.now_ms();
        let timeout = self.config.heartbeat_timeout_ms;
        let mut dead = Vec::new();
        let stalls: Vec<(u64, u64)> =
            self.stalls.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).iter().copied().collect();
        let swept = self.scores_swept_ms.load(std::sync::atomic::Ordering::Relaxed);
        // (A clock set back sweeps at once, rather than not until it catches up.)
        let sweep = swept == u64::MAX || now < swept || now - swept >= SCORE_SWEEP_MS;
        if sweep {
            self.scores_swept_ms.store(now, std::sync::atomic::Ordering::Relaxed);
        }
        for mut entry in self.nodes.iter_mut() {
            let silent_for = now.saturating_sub(entry.last_heartbeat_ms);
            let alive = entry.state != NodeState::Dead as i32;
            let excused =
                if alive && silent_for > timeout { self.stalled_since(&stalls, entry.last_heartbeat_ms) } else { 0 };
            // A score that moved (uptime, leases counted, time) reaches the views.
            if alive && sweep {
                let score = ionet_common::reliability::listed_score_bps(&entry);
                let mut listed = self.listed_scores.entry(*entry.key()).or_insert(score);
                if listed.abs_diff(score) >= SCORE_MOVE_LOGGED {
                    *listed = score;
                    self.node_changed(*entry.key());
                }
            }
            if alive && silent_for > timeout + excused {
                entry.state = NodeState::Dead as i32;
                entry.death_cause = match excused {
                    0 => format!("missed heartbeats for {silent_for} ms (timeout {timeout} ms)"),
                    _ => format!(
                        "missed heartbeats for {silent_for} ms (timeout {timeout} ms, plus {excused} ms the head stood still)"
                    ),
                };
                self.node_changed(*entry.key());
                // Learnt again if it comes back: the table of scores does not grow with deaths.
                self.listed_scores.remove(entry.key());
                dead.push((*entry.key(), entry.clone()));
            }
        }
        // One commit for all of them (many die at once when a network splits).
        if !dead.is_empty() {
            let writes: Vec<StorageWrite> = dead
                .iter()
                .map(|(_, node)| StorageWrite::Put {
                    table: Table::Nodes,
                    key: node.node_id.clone(),
                    value: node.encode_to_vec(),
                })
                .collect();
            let storage = self.storage.clone();
            blocking(move || storage.write_all(&writes)).await?;
        }
        let mut ids = Vec::with_capacity(dead.len());
        for (node_id, node) in dead {
            tracing::warn!(node = %node_id.short(), address = %node.address, cause = %node.death_cause, "node declared dead");
            self.publish(Event::NodeDead(node));
            ids.push(node_id);
        }
        Ok(ids)
    }

    /// The trust record `node_id` left when it was forgotten after its death, if it was.
    pub(crate) async fn forgotten_node(&self, node_id: &NodeId) -> GcsResult<Option<NodeInfo>> {
        if !self.nodes_forgotten.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let storage = self.storage.clone();
        let key = node_id.to_vec();
        let Some(bytes) = blocking(move || storage.get(Table::ForgottenNodes, &key)).await? else {
            return Ok(None);
        };
        decode(&format!("forgotten node {}", node_id.short()), &bytes).map(Some)
    }

    /// Forgets the longest dead nodes past `max_dead_nodes` among those `may_forget`
    /// allows (metering allows a node with no lease open whose death a closed epoch
    /// covered), in memory and in storage. What a provider could gain by being forgotten
    /// stays: its trust record (key, reliability, GPU check history, first registration;
    /// [`trust_record`]) is kept in storage alone, read back if the id registers again.
    /// Returns how many were forgotten.
    pub async fn forget_dead_nodes(&self, may_forget: impl Fn(&NodeInfo) -> bool) -> GcsResult<usize> {
        let limit = self.config.max_dead_nodes;
        let _membership = self.membership.write().await;
        let mut dead: Vec<(u64, NodeId)> = self
            .nodes
            .iter()
            .filter(|row| row.state == NodeState::Dead as i32)
            .map(|row| (row.last_heartbeat_ms, *row.key()))
            .collect();
        if dead.len() <= limit {
            return Ok(0);
        }
        dead.sort_unstable();
        let excess = dead.len() - limit;
        let mut forgotten = Vec::with_capacity(excess);
        let mut writes = Vec::with_capacity(2 * excess);
        for (_, node_id) in dead {
            if forgotten.len() == excess {
                break;
            }
            let Some(row) = self.nodes.get(&node_id) else { continue };
            if !may_forget(&row) {
                continue;
            }
            let key = node_id.to_vec();
            writes.push(StorageWrite::Put {
                table: Table::ForgottenNodes,
                key: key.clone(),
                value: trust_record(&row).encode_to_vec(),
            });
            writes.push(StorageWrite::Delete { table: Table::Nodes, key });
            forgotten.push(node_id);
        }
        if forgotten.is_empty() {
            return Ok(0);
        }
        writes.push(StorageWrite::Put { table: Table::Meta, key: NODES_FORGOTTEN_KEY.to_vec(), value: vec![1] });
        let storage = self.storage.clone();
        blocking(move || storage.write_all(&writes)).await?;
        self.nodes_forgotten.store(true, Ordering::Relaxed);
        {
            let mut changes = self.node_changes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for node_id in &forgotten {
                changes.forget(node_id);
            }
        }
        for node_id in &forgotten {
            self.nodes.remove(node_id);
        }
        // What is kept beside the rows goes with them, and whatever a registration refused
        // or failed left behind (no registration runs now: a key without a row is one).
        self.node_keys.retain(|node_id, _| self.nodes.contains_key(node_id));
        self.encoded_rows.retain(|node_id, _| self.nodes.contains_key(node_id));
        self.listed_scores.retain(|node_id, _| self.nodes.contains_key(node_id));
        self.registered_from.retain(|node_id, _| self.nodes.contains_key(node_id));
        tracing::info!(
            forgotten = forgotten.len(),
            kept = limit,
            "forgot the longest dead nodes; their trust records stay in storage"
        );
        Ok(forgotten.len())
    }

    /// Every node, oldest registration first.
    pub fn nodes(&self, include_dead: bool) -> Vec<NodeInfo> {
        let mut nodes: Vec<NodeInfo> = self
            .nodes
            .iter()
            .filter(|entry| include_dead || entry.state != NodeState::Dead as i32)
            .map(|entry| entry.value().clone())
            .collect();
        nodes.sort_by(|a, b| a.registered_at_ms.cmp(&b.registered_at_ms).then_with(|| a.node_id.cmp(&b.node_id)));
        nodes
    }

    /// The rows of `ids` and of the nodes at `addresses` that the head holds (dead ones
    /// with `include_dead`): what a node whose sampled view misses a node looks up.
    pub fn look_up_nodes(&self, ids: &[NodeId], addresses: &[String], include_dead: bool) -> Vec<NodeInfo> {
        let wanted = |row: &NodeInfo| include_dead || row.state != NodeState::Dead as i32;
        let mut found: Vec<NodeInfo> =
            ids.iter().filter_map(|id| self.nodes.get(id)).filter(|row| wanted(row)).map(|row| row.clone()).collect();
        if !addresses.is_empty() {
            let addresses: std::collections::HashSet<&str> = addresses.iter().map(String::as_str).collect();
            let at = self.nodes.iter().filter(|row| addresses.contains(row.address.as_str()) && wanted(row));
            let named: std::collections::HashSet<&NodeId> = ids.iter().collect();
            found.extend(at.filter(|row| !named.contains(row.key())).map(|row| row.value().clone()));
        }
        found
    }

    /// Up to `limit` living nodes that `fits`, read from a random place in the table on
    /// (nodes asking at once are not all sent to the same few), each once. A search that
    /// found nothing (`asked` names it) finds nothing again for a second without a scan,
    /// unless it left out a node that fits ([`Fit::Avoided`]: another asker may take it).
    pub fn find_nodes(&self, asked: [u8; 32], limit: usize, fits: impl Fn(&NodeInfo) -> Fit) -> Vec<NodeInfo> {
        {
            let mut nothing = self.nothing_found.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            match nothing.get(&asked) {
                Some(at) if at.elapsed() < NOTHING_FOUND_KEPT => return Vec::new(),
                Some(_) => {
                    nothing.remove(&asked);
                }
                None => {}
            }
        }
        let rows = self.nodes.len();
        let start = if rows == 0 { 0 } else { rand::random::<u64>() as usize % rows };
        let (mut found, mut ids, mut avoided) = (Vec::new(), std::collections::HashSet::new(), false);
        // Two passes, each with guards of its own: from `start` to the end, then the rest.
        let rows =
            self.nodes.iter().skip(start).chain(std::iter::once_with(|| self.nodes.iter().take(start)).flatten());
        for row in rows {
            if found.len() == limit {
                break;
            }
            if row.state != NodeState::Alive as i32 {
                continue;
            }
            match fits(row.value()) {
                Fit::Yes if ids.insert(*row.key()) => found.push(row.value().clone()),
                Fit::Avoided => avoided = true,
                _ => {}
            }
        }
        if found.is_empty() && !avoided {
            let mut nothing = self.nothing_found.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            nothing.retain(|_, at| at.elapsed() < NOTHING_FOUND_KEPT);
            if nothing.len() < NOTHING_FOUND_MAX {
                nothing.insert(asked, std::time::Instant::now());
            }
        }
        found
    }

    /// Whether the head holds a row of `node_id` (alive or dead, not forgotten).
    pub fn knows_node(&self, node_id: &NodeId) -> bool {
        self.nodes.contains_key(node_id)
    }

    /// How many rows of nodes the head holds (alive or dead).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Whether `node_id` is registered and alive (read in place: no copy of its row).
    pub fn is_alive(&self, node_id: &NodeId) -> bool {
        self.nodes.get(node_id).is_some_and(|row| row.state == NodeState::Alive as i32)
    }

    pub fn node(&self, node_id: &NodeId) -> Option<NodeInfo> {
        self.nodes.get(node_id).map(|entry| entry.clone())
    }

    // ---- jobs ----

    pub async fn add_job(&self, mut job: JobInfo) -> GcsResult<JobInfo> {
        let _serialised = self.job_counter.lock().await;
        let storage = self.storage.clone();
        let sequence = blocking(move || {
            let current = storage
                .get(Table::Meta, JOB_COUNTER_KEY)?
                .map(|bytes| bytes.try_into().map(u32::from_be_bytes).unwrap_or(0))
                .unwrap_or(0);
            let next = current.checked_add(1).ok_or_else(|| GcsError::Storage("job ids exhausted".into()))?;
            storage.put(Table::Meta, JOB_COUNTER_KEY, &next.to_be_bytes())?;
            Ok(next)
        })
        .await?;
        let job_id = JobId::from_sequence(sequence);
        job.job_id = job_id.to_vec();
        job.state = JobState::Running as i32;
        job.start_time_ms = self.clock.now_ms();
        job.end_time_ms = 0;
        self.persist_job(&job).await?;
        self.jobs.insert(job_id, job.clone());
        tracing::info!(job = %job_id, driver = %job.driver_address, "job started");
        self.publish(Event::JobStarted(job.clone()));
        Ok(job)
    }

    pub async fn finish_job(&self, job_id: &[u8]) -> GcsResult<()> {
        let job_id = JobId::from_bytes(job_id)?;
        let job = {
            let mut entry = self
                .jobs
                .get_mut(&job_id)
                .ok_or_else(|| IonetError::NotFound(format!("job {job_id} does not exist")))?;
            if entry.state == JobState::Finished as i32 {
                return Ok(());
            }
            entry.state = JobState::Finished as i32;
            entry.end_time_ms = self.clock.now_ms();
            entry.clone()
        };
        self.persist_job(&job).await?;
        tracing::info!(job = %job_id, "job finished");
        self.publish(Event::JobFinished(job));
        Ok(())
    }

    /// Replaces the set of jobs whose payer cannot cover their leases.
    pub fn set_unfunded(&self, jobs: HashMap<JobId, String>) {
        *self.unfunded.write().unwrap_or_else(|p| p.into_inner()) = jobs;
    }

    /// The jobs nodes must grant nothing new, with why.
    pub fn unfunded(&self) -> HashMap<JobId, String> {
        self.unfunded.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn jobs(&self) -> Vec<JobInfo> {
        let mut jobs: Vec<JobInfo> = self.jobs.iter().map(|entry| entry.value().clone()).collect();
        jobs.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        jobs
    }

    // ---- internal KV ----

    fn kv_key(&self, scope: &KvScope<'_>, namespace: &str, key: &[u8]) -> GcsResult<Vec<u8>> {
        if namespace.chars().any(char::is_control) {
            return Err(invalid("kv namespace must not contain control characters".into()));
        }
        if key.len() > self.config.max_kv_key_bytes {
            return Err(invalid(format!(
                "kv key is {} bytes, above the limit of {}",
                key.len(),
                self.config.max_kv_key_bytes
            )));
        }
        let mut full = scope.prefix();
        full.extend_from_slice(namespace.as_bytes());
        full.push(0);
        full.extend_from_slice(key);
        Ok(full)
    }

    /// Puts `value` under `key` in `scope`'s `namespace`. A definition export (namespace
    /// [`EXPORT_NAMESPACES`]) is written once, under the SHA-256 of its bytes: anything
    /// else is refused, so no job can swap the code another worker of it unpickles.
    pub async fn kv_put(
        &self,
        scope: &KvScope<'_>,
        namespace: &str,
        key: &[u8],
        value: Vec<u8>,
        overwrite: bool,
    ) -> GcsResult<bool> {
        if key.is_empty() {
            return Err(invalid("kv key is empty".into()));
        }
        if value.len() > self.config.max_kv_value_bytes {
            return Err(IonetError::ResourceExhausted(format!(
                "kv value is {} bytes, above the limit of {}",
                value.len(),
                self.config.max_kv_value_bytes
            ))
            .into());
        }
        if is_export(namespace) {
            if overwrite {
                return Err(invalid(format!("{namespace} entries are written once: put it without overwrite")));
            }
            let digest = sha2::Sha256::digest(&value);
            if key != digest.as_slice() {
                return Err(invalid(format!(
                    "{namespace} entries are keyed by the SHA-256 of their bytes: key {} is not {}",
                    hex::encode(key),
                    hex::encode(digest)
                )));
            }
        }
        let full = self.kv_key(scope, namespace, key)?;
        let storage = self.storage.clone();
        let Some(account) = scope.account() else {
            return blocking(move || {
                if overwrite {
                    let existed = storage.get(Table::Kv, &full)?.is_some();
                    storage.put(Table::Kv, &full, &value)?;
                    Ok(!existed)
                } else {
                    storage.put_if_absent(Table::Kv, &full, &value)
                }
            })
            .await;
        };
        // A tenant's put is counted against its account's quota: read, check, write and
        // count all on the blocking pool under one lock, so a caller that goes away
        // mid-put cannot leave a write uncounted.
        let (kv_use, account, namespace) = (self.kv_use.clone(), account.to_string(), namespace.to_string());
        let (max_bytes, max_namespaces) =
            (self.config.max_kv_bytes_per_account, self.config.max_kv_namespaces_per_account);
        blocking(move || {
            let mut kv_use = kv_use.lock().unwrap_or_else(|p| p.into_inner());
            let old = storage.get(Table::Kv, &full)?;
            if old.is_some() && !overwrite {
                return Ok(false);
            }
            let mut after = kv_use.get(&account).cloned().unwrap_or_default();
            if let Some(old) = &old {
                after.remove(&namespace, (full.len() + old.len()) as u64);
            }
            after.add(&namespace, (full.len() + value.len()) as u64);
            if after.bytes > max_bytes {
                return Err(IonetError::ResourceExhausted(format!(
                    "account {account} keeps {} bytes in the KV; this put would make it {}, above its quota of \
                     {max_bytes} bytes",
                    kv_use.get(&account).map_or(0, |used| used.bytes),
                    after.bytes,
                ))
                .into());
            }
            if after.namespaces.len() > max_namespaces {
                return Err(IonetError::ResourceExhausted(format!(
                    "account {account} uses {max_namespaces} KV namespaces, the most it may; {namespace:?} would be \
                     one more"
                ))
                .into());
            }
            storage.put(Table::Kv, &full, &value)?;
            kv_use.insert(account, after);
            Ok(old.is_none())
        })
        .await
    }

    /// What `account` keeps in the KV now.
    pub fn kv_use(&self, account: &str) -> KvUse {
        self.kv_use.lock().unwrap_or_else(|p| p.into_inner()).get(account).cloned().unwrap_or_default()
    }

    pub async fn kv_get(&self, scope: &KvScope<'_>, namespace: &str, key: &[u8]) -> GcsResult<Vec<u8>> {
        let full = self.kv_key(scope, namespace, key)?;
        let storage = self.storage.clone();
        blocking(move || storage.get(Table::Kv, &full)).await?.ok_or_else(|| {
            IonetError::NotFound(format!("kv key {:?} in namespace {namespace:?}", String::from_utf8_lossy(key))).into()
        })
    }

    pub async fn kv_del(&self, scope: &KvScope<'_>, namespace: &str, key: &[u8], by_prefix: bool) -> GcsResult<u64> {
        if is_export(namespace) {
            return Err(invalid(format!("{namespace} entries are written once and never deleted")));
        }
        let full = self.kv_key(scope, namespace, key)?;
        let storage = self.storage.clone();
        let delete = move |storage: Arc<dyn GcsStorage>, full: Vec<u8>| {
            if by_prefix {
                storage.delete_prefix(Table::Kv, &full)
            } else {
                Ok(u64::from(storage.delete(Table::Kv, &full)?))
            }
        };
        let Some(account) = scope.account() else {
            return blocking(move || delete(storage, full)).await;
        };
        // What a tenant deletes comes off its account's use, on the blocking pool under
        // the lock (done whole even if the caller goes away).
        let (kv_use, account) = (self.kv_use.clone(), account.to_string());
        blocking(move || {
            let mut kv_use = kv_use.lock().unwrap_or_else(|p| p.into_inner());
            let gone: Vec<(Vec<u8>, usize)> = if by_prefix {
                storage.scan_prefix(Table::Kv, &full)?.into_iter().map(|(key, value)| (key, value.len())).collect()
            } else {
                storage.get(Table::Kv, &full)?.map(|value| vec![(full.clone(), value.len())]).unwrap_or_default()
            };
            let deleted = delete(storage, full)?;
            let used = kv_use.entry(account).or_default();
            for (key, value_len) in gone {
                if let Some((_, namespace)) = tenant_of_stored_key(&key) {
                    used.remove(&namespace, (key.len() + value_len) as u64);
                }
            }
            Ok(deleted)
        })
        .await
    }

    pub async fn kv_keys(&self, scope: &KvScope<'_>, namespace: &str, prefix: &[u8]) -> GcsResult<Vec<Vec<u8>>> {
        let full = self.kv_key(scope, namespace, prefix)?;
        let skip = full.len() - prefix.len();
        let storage = self.storage.clone();
        let entries = blocking(move || storage.scan_prefix(Table::Kv, &full)).await?;
        Ok(entries.into_iter().map(|(key, _)| key[skip..].to_vec()).collect())
    }
}

/// The account a job row is paid by (`default`: the operator's own jobs).
pub fn payer_account(job: &JobInfo) -> &str {
    if job.payer_account.is_empty() {
        "default"
    } else {
        &job.payer_account
    }
}

/// The KV namespaces that hold definition exports (Python's pickled functions and
/// classes, which workers unpickle and run): per job, written once, keyed by their hash.
pub const EXPORT_NAMESPACES: &[&str] = &["ionet_functions", "ionet_classes"];

fn is_export(namespace: &str) -> bool {
    EXPORT_NAMESPACES.contains(&namespace)
}

/// Whose KV a call reads and writes: tenants never see each other's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvScope<'a> {
    /// The operator's own namespaces.
    Operator,
    /// One account's: shared by its jobs, as Ray's KV is by one team's drivers.
    Account(&'a str),
    /// One job's (its definition exports).
    Job(&'a str, JobId),
}

impl KvScope<'_> {
    /// The scope a call lands in: the operator's for the admin; for a job, its
    /// definition exports are its own and everything else its account's.
    pub fn of<'a>(principal: &'a Principal, namespace: &str) -> GcsResult<KvScope<'a>> {
        match principal {
            Principal::Admin => Ok(KvScope::Operator),
            Principal::Job { job, account } if is_export(namespace) => Ok(KvScope::Job(account, *job)),
            Principal::Job { account, .. } => Ok(KvScope::Account(account)),
            other => Err(IonetError::PermissionDenied(format!("{other} has no KV")).into()),
        }
    }

    /// The account whose quota the scope's keys count against (`None`: the operator's).
    fn account(&self) -> Option<&str> {
        match self {
            KvScope::Operator => None,
            KvScope::Account(account) | KvScope::Job(account, _) => Some(account),
        }
    }

    /// What every storage key of the scope starts with. A namespace has no control
    /// characters, so a tenant's keys (which start with one) never meet the operator's.
    fn prefix(&self) -> Vec<u8> {
        match self {
            KvScope::Operator => Vec::new(),
            KvScope::Account(account) => format!("\u{1}{account}\u{1}").into_bytes(),
            KvScope::Job(account, job) => format!("\u{1}{account}\u{1}{}\u{1}", job.hex()).into_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;
    use ionet_common::clock::ManualClock;
    use ionet_common::resources::{Quantity, ResourceSet, GPU};

    fn node(node_id: NodeId, gpus: i64) -> NodeInfo {
        let total = ResourceSet::new().with(GPU, Quantity::whole(gpus));
        NodeInfo {
            node_id: node_id.to_vec(),
            address: "127.0.0.1:1".into(),
            total: Some((&total).into()),
            available: Some((&total).into()),
            ..Default::default()
        }
    }

    /// A node refreshing its view reads only what changed: registrations, a changed
    /// availability (not a heartbeat that changes nothing), a death (as a removal); a
    /// reader of another incarnation, or further behind than the log remembers, reads all.
    #[tokio::test]
    async fn a_view_reads_only_the_node_rows_changed_since_its_version() {
        let clock = ManualClock::new(1_000);
        let gcs = state(&clock).await;
        let ids: Vec<NodeId> = (0..3).map(|_| NodeId::random()).collect();
        for id in &ids {
            gcs.register_node(node(*id, 2)).await.unwrap();
        }
        let incarnation = gcs.incarnation();
        // The rows a heartbeat carries (encoded once per change and shared) are the rows
        // a read of the living gives, whatever changed since they were last encoded (but
        // the time of the last heartbeat, which is no change: views do not use it).
        let rows_match = |since: u64, incarnation: u64| {
            let expected = gcs.nodes_since(false, since, incarnation, None);
            let read = gcs.node_rows_since(since, incarnation, None);
            let by_id = |nodes: &mut Vec<NodeInfo>| {
                nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
                nodes.iter_mut().for_each(|node| node.last_heartbeat_ms = 0);
            };
            let mut rows: Vec<NodeInfo> = read.rows.iter().map(|row| NodeInfo::decode(row.as_ref()).unwrap()).collect();
            let mut nodes = expected.nodes;
            by_id(&mut rows);
            by_id(&mut nodes);
            assert_eq!(rows, nodes, "rows since {since}");
            let (mut removed, mut expected_removed) = (read.removed, expected.removed);
            removed.sort();
            expected_removed.sort();
            assert_eq!(removed, expected_removed, "removed since {since}");
            assert_eq!((read.version, read.delta), (expected.version, expected.delta));
        };
        rows_match(0, 0);
        let full = gcs.nodes_since(false, 0, 0, None);
        assert!(!full.delta && full.nodes.len() == 3 && full.version == 3);
        let idle = gcs.nodes_since(false, full.version, incarnation, None);
        assert!(idle.delta && idle.nodes.is_empty() && idle.removed.is_empty() && idle.version == 3);

        // Heartbeats that change nothing change nothing; one with less free does.
        for id in &ids {
            gcs.heartbeat(&id.to_vec(), node(*id, 2).available).unwrap();
        }
        assert!(gcs.nodes_since(false, 3, incarnation, None).nodes.is_empty(), "no change, no rows");
        let one = ResourceSet::new().with(GPU, Quantity::whole(1));
        gcs.heartbeat(&ids[1].to_vec(), Some((&one).into())).unwrap();
        let changed = gcs.nodes_since(false, 3, incarnation, None);
        assert_eq!(changed.nodes.iter().map(|node| node.node_id.clone()).collect::<Vec<_>>(), vec![ids[1].to_vec()]);
        assert_eq!(changed.version, 4);
        rows_match(3, incarnation);
        rows_match(0, 0);

        // The others fall silent and die: removals for a view of the living, rows for one
        // with the dead.
        clock.advance_ms(900);
        gcs.heartbeat(&ids[1].to_vec(), None).unwrap();
        clock.advance_ms(200);
        gcs.check_heartbeats().await.unwrap();
        let mut dead = gcs.nodes_since(false, 4, incarnation, None);
        dead.removed.sort();
        let mut expected = vec![ids[0], ids[2]];
        expected.sort();
        assert!(dead.delta && dead.nodes.is_empty() && dead.removed == expected);
        assert_eq!(gcs.nodes_since(true, 4, incarnation, None).nodes.len(), 2, "dead rows for a reader of the dead");
        rows_match(4, incarnation);
        rows_match(0, 0);
        assert!(
            !gcs.listed_scores.contains_key(&ids[0]) && gcs.listed_scores.contains_key(&ids[1]),
            "no score kept for the dead"
        );

        // A score that moves with no change of the row logged (leases counted as they
        // start, time) reaches views at the next sweep: a second after the last, not at
        // every check.
        let swept = gcs.nodes_since(false, 0, 0, None).version;
        gcs.note_lease(&ids[1]);
        gcs.nodes.get_mut(&ids[1]).unwrap().reliability.get_or_insert_with(Default::default).leases_lost = 1;
        gcs.check_heartbeats().await.unwrap();
        assert_eq!(
            gcs.nodes_since(false, swept, incarnation, None).version,
            swept,
            "no sweep within a second of the last"
        );
        clock.advance_ms(SCORE_SWEEP_MS);
        gcs.heartbeat(&ids[1].to_vec(), None).unwrap();
        gcs.check_heartbeats().await.unwrap();
        let moved = gcs.nodes_since(false, swept, incarnation, None);
        assert_eq!(moved.nodes.iter().map(|node| node.node_id.clone()).collect::<Vec<_>>(), vec![ids[1].to_vec()]);
        rows_match(swept, incarnation);
        clock.advance_ms(SCORE_SWEEP_MS);
        gcs.heartbeat(&ids[1].to_vec(), None).unwrap();
        gcs.check_heartbeats().await.unwrap();
        assert!(gcs.nodes_since(false, moved.version, incarnation, None).nodes.is_empty(), "logged once");

        // Another incarnation's version, or one ahead of this process: everything.
        assert!(!gcs.nodes_since(false, 4, incarnation ^ 1, None).delta);
        assert!(!gcs.nodes_since(false, 999, incarnation, None).delta);
        // Further behind than the log remembers: everything.
        for _ in 0..crate::node_changes::NODE_CHANGES_KEPT {
            gcs.node_changed(ids[1]);
        }
        let behind = gcs.nodes_since(false, 4, incarnation, None);
        assert!(!behind.delta && behind.nodes.len() == 1, "the living, whole");
        rows_match(4, incarnation);
        assert!(gcs.nodes_since(false, behind.version - 1, incarnation, None).delta);
    }

    async fn state(clock: &ManualClock) -> Arc<GcsState> {
        let config = ClusterConfig { heartbeat_interval_ms: 100, heartbeat_timeout_ms: 1000, ..Default::default() };
        GcsState::open(config, Arc::new(MemoryStorage::new()), Arc::new(clock.clone())).await.unwrap()
    }

    /// Moves: a node records where its objects went, only to another alive node; a
    /// reader asking about the node they left finds the holder, one asking about any
    /// other node finds nothing; the holder alone forgets them; they outlive a restart.
    #[tokio::test]
    async fn objects_moved_off_a_node_are_found_until_their_holder_frees_them() {
        let clock = ManualClock::new(0);
        let storage: Arc<dyn GcsStorage> = Arc::new(MemoryStorage::new());
        let config = ClusterConfig::default();
        let gcs = GcsState::open(config.clone(), storage.clone(), Arc::new(clock.clone())).await.unwrap();
        let (leaving, holder, other) = (NodeId::random(), NodeId::random(), NodeId::random());
        for (id, address) in [(leaving, "10.0.0.1:1"), (holder, "10.0.0.2:1"), (other, "10.0.0.3:1")] {
            gcs.register_node(NodeInfo { address: address.into(), ..node(id, 1) }).await.unwrap();
        }
        let (moved, kept) = (ObjectId::random(), ObjectId::random());
        let nowhere = gcs.objects_moved(&leaving, vec![(moved, "10.9.9.9:1".into())]).await.unwrap_err();
        assert!(nowhere.to_string().contains("not another alive node"), "{nowhere}");
        let itself = gcs.objects_moved(&leaving, vec![(moved, "10.0.0.1:1".into())]).await.unwrap_err();
        assert!(itself.to_string().contains("not another alive node"), "{itself}");
        gcs.objects_moved(&leaving, vec![(moved, "10.0.0.2:1".into()), (kept, "10.0.0.2:1".into())]).await.unwrap();
        assert_eq!(
            gcs.object_moves("10.0.0.1:1", &[moved, ObjectId::random()]),
            vec!["10.0.0.2:1".to_string(), String::new()]
        );
        assert_eq!(gcs.object_moves("10.0.0.3:1", &[moved]), vec![String::new()], "only from where it was");

        gcs.forget_moves(&other, vec![moved]).await.unwrap();
        assert_eq!(
            gcs.object_moves("10.0.0.1:1", &[moved]),
            vec!["10.0.0.2:1".to_string()],
            "not the other's to forget"
        );
        gcs.forget_moves(&holder, vec![moved]).await.unwrap();
        assert_eq!(gcs.object_moves("10.0.0.1:1", &[moved, kept]), vec![String::new(), "10.0.0.2:1".to_string()]);

        // The holder moves one on (it leaves too): found from where it was first; no
        // other node may redirect it.
        gcs.objects_moved(&other, vec![(kept, "10.0.0.1:1".into())]).await.unwrap();
        assert_eq!(gcs.object_moves("10.0.0.1:1", &[kept]), vec!["10.0.0.2:1".to_string()], "not the other's to move");
        gcs.objects_moved(&holder, vec![(kept, "10.0.0.3:1".into())]).await.unwrap();
        assert_eq!(gcs.object_moves("10.0.0.1:1", &[kept]), vec!["10.0.0.3:1".to_string()]);

        let restarted = GcsState::open(config, storage, Arc::new(clock)).await.unwrap();
        assert_eq!(restarted.object_moves("10.0.0.1:1", &[kept]), vec!["10.0.0.3:1".to_string()], "kept in storage");
    }

    #[tokio::test]
    async fn repeated_failed_gpu_checks_within_the_window_make_a_node_untrusted_until_the_operator_clears_it() {
        use ionet_common::gpu_proof::{held_back, state_name};
        let clock = ManualClock::new(1_000_000);
        let config = ClusterConfig { gpu_check_untrusted_window_ms: 3_600_000, ..Default::default() };
        let gcs = GcsState::open(config, Arc::new(MemoryStorage::new()), Arc::new(clock.clone())).await.unwrap();
        let id = NodeId::random();
        let mut info = node(id, 1);
        info.gpus = vec![ionet_common::rpc::proto::common::GpuInfo {
            index: 0,
            model: "H100".into(),
            memory_bytes: 80 << 30,
            simulated: true,
        }];
        gcs.register_checked_node(info.clone()).await.unwrap();
        let fail = |why: &str| gcs.record_gpu_check(&id, Err(why.to_string()));
        let check = |gcs: &GcsState| gcs.node(&id).unwrap().gpu_check.unwrap();

        // Two failures, then a third two hours later: never three within the hour.
        fail("late").await.unwrap();
        fail("late").await.unwrap();
        clock.advance_ms(2 * 3_600_000);
        fail("late").await.unwrap();
        assert_eq!(state_name(&check(&gcs)), "failed", "{:?}", check(&gcs));
        assert_eq!(check(&gcs).recent_failures_ms.len(), 1, "older failures left the window");
        clock.advance_ms(600_000);
        fail("late").await.unwrap();
        let third = fail("row 3 of the product is wrong").await.unwrap();
        assert_eq!(state_name(&third), "untrusted");
        assert_eq!(third.untrusted_since_ms, clock.now_ms());
        assert_eq!(third.failures, 5);

        // A pass, or registering with other GPUs, does not trust it again.
        let passed = gcs.record_gpu_check(&id, Ok((1.0, 1.0, 1))).await.unwrap();
        assert_eq!(state_name(&passed), "untrusted");
        assert!(held_back(&gcs.node(&id).unwrap()), "an untrusted node takes no work");
        let because = ionet_common::gpu_proof::held_back_because(&passed);
        assert!(
            because.contains("untrusted after repeated failed checks (3 on record)")
                && because.contains("product is wrong"),
            "{because}"
        );
        info.gpus[0].memory_bytes += 1;
        gcs.register_node(info.clone()).await.unwrap();
        assert_eq!(state_name(&check(&gcs)), "untrusted", "re-registering clears nothing");
        // Nor does registering a while without GPUs, then with them again.
        let mut bare = node(id, 0);
        bare.total = None;
        gcs.register_node(bare).await.unwrap();
        assert_eq!(state_name(&check(&gcs)), "untrusted", "{:?}", check(&gcs));
        assert!(held_back(&gcs.node(&id).unwrap()), "an untrusted node without GPUs takes no work either");
        gcs.register_node(info).await.unwrap();
        assert_eq!((state_name(&check(&gcs)), check(&gcs).failures), ("untrusted", 5));
        gcs.record_gpu_check(&id, Ok((1.0, 1.0, 1))).await.unwrap();

        // The operator clears it: it takes work on its passing check.
        let cleared = gcs.clear_untrusted(&id).await.unwrap();
        assert_eq!((state_name(&cleared), cleared.cleared_at_ms), ("passed", clock.now_ms()));
        assert!(cleared.recent_failures_ms.is_empty() && cleared.failures == 5, "counts stay on record");
        assert!(!held_back(&gcs.node(&id).unwrap()));
        let again = gcs.clear_untrusted(&id).await.unwrap_err();
        assert!(again.to_string().contains("is not untrusted (its GPU check is passed)"), "{again}");
        let unknown = gcs.clear_untrusted(&NodeId::random()).await.unwrap_err();
        assert!(unknown.to_string().contains("is not registered"), "{unknown}");

        // A lease put its check off too long: held back and unrewarded, no failure, until
        // its next pass.
        gcs.record_gpu_check_overdue(&id).await.unwrap();
        let overdue = check(&gcs);
        assert_eq!((state_name(&overdue), overdue.passed_since_ms, overdue.failures), ("overdue", 0, 5));
        assert!(held_back(&gcs.node(&id).unwrap()), "an overdue node takes no new work");
        assert!(ionet_common::gpu_proof::held_back_because(&overdue).contains("its next check is overdue"));
        clock.advance_ms(1000);
        let passed = gcs.record_gpu_check(&id, Ok((1.0, 1.0, 1))).await.unwrap();
        assert_eq!((state_name(&passed), passed.passed_since_ms), ("passed", clock.now_ms()));
        // Only a passing node becomes overdue: a failed one stays failed.
        fail("late").await.unwrap();
        gcs.record_gpu_check_overdue(&id).await.unwrap();
        assert_eq!(state_name(&check(&gcs)), "failed");
        gcs.record_gpu_check_overdue(&NodeId::random()).await.expect("an unknown node: nothing to record");
    }

    #[tokio::test]
    async fn silent_node_is_declared_dead_once_and_published() {
        let clock = ManualClock::new(1_000_000);
        let gcs = state(&clock).await;
        let mut events = gcs.subscribe();
        let (quiet, chatty) = (NodeId::random(), NodeId::random());
        gcs.register_node(node(quiet, 1)).await.unwrap();
        gcs.register_node(node(chatty, 1)).await.unwrap();
        clock.advance_ms(900);
        gcs.heartbeat(chatty.as_bytes(), None).unwrap();
        clock.advance_ms(200);
        assert_eq!(gcs.check_heartbeats().await.unwrap(), vec![quiet]);
        assert!(gcs.check_heartbeats().await.unwrap().is_empty(), "declared dead once");
        let kinds: Vec<_> = std::iter::from_fn(|| events.try_recv().ok()).map(|event| event.event.unwrap()).collect();
        assert!(matches!(kinds.last(), Some(Event::NodeDead(dead)) if dead.node_id == quiet.to_vec()));
        let err = gcs.heartbeat(quiet.as_bytes(), None).unwrap_err();
        assert!(err.to_string().contains("declared dead"), "{err}");
    }

    /// A head that stood still (starved, or its runtime busy) does not blame its nodes
    /// for the heartbeats it did not take meanwhile; a node silent beyond that still dies.
    #[tokio::test]
    async fn the_heads_own_stall_is_not_a_nodes_silence() {
        let clock = ManualClock::new(1_000_000);
        let gcs = state(&clock).await;
        let id = NodeId::random();
        gcs.register_node(node(id, 1)).await.unwrap();
        // Timeout 1,000 ms: the head stands still 1,500 ms, then checks.
        clock.advance_ms(1_600);
        gcs.note_stall(1_500);
        assert!(gcs.check_heartbeats().await.unwrap().is_empty(), "silent 1.6 s, 1.5 s of it the head's");
        gcs.heartbeat(id.as_bytes(), None).unwrap();
        // A stall before the last heartbeat excuses nothing after it, and one under way
        // at it only its part after.
        clock.advance_ms(1_100);
        let dead = gcs.check_heartbeats().await.unwrap();
        assert_eq!(dead, vec![id]);
        assert!(gcs.node(&id).unwrap().death_cause.contains("missed heartbeats for 1100 ms (timeout 1000 ms)"));
        let third = NodeId::random();
        gcs.register_node(node(third, 1)).await.unwrap();
        clock.advance_ms(800);
        gcs.heartbeat(third.as_bytes(), None).unwrap();
        // A stall of 1,000 ms that began 300 ms before that heartbeat: 700 ms excused.
        clock.advance_ms(700);
        gcs.note_stall(1_000);
        clock.advance_ms(900);
        assert!(gcs.check_heartbeats().await.unwrap().is_empty(), "silent 1.6 s, 0.7 s of it the head's");
        clock.advance_ms(200);
        assert_eq!(gcs.check_heartbeats().await.unwrap(), vec![third]);
        let cause = gcs.node(&third).unwrap().death_cause;
        assert!(cause.contains("for 1800 ms (timeout 1000 ms, plus 700 ms the head stood still)"), "{cause}");
        // Stalls excuse at most three timeouts: a head that keeps stalling still finds
        // a dead node.
        let other = NodeId::random();
        gcs.register_node(node(other, 1)).await.unwrap();
        for _ in 0..10 {
            clock.advance_ms(1_000);
            gcs.note_stall(1_000);
        }
        assert_eq!(gcs.check_heartbeats().await.unwrap(), vec![other]);
        let cause = gcs.node(&other).unwrap().death_cause;
        assert!(cause.contains("plus 3000 ms the head stood still"), "{cause}");
    }

    #[tokio::test]
    async fn a_node_id_stays_with_its_first_key_and_reports_stay_within_its_total() {
        let clock = ManualClock::new(0);
        let gcs = state(&clock).await;
        let id = NodeId::random();
        let mut first = node(id, 2);
        first.public_key = vec![1; 32];
        gcs.register_node(first.clone()).await.unwrap();
        gcs.register_node(first.clone()).await.expect("the same key registers again");
        let mut taken = node(id, 8);
        taken.public_key = vec![2; 32];
        taken.wallet = "mallory".into();
        let refused = gcs.register_node(taken).await.unwrap_err();
        assert!(refused.to_string().contains("bound to another key"), "{refused}");
        let row = gcs.node(&id).unwrap();
        assert_eq!((row.public_key, row.wallet), (vec![1; 32], String::new()), "the record is unchanged");

        let beyond = ResourceSet::new().with(GPU, Quantity::whole(3));
        let refused = gcs.heartbeat(id.as_bytes(), Some((&beyond).into())).unwrap_err();
        assert!(refused.to_string().contains("beyond its total"), "{refused}");
        let within = ResourceSet::new().with(GPU, Quantity::whole(1));
        gcs.heartbeat(id.as_bytes(), Some((&within).into())).unwrap();
    }

    #[tokio::test]
    async fn bad_registrations_are_refused() {
        let clock = ManualClock::new(0);
        let gcs = state(&clock).await;
        let mut overdrawn = node(NodeId::random(), 1);
        overdrawn.available = Some((&ResourceSet::new().with(GPU, Quantity::whole(2))).into());
        assert!(gcs.register_node(overdrawn).await.unwrap_err().to_string().contains("beyond its total"));
        let mut short_id = node(NodeId::random(), 1);
        short_id.node_id = vec![1, 2];
        assert!(gcs.register_node(short_id).await.unwrap_err().to_string().contains("28 bytes"));
        let unknown = gcs.heartbeat(NodeId::random().as_bytes(), None).unwrap_err();
        assert!(unknown.to_string().contains("not registered"));
    }

    #[tokio::test]
    async fn two_first_registrations_of_one_id_cannot_both_win() {
        let clock = ManualClock::new(0);
        let gcs = state(&clock).await;
        for _ in 0..20 {
            let id = NodeId::random();
            let (mut mine, mut theirs) = (node(id, 1), node(id, 1));
            (mine.public_key, theirs.public_key) = (vec![1; 32], vec![2; 32]);
            // Both checked before either is written: only one key may hold the id.
            let (first, second) = tokio::join!(gcs.register_node(mine), gcs.register_node(theirs));
            assert_eq!(u8::from(first.is_ok()) + u8::from(second.is_ok()), 1, "{first:?} {second:?}");
            let bound = gcs.nodes(false).into_iter().find(|row| row.node_id == id.to_vec()).unwrap().public_key;
            assert_eq!(
                bound,
                if first.is_ok() { vec![1; 32] } else { vec![2; 32] },
                "the winner's key is the record's"
            );
        }
    }

    #[tokio::test]
    async fn kv_is_namespaced_and_bounded() {
        let clock = ManualClock::new(0);
        let gcs = state(&clock).await;
        let op = KvScope::Operator;
        assert!(gcs.kv_put(&op, "a", b"k", b"1".to_vec(), false).await.unwrap());
        assert!(!gcs.kv_put(&op, "a", b"k", b"2".to_vec(), false).await.unwrap());
        assert_eq!(gcs.kv_get(&op, "a", b"k").await.unwrap(), b"1");
        assert!(gcs.kv_get(&op, "b", b"k").await.is_err());
        gcs.kv_put(&op, "a", b"k2", b"3".to_vec(), true).await.unwrap();
        assert_eq!(gcs.kv_keys(&op, "a", b"k").await.unwrap(), vec![b"k".to_vec(), b"k2".to_vec()]);
        assert_eq!(gcs.kv_del(&op, "a", b"k", true).await.unwrap(), 2);
        let big = vec![0u8; gcs.config.max_kv_value_bytes + 1];
        assert!(gcs.kv_put(&op, "a", b"big", big, true).await.unwrap_err().to_string().contains("above the limit"));
        let control = gcs.kv_put(&op, "a\u{1}b", b"k", b"1".to_vec(), true).await.unwrap_err();
        assert!(control.to_string().contains("control characters"), "{control}");
    }

    /// An account's KV is bounded in bytes and namespaces: a put past either is refused
    /// with what the account holds, deleting frees room, another account is untouched,
    /// the operator has no quota, and a head restarted on the same storage counts again.
    #[tokio::test]
    async fn each_account_keeps_its_kv_within_its_quota() {
        let clock = ManualClock::new(0);
        let storage: Arc<dyn GcsStorage> = Arc::new(MemoryStorage::new());
        let config =
            ClusterConfig { max_kv_bytes_per_account: 10_000, max_kv_namespaces_per_account: 3, ..Default::default() };
        let gcs = GcsState::open(config.clone(), storage.clone(), Arc::new(clock.clone())).await.unwrap();
        let (acme, globex) = (KvScope::Account("acme"), KvScope::Account("globex"));
        for index in 0..4u8 {
            gcs.kv_put(&acme, "blobs", &[b'k', index], vec![7; 2000], true).await.unwrap();
        }
        let full = gcs.kv_put(&acme, "blobs", b"k9", vec![7; 2000], true).await.unwrap_err();
        assert!(matches!(full, GcsError::Ionet(IonetError::ResourceExhausted(_))), "{full}");
        assert!(full.to_string().contains("account acme") && full.to_string().contains("10000"), "{full}");
        // Overwriting in place counts only the difference.
        gcs.kv_put(&acme, "blobs", b"k\x00", vec![1; 10], true).await.unwrap();
        gcs.kv_put(&acme, "blobs", b"k9", vec![7; 1900], true).await.unwrap();
        // Another account has its own room; the operator has no quota.
        gcs.kv_put(&globex, "blobs", b"k", vec![7; 9000], true).await.unwrap();
        gcs.kv_put(&KvScope::Operator, "blobs", b"k", vec![7; 50_000], true).await.unwrap();
        // Namespaces: three, then no more.
        gcs.kv_put(&acme, "a", b"k", vec![1], true).await.unwrap();
        gcs.kv_put(&acme, "b", b"k", vec![1], true).await.unwrap();
        let many = gcs.kv_put(&acme, "c", b"k", vec![1], true).await.unwrap_err();
        assert!(many.to_string().contains("namespaces"), "{many}");
        // Deleting frees both.
        assert_eq!(gcs.kv_del(&acme, "blobs", b"", true).await.unwrap(), 5);
        gcs.kv_put(&acme, "c", b"k", vec![7; 9000], true).await.unwrap();
        let used = gcs.kv_use("acme");
        assert_eq!(used.namespaces.len(), 3, "{used:?}");
        // A restart counts what is stored.
        let again = GcsState::open(config, storage, Arc::new(clock.clone())).await.unwrap();
        assert_eq!(again.kv_use("acme"), used);
        assert!(again.kv_put(&acme, "c", b"more", vec![7; 2000], true).await.is_err(), "still full after a restart");
    }

    #[tokio::test]
    async fn tenants_never_see_each_others_kv_and_exports_are_written_once_by_hash() {
        let clock = ManualClock::new(0);
        let gcs = state(&clock).await;
        let (acme, globex) = (KvScope::Account("acme"), KvScope::Account("globex"));
        gcs.kv_put(&acme, "models", b"llama", b"acme's".to_vec(), true).await.unwrap();
        gcs.kv_put(&globex, "models", b"llama", b"globex's".to_vec(), true).await.unwrap();
        assert_eq!(gcs.kv_get(&acme, "models", b"llama").await.unwrap(), b"acme's");
        assert_eq!(gcs.kv_get(&globex, "models", b"llama").await.unwrap(), b"globex's");
        assert!(gcs.kv_get(&KvScope::Operator, "models", b"llama").await.is_err(), "the operator's space is apart");
        assert_eq!(gcs.kv_del(&globex, "models", b"", true).await.unwrap(), 1);
        assert_eq!(gcs.kv_keys(&acme, "models", b"").await.unwrap(), vec![b"llama".to_vec()], "acme's is left");

        // Definition exports: one job's, under the hash of their bytes, once.
        let definition = b"pickled function".to_vec();
        let key = sha2::Sha256::digest(&definition).to_vec();
        let (one, two) = (KvScope::Job("acme", JobId::from_sequence(1)), KvScope::Job("acme", JobId::from_sequence(2)));
        assert!(gcs.kv_put(&one, "ionet_functions", &key, definition.clone(), false).await.unwrap());
        assert!(!gcs.kv_put(&one, "ionet_functions", &key, definition.clone(), false).await.unwrap(), "once");
        assert_eq!(gcs.kv_get(&one, "ionet_functions", &key).await.unwrap(), definition);
        assert!(gcs.kv_get(&two, "ionet_functions", &key).await.is_err(), "another job's exports are apart");
        let swapped = gcs.kv_put(&two, "ionet_functions", &key, b"evil".to_vec(), false).await.unwrap_err();
        assert!(swapped.to_string().contains("SHA-256"), "{swapped}");
        let overwrite = gcs.kv_put(&one, "ionet_functions", &key, definition, true).await.unwrap_err();
        assert!(overwrite.to_string().contains("written once"), "{overwrite}");
        assert!(gcs
            .kv_del(&one, "ionet_classes", &key, false)
            .await
            .unwrap_err()
            .to_string()
            .contains("never deleted"));

        let job = Principal::Job { job: JobId::from_sequence(1), account: "acme".into() };
        assert_eq!(KvScope::of(&job, "models").unwrap(), acme);
        assert_eq!(KvScope::of(&job, "ionet_classes").unwrap(), one);
        assert_eq!(KvScope::of(&Principal::Admin, "ionet_classes").unwrap(), KvScope::Operator);
        assert!(KvScope::of(&Principal::Node(NodeId::random()), "models").is_err());
    }

    #[tokio::test]
    async fn job_ids_are_sequential_and_finish_publishes() {
        let clock = ManualClock::new(0);
        let gcs = state(&clock).await;
        let first = gcs.add_job(JobInfo::default()).await.unwrap();
        let second = gcs.add_job(JobInfo::default()).await.unwrap();
        assert_eq!(first.job_id, JobId::from_sequence(1).to_vec());
        assert_eq!(second.job_id, JobId::from_sequence(2).to_vec());
        gcs.finish_job(&first.job_id).await.unwrap();
        assert_eq!(gcs.jobs()[0].state, JobState::Finished as i32);
        assert!(gcs.finish_job(&JobId::from_sequence(99).to_vec()).await.is_err());
    }
}
