//! The core worker's lease pools: per resource shape (and strategy, bundle, `max_calls`)
//! the leases this process holds, the tasks waiting for a slot on one, and the requests
//! for more. Which lease a task joins and how long it is expected to run are the pure
//! policies of [`crate::slots`]; this module applies them under the pool's lock and does
//! the I/O: lease requests (following spillbacks, and to a bundle's node for a group),
//! returns, and the pressure of the daemons to give idle leases back.
//!
//! Invariants: a lease is in its pool's list until it is returned, and returned once
//! (`returned`); `in_flight`/`queued_micros` change only under the pool's `leases` lock;
//! at most [`MAX_PENDING_LEASE_REQUESTS`] requests per pool are in flight, and no more
//! than tasks wait; a refusal is told to every waiter once, then forgotten.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ionet_common::lease::{self, Backoff, LeaseOutcome};
use ionet_common::rpc::proto::node::{RequestWorkerLeaseRequest, ReturnWorkerLeaseRequest};
use ionet_common::rpc::NodeManagerClient;
use ionet_common::{IonetError, IonetResult, ResourceSet};
use tokio::sync::Notify;

use crate::options::TaskOptions;
use crate::runtime::{CoreWorker, TaskSpec, TaskStream};
use crate::slots::{self, RunTimes, Slot};

/// At most this many lease requests in flight per resource shape (Ray's default too).
const MAX_PENDING_LEASE_REQUESTS: usize = 10;
/// A task waiting this long for a worker (then twice as long, and so on) logs why.
const LONG_LEASE_WAIT: Duration = Duration::from_secs(10);
/// Lease requests that keep coming to `Unavailable` (a daemon restarting or unreachable)
/// are asked again for this long before the tasks waiting for them fail `Unavailable`.
const LEASE_UNAVAILABLE_LIMIT: Duration = Duration::from_secs(60);
/// An idle lease is kept this long for the next task of its shape.
pub(crate) const LEASE_LINGER: Duration = Duration::from_millis(300);

/// A worker leased for one resource shape, and the task stream to it.
pub(crate) struct Lease {
    pub(crate) lease_id: Vec<u8>,
    /// The granting node (the holder's reports to the head name it).
    pub(crate) node_id: Vec<u8>,
    /// Whether the node meters it (not inside a bundle, which is metered whole, and not
    /// a lease of nothing): only then does the holder report it.
    pub(crate) metered: bool,
    pub(crate) node_address: String,
    /// The leased worker's own address (for cancels).
    pub(crate) worker_address: String,
    /// The node and worker, as the state API's events of its tasks say where they ran.
    pub(crate) place: Arc<crate::task_events::Place>,
    pub(crate) tasks: TaskStream,
    /// Tasks pushed and not answered yet, and the sum of their expected run times in
    /// microseconds (both changed under the pool's `leases` lock).
    pub(crate) in_flight: AtomicUsize,
    pub(crate) queued_micros: AtomicU64,
    /// When `in_flight` last fell to zero.
    pub(crate) idle_since: Mutex<Instant>,
    /// Set once the lease is on its way back to its daemon.
    pub(crate) returned: AtomicBool,
    /// Set when a forced cancel of one of its tasks killed the worker.
    pub(crate) killed_by_cancel: AtomicBool,
    /// Tasks given a slot on it (counted only in pools with `max_calls`).
    pub(crate) started: AtomicU32,
}

pub(crate) struct ShapePool {
    request: RequestWorkerLeaseRequest,
    /// Every lease held for the shape, busy or idle.
    leases: Mutex<Vec<Arc<Lease>>>,
    notify: Notify,
    requesting: AtomicUsize,
    waiting: AtomicUsize,
    /// The final verdict of a lease request, told to every task waiting at the time.
    refusal: Mutex<Option<IonetError>>,
    /// How long each function's tasks of this shape run (keyed by `TaskSpec::profile`).
    run_times: Mutex<RunTimes>,
    /// For a task in any bundle of a group: the bundle the next lease request asks.
    next_bundle: AtomicUsize,
    /// Calls one worker may run before it is replaced (0: no limit); such a pool holds
    /// one function's tasks only.
    max_calls: u32,
}

