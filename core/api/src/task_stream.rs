//! The task stream of one lease: tasks go out numbered in batches, replies come back in
//! batches and are matched to their pushes by number; when the stream ends, every push
//! still waiting gets the stream's error (the worker is gone).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ionet_common::rpc::proto::worker::{NumberedReply, PushTaskReply, PushTaskRequest, ReplyBatch, TaskBatch};
use ionet_common::rpc::{AuthChannel, CoreWorkerClient};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

/// The task stream of one lease: tasks go out numbered, each push waits for the reply with
/// its number. When the stream ends, every push still waiting gets the stream's error.
pub(crate) struct TaskStream {
    outgoing: mpsc::UnboundedSender<PushTaskRequest>,
    waiting: Arc<Mutex<WaitingPushes>>,
    next: AtomicU64,
}

#[derive(Default)]
struct WaitingPushes {
    replies: HashMap<u64, oneshot::Sender<Result<PushTaskReply, Status>>>,
    /// Why the stream ended, once it has.
    ended: Option<Status>,
}

/// Tasks sent in one message at most.
const MAX_TASK_BATCH: usize = 256;

impl TaskStream {
    /// `caller`: this process's address (the worker lends it the refs its replies hold).
    pub(crate) fn open(handle: &tokio::runtime::Handle, channel: AuthChannel, caller: Arc<str>) -> TaskStream {
        let (outgoing, queued) = mpsc::unbounded_channel();
        let waiting = Arc::new(Mutex::new(WaitingPushes::default()));
        handle.spawn(read_task_replies(channel, queued, waiting.clone(), caller));
        TaskStream { outgoing, waiting, next: AtomicU64::new(0) }
    }

    /// Whether the stream has ended (its worker or node is gone): nothing pushed on it
    /// now would run.
    pub(crate) fn has_ended(&self) -> bool {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).ended.is_some()
    }

    pub(crate) async fn push(&self, mut request: PushTaskRequest) -> Result<PushTaskReply, Status> {
        request.sequence = self.next.fetch_add(1, Ordering::Relaxed);
        let (reply, replied) = oneshot::channel();
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(status) = &waiting.ended {
                return Err(status.clone());
            }
            waiting.replies.insert(request.sequence, reply);
        }
        if self.outgoing.send(request).is_err() {
            return Err(Status::unavailable("the lease's task stream is closed"));
        }
        replied.await.unwrap_or_else(|_| Err(Status::unavailable("the lease's task stream was dropped")))
    }
}

async fn read_task_replies(
    channel: AuthChannel,
    queued: mpsc::UnboundedReceiver<PushTaskRequest>,
    waiting: Arc<Mutex<WaitingPushes>>,
    caller: Arc<str>,
) {
    let mut client =
        CoreWorkerClient::new(channel).max_decoding_message_size(ionet_common::rpc::DEFAULT_MAX_MESSAGE_BYTES);
    // The caller names itself once, in the stream's first batch.
    let batches = futures::stream::unfold((queued, Some(caller)), |(mut queued, caller)| async move {
        let mut tasks = vec![queued.recv().await?];
        while tasks.len() < MAX_TASK_BATCH {
            match queued.try_recv() {
                Ok(task) => tasks.push(task),
                Err(_) => break,
            }
        }
        let caller_address = caller.as_deref().map(str::to_string).unwrap_or_default();
        Some((TaskBatch { tasks, caller_address }, (queued, None)))
    });
    let ended = match client.tasks(batches).await {
        Err(status) => status,
        Ok(response) => {
            let ended_by_worker = "the worker ended the lease's task stream";
            read_reply_batches(response.into_inner(), ended_by_worker, |replies| {
                let mut waiting = waiting.lock().unwrap_or_else(|p| p.into_inner());
                for NumberedReply { sequence, reply } in replies {
                    if let Some(sender) = waiting.replies.remove(&sequence) {
                        let _ = sender.send(Ok(reply.unwrap_or_default()));
                    }
                }
            })
            .await
        }
    };
    let mut waiting = waiting.lock().unwrap_or_else(|p| p.into_inner());
    for (_, sender) in waiting.replies.drain() {
        let _ = sender.send(Err(ended.clone()));
    }
    waiting.ended = Some(ended);
}

/// Reads a stream of reply batches to its end, handing each batch to `each`; returns why
/// it ended (`ended_by_peer` when the other side closed it).
pub(crate) async fn read_reply_batches(
    mut replies: tonic::Streaming<ReplyBatch>,
    ended_by_peer: &str,
    mut each: impl FnMut(Vec<NumberedReply>),
) -> Status {
    loop {
        match replies.message().await {
            Ok(Some(batch)) => each(batch.replies),
            Ok(None) => return Status::unavailable(ended_by_peer),
            Err(status) => return status,
        }
    }
}
