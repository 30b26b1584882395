//! Metering on the head: both parties' words about leases in, usage records out, the
//! ledger settled per epoch.
//!
//! Protocol: a node daemon reports when it granted a lease and when it ended it
//! (`ReportLeases`, or one at a time `LeaseStarted`/`LeaseEnded`); the lease's holder (a
//! job's core worker, `ReportHeldLeases`; the head itself for actors and committed
//! bundles) reports when it was granted the lease and when it gave it back. Every word is
//! stamped with the control store's [`Clock`](ionet_common::clock::Clock), less the age
//! its reporter claims (2 s at most); the rule for what a record bills is
//! [`ionet_settlement::two_party`]. The node's word joins the node table (provider
//! wallet, prices) and the job table (payer account): a price changed later does not
//! reprice a running lease.
//!
//! Invariants:
//! - A lease is in the book (and the `Leases` storage table) from the first word either
//!   side says of it until its record is made, or until it is dropped unmatched (a node's
//!   word after [`CONFIRM_WINDOW_MS`], a holder's after [`UNMATCHED_EXPIRY_MS`]); a head
//!   restarted with the same storage carries it on.
//! - A record is made once, when both sides have said the lease started and anyone ended
//!   it: the holder, the node, the node's death (its last heartbeat), the job's end (not
//!   for leases the head holds), or the payer's credit running out (not for bundles).
//!   When the holder ended it and the node has not, the node is told (`EndLeases`).
//! - Each usage record is written to the `Usage` storage table before it goes to the
//!   sinks (the ledger, then the optional JSON-lines exporter). At start every stored
//!   record is offered to the ledger again; the ledger accepts a record id once, so a
//!   crash between the two writes neither loses nor doubles a record.
//! - Record ids derive from the lease id (see [`record_id`]): a lease still open at an
//!   epoch's end is cut there into a record for the part before (settled in that epoch)
//!   and an open remainder with the next segment number.
//! - Epochs end on multiples of `epoch_length_ms` since the Unix epoch; the background
//!   task closes the latest boundary passed (so a head that was down for several epochs
//!   closes one covering all of them). `Settle` closes one at "now". Epoch ids count up
//!   from 0 in closing order.
//! - A job with no payer account is billed to the account [`DEFAULT_PAYER`]. A node with
//!   no wallet is credited under `node-<node id>` until its operator claims it.
//! - Availability for an epoch `(previous end, end]`: each node with GPUs counts from
//!   `max(registered_at, previous end)` to its end (its last heartbeat if dead), times
//!   its GPU count.
//! - Funding ([`Metering::check_funding`]): jobs of a payer whose credit does not cover
//!   its running leases for the credit horizon, and jobs whose holders left
//!   [`MAX_UNCONFIRMED_PER_JOB`] grants unconfirmed, get no new leases (nodes hear it
//!   with their heartbeats).
//!
//! Submodules: `book` holds the in-memory bookkeeping (open leases, records made, record
//! ids); `settlement` closes epochs (cutting open leases, availability, the task closing
//! scheduled epochs); `tests` holds the unit tests.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use ionet_common::resources::{MicroUsd, GPU};
use ionet_common::rpc::proto::common::NodeState;
use ionet_common::rpc::proto::gcs::cluster_event::Event;
use ionet_common::rpc::proto::gcs::ClusterEvent;
use ionet_common::rpc::proto::metering as proto;
use ionet_common::{IonetError, JobId, LeaseId, NodeId};
use ionet_settlement::{
    Account, JsonLinesExporter, Ledger, LedgerConfig, LedgerHandle, LedgerStore, MemoryStore, MeterFanout, MeterSink,
    ProviderEarnings, RedbStore, UsageRecord,
};
use prost::Message;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::error::{GcsError, GcsResult};
use crate::state::{blocking, GcsState};
use crate::storage::{StorageWrite, Table};

mod book;
mod settlement;
#[cfg(test)]
mod tests;

pub use book::record_id;
use book::{invalid, not_found, wallet_of, Book, Changes, Lease, Made, NodeSide};
pub use ionet_settlement::two_party;
use two_party::EndedBy;

/// How long a node's grant may wait for its holder's word before it ends without a
/// record (holders report every 100 ms and retry for 60 s while the head is away; this
/// covers that, and is counted from the head's start for leases it reloads).
pub const CONFIRM_WINDOW_MS: u64 = 90_000;
/// How long a word that found no match from the other side is kept.
pub const UNMATCHED_EXPIRY_MS: u64 = 10 * 60_000;
/// How long after its holder gave a lease back the node is told to end it, unless it
/// said so first.
pub const STOP_GRACE_MS: u64 = 500;
/// The most leases one holder report may name.
pub const MAX_HELD_PER_REPORT: usize = 10_000;
/// The most holder words of one job no node has matched yet that the head keeps.
pub const MAX_UNMATCHED_PER_JOB: usize = 10_000;
/// A job whose holders left this many node grants unconfirmed gets no more leases.
pub const MAX_UNCONFIRMED_PER_JOB: u32 = 3;

/// Tells node daemons to end leases (the head's control credential over gRPC).
#[tonic::async_trait]
pub trait LeaseStopper: Send + Sync {
    /// Returns how many of `leases` the node held and ended.
    async fn end_leases(&self, node_address: &str, leases: &[LeaseId], reason: &str) -> ionet_common::IonetResult<u32>;
}

/// What the head itself holds, for vouching for the leases it holds as their holder.
#[tonic::async_trait]
pub trait HeadHoldings: Send + Sync {
    /// What bundle `index` of placement group `group` reserves, when it is `job`'s and
    /// committed (or being committed) on `node`.
    fn bundle_of(&self, job: &JobId, node: &NodeId, group: &[u8], index: u32) -> Option<ionet_common::ResourceSet>;

    /// Removes placement group `group` because its payer can pay for it no more (`why`):
    /// its bundles are released on their nodes, which end their leases. A group already
    /// removed is left as it is.
    async fn remove_unfunded_group(&self, group: &[u8], why: &str);
}

/// The payer billed for jobs added without a payer account.
pub const DEFAULT_PAYER: &str = "default";

pub type GcsLedger = LedgerHandle<Box<dyn LedgerStore>>;

/// What the metering service shows of on-chain payouts (the `solana` feature's
/// `Payouts` implements it; without it, the head pays nothing on chain).
#[tonic::async_trait]
pub trait PayoutView: Send + Sync {
    async fn list(&self) -> GcsResult<Vec<proto::EpochPayoutInfo>>;
    /// The deposit address and the deposits seen there (all of them: the caller filters).
    async fn deposits(&self) -> GcsResult<proto::DepositsReply>;
}

/// Where the ledger and the usage export live.
#[derive(Clone, Debug, Default)]
pub struct MeteringOptions {
    /// `None`: the ledger is kept in memory, lost with the process.
    pub ledger_path: Option<PathBuf>,
    /// Usage records are also appended here as JSON lines.
    pub usage_export_path: Option<PathBuf>,
}

