use ionet::IonetError;
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
}

impl From<GcsError> for tonic::Status {
    fn from(error: GcsError) -> tonic::Status {
        match error {
            GcsError::Ionet(inner) => inner.into(),
            other => IonetError::Internal(other.to_string()).into(),
        }
    }
}

impl From<GcsError> for IonetError {
    fn from(error: GcsError) -> IonetError {
        match error {
            GcsError::Ionet(inner) => inner,
            other => IonetError::Internal(other.to_string()),
        }
    }
}
