//! The node's lease book: what it has, who holds what, which worker processes exist and
//! what each is doing. Every field lives under the one lock of [`super::Leases`], and
//! every method here is a synchronous step that leaves the book whole: no I/O, no await.
//!
//! Invariants (checked by [`LeaseState::check`], after every step of the property test):
//! - General pool: `available + Σ live bundles' totals + Σ held by leases whose pool is
//!   the general one = total`, where a lease holds its resources less the CPUs it lent
//!   while blocked. `available` may go negative for CPU (a lender resumed past what was
//!   free). A lease's pool is its bundle's until that bundle is cancelled.
//! - Each live bundle: `its available + Σ held by the leases of its pool = its total`.
//! - A lease's resources come back once: when it ends, or when its worker's process
//!   exits, whichever is first.
//! - Every lease names a process that is leased to exactly that lease, and every leased
//!   process's lease exists: a lease never outlives its worker, a worker never holds two.
//! - `released_leases` counts the leases lending CPUs now.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ionet_common::resources::{Quantity, ResourceSet, CPU, GPU};
use ionet_common::{JobId, LeaseId, NodeId, PlacementGroupId, WorkerId};
use ionet_scheduler::{ClusterView, GpuAllocator, GpuAssignment};

/// What a pool of reusable workers is keyed by: an idle worker serves only the same job,
/// command, GPU ids and runtime environment (a task's or actor's own, as its JSON).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub(super) struct PoolKey {
    pub job_id: Vec<u8>,
    pub argv: Vec<String>,
    pub gpu_ids: Vec<u32>,
    pub runtime_env: String,
}

/// A worker process this daemon started.
pub(super) struct Process {
    pub pid: u32,
    pub key: PoolKey,
    /// Where its core worker serves (empty until it registers).
    pub address: String,
    pub doing: Doing,
    /// It holds objects for other processes (`SetWorkerHolding`): not stopped when idle.
    pub holding: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Doing {
    /// Started for a grant, not leased yet.
    Starting,
    Idle {
        since: Instant,
    },
    Leased(LeaseId),
}

pub(super) struct Granted {
    pub resources: ResourceSet,
    pub gpus: Option<GpuAssignment>,
    pub worker: WorkerId,
    pub bundle: Option<BundleKey>,
    /// Where its resources go back: its bundle's pool, or the general one (from the
    /// start, or once its bundle was cancelled: a bundle prepared again under the same
    /// key is another bundle).
    pub pool: Option<BundleKey>,
    /// Where the holder serves (see `RequestWorkerLeaseRequest::holder_address`).
    pub holder: String,
    /// The worker said its task is blocked in `get`/`wait`.
    pub blocked: bool,
    /// CPUs given back while blocked (zero when none): the lease holds `resources` less these.
    pub released: Quantity,
}

impl Granted {
    /// Whether the lease is metered: a lease of nothing (an actor holding no resources)
    /// costs nothing, and one inside a placement-group bundle is paid with the bundle.
    pub fn metered(resources: &ResourceSet, bundle: Option<&BundleKey>) -> bool {
        !resources.is_empty() && bundle.is_none()
    }

