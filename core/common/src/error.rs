//! The error type every ionet crate converts into at its boundary.
//!
//! Variants are chosen by what a caller does next: retry later (`Unavailable`,
//! `Timeout`), fix the request (`InvalidArgument`, `NotFound`, `AlreadyExists`,
//! `Unauthenticated`, `PermissionDenied`), or give up (`Internal`). The mapping to gRPC status codes
//! and back lives in [`crate::rpc::status`], the one place that knows both.

use thiserror::Error;

pub type IonetResult<T> = Result<T, IonetError>;

#[derive(Debug, Error)]
pub enum IonetError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller is known, and may not do this (the authorization table, or a scope: a
    /// node acting for another node).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The peer could not be reached or went away; retrying later may succeed.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("configuration error: {0}")]
    Config(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("internal error: {0}")]
    Internal(String),
    /// A remote task returned an error or panicked; `message` is the remote one, and
    /// `payload` the failure as the task's language wrote it (a pickled Python
    /// exception; empty for a Rust task), carried apart from the text.
    #[error("task {function} failed on node {node}: {message}")]
    TaskFailed { function: String, node: String, message: String, payload: Vec<u8> },
    /// The worker process running a task died, on every attempt allowed.
    #[error("worker running task {function} crashed ({attempts} attempt(s)): {reason}")]
    WorkerCrashed { function: String, attempts: u32, reason: String },
    /// Every copy of an object is gone and it cannot be made again.
    #[error("object lost: {0}")]
    ObjectLost(String),
    /// The process that owned an object (made or put it) is gone: nobody can say where
    /// its value is or make it again.
    #[error("owner died: {0}")]
    OwnerDied(String),
    /// No node of the cluster could ever satisfy the demand.
    #[error("infeasible: {0}")]
    Infeasible(String),
    /// The actor a call was made on is dead (or died while the call ran and the call has
    /// no retries left): carries the actor and the cause of death.
    #[error("actor died: {0}")]
    ActorDied(String),
    /// The caller cancelled the task before its value was produced.
    #[error("task cancelled: {0}")]
    Cancelled(String),
}

impl IonetError {
    /// The variant's name: what travels in a status's details (see [`crate::rpc::status`]).
    pub fn kind(&self) -> &'static str {
        match self {
            IonetError::InvalidArgument(_) => "InvalidArgument",
            IonetError::NotFound(_) => "NotFound",
            IonetError::AlreadyExists(_) => "AlreadyExists",
            IonetError::Unauthenticated(_) => "Unauthenticated",
            IonetError::PermissionDenied(_) => "PermissionDenied",
            IonetError::FailedPrecondition(_) => "FailedPrecondition",
            IonetError::ResourceExhausted(_) => "ResourceExhausted",
            IonetError::Unavailable(_) => "Unavailable",
            IonetError::Timeout(_) => "Timeout",
            IonetError::Config(_) => "Config",
            IonetError::Io(_) => "Io",
            IonetError::Internal(_) => "Internal",
            IonetError::TaskFailed { .. } => "TaskFailed",
            IonetError::WorkerCrashed { .. } => "WorkerCrashed",
            IonetError::ObjectLost(_) => "ObjectLost",
            IonetError::OwnerDied(_) => "OwnerDied",
            IonetError::Infeasible(_) => "Infeasible",
            IonetError::ActorDied(_) => "ActorDied",
            IonetError::Cancelled(_) => "Cancelled",
        }
    }

    /// Whether the same request may succeed if sent again later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, IonetError::Unavailable(_) | IonetError::Timeout(_))
    }
}