/// The metering service's state: open leases, records made, the ledger and the sinks.
pub struct Metering {
    state: Arc<GcsState>,
    ledger: GcsLedger,
    sinks: MeterFanout,
    book: Mutex<Book>,
    /// Serialises settlements (cut, plan, commit), which await storage between steps.
    settling: tokio::sync::Mutex<()>,
    /// End of the last closed epoch, or the time metering opened if none.
    last_epoch_end_ms: AtomicU64,
    /// Signalled after every settlement that closed an epoch (the payer waits on it).
    settled: tokio::sync::Notify,
    /// Weak: the payer holds the metering, and its task owns the payer.
    payouts: std::sync::OnceLock<std::sync::Weak<dyn PayoutView>>,
    /// The head's own leases (bundles), to vouch for as their holder.
    head_holdings: std::sync::OnceLock<Arc<dyn HeadHoldings>>,
    /// How nodes are told to end leases whose holder gave them back.
    stopper: std::sync::OnceLock<Arc<dyn LeaseStopper>>,
    /// Orders storage writes (see `apply`).
    writing: tokio::sync::Mutex<()>,
}

impl Metering {
    /// Opens the ledger and the exporter, loads open leases and records from the control
    /// store's storage, offers every record to the ledger again, and ends the leases of
    /// nodes already dead. Subscribe to `state`'s events *before* calling this, so that no
    /// death falls between this sweep and the subscription.
    pub async fn open(state: Arc<GcsState>, options: MeteringOptions) -> GcsResult<Arc<Self>> {
        let config = state.config().clone();
        let ledger_config = LedgerConfig {
            fee_bps: config.protocol_fee_bps,
            reward_pool_per_hour: config.reward_pool_per_hour_micros,
            reward_source: Account::Funding,
        };
        let storage = state.storage().clone();
        let (ledger, exporter, leases, records) = blocking(move || {
            let store: Box<dyn LedgerStore> = match &options.ledger_path {
                Some(path) => Box::new(
                    RedbStore::open(path)
                        .map_err(|err| GcsError::Storage(format!("cannot open ledger {}: {err}", path.display())))?,
                ),
                None => Box::new(MemoryStore::new()),
            };
            let ledger = LedgerHandle::new(Ledger::new(store, ledger_config)?);
            let exporter = match &options.usage_export_path {
                Some(path) => Some(Arc::new(JsonLinesExporter::append_to(path).map_err(|err| {
                    GcsError::Storage(format!("cannot open usage export {}: {err}", path.display()))
                })?)),
                None => None,
            };
            let leases = storage.scan_prefix(Table::Leases, b"")?;
            let records = storage.scan_prefix(Table::Usage, b"")?;
            Ok((ledger, exporter, leases, records))
        })
        .await?;

        let decode = |what: &str, bytes: &[u8]| {
            proto::UsageRecord::decode(bytes)
                .map_err(|err| GcsError::Corrupt { what: what.to_string(), why: err.to_string() })
        };
        let mut made: Vec<Made> = Vec::with_capacity(records.len());
        for (key, bytes) in &records {
            let what = format!("usage record {}", hex::encode(key));
            made.push(Made::from_proto(&decode(&what, bytes)?)?);
        }
        made.sort_by_key(|m| (m.record.end_ms, m.record.record_id));
        let mut book = Book::default();
        let mut stale_leases = Vec::new();
        for (key, bytes) in &leases {
            let mut lease = Lease::from_proto(&decode(&format!("lease {}", hex::encode(key)), bytes)?)?;
            let pieces = made.iter().filter(|m| m.lease_id == lease.lease_id && m.segment >= lease.segment);
            // Ended, but the head stopped before it removed the lease row.
            if pieces.clone().any(|m| m.ended_by != "epoch") {
                stale_leases.push(lease.lease_id);
                continue;
            }
            // Cut at an epoch's end, but the head stopped before it stored the remainder.
            if let Some(cut) = pieces.max_by_key(|m| m.segment) {
                lease.segment = cut.segment + 1;
                lease.segment_start = Some(cut.record.end_ms);
            }
            // Its silence is counted from this start, not from before the head went away.
            lease.last_word_ms = lease.last_word_ms.max(state.now_ms());
            book.open.insert(lease.lease_id, lease);
        }
        for m in made {
            let lease_ended = !book.open.contains_key(&m.lease_id) && m.ended_by != "epoch";
            book.push(m, lease_ended);
        }
        let all: Vec<UsageRecord> = book.records.iter().map(|m| m.record.clone()).collect();

        let mut sinks = MeterFanout::new().with(Arc::new(ledger.clone()));
        if let Some(exporter) = exporter {
            sinks = sinks.with(exporter);
        }
        let redeliver = ledger.clone();
        let storage = state.storage().clone();
        let fee_bps = config.protocol_fee_bps;
        let (last_end, owed) = blocking(move || {
            for lease in stale_leases {
                storage.delete(Table::Leases, lease.as_bytes())?;
            }
            let mut ledger = redeliver.lock();
            let new = ledger.accept_records(&all)?;
            if new > 0 {
                tracing::info!(records = new, "usage records re-offered to the ledger");
            }
            // What payers owe for records no epoch has settled yet.
            let mut owed: HashMap<String, u64> = HashMap::new();
            for record in &all {
                if ledger.settled_in(record.record_id)?.is_none() {
                    let charge = with_fee(record.cost_micro_usd().unwrap_or(0), fee_bps);
                    let owes = owed.entry(record.payer_account.clone()).or_default();
                    *owes = owes.saturating_add(charge);
                }
            }
            Ok((ledger.epochs()?.last().map(|epoch| epoch.end_ms), owed))
        })
        .await?;
        book.owed = owed;
        let now = state.now_ms();
        tracing::info!(open_leases = book.open.len(), records = book.records.len(), "metering opened");
        let metering = Arc::new(Metering {
            state,
            ledger,
            sinks,
            book: Mutex::new(book),
            settling: tokio::sync::Mutex::new(()),
            last_epoch_end_ms: AtomicU64::new(last_end.unwrap_or(now)),
            settled: tokio::sync::Notify::new(),
            payouts: std::sync::OnceLock::new(),
            head_holdings: std::sync::OnceLock::new(),
            stopper: std::sync::OnceLock::new(),
            writing: tokio::sync::Mutex::new(()),
        });
        metering.end_leases_of_dead_nodes().await?;
        Ok(metering)
    }

    pub fn ledger(&self) -> &GcsLedger {
        &self.ledger
    }

    /// Notified after each settlement that closed an epoch (one stored permit, so a
    /// settlement while the waiter is busy is not missed).
    pub fn settled(&self) -> &tokio::sync::Notify {
        &self.settled
    }

