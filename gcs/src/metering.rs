//! Metering on the head: leases in, usage records out, the ledger settled per epoch.
//!
//! Protocol: a node daemon calls `LeaseStarted(lease, node, job, resources)` when it
//! grants a lease and `LeaseEnded(lease)` when the lease is returned. The control store
//! stamps both ends with its own [`Clock`](ionet_common::clock::Clock), never the node's, and
//! joins the node table (provider wallet, prices) and the job table (payer account)
//! *when the lease starts*: a price changed later does not reprice a running lease.
//!
//! Invariants:
//! - A lease is open in memory and in the `Leases` storage table from `LeaseStarted`
//!   until it ends; a head restarted with the same storage carries it on.
//! - A lease ends once: by `LeaseEnded`, or when its node is declared dead (at the node's
//!   last heartbeat, the last moment the control store knew it was working). The
//!   background task ending leases of dead nodes both listens to `NodeDead` events and
//!   sweeps the node table on every tick, so a lagged subscription loses nothing.
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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ionet_common::resources::{MicroUsd, GPU};
use ionet_common::rpc::proto::common::{NodeInfo, NodeState, ResourceQuantities};
use ionet_common::rpc::proto::gcs::cluster_event::Event;
use ionet_common::rpc::proto::gcs::ClusterEvent;
use ionet_common::rpc::proto::metering as proto;
use ionet_common::{IonetError, JobId, LeaseId, NodeId, ResourceSet};
use ionet_settlement::{
    Account, EpochSpec, EpochSummary, JsonLinesExporter, Ledger, LedgerConfig, LedgerHandle, LedgerStore, MemoryStore,
    MeterFanout, MeterSink, NodeAvailability, ProviderEarnings, RecordId, RedbStore, SettleOutcome, UsageRecord,
};
use prost::Message;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::error::{GcsError, GcsResult};
use crate::state::{blocking, GcsState};
use crate::storage::Table;

/// The payer billed for jobs added without a payer account.
pub const DEFAULT_PAYER: &str = "default";

/// Mixes a segment number into a lease id (an odd 128-bit constant: distinct segments of
/// one lease never share an id).
const SEGMENT_MIX: u128 = 0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835;

/// The record id of segment `segment` of `lease`: the lease id itself for the first
/// (usually only) piece, a mix of both for later pieces of a lease cut at epoch ends.
pub fn record_id(lease: &LeaseId, segment: u32) -> RecordId {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(lease.as_bytes());
    let base = u128::from_be_bytes(bytes);
    if segment == 0 {
        RecordId(base)
    } else {
        RecordId(base ^ (segment as u128).wrapping_mul(SEGMENT_MIX))
    }
}

pub type GcsLedger = LedgerHandle<Box<dyn LedgerStore>>;

/// What the metering service shows of on-chain payouts (the `solana` feature's
/// `Payouts` implements it; without it, the head pays nothing on chain).
#[tonic::async_trait]
pub trait PayoutView: Send + Sync {
    async fn list(&self) -> GcsResult<Vec<proto::EpochPayoutInfo>>;
}

/// Where the ledger and the usage export live.
#[derive(Clone, Debug, Default)]
pub struct MeteringOptions {
    /// `None`: the ledger is kept in memory, lost with the process.
    pub ledger_path: Option<PathBuf>,
    /// Usage records are also appended here as JSON lines.
    pub usage_export_path: Option<PathBuf>,
}

/// A lease still running, with everything its record needs.
#[derive(Clone, Debug, PartialEq)]
struct OpenLease {
    lease_id: LeaseId,
    job_id: JobId,
    payer_account: String,
    node_id: NodeId,
    provider_wallet: String,
    resources: ResourceSet,
    /// Start of the current segment.
    start_ms: u64,
    price_per_gpu_hour: MicroUsd,
    price_per_cpu_hour: MicroUsd,
    segment: u32,
}

