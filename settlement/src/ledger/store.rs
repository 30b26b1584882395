//! Where the ledger keeps its state, behind [`LedgerStore`].
//!
//! State: pending usage records (accepted, not yet settled), the settled-record index
//! (record id → epoch), account balances, the append-only entry log and the summaries
//! of closed epochs.
//!
//! The one invariant a backend must keep: [`LedgerStore::commit`] is atomic. It checks
//! that the epoch is still open and every record to settle is still pending, then
//! appends the entries, applies them to the balances, moves the records to the settled
//! index and closes the epoch, all or nothing. Because the plan is computed from the
//! same committed state and closing the epoch is part of the same commit, a settlement
//! interrupted anywhere either happened entirely or not at all, and running it again
//! either completes it or finds the epoch closed.
//!
//! [`CommitBatch::interrupt_after`] is the test seam: a backend stops after the named
//! step and discards everything (or, for [`SettleStep::Acknowledge`], commits and then
//! reports failure, as when the process dies before the caller hears back).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::account::{Account, LedgerEntry};
use super::plan::EpochSummary;
use crate::error::{SettlementError, SettlementResult};
use crate::fast_hash::FastHashMap;
use crate::usage::{MeteredUsage, RecordId, UsageRecord};

/// The steps of a settlement, in order; interruption can be simulated after any.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SettleStep {
    /// Pending records read from the store.
    LoadPending,
    /// Entries computed (pure).
    ComputePlan,
    /// Inside the commit: entries appended to the log.
    AppendEntries,
    /// Inside the commit: balances updated.
    ApplyBalances,
    /// Inside the commit: records moved from pending to settled.
    MarkRecordsSettled,
    /// Inside the commit: the epoch recorded as closed.
    CloseEpoch,
    /// After the commit is durable, before the caller is told.
    Acknowledge,
}

impl SettleStep {
    pub const ALL: [SettleStep; 7] = [
        SettleStep::LoadPending,
        SettleStep::ComputePlan,
        SettleStep::AppendEntries,
        SettleStep::ApplyBalances,
        SettleStep::MarkRecordsSettled,
        SettleStep::CloseEpoch,
        SettleStep::Acknowledge,
    ];
}

/// One atomic change to the ledger.
#[derive(Clone, Debug, Default)]
pub struct CommitBatch {
    /// Appended in order; the store assigns sequence numbers.
    pub entries: Vec<LedgerEntry>,
    /// Records to move from pending to settled (in `close_epoch`'s epoch).
    pub settle_records: Vec<RecordId>,
    /// The epoch to close; the commit fails with `EpochAlreadySettled` if it is closed.
    pub close_epoch: Option<EpochSummary>,
    /// Makes the commit happen at most once: a commit carrying a key already committed
    /// fails with `AlreadyApplied` and changes nothing.
    pub once_key: Option<String>,
    /// Test seam: stop after this step (see the module docs).
    pub interrupt_after: Option<SettleStep>,
}

/// Storage of the ledger. Reads see only committed state.
pub trait LedgerStore: Send {
    /// Adds records to the pending set. A record whose id is already pending with the
    /// same contents, or already settled, is skipped (re-delivery is harmless); a
    /// different record under a pending id is refused. Returns how many were new.
    fn insert_records(&mut self, records: &[UsageRecord]) -> SettlementResult<usize>;

