//! The rows of the actors this process holds handles to, followed on one `WatchActors`
//! stream to the head for all of them. A `GetActor` long poll per handle held a stream
//! of the head's connection each: ten thousand handles were ten thousand streams, near
//! the limit at which hyper's client can hang (hyperium/hyper#3559).
//!
//! Each followed actor has a watch channel of its latest row ([`Followed`]); the stream
//! task sets it from the head's replies and, when the stream breaks (a head restarting),
//! opens another and asks for every actor still followed. An actor is forgotten here
//! once DEAD, refused, or followed by nobody when its next row comes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ionet_common::rpc::proto::gcs::{ActorInfo, ActorState, WatchActorsRequest};
use ionet_common::ActorId;
use tokio::sync::{mpsc, watch};

use crate::runtime::CoreWorker;

/// What this process knows of a followed actor's row.
#[derive(Clone, Debug, Default)]
pub(crate) enum Followed {
    /// Nothing from the head yet.
    #[default]
    Unknown,
    Row(Arc<ActorInfo>),
    /// The head will not follow it (no such actor, another account's): its callers ask
    /// by `GetActor`, which says why.
    Refused,
}

/// Longest pause between attempts to open the stream again.
const MAX_PAUSE: Duration = Duration::from_secs(2);

#[derive(Default)]
pub(crate) struct ActorRows {
    inner: Mutex<Inner>,
    /// Streams opened since the process started (one, unless the head restarted).
    opened: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct Inner {
    followed: HashMap<ActorId, watch::Sender<Followed>>,
    /// The open stream's requests (`None` while none is open, or before the first).
    requests: Option<mpsc::UnboundedSender<WatchActorsRequest>>,
    started: bool,
    /// Whether a stream is open now (its replies read).
    open: bool,
    /// The head serves no `WatchActors` (an older one): every follow is refused at once,
    /// and callers ask by `GetActor`.
    unsupported: bool,
}

fn follow_request(id: &ActorId) -> WatchActorsRequest {
    WatchActorsRequest { actor_id: id.to_vec(), stop: false }
}

impl ActorRows {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Follows actor `id` (once per process however many ask): its row as the head last
    /// said it, and each change after.
    pub(crate) fn follow(&self, worker: &Arc<CoreWorker>, id: ActorId) -> watch::Receiver<Followed> {
        let mut inner = self.lock();
        if inner.unsupported {
            return watch::channel(Followed::Refused).1;
        }
        if let Some(row) = inner.followed.get(&id) {
            return row.subscribe();
        }
        let (row, receiver) = watch::channel(Followed::Unknown);
        inner.followed.insert(id, row);
        // A stream that is gone already asks again for every actor when it opens anew.
        if let Some(requests) = &inner.requests {
            let _ = requests.send(follow_request(&id));
        }
        if !inner.started {
            inner.started = true;
            worker.handle.spawn(run(Arc::downgrade(worker)));
        }
        receiver
    }

    /// Takes the head's word on an actor: its row, or why it will not follow it.
    fn learn(&self, id: ActorId, news: Followed) {
        let mut inner = self.lock();
        let Some(row) = inner.followed.get(&id) else { return };
        let done = match &news {
            Followed::Row(info) => info.state == ActorState::Dead as i32,
            _ => true,
        };
        let followed = row.receiver_count() > 0;
        row.send_replace(news);
        if done || !followed {
            inner.followed.remove(&id);
            if !done {
                if let Some(requests) = &inner.requests {
                    let _ = requests.send(WatchActorsRequest { actor_id: id.to_vec(), stop: true });
                }
            }
        }
    }

    /// Whether a stream is open now: a row not known yet comes within a round trip.
    pub(crate) fn is_open(&self) -> bool {
        self.lock().open
    }

    /// Notes that the stream was opened, or ended.
    fn set_open(&self, open: bool) {
        self.lock().open = open;
    }

    /// The head cannot follow actors: every actor followed, and every one from now on,
    /// is refused (their callers ask by `GetActor`).
    fn give_up(&self) {
        let mut inner = self.lock();
        inner.unsupported = true;
        inner.open = false;
        for (_, row) in inner.followed.drain() {
            row.send_replace(Followed::Refused);
        }
    }

    /// Streams opened so far, and the actors followed now.
    pub(crate) fn counts(&self) -> (usize, usize) {
        (self.opened.load(std::sync::atomic::Ordering::Relaxed), self.lock().followed.len())
    }

    /// A new stream's requests: every actor followed now, and those followed from now on.
    fn open(&self) -> mpsc::UnboundedReceiver<WatchActorsRequest> {
        self.opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut inner = self.lock();
        let (requests, receiver) = mpsc::unbounded_channel();
        for id in inner.followed.keys() {
            let _ = requests.send(follow_request(id));
        }
        inner.requests = Some(requests);
        receiver
    }
}

/// The stream to the head, opened again whenever it ends, until the process leaves the
/// cluster.
async fn run(worker: Weak<CoreWorker>) {
    let mut pause = Duration::from_millis(50);
    loop {
        let Some(current) = worker.upgrade() else { return };
        let mut stopping = current.stopping.subscribe();
        if *stopping.borrow() {
            return;
        }
        let requests = current.actor_rows.open();
        let gcs = current.gcs();
        drop(current);
        let opened = match gcs {
            Ok(mut gcs) => gcs.watch_actors(tokio_stream::wrappers::UnboundedReceiverStream::new(requests)).await,
            Err(err) => Err(tonic::Status::unavailable(err.to_string())),
        };
        match opened {
            Ok(replies) => {
                let mut replies = replies.into_inner();
                if let Some(current) = worker.upgrade() {
                    current.actor_rows.set_open(true);
                }
                loop {
                    let reply = tokio::select! {
                        reply = replies.message() => reply,
                        _ = stopping.wait_for(|stop| *stop) => return,
                    };
                    let Ok(Some(reply)) = reply else { break };
                    let Ok(id) = ActorId::from_bytes(&reply.actor_id) else { continue };
                    let Some(current) = worker.upgrade() else { return };
                    let news = match reply.actor {
                        Some(info) => Followed::Row(Arc::new(info)),
                        None => {
                            tracing::debug!(actor = %id.short(), error = %reply.error, "the control store will not follow an actor");
                            Followed::Refused
                        }
                    };
                    current.actor_rows.learn(id, news);
                    pause = Duration::from_millis(50);
                }
                if let Some(current) = worker.upgrade() {
                    current.actor_rows.set_open(false);
                }
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                tracing::debug!(error = %status.message(), "the control store cannot follow actors: asking by GetActor");
                if let Some(current) = worker.upgrade() {
                    current.actor_rows.give_up();
                }
                return;
            }
            Err(status) => {
                tracing::debug!(error = %status.message(), "cannot follow actors on the control store; trying again");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stopping.wait_for(|stop| *stop) => return,
        }
        pause = (pause * 2).min(MAX_PAUSE);
    }
}
