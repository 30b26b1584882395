//! Errors for input the scheduler refuses: a malformed label selector, a node update that
//! contradicts itself, a release of something never allocated. "No node has room" and "no
//! node can ever fit" are not errors: they are [`crate::Decision`]s.

use ionet_common::NodeId;
use thiserror::Error;

pub type SchedulerResult<T> = Result<T, SchedulerError>;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SchedulerError {
    /// A label selector string that does not parse.
    #[error("invalid label selector {selector:?}: {reason}")]
    InvalidLabelSelector { selector: String, reason: String },
    /// The node is not in the cluster view.
    #[error("node {0} is not in the cluster view")]
    UnknownNode(NodeId),
    /// A node whose available resources exceed its total, or similar nonsense.
    #[error("invalid node {node}: {reason}")]
    InvalidNode { node: NodeId, reason: String },
    /// Taking or returning resources that the node does not have (or never lent).
    #[error("node {node}: {reason}")]
    Accounting { node: NodeId, reason: String },
    /// A GPU demand the allocator cannot express (e.g. 1.5 GPUs) or a bad release.
    #[error("gpu allocation: {0}")]
    GpuAllocation(String),
    /// A request that contradicts itself (e.g. bundle and node lists of different lengths).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The list-price table did not parse or holds a bad entry.
    #[error("gpu price table: {0}")]
    PriceTable(String),
}
