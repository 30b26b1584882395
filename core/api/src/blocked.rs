//! Telling the node daemon when this worker's task waits for objects, so that the lease's
//! CPUs serve the tasks it waits for meanwhile (Ray's blocked-worker resource release).
//!
//! Protocol: every thread that is about to wait in `get`/`wait` holds a [`BlockedGuard`];
//! the worker counts as blocked while any guard lives. One background task reports the
//! changes in order (`SetWorkerBlocked`), reading the count afresh each time it wakes, so
//! a wait that ends before the report goes out costs no message at all, and the last
//! report always matches the count. Drivers hold no lease and report nothing.
//!
//! The daemon decides what a report means (how many blocked workers may release their
//! CPUs at once; taking CPUs back past what is free on resuming): see `worker/src/lease.rs`.
//!
//! The same task reports, in the same way, whether the worker holds objects for other
//! processes (`SetWorkerHolding`, from `crate::borrows`): a worker that lent objects out
//! is not stopped for being idle, as its objects would go with it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ionet_common::rpc::proto::node::{SetWorkerBlockedRequest, SetWorkerHoldingRequest};
use ionet_common::rpc::NodeManagerClient;
use tokio::sync::Notify;

/// Reports this worker's blocked state to its node daemon.
pub(crate) struct BlockedReporter {
    /// Threads of this process waiting for objects now.
    waiting: AtomicUsize,
    /// How many lends of objects this worker has out to other processes now
    /// (`crate::borrows` counts them).
    lends_out: Arc<AtomicUsize>,
    changed: Notify,
}

impl BlockedReporter {
    /// Starts the reporting task on `handle`.
    pub(crate) fn start(
        handle: &tokio::runtime::Handle,
        node: NodeManagerClient,
        worker_id: Vec<u8>,
        lends_out: Arc<AtomicUsize>,
    ) -> Arc<BlockedReporter> {
        let reporter = Arc::new(BlockedReporter { waiting: AtomicUsize::new(0), lends_out, changed: Notify::new() });
        // Lends may have gone out before the reporter started: the first look reports them.
        reporter.changed.notify_one();
        handle.spawn(report(reporter.clone(), node, worker_id));
        reporter
    }

    /// The calling thread waits for objects until the guard drops.
    pub(crate) fn enter(self: &Arc<Self>) -> BlockedGuard {
        if self.waiting.fetch_add(1, Ordering::SeqCst) == 0 {
            self.changed.notify_one();
        }
        BlockedGuard { reporter: self.clone() }
    }

    fn blocked(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }

    /// Lends of objects went out to other processes or came back.
    pub(crate) fn lends_changed(&self) {
        self.changed.notify_one();
    }
}

/// A thread waiting for objects (see [`BlockedReporter::enter`]).
pub struct BlockedGuard {
    reporter: Arc<BlockedReporter>,
}

impl Drop for BlockedGuard {
    fn drop(&mut self) {
        if self.reporter.waiting.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.reporter.changed.notify_one();
        }
    }
}

/// The reporting task: lives as long as the worker process.
async fn report(reporter: Arc<BlockedReporter>, mut node: NodeManagerClient, worker_id: Vec<u8>) {
    let mut reported = false;
    let mut reported_holding = false;
    loop {
        reporter.changed.notified().await;
        loop {
            let holding = reporter.lends_out.load(Ordering::SeqCst) > 0;
            if holding != reported_holding {
                let request = SetWorkerHoldingRequest { worker_id: worker_id.clone(), holding };
                if let Err(status) = node.set_worker_holding(request).await {
                    tracing::debug!(error = %status.message(), holding, "the node daemon did not take a holding report");
                }
                reported_holding = holding;
                continue;
            }
            let now = reporter.blocked();
            if now == reported {
                break;
            }
            let request = SetWorkerBlockedRequest { worker_id: worker_id.clone(), blocked: now };
            match node.set_worker_blocked(request).await {
                // Not found: between leases (the report came after the lease ended), so
                // there is nothing to release or take back.
                Ok(_) => reported = now,
                Err(status) if status.code() == tonic::Code::NotFound => reported = now,
                Err(status) => {
                    tracing::debug!(error = %status.message(), blocked = now, "the node daemon did not take a blocked report");
                    reported = now;
                }
            }
        }
    }
}
