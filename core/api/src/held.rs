//! The holder's side of lease metering: this process tells the head, in batches and off
//! the task path, which leases it was granted and which it gave back. The head bills a
//! lease only while both its node and its holder say it runs, so a node that keeps a
//! returned lease open is not paid for the time after the return.
//!
//! Words are sent in the order they happened (one batch in flight at a time), each with
//! its age, so the head dates it back by the time it waited here (a few seconds at most
//! count). A batch the head cannot take for now is sent again; one it refuses is logged
//! and dropped (metering never blocks a task).

use std::time::{Duration, Instant};

use ionet_common::auth::Bearer;
use ionet_common::rpc::proto::common::ResourceQuantities;
use ionet_common::rpc::proto::metering::{HeldLease, ReportHeldLeasesRequest};
use ionet_common::rpc::{self, MeteringClient};
use ionet_common::JobId;
use tokio::sync::{mpsc, oneshot};

/// How long words gather before they go as one batch.
const BATCH_PERIOD: Duration = Duration::from_millis(100);
/// The most words one batch carries (the head takes up to 10,000).
const MAX_BATCH: usize = 4_096;
/// How long a batch is offered again while the head is away before it is dropped.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);

enum Message {
    /// When, lease, node, granted, what was asked (with a grant).
    Word(Instant, Vec<u8>, Vec<u8>, bool, Option<ResourceQuantities>),
    Flush(oneshot::Sender<()>),
}

/// Queues this process's words about its leases for the head.
pub(crate) struct HeldLeases {
    sender: mpsc::UnboundedSender<Message>,
}

impl HeldLeases {
    /// Starts the reporter on `handle`: it sends batches for `job_id` to the head at
    /// `gcs_address` with `credential` (the job's own).
    pub(crate) fn start(
        handle: &tokio::runtime::Handle,
        gcs_address: String,
        credential: Bearer,
        job_id: JobId,
    ) -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        handle.spawn(report(gcs_address, credential, job_id, receiver));
        Self { sender }
    }

    /// This process was granted `lease_id` by node `node_id`, having asked for `asked`.
    pub(crate) fn granted(&self, lease_id: &[u8], node_id: &[u8], asked: Option<ResourceQuantities>) {
        let _ = self.sender.send(Message::Word(Instant::now(), lease_id.to_vec(), node_id.to_vec(), true, asked));
    }

    /// This process gave `lease_id` back (or abandoned it).
    pub(crate) fn returned(&self, lease_id: &[u8], node_id: &[u8]) {
        let _ = self.sender.send(Message::Word(Instant::now(), lease_id.to_vec(), node_id.to_vec(), false, None));
    }

    /// Waits (up to `timeout`) until every word queued so far has been sent.
    pub(crate) async fn flush(&self, timeout: Duration) {
        let (done, flushed) = oneshot::channel();
        if self.sender.send(Message::Flush(done)).is_ok() {
            let _ = tokio::time::timeout(timeout, flushed).await;
        }
    }
}

async fn report(
    gcs_address: String,
    credential: Bearer,
    job_id: JobId,
    mut receiver: mpsc::UnboundedReceiver<Message>,
) {
    let mut client: Option<MeteringClient> = None;
    let mut pending: Vec<(Instant, HeldLease)> = Vec::new();
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    while let Some(first) = receiver.recv().await {
        let take =
            |message: Message, pending: &mut Vec<(Instant, HeldLease)>, flushes: &mut Vec<oneshot::Sender<()>>| {
                match message {
                    Message::Word(at, lease_id, node_id, granted, resources) => {
                        pending.push((at, HeldLease { lease_id, node_id, granted, age_ms: 0, resources }))
                    }
                    Message::Flush(done) => flushes.push(done),
                }
            };
        take(first, &mut pending, &mut flushes);
        if flushes.is_empty() {
            tokio::time::sleep(BATCH_PERIOD).await;
        }
        while pending.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(message) => take(message, &mut pending, &mut flushes),
                Err(_) => break,
            }
        }
        while !pending.is_empty() {
            let cut = pending.len().min(MAX_BATCH);
            let batch: Vec<(Instant, HeldLease)> = pending.drain(..cut).collect();
            send(&gcs_address, &credential, job_id, &mut client, batch).await;
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Sends one batch, again while the head is unavailable (up to [`GIVE_UP_AFTER`]).
async fn send(
    gcs_address: &str,
    credential: &Bearer,
    job_id: JobId,
    client: &mut Option<MeteringClient>,
    batch: Vec<(Instant, HeldLease)>,
) {
    let first_try = Instant::now();
    let mut pause = Duration::from_millis(100);
    loop {
        if client.is_none() {
            *client = rpc::metering_client(gcs_address, credential).await.ok();
        }
        let result = match client.as_mut() {
            Some(metering) => {
                let leases = batch
                    .iter()
                    .map(|(at, word)| HeldLease {
                        age_ms: at.elapsed().as_millis().min(u128::from(u64::MAX)) as u64,
                        ..word.clone()
                    })
                    .collect();
                metering
                    .report_held_leases(ReportHeldLeasesRequest { job_id: job_id.to_vec(), leases })
                    .await
                    .map(|_| ())
            }
            None => Err(tonic::Status::unavailable(format!("cannot reach the head at {gcs_address}"))),
        };
        match result {
            Ok(()) => return,
            Err(status) if status.code() == tonic::Code::Unavailable && first_try.elapsed() < GIVE_UP_AFTER => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(status) => {
                tracing::warn!(error = %status.message(), leases = batch.len(), "the head did not take this process's lease reports");
                return;
            }
        }
    }
}
