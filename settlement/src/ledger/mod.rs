//! The double-entry ledger: prepaid credits in, usage settled per epoch, refunds out.
//!
//! [`Ledger`] is a thin driver: the decision of what to post is [`plan::EpochPlanner`]
//! (pure), the state lives in a [`LedgerStore`]. A settlement is three steps:
//!
//! 1. read every pending record ending by the epoch's end (`LoadPending`);
//! 2. compute the full set of entries deterministically (`ComputePlan`);
//! 3. one atomic commit: append entries, apply balances, mark records settled, close
//!    the epoch.
//!
//! A closed epoch makes the same settle a no-op that returns the stored summary; the
//! properties this gives are listed in `README.md` beside this file.

pub mod account;
pub mod plan;
pub mod redb_store;
pub mod store;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use ionet_common::resources::MicroUsd;
use tracing::info;

pub use account::{Account, EntryKind, LedgerEntry};
pub use plan::{
    plan_epoch, split_rewards, EpochPlanner, EpochSpec, EpochSummary, LedgerConfig, NodeAvailability, PayerEpoch,
    ProviderEarnings, ProviderEpoch, Receivables, SettlementPlan, DEFAULT_FEE_BPS,
};
pub use redb_store::RedbStore;
pub use store::{CommitBatch, LedgerStore, MemoryStore, SettleStep};

use crate::error::{SettlementError, SettlementResult};
use crate::meter::MeterSink;
use crate::usage::{RecordId, UsageRecord};

/// What [`Ledger::settle_epoch`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SettleOutcome {
    /// This call settled the epoch.
    Settled(EpochSummary),
    /// The epoch was already closed (by an earlier call, possibly one whose
    /// acknowledgement was lost); nothing was posted.
    AlreadySettled(EpochSummary),
}

impl SettleOutcome {
    pub fn summary(&self) -> &EpochSummary {
        match self {
            SettleOutcome::Settled(summary) | SettleOutcome::AlreadySettled(summary) => summary,
        }
    }
}

/// The ledger over a store.
#[derive(Debug)]
pub struct Ledger<S: LedgerStore> {
    store: S,
    config: LedgerConfig,
    interrupt_after: Option<SettleStep>,
}

fn check_name(name: &str, what: &'static str) -> SettlementResult<()> {
    if name.is_empty() {
        return Err(SettlementError::InvalidAccount(name.to_string(), what));
    }
    Ok(())
}

impl<S: LedgerStore> Ledger<S> {
    pub fn new(store: S, config: LedgerConfig) -> SettlementResult<Self> {
        config.validate()?;
        Ok(Ledger { store, config, interrupt_after: None })
    }

    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn into_store(self) -> S {
        self.store
    }

    /// Test seam: the next settlement (or credit operation, for the commit steps) stops
    /// after `step` with [`SettlementError::Interrupted`]. One-shot.
    pub fn interrupt_after(&mut self, step: SettleStep) {
        self.interrupt_after = Some(step);
    }

    /// Validates and stores usage records as pending; returns how many were new
    /// (re-delivered records are skipped). All-or-nothing on a validation error.
    pub fn accept_records(&mut self, records: &[UsageRecord]) -> SettlementResult<usize> {
        for record in records {
            record.validate()?;
        }
        self.store.insert_records(records)
    }

    /// Buys prepaid credits: funding → payer. Returns the payer's new balance.
    pub fn add_credits(&mut self, payer: &str, amount: MicroUsd) -> SettlementResult<i64> {
        check_name(payer, "payer account is empty")?;
        if amount == 0 || amount > i64::MAX as u64 {
            return Err(SettlementError::InvalidAmount {
                what: format!("credits for payer {payer}"),
                value: amount.to_string(),
            });
        }
        let account = Account::payer(payer);
        self.commit(CommitBatch {
            entries: vec![LedgerEntry::new(None, EntryKind::Deposit, Account::Funding, account.clone(), amount)],
            ..CommitBatch::default()
        })?;
        info!(payer, amount, "credits added");
        self.store.balance(&account)
    }

