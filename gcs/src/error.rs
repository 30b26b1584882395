use ionet_common::IonetError;
use ionet_settlement::SettlementError;
use thiserror::Error;

pub type GcsResult<T> = Result<T, GcsError>;

#[derive(Debug, Error)]
pub enum GcsError {
    #[error("storage failed: {0}")]
    Storage(String),
    #[error("stored record {what} is corrupt: {why}")]
    Corrupt { what: String, why: String },
    #[error(transparent)]
    Ionet(#[from] IonetError),
    /// The ledger refused or failed an operation.
    #[error("ledger: {0}")]
    Settlement(#[from] SettlementError),
}

/// How a ledger error reads to a caller: bad input, a state that forbids the call, or a
/// failure worth retrying.
fn settlement_to_ionet(error: SettlementError) -> IonetError {
    let message = error.to_string();
    match error {
        SettlementError::InvalidRecord { .. }
        | SettlementError::ConflictingRecord(_)
        | SettlementError::InvalidFeeBps(_)
        | SettlementError::InvalidAmount { .. }
        | SettlementError::InvalidAccount(..) => IonetError::InvalidArgument(message),
        SettlementError::EpochOutOfOrder { .. }
        | SettlementError::EpochAlreadySettled(_)
        | SettlementError::AlreadyApplied(_)
        | SettlementError::RecordNotPending(_) => IonetError::FailedPrecondition(message),
        SettlementError::Interrupted(_) => IonetError::Unavailable(message),
        // Storage, codec and payout failures: retryable ones say so.
        other if other.is_retryable() => IonetError::Unavailable(message),
        _ => IonetError::Internal(message),
    }
}

impl From<GcsError> for tonic::Status {
    fn from(error: GcsError) -> tonic::Status {
        match error {
            GcsError::Ionet(inner) => inner.into(),
            GcsError::Settlement(inner) => settlement_to_ionet(inner).into(),
            other => IonetError::Internal(other.to_string()).into(),
        }
    }
}

impl From<GcsError> for IonetError {
    fn from(error: GcsError) -> IonetError {
        match error {
            GcsError::Ionet(inner) => inner,
            GcsError::Settlement(inner) => settlement_to_ionet(inner),
            other => IonetError::Internal(other.to_string()),
        }
    }
}