    /// What the lease holds now: its resources less the CPUs it lent.
    pub fn held(&self) -> ResourceSet {
        let mut held = self.resources.clone();
        held.set(CPU, held.get(CPU) - self.released);
        held
    }
}

/// A placement-group bundle: its id and index in the group.
pub(super) type BundleKey = (PlacementGroupId, u32);

/// Resources reserved on this node for one bundle.
pub(super) struct Bundle {
    pub total: ResourceSet,
    pub available: ResourceSet,
    /// Leases are granted from a bundle only once the control store committed it.
    pub committed: bool,
    /// The creating job, billed for the whole bundle from commit to cancel (the leases
    /// granted inside it are not metered again).
    pub job_id: Option<JobId>,
    /// The metering lease of the committed bundle.
    pub metered_as: Option<LeaseId>,
}

/// How one request is answered, decided under the lock.
pub(super) enum Step {
    /// The resources (and GPU ids) are taken out of their pool for it.
    Grant(ResourceSet, Option<GpuAssignment>),
    Spill(NodeId, String),
    /// Sent to a node that could take it once free: none in the view has room now.
    Queue(NodeId, String),
    Wait(String),
    Infeasible(String),
}

/// A lease that ended, and what becomes of its worker process.
pub(super) struct Ended {
    pub granted: Granted,
    /// The process to stop (its lease ended as failed); `None` when it went back to idle
    /// or is gone already.
    pub stop: Option<u32>,
}

pub(super) struct LeaseState {
    pub total: ResourceSet,
    pub available: ResourceSet,
    pub gpus: GpuAllocator,
    pub leases: HashMap<LeaseId, Granted>,
    pub processes: HashMap<WorkerId, Process>,
    pub view: ClusterView,
    /// Where `view` stands in the head's node table: (incarnation, version); (0, 0) for a
    /// view of unknown age (a delta reader then reads it whole).
    pub view_at: (u64, u64),
    /// `view` holds this node's sample of the table only (a large cluster), and the rows
    /// found outside it (`found`).
    pub view_sampled: bool,
    /// Rows put in a sampled view from outside the sample, and when (`sample`).
    pub found: HashMap<NodeId, Instant>,
    /// Requests this node sent to others, counted against them in `view` until the view
    /// next moves on (a burst spreads); then given back, since a delta carries a row only
    /// when the head's changed, which a short task between two heartbeats never makes.
    pub spilled: Vec<(NodeId, ResourceSet)>,
    pub bundles: HashMap<BundleKey, Bundle>,
    /// Requests for the general pool waiting here: their depth and demand, by ticket.
    pub waiters: HashMap<u64, (u32, ResourceSet)>,
    pub next_ticket: u64,
    /// Leases whose blocked worker released its CPUs now.
    pub released_leases: usize,
    /// When holders were last pressed to give back idle leases.
    pub pressed_at: Option<Instant>,
    /// Leases granted since the daemon started (a metric).
    pub granted_total: u64,
}

impl LeaseState {
    pub fn new(total: ResourceSet, gpu_indices: Vec<u32>) -> Self {
        LeaseState {
            available: total.clone(),
            total,
            gpus: GpuAllocator::new(gpu_indices),
            leases: HashMap::new(),
            processes: HashMap::new(),
            view: ClusterView::new(),
            view_at: (0, 0),
            view_sampled: false,
            found: HashMap::new(),
            spilled: Vec::new(),
            bundles: HashMap::new(),
            waiters: HashMap::new(),
            next_ticket: 0,
            released_leases: 0,
            pressed_at: None,
            granted_total: 0,
        }
    }

    /// The pool a lease's resources come from: its bundle's, or the general one (also
    /// for a lease whose bundle was cancelled meanwhile).
    pub fn pool_of(&mut self, bundle: Option<&BundleKey>) -> &mut ResourceSet {
        match bundle.and_then(|key| self.bundles.get_mut(key)) {
            Some(bundle) => &mut bundle.available,
            None => &mut self.available,
        }
    }

    /// Takes `demand` out of the general pool (or `bundle`'s), with GPU ids: all of it
    /// or, changing nothing, a wait (`busy` says why) or a refusal.
    pub fn take(&mut self, demand: &ResourceSet, bundle: Option<&BundleKey>, busy: &str) -> Step {
        let wanted = demand.get(GPU);
        let assignment = if wanted.is_zero() {
            None
        } else {
            match self.gpus.allocate(wanted) {
                Ok(Some(assignment)) => Some(assignment),
                Ok(None) => return Step::Wait("GPUs are busy".into()),
                Err(err) => return Step::Infeasible(format!("no node can ever fit {demand}: {err}")),
            }
        };
        if self.pool_of(bundle).try_subtract(demand).is_err() {
            if let Some(assignment) = &assignment {
                let _ = self.gpus.release(assignment);
            }
            return Step::Wait(busy.to_string());
        }
        Step::Grant(demand.clone(), assignment)
    }