impl OpenLease {
    /// The record of the current segment, ending at `end_ms` (never before its start).
    fn record_until(&self, end_ms: u64) -> Made {
        Made {
            lease_id: self.lease_id,
            segment: self.segment,
            record: UsageRecord {
                record_id: record_id(&self.lease_id, self.segment),
                job_id: self.job_id,
                payer_account: self.payer_account.clone(),
                node_id: self.node_id,
                provider_wallet: self.provider_wallet.clone(),
                resources: self.resources.clone(),
                start_ms: self.start_ms,
                end_ms: end_ms.max(self.start_ms),
                price_per_gpu_hour: self.price_per_gpu_hour,
                price_per_cpu_hour: self.price_per_cpu_hour,
            },
        }
    }

    fn to_proto(&self) -> proto::UsageRecord {
        let made = self.record_until(self.start_ms);
        proto::UsageRecord { open: true, end_ms: 0, ..made.to_proto(None) }
    }

    fn from_proto(stored: &proto::UsageRecord) -> GcsResult<Self> {
        let made = Made::from_proto(stored)?;
        Ok(OpenLease {
            lease_id: made.lease_id,
            job_id: made.record.job_id,
            payer_account: made.record.payer_account,
            node_id: made.record.node_id,
            provider_wallet: made.record.provider_wallet,
            resources: made.record.resources,
            start_ms: made.record.start_ms,
            price_per_gpu_hour: made.record.price_per_gpu_hour,
            price_per_cpu_hour: made.record.price_per_cpu_hour,
            segment: made.segment,
        })
    }
}

/// A usage record this control store made, with the lease it came from.
#[derive(Clone, Debug, PartialEq)]
struct Made {
    lease_id: LeaseId,
    segment: u32,
    record: UsageRecord,
}

impl Made {
    fn to_proto(&self, settled_epoch: Option<u64>) -> proto::UsageRecord {
        let record = &self.record;
        proto::UsageRecord {
            record_id: record.record_id.to_string(),
            lease_id: self.lease_id.to_vec(),
            job_id: record.job_id.to_vec(),
            payer_account: record.payer_account.clone(),
            node_id: record.node_id.to_vec(),
            provider_wallet: record.provider_wallet.clone(),
            resources: Some(ResourceQuantities::from_set(&record.resources)),
            start_ms: record.start_ms,
            end_ms: record.end_ms,
            price_per_gpu_hour_micros: record.price_per_gpu_hour,
            price_per_cpu_hour_micros: record.price_per_cpu_hour,
            cost_micros: record.cost_micro_usd().unwrap_or(u64::MAX),
            open: false,
            settled: settled_epoch.is_some(),
            settled_epoch: settled_epoch.unwrap_or(0),
            segment: self.segment,
        }
    }

    fn from_proto(stored: &proto::UsageRecord) -> GcsResult<Self> {
        let lease_id = LeaseId::from_bytes(&stored.lease_id)?;
        Ok(Made {
            lease_id,
            segment: stored.segment,
            record: UsageRecord {
                record_id: record_id(&lease_id, stored.segment),
                job_id: JobId::from_bytes(&stored.job_id)?,
                payer_account: stored.payer_account.clone(),
                node_id: NodeId::from_bytes(&stored.node_id)?,
                provider_wallet: stored.provider_wallet.clone(),
                resources: stored.resources.clone().unwrap_or_default().to_set()?,
                start_ms: stored.start_ms,
                end_ms: stored.end_ms,
                price_per_gpu_hour: stored.price_per_gpu_hour_micros,
                price_per_cpu_hour: stored.price_per_cpu_hour_micros,
            },
        })
    }

    fn storage_key(&self) -> Vec<u8> {
        self.record.record_id.0.to_be_bytes().to_vec()
    }
}