    /// Attaches the on-chain payer, once.
    pub fn set_payouts(&self, payouts: std::sync::Weak<dyn PayoutView>) {
        if self.payouts.set(payouts).is_err() {
            tracing::warn!("payouts attached twice; keeping the first");
        }
    }

    /// Attaches what the head holds itself, once.
    pub fn set_head_holdings(&self, holdings: Arc<dyn HeadHoldings>) {
        if self.head_holdings.set(holdings).is_err() {
            tracing::warn!("head holdings attached twice; keeping the first");
        }
    }

    /// Attaches how nodes are told to end leases, once.
    pub fn set_stopper(&self, stopper: Arc<dyn LeaseStopper>) {
        if self.stopper.set(stopper).is_err() {
            tracing::warn!("lease stopper attached twice; keeping the first");
        }
    }

    /// Tells each node to end the leases due to end there; a node that cannot be
    /// reached is told again on the next round. Returns how many leases were asked.
    pub async fn stop_due_leases(&self) -> usize {
        let Some(stopper) = self.stopper.get().cloned() else {
            return 0;
        };
        let mut asked = 0;
        for (node_id, leases) in self.due_stops() {
            let Some(node) = self.state.node(&node_id) else { continue };
            if node.state == NodeState::Dead as i32 {
                continue;
            }
            asked += leases.len();
            let reason = "the head ended them: their holder gave them back, nobody asked for them, their job finished, or its payer ran out of credit";
            match stopper.end_leases(&node.address, &leases, reason).await {
                Ok(ended) => {
                    tracing::info!(node = %node_id.short(), asked = leases.len(), ended, "told a node to end leases its holders gave back")
                }
                Err(err) => {
                    tracing::warn!(node = %node_id.short(), error = %err, "could not tell a node to end leases; trying again");
                    let again = self.state.now_ms() + STOP_GRACE_MS;
                    let mut book = self.book();
                    for lease in leases {
                        book.stop_due.entry(lease).or_insert((node_id, again));
                    }
                }
            }
        }
        asked
    }

