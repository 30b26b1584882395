//! GPU id assignment on one node: which CUDA devices a worker gets.
//!
//! Properties (tested below and by proptest):
//! - a whole demand (1, 2, ... GPUs) gets that many GPUs nobody else uses, lowest ids first;
//! - a fractional demand (< 1) is packed best-fit: onto the GPU with the least free share
//!   that still holds it, so partly used GPUs fill up before a fresh one is broken into;
//! - no GPU ever has more than 1.0 handed out; a demand above 1 must be whole;
//! - releasing an assignment returns exactly its shares; a release that would push a GPU
//!   above 1.0 free (double release, unknown GPU) is refused and changes nothing.

use std::collections::BTreeMap;

use ionet_common::resources::{GPU, SCALE};
use ionet_common::Quantity;
use serde::{Deserialize, Serialize};

use crate::error::{SchedulerError, SchedulerResult};
use crate::node::NodeView;

/// The GPU shares handed to one worker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuAssignment {
    /// `(gpu index, share)`, ascending by index.
    pub shares: Vec<(u32, Quantity)>,
}

impl GpuAssignment {
    pub fn gpu_ids(&self) -> Vec<u32> {
        self.shares.iter().map(|(index, _)| *index).collect()
    }

    /// The value for `CUDA_VISIBLE_DEVICES`, e.g. `"0,1"`.
    pub fn cuda_visible_devices(&self) -> String {
        let ids: Vec<String> = self.gpu_ids().iter().map(u32::to_string).collect();
        ids.join(",")
    }

    pub fn total(&self) -> Quantity {
        self.shares.iter().fold(Quantity::ZERO, |sum, (_, share)| sum + *share)
    }
}

/// Free share of each GPU of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuAllocator {
    free: BTreeMap<u32, Quantity>,
}

impl GpuAllocator {
    /// All of these GPUs free.
    pub fn new(indices: impl IntoIterator<Item = u32>) -> Self {
        Self { free: indices.into_iter().map(|index| (index, Quantity::whole(1))).collect() }
    }

    /// The node's detected GPUs, or `0..GPU` when they were only declared as a count.
    pub fn for_node(node: &NodeView) -> Self {
        if node.gpus.is_empty() {
            let count = (node.total.get(GPU).units() / SCALE) as u32;
            Self::new(0..count)
        } else {
            Self::new(node.gpus.iter().map(|gpu| gpu.index))
        }
    }

    pub fn gpu_count(&self) -> usize {
        self.free.len()
    }

    /// Free share of one GPU (`None` if the node has no such GPU).
    pub fn free_share(&self, index: u32) -> Option<Quantity> {
        self.free.get(&index).copied()
    }

    pub fn total_free(&self) -> Quantity {
        self.free.values().fold(Quantity::ZERO, |sum, free| sum + *free)
    }

    /// Assigns GPUs for a demand of `gpus`. `Ok(None)` when the GPUs are busy now; an error
    /// for a demand that can never be expressed (above 1 and not whole).
    pub fn allocate(&mut self, gpus: Quantity) -> SchedulerResult<Option<GpuAssignment>> {
        let units = gpus.units();
        if units < 0 {
            return Err(SchedulerError::GpuAllocation(format!("cannot allocate a negative amount of GPU ({gpus})")));
        }
        if units == 0 {
            return Ok(Some(GpuAssignment::default()));
        }
        if units > SCALE {
            if units % SCALE != 0 {
                return Err(SchedulerError::GpuAllocation(format!("a demand above 1 GPU must be whole, got {gpus}")));
            }
            return Ok(self.allocate_whole((units / SCALE) as usize));
        }
        if units == SCALE {
            return Ok(self.allocate_whole(1));
        }
        // Best fit: the GPU with the least free share that still holds the demand.
        let best = self
            .free
            .iter()
            .filter(|(_, free)| **free >= gpus)
            .min_by_key(|(index, free)| (**free, **index))
            .map(|(index, _)| *index);
        Ok(best.map(|index| {
            let free = self.free.get_mut(&index).expect("chosen from the map");
            *free = *free - gpus;
            GpuAssignment { shares: vec![(index, gpus)] }
        }))
    }

    fn allocate_whole(&mut self, count: usize) -> Option<GpuAssignment> {
        let whole: Vec<u32> = self
            .free
            .iter()
            .filter(|(_, free)| **free == Quantity::whole(1))
            .map(|(index, _)| *index)
            .take(count)
            .collect();
        if whole.len() < count {
            return None;
        }
        for index in &whole {
            self.free.insert(*index, Quantity::ZERO);
        }
        Some(GpuAssignment { shares: whole.into_iter().map(|index| (index, Quantity::whole(1))).collect() })
    }

