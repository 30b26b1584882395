//! The embedded-database backend: one redb file, every commit one write transaction.
//!
//! Tables: `pending` (record id → bincode record), `settled` (record id → epoch),
//! `balances` (account key → micro-USD), `entries` (sequence → bincode entry),
//! `epochs` (epoch id → bincode summary), `applied_keys` (the once-only keys of
//! commits such as payouts). A [`CommitBatch`] runs in a single redb write
//! transaction that is aborted on any error or simulated interruption, so the file holds
//! either all of a settlement or none of it, including after a crash (redb commits are
//! durable and crash-safe).

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::account::{Account, LedgerEntry};
use super::plan::EpochSummary;
use super::store::{check_interrupt, stage_balances, CommitBatch, LedgerStore, SettleStep};
use crate::error::{SettlementError, SettlementResult};
use crate::usage::{MeteredUsage, RecordId, UsageRecord};

const PENDING: TableDefinition<u128, &[u8]> = TableDefinition::new("pending");
const SETTLED: TableDefinition<u128, u64> = TableDefinition::new("settled");
const BALANCES: TableDefinition<&str, i64> = TableDefinition::new("balances");
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const EPOCHS: TableDefinition<u64, &[u8]> = TableDefinition::new("epochs");
const APPLIED: TableDefinition<&str, ()> = TableDefinition::new("applied_keys");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The layout of what the tables hold; 2 added receivables to the epoch summaries.
const FORMAT: u64 = 2;

