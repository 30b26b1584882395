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
//!
//! Submodules: `book` holds the in-memory bookkeeping (open leases, records made, record
//! ids); `settlement` closes epochs (cutting open leases, availability, the task closing
//! scheduled epochs); `tests` holds the unit tests.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use ionet_common::resources::MicroUsd;
use ionet_common::rpc::proto::common::{NodeState, ResourceQuantities};
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
use crate::storage::Table;

mod book;
mod settlement;
#[cfg(test)]
mod tests;

pub use book::record_id;
use book::{invalid, not_found, wallet_of, Book, Changes, Made, OpenLease};

/// The payer billed for jobs added without a payer account.
pub const DEFAULT_PAYER: &str = "default";

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
        let total = node.total.clone().unwrap_or_default().to_set()?;
        if !total.contains(&resources) {
            return Err(invalid(format!(
                "lease {lease_id} reports {resources}, more than node {} has ({total})",
                node_id.short()
            )));
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
        self.lease_ended_by(lease_id, None).await
    }

    /// [`Metering::lease_ended`] reported by `reporter` (a node: only a lease on that node
    /// may be ended by it; `None`: the control plane or the operator). A lease of another
    /// node is refused and stays open.
    pub async fn lease_ended_by(&self, lease_id: &[u8], reporter: Option<NodeId>) -> GcsResult<proto::UsageRecord> {
        let lease_id = LeaseId::from_bytes(lease_id)?;
        let now = self.state.now_ms();
        // (record, whether this call ended the lease)
        let (made, ended_now) = {
            let mut book = self.book();
            let node_of = |lease_id| {
                let open = book.open.get(lease_id).map(|lease: &OpenLease| lease.node_id);
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

    /// Starts the two background tasks: ending leases of dead nodes (on `events`, plus a
    /// sweep every tick) and closing epochs at their boundaries. Both stop with `stopped`.
    pub fn spawn_tasks(
        self: &Arc<Self>,
        events: broadcast::Receiver<ClusterEvent>,
        stopped: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        vec![
            tokio::spawn(watch_deaths(self.clone(), events, stopped.clone())),
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
