//! Placement-group bundles on this node: two-phase reservation (prepare, then commit
//! once the control store has placed every bundle), leases granted only from a bundle's
//! own free resources, and cancellation, which stops what runs inside.

use ionet_common::resources::ResourceSet;
use ionet_common::{IonetError, IonetResult, JobId, LeaseId, PlacementGroupId};

use super::state::{BundleKey, Step};
use super::{Leases, MeterEvent};

impl Leases {
    /// A request naming a bundle: granted only from the bundle's free resources here.
    pub(super) fn decide_bundle(&self, key: &BundleKey, demand: &ResourceSet) -> Step {
        let mut state = self.lock();
        let state = &mut *state;
        let Some(bundle) = state.bundles.get_mut(key) else {
            return Step::Infeasible(format!(
                "bundle {} of placement group {} is not reserved on node {}",
                key.1,
                key.0.short(),
                self.node_id.short()
            ));
        };
        if !bundle.total.contains(demand) {
            return Step::Infeasible(format!(
                "{demand} does not fit bundle {} of placement group {} ({})",
                key.1,
                key.0.short(),
                bundle.total
            ));
        }
        if !bundle.committed || !bundle.available.contains(demand) {
            return Step::Wait("waiting for room in the placement-group bundle".into());
        }
        // Held back by the head's GPU check, it grants nothing (the head would bill none).
        if self.held() {
            return Step::Wait(format!(
                "node {} takes no work until its GPUs pass the head's check (`ionet status`: GPU CHECK)",
                self.node_id.short()
            ));
        }
        state.take(demand, Some(key), "waiting for room in the placement-group bundle")
    }

    /// Phase one of placing a bundle here: takes its resources out of the general pool,
    /// or refuses with `ResourceExhausted`. Preparing a bundle already held is a no-op.
    pub fn prepare_bundle(
        &self,
        placement_group_id: &[u8],
        index: u32,
        job_id: &[u8],
        resources: ResourceSet,
    ) -> IonetResult<()> {
        let key = (PlacementGroupId::from_bytes(placement_group_id)?, index);
        let job_id = if job_id.is_empty() { None } else { Some(JobId::from_bytes(job_id)?) };
        let prepared = self.lock().prepare_bundle(key, resources.clone(), job_id);
        match prepared {
            Ok(_) => Ok(()),
            Err(free) => Err(IonetError::ResourceExhausted(format!(
                "node {} cannot reserve bundle {index} of placement group {}: it needs {resources}, {free} is free",
                self.node_id.short(),
                key.0.short(),
            ))),
        }
    }

    /// Phase two: the bundle may now serve leases.
    pub fn commit_bundle(&self, placement_group_id: &[u8], index: u32) -> IonetResult<()> {
        let key = (PlacementGroupId::from_bytes(placement_group_id)?, index);
        let mut state = self.lock();
        let bundle = state.bundles.get_mut(&key).ok_or_else(|| {
            IonetError::NotFound(format!("bundle {index} of placement group {} is not prepared here", key.0.short()))
        })?;
        let newly = !bundle.committed;
        bundle.committed = true;
        let meter = match (newly, bundle.job_id) {
            (true, Some(job_id)) if !bundle.total.is_empty() => {
                let lease_id = LeaseId::random();
                bundle.metered_as = Some(lease_id);
                Some(MeterEvent::Started { lease_id, job_id, resources: bundle.total.clone(), bundle: Some(key) })
            }
            _ => None,
        };
        // Sent under the lock, as `cancel_bundle` sends the end: a cancel that follows
        // cannot report the end before the start.
        if let Some(event) = meter {
            self.meter(event);
        }
        drop(state);
        self.freed.notify_waiters();
        Ok(())
    }

    /// Gives a bundle's free resources back to the general pool; whether it was held.
    pub fn cancel_bundle(&self, placement_group_id: &[u8], index: u32) -> IonetResult<bool> {
        let key = (PlacementGroupId::from_bytes(placement_group_id)?, index);
        let (removed, doomed) = {
            let mut state = self.lock();
            let (removed, doomed) = state.cancel_bundle(&key);
            if let Some(lease_id) = removed.as_ref().and_then(|bundle| bundle.metered_as) {
                // Under the lock, as `commit_bundle` meters the start.
                self.meter(MeterEvent::Ended { lease_id });
            }
            (removed.is_some(), doomed)
        };
        // Removing a group ends what runs inside it: its workers are stopped, and their
        // leases end (resources back to the general pool) as their processes exit.
        for pid in doomed {
            tracing::info!(pid, "stopping a worker of a removed placement-group bundle");
            self.kill(pid);
        }
        self.freed.notify_waiters();
        Ok(removed)
    }

    /// How many placement-group bundles are reserved here.
    pub fn bundle_count(&self) -> usize {
        self.lock().bundles.len()
    }
}