    /// The payer, while its task runs.
    pub fn payouts(&self) -> Option<Arc<dyn PayoutView>> {
        self.payouts.get().and_then(std::sync::Weak::upgrade)
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes the changes to storage, then hands new records to the sinks.
    async fn apply(&self, changes: Changes) -> GcsResult<()> {
        if changes.records.is_empty() && changes.put_leases.is_empty() && changes.delete_leases.is_empty() {
            return Ok(());
        }
        let now = self.state.now_ms();
        if !changes.records.is_empty() {
            let fee_bps = self.state.config().protocol_fee_bps;
            let mut book = self.book();
            for made in &changes.records {
                let charge = with_fee(made.record.cost_micro_usd().unwrap_or(0), fee_bps);
                let owed = book.owed.entry(made.record.payer_account.clone()).or_default();
                *owed = owed.saturating_add(charge);
            }
        }
        // Writes go out one apply at a time, each lease as the book holds it now: a slower
        // write never puts an older state of a lease back over a newer one.
        let _writing = self.writing.lock().await;
        let put_leases: Vec<Lease> = {
            let book = self.book();
            changes.put_leases.iter().filter_map(|lease| book.open.get(&lease.lease_id).cloned()).collect()
        };
        let storage = self.state.storage().clone();
        let sinks = self.sinks.clone();
        blocking(move || {
            let usage = changes.records.iter().map(|made| StorageWrite::Put {
                table: Table::Usage,
                key: made.storage_key(),
                value: made.to_proto(None).encode_to_vec(),
            });
            let open = put_leases.iter().map(|lease| StorageWrite::Put {
                table: Table::Leases,
                key: lease.lease_id.as_bytes().to_vec(),
                value: lease.to_proto(now).encode_to_vec(),
            });
            let ended = changes
                .delete_leases
                .iter()
                .map(|lease| StorageWrite::Delete { table: Table::Leases, key: lease.as_bytes().to_vec() });
            storage.write_all(&usage.chain(open).chain(ended).collect::<Vec<_>>())?;
            let records: Vec<UsageRecord> = changes.records.iter().map(|m| m.record.clone()).collect();
            sinks.record_batch(&records)?;
            sinks.flush()?;
            Ok(())
        })
        .await
    }

    /// The node's side of a lease: it granted `request.lease_id` to `request.job_id`. The
    /// record starts once the holder says so too (for a bundle, the head is the holder and
    /// says so here, when the group is the job's and placed on that node). Returns the
    /// node's start (control-store clock); reporting an open lease again returns it again.
    pub async fn lease_started(&self, request: &proto::LeaseStartedRequest) -> GcsResult<u64> {
        let (started, changes) = self.node_started(request)?;
        self.apply(changes).await?;
        Ok(started)
    }

    /// A node's report: its lease starts and ends in order, stored as one write. Returns
    /// why each event was refused (empty: taken).
    pub async fn node_report(
        &self,
        node_id: NodeId,
        events: Vec<proto::LeaseEvent>,
        reporter: Option<NodeId>,
    ) -> GcsResult<Vec<String>> {
        use proto::lease_event::Event;
        let mut changes = Changes::default();
        let mut refusals = Vec::with_capacity(events.len());
        for event in events {
            let outcome = match event.event {
                Some(Event::Started(started)) if started.node_id == node_id.as_bytes() => {
                    self.node_started(&started).map(|(_, made)| changes.extend(made))
                }
                Some(Event::Started(_)) => Err(IonetError::PermissionDenied(format!(
                    "node {} may report only its own leases",
                    node_id.short()
                ))
                .into()),
                Some(Event::Ended(ended)) => {
                    self.node_ended(&ended.lease_id, ended.age_ms, reporter).map(|(made, _)| changes.extend(made))
                }
                None => Err(invalid("an empty lease event".into())),
            };
            refusals.push(outcome.err().map(|err| err.to_string()).unwrap_or_default());
        }
        self.apply(changes).await?;
        Ok(refusals)
    }

    /// [`Metering::lease_started`] in the book, not yet stored.
    fn node_started(&self, request: &proto::LeaseStartedRequest) -> GcsResult<(u64, Changes)> {
        let lease_id = LeaseId::from_bytes(&request.lease_id)?;
        let node_id = NodeId::from_bytes(&request.node_id)?;
        let job_id = JobId::from_bytes(&request.job_id)?;
        let resources = request.resources.clone().unwrap_or_default().to_set()?;
        if resources.is_empty() {
            return Err(invalid(format!("lease {lease_id} leases no resources")));
        }
        let node = self
            .state
            .node(&node_id)
            .ok_or_else(|| not_found(format!("node {} is not registered with this control store", node_id.short())))?;
        if node.state == NodeState::Dead as i32 {
            return Err(IonetError::FailedPrecondition(format!(
                "node {} is dead ({}); it cannot start lease {lease_id}",
                node_id.short(),
                node.death_cause
            ))
            .into());
        }
        let total = node.total.clone().unwrap_or_default().to_set()?;
        if !total.contains(&resources) {
            return Err(invalid(format!(
                "lease {lease_id} reports {resources}, more than node {} has ({total})",
                node_id.short()
            )));
        }
        if ionet_common::gpu_proof::held_back(&node) {
            let why = ionet_common::gpu_proof::held_back_because(&node.gpu_check.clone().unwrap_or_default());
            return Err(IonetError::FailedPrecondition(format!(
                "node {} takes no leases until its GPUs pass the head's check ({why}); lease {lease_id} is not billed",
                node_id.short()
            ))
            .into());
        }
        let job = self.state.job(&job_id).ok_or_else(|| not_found(format!("job {job_id} does not exist")))?;
        // The job's own requirement, judged by the head's score, not the node's view of it.
        // Scored only for a job that asks (the lease path stays as it was for the rest).
        let score = || ionet_common::reliability::score_bps(&node, self.state.now_ms());
        if let Some(score) = (job.min_reliability_bps > 0).then(score).filter(|&score| score < job.min_reliability_bps)
        {
            return Err(IonetError::FailedPrecondition(format!(
                "node {} scores {} for reliability, below job {job_id}'s minimum of {}; lease {lease_id} is not billed",
                node_id.short(),
                ionet_common::reliability::format(score),
                ionet_common::reliability::format(job.min_reliability_bps)
            ))
            .into());
        }
        let payer_account =
            if job.payer_account.trim().is_empty() { DEFAULT_PAYER.to_string() } else { job.payer_account.clone() };
        let bundle = (!request.placement_group_id.is_empty())
            .then(|| (request.placement_group_id.clone(), request.bundle_index));
        // A bundle's holder is the head: it vouches when the group is the job's, there, for
        // what the bundle reserves, once.
        let head_holds = match &bundle {
            Some((group, index)) => {
                let reserved =
                    self.head_holdings.get().and_then(|head| head.bundle_of(&job_id, &node_id, group, *index));
                let Some(reserved) = reserved else {
                    return Err(IonetError::PermissionDenied(format!(
                        "lease {lease_id}: bundle {index} of placement group {} is not job {job_id}'s on node {}",
                        hex::encode(group),
                        node_id.short()
                    ))
                    .into());
                };
                if reserved != resources {
                    return Err(invalid(format!(
                        "lease {lease_id}: bundle {index} of placement group {} reserves {reserved}, not {resources}",
                        hex::encode(group)
                    )));
                }
                true
            }
            None => false,
        };
        let now = self.state.now_ms();
        let started = two_party::stamp(now, request.age_ms);
        let node_side = NodeSide {
            payer_account,
            provider_wallet: wallet_of(&node, &node_id),
            resources,
            price_per_gpu_hour: node.price_per_gpu_hour_micros,
            price_per_cpu_hour: node.price_per_cpu_hour_micros,
            bundle,
        };
        let changes = {
            let mut book = self.book();
            if let Some(&index) = book.ended.get(&lease_id) {
                let record = &book.records[index];
                if record.record.node_id == node_id && record.record.job_id == job_id {
                    return Ok((record.sides.node_started.unwrap_or(record.record.start_ms), Changes::default()));
                }
                return Err(IonetError::AlreadyExists(format!(
                    "lease {lease_id} already ended; a new lease needs a new id"
                ))
                .into());
            }
            if let Some(bundle) = node_side.bundle.as_ref() {
                let metered = book.open.values().any(|open| {
                    open.lease_id != lease_id
                        && open.node.as_ref().and_then(|node| node.bundle.as_ref()) == Some(bundle)
                });
                if metered {
                    return Err(IonetError::AlreadyExists(format!(
                        "lease {lease_id}: bundle {} of placement group {} is already metered",
                        bundle.1,
                        hex::encode(&bundle.0)
                    ))
                    .into());
                }
            }
            let lease = book.open.entry(lease_id).or_insert_with(|| Lease::new(lease_id, job_id, node_id, now));
            // A holder's word naming another node than the one that granted the lease was
            // not about this lease: it counts for nothing (the node's word is authenticated).
            if lease.node.is_none() && lease.node_id != node_id && lease.job_id == job_id {
                lease.node_id = node_id;
                lease.sides.holder_started = None;
                lease.sides.holder_ended = None;
            }
            if lease.node_id != node_id || lease.job_id != job_id {
                return Err(IonetError::AlreadyExists(format!(
                    "lease {lease_id} is already known on node {} for job {}",
                    lease.node_id.short(),
                    lease.job_id
                ))
                .into());
            }
            if let Some(first) = lease.sides.node_started {
                return Ok((first, Changes::default()));
            }
            let was_started = lease.sides.start().is_some();
            lease.node = Some(node_side);
            lease.sides.node_started = Some(started);
            if head_holds {
                lease.sides.holder_started = Some(started);
                lease.held_by_head = true;
            }
            // A lease counts toward its node's reliability once both sides say it started.
            if !was_started && lease.sides.start().is_some() {
                self.state.note_lease(&node_id);
            }
            lease.last_word_ms = now;
            let mut changes = Changes::default();
            book.after_word(lease_id, now, &mut changes);
            changes
        };
        tracing::debug!(lease = %lease_id, node = %node_id.short(), job = %job_id, started, "node started a lease");
        Ok((started, changes))
    }

    /// Ends a lease now, as the control plane (tests and the operator), and returns its
    /// record, if both sides had started it.
    pub async fn lease_ended(&self, lease_id: &[u8]) -> GcsResult<Option<proto::UsageRecord>> {
        self.lease_ended_by(lease_id, 0, None).await
    }

    /// The node's end of a lease, said `age_ms` ago by `reporter` (a node: only a lease on
    /// that node; `None`: the control plane). Returns the lease's record when there is
    /// one (the same again for an ended lease); a lease the holder never confirmed ends
    /// with none.
    pub async fn lease_ended_by(
        &self,
        lease_id: &[u8],
        age_ms: u64,
        reporter: Option<NodeId>,
    ) -> GcsResult<Option<proto::UsageRecord>> {
        let (changes, done) = self.node_ended(lease_id, age_ms, reporter)?;
        let fresh = !changes.records.is_empty();
        self.apply(changes).await?;
        match done {
            Some(made) if fresh => Ok(Some(made.to_proto(None))),
            Some(made) => Ok(self.with_settlement(vec![made]).await?.pop()),
            None => Ok(None),
        }
    }

    /// [`Metering::lease_ended_by`] in the book, not yet stored: the changes, and the
    /// lease's record if it has one.
    fn node_ended(&self, lease_id: &[u8], age_ms: u64, reporter: Option<NodeId>) -> GcsResult<(Changes, Option<Made>)> {
        let lease_id = LeaseId::from_bytes(lease_id)?;
        let now = self.state.now_ms();
        let (changes, done) = {
            let mut book = self.book();
            let node_of = |lease_id| {
                let open = book.open.get(lease_id).map(|lease: &Lease| lease.node_id);
                open.or_else(|| book.ended.get(lease_id).map(|&index| book.records[index].record.node_id))
            };
            if let (Some(reporter), Some(node)) = (reporter, node_of(&lease_id)) {
                if node != reporter {
                    return Err(IonetError::PermissionDenied(format!(
                        "node {} may not end lease {lease_id}: it runs on node {}",
                        reporter.short(),
                        node.short()
                    ))
                    .into());
                }
            }
            // The node has ended it: nothing left to tell it.
            book.stop_due.remove(&lease_id);
            if let Some(&index) = book.ended.get(&lease_id) {
                (Changes::default(), Some(book.records[index].clone()))
            } else if let Some(lease) = book.open.get_mut(&lease_id) {
                lease.sides.node_ended.get_or_insert(two_party::stamp(now, age_ms));
                lease.last_word_ms = now;
                let mut changes = Changes::default();
                book.after_word(lease_id, now, &mut changes);
                let made = changes.records.iter().find(|made| made.lease_id == lease_id).cloned();
                (changes, made)
            } else {
                return Err(not_found(format!("lease {lease_id} is not open on this control store")));
            }
        };
        Ok((changes, done))
    }

    /// The holder's side, in a batch: the leases a process of `job_id` (or the head, for
    /// actors) was granted and gave back (or never got). A word naming no node is about a
    /// lease already known.
    pub async fn holder_report(&self, job_id: JobId, leases: &[proto::HeldLease], by_head: bool) -> GcsResult<()> {
        if leases.len() > MAX_HELD_PER_REPORT {
            return Err(invalid(format!(
                "a report names {} leases; at most {MAX_HELD_PER_REPORT} fit in one",
                leases.len()
            )));
        }
        let mut words = Vec::with_capacity(leases.len());
        for held in leases {
            // No node: whichever node the lease is known on (it must be known already).
            let node = if held.node_id.is_empty() { None } else { Some(NodeId::from_bytes(&held.node_id)?) };
            // A word about a node this control store does not know is about no lease.
            if node.is_some_and(|node| self.state.node(&node).is_none()) {
                continue;
            }
            words.push((LeaseId::from_bytes(&held.lease_id)?, node, held));
        }
        let now = self.state.now_ms();
        let changes = {
            let mut book = self.book();
            let mut changes = Changes::default();
            let mut unmatched: Option<usize> = None;
            for (lease_id, node_id, held) in words {
                if book.ended.contains_key(&lease_id) {
                    continue;
                }
                let Some(node_id) = node_id.or_else(|| book.open.get(&lease_id).map(|lease| lease.node_id)) else {
                    continue;
                };
                // Words no node has matched are kept per job up to a cap (counted once
                // per report, not once per word).
                if !book.open.contains_key(&lease_id) {
                    let waiting = *unmatched.get_or_insert_with(|| {
                        book.open.values().filter(|lease| lease.job_id == job_id && lease.node.is_none()).count()
                    });
                    if waiting >= MAX_UNMATCHED_PER_JOB {
                        continue;
                    }
                    unmatched = Some(waiting + 1);
                }
                let lease = book.open.entry(lease_id).or_insert_with(|| Lease::new(lease_id, job_id, node_id, now));
                if lease.job_id != job_id || lease.node_id != node_id {
                    // Not this job's lease there: a word about another's lease counts for nothing.
                    tracing::warn!(lease = %lease_id, job = %job_id, "a holder reported a lease that is not its job's; ignored");
                    continue;
                }
                let at = two_party::stamp(now, held.age_ms);
                lease.held_by_head |= by_head;
                if held.granted {
                    let was_started = lease.sides.start().is_some();
                    if lease.sides.holder_ended.is_none() {
                        lease.sides.holder_started.get_or_insert(at);
                    }
                    if !was_started && lease.sides.start().is_some() {
                        self.state.note_lease(&node_id);
                    }
                    if let Some(asked) = held.resources.as_ref().and_then(|asked| asked.clone().to_set().ok()) {
                        lease.holder_resources.get_or_insert(asked);
                    }
                } else {
                    lease.sides.holder_ended.get_or_insert(at);
                }
                lease.last_word_ms = now;
                book.after_word(lease_id, now, &mut changes);
            }
            changes
        };
        self.apply(changes).await
    }

    /// Ends every running lease of a finished job now (its holders are gone with it),
    /// and tells the nodes. Returns how many ended.
    pub async fn end_leases_of_job(&self, job_id: JobId) -> GcsResult<usize> {
        let now = self.state.now_ms();
        let changes = {
            let mut book = self.book();
            // The head's own (detached actors, groups) outlive the job: it ends them itself.
            let mine: Vec<LeaseId> = book
                .open
                .values()
                .filter(|lease| lease.job_id == job_id && !lease.held_by_head)
                .map(|lease| lease.lease_id)
                .collect();
            let mut changes = Changes::default();
            for lease_id in mine {
                if let Some(lease) = book.open.get_mut(&lease_id) {
                    lease.sides.forced_end.get_or_insert((now, EndedBy::JobFinished));
                }
                book.after_word(lease_id, now, &mut changes);
            }
            changes
        };
        let ended = changes.records.len();
        self.apply(changes).await?;
        Ok(ended)
    }

    /// [`Metering::end_leases_of_job`] for every finished job that still has leases (a
    /// missed event, a head restarted after the job ended).
    pub async fn end_leases_of_finished_jobs(&self) -> GcsResult<usize> {
        let jobs: std::collections::HashSet<JobId> =
            self.book().open.values().filter(|lease| !lease.held_by_head).map(|lease| lease.job_id).collect();
        let mut ended = 0;
        for job_id in jobs {
            let finished = self
                .state
                .job(&job_id)
                .is_some_and(|job| job.state == ionet_common::rpc::proto::common::JobState::Finished as i32);
            if finished {
                ended += self.end_leases_of_job(job_id).await?;
            }
        }
        Ok(ended)
    }

    /// Ends every open lease whose node the control store declared dead, at the node's
    /// last heartbeat. Returns how many records that closed.
    pub async fn end_leases_of_dead_nodes(&self) -> GcsResult<usize> {
        let now = self.state.now_ms();
        let mut lost = std::collections::HashMap::new();
        let changes = {
            let mut book = self.book();
            let dead: Vec<(LeaseId, u64)> = book
                .open
                .values()
                .filter_map(|lease| {
                    let node = self.state.node(&lease.node_id)?;
                    (node.state == NodeState::Dead as i32).then_some((lease.lease_id, node.last_heartbeat_ms))
                })
                .collect();
            let mut changes = Changes::default();
            for (lease_id, last_heartbeat_ms) in dead {
                if let Some(lease) = book.open.get_mut(&lease_id) {
                    // Lost to its death: a lease both sides started that nobody had ended.
                    if lease.sides.start().is_some() && lease.sides.end().is_none() {
                        *lost.entry(lease.node_id).or_insert(0u64) += 1;
                    }
                    lease.sides.forced_end.get_or_insert((last_heartbeat_ms, EndedBy::NodeDead));
                    tracing::info!(lease = %lease_id, node = %lease.node_id.short(), end_ms = last_heartbeat_ms, "lease ended by its node's death");
                }
                book.after_word(lease_id, now, &mut changes);
                book.stop_due.remove(&lease_id);
            }
            changes
        };
        let ended = changes.records.len();
        self.apply(changes).await?;
        // Leases a node's death ended count against its reliability.
        for (node_id, lost) in lost {
            if let Err(err) = self.state.note_leases_lost(&node_id, lost).await {
                tracing::error!(node = %node_id.short(), lost, error = %err, "could not record leases lost to a node's death");
            }
        }
        Ok(ended)
    }

    /// Drops leases one side spoke of and the other never did: a node's grant no holder
    /// confirmed within [`CONFIRM_WINDOW_MS`] (no record; the node is told to end it), and
    /// words that found no match within [`UNMATCHED_EXPIRY_MS`].
    pub async fn drop_unmatched(&self) -> GcsResult<usize> {
        let now = self.state.now_ms();
        let changes = {
            let mut book = self.book();
            let mut changes = Changes::default();
            let doomed: Vec<(LeaseId, bool)> = book
                .open
                .values()
                .filter_map(|lease| {
                    let holder_silent = lease.sides.holder_started.is_none() && lease.sides.holder_ended.is_none();
                    let unconfirmed = lease.node.is_some()
                        && holder_silent
                        && lease.sides.node_ended.is_none()
                        && now.saturating_sub(lease.last_word_ms) >= CONFIRM_WINDOW_MS;
                    // A node's word alone is kept for the confirmation window only (a node
                    // cannot grow the head's book for long); a holder's, longer.
                    let kept_for = if holder_silent { CONFIRM_WINDOW_MS } else { UNMATCHED_EXPIRY_MS };
                    let stale = !lease.is_running() && now.saturating_sub(lease.last_word_ms) >= kept_for;
                    (unconfirmed || stale).then_some((lease.lease_id, unconfirmed))
                })
                .collect();
            for (lease_id, unconfirmed) in doomed {
                let Some(lease) = book.open.remove(&lease_id) else { continue };
                if unconfirmed {
                    tracing::warn!(lease = %lease_id, node = %lease.node_id.short(), job = %lease.job_id,
                        "no holder confirmed this lease; it ends without a record");
                    book.stop_due.insert(lease_id, (lease.node_id, now));
                    *book.unconfirmed.entry(lease.job_id).or_default() += 1;
                }
                changes.delete_leases.push(lease_id);
            }
            changes
        };
        let dropped = changes.delete_leases.len();
        self.apply(changes).await?;
        Ok(dropped)
    }

    /// Takes the leases due to be ended on their nodes (the holder gave them back
    /// [`STOP_GRACE_MS`] ago and the node has not said it ended them), by node.
    pub fn due_stops(&self) -> HashMap<NodeId, Vec<LeaseId>> {
        let now = self.state.now_ms();
        let mut book = self.book();
        let due: Vec<LeaseId> =
            book.stop_due.iter().filter(|(_, (_, at))| *at <= now).map(|(lease, _)| *lease).collect();
        let mut by_node: HashMap<NodeId, Vec<LeaseId>> = HashMap::new();
        for lease_id in due {
            if let Some((node, _)) = book.stop_due.remove(&lease_id) {
                by_node.entry(node).or_default().push(lease_id);
            }
        }
        by_node
    }

    /// Adds the epoch that settled each record, if any.
    async fn with_settlement(&self, made: Vec<Made>) -> GcsResult<Vec<proto::UsageRecord>> {
        let ledger = self.ledger.clone();
        blocking(move || {
            let ledger = ledger.lock();
            made.iter().map(|m| Ok(m.to_proto(ledger.settled_in(m.record.record_id)?))).collect()
        })
        .await
    }

    /// Records made (oldest first), then open leases (cost accrued until now), filtered
    /// by job and node when given.
    pub async fn list_usage(
        &self,
        job_id: Option<JobId>,
        node_id: Option<NodeId>,
    ) -> GcsResult<Vec<proto::UsageRecord>> {
        let keep = |job: &JobId, node: &NodeId| {
            job_id.is_none_or(|wanted| wanted == *job) && node_id.is_none_or(|wanted| wanted == *node)
        };
        let now = self.state.now_ms();
        let (made, mut open) = {
            let book = self.book();
            let made: Vec<Made> =
                book.records.iter().filter(|m| keep(&m.record.job_id, &m.record.node_id)).cloned().collect();
            let mut open: Vec<Lease> = book
                .open
                .values()
                .filter(|lease| lease.is_running() && keep(&lease.job_id, &lease.node_id))
                .cloned()
                .collect();
            open.sort_by_key(|lease| (lease.segment_start(), lease.lease_id));
            (made, open)
        };
        let mut records = self.with_settlement(made).await?;
        records.extend(open.drain(..).map(|lease| lease.to_proto(now)));
        Ok(records)
    }

    /// A job's bill so far: every record and running lease of it, with the node's GPU
    /// model, cost and fee.
    pub async fn job_cost(&self, job_id: JobId) -> GcsResult<proto::JobCostReply> {
        let job = self.state.job(&job_id).ok_or_else(|| not_found(format!("job {job_id} does not exist")))?;
        let config = self.state.config();
        let fee_bps = config.protocol_fee_bps;
        let payer_account =
            if job.payer_account.trim().is_empty() { DEFAULT_PAYER.to_string() } else { job.payer_account.clone() };
        let mut lines = Vec::new();
        let mut forgotten: HashMap<NodeId, Option<ionet_common::rpc::proto::common::NodeInfo>> = HashMap::new();
        for record in self.list_usage(Some(job_id), None).await? {
            let node = match NodeId::from_bytes(&record.node_id) {
                // A node forgotten since its death left the GPUs it had in its record
                // (read once per node).
                Ok(node) => match self.state.node(&node) {
                    Some(row) => Some(row),
                    None => match forgotten.get(&node) {
                        Some(record) => record.clone(),
                        None => {
                            let record = self.state.forgotten_node(&node).await.ok().flatten();
                            forgotten.insert(node, record.clone());
                            record
                        }
                    },
                },
                Err(_) => None,
            };
            let gpu_model = node
                .map(|node| match node.gpus.first() {
                    Some(gpu) => gpu.model.clone(),
                    None => node.accelerator_type.clone(),
                })
                .unwrap_or_default();
            let now = self.state.now_ms();
            lines.push(proto::ReceiptLine {
                fee_micros: record.cost_micros.saturating_mul(u64::from(fee_bps)) / 10_000,
                end_ms: if record.open { now } else { record.end_ms },
                lease_id: record.lease_id,
                record_id: record.record_id,
                node_id: record.node_id,
                gpu_model,
                resources: record.resources,
                start_ms: record.start_ms,
                price_per_gpu_hour_micros: record.price_per_gpu_hour_micros,
                price_per_cpu_hour_micros: record.price_per_cpu_hour_micros,
                cost_micros: record.cost_micros,
                open: record.open,
                ended_by: record.ended_by,
            });
        }
        Ok(proto::JobCostReply {
            job_id: job_id.to_vec(),
            payer_account,
            fee_bps,
            as_of_ms: self.state.now_ms(),
            running: job.state != ionet_common::rpc::proto::common::JobState::Finished as i32,
            total_cost_micros: lines.iter().map(|line| line.cost_micros).sum(),
            total_fee_micros: lines.iter().map(|line| line.fee_micros).sum(),
            lines,
        })
    }

    fn check_account_name(account: &str) -> GcsResult<()> {
        if account.trim().is_empty() || account.chars().any(char::is_control) {
            return Err(invalid(format!("account name {account:?} is invalid: it must be non-empty printable text")));
        }
        Ok(())
    }

    /// Buys prepaid credits; returns the payer's new balance.
    pub async fn add_credits(&self, account: &str, amount: MicroUsd) -> GcsResult<i64> {
        Self::check_account_name(account)?;
        let (ledger, account) = (self.ledger.clone(), account.to_string());
        blocking(move || Ok(ledger.lock().add_credits(&account, amount)?)).await
    }

    /// Refunds a payer's positive balance; refuses an account never credited.
    pub async fn refund(&self, account: &str) -> GcsResult<MicroUsd> {
        Self::check_account_name(account)?;
        let (ledger, account) = (self.ledger.clone(), account.to_string());
        blocking(move || {
            let mut ledger = ledger.lock();
            if !ledger.balances()?.contains_key(&Account::payer(&account)) {
                return Err(not_found(format!("payer account {account:?} has never been credited")));
            }
            Ok(ledger.refund(&account)?)
        })
        .await
    }

    /// Every account's balance.
    pub async fn balances(&self) -> GcsResult<Vec<(Account, i64)>> {
        let ledger = self.ledger.clone();
        blocking(move || Ok(ledger.lock().balances()?.into_iter().collect())).await
    }

    /// Whether the lease book has a lease of `node`'s GPUs running (both sides said it
    /// started, nobody ended it, and what is billed of it includes a GPU): what keeps the
    /// head's checks off its GPUs. A node's word alone does not count (it could report
    /// grants nobody holds, or GPUs in a CPU lease, to dodge its checks).
    pub fn gpus_leased_on(&self, node: &NodeId) -> bool {
        self.book().open.values().any(|lease| {
            lease.node_id == *node
                && lease.is_running()
                && lease.billed_resources().is_some_and(|billed| !billed.get(GPU).is_zero())
        })
    }

    /// A provider's earnings per settled epoch (with why its nodes' availability rewards
    /// were withheld in each, if they were) and its current balance.
    pub async fn earnings(&self, wallet: &str) -> GcsResult<(Vec<(ProviderEarnings, Vec<String>)>, i64)> {
        if wallet.trim().is_empty() {
            return Err(invalid("wallet is empty".into()));
        }
        let (ledger, storage, wallet) = (self.ledger.clone(), self.state.storage().clone(), wallet.to_string());
        blocking(move || {
            let (epochs, balance) = {
                let ledger = ledger.lock();
                (ledger.earnings(&wallet)?, ledger.balance(&Account::provider(&wallet))?)
            };
            let epochs = epochs
                .into_iter()
                .map(|epoch| {
                    let withheld = settlement::withheld(storage.as_ref(), epoch.epoch_id, &wallet);
                    (epoch, withheld)
                })
                .collect();
            Ok((epochs, balance))
        })
        .await
    }

    /// Starts the two background tasks: ending leases of dead nodes (on `events`, plus a
    /// sweep every tick) and closing epochs at their boundaries. Both stop with `stopped`.
    pub fn spawn_tasks(
        self: &Arc<Self>,
        events: broadcast::Receiver<ClusterEvent>,
        stopped: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        vec![
            tokio::spawn(watch_deaths(self.clone(), events, stopped.clone())),
            tokio::spawn(stop_leases(self.clone(), stopped.clone())),
            tokio::spawn(watch_funding(self.clone(), stopped.clone())),
            tokio::spawn(settlement::close_epochs(self.clone(), stopped)),
        ]
    }
}

async fn watch_deaths(
    metering: Arc<Metering>,
    mut events: broadcast::Receiver<ClusterEvent>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let sweep = tokio::select! {
            event = events.recv() => match event {
                Ok(ClusterEvent { event: Some(Event::NodeDead(_)), .. }) => true,
                Ok(ClusterEvent { event: Some(Event::JobFinished(job)), .. }) => {
                    if let Ok(job_id) = JobId::from_bytes(&job.job_id) {
                        if let Err(err) = metering.end_leases_of_job(job_id).await {
                            tracing::error!(error = %err, job = %job_id, "could not end a finished job's leases");
                        }
                    }
                    false
                }
                Ok(_) => false,
                // Missed events: the sweep reads the node table, which is authoritative.
                Err(broadcast::error::RecvError::Lagged(_)) => true,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = stopped.changed() => return,
        };
        if sweep {
            if let Err(err) = metering.end_leases_of_dead_nodes().await {
                tracing::error!(error = %err, "could not end the leases of a dead node");
            }
        }
    }
}

/// Tells nodes, every 100 ms, to end the leases their holders gave back.
async fn stop_leases(metering: Arc<Metering>, mut stopped: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(100));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stopped.changed() => return,
        }
        metering.stop_due_leases().await;
    }
}