impl ShapePool {
    /// How long a task of `profile` is expected to run (see [`RunTimes::estimate`]).
    pub(crate) fn estimate(&self, profile: u64) -> u64 {
        self.run_times.lock().unwrap_or_else(|p| p.into_inner()).estimate(profile)
    }

    pub(crate) fn observe(&self, profile: u64, run_micros: u64) {
        self.run_times.lock().unwrap_or_else(|p| p.into_inner()).observe(profile, run_micros);
    }
}

impl CoreWorker {
    /// The runtime environment a task or actor with `options` runs inside: its own over
    /// the one this process runs inside (`None`: the job's).
    pub(crate) fn runtime_env_of(
        &self,
        options: &TaskOptions,
    ) -> IonetResult<Option<ionet_common::rpc::proto::common::RuntimeEnv>> {
        let own = options.runtime_env.as_ref().map(ionet_common::jobs::task_runtime_env).transpose()?;
        Ok(ionet_common::jobs::merged_runtime_env(self.runtime_env.as_ref(), own.as_ref()))
    }

    pub(crate) fn pool(
        &self,
        demand: &ResourceSet,
        options: &TaskOptions,
        max_calls: Option<(&str, u32)>,
    ) -> IonetResult<Arc<ShapePool>> {
        let bundle = options.placement_group;
        let (strategy, labels) = (&options.scheduling_strategy, &options.label_selector);
        let runtime_env = self.runtime_env_of(options)?;
        let env_name = runtime_env.as_ref().map(ionet_common::jobs::runtime_env_json).unwrap_or_default();
        let key = format!("{demand}|{strategy:?}|{labels:?}|{bundle:?}|{max_calls:?}|{env_name}");
        if let Some(pool) = self.pools.get(&key) {
            return Ok(pool.clone());
        }
        let wire = options.wire_strategy()?;
        let pool = Arc::new(ShapePool {
            request: RequestWorkerLeaseRequest {
                job_id: self.job_id.to_vec(),
                resources: Some(demand.into()),
                strategy: Some(wire),
                no_spillback: false,
                placement_group_id: bundle.map(|(group, _)| group.to_vec()).unwrap_or_default(),
                bundle_index: bundle.map(|(_, index)| index).unwrap_or_default(),
                holder_address: self.address.to_string(),
                depth: 1,
                avoid_nodes: Vec::new(),
                runtime_env,
            },
            leases: Mutex::new(Vec::new()),
            notify: Notify::new(),
            requesting: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            refusal: Mutex::new(None),
            run_times: Mutex::new(RunTimes::default()),
            next_bundle: AtomicUsize::new(0),
            max_calls: max_calls.map_or(0, |(_, calls)| calls),
        });
        Ok(self.pools.entry(key).or_insert(pool).clone())
    }