    /// Puts back what a grant took and never leased (or a lease held at its end).
    pub fn give_back(&mut self, resources: &ResourceSet, gpus: Option<&GpuAssignment>, bundle: Option<&BundleKey>) {
        self.pool_of(bundle).add(resources);
        if let Some(assignment) = gpus {
            if let Err(err) = self.gpus.release(assignment) {
                tracing::error!(error = %err, "gpu accounting refused a release");
            }
        }
    }

    /// An idle process of `key`, if any (the most recently idle: its caches are warm).
    pub fn idle_of(&self, key: &PoolKey) -> Option<WorkerId> {
        self.processes
            .iter()
            .filter_map(|(id, process)| match process.doing {
                Doing::Idle { since } if process.key == *key => Some((since, *id)),
                _ => None,
            })
            .max_by_key(|(since, _)| *since)
            .map(|(_, id)| id)
    }

    /// Records `granted` as lease `lease_id` on its worker; `false` (nothing changed)
    /// when that process is gone or already leased.
    pub fn record_lease(&mut self, lease_id: LeaseId, granted: Granted) -> bool {
        let Some(process) = self.processes.get_mut(&granted.worker) else { return false };
        if matches!(process.doing, Doing::Leased(_)) {
            return false;
        }
        process.doing = Doing::Leased(lease_id);
        self.leases.insert(lease_id, granted);
        self.granted_total += 1;
        true
    }

    /// Ends a lease: what it holds back to its pool, its worker idle again (or to be
    /// stopped, when `failed`). `None` if no such lease is held here.
    pub fn end_lease(&mut self, lease_id: LeaseId, failed: bool, now: Instant, cap: usize) -> Option<Ended> {
        let granted = self.leases.remove(&lease_id)?;
        if !granted.released.is_zero() {
            self.released_leases -= 1;
            self.release_next_blocked(cap);
        }
        self.give_back(&granted.held(), granted.gpus.as_ref(), granted.pool.as_ref());
        let mut stop = None;
        if let Some(process) = self.processes.get_mut(&granted.worker) {
            if failed {
                stop = Some(process.pid);
                self.processes.remove(&granted.worker);
            } else {
                process.doing = Doing::Idle { since: now };
            }
        }
        Some(Ended { granted, stop })
    }

    /// A worker process exited: it leaves the book, and its lease (if any) ends.
    pub fn process_exited(&mut self, worker: WorkerId, now: Instant, cap: usize) -> Option<(LeaseId, Granted)> {
        let process = self.processes.remove(&worker)?;
        let Doing::Leased(lease_id) = process.doing else { return None };
        self.end_lease(lease_id, false, now, cap).map(|ended| (lease_id, ended.granted))
    }

    /// The worker's task blocked (or resumed): a blocked lease lends its CPUs (up to the
    /// cap); a resumed one takes them back, even past what is free. Whether CPUs were
    /// lent now. `Err` names what is unknown.
    pub fn set_blocked(&mut self, worker: WorkerId, blocked: bool, cap: usize) -> Result<bool, String> {
        let lease_id = match self.processes.get(&worker).map(|process| process.doing) {
            Some(Doing::Leased(lease_id)) => lease_id,
            _ => return Err(format!("worker {} holds no lease here", worker.short())),
        };
        let Some(granted) = self.leases.get_mut(&lease_id) else {
            return Err(format!("lease {} is not held on this node", lease_id.short()));
        };
        if granted.blocked == blocked {
            return Ok(false);
        }
        granted.blocked = blocked;
        if blocked {
            return Ok(self.release_blocked_cpus(&lease_id, cap));
        }
        let taken_back = std::mem::replace(&mut granted.released, Quantity::ZERO);
        if !taken_back.is_zero() {
            let bundle = granted.pool;
            let pool = self.pool_of(bundle.as_ref());
            pool.set(CPU, pool.get(CPU) - taken_back);
            self.released_leases -= 1;
            self.release_next_blocked(cap);
        }
        Ok(false)
    }