    /// Visits every pending record with `end_ms <= end_ms`, in no particular order.
    /// This is the settlement hot path: a store should lend views, not build records.
    fn scan_pending(
        &self,
        end_ms: u64,
        visit: &mut dyn FnMut(&MeteredUsage<'_>) -> SettlementResult<()>,
    ) -> SettlementResult<()>;

    /// Up to `limit` pending records in full (for `ionet usage`), in no particular order.
    fn pending_records(&self, limit: usize) -> SettlementResult<Vec<UsageRecord>>;

    fn pending_count(&self) -> SettlementResult<u64>;

    /// The epoch that settled this record, if any.
    fn settled_in(&self, record_id: RecordId) -> SettlementResult<Option<u64>>;

    /// An account's balance (0 for an account never used).
    fn balance(&self, account: &Account) -> SettlementResult<i64>;

    fn balances(&self) -> SettlementResult<BTreeMap<Account, i64>>;

    /// Up to `limit` entries with `sequence >= from_sequence`, in order.
    fn entries(&self, from_sequence: u64, limit: usize) -> SettlementResult<Vec<LedgerEntry>>;

    fn epoch(&self, epoch_id: u64) -> SettlementResult<Option<EpochSummary>>;

    /// The closed epoch with the highest id.
    fn last_epoch(&self) -> SettlementResult<Option<EpochSummary>>;

    /// Every closed epoch, by id.
    fn epochs(&self) -> SettlementResult<Vec<EpochSummary>>;

    /// Whether a commit carrying this once-only key was made.
    fn is_applied(&self, key: &str) -> SettlementResult<bool>;

    /// Applies the batch atomically (see the module docs).
    fn commit(&mut self, batch: CommitBatch) -> SettlementResult<()>;
}

/// Applies entries to balances without touching them: returns each changed account's
/// new balance, or fails on overflow.
pub(crate) fn stage_balances<'a>(
    entries: &'a [LedgerEntry],
    current: &mut dyn FnMut(&Account) -> SettlementResult<i64>,
) -> SettlementResult<Vec<(&'a Account, i64)>> {
    let mut deltas: HashMap<&Account, i128> = HashMap::new();
    for entry in entries {
        if entry.amount > i64::MAX as u64 {
            return Err(SettlementError::InvalidAmount {
                what: format!("{:?} entry to {}", entry.kind, entry.credit),
                value: entry.amount.to_string(),
            });
        }
        *deltas.entry(&entry.debit).or_default() -= entry.amount as i128;
        *deltas.entry(&entry.credit).or_default() += entry.amount as i128;
    }
    let mut staged = Vec::with_capacity(deltas.len());
    for (account, delta) in deltas {
        let balance = current(account)? as i128 + delta;
        let balance = i64::try_from(balance).map_err(|_| SettlementError::Overflow(format!("balance of {account}")))?;
        staged.push((account, balance));
    }
    Ok(staged)
}

pub(crate) fn check_interrupt(batch: &CommitBatch, step: SettleStep) -> SettlementResult<()> {
    if batch.interrupt_after == Some(step) {
        return Err(SettlementError::Interrupted(step));
    }
    Ok(())
}

/// The in-memory backend, lost on exit. Commit stages every change and checks every
/// condition before mutating anything, so a failed commit leaves no trace.
///
/// Pending records are kept twice: in full (for queries and re-delivery checks) and as
/// compact rows with interned account names, which is what settlement scans, so that a
/// scan touches ~80 bytes per record and no scattered heap allocation.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    names: Vec<Box<str>>,
    name_index: FastHashMap<Box<str>, u32>,
    /// Slot-indexed; a settled slot is dead until reused.
    rows: Vec<PendingRow>,
    records: Vec<Option<UsageRecord>>,
    free_slots: Vec<u32>,
    slot_of: FastHashMap<RecordId, u32>,
    settled: FastHashMap<RecordId, u64>,
    balances: HashMap<Account, i64>,
    entries: Vec<LedgerEntry>,
    epochs: BTreeMap<u64, EpochSummary>,
    applied_keys: std::collections::HashSet<String>,
}

#[derive(Clone, Copy, Debug)]
struct PendingRow {
    record_id: RecordId,
    live: bool,
    payer: u32,
    provider: u32,
    gpu_units: i64,
    cpu_units: i64,
    start_ms: u64,
    end_ms: u64,
    price_per_gpu_hour: u64,
    price_per_cpu_hour: u64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.name_index.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.into());
        self.name_index.insert(name.into(), id);
        id
    }
}