/// Leases and records in memory. Guarded by a std mutex never held across an await.
#[derive(Default)]
struct Book {
    open: HashMap<LeaseId, OpenLease>,
    /// Every record made, in the order made.
    records: Vec<Made>,
    /// Lease → index in `records` of its last record, for leases that ended.
    ended: HashMap<LeaseId, usize>,
}

impl Book {
    fn push(&mut self, made: Made, lease_ended: bool) {
        if lease_ended {
            self.ended.insert(made.lease_id, self.records.len());
        }
        self.records.push(made);
    }
}

/// What the storage and sinks must learn after a change of the book.
#[derive(Default)]
struct Changes {
    records: Vec<Made>,
    put_leases: Vec<OpenLease>,
    delete_leases: Vec<LeaseId>,
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
}

fn invalid(message: String) -> GcsError {
    GcsError::Ionet(IonetError::InvalidArgument(message))
}

fn not_found(message: String) -> GcsError {
    GcsError::Ionet(IonetError::NotFound(message))
}

fn wallet_of(node: &NodeInfo, node_id: &NodeId) -> String {
    if node.wallet.trim().is_empty() {
        format!("node-{node_id}")
    } else {
        node.wallet.clone()
    }
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
            reward_pool_per_epoch: config.reward_pool_per_epoch_micros,
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
            let lease = OpenLease::from_proto(&decode(&format!("lease {}", hex::encode(key)), bytes)?)?;
            // Ended, but the head stopped before it removed the lease row.
            let already = made.iter().any(|m| m.lease_id == lease.lease_id && m.segment >= lease.segment);
            if already {
                stale_leases.push(lease.lease_id);
            } else {
                book.open.insert(lease.lease_id, lease);
            }
        }
        for m in made {
            let lease_ended = !book.open.contains_key(&m.lease_id);
            book.push(m, lease_ended);
        }
        let all: Vec<UsageRecord> = book.records.iter().map(|m| m.record.clone()).collect();

        let mut sinks = MeterFanout::new().with(Arc::new(ledger.clone()));
        if let Some(exporter) = exporter {
            sinks = sinks.with(exporter);
        }
        let redeliver = ledger.clone();
        let storage = state.storage().clone();
        let last_end = blocking(move || {
            for lease in stale_leases {
                storage.delete(Table::Leases, lease.as_bytes())?;
            }
            let mut ledger = redeliver.lock();
            let new = ledger.accept_records(&all)?;
            if new > 0 {
                tracing::info!(records = new, "usage records re-offered to the ledger");
            }
            Ok(ledger.epochs()?.last().map(|epoch| epoch.end_ms))
        })
        .await?;
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
        let storage = self.state.storage().clone();
        let sinks = self.sinks.clone();
        blocking(move || {
            for made in &changes.records {
                storage.put(Table::Usage, &made.storage_key(), &made.to_proto(None).encode_to_vec())?;
            }
            for lease in &changes.put_leases {
                storage.put(Table::Leases, lease.lease_id.as_bytes(), &lease.to_proto().encode_to_vec())?;
            }
            for lease in &changes.delete_leases {
                storage.delete(Table::Leases, lease.as_bytes())?;
            }
            let records: Vec<UsageRecord> = changes.records.iter().map(|m| m.record.clone()).collect();
            sinks.record_batch(&records)?;
            sinks.flush()?;
            Ok(())
        })
        .await
    }

    /// Opens a lease now (control-store clock) and returns its start. Reporting an open
    /// lease again returns its first start.
    pub async fn lease_started(
        &self,
        lease_id: &[u8],
        node_id: &[u8],
        job_id: &[u8],
        resources: Option<ResourceQuantities>,
    ) -> GcsResult<u64> {
        let lease_id = LeaseId::from_bytes(lease_id)?;
        let node_id = NodeId::from_bytes(node_id)?;
        let job_id = JobId::from_bytes(job_id)?;
        let resources = resources.unwrap_or_default().to_set()?;
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
        let job = self.state.job(&job_id).ok_or_else(|| not_found(format!("job {job_id} does not exist")))?;
        let payer_account =
            if job.payer_account.trim().is_empty() { DEFAULT_PAYER.to_string() } else { job.payer_account.clone() };
        let lease = OpenLease {
            lease_id,
            job_id,
            payer_account,
            node_id,
            provider_wallet: wallet_of(&node, &node_id),
            resources,
            start_ms: self.state.now_ms(),
            price_per_gpu_hour: node.price_per_gpu_hour_micros,
            price_per_cpu_hour: node.price_per_cpu_hour_micros,
            segment: 0,
        };
        {
            let mut book = self.book();
            if let Some(open) = book.open.get(&lease_id) {
                if open.node_id == node_id && open.job_id == job_id {
                    return Ok(open.start_ms);
                }
                return Err(IonetError::AlreadyExists(format!(
                    "lease {lease_id} is already open on node {} for job {}",
                    open.node_id.short(),
                    open.job_id
                ))
                .into());
            }
            if book.ended.contains_key(&lease_id) {
                return Err(IonetError::AlreadyExists(format!(
                    "lease {lease_id} already ended; a new lease needs a new id"
                ))
                .into());
            }
            book.open.insert(lease_id, lease.clone());
        }
        let start_ms = lease.start_ms;
        if let Err(err) = self.apply(Changes { put_leases: vec![lease], ..Changes::default() }).await {
            self.book().open.remove(&lease_id);
            return Err(err);
        }
        tracing::debug!(lease = %lease_id, node = %node_id.short(), job = %job_id, start_ms, "lease started");
        Ok(start_ms)
    }

    /// Ends a lease now and returns its record. Ending an ended lease returns the same
    /// record again.
    pub async fn lease_ended(&self, lease_id: &[u8]) -> GcsResult<proto::UsageRecord> {
        let lease_id = LeaseId::from_bytes(lease_id)?;
        let now = self.state.now_ms();
        // (record, whether this call ended the lease)
        let (made, ended_now) = {
            let mut book = self.book();
            if let Some(lease) = book.open.remove(&lease_id) {
                let made = lease.record_until(now);
                book.push(made.clone(), true);
                (made, true)
            } else if let Some(&index) = book.ended.get(&lease_id) {
                (book.records[index].clone(), false)
            } else {
                return Err(not_found(format!("lease {lease_id} is not open on this control store")));
            }
        };
        if !ended_now {
            let mut records = self.with_settlement(vec![made]).await?;
            return records.pop().ok_or_else(|| GcsError::Storage("record vanished".into()));
        }
        self.apply(Changes { records: vec![made.clone()], delete_leases: vec![lease_id], ..Changes::default() })
            .await?;
        tracing::debug!(lease = %lease_id, end_ms = made.record.end_ms, "lease ended");
        Ok(made.to_proto(None))
    }

    /// Ends every open lease whose node the control store declared dead, at the node's
    /// last heartbeat. Returns how many ended.
    pub async fn end_leases_of_dead_nodes(&self) -> GcsResult<usize> {
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
                if let Some(lease) = book.open.remove(&lease_id) {
                    let made = lease.record_until(last_heartbeat_ms);
                    tracing::info!(lease = %lease_id, node = %lease.node_id.short(), end_ms = made.record.end_ms, "lease ended by its node's death");
                    book.push(made.clone(), true);
                    changes.records.push(made);
                    changes.delete_leases.push(lease_id);
                }
            }
            changes
        };
        let ended = changes.records.len();
        self.apply(changes).await?;
        Ok(ended)
    }

    /// Cuts every lease open before `end_ms` there: a record for the part before, the
    /// rest stays open as the next segment.
    async fn cut_open_leases(&self, end_ms: u64) -> GcsResult<()> {
        let changes = {
            let mut book = self.book();
            let mut changes = Changes::default();
            let mut cuts = Vec::new();
            for lease in book.open.values_mut() {
                if lease.start_ms < end_ms {
                    cuts.push(lease.record_until(end_ms));
                    lease.start_ms = end_ms;
                    lease.segment += 1;
                    changes.put_leases.push(lease.clone());
                }
            }
            for made in cuts {
                book.push(made.clone(), false);
                changes.records.push(made);
            }
            changes
        };
        self.apply(changes).await
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
            let mut open: Vec<OpenLease> =
                book.open.values().filter(|lease| keep(&lease.job_id, &lease.node_id)).cloned().collect();
            open.sort_by_key(|lease| (lease.start_ms, lease.lease_id));
            (made, open)
        };
        let mut records = self.with_settlement(made).await?;
        records.extend(open.drain(..).map(|lease| proto::UsageRecord {
            cost_micros: lease.record_until(now).record.cost_micro_usd().unwrap_or(u64::MAX),
            ..lease.to_proto()
        }));
        Ok(records)
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

    /// A provider's earnings per settled epoch and its current balance.
    pub async fn earnings(&self, wallet: &str) -> GcsResult<(Vec<ProviderEarnings>, i64)> {
        if wallet.trim().is_empty() {
            return Err(invalid("wallet is empty".into()));
        }
        let (ledger, wallet) = (self.ledger.clone(), wallet.to_string());
        blocking(move || {
            let ledger = ledger.lock();
            Ok((ledger.earnings(&wallet)?, ledger.balance(&Account::provider(&wallet))?))
        })
        .await
    }

    /// Each GPU node's verified uptime in `(previous_end_ms, end_ms]`.
    fn availability(&self, previous_end_ms: u64, end_ms: u64) -> Vec<NodeAvailability> {
        let mut availability = Vec::new();
        for node in self.state.nodes(true) {
            let Ok(node_id) = NodeId::from_bytes(&node.node_id) else {
                continue;
            };
            let gpus = node.total.clone().unwrap_or_default().to_set().map(|total| total.get(GPU)).unwrap_or_default();
            if gpus.is_zero() {
                continue;
            }
            let from = node.registered_at_ms.max(previous_end_ms);
            let to = if node.state == NodeState::Dead as i32 { node.last_heartbeat_ms.min(end_ms) } else { end_ms };
            availability.push(NodeAvailability {
                node_id,
                provider_wallet: wallet_of(&node, &node_id),
                uptime_ms: to.saturating_sub(from),
                gpu_capacity: gpus,
                declared_watts: node.power_watts,
                electricity_price_per_kwh: node.electricity_price_per_kwh_micros,
            });
        }
        availability
    }

    /// Closes the next epoch at `end_ms` (or plans it, when `dry_run`: open leases are
    /// then not cut, so the plan covers ended leases only). Serialised with every other
    /// settlement.
    pub async fn settle_at(&self, end_ms: u64, dry_run: bool) -> GcsResult<EpochSummary> {
        let _settling = self.settling.lock().await;
        let ledger = self.ledger.clone();
        let last = blocking(move || Ok(ledger.lock().epochs()?.last().cloned())).await?;
        let (epoch_id, previous_end) = match &last {
            Some(last) => (last.epoch_id + 1, last.end_ms),
            None => (0, 0),
        };
        let end_ms = end_ms.max(previous_end);
        let spec = EpochSpec { epoch_id, end_ms, availability: self.availability(previous_end, end_ms) };
        let ledger = self.ledger.clone();
        if dry_run {
            return blocking(move || Ok(ledger.lock().dry_run(&spec)?.summary)).await;
        }
        self.cut_open_leases(end_ms).await?;
        let outcome = blocking(move || Ok(ledger.lock().settle_epoch(&spec)?)).await?;
        self.last_epoch_end_ms.store(end_ms, Ordering::SeqCst);
        self.settled.notify_one();
        Ok(match outcome {
            SettleOutcome::Settled(summary) | SettleOutcome::AlreadySettled(summary) => summary,
        })
    }

    /// Closes the epoch now (control-store clock).
    pub async fn settle_now(&self, dry_run: bool) -> GcsResult<EpochSummary> {
        self.settle_at(self.state.now_ms(), dry_run).await
    }

    /// Settles the latest scheduled boundary if it is past and not yet closed. Returns
    /// the summary when it closed one.
    pub async fn settle_due(&self) -> GcsResult<Option<EpochSummary>> {
        let length = self.state.config().epoch_length_ms.max(1);
        let boundary = self.state.now_ms() / length * length;
        if boundary <= self.last_epoch_end_ms.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let summary = self.settle_at(boundary, false).await?;
        Ok(Some(summary))
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
            tokio::spawn(close_epochs(self.clone(), stopped)),
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

async fn close_epochs(metering: Arc<Metering>, mut stopped: watch::Receiver<bool>) {
    let length = metering.state.config().epoch_length_ms;
    let period = Duration::from_millis((length / 4).clamp(10, 1_000));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stopped.changed() => return,
        }
        if let Err(err) = metering.end_leases_of_dead_nodes().await {
            tracing::error!(error = %err, "could not end the leases of dead nodes");
        }
        match metering.settle_due().await {
            Ok(Some(summary)) => tracing::info!(
                epoch = summary.epoch_id,
                end_ms = summary.end_ms,
                records = summary.records,
                "scheduled epoch closed"
            ),
            Ok(None) => {}
            Err(err) => tracing::error!(error = %err, "scheduled settlement failed; retrying next tick"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{GcsStorage, MemoryStorage};
    use ionet_common::clock::ManualClock;
    use ionet_common::config::ClusterConfig;
    use ionet_common::resources::{parse_usd, Quantity, CPU};
    use ionet_common::rpc::proto::common::JobInfo;

    const START: u64 = 1_700_000_000_000;

    fn gpu_node(node_id: NodeId, gpus: i64, price: &str, wallet: &str) -> NodeInfo {
        let total = ResourceSet::new().with(GPU, Quantity::whole(gpus)).with(CPU, Quantity::whole(8));
        NodeInfo {
            node_id: node_id.to_vec(),
            address: "127.0.0.1:1".into(),
            total: Some((&total).into()),
            available: Some((&total).into()),
            price_per_gpu_hour_micros: parse_usd(price).unwrap(),
            wallet: wallet.into(),
            ..Default::default()
        }
    }

    struct Fixture {
        clock: ManualClock,
        state: Arc<GcsState>,
        metering: Arc<Metering>,
        storage: Arc<dyn GcsStorage>,
    }

    async fn fixture_on(storage: Arc<dyn GcsStorage>, clock: ManualClock) -> Fixture {
        let config = ClusterConfig { heartbeat_interval_ms: 100, heartbeat_timeout_ms: 1_000, ..Default::default() };
        let state = GcsState::open(config, storage.clone(), Arc::new(clock.clone())).await.unwrap();
        let metering = Metering::open(state.clone(), MeteringOptions::default()).await.unwrap();
        Fixture { clock, state, metering, storage }
    }

    async fn fixture() -> Fixture {
        fixture_on(Arc::new(MemoryStorage::new()), ManualClock::new(START)).await
    }

    fn gpus(count: &str) -> Option<ResourceQuantities> {
        Some((&ResourceSet::new().with(GPU, count.parse().unwrap())).into())
    }

    async fn job(state: &GcsState, payer: &str) -> JobId {
        let job = state.add_job(JobInfo { payer_account: payer.into(), ..Default::default() }).await.unwrap();
        JobId::from_bytes(&job.job_id).unwrap()
    }

    fn balance(balances: &[(Account, i64)], account: Account) -> i64 {
        balances.iter().find(|(a, _)| *a == account).map(|(_, b)| *b).unwrap_or(0)
    }

    #[tokio::test]
    async fn interval_times_price_is_exact_and_settles_once() {
        let f = fixture().await;
        let node = NodeId::random();
        f.state.register_node(gpu_node(node, 4, "2.50", "wallet-a")).await.unwrap();
        let job = job(&f.state, "alice").await;
        f.metering.add_credits("alice", 100_000_000).await.unwrap();
        let lease = LeaseId::random();
        let start =
            f.metering.lease_started(lease.as_bytes(), node.as_bytes(), job.as_bytes(), gpus("2")).await.unwrap();
        assert_eq!(start, START);
        // The same report again is harmless.
        f.clock.advance_ms(5);
        assert_eq!(
            f.metering.lease_started(lease.as_bytes(), node.as_bytes(), job.as_bytes(), gpus("2")).await.unwrap(),
            START
        );
        f.clock.advance_ms(90 * 60_000 - 5);
        let record = f.metering.lease_ended(lease.as_bytes()).await.unwrap();
        assert_eq!((record.start_ms, record.end_ms), (START, START + 5_400_000));
        // 2 GPUs × 1.5 h × $2.50 = $7.50, exactly.
        assert_eq!(record.cost_micros, 7_500_000);
        assert_eq!(record.payer_account, "alice");
        assert_eq!(record.provider_wallet, "wallet-a");
        assert_eq!(record.record_id, record_id(&lease, 0).to_string());
        // Ending twice returns the same record.
        f.clock.advance_ms(1_000);
        let again = f.metering.lease_ended(lease.as_bytes()).await.unwrap();
        assert_eq!(again.end_ms, record.end_ms);

        let summary = f.metering.settle_now(false).await.unwrap();
        assert_eq!(
            (summary.epoch_id, summary.records, summary.total_usage, summary.total_fee),
            (0, 1, 7_500_000, 187_500)
        );
        let balances = f.metering.balances().await.unwrap();
        assert_eq!(balance(&balances, Account::provider("wallet-a")), 7_500_000);
        assert_eq!(balance(&balances, Account::Treasury), 187_500);
        assert_eq!(balance(&balances, Account::payer("alice")), 100_000_000 - 7_500_000 - 187_500);
        assert_eq!(balances.iter().map(|(_, b)| b).sum::<i64>(), 0);
        let listed = f.metering.list_usage(Some(job), None).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].settled && listed[0].settled_epoch == 0);

        f.clock.advance_ms(1_000);
        let second = f.metering.settle_now(false).await.unwrap();
        assert_eq!((second.epoch_id, second.records, second.total_usage), (1, 0, 0));
        assert_eq!(f.metering.balances().await.unwrap(), balances);
        let (earnings, provider_balance) = f.metering.earnings("wallet-a").await.unwrap();
        assert_eq!(earnings[0].revenue, 7_500_000);
        assert_eq!(provider_balance, 7_500_000);
    }

    #[tokio::test]
    async fn a_dead_node_ends_its_leases_at_its_last_heartbeat() {
        let f = fixture().await;
        let node = NodeId::random();
        f.state.register_node(gpu_node(node, 1, "3.60", "")).await.unwrap();
        let job = job(&f.state, "").await;
        let lease = LeaseId::random();
        f.metering.lease_started(lease.as_bytes(), node.as_bytes(), job.as_bytes(), gpus("0.5")).await.unwrap();
        f.clock.advance_ms(700);
        f.state.heartbeat(node.as_bytes(), None).unwrap();
        f.clock.advance_ms(1_500);
        assert_eq!(f.state.check_heartbeats().await.unwrap(), vec![node]);
        assert_eq!(f.metering.end_leases_of_dead_nodes().await.unwrap(), 1);
        let records = f.metering.list_usage(None, Some(node)).await.unwrap();
        assert_eq!(records.len(), 1);
        assert!(!records[0].open);
        assert_eq!(records[0].end_ms, START + 700);
        assert_eq!(records[0].payer_account, DEFAULT_PAYER);
        assert_eq!(records[0].provider_wallet, format!("node-{node}"));
        // 0.5 GPU × 0.7 s × $3.60/h = $0.00035.
        assert_eq!(records[0].cost_micros, 350);
        let err = f
            .metering
            .lease_started(LeaseId::random().as_bytes(), node.as_bytes(), job.as_bytes(), gpus("1"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("is dead"), "{err}");
    }

    #[tokio::test]
    async fn an_open_lease_is_cut_at_the_epoch_end_and_survives_a_restart() {
        let storage: Arc<dyn GcsStorage> = Arc::new(MemoryStorage::new());
        let clock = ManualClock::new(START);
        let f = fixture_on(storage.clone(), clock.clone()).await;
        let node = NodeId::random();
        f.state.register_node(gpu_node(node, 1, "1", "w")).await.unwrap();
        let job = job(&f.state, "bob").await;
        let lease = LeaseId::random();
        f.metering.lease_started(lease.as_bytes(), node.as_bytes(), job.as_bytes(), gpus("1")).await.unwrap();
        f.clock.advance_ms(3_600_000);
        let summary = f.metering.settle_now(false).await.unwrap();
        assert_eq!((summary.records, summary.total_usage), (1, 1_000_000));
        f.clock.advance_ms(1_800_000);
        drop(f);

        // A head restarted on the same storage still has the lease open.
        let g = fixture_on(storage, clock).await;
        let record = g.metering.lease_ended(lease.as_bytes()).await.unwrap();
        assert_eq!(record.segment, 1);
        assert_eq!(record.start_ms, START + 3_600_000);
        assert_eq!(record.cost_micros, 500_000);
        assert_ne!(record.record_id, record_id(&lease, 0).to_string());
        let err = g.metering.lease_ended(LeaseId::random().as_bytes()).await.unwrap_err();
        assert!(err.to_string().contains("is not open"), "{err}");
        let _ = g.storage.describe();
    }

    #[tokio::test]
    async fn bad_input_is_refused_with_the_value() {
        let f = fixture().await;
        let err = f.metering.add_credits("alice", 0).await.unwrap_err();
        assert!(err.to_string().contains("invalid amount"), "{err}");
        let err = f.metering.refund("nobody").await.unwrap_err();
        assert!(err.to_string().contains("\"nobody\" has never been credited"), "{err}");
        let err = f.metering.lease_ended(&[1, 2, 3]).await.unwrap_err();
        assert!(err.to_string().contains("lease id must be 16 bytes"), "{err}");
        let err = f
            .metering
            .lease_started(
                LeaseId::random().as_bytes(),
                NodeId::random().as_bytes(),
                JobId::from_sequence(1).as_bytes(),
                gpus("1"),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not registered"), "{err}");
    }

    #[tokio::test]
    async fn scheduled_epochs_close_on_boundaries() {
        let config = ClusterConfig {
            heartbeat_interval_ms: 100,
            heartbeat_timeout_ms: 1_000,
            epoch_length_ms: 60_000,
            ..Default::default()
        };
        let clock = ManualClock::new(600_000 + 30_000);
        let state = GcsState::open(config, Arc::new(MemoryStorage::new()), Arc::new(clock.clone())).await.unwrap();
        let metering = Metering::open(state, MeteringOptions::default()).await.unwrap();
        assert!(metering.settle_due().await.unwrap().is_none());
        clock.advance_ms(30_000);
        let closed = metering.settle_due().await.unwrap().unwrap();
        assert_eq!((closed.epoch_id, closed.end_ms), (0, 660_000));
        assert!(metering.settle_due().await.unwrap().is_none());
        clock.advance_ms(185_000);
        let closed = metering.settle_due().await.unwrap().unwrap();
        assert_eq!((closed.epoch_id, closed.end_ms), (1, 840_000));
    }
}