    /// Releases the CPUs of a blocked lease to its pool, if under the cap, or past it when
    /// every lease holding CPUs here is blocked (nothing could run otherwise: the tasks
    /// they wait for would never start).
    pub fn release_blocked_cpus(&mut self, lease_id: &LeaseId, cap: usize) -> bool {
        let stalled = || {
            self.leases
                .values()
                .all(|granted| granted.blocked || !granted.released.is_zero() || granted.resources.get(CPU).is_zero())
        };
        if self.released_leases >= cap && !stalled() {
            tracing::info!(
                cap,
                lease = %lease_id.short(),
                "a blocked worker keeps its CPUs: the cap of blocked workers lending theirs is reached \
                 (a tree of tasks deeper than cap / CPUs may stall; raise IONET_MAX_BLOCKED_WORKERS)"
            );
            return false;
        }
        let Some(granted) = self.leases.get_mut(lease_id) else { return false };
        let cpus = granted.resources.get(CPU);
        if !granted.blocked || !granted.released.is_zero() || cpus.is_zero() {
            return false;
        }
        granted.released = cpus;
        let bundle = granted.pool;
        let pool = self.pool_of(bundle.as_ref());
        pool.set(CPU, pool.get(CPU) + cpus);
        self.released_leases += 1;
        true
    }

    /// Under the cap again: the CPUs of a blocked lease that kept them go back too.
    fn release_next_blocked(&mut self, cap: usize) {
        let next = self
            .leases
            .iter()
            .find(|(_, granted)| granted.blocked && granted.released.is_zero() && !granted.resources.get(CPU).is_zero())
            .map(|(lease_id, _)| *lease_id);
        if let Some(lease_id) = next {
            self.release_blocked_cpus(&lease_id, cap);
        }
    }

    /// Phase one of placing a bundle: its resources leave the general pool. `Ok(false)`:
    /// held already; `Err`: what is free.
    pub fn prepare_bundle(
        &mut self,
        key: BundleKey,
        resources: ResourceSet,
        job_id: Option<JobId>,
    ) -> Result<bool, String> {
        if self.bundles.contains_key(&key) {
            return Ok(false);
        }
        if self.available.try_subtract(&resources).is_err() {
            return Err(self.available.to_string());
        }
        self.bundles.insert(
            key,
            Bundle { total: resources.clone(), available: resources, committed: false, job_id, metered_as: None },
        );
        Ok(true)
    }

    /// Removes a bundle, its free part back to the general pool (its leases give theirs
    /// back there when they end). The bundle, and the workers of its running leases.
    pub fn cancel_bundle(&mut self, key: &BundleKey) -> (Option<Bundle>, Vec<u32>) {
        let removed = self.bundles.remove(key);
        if let Some(bundle) = &removed {
            self.available.add(&bundle.available);
        }
        for granted in self.leases.values_mut().filter(|granted| granted.pool == Some(*key)) {
            granted.pool = None;
        }
        let doomed = self
            .leases
            .values()
            .filter(|granted| granted.bundle == Some(*key))
            .filter_map(|granted| self.processes.get(&granted.worker).map(|process| process.pid))
            .collect();
        (removed, doomed)
    }

    /// Idle processes to stop now: those idle past `timeout`, and those past the `limit`
    /// most recently idle that have been idle `grace`; never one holding objects for
    /// others. They leave the book.
    pub fn reap_idle(&mut self, now: Instant, limit: usize, timeout: Duration, grace: Duration) -> Vec<u32> {
        let mut idle: Vec<(Instant, WorkerId)> = self
            .processes
            .iter()
            .filter_map(|(id, process)| match process.doing {
                Doing::Idle { since } if !process.holding => Some((since, *id)),
                _ => None,
            })
            .collect();
        idle.sort_by_key(|(since, _)| std::cmp::Reverse(*since));
        let mut doomed = Vec::new();
        for (index, (since, id)) in idle.into_iter().enumerate() {
            let idle_for = now.duration_since(since);
            if idle_for > timeout || (index >= limit && idle_for > grace) {
                if let Some(process) = self.processes.remove(&id) {
                    doomed.push(process.pid);
                }
            }
        }
        doomed
    }

    pub fn idle_count(&self) -> usize {
        self.processes.values().filter(|process| matches!(process.doing, Doing::Idle { .. })).count()
    }

