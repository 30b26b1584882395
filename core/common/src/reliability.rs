//! A node's reliability score: what a tenant may require (`min_reliability`) and what every
//! listing of nodes shows beside measured performance. Three shares, each of what the
//! head itself saw (never what the node reports), multiplied:
//!
//! - **uptime**: the share of its time since first registering that the node was in the
//!   cluster (time between being declared dead and registering again counts against it);
//! - **checks**: `(passes + 1) / (passes + failures + 2)` over its GPU checks: a node with
//!   GPUs earns its score by passing them over time (0.5 before its first, 0.67 after it,
//!   0.95 after 19 passes in a row), so starting over under a fresh node id leaves a
//!   provider well short of an established record (not of a bad one); 1 for a node without
//!   GPUs (nothing to check);
//! - **leases**: `(kept + 1) / (leases + 1)`, where the leases not kept are those the
//!   node's death ended.
//!
//! In basis points (10 000 is a node that never failed anyone). An untrusted node scores 0.
//! The record is per node id: a node without GPUs that starts over starts at full marks
//! (tying records to the provider's account is not built).

use crate::rpc::proto::common::NodeInfo;

/// Full marks, in basis points.
pub const FULL: u32 = 10_000;

/// `node`'s score at `now_ms` (the head's clock), in basis points.
pub fn score_bps(node: &NodeInfo, now_ms: u64) -> u32 {
    let check = node.gpu_check.clone().unwrap_or_default();
    if check.untrusted_since_ms != 0 {
        return 0;
    }
    let record = node.reliability.clone().unwrap_or_default();
    let lifetime = now_ms.saturating_sub(node.registered_at_ms).max(1);
    let uptime = 1.0 - (record.down_ms.min(lifetime) as f64 / lifetime as f64);
    let (passes, failures) = (f64::from(check.passes), f64::from(check.failures));
    let checked = node.gpu_check.is_some()
        && (check.state != crate::rpc::proto::common::GpuCheckState::None as i32 || passes + failures > 0.0);
    let checks = if checked { (passes + 1.0) / (passes + failures + 2.0) } else { 1.0 };
    let lost = record.leases_lost.min(record.leases) as f64;
    let leases = (record.leases as f64 - lost + 1.0) / (record.leases as f64 + 1.0);
    (uptime * checks * leases * f64::from(FULL)).round().clamp(0.0, f64::from(FULL)) as u32
}

/// `node`'s score as the node table shows it: at its last heartbeat (the head's clock),
/// what every scheduler and listing uses, whatever the reader's own clock says.
pub fn listed_score_bps(node: &NodeInfo) -> u32 {
    score_bps(node, node.last_heartbeat_ms.max(node.registered_at_ms))
}

/// `bps` as a share with two decimals: `0.97`.
pub fn format(bps: u32) -> String {
    format!("{:.2}", f64::from(bps) / f64::from(FULL))
}

/// A share (`0.95`) as basis points; an error for anything outside `[0, 1]`.
pub fn parse_share(share: f64) -> Result<u32, String> {
    if !(0.0..=1.0).contains(&share) {
        return Err(format!("min_reliability must be a share between 0 and 1, not {share}"));
    }
    Ok((share * f64::from(FULL)).round() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::proto::common::{GpuCheck, GpuCheckState, NodeReliability};

    fn node(down_ms: u64, leases: u64, leases_lost: u64, passes: u32, failures: u32) -> NodeInfo {
        NodeInfo {
            registered_at_ms: 1_000,
            reliability: Some(NodeReliability { down_ms, leases, leases_lost }),
            gpu_check: (passes + failures > 0).then(|| GpuCheck { passes, failures, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn each_share_counts_and_a_spotless_node_scores_full_marks() {
        let now = 1_000 + 100_000;
        assert_eq!(score_bps(&node(0, 0, 0, 0, 0), now), FULL, "a node without GPUs has nothing to check");
        assert_eq!(score_bps(&node(0, 50, 0, 0, 0), now), FULL);
        assert_eq!(score_bps(&node(10_000, 0, 0, 0, 0), now), 9_000, "gone a tenth of its life");
        assert_eq!(score_bps(&node(0, 9, 3, 0, 0), now), 7_000, "three of nine leases lost to its death");
        assert_eq!(score_bps(&node(0, 0, 0, 1, 0), now), 6_667, "a GPU node's first pass: a start, not a record");
        assert_eq!(score_bps(&node(0, 0, 0, 19, 0), now), 9_524, "nineteen in a row");
        assert_eq!(score_bps(&node(0, 0, 0, 2, 1), now), 6_000, "one check in three failed (with the prior)");
        assert_eq!(score_bps(&node(10_000, 9, 3, 2, 1), now), 3_780, "the shares multiply");
        assert_eq!(score_bps(&node(500_000, 1, 9, 0, 0), now), 0, "out-of-range counts are clamped, not trusted");
        let pending = NodeInfo {
            gpu_check: Some(GpuCheck { state: GpuCheckState::Pending as i32, ..Default::default() }),
            ..node(0, 0, 0, 0, 0)
        };
        assert_eq!(score_bps(&pending, now), 5_000, "a fresh GPU node (a fresh id) starts at half");
        let mut untrusted = node(0, 0, 0, 5, 3);
        untrusted.gpu_check.as_mut().unwrap().untrusted_since_ms = 5;
        assert_eq!(score_bps(&untrusted, now), 0);
    }

    #[test]
    fn shares_are_parsed_and_shown_as_fractions() {
        assert_eq!(parse_share(0.95), Ok(9_500));
        assert!(parse_share(1.5).unwrap_err().contains("between 0 and 1"));
        assert!(parse_share(f64::NAN).is_err());
        assert_eq!(format(9_725), "0.97");
    }
}