    /// A slot on one of the shape's leases (the least busy with room), asking the
    /// cluster for more leases while tasks wait. `None`: the task was taken meanwhile by
    /// the process that submitted it, to run itself (`crate::inline`); `unclaimed` says
    /// it still may be (a retry was claimed by its first attempt).
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        pool: &Arc<ShapePool>,
        estimate: u64,
        spec: &TaskSpec,
        unclaimed: bool,
    ) -> IonetResult<Option<Arc<Lease>>> {
        let depth = spec.depth;
        pool.waiting.fetch_add(1, Ordering::SeqCst);
        let since = tokio::time::Instant::now();
        let mut next_report = since + LONG_LEASE_WAIT;
        // Made at the first wait, not on the fast path; re-armed after each report.
        let mut report: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        let result = loop {
            let notified = pool.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let taken = spec.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            if unclaimed && spec.claimed.load(Ordering::SeqCst) {
                break Ok(None); // nobody else needs a lease asked for it
            }
            if let Some(lease) = take_slot(pool, estimate) {
                break Ok(Some(lease));
            }
            if let Some(refusal) = pool.refusal.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                break Err(ionet_common::rpc::status::copy_of(refusal));
            }
            let waiting = pool.waiting.load(Ordering::SeqCst);
            if pool.requesting.load(Ordering::SeqCst) < waiting.min(MAX_PENDING_LEASE_REQUESTS) {
                pool.requesting.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(request_lease(self.clone(), pool.clone(), depth));
            }
            let timer = report.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(next_report)));
            let fired = tokio::select! {
                _ = notified => false,
                _ = taken => false,
                _ = timer.as_mut() => true,
            };
            if fired {
                next_report += next_report.duration_since(since);
                timer.as_mut().reset(next_report);
                {
                    let leases = pool.leases.lock().unwrap_or_else(|p| p.into_inner());
                    let busy: Vec<usize> = leases.iter().map(|lease| lease.in_flight.load(Ordering::SeqCst)).collect();
                    tracing::warn!(
                        task = %spec.task_id.short(),
                        function = spec.function,
                        waited = ?since.elapsed(),
                        waiting = pool.waiting.load(Ordering::SeqCst),
                        requesting = pool.requesting.load(Ordering::SeqCst),
                        calls_per_lease = ?busy,
                        "a task is waiting long for a worker"
                    );
                }
            }
        };
        if pool.waiting.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The last waiter has heard the verdict; later tasks ask the cluster again.
            pool.refusal.lock().unwrap_or_else(|p| p.into_inner()).take();
        } else if matches!(result, Ok(Some(_))) {
            // Room may be left for the next waiter (a deeper pipeline, a fresh lease).
            pool.notify.notify_one();
        }
        result
    }

    /// A task on `lease` (expected to run `estimate`) has answered.
    pub(crate) fn release(&self, pool: &ShapePool, lease: &Lease, estimate: u64) {
        {
            let _leases = pool.leases.lock().unwrap_or_else(|p| p.into_inner());
            lease.queued_micros.fetch_sub(estimate, Ordering::SeqCst);
            if lease.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
                *lease.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            }
        }
        pool.notify.notify_one();
    }

    /// A lease of a pool with `max_calls` that has run its last call goes back with its
    /// worker discarded: the daemon ends the process and starts a fresh one when asked.
    pub(crate) async fn retire_if_spent(&self, pool: &ShapePool, lease: &Lease) {
        if pool.max_calls > 0
            && lease.started.load(Ordering::SeqCst) >= pool.max_calls
            && lease.in_flight.load(Ordering::SeqCst) == 0
        {
            self.return_lease(pool, lease, true).await;
        }
    }

    /// A fresh lease joins its pool.
    pub(crate) fn add_lease(&self, pool: &ShapePool, lease: Lease) {
        pool.leases.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::new(lease));
        pool.notify.notify_one();
        self.leased.notify_waiters();
    }

    /// Whether any pool holds a lease.
    pub(crate) fn holds_leases(&self) -> bool {
        self.pools.iter().any(|pool| !pool.leases.lock().unwrap_or_else(|p| p.into_inner()).is_empty())
    }

    /// Takes a lease whose worker failed out of its pool now and gives it back to its
    /// daemon in the background (a gone node would hold the caller up for a connect
    /// timeout), once, whoever asks first.
    pub(crate) fn return_failed_lease(self: &Arc<Self>, pool: &ShapePool, lease: &Arc<Lease>) {
        if lease.returned.swap(true, Ordering::SeqCst) {
            return;
        }
        pool.leases.lock().unwrap_or_else(|p| p.into_inner()).retain(|held| !Arc::ptr_eq(held, lease));
        let (worker, lease) = (self.clone(), lease.clone());
        self.handle.spawn(async move { worker.send_lease_back(&lease, true).await });
    }

    /// Gives a lease back to its daemon (once, whoever asks first).
    pub(crate) async fn return_lease(&self, pool: &ShapePool, lease: &Lease, worker_failed: bool) {
        if lease.returned.swap(true, Ordering::SeqCst) {
            return;
        }
        pool.leases.lock().unwrap_or_else(|p| p.into_inner()).retain(|held| !std::ptr::eq(&**held, lease));
        self.send_lease_back(lease, worker_failed).await;
    }

    async fn send_lease_back(&self, lease: &Lease, worker_failed: bool) {
        // The head hears it from the holder too: a node that keeps the lease open past
        // this is not paid for the rest.
        if lease.metered {
            self.held.returned(&lease.lease_id, &lease.node_id);
        }
        if let Ok(channel) = self.channel(&lease.node_address) {
            let mut node = NodeManagerClient::new(channel);
            let request = ReturnWorkerLeaseRequest { lease_id: lease.lease_id.clone(), worker_failed };
            if let Err(status) = node.return_worker_lease(request).await {
                // The daemon also ends a lease whose worker died; a lost return is logged, not fatal.
                tracing::debug!(error = %status.message(), "returning a lease failed");
            }
        }
    }

    /// Returns leases idle for `linger` whose shape nobody waits for (`everything`: all
    /// leases, busy or not). They leave their pool under its lock, so no task takes a slot
    /// on one being given back. Returns how many went back.
    pub(crate) async fn return_idle_leases(&self, everything: bool, linger: Duration) -> usize {
        let mut doomed = Vec::new();
        for pool in self.pools.iter() {
            // Leases whose stream ended go back even while tasks wait for the shape.
            let waited_for = !everything && pool.waiting.load(Ordering::SeqCst) > 0;
            let mut leases = pool.leases.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            leases.retain(|lease| {
                let ended = lease.tasks.has_ended();
                let idle = lease.in_flight.load(Ordering::SeqCst) == 0
                    && now.duration_since(*lease.idle_since.lock().unwrap_or_else(|p| p.into_inner())) >= linger;
                let due = ended || (!waited_for && (everything || idle));
                let leaving = due && !lease.returned.swap(true, Ordering::SeqCst);
                if leaving {
                    // A worker that ran calls with `max_calls` is not handed to anyone else.
                    let discard = ended || (pool.max_calls > 0 && lease.started.load(Ordering::SeqCst) > 0);
                    doomed.push((lease.clone(), discard, ended));
                }
                !leaving
            });
        }
        let returned = doomed.len();
        for (lease, discard, ended) in doomed {
            match crate::runtime::current() {
                // Its node may be gone: not waited for (a connect timeout each).
                Ok(worker) if ended => {
                    self.handle.spawn(async move { worker.send_lease_back(&lease, discard).await });
                }
                _ => self.send_lease_back(&lease, discard).await,
            }
        }
        returned
    }
}