    /// Whether granting `demand` now would take the room of a waiting request (other
    /// than `ticket`) deeper than `depth` that fits now: that one goes first.
    pub fn outranked(&self, ticket: Option<u64>, depth: u32, demand: &ResourceSet) -> bool {
        let mut after = self.available.clone();
        if after.try_subtract(demand).is_err() {
            return false;
        }
        self.waiters.iter().any(|(other, (other_depth, wanted))| {
            Some(*other) != ticket
                && *other_depth > depth
                && self.available.contains(wanted)
                && !after.contains(wanted)
                && (wanted.get(GPU).is_zero() || self.gpus.total_free() >= wanted.get(GPU))
        })
    }

    /// One line on who holds what here, for an operator reading why a request waits.
    pub fn describe(&self) -> String {
        let blocked = self.leases.values().filter(|granted| granted.blocked).count();
        let mut holders: HashMap<String, Vec<String>> = HashMap::new();
        for (lease_id, granted) in &self.leases {
            let holder = if granted.holder.is_empty() { "the control store (actors)" } else { &granted.holder };
            holders.entry(holder.to_string()).or_default().push(format!(
                "{} {} on worker {}",
                lease_id.short(),
                granted.resources,
                granted.worker.short()
            ));
        }
        let waiting: Vec<String> =
            self.waiters.values().map(|(depth, wanted)| format!("{wanted} at depth {depth}")).collect();
        format!(
            "available {}, {} leases ({blocked} blocked, {} lending CPUs) held by {holders:?}, {} idle workers, waiting: [{}]",
            self.available,
            self.leases.len(),
            self.released_leases,
            self.idle_count(),
            waiting.join(", ")
        )
    }

    /// The module's invariants; the first that fails, said.
    #[cfg(test)]
    pub fn check(&self) -> Result<(), String> {
        let mut general = self.available.clone();
        for bundle in self.bundles.values() {
            general.add(&bundle.total);
        }
        let mut in_bundles: HashMap<BundleKey, ResourceSet> =
            self.bundles.iter().map(|(key, bundle)| (*key, bundle.available.clone())).collect();
        let mut lending = 0;
        for (lease_id, granted) in &self.leases {
            match granted.pool.and_then(|key| in_bundles.get_mut(&key)) {
                Some(pool) => pool.add(&granted.held()),
                None => general.add(&granted.held()),
            }
            if !granted.released.is_zero() {
                lending += 1;
            }
            match self.processes.get(&granted.worker).map(|process| process.doing) {
                Some(Doing::Leased(held)) if held == *lease_id => {}
                other => {
                    return Err(format!(
                        "lease {} names worker {} doing {other:?}",
                        lease_id.short(),
                        granted.worker.short()
                    ))
                }
            }
        }
        if !same(&general, &self.total) {
            return Err(format!("the general pool accounts for {general}, the node has {}", self.total));
        }
        for (key, accounted) in &in_bundles {
            if !same(accounted, &self.bundles[key].total) {
                return Err(format!("bundle {} accounts for {accounted}, it has {}", key.1, self.bundles[key].total));
            }
        }
        if lending != self.released_leases {
            return Err(format!("{lending} leases lend CPUs, {} are counted", self.released_leases));
        }
        for (worker, process) in &self.processes {
            if let Doing::Leased(lease_id) = process.doing {
                if self.leases.get(&lease_id).map(|granted| granted.worker) != Some(*worker) {
                    return Err(format!(
                        "worker {} is leased to {}, which is not its lease",
                        worker.short(),
                        lease_id.short()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Equal, an entry of zero counting as absent.
#[cfg(test)]
fn same(a: &ResourceSet, b: &ResourceSet) -> bool {
    let covers = |x: &ResourceSet, y: &ResourceSet| x.iter().all(|(name, quantity)| y.get(name) == quantity);
    covers(a, b) && covers(b, a)
}

/// `set` without its negative entries (CPUs taken back past what was free).
pub(super) fn clamped(set: &ResourceSet) -> ResourceSet {
    let mut clamped = set.clone();
    for (name, quantity) in set.iter() {
        if quantity < Quantity::ZERO {
            clamped.set(name.to_string(), Quantity::ZERO);
        }
    }
    clamped
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