fn encode<T: serde::Serialize>(value: &T) -> SettlementResult<Vec<u8>> {
    Ok(bincode::serde::encode_to_vec(value, bincode::config::standard())?)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> SettlementResult<T> {
    Ok(bincode::serde::decode_from_slice(bytes, bincode::config::standard())?.0)
}

/// The ledger in a redb file.
pub struct RedbStore {
    database: Database,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens the ledger file, creating it (and its tables) if absent. A file whose closed
    /// epochs were written in an older layout is refused, by name, rather than misread.
    pub fn open(path: impl AsRef<Path>) -> SettlementResult<Self> {
        let path = path.as_ref();
        let database = Database::create(path)?;
        let transaction = database.begin_write()?;
        {
            transaction.open_table(PENDING)?;
            transaction.open_table(SETTLED)?;
            transaction.open_table(BALANCES)?;
            transaction.open_table(ENTRIES)?;
            let epochs = transaction.open_table(EPOCHS)?;
            transaction.open_table(APPLIED)?;
            let mut meta = transaction.open_table(META)?;
            let format = meta.get("format")?.map(|value| value.value());
            match format {
                Some(FORMAT) => {}
                None if epochs.is_empty()? => {
                    meta.insert("format", FORMAT)?;
                }
                found => {
                    return Err(SettlementError::Io(std::io::Error::other(format!(
                        "ledger {} holds epochs in layout {} and this ionet reads layout {FORMAT}: settle and pay \
                         them out with the ionet that wrote it, or start a new ledger",
                        path.display(),
                        found.unwrap_or(1)
                    ))));
                }
            }
        }
        transaction.commit()?;
        Ok(RedbStore { database })
    }
}

impl LedgerStore for RedbStore {
    fn insert_records(&mut self, records: &[UsageRecord]) -> SettlementResult<usize> {
        let transaction = self.database.begin_write()?;
        let mut added = 0;
        {
            let mut pending = transaction.open_table(PENDING)?;
            let settled = transaction.open_table(SETTLED)?;
            for record in records {
                let id = record.record_id.0;
                if settled.get(id)?.is_some() {
                    continue;
                }
                let bytes = encode(record)?;
                if let Some(existing) = pending.get(id)? {
                    if existing.value() != bytes.as_slice() {
                        let existing: UsageRecord = decode(existing.value())?;
                        if &existing != record {
                            return Err(SettlementError::ConflictingRecord(record.record_id.to_string()));
                        }
                    }
                    continue;
                }
                pending.insert(id, bytes.as_slice())?;
                added += 1;
            }
        }
        transaction.commit()?;
        Ok(added)
    }

    fn scan_pending(
        &self,
        end_ms: u64,
        visit: &mut dyn FnMut(&MeteredUsage<'_>) -> SettlementResult<()>,
    ) -> SettlementResult<()> {
        let transaction = self.database.begin_read()?;
        let pending = transaction.open_table(PENDING)?;
        for row in pending.iter()? {
            let (_, bytes) = row?;
            let record: UsageRecord = decode(bytes.value())?;
            if record.end_ms <= end_ms {
                visit(&record.metered())?;
            }
        }
        Ok(())
    }

    fn pending_records(&self, limit: usize) -> SettlementResult<Vec<UsageRecord>> {
        let transaction = self.database.begin_read()?;
        let pending = transaction.open_table(PENDING)?;
        let mut out = Vec::new();
        for row in pending.iter()?.take(limit) {
            let (_, bytes) = row?;
            out.push(decode(bytes.value())?);
        }
        Ok(out)
    }

    fn pending_count(&self) -> SettlementResult<u64> {
        let transaction = self.database.begin_read()?;
        Ok(transaction.open_table(PENDING)?.len()?)
    }

    fn settled_in(&self, record_id: RecordId) -> SettlementResult<Option<u64>> {
        let transaction = self.database.begin_read()?;
        let settled = transaction.open_table(SETTLED)?;
        Ok(settled.get(record_id.0)?.map(|epoch| epoch.value()))
    }

    fn balance(&self, account: &Account) -> SettlementResult<i64> {
        let transaction = self.database.begin_read()?;
        let balances = transaction.open_table(BALANCES)?;
        Ok(balances.get(account.key().as_str())?.map(|b| b.value()).unwrap_or(0))
    }

    fn balances(&self) -> SettlementResult<BTreeMap<Account, i64>> {
        let transaction = self.database.begin_read()?;
        let balances = transaction.open_table(BALANCES)?;
        let mut all = BTreeMap::new();
        for row in balances.iter()? {
            let (key, balance) = row?;
            all.insert(key.value().parse()?, balance.value());
        }
        Ok(all)
    }

    fn entries(&self, from_sequence: u64, limit: usize) -> SettlementResult<Vec<LedgerEntry>> {
        let transaction = self.database.begin_read()?;
        let entries = transaction.open_table(ENTRIES)?;
        let mut out = Vec::new();
        for row in entries.range(from_sequence..)?.take(limit) {
            let (_, bytes) = row?;
            out.push(decode(bytes.value())?);
        }
        Ok(out)
    }

    fn epoch(&self, epoch_id: u64) -> SettlementResult<Option<EpochSummary>> {
        let transaction = self.database.begin_read()?;
        let epochs = transaction.open_table(EPOCHS)?;
        epochs.get(epoch_id)?.map(|bytes| decode(bytes.value())).transpose()
    }

    fn last_epoch(&self) -> SettlementResult<Option<EpochSummary>> {
        let transaction = self.database.begin_read()?;
        let epochs = transaction.open_table(EPOCHS)?;
        let last = epochs.last()?.map(|(_, bytes)| decode(bytes.value())).transpose();
        last
    }

    fn is_applied(&self, key: &str) -> SettlementResult<bool> {
        let transaction = self.database.begin_read()?;
        Ok(transaction.open_table(APPLIED)?.get(key)?.is_some())
    }

    fn epochs(&self) -> SettlementResult<Vec<EpochSummary>> {
        let transaction = self.database.begin_read()?;
        let epochs = transaction.open_table(EPOCHS)?;
        let mut out = Vec::new();
        for row in epochs.iter()? {
            let (_, bytes) = row?;
            out.push(decode(bytes.value())?);
        }
        Ok(out)
    }

    fn commit(&mut self, batch: CommitBatch) -> SettlementResult<()> {
        let transaction = self.database.begin_write()?;
        // Any early return drops `transaction` uncommitted, which aborts it.
        {
            let mut epochs = transaction.open_table(EPOCHS)?;
            if let Some(summary) = &batch.close_epoch {
                if epochs.get(summary.epoch_id)?.is_some() {
                    return Err(SettlementError::EpochAlreadySettled(summary.epoch_id));
                }
            }
            if let Some(key) = &batch.once_key {
                let mut applied = transaction.open_table(APPLIED)?;
                if applied.insert(key.as_str(), ())?.is_some() {
                    return Err(SettlementError::AlreadyApplied(key.clone()));
                }
            }

            let mut entries = transaction.open_table(ENTRIES)?;
            let first = entries.last()?.map(|(k, _)| k.value() + 1).unwrap_or(0);
            for (sequence, entry) in (first..).zip(&batch.entries) {
                let mut entry = entry.clone();
                entry.sequence = sequence;
                entries.insert(sequence, encode(&entry)?.as_slice())?;
            }
            check_interrupt(&batch, SettleStep::AppendEntries)?;

            let mut balances = transaction.open_table(BALANCES)?;
            let staged = stage_balances(&batch.entries, &mut |account| {
                Ok(balances.get(account.key().as_str())?.map(|b| b.value()).unwrap_or(0))
            })?;
            for (account, balance) in staged {
                balances.insert(account.key().as_str(), balance)?;
            }
            check_interrupt(&batch, SettleStep::ApplyBalances)?;

            let mut pending = transaction.open_table(PENDING)?;
            let mut settled = transaction.open_table(SETTLED)?;
            let epoch_id = batch.close_epoch.as_ref().map(|s| s.epoch_id).unwrap_or(u64::MAX);
            for id in &batch.settle_records {
                if pending.remove(id.0)?.is_none() {
                    return Err(SettlementError::RecordNotPending(id.to_string()));
                }
                settled.insert(id.0, epoch_id)?;
            }
            check_interrupt(&batch, SettleStep::MarkRecordsSettled)?;

            if let Some(summary) = &batch.close_epoch {
                epochs.insert(summary.epoch_id, encode(summary)?.as_slice())?;
            }
            check_interrupt(&batch, SettleStep::CloseEpoch)?;
        }
        transaction.commit()?;
        if batch.interrupt_after == Some(SettleStep::Acknowledge) {
            return Err(SettlementError::Interrupted(SettleStep::Acknowledge));
        }
        Ok(())
    }
}