/// Takes a slot for a task expected to run `estimate` on the lease [`slots::choose`]
/// picks, under the pool's lock (so two tasks never both take a lease's last room).
fn take_slot(pool: &ShapePool, estimate: u64) -> Option<Arc<Lease>> {
    let leases = pool.leases.lock().unwrap_or_else(|p| p.into_inner());
    let slots = leases.iter().map(|lease| Slot {
        in_flight: lease.in_flight.load(Ordering::SeqCst),
        queued_micros: lease.queued_micros.load(Ordering::SeqCst),
        // A lease whose stream ended (its worker or node died) takes nothing more.
        spent: (pool.max_calls > 0 && lease.started.load(Ordering::SeqCst) >= pool.max_calls)
            || lease.tasks.has_ended(),
    });
    let lease = &leases[slots::choose(slots, estimate)?];
    if pool.max_calls > 0 {
        lease.started.fetch_add(1, Ordering::SeqCst);
    }
    lease.in_flight.fetch_add(1, Ordering::SeqCst);
    lease.queued_micros.fetch_add(estimate, Ordering::SeqCst);
    Some(lease.clone())
}

/// Asks the local daemon for a lease (a bundle's node for a placement group), following
/// spillbacks ([`lease::request`]); puts it in the pool, or tells the waiters the final
/// verdict. An unavailable daemon (restarting, unreachable) is asked again, from our own
/// node, paced by [`Backoff`], for up to [`LEASE_UNAVAILABLE_LIMIT`].
async fn request_lease(worker: Arc<CoreWorker>, pool: Arc<ShapePool>, depth: u32) {
    let mut backoff = Backoff::new(Some(LEASE_UNAVAILABLE_LIMIT));
    let mut warned = false;
    let verdict = loop {
        let mut request = pool.request.clone();
        request.depth = depth;
        let mut address = worker.node_address.clone();
        // A bundle's lease is asked of the node holding the bundle, once the group is placed.
        if !request.placement_group_id.is_empty() {
            match bundle_address(&worker, &mut request, &pool.next_bundle).await {
                Ok(bundle_node) => {
                    address = bundle_node;
                    request.no_spillback = true;
                }
                Err(error) => break Err(error),
            }
        }
        match lease::request(|address| worker.channel(address), address, request).await {
            LeaseOutcome::Granted { lease, node_address } => break Ok((lease, node_address)),
            LeaseOutcome::Unavailable(reason) => match backoff.after_failure() {
                Some(pause) => {
                    if !warned {
                        tracing::warn!(%reason, "no lease for now; asking again");
                        warned = true;
                    }
                    tokio::time::sleep(pause).await;
                }
                None => {
                    break Err(IonetError::Unavailable(format!(
                        "no node answered lease requests for {LEASE_UNAVAILABLE_LIMIT:?}: {reason}"
                    )))
                }
            },
            refused => break Err(refused.into_error().expect("not a grant")),
        }
    };
    pool.requesting.fetch_sub(1, Ordering::SeqCst);
    match verdict.and_then(|(granted, node_address)| {
        let metered = pool.request.placement_group_id.is_empty()
            && pool
                .request
                .resources
                .as_ref()
                .is_some_and(|resources| resources.units.values().any(|units| *units > 0));
        if metered {
            worker.held.granted(&granted.lease_id, &granted.node_id, pool.request.resources.clone());
        }
        let channel = worker.channel(&granted.worker_address).inspect_err(|_| {
            if metered {
                worker.held.returned(&granted.lease_id, &granted.node_id);
            }
        })?;
        let place = Arc::new(crate::task_events::Place {
            node_id: granted.node_id.clone(),
            worker_address: granted.worker_address.clone(),
        });
        Ok(Lease {
            lease_id: granted.lease_id,
            node_id: granted.node_id,
            place,
            metered,
            node_address,
            worker_address: granted.worker_address.clone(),
            tasks: TaskStream::open(&worker.handle, channel, worker.address.clone()),
            in_flight: AtomicUsize::new(0),
            queued_micros: AtomicU64::new(0),
            idle_since: Mutex::new(Instant::now()),
            returned: AtomicBool::new(false),
            killed_by_cancel: AtomicBool::new(false),
            started: AtomicU32::new(0),
        })
    }) {
        Ok(lease) => worker.add_lease(&pool, lease),
        Err(error) => {
            tracing::warn!(%error, "lease request refused");
            *pool.refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
            pool.notify.notify_waiters();
        }
    }
}