/// A payer's standing against its leases (see [`Metering::check_funding`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Standing {
    pub payer: String,
    /// Its ledger balance (prepaid credit less settled charges).
    pub balance: i64,
    /// What its records not settled yet, and its running leases so far, will charge it.
    pub owed: u64,
    /// Its running leases' cost per hour, fee included.
    pub hourly: u64,
    /// What the next credit horizon of its running leases costs, fee included.
    pub needed: u64,
}

impl Standing {
    /// What is left once everything owed is paid.
    pub fn left(&self) -> i64 {
        self.balance.saturating_sub(i64::try_from(self.owed).unwrap_or(i64::MAX))
    }

    /// Whether its jobs may lease more: what is left covers the horizon (and is not
    /// negative).
    pub fn may_lease(&self) -> bool {
        self.left() >= 0 && self.left() as u64 >= self.needed
    }

    /// Whether its running leases must end: they cost something and nothing is left.
    pub fn exhausted(&self) -> bool {
        self.hourly > 0 && self.left() <= 0
    }

    /// The error its refused work carries: the account, its balance and what is needed.
    pub fn refusal(&self, horizon_ms: u64) -> String {
        format!(
            "account {:?} cannot cover its leases: balance {}, owed {}, leases running at {}/h, and the next {} \
             need {} more; add credit (`ionet credits add --account {}`) to lease again",
            self.payer,
            usd(self.balance),
            usd(self.owed as i64),
            usd(self.hourly as i64),
            horizon_text(horizon_ms),
            usd(self.needed.saturating_sub(self.left().max(0) as u64) as i64),
            self.payer
        )
    }
}

