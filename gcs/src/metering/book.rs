//! The metering book: leases still open, the usage records made from them, and the ids
//! those records carry. Pure bookkeeping, no I/O: `Metering` holds a `Book` under a std
//! mutex and writes the `Changes` each step produces to storage and the sinks.
//!
//! Invariants:
//! - A lease is in `Book::open` or in `Book::ended`, never both; `ended` points at the
//!   lease's last record in `Book::records`.
//! - A record's id is `record_id(lease, segment)`, so a stored record maps back to the
//!   same id whatever process reloads it, and two segments of one lease never collide.
//! - A record never ends before it starts (`Lease::record_until` clamps), and starts only
//!   once both sides said the lease started (`two_party`).

use std::collections::HashMap;

use ionet_common::resources::MicroUsd;
use ionet_common::rpc::proto::common::{NodeInfo, ResourceQuantities};
use ionet_common::rpc::proto::metering as proto;
use ionet_common::{IonetError, JobId, LeaseId, NodeId, ResourceSet};
use ionet_settlement::{RecordId, UsageRecord};

use super::STOP_GRACE_MS;
use crate::error::{GcsError, GcsResult};
use ionet_settlement::two_party::Sides;

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

/// What the node said of a lease when it reported the grant, with what the control store
/// joined to it then (a price changed later does not reprice a running lease).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct NodeSide {
    pub(super) payer_account: String,
    pub(super) provider_wallet: String,
    pub(super) resources: ResourceSet,
    pub(super) price_per_gpu_hour: MicroUsd,
    pub(super) price_per_cpu_hour: MicroUsd,
    /// A committed bundle's `(group, index)`: the head is its holder.
    pub(super) bundle: Option<(Vec<u8>, u32)>,
}

/// A lease not yet over, as far as either side has spoken of it.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Lease {
    pub(super) lease_id: LeaseId,
    pub(super) job_id: JobId,
    pub(super) node_id: NodeId,
    /// `None` until the node reports the grant.
    pub(super) node: Option<NodeSide>,
    pub(super) sides: Sides,
    /// Start of the current segment once cut at an epoch end.
    pub(super) segment_start: Option<u64>,
    pub(super) segment: u32,
    /// When either side last spoke of it (for dropping words that never found a match).
    pub(super) last_word_ms: u64,
    /// The head is its holder (an actor's lease, a committed bundle).
    pub(super) held_by_head: bool,
    /// What the holder said it asked for, when it said.
    pub(super) holder_resources: Option<ResourceSet>,
}

impl Lease {
    pub(super) fn new(lease_id: LeaseId, job_id: JobId, node_id: NodeId, now_ms: u64) -> Self {
        Lease {
            lease_id,
            job_id,
            node_id,
            node: None,
            sides: Sides::default(),
            segment_start: None,
            segment: 0,
            last_word_ms: now_ms,
            held_by_head: false,
            holder_resources: None,
        }
    }

    /// Whether a record runs: both sides said it started, nobody ended it.
    pub(super) fn is_running(&self) -> bool {
        self.node.is_some() && self.sides.start().is_some() && !self.sides.is_over()
    }

    /// Where the current segment's record starts.
    pub(super) fn segment_start(&self) -> Option<u64> {
        self.segment_start.or(self.sides.start())
    }

    /// What the lease bills: what the node reported, capped resource by resource at what
    /// the holder said it asked for (when it said).
    pub(super) fn billed_resources(&self) -> Option<ResourceSet> {
        let node = self.node.as_ref()?;
        let Some(asked) = &self.holder_resources else {
            return Some(node.resources.clone());
        };
        let mut billed = ResourceSet::new();
        for (name, quantity) in node.resources.iter() {
            let capped = quantity.min(asked.get(name));
            if !capped.is_zero() {
                billed.set(name.to_string(), capped);
            }
        }
        Some(billed)
    }

