//! The one error type of the settlement crate.

use thiserror::Error;

use crate::ledger::SettleStep;

pub type SettlementResult<T> = Result<T, SettlementError>;

#[derive(Debug, Error)]
pub enum SettlementError {
    /// A usage record that can never be settled as sent (fix the producer).
    #[error("usage record {record_id} is invalid: {reason}")]
    InvalidRecord { record_id: String, reason: String },
    /// Another record already holds this id with different contents.
    #[error("usage record {0} conflicts with a pending record of the same id")]
    ConflictingRecord(String),
    #[error("fee of {0} basis points is out of range (at most 10000)")]
    InvalidFeeBps(u32),
    #[error("invalid amount for {what}: {value}")]
    InvalidAmount { what: String, value: String },
    #[error("account name {0:?} is invalid: {1}")]
    InvalidAccount(String, &'static str),
    /// Epochs close in order; an older epoch cannot be settled after a newer one.
    #[error(
        "epoch {epoch} (end {end_ms} ms) is out of order: epoch {last_epoch} (end {last_end_ms} ms) is already settled"
    )]
    EpochOutOfOrder { epoch: u64, end_ms: u64, last_epoch: u64, last_end_ms: u64 },
    /// Raised by a store's commit when the epoch was closed by someone else in between.
    #[error("epoch {0} is already settled")]
    EpochAlreadySettled(u64),
    /// Raised by a store's commit when a commit with the same once-only key was made.
    #[error("{0} is already recorded")]
    AlreadyApplied(String),
    /// Raised by a store's commit when a record to settle is no longer pending.
    #[error("usage record {0} is not pending (already settled or never accepted)")]
    RecordNotPending(String),
    #[error("arithmetic overflow computing {0}")]
    Overflow(String),
    /// The test seam stopped a settlement after this step; running it again completes it.
    #[error("settlement interrupted after step {0:?}")]
    Interrupted(SettleStep),
    /// Boxed: redb's error is large and would bloat every `SettlementResult`.
    #[error("ledger database error: {0}")]
    Database(Box<redb::Error>),
    #[error("ledger codec error: {0}")]
    Codec(String),
    #[error("json error: {0}")]
    Json(#[from] serde_json::Error),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The payout configuration cannot pay this epoch as asked (bad rate, mint,
    /// keypair, or an epoch planned under another configuration). Final until fixed.
    #[error("payout configuration error: {0}")]
    PayoutConfig(String),
    /// A call to the chain (RPC) failed; nothing is known to have changed.
    #[error("chain call {operation} failed: {message}")]
    Chain { operation: &'static str, message: String },
    /// A payout transaction was sent (and stored) but is not confirmed yet; running the
    /// payout again checks its status first and never pays twice.
    #[error("epoch {epoch} payout batch {batch}: transaction {signature} is not confirmed yet")]
    PayoutUnconfirmed { epoch: u64, batch: u32, signature: String },
    /// A payout transaction landed with an error: it moved nothing (transactions are
    /// atomic). Running the payout again signs a fresh one, once the cause is fixed.
    #[error("epoch {epoch} payout batch {batch}: transaction {signature} failed on chain: {error}")]
    PayoutFailed { epoch: u64, batch: u32, signature: String, error: String },
    /// The paying account holds less than the next batch needs; nothing was signed.
    #[error("payout account {account} holds {available} base units, batch {batch} of epoch {epoch} needs {needed}")]
    PayoutFundsShort { epoch: u64, batch: u32, account: String, available: u64, needed: u64 },
}

impl SettlementError {
    /// Whether the same call may succeed if made again (settlement and payouts are
    /// idempotent, so retrying an interrupted or failed call is always safe).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SettlementError::Interrupted(_)
                | SettlementError::Database(_)
                | SettlementError::Io(_)
                | SettlementError::Chain { .. }
                | SettlementError::PayoutUnconfirmed { .. }
        )
    }
}

macro_rules! database_error_from {
    ($($ty:ty),*) => {
        $(impl From<$ty> for SettlementError {
            fn from(err: $ty) -> Self {
                SettlementError::Database(Box::new(err.into()))
            }
        })*
    };
}

database_error_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<bincode::error::EncodeError> for SettlementError {
    fn from(err: bincode::error::EncodeError) -> Self {
        SettlementError::Codec(err.to_string())
    }
}

impl From<bincode::error::DecodeError> for SettlementError {
    fn from(err: bincode::error::DecodeError) -> Self {
        SettlementError::Codec(err.to_string())
    }
}