fn usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    format!("{sign}${}.{:06}", abs / 1_000_000, abs % 1_000_000)
}

fn horizon_text(ms: u64) -> String {
    if ms % 60_000 == 0 {
        format!("{} min", ms / 60_000)
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// `cost` plus the protocol fee on it (floored, as the ledger charges it).
fn with_fee(cost: u64, fee_bps: u32) -> u64 {
    cost.saturating_add(cost.saturating_mul(u64::from(fee_bps)) / 10_000)
}

impl Metering {
    /// Every payer's standing now: its balance, what it owes (records not settled yet and
    /// its running leases so far) and what its running leases need for the credit horizon.
    pub async fn standings(&self) -> GcsResult<Vec<Standing>> {
        let config = self.state.config();
        let (horizon, fee_bps) = (config.credit_horizon_ms, config.protocol_fee_bps);
        let now = self.state.now_ms();
        let mut standings: HashMap<String, Standing> = HashMap::new();
        {
            let book = self.book();
            for (payer, owed) in &book.owed {
                let standing = standings.entry(payer.clone()).or_default();
                standing.owed = standing.owed.saturating_add(*owed);
            }
            for lease in book.open.values().filter(|lease| lease.is_running()) {
                let Some(node) = &lease.node else { continue };
                let standing = standings.entry(node.payer_account.clone()).or_default();
                let accrued = lease.record_until(now, "").map(|made| made.record.cost_micro_usd().unwrap_or(u64::MAX));
                standing.owed = standing.owed.saturating_add(with_fee(accrued.unwrap_or(0), fee_bps));
                standing.hourly = standing.hourly.saturating_add(with_fee(lease.hourly_cost(), fee_bps));
            }
        }
        let ledger = self.ledger.clone();
        let balances = blocking(move || Ok(ledger.lock().balances()?)).await?;
        for (account, balance) in balances {
            if let Account::Payer(payer) = account {
                standings.entry(payer.to_string()).or_default().balance = balance;
            }
        }
        let mut standings: Vec<Standing> = standings
            .into_iter()
            .map(|(payer, standing)| {
                let needed = (u128::from(standing.hourly) * u128::from(horizon) / 3_600_000) as u64;
                Standing { payer, needed, ..standing }
            })
            .collect();
        standings.sort_by(|a, b| a.payer.cmp(&b.payer));
        Ok(standings)
    }

    /// Checks every payer against its leases: the jobs of one whose credit does not cover
    /// the horizon get no new leases (nodes hear it with their heartbeats, and refuse
    /// them with the reason); the running leases of one with nothing left end now, and
    /// their nodes are told. Returns the payers refused.
    pub async fn check_funding(&self) -> GcsResult<Vec<Standing>> {
        let horizon = self.state.config().credit_horizon_ms;
        // Not while an epoch settles: its charges would count both in the balances and
        // as still owed.
        let settling = self.settling.lock().await;
        let short: Vec<Standing> = self.standings().await?.into_iter().filter(|s| !s.may_lease()).collect();
        drop(settling);
        let exhausted: HashMap<&str, &Standing> =
            short.iter().filter(|s| s.exhausted()).map(|s| (s.payer.as_str(), s)).collect();
        let refused: HashMap<&str, &Standing> = short.iter().map(|s| (s.payer.as_str(), s)).collect();
        let mut unfunded = HashMap::new();
        for job in self.state.jobs() {
            if job.state == ionet_common::rpc::proto::common::JobState::Finished as i32 {
                continue;
            }
            let payer = if job.payer_account.trim().is_empty() { DEFAULT_PAYER } else { job.payer_account.as_str() };
            if let (Some(standing), Ok(job_id)) = (refused.get(payer), JobId::from_bytes(&job.job_id)) {
                unfunded.insert(job_id, standing.refusal(horizon));
            }
        }
        for (job, count) in self.book().unconfirmed.iter().filter(|(_, count)| **count >= MAX_UNCONFIRMED_PER_JOB) {
            unfunded.entry(*job).or_insert_with(|| {
                format!("{count} leases granted to job {job} were never confirmed by the job's own processes; it gets no more")
            });
        }
        self.state.set_unfunded(unfunded);
        let mut unfunded_groups: BTreeMap<Vec<u8>, String> = BTreeMap::new();
        if !exhausted.is_empty() {
            let now = self.state.now_ms();
            let changes = {
                let mut book = self.book();
                let mut doomed = Vec::new();
                for lease in book.open.values().filter(|lease| lease.is_running()) {
                    let Some(node) = lease.node.as_ref() else { continue };
                    let Some(standing) = exhausted.get(node.payer_account.as_str()) else { continue };
                    match &node.bundle {
                        // A bundle is not stopped lease by lease: its group is removed.
                        Some((group, _)) => {
                            unfunded_groups.entry(group.clone()).or_insert_with(|| standing.refusal(horizon));
                        }
                        None => doomed.push(lease.lease_id),
                    }
                }
                let mut changes = Changes::default();
                for lease_id in doomed {
                    if let Some(lease) = book.open.get_mut(&lease_id) {
                        lease.sides.forced_end.get_or_insert((now, EndedBy::Unfunded));
                        tracing::warn!(lease = %lease_id, job = %lease.job_id, "lease ended: its payer's credit ran out");
                    }
                    book.after_word(lease_id, now, &mut changes);
                }
                changes
            };
            self.apply(changes).await?;
        }
        // Removing a group waits on its nodes: not on this check's time.
        if let (Some(head), false) = (self.head_holdings.get().cloned(), unfunded_groups.is_empty()) {
            tokio::spawn(async move {
                for (group, why) in &unfunded_groups {
                    head.remove_unfunded_group(group, why).await;
                }
            });
        }
        Ok(short)
    }
}

/// Checks payers against their leases twice a second.
async fn watch_funding(metering: Arc<Metering>, mut stopped: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(500));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stopped.changed() => return,
        }
        if let Err(err) = metering.check_funding().await {
            tracing::error!(error = %err, "could not check payers against their leases");
        }
    }
}