    /// What the lease costs per hour as billed, micro-USD.
    pub(super) fn hourly_cost(&self) -> u64 {
        self.record_until_from(0, 3_600_000, "")
            .map(|made| made.record.cost_micro_usd().unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    /// The record of the current segment from its start to `end_ms` (never before its
    /// start), closed by `ended_by`; `None` without both starts or the node's side.
    pub(super) fn record_until(&self, end_ms: u64, ended_by: &str) -> Option<Made> {
        self.record_until_from(self.segment_start()?, end_ms, ended_by)
    }

    fn record_until_from(&self, start_ms: u64, end_ms: u64, ended_by: &str) -> Option<Made> {
        let node = self.node.as_ref()?;
        Some(Made {
            lease_id: self.lease_id,
            segment: self.segment,
            sides: self.sides,
            ended_by: ended_by.to_string(),
            record: UsageRecord {
                record_id: record_id(&self.lease_id, self.segment),
                job_id: self.job_id,
                payer_account: node.payer_account.clone(),
                node_id: self.node_id,
                provider_wallet: node.provider_wallet.clone(),
                resources: self.billed_resources()?,
                start_ms,
                end_ms: end_ms.max(start_ms),
                price_per_gpu_hour: node.price_per_gpu_hour,
                price_per_cpu_hour: node.price_per_cpu_hour,
            },
        })
    }

    /// The stored (and listed) form: an open usage record.
    pub(super) fn to_proto(&self, now_ms: u64) -> proto::UsageRecord {
        let node = self.node.clone().unwrap_or(NodeSide {
            payer_account: String::new(),
            provider_wallet: String::new(),
            resources: ResourceSet::new(),
            price_per_gpu_hour: 0,
            price_per_cpu_hour: 0,
            bundle: None,
        });
        let start_ms = self.segment_start().unwrap_or(0);
        let cost = self.record_until(now_ms, "").map(|made| made.record.cost_micro_usd().unwrap_or(u64::MAX));
        let (group, index) = node.bundle.clone().unwrap_or_default();
        proto::UsageRecord {
            record_id: record_id(&self.lease_id, self.segment).to_string(),
            lease_id: self.lease_id.to_vec(),
            job_id: self.job_id.to_vec(),
            payer_account: node.payer_account,
            node_id: self.node_id.to_vec(),
            provider_wallet: node.provider_wallet,
            resources: Some(ResourceQuantities::from_set(&node.resources)),
            start_ms,
            end_ms: 0,
            price_per_gpu_hour_micros: node.price_per_gpu_hour,
            price_per_cpu_hour_micros: node.price_per_cpu_hour,
            cost_micros: cost.unwrap_or(0),
            open: true,
            settled: false,
            settled_epoch: 0,
            segment: self.segment,
            node_started_ms: self.sides.node_started.unwrap_or(0),
            holder_started_ms: self.sides.holder_started.unwrap_or(0),
            node_ended_ms: self.sides.node_ended.unwrap_or(0),
            holder_ended_ms: self.sides.holder_ended.unwrap_or(0),
            ended_by: String::new(),
            placement_group_id: group,
            bundle_index: index,
            last_word_ms: self.last_word_ms,
            held_by_head: self.held_by_head,
            holder_resources: self.holder_resources.as_ref().map(ResourceQuantities::from_set),
        }
    }

    pub(super) fn from_proto(stored: &proto::UsageRecord) -> GcsResult<Self> {
        let said = |ms: u64| (ms != 0).then_some(ms);
        // Stored before leases had two sides: the node's word was the whole of it.
        let legacy = stored.node_started_ms == 0 && stored.holder_started_ms == 0 && stored.start_ms != 0;
        if legacy {
            let upgraded = proto::UsageRecord {
                node_started_ms: stored.start_ms,
                holder_started_ms: stored.start_ms,
                last_word_ms: stored.start_ms,
                segment: stored.segment,
                ..stored.clone()
            };
            return Self::from_proto(&upgraded);
        }
        let node = said(stored.node_started_ms).map(|_| -> GcsResult<NodeSide> {
            Ok(NodeSide {
                payer_account: stored.payer_account.clone(),
                provider_wallet: stored.provider_wallet.clone(),
                resources: stored.resources.clone().unwrap_or_default().to_set()?,
                price_per_gpu_hour: stored.price_per_gpu_hour_micros,
                price_per_cpu_hour: stored.price_per_cpu_hour_micros,
                bundle: (!stored.placement_group_id.is_empty())
                    .then(|| (stored.placement_group_id.clone(), stored.bundle_index)),
            })
        });
        Ok(Lease {
            lease_id: LeaseId::from_bytes(&stored.lease_id)?,
            job_id: JobId::from_bytes(&stored.job_id)?,
            node_id: NodeId::from_bytes(&stored.node_id)?,
            node: node.transpose()?,
            sides: sides_of(stored),
            segment_start: (stored.segment > 0).then_some(stored.start_ms),
            segment: stored.segment,
            last_word_ms: stored.last_word_ms,
            held_by_head: stored.held_by_head,
            holder_resources: stored.holder_resources.clone().map(|asked| asked.to_set()).transpose()?,
        })
    }
}

/// The two sides' words as stored (0: not said).
fn sides_of(stored: &proto::UsageRecord) -> Sides {
    let said = |ms: u64| (ms != 0).then_some(ms);
    Sides {
        node_started: said(stored.node_started_ms),
        holder_started: said(stored.holder_started_ms),
        node_ended: said(stored.node_ended_ms),
        holder_ended: said(stored.holder_ended_ms),
        forced_end: None,
    }
}

/// A usage record this control store made, with the lease it came from.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Made {
    pub(super) lease_id: LeaseId,
    pub(super) segment: u32,
    /// What both sides had said when the record was made.
    pub(super) sides: Sides,
    /// [`EndedBy::as_str`], or "epoch" for a piece cut at an epoch's end.
    pub(super) ended_by: String,
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
            node_started_ms: self.sides.node_started.unwrap_or(0),
            holder_started_ms: self.sides.holder_started.unwrap_or(0),
            node_ended_ms: self.sides.node_ended.unwrap_or(0),
            holder_ended_ms: self.sides.holder_ended.unwrap_or(0),
            ended_by: self.ended_by.clone(),
            placement_group_id: Vec::new(),
            bundle_index: 0,
            last_word_ms: 0,
            held_by_head: false,
            holder_resources: None,
        }
    }

    pub(super) fn from_proto(stored: &proto::UsageRecord) -> GcsResult<Self> {
        let lease_id = LeaseId::from_bytes(&stored.lease_id)?;
        Ok(Made {
            lease_id,
            segment: stored.segment,
            sides: sides_of(stored),
            ended_by: stored.ended_by.clone(),
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
    /// Leases either side has spoken of that are not over with a record yet: running
    /// ones, ones waiting for the other side's word, and ones over before both spoke
    /// (kept a while, so a late word from the other side finds them).
    pub(super) open: HashMap<LeaseId, Lease>,
    /// Every record made, in the order made.
    pub(super) records: Vec<Made>,
    /// Lease → index in `records` of its last record, for leases that ended.
    pub(super) ended: HashMap<LeaseId, usize>,
    /// Leases a node must be told to end, and from when (after a grace, so the node's own
    /// end, usually on its way, makes the call unneeded).
    pub(super) stop_due: HashMap<LeaseId, (NodeId, u64)>,
    /// Per payer, what its records not settled yet will charge it (cost and fee),
    /// micro-USD: what its balance must cover before any new lease.
    pub(super) owed: HashMap<String, u64>,
    /// Per job, how many node grants its holders never confirmed (dropped after the
    /// confirmation window): past a few, the job gets no more leases.
    pub(super) unconfirmed: HashMap<JobId, u32>,
}

impl Book {
    /// After a word about `lease_id` arrived at `now`: closes its record when both sides
    /// started it and anyone ended it, schedules telling the node when the lease is over
    /// but the node still runs it, and otherwise keeps the lease (to storage).
    pub(super) fn after_word(&mut self, lease_id: LeaseId, now: u64, changes: &mut Changes) {
        let Some(lease) = self.open.get(&lease_id) else {
            return;
        };
        let closed = match lease.sides.billed_span() {
            Some((_, end, by)) => lease.record_until(end, by.as_str()),
            None => None,
        };
        if lease.sides.node_must_stop() {
            self.stop_due.entry(lease_id).or_insert((lease.node_id, now + STOP_GRACE_MS));
        }
        match closed {
            Some(made) => {
                self.open.remove(&lease_id);
                self.push(made.clone(), true);
                changes.records.push(made);
                changes.delete_leases.push(lease_id);
            }
            None => changes.put_leases.push(lease.clone()),
        }
    }

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
    pub(super) put_leases: Vec<Lease>,
    pub(super) delete_leases: Vec<LeaseId>,
}

impl Changes {
    /// Adds `later`'s changes after these (a lease put then deleted ends deleted).
    pub(super) fn extend(&mut self, later: Changes) {
        self.records.extend(later.records);
        self.put_leases.extend(later.put_leases);
        self.delete_leases.extend(later.delete_leases);
    }
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
