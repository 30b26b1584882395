//! The metering book: leases still open, the usage records made from them, and the ids
//! those records carry. Pure bookkeeping, no I/O: `Metering` holds a `Book` under a std
//! mutex and writes the `Changes` each step produces to storage and the sinks.
//!
//! Invariants:
//! - A lease is in `Book::open` or in `Book::ended`, never both; `ended` points at the
//!   lease's last record in `Book::records`.
//! - A record's id is `record_id(lease, segment)`, so a stored record maps back to the
//!   same id whatever process reloads it, and two segments of one lease never collide.
//! - A record never ends before it starts (`OpenLease::record_until` clamps).

use std::collections::HashMap;

use ionet_common::resources::MicroUsd;
use ionet_common::rpc::proto::common::{NodeInfo, ResourceQuantities};
use ionet_common::rpc::proto::metering as proto;
use ionet_common::{IonetError, JobId, LeaseId, NodeId, ResourceSet};
use ionet_settlement::{RecordId, UsageRecord};

use crate::error::{GcsError, GcsResult};

/// Mixes a segment number into a lease id (an odd 128-bit constant: distinct segments of
/// one lease never share an id).
const SEGMENT_MIX: u128 = 0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835;

/// The record id of segment `segment` of `lease`: the lease id itself for the first
/// (usually only) piece, a mix of both for later pieces of a lease cut at epoch ends.
pub fn record_id(lease: &LeaseId, segment: u32) -> RecordId {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(lease.as_bytes());
    let base = u128::from_be_bytes(bytes);
    if segment == 0 {
        RecordId(base)
    } else {
        RecordId(base ^ (segment as u128).wrapping_mul(SEGMENT_MIX))
    }
}

/// A lease still running, with everything its record needs.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct OpenLease {
    pub(super) lease_id: LeaseId,
    pub(super) job_id: JobId,
    pub(super) payer_account: String,
    pub(super) node_id: NodeId,
    pub(super) provider_wallet: String,
    pub(super) resources: ResourceSet,
    /// Start of the current segment.
    pub(super) start_ms: u64,
    pub(super) price_per_gpu_hour: MicroUsd,
    pub(super) price_per_cpu_hour: MicroUsd,
    pub(super) segment: u32,
}

impl OpenLease {
    /// The record of the current segment, ending at `end_ms` (never before its start).
    pub(super) fn record_until(&self, end_ms: u64) -> Made {
        Made {
            lease_id: self.lease_id,
            segment: self.segment,
            record: UsageRecord {
                record_id: record_id(&self.lease_id, self.segment),
                job_id: self.job_id,
                payer_account: self.payer_account.clone(),
                node_id: self.node_id,
                provider_wallet: self.provider_wallet.clone(),
                resources: self.resources.clone(),
                start_ms: self.start_ms,
                end_ms: end_ms.max(self.start_ms),
                price_per_gpu_hour: self.price_per_gpu_hour,
                price_per_cpu_hour: self.price_per_cpu_hour,
            },
        }
    }

    pub(super) fn to_proto(&self) -> proto::UsageRecord {
        let made = self.record_until(self.start_ms);
        proto::UsageRecord { open: true, end_ms: 0, ..made.to_proto(None) }
    }

    pub(super) fn from_proto(stored: &proto::UsageRecord) -> GcsResult<Self> {
        let made = Made::from_proto(stored)?;
        Ok(OpenLease {
            lease_id: made.lease_id,
            job_id: made.record.job_id,
            payer_account: made.record.payer_account,
            node_id: made.record.node_id,
            provider_wallet: made.record.provider_wallet,
            resources: made.record.resources,
            start_ms: made.record.start_ms,
            price_per_gpu_hour: made.record.price_per_gpu_hour,
            price_per_cpu_hour: made.record.price_per_cpu_hour,
            segment: made.segment,
        })
    }
}

/// A usage record this control store made, with the lease it came from.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Made {
    pub(super) lease_id: LeaseId,
    pub(super) segment: u32,
    pub(super) record: UsageRecord,
}

impl Made {
    pub(super) fn to_proto(&self, settled_epoch: Option<u64>) -> proto::UsageRecord {
        let record = &self.record;
        proto::UsageRecord {
            record_id: record.record_id.to_string(),
            lease_id: self.lease_id.to_vec(),
            job_id: record.job_id.to_vec(),
            payer_account: record.payer_account.clone(),
            node_id: record.node_id.to_vec(),
            provider_wallet: record.provider_wallet.clone(),
            resources: Some(ResourceQuantities::from_set(&record.resources)),
            start_ms: record.start_ms,
            end_ms: record.end_ms,
            price_per_gpu_hour_micros: record.price_per_gpu_hour,
            price_per_cpu_hour_micros: record.price_per_cpu_hour,
            cost_micros: record.cost_micro_usd().unwrap_or(u64::MAX),
            open: false,
            settled: settled_epoch.is_some(),
            settled_epoch: settled_epoch.unwrap_or(0),
            segment: self.segment,
        }
    }

    pub(super) fn from_proto(stored: &proto::UsageRecord) -> GcsResult<Self> {
        let lease_id = LeaseId::from_bytes(&stored.lease_id)?;
        Ok(Made {
            lease_id,
            segment: stored.segment,
            record: UsageRecord {
                record_id: record_id(&lease_id, stored.segment),
                job_id: JobId::from_bytes(&stored.job_id)?,
                payer_account: stored.payer_account.clone(),
                node_id: NodeId::from_bytes(&stored.node_id)?,
                provider_wallet: stored.provider_wallet.clone(),
                resources: stored.resources.clone().unwrap_or_default().to_set()?,
                start_ms: stored.start_ms,
                end_ms: stored.end_ms,
                price_per_gpu_hour: stored.price_per_gpu_hour_micros,
                price_per_cpu_hour: stored.price_per_cpu_hour_micros,
            },
        })
    }

    pub(super) fn storage_key(&self) -> Vec<u8> {
        self.record.record_id.0.to_be_bytes().to_vec()
    }
}

/// Leases and records in memory. Guarded by a std mutex never held across an await.
#[derive(Default)]
pub(super) struct Book {
    pub(super) open: HashMap<LeaseId, OpenLease>,
    /// Every record made, in the order made.
    pub(super) records: Vec<Made>,
    /// Lease → index in `records` of its last record, for leases that ended.
    pub(super) ended: HashMap<LeaseId, usize>,
}

impl Book {
    pub(super) fn push(&mut self, made: Made, lease_ended: bool) {
        if lease_ended {
            self.ended.insert(made.lease_id, self.records.len());
        }
        self.records.push(made);
    }
}

/// What the storage and sinks must learn after a change of the book.
#[derive(Default)]
pub(super) struct Changes {
    pub(super) records: Vec<Made>,
    pub(super) put_leases: Vec<OpenLease>,
    pub(super) delete_leases: Vec<LeaseId>,
}

pub(super) fn invalid(message: String) -> GcsError {
    GcsError::Ionet(IonetError::InvalidArgument(message))
}

pub(super) fn not_found(message: String) -> GcsError {
    GcsError::Ionet(IonetError::NotFound(message))
}

pub(super) fn wallet_of(node: &NodeInfo, node_id: &NodeId) -> String {
    if node.wallet.trim().is_empty() {
        format!("node-{node_id}")
    } else {
        node.wallet.clone()
    }
}
