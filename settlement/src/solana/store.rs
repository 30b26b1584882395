//! Durable payout state: per epoch, the planned batches and every transaction signed for
//! each, written before the transaction is sent.
//!
//! State of an attempt and when it may change:
//!
//! - `InFlight`: signed and stored; it may have been sent and may land until its
//!   blockhash expires. Only the chain can move it: to `Landed` or `Failed` when its
//!   signature is found, to `Expired` when its blockhash is no longer valid *and then*
//!   its signature is still not found.
//! - `Landed` (final): the payouts of the batch moved, exactly once.
//! - `Failed` (final): it landed with an error, so it moved nothing.
//! - `Expired` (final): it can never land.
//!
//! A batch gets a new attempt only when it has no `InFlight` and no `Landed` one.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::plan::{ProviderPayout, SkippedPayout};
use crate::error::{SettlementError, SettlementResult};

const PAYOUTS: TableDefinition<u64, &[u8]> = TableDefinition::new("solana_payouts");

/// Everything known about one epoch's payout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochPayouts {
    pub epoch_id: u64,
    /// The asset the amounts are in (`PayoutAsset`'s display form).
    pub asset: String,
    /// The paying authority (base58).
    pub authority: String,
    pub batches: Vec<PayoutBatch>,
    pub skipped: Vec<SkippedPayout>,
    /// The durable nonce account its transactions advance (base58; empty: signed
    /// against recent blockhashes). An attempt's `blockhash` is then the nonce value.
    pub nonce_account: String,
}

impl EpochPayouts {
    /// Every batch has landed.
    pub fn is_complete(&self) -> bool {
        self.batches.iter().all(|batch| batch.landed().is_some())
    }
}

/// One transaction's worth of payouts. Its payouts never change once planned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayoutBatch {
    /// 1-based, as in the memo.
    pub index: u32,
    pub payouts: Vec<ProviderPayout>,
    /// Every transaction signed for this batch, oldest first.
    pub attempts: Vec<PayoutAttempt>,
}

impl PayoutBatch {
    pub fn landed(&self) -> Option<&PayoutAttempt> {
        self.attempts.iter().find(|attempt| attempt.state == AttemptState::Landed)
    }

    pub fn in_flight(&self) -> Option<&PayoutAttempt> {
        self.attempts.iter().find(|attempt| attempt.state == AttemptState::InFlight)
    }

    pub fn total_amount(&self) -> u64 {
        self.payouts.iter().map(|payout| payout.amount).sum()
    }
}

/// One signed transaction of a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayoutAttempt {
    /// Base58 signature: the transaction's id on chain.
    pub signature: String,
    /// Base58 blockhash the transaction was signed with: it can land only while valid.
    pub blockhash: String,
    /// The signed transaction, as sent.
    pub transaction: Vec<u8>,
    pub state: AttemptState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptState {
    InFlight,
    Landed,
    Failed { error: String },
    Expired,
}

/// Storage of payout state. A write replaces an epoch's record atomically and is durable
/// when it returns: the driver relies on that to store a transaction before sending it.
/// One payer process per store (writes are not compare-and-swap).
pub trait PayoutStore: Send {
    fn epoch_payouts(&self, epoch_id: u64) -> SettlementResult<Option<EpochPayouts>>;

    fn put_epoch_payouts(&mut self, payouts: &EpochPayouts) -> SettlementResult<()>;

    /// Every epoch with payout state, by id.
    fn epochs(&self) -> SettlementResult<Vec<u64>>;
}

impl<S: PayoutStore + ?Sized> PayoutStore for Box<S> {
    fn epoch_payouts(&self, epoch_id: u64) -> SettlementResult<Option<EpochPayouts>> {
        (**self).epoch_payouts(epoch_id)
    }

    fn put_epoch_payouts(&mut self, payouts: &EpochPayouts) -> SettlementResult<()> {
        (**self).put_epoch_payouts(payouts)
    }

    fn epochs(&self) -> SettlementResult<Vec<u64>> {
        (**self).epochs()
    }
}

/// In memory, lost on exit (tests, dry runs).
#[derive(Clone, Debug, Default)]
pub struct MemoryPayoutStore {
    epochs: BTreeMap<u64, EpochPayouts>,
}