    /// Returns an assignment's shares; refuses (changing nothing) a release that does not
    /// match what is handed out.
    pub fn release(&mut self, assignment: &GpuAssignment) -> SchedulerResult<()> {
        let mut after = self.free.clone();
        for (index, share) in &assignment.shares {
            let free = after
                .get_mut(index)
                .ok_or_else(|| SchedulerError::GpuAllocation(format!("release of unknown GPU {index}")))?;
            let sum = *free + *share;
            if sum > Quantity::whole(1) || share.units() <= 0 {
                return Err(SchedulerError::GpuAllocation(format!(
                    "releasing {share} of GPU {index} would leave {sum} free (more than 1)"
                )));
            }
            *free = sum;
        }
        self.free = after;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn q(text: &str) -> Quantity {
        text.parse().unwrap()
    }

    #[test]
    fn two_single_gpu_demands_get_different_ids() {
        let mut gpus = GpuAllocator::new([0, 1]);
        let a = gpus.allocate(q("1")).unwrap().unwrap();
        let b = gpus.allocate(q("1")).unwrap().unwrap();
        assert_eq!(a.gpu_ids(), vec![0]);
        assert_eq!(b.gpu_ids(), vec![1]);
        assert_eq!(gpus.allocate(q("1")).unwrap(), None, "both GPUs are taken");
        gpus.release(&a).unwrap();
        assert_eq!(gpus.allocate(q("1")).unwrap().unwrap().gpu_ids(), vec![0]);
    }

    #[test]
    fn four_halves_fill_two_gpus() {
        let mut gpus = GpuAllocator::new([0, 1, 2]);
        let ids: Vec<u32> = (0..4).map(|_| gpus.allocate(q("0.5")).unwrap().unwrap().gpu_ids()[0]).collect();
        assert_eq!(ids, vec![0, 0, 1, 1]);
        assert_eq!(gpus.free_share(2), Some(q("1")), "the third GPU stays whole");
        assert_eq!(gpus.total_free(), q("1"));
    }

    #[test]
    fn fractions_pack_best_fit() {
        let mut gpus = GpuAllocator::new([0, 1]);
        let a = gpus.allocate(q("0.7")).unwrap().unwrap(); // GPU 0: 0.3 left
        let b = gpus.allocate(q("0.5")).unwrap().unwrap(); // does not fit 0.3 -> GPU 1: 0.5 left
        let c = gpus.allocate(q("0.25")).unwrap().unwrap(); // best fit is GPU 0 (0.3 left)
        assert_eq!((a.gpu_ids(), b.gpu_ids(), c.gpu_ids()), (vec![0], vec![1], vec![0]));
        assert_eq!(gpus.allocate(q("1")).unwrap(), None, "no whole GPU is left even though 1.05 is free in total");
        assert_eq!(c.cuda_visible_devices(), "0");
    }

    #[test]
    fn above_one_must_be_whole_and_whole_gpus_are_exclusive() {
        let mut gpus = GpuAllocator::new([0, 1, 2, 3]);
        assert!(gpus.allocate(q("1.5")).is_err());
        let half = gpus.allocate(q("0.5")).unwrap().unwrap();
        let three = gpus.allocate(q("3")).unwrap().unwrap();
        assert_eq!(three.gpu_ids(), vec![1, 2, 3]);
        assert_eq!(three.cuda_visible_devices(), "1,2,3");
        assert_eq!(gpus.allocate(q("2")).unwrap(), None);
        gpus.release(&half).unwrap();
        assert!(gpus.release(&half).is_err(), "double release is refused");
        assert_eq!(gpus.free_share(0), Some(q("1")));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn never_more_than_one_gpu_handed_out(
            ops in proptest::collection::vec((0u8..6, 0usize..16), 1..80)
        ) {
            let demands = ["0.1", "0.25", "0.5", "0.75", "1", "2"];
            let mut gpus = GpuAllocator::new(0..4);
            let mut held: Vec<GpuAssignment> = Vec::new();
            for (kind, pick) in ops {
                if kind == 0 && !held.is_empty() {
                    let assignment = held.remove(pick % held.len());
                    gpus.release(&assignment).unwrap();
                } else if let Some(assignment) =
                    gpus.allocate(q(demands[pick % demands.len()])).unwrap()
                {
                    held.push(assignment);
                }
                // Handed out per GPU = 1 - free, and it matches what is held.
                for index in 0..4u32 {
                    let free = gpus.free_share(index).unwrap();
                    prop_assert!(free >= Quantity::ZERO && free <= Quantity::whole(1));
                    let held_here = held
                        .iter()
                        .flat_map(|a| a.shares.iter())
                        .filter(|(i, _)| *i == index)
                        .fold(Quantity::ZERO, |sum, (_, s)| sum + *s);
                    prop_assert_eq!(held_here + free, Quantity::whole(1));
                }
            }
        }
    }
}
