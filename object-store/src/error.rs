//! The object store's one error type. Messages are lowercase and name the object (short
//! hex id) and the sizes involved; [`From<ObjectStoreError> for IonetError`] is the only
//! mapping to the shared error (and from there to gRPC codes).

use std::io;
use std::path::Path;
use std::sync::Arc;

use ionet_common::{IonetError, ObjectId};
use thiserror::Error;

pub type ObjectStoreResult<T> = Result<T, ObjectStoreError>;

/// Cloneable so that every caller of a merged pull receives the same error.
#[derive(Debug, Clone, Error)]
pub enum ObjectStoreError {
    #[error("object {} is not in the store", .id.short())]
    NotFound { id: ObjectId },

    #[error("object {} already exists in the store", .id.short())]
    AlreadyExists { id: ObjectId },

    /// The object exists but is still being written; it is not readable until sealed.
    #[error("object {} is not sealed yet", .id.short())]
    NotSealed { id: ObjectId },

    /// Retryable once objects are unpinned or deleted.
    #[error(
        "object store full: object {} needs {size} bytes, {used} of {capacity} bytes are in \
         memory and {pinned} of them are pinned or being written (nothing left to spill)",
        .id.short()
    )]
    ObjectStoreFull { id: ObjectId, size: u64, used: u64, pinned: u64, capacity: u64 },

    /// Final: no amount of spilling makes room.
    #[error(
        "object {} of {size} bytes is larger than the store's whole capacity of {capacity} bytes",
        .id.short()
    )]
    ObjectTooLarge { id: ObjectId, size: u64, capacity: u64 },

    #[error("object {}: expected {expected} bytes, found {actual}", .id.short())]
    SizeMismatch { id: ObjectId, expected: u64, actual: u64 },

    #[error("object {} is not pinned", .id.short())]
    NotPinned { id: ObjectId },

    /// The peer answered the pull with an error status (not found, unauthenticated, …)
    /// or could not be reached.
    #[error("pull of object {} from {address} failed: {code:?}: {message}", .id.short())]
    PullFailed { id: ObjectId, address: String, code: tonic::Code, message: String },

    /// The stream broke off or broke the protocol; the partial object was discarded and a
    /// retry may succeed.
    #[error("pull of object {} from {address} broke off: {reason}", .id.short())]
    TransferBroken { id: ObjectId, address: String, reason: String },

    #[error("object {} is not an arrow record batch: {reason}", .id.short())]
    Arrow { id: ObjectId, reason: String },

    #[error("invalid object id: {0}")]
    InvalidId(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: Arc<io::Error>,
    },
}

impl ObjectStoreError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ObjectStoreError::Io { context: context.into(), source: Arc::new(source) }
    }

    /// An i/o error about a file, naming it.
    pub(crate) fn io_at(action: &str, path: &Path, source: io::Error) -> Self {
        Self::io(format!("cannot {action} {}", path.display()), source)
    }

    /// Whether the same request may succeed later without changing it.
    pub fn is_retryable(&self) -> bool {
        match self {
            ObjectStoreError::ObjectStoreFull { .. } | ObjectStoreError::TransferBroken { .. } => true,
            ObjectStoreError::PullFailed { code, .. } => {
                matches!(code, tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled)
            }
            _ => false,
        }
    }
}

impl From<ObjectStoreError> for IonetError {
    fn from(error: ObjectStoreError) -> IonetError {
        let message = error.to_string();
        match error {
            ObjectStoreError::NotFound { .. } => IonetError::NotFound(message),
            ObjectStoreError::AlreadyExists { .. } => IonetError::AlreadyExists(message),
            ObjectStoreError::NotSealed { .. } | ObjectStoreError::NotPinned { .. } => {
                IonetError::FailedPrecondition(message)
            }
            ObjectStoreError::ObjectStoreFull { .. } => IonetError::ResourceExhausted(message),
            ObjectStoreError::ObjectTooLarge { .. }
            | ObjectStoreError::SizeMismatch { .. }
            | ObjectStoreError::Arrow { .. }
            | ObjectStoreError::InvalidId(_) => IonetError::InvalidArgument(message),
            ObjectStoreError::PullFailed { code, .. } => IonetError::from(tonic::Status::new(code, message)),
            ObjectStoreError::TransferBroken { .. } => IonetError::Unavailable(message),
            ObjectStoreError::Io { source, .. } => IonetError::Io(io::Error::new(source.kind(), message)),
        }
    }
}

impl From<ObjectStoreError> for tonic::Status {
    fn from(error: ObjectStoreError) -> tonic::Status {
        IonetError::from(error).into()
    }
}