    /// Credits `payer` with `amount` once per `reference` (an on-chain deposit's
    /// transaction signature, a payment processor's id): the same reference again, in
    /// this process or after a restart on the same store, credits nothing and returns
    /// false.
    pub fn deposit_once(&mut self, payer: &str, amount: MicroUsd, reference: &str) -> SettlementResult<bool> {
        check_name(payer, "payer account is empty")?;
        check_name(reference, "deposit reference is empty")?;
        if amount == 0 || amount > i64::MAX as u64 {
            return Err(SettlementError::InvalidAmount {
                what: format!("deposit {reference} for payer {payer}"),
                value: amount.to_string(),
            });
        }
        let once_key = format!("deposit:{reference}");
        if self.store.is_applied(&once_key)? {
            return Ok(false);
        }
        let entry = LedgerEntry::new(None, EntryKind::Deposit, Account::Funding, Account::payer(payer), amount);
        match self.commit(CommitBatch { entries: vec![entry], once_key: Some(once_key), ..CommitBatch::default() }) {
            Ok(()) => {
                info!(payer, amount, reference, "deposit credited");
                Ok(true)
            }
            Err(SettlementError::AlreadyApplied(_)) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Returns a payer's unused prepaid credit (its positive balance) to funding.
    /// Returns the amount refunded: 0 for an empty or indebted account.
    pub fn refund(&mut self, payer: &str) -> SettlementResult<MicroUsd> {
        check_name(payer, "payer account is empty")?;
        let account = Account::payer(payer);
        let balance = self.store.balance(&account)?;
        if balance <= 0 {
            return Ok(0);
        }
        let amount = balance as MicroUsd;
        self.commit(CommitBatch {
            entries: vec![LedgerEntry::new(None, EntryKind::Refund, account, Account::Funding, amount)],
            ..CommitBatch::default()
        })?;
        info!(payer, amount, "credits refunded");
        Ok(amount)
    }

    pub fn balance(&self, account: &Account) -> SettlementResult<i64> {
        self.store.balance(account)
    }

    /// Every account that ever moved, with its balance (they sum to zero).
    pub fn balances(&self) -> SettlementResult<BTreeMap<Account, i64>> {
        self.store.balances()
    }

    pub fn entries(&self, from_sequence: u64, limit: usize) -> SettlementResult<Vec<LedgerEntry>> {
        self.store.entries(from_sequence, limit)
    }

    /// Up to `limit` records accepted and not yet settled.
    pub fn pending_records(&self, limit: usize) -> SettlementResult<Vec<UsageRecord>> {
        self.store.pending_records(limit)
    }

    /// The epoch that settled a record, if it has been.
    pub fn settled_in(&self, record_id: RecordId) -> SettlementResult<Option<u64>> {
        self.store.settled_in(record_id)
    }

    pub fn pending_count(&self) -> SettlementResult<u64> {
        self.store.pending_count()
    }

    pub fn epoch(&self, epoch_id: u64) -> SettlementResult<Option<EpochSummary>> {
        self.store.epoch(epoch_id)
    }

    pub fn epochs(&self) -> SettlementResult<Vec<EpochSummary>> {
        self.store.epochs()
    }

    /// A provider's earnings in every settled epoch where it had usage or uptime.
    pub fn earnings(&self, wallet: &str) -> SettlementResult<Vec<ProviderEarnings>> {
        Ok(self
            .store
            .epochs()?
            .iter()
            .filter_map(|epoch| epoch.providers.iter().find(|p| p.wallet == wallet).map(|p| p.earnings(epoch.epoch_id)))
            .collect())
    }

    /// Computes what settling `spec` would post, writing nothing. For a closed epoch
    /// this is what a new epoch with the same bounds would settle now.
    pub fn dry_run(&self, spec: &EpochSpec) -> SettlementResult<SettlementPlan> {
        let spec = &self.started(spec)?;
        let mut planner = EpochPlanner::new();
        self.store.scan_pending(spec.end_ms, &mut |record| planner.add(record))?;
        let store = &self.store;
        let receivables = self.receivables()?;
        planner.finish(spec, &self.config, &mut |account| store.balance(account), &receivables)
    }

    /// What each payer owes providers for usage it did not fund.
    pub fn receivables(&self) -> SettlementResult<Receivables> {
        let mut receivables = Receivables::new();
        for (account, balance) in self.store.balances()? {
            if let Account::Receivable(payer, wallet) = account {
                if balance > 0 {
                    receivables.entry(payer).or_default().insert(wallet, balance as u64);
                }
            }
        }
        Ok(receivables)
    }

    /// `spec` beginning where the last closed epoch ended, if any (its reward pool covers
    /// exactly the time since).
    fn started(&self, spec: &EpochSpec) -> SettlementResult<EpochSpec> {
        let mut spec = spec.clone();
        if let Some(last) = self.store.last_epoch()? {
            spec.start_ms = last.end_ms;
        }
        Ok(spec)
    }

    /// Settles one epoch: see the module docs. Idempotent: a closed epoch returns
    /// [`SettleOutcome::AlreadySettled`]; an interrupted one is completed by calling again.
    pub fn settle_epoch(&mut self, spec: &EpochSpec) -> SettlementResult<SettleOutcome> {
        if let Some(summary) = self.store.epoch(spec.epoch_id)? {
            return Ok(SettleOutcome::AlreadySettled(summary));
        }
        let spec = &self.started(spec)?;
        if let Some(last) = self.store.last_epoch()? {
            if spec.epoch_id < last.epoch_id || spec.end_ms < last.end_ms {
                return Err(SettlementError::EpochOutOfOrder {
                    epoch: spec.epoch_id,
                    end_ms: spec.end_ms,
                    last_epoch: last.epoch_id,
                    last_end_ms: last.end_ms,
                });
            }
        }
        let interrupt_after = self.interrupt_after.take();
        let stop = |step| {
            if interrupt_after == Some(step) {
                Err(SettlementError::Interrupted(step))
            } else {
                Ok(())
            }
        };

        let pending = self.store.pending_count()? as usize;
        let mut planner = EpochPlanner::with_capacity(pending);
        self.store.scan_pending(spec.end_ms, &mut |record| planner.add(record))?;
        stop(SettleStep::LoadPending)?;

        let store = &self.store;
        let receivables = self.receivables()?;
        let plan = planner.finish(spec, &self.config, &mut |account| store.balance(account), &receivables)?;
        stop(SettleStep::ComputePlan)?;

        let summary = plan.summary.clone();
        self.store.commit(CommitBatch {
            entries: plan.entries,
            settle_records: plan.record_ids,
            close_epoch: Some(plan.summary),
            once_key: None,
            interrupt_after,
        })?;
        info!(
            epoch = summary.epoch_id,
            records = summary.records,
            usage = summary.total_usage,
            fee = summary.total_fee,
            rewards = summary.total_rewards,
            "epoch settled"
        );
        Ok(SettleOutcome::Settled(summary))
    }

    /// Records earnings paid out of the ledger (provider → funding, one entry per wallet),
    /// at most once per `reference` (e.g. `solana:<epoch>:<batch>`): recording the same
    /// reference again posts nothing and returns false. The amounts may exceed a
    /// provider's balance only if the ledger was edited behind the payer's back; that is
    /// refused, so a payout can never make earnings negative.
    pub fn record_payout(
        &mut self,
        epoch_id: u64,
        reference: &str,
        payouts: &[(String, MicroUsd)],
    ) -> SettlementResult<bool> {
        check_name(reference, "payout reference is empty")?;
        let once_key = format!("payout:{reference}");
        if self.store.is_applied(&once_key)? {
            return Ok(false);
        }
        let mut entries = Vec::with_capacity(payouts.len());
        for (wallet, amount) in payouts.iter().filter(|(_, amount)| *amount > 0) {
            check_name(wallet, "provider wallet is empty")?;
            let account = Account::provider(wallet.as_str());
            let balance = self.store.balance(&account)?;
            if balance < *amount as i64 {
                return Err(SettlementError::InvalidAmount {
                    what: format!("payout {reference} to {account} (balance {balance})"),
                    value: amount.to_string(),
                });
            }
            entries.push(LedgerEntry::new(Some(epoch_id), EntryKind::Payout, account, Account::Funding, *amount));
        }
        let batch = CommitBatch { entries, once_key: Some(once_key), ..CommitBatch::default() };
        match self.commit(batch) {
            Ok(()) => {
                info!(epoch = epoch_id, reference, providers = payouts.len(), "payout recorded in the ledger");
                Ok(true)
            }
            Err(SettlementError::AlreadyApplied(_)) => Ok(false),
            Err(err) => Err(err),
        }
    }

    fn commit(&mut self, mut batch: CommitBatch) -> SettlementResult<()> {
        batch.interrupt_after = self.interrupt_after.take();
        self.store.commit(batch)
    }
}

/// A cheap clonable reference to a ledger shared between the metering path (as a
/// [`MeterSink`]) and whoever settles and queries it.
pub struct LedgerHandle<S: LedgerStore> {
    ledger: Arc<Mutex<Ledger<S>>>,
}

impl<S: LedgerStore> Clone for LedgerHandle<S> {
    fn clone(&self) -> Self {
        LedgerHandle { ledger: Arc::clone(&self.ledger) }
    }
}

impl<S: LedgerStore> LedgerHandle<S> {
    pub fn new(ledger: Ledger<S>) -> Self {
        LedgerHandle { ledger: Arc::new(Mutex::new(ledger)) }
    }

    /// Locks the ledger. Every ledger operation leaves the store consistent even if it
    /// panics half-way (commits are atomic), so a poisoned lock is simply taken over.
    pub fn lock(&self) -> MutexGuard<'_, Ledger<S>> {
        self.ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<S: LedgerStore> MeterSink for LedgerHandle<S> {
    fn record(&self, record: &UsageRecord) -> SettlementResult<()> {
        self.lock().accept_records(std::slice::from_ref(record))?;
        Ok(())
    }

    fn record_batch(&self, records: &[UsageRecord]) -> SettlementResult<()> {
        self.lock().accept_records(records)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