impl LedgerStore for MemoryStore {
    fn insert_records(&mut self, records: &[UsageRecord]) -> SettlementResult<usize> {
        for record in records {
            if let Some(&slot) = self.slot_of.get(&record.record_id) {
                if self.records[slot as usize].as_ref() != Some(record) {
                    return Err(SettlementError::ConflictingRecord(record.record_id.to_string()));
                }
            }
        }
        let mut added = 0;
        for record in records {
            if self.settled.contains_key(&record.record_id) || self.slot_of.contains_key(&record.record_id) {
                continue;
            }
            let usage = record.metered();
            let row = PendingRow {
                record_id: record.record_id,
                live: true,
                payer: self.intern(usage.payer_account),
                provider: self.intern(usage.provider_wallet),
                gpu_units: usage.gpu_units,
                cpu_units: usage.cpu_units,
                start_ms: usage.start_ms,
                end_ms: usage.end_ms,
                price_per_gpu_hour: usage.price_per_gpu_hour,
                price_per_cpu_hour: usage.price_per_cpu_hour,
            };
            let slot = match self.free_slots.pop() {
                Some(slot) => {
                    self.rows[slot as usize] = row;
                    self.records[slot as usize] = Some(record.clone());
                    slot
                }
                None => {
                    self.rows.push(row);
                    self.records.push(Some(record.clone()));
                    (self.rows.len() - 1) as u32
                }
            };
            self.slot_of.insert(record.record_id, slot);
            added += 1;
        }
        Ok(added)
    }

    fn scan_pending(
        &self,
        end_ms: u64,
        visit: &mut dyn FnMut(&MeteredUsage<'_>) -> SettlementResult<()>,
    ) -> SettlementResult<()> {
        for row in &self.rows {
            if row.live && row.end_ms <= end_ms {
                visit(&MeteredUsage {
                    record_id: row.record_id,
                    payer_account: &self.names[row.payer as usize],
                    provider_wallet: &self.names[row.provider as usize],
                    gpu_units: row.gpu_units,
                    cpu_units: row.cpu_units,
                    start_ms: row.start_ms,
                    end_ms: row.end_ms,
                    price_per_gpu_hour: row.price_per_gpu_hour,
                    price_per_cpu_hour: row.price_per_cpu_hour,
                })?;
            }
        }
        Ok(())
    }

    fn pending_records(&self, limit: usize) -> SettlementResult<Vec<UsageRecord>> {
        Ok(self.records.iter().flatten().take(limit).cloned().collect())
    }

    fn pending_count(&self) -> SettlementResult<u64> {
        Ok(self.slot_of.len() as u64)
    }

    fn settled_in(&self, record_id: RecordId) -> SettlementResult<Option<u64>> {
        Ok(self.settled.get(&record_id).copied())
    }

    fn balance(&self, account: &Account) -> SettlementResult<i64> {
        Ok(self.balances.get(account).copied().unwrap_or(0))
    }

    fn balances(&self) -> SettlementResult<BTreeMap<Account, i64>> {
        Ok(self.balances.iter().map(|(a, b)| (a.clone(), *b)).collect())
    }

    fn entries(&self, from_sequence: u64, limit: usize) -> SettlementResult<Vec<LedgerEntry>> {
        Ok(self.entries.iter().skip(from_sequence as usize).take(limit).cloned().collect())
    }

    fn epoch(&self, epoch_id: u64) -> SettlementResult<Option<EpochSummary>> {
        Ok(self.epochs.get(&epoch_id).cloned())
    }

    fn last_epoch(&self) -> SettlementResult<Option<EpochSummary>> {
        Ok(self.epochs.values().next_back().cloned())
    }

    fn epochs(&self) -> SettlementResult<Vec<EpochSummary>> {
        Ok(self.epochs.values().cloned().collect())
    }

    fn is_applied(&self, key: &str) -> SettlementResult<bool> {
        Ok(self.applied_keys.contains(key))
    }

    fn commit(&mut self, batch: CommitBatch) -> SettlementResult<()> {
        // Check and stage; nothing below mutates until every step has passed.
        if let Some(summary) = &batch.close_epoch {
            if self.epochs.contains_key(&summary.epoch_id) {
                return Err(SettlementError::EpochAlreadySettled(summary.epoch_id));
            }
        }
        if let Some(key) = batch.once_key.as_ref().filter(|key| self.applied_keys.contains(*key)) {
            return Err(SettlementError::AlreadyApplied(key.clone()));
        }
        let first_sequence = self.entries.len() as u64;
        check_interrupt(&batch, SettleStep::AppendEntries)?;
        let balances = &self.balances;
        let staged = stage_balances(&batch.entries, &mut |account| Ok(balances.get(account).copied().unwrap_or(0)))?;
        check_interrupt(&batch, SettleStep::ApplyBalances)?;
        if let Some(missing) = batch.settle_records.iter().find(|id| !self.slot_of.contains_key(id)) {
            return Err(SettlementError::RecordNotPending(missing.to_string()));
        }
        check_interrupt(&batch, SettleStep::MarkRecordsSettled)?;
        check_interrupt(&batch, SettleStep::CloseEpoch)?;

        // Apply: infallible from here.
        for (account, balance) in staged {
            self.balances.insert(account.clone(), balance);
        }
        let epoch_id = batch.close_epoch.as_ref().map(|s| s.epoch_id).unwrap_or(u64::MAX);
        self.settled.reserve(batch.settle_records.len());
        let first_freed = self.free_slots.len();
        for id in &batch.settle_records {
            if let Some(slot) = self.slot_of.remove(id) {
                self.rows[slot as usize].live = false;
                self.free_slots.push(slot);
            }
            self.settled.insert(*id, epoch_id);
        }
        // Free the full records in a second pass, in slot order: interleaving a
        // million scattered frees with the hash-table updates above costs twice as much.
        if self.slot_of.is_empty() {
            self.rows.clear();
            self.records.clear();
            self.free_slots.clear();
        } else {
            let freed = &mut self.free_slots[first_freed..];
            freed.sort_unstable();
            for &slot in freed.iter() {
                self.records[slot as usize] = None;
            }
        }
        let interrupt_after = batch.interrupt_after;
        for (offset, mut entry) in batch.entries.into_iter().enumerate() {
            entry.sequence = first_sequence + offset as u64;
            self.entries.push(entry);
        }
        if let Some(summary) = batch.close_epoch {
            self.epochs.insert(summary.epoch_id, summary);
        }
        if let Some(key) = batch.once_key {
            self.applied_keys.insert(key);
        }
        if interrupt_after == Some(SettleStep::Acknowledge) {
            return Err(SettlementError::Interrupted(SettleStep::Acknowledge));
        }
        Ok(())
    }
}

/// A boxed store is a store, so the backend can be chosen at run time
/// (`Ledger<Box<dyn LedgerStore>>`: the control store picks redb or memory from its flags).
impl<S: LedgerStore + ?Sized> LedgerStore for Box<S> {
    fn insert_records(&mut self, records: &[UsageRecord]) -> SettlementResult<usize> {
        (**self).insert_records(records)
    }