/// The address of the node holding the request's bundle ([`lease::bundle_target`]),
/// waiting while the group is pending. For a request naming any bundle (`ANY_BUNDLE`), the
/// bundle is chosen in turn (`rotation`) and written into the request.
async fn bundle_address(
    worker: &CoreWorker,
    request: &mut RequestWorkerLeaseRequest,
    rotation: &AtomicUsize,
) -> IonetResult<String> {
    let group = ionet_common::PlacementGroupId::from_bytes(&request.placement_group_id)?;
    let mut backoff = Backoff::new(Some(LEASE_UNAVAILABLE_LIMIT));
    loop {
        match crate::placement_group::get_group(worker, &group).await {
            Ok(row) => {
                let turn = if request.bundle_index == lease::ANY_BUNDLE {
                    rotation.fetch_add(1, Ordering::Relaxed)
                } else {
                    0
                };
                match lease::bundle_target(&row, request.bundle_index, turn) {
                    Ok((address, bundle)) => {
                        request.bundle_index = bundle;
                        return Ok(address);
                    }
                    // Not reserved yet: asked again in a moment.
                    Err(LeaseOutcome::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
                    Err(refused) => return Err(refused.into_error().expect("not a grant")),
                }
            }
            Err(err) if !err.is_retryable() => return Err(err),
            Err(err) => match backoff.after_failure() {
                Some(pause) => tokio::time::sleep(pause).await,
                None => {
                    return Err(IonetError::Unavailable(format!(
                        "cannot read placement group {}: {err}",
                        group.short()
                    )))
                }
            },
        }
    }
}
