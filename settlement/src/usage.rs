//! Usage records: what the control plane measured one lease of resources to cost.
//!
//! A record is produced by the control plane (never by the provider) when a lease of
//! resources ends (or at an epoch boundary for a lease still running, cut in two
//! records). Its cost is exact: see [`UsageRecord::cost_numerator`].

use std::fmt;
use std::str::FromStr;

use ionet_common::resources::{MicroUsd, CPU, GPU, SCALE};
use ionet_common::{JobId, NodeId, ResourceSet};
use serde::{Deserialize, Serialize};

use crate::error::{SettlementError, SettlementResult};

/// Milliseconds per hour: prices are per resource-hour, clocks count milliseconds.
pub const MS_PER_HOUR: u128 = 3_600_000;

/// Divides a cost numerator to micro-USD: `Quantity` units per whole resource × ms per hour.
pub const COST_DENOMINATOR: u128 = SCALE as u128 * MS_PER_HOUR;

/// Unique id of a usage record (the control plane derives it from the lease, so a record
/// re-delivered after a crash carries the same id and is accepted once).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId(pub u128);

impl RecordId {
    pub fn random() -> Self {
        RecordId(rand::random())
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordId({:x})", self.0)
    }
}

impl FromStr for RecordId {
    type Err = SettlementError;

    fn from_str(text: &str) -> SettlementResult<Self> {
        u128::from_str_radix(text, 16).map(RecordId).map_err(|err| SettlementError::InvalidRecord {
            record_id: text.to_string(),
            reason: format!("record id is not a 128-bit hex number: {err}"),
        })
    }
}

impl Serialize for RecordId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for RecordId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <String as Deserialize>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One lease of resources on one node, as metered by the control plane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub record_id: RecordId,
    pub job_id: JobId,
    /// The prepaid-credit account debited for this usage.
    pub payer_account: String,
    pub node_id: NodeId,
    /// The provider credited for this usage (the wallet that supplied the node).
    pub provider_wallet: String,
    /// What was leased; `GPU` may be fractional (1/10000 units).
    pub resources: ResourceSet,
    /// Lease start, control-plane clock, ms since the Unix epoch.
    pub start_ms: u64,
    /// Lease end, control-plane clock; the record belongs to the epoch containing it.
    pub end_ms: u64,
    pub price_per_gpu_hour: MicroUsd,
    pub price_per_cpu_hour: MicroUsd,
}

impl UsageRecord {
    pub fn duration_ms(&self) -> u64 {
        self.end_ms.saturating_sub(self.start_ms)
    }

    /// Refuses a record that could never be settled: an empty account name, an end
    /// before the start, or a cost too large to represent.
    pub fn validate(&self) -> SettlementResult<()> {
        let invalid = |reason: String| SettlementError::InvalidRecord { record_id: self.record_id.to_string(), reason };
        if self.payer_account.is_empty() {
            return Err(invalid("payer account is empty".into()));
        }
        if self.provider_wallet.is_empty() {
            return Err(invalid("provider wallet is empty".into()));
        }
        if self.end_ms < self.start_ms {
            return Err(invalid(format!("end {} ms is before start {} ms", self.end_ms, self.start_ms)));
        }
        let numerator = self.cost_numerator()?;
        if numerator / COST_DENOMINATOR > i64::MAX as u128 {
            return Err(invalid(format!("cost {numerator} is too large")));
        }
        Ok(())
    }

    /// The exact cost in units of micro-USD / [`COST_DENOMINATOR`]:
    /// `GPU units × ms × price_per_gpu_hour + CPU units × ms × price_per_cpu_hour`,
    /// where units are 1/10000 of a resource. Nothing is rounded here; settlement
    /// sums these numerators per (payer, provider) and floors once per epoch.
    pub fn cost_numerator(&self) -> SettlementResult<u128> {
        let duration = self.duration_ms() as u128;
        let gpu = self.resources.get(GPU).units().max(0) as u128;
        let cpu = self.resources.get(CPU).units().max(0) as u128;
        let overflow = || SettlementError::Overflow(format!("cost of usage record {}", self.record_id));
        let gpu_cost = gpu
            .checked_mul(duration)
            .and_then(|v| v.checked_mul(self.price_per_gpu_hour as u128))
            .ok_or_else(overflow)?;
        let cpu_cost = cpu
            .checked_mul(duration)
            .and_then(|v| v.checked_mul(self.price_per_cpu_hour as u128))
            .ok_or_else(overflow)?;
        gpu_cost.checked_add(cpu_cost).ok_or_else(overflow)
    }