    fn scan_pending(
        &self,
        end_ms: u64,
        visit: &mut dyn FnMut(&MeteredUsage<'_>) -> SettlementResult<()>,
    ) -> SettlementResult<()> {
        (**self).scan_pending(end_ms, visit)
    }

    fn pending_records(&self, limit: usize) -> SettlementResult<Vec<UsageRecord>> {
        (**self).pending_records(limit)
    }

    fn pending_count(&self) -> SettlementResult<u64> {
        (**self).pending_count()
    }

    fn settled_in(&self, record_id: RecordId) -> SettlementResult<Option<u64>> {
        (**self).settled_in(record_id)
    }

    fn balance(&self, account: &Account) -> SettlementResult<i64> {
        (**self).balance(account)
    }

    fn balances(&self) -> SettlementResult<BTreeMap<Account, i64>> {
        (**self).balances()
    }

    fn entries(&self, from_sequence: u64, limit: usize) -> SettlementResult<Vec<LedgerEntry>> {
        (**self).entries(from_sequence, limit)
    }

    fn epoch(&self, epoch_id: u64) -> SettlementResult<Option<EpochSummary>> {
        (**self).epoch(epoch_id)
    }

    fn last_epoch(&self) -> SettlementResult<Option<EpochSummary>> {
        (**self).last_epoch()
    }

    fn epochs(&self) -> SettlementResult<Vec<EpochSummary>> {
        (**self).epochs()
    }

    fn is_applied(&self, key: &str) -> SettlementResult<bool> {
        (**self).is_applied(key)
    }

    fn commit(&mut self, batch: CommitBatch) -> SettlementResult<()> {
        (**self).commit(batch)
    }
}