impl MemoryPayoutStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl PayoutStore for MemoryPayoutStore {
    fn epoch_payouts(&self, epoch_id: u64) -> SettlementResult<Option<EpochPayouts>> {
        Ok(self.epochs.get(&epoch_id).cloned())
    }

    fn put_epoch_payouts(&mut self, payouts: &EpochPayouts) -> SettlementResult<()> {
        self.epochs.insert(payouts.epoch_id, payouts.clone());
        Ok(())
    }

    fn epochs(&self) -> SettlementResult<Vec<u64>> {
        Ok(self.epochs.keys().copied().collect())
    }
}

/// In a redb file (table `solana_payouts`: epoch id → bincode record); every write is
/// one durable redb transaction.
pub struct RedbPayoutStore {
    database: Database,
}

impl std::fmt::Debug for RedbPayoutStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbPayoutStore").finish_non_exhaustive()
    }
}

impl RedbPayoutStore {
    /// Opens the payout file, creating it if absent. Use a file of its own, not the
    /// ledger's (redb opens a file once per process).
    pub fn open(path: impl AsRef<Path>) -> SettlementResult<Self> {
        let database = Database::create(path)?;
        let transaction = database.begin_write()?;
        transaction.open_table(PAYOUTS)?;
        transaction.commit()?;
        Ok(RedbPayoutStore { database })
    }
}

impl PayoutStore for RedbPayoutStore {
    fn epoch_payouts(&self, epoch_id: u64) -> SettlementResult<Option<EpochPayouts>> {
        let transaction = self.database.begin_read()?;
        let table = transaction.open_table(PAYOUTS)?;
        let Some(bytes) = table.get(epoch_id)? else {
            return Ok(None);
        };
        let record = bincode::serde::decode_from_slice(bytes.value(), bincode::config::standard()).map_err(|err| {
            SettlementError::PayoutConfig(format!(
                "the payout record of epoch {epoch_id} cannot be read ({err}): it was written by an ionet from before \
                 durable-nonce payouts; finish that epoch with that version, or move the payouts file away"
            ))
        })?;
        Ok(Some(record.0))
    }

    fn put_epoch_payouts(&mut self, payouts: &EpochPayouts) -> SettlementResult<()> {
        let bytes = bincode::serde::encode_to_vec(payouts, bincode::config::standard())?;
        let transaction = self.database.begin_write()?;
        {
            let mut table = transaction.open_table(PAYOUTS)?;
            table.insert(payouts.epoch_id, bytes.as_slice())?;
        }
        transaction.commit()?;
        Ok(())
    }

    fn epochs(&self) -> SettlementResult<Vec<u64>> {
        let transaction = self.database.begin_read()?;
        let table = transaction.open_table(PAYOUTS)?;
        let mut epochs = Vec::new();
        for row in table.iter()? {
            epochs.push(row?.0.value());
        }
        Ok(epochs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(epoch_id: u64) -> EpochPayouts {
        EpochPayouts {
            epoch_id,
            asset: "spl-token:x:6-decimals".into(),
            authority: "auth".into(),
            batches: vec![PayoutBatch {
                index: 1,
                payouts: vec![ProviderPayout { wallet: "w".into(), micro_usd: 5, amount: 5 }],
                attempts: vec![PayoutAttempt {
                    signature: "sig".into(),
                    blockhash: "hash".into(),
                    transaction: vec![1, 2, 3],
                    state: AttemptState::InFlight,
                }],
            }],
            skipped: vec![],
            nonce_account: "nonce".into(),
        }
    }

    #[test]
    fn redb_store_round_trips_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("payouts.redb");
        {
            let mut store = RedbPayoutStore::open(&path).unwrap();
            assert_eq!(store.epoch_payouts(3).unwrap(), None);
            store.put_epoch_payouts(&record(3)).unwrap();
            let mut landed = record(3);
            landed.batches[0].attempts[0].state = AttemptState::Landed;
            store.put_epoch_payouts(&landed).unwrap();
            store.put_epoch_payouts(&record(1)).unwrap();
        }
        let store = RedbPayoutStore::open(&path).unwrap();
        let back = store.epoch_payouts(3).unwrap().unwrap();
        assert!(back.is_complete());
        assert_eq!(store.epochs().unwrap(), vec![1, 3]);
        let mut memory = MemoryPayoutStore::new();
        memory.put_epoch_payouts(&back).unwrap();
        assert_eq!(memory.epoch_payouts(3).unwrap(), Some(back));
    }
}