    /// This record's cost alone, floored to micro-USD (for display; settlement does not
    /// round per record).
    pub fn cost_micro_usd(&self) -> SettlementResult<MicroUsd> {
        Ok((self.cost_numerator()? / COST_DENOMINATOR) as MicroUsd)
    }

    /// The fields settlement reads, borrowed.
    pub fn metered(&self) -> MeteredUsage<'_> {
        MeteredUsage {
            record_id: self.record_id,
            payer_account: &self.payer_account,
            provider_wallet: &self.provider_wallet,
            gpu_units: self.resources.get(GPU).units(),
            cpu_units: self.resources.get(CPU).units(),
            start_ms: self.start_ms,
            end_ms: self.end_ms,
            price_per_gpu_hour: self.price_per_gpu_hour,
            price_per_cpu_hour: self.price_per_cpu_hour,
        }
    }

    /// GPU-milliseconds in 1/10000 GPU units (for reports).
    pub fn gpu_unit_ms(&self) -> u128 {
        self.resources.get(GPU).units().max(0) as u128 * self.duration_ms() as u128
    }
}

/// What settlement reads of a record: a store may keep records in a compact form and
/// lend this view without materialising a [`UsageRecord`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeteredUsage<'a> {
    pub record_id: RecordId,
    pub payer_account: &'a str,
    pub provider_wallet: &'a str,
    /// `GPU` in 1/10000 units.
    pub gpu_units: i64,
    /// `CPU` in 1/10000 units.
    pub cpu_units: i64,
    pub start_ms: u64,
    pub end_ms: u64,
    pub price_per_gpu_hour: MicroUsd,
    pub price_per_cpu_hour: MicroUsd,
}

#[cfg(test)]
mod tests {
    use super::*;
    use ionet_common::Quantity;

    pub(crate) fn record(gpus: &str, cpus: i64, ms: u64, gpu_price: &str) -> UsageRecord {
        UsageRecord {
            record_id: RecordId(7),
            job_id: JobId::from_sequence(1),
            payer_account: "alice".into(),
            node_id: NodeId::from_array([1; 28]),
            provider_wallet: "wallet-a".into(),
            resources: ResourceSet::new().with(GPU, gpus.parse().unwrap()).with(CPU, Quantity::whole(cpus)),
            start_ms: 1_000,
            end_ms: 1_000 + ms,
            price_per_gpu_hour: ionet_common::resources::parse_usd(gpu_price).unwrap(),
            price_per_cpu_hour: ionet_common::resources::parse_usd("0.01").unwrap(),
        }
    }

    #[test]
    fn one_gpu_hour_costs_its_price() {
        let r = record("1", 0, 3_600_000, "2.50");
        assert_eq!(r.cost_micro_usd().unwrap(), 2_500_000);
    }

    #[test]
    fn fractional_gpu_and_cpu_are_exact() {
        // 0.25 GPU for 30 min at $2/h = $0.25; 4 CPU for 30 min at $0.01/h = $0.02.
        let r = record("0.25", 4, 1_800_000, "2");
        assert_eq!(r.cost_micro_usd().unwrap(), 270_000);
        assert_eq!(r.cost_numerator().unwrap() % COST_DENOMINATOR, 0);
    }

    #[test]
    fn sub_micro_costs_are_kept_in_the_numerator() {
        // 0.0001 GPU for 1 ms at $1/h = 1e6 / 3.6e10 micro-USD: floors to 0 alone.
        let r = record("0.0001", 0, 1, "1");
        assert_eq!(r.cost_micro_usd().unwrap(), 0);
        assert_eq!(r.cost_numerator().unwrap(), 1_000_000);
    }

    #[test]
    fn invalid_records_name_the_problem() {
        let mut r = record("1", 0, 10, "1");
        r.end_ms = 0;
        let err = r.validate().unwrap_err().to_string();
        assert!(err.contains("end 0 ms is before start 1000 ms"), "{err}");
        let mut r = record("1", 0, 10, "1");
        r.payer_account.clear();
        assert!(r.validate().unwrap_err().to_string().contains("payer account is empty"));
    }

    #[test]
    fn record_id_round_trips_as_hex() {
        let id = RecordId::random();
        assert_eq!(id.to_string().parse::<RecordId>().unwrap(), id);
        let json = serde_json::to_string(&RecordId(255)).unwrap();
        assert_eq!(json, "\"000000000000000000000000000000ff\"");
    }
}
