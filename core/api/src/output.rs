//! A worker's output, as its job's driver sees it (Ray's `log_to_driver`).
//!
//! Worker side: a worker whose output its node daemon follows (`OUTPUT_FOLLOWED` set)
//! writes a marker line naming the task or actor it starts running whenever that changes
//! ([`name_output`]); the daemon reads the lines after it as that task's
//! (`worker/src/logs.rs`).
//!
//! Driver side ([`Follower`]): a driver follows its job's output on every live node
//! (`NodeManager/StreamLogs`, looking for new nodes every few seconds) and prints each line
//! to its own stdout as `(name pid=…, ip=…) line`. Lines that repeat across workers are
//! folded as Ray folds them: the first of a kind (words with digits ignored) is printed at
//! once, the repeats within [`DEDUP_WINDOW`] are counted and printed once with
//! `[repeated Nx across cluster]` (`IONET_DEDUP_LOGS=0` prints every line). When the driver
//! stops, it waits (briefly) for a pass over every node's output that began after it
//! stopped, so what its tasks printed last is not lost.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ionet_common::rpc::proto::node::{LogLine, StreamLogsRequest};
use ionet_common::rpc::NodeManagerClient;
use ionet_common::worker_env::{OUTPUT_FOLLOWED, OUTPUT_NAME_MARKER};
use ionet_common::{JobId, NodeId};

use crate::runtime::CoreWorker;

/// Names the task or actor this worker runs from now on in its output, when its node
/// follows it and the name changed. Names under `ionet.` are the language bindings'
/// generic entries, which name their output themselves.
pub fn name_output(name: &str) {
    static FOLLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    static LAST: Mutex<String> = Mutex::new(String::new());
    let followed = FOLLOWED.get_or_init(|| {
        std::env::var(OUTPUT_FOLLOWED).is_ok_and(|value| value == "1")
            && crate::runtime::current().is_ok_and(|worker| worker.is_worker)
    });
    if !*followed || name.starts_with("ionet.") {
        return;
    }
    // Ray shows a function or class by its own name, not its module path.
    let name = name.rsplit("::").next().unwrap_or(name);
    let mut last = LAST.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if *last == name {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{OUTPUT_NAME_MARKER}{name}");
    let _ = out.flush();
    *last = name.to_string();
}

/// How long repeats of a line are counted before they are printed as one.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(5);
/// How often the driver looks for nodes it does not follow yet.
const NODE_LOOK: Duration = Duration::from_secs(2);

/// Repeats of one kind of line, waiting to be printed.
struct Repeated {
    first_seen: Instant,
    /// The worker that printed it first (`pid@ip`): its own lines of this kind print as
    /// they come until another worker prints one too.
    first_source: String,
    /// Another worker printed it too: repeats are counted from then on.
    folding: bool,
    count: u64,
    /// The last repeat, printed with the count.
    prefix: String,
    text: String,
}

/// Folds repeated lines (sans-I/O: `Instant`s come in, lines to print go out).
pub(crate) struct Deduper {
    enabled: bool,
    seen: HashMap<String, Repeated>,
}

/// A line's kind: its words with digits in them blanked (`step 3 of 10` ~ `step 4 of 10`).
fn kind_of(text: &str) -> String {
    text.split_whitespace()
        .map(|word| if word.chars().any(|c| c.is_ascii_digit()) { "*" } else { word })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Deduper {
    pub(crate) fn new(enabled: bool) -> Self {
        Deduper { enabled, seen: HashMap::new() }
    }

    /// A line from worker `source` arrived: what to print now. Lines fold only across
    /// workers (one worker's own `epoch 1`, `epoch 2`… all print, as in Ray).
    pub(crate) fn line(&mut self, now: Instant, source: &str, prefix: String, text: String) -> Option<String> {
        if !self.enabled {
            return Some(format!("{prefix} {text}"));
        }
        let kind = kind_of(&text);
        match self.seen.get_mut(&kind) {
            Some(repeated) if now.duration_since(repeated.first_seen) < DEDUP_WINDOW => {
                if !repeated.folding && repeated.first_source == source {
                    return Some(format!("{prefix} {text}"));
                }
                repeated.folding = true;
                repeated.count += 1;
                repeated.prefix = prefix;
                repeated.text = text;
                None
            }
            _ => {
                let printed = format!("{prefix} {text}");
                let first_source = source.to_string();
                self.seen
                    .insert(kind, Repeated { first_seen: now, first_source, folding: false, count: 0, prefix, text });
                Some(printed)
            }
        }
    }

    /// The folded repeats whose window ended by `now` (all of them when `all`).
    pub(crate) fn flush(&mut self, now: Instant, all: bool) -> Vec<String> {
        let mut printed = Vec::new();
        self.seen.retain(|_, repeated| {
            if !all && now.duration_since(repeated.first_seen) < DEDUP_WINDOW {
                return true;
            }
            if repeated.count > 0 {
                printed.push(format!(
                    "{} {} [repeated {}x across cluster]",
                    repeated.prefix, repeated.text, repeated.count
                ));
            }
            false
        });
        printed
    }
}

/// One node's stream, as its follower sees it.
#[derive(Default)]
struct Followed {
    /// Passes over the node's output received.
    passes: AtomicU64,
    /// The stream ended (the node went, or refused): nothing more to wait for.
    done: std::sync::atomic::AtomicBool,
}

/// A driver's following of its job's output on every node.
pub(crate) struct Follower {
    dedup: Mutex<Deduper>,
    /// Each followed node's stream.
    nodes: Mutex<HashMap<NodeId, Arc<Followed>>>,
    /// The tasks following; `None` once the driver stopped (a task started later stops at once).
    tasks: Mutex<Option<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Follower {
    /// Starts following `job`'s output on the cluster `worker` is part of.
    pub(crate) fn start(worker: &Arc<CoreWorker>) -> Arc<Follower> {
        let dedup = std::env::var("IONET_DEDUP_LOGS").map_or(true, |value| value != "0");
        let follower = Arc::new(Follower {
            dedup: Mutex::new(Deduper::new(dedup)),
            nodes: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Some(Vec::new())),
        });
        let looking = worker.handle.spawn(look_for_nodes(Arc::downgrade(worker), follower.clone()));
        let flushing = worker.handle.spawn(flush_repeats(follower.clone()));
        follower.keep(looking);
        follower.keep(flushing);
        follower
    }

    /// Keeps `task` to stop with the rest, or stops it now if the driver stopped.
    fn keep(&self, task: tokio::task::JoinHandle<()>) {
        match self.tasks.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            Some(tasks) => tasks.push(task),
            None => task.abort(),
        }
    }

    fn print(&self, lines: Vec<LogLine>, ip: &str) {
        if lines.is_empty() {
            return;
        }
        let now = Instant::now();
        let printed: Vec<String> = {
            let mut dedup = self.dedup.lock().unwrap_or_else(|p| p.into_inner());
            lines
                .into_iter()
                .filter_map(|line| {
                    let source = format!("{}@{ip}", line.pid);
                    dedup.line(now, &source, ionet_worker::logs::prefix_of(&line, ip), line.text)
                })
                .collect()
        };
        emit(printed);
    }

    /// The driver stops: waits up to `patience` for a pass over every followed node's
    /// output that began after now, prints the repeats still counted, and stops following.
    pub(crate) async fn finish(&self, patience: Duration) {
        let marks: Vec<(Arc<Followed>, u64)> = {
            let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            nodes.values().map(|followed| (followed.clone(), followed.passes.load(Ordering::SeqCst))).collect()
        };
        let behind = || {
            marks.iter().any(|(followed, mark)| {
                !followed.done.load(Ordering::SeqCst) && followed.passes.load(Ordering::SeqCst) < mark + 2
            })
        };
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline && behind() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for task in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default() {
            task.abort();
        }
        let rest = self.dedup.lock().unwrap_or_else(|p| p.into_inner()).flush(Instant::now(), true);
        emit(rest);
        // Out before the driver's own last words.
        let printed = tokio::task::spawn_blocking(|| writer().flush(Duration::from_secs(1)));
        let _ = printed.await;
    }
}

/// What the writer thread is given.
enum Out {
    Lines(Vec<String>),
    /// Told once everything before it is written.
    Flush(std::sync::mpsc::Sender<()>),
}

/// Writes the followed lines to stdout on a thread of its own: a slow terminal or pipe
/// never holds up the driver's runtime.
struct Writer(std::sync::mpsc::Sender<Out>);

impl Writer {
    fn flush(&self, patience: Duration) {
        let (done, flushed) = std::sync::mpsc::channel();
        if self.0.send(Out::Flush(done)).is_ok() {
            let _ = flushed.recv_timeout(patience);
        }
    }
}

fn writer() -> &'static Writer {
    static WRITER: std::sync::OnceLock<Writer> = std::sync::OnceLock::new();
    WRITER.get_or_init(|| {
        let (sender, received) = std::sync::mpsc::channel::<Out>();
        let _ = std::thread::Builder::new().name("ionet-output".into()).spawn(move || {
            for out in received {
                match out {
                    Out::Lines(lines) => {
                        let mut stdout = std::io::stdout().lock();
                        for line in lines {
                            let _ = writeln!(stdout, "{line}");
                        }
                        let _ = stdout.flush();
                    }
                    Out::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Writer(sender)
    })
}

fn emit(printed: Vec<String>) {
    if !printed.is_empty() {
        let _ = writer().0.send(Out::Lines(printed));
    }
}

/// Prints the folded repeats as their windows end.
async fn flush_repeats(follower: Arc<Follower>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let printed = follower.dedup.lock().unwrap_or_else(|p| p.into_inner()).flush(Instant::now(), false);
        emit(printed);
    }
}

/// Follows every live node's output for this job, looking for new nodes now and then.
async fn look_for_nodes(worker: std::sync::Weak<CoreWorker>, follower: Arc<Follower>) {
    loop {
        let Some(core) = worker.upgrade() else { return };
        let nodes = live_nodes(&core).await.unwrap_or_default();
        for (node_id, address) in nodes {
            let fresh = {
                let mut nodes = follower.nodes.lock().unwrap_or_else(|p| p.into_inner());
                if nodes.contains_key(&node_id) {
                    None
                } else {
                    let followed = Arc::new(Followed::default());
                    nodes.insert(node_id, followed.clone());
                    Some(followed)
                }
            };
            if let Some(followed) = fresh {
                let stream = follow_node(core.clone(), core.job_id, address, followed, follower.clone());
                follower.keep(core.handle.spawn(stream));
            }
        }
        drop(core);
        tokio::time::sleep(NODE_LOOK).await;
    }
}

/// The live nodes of the cluster: id and daemon address.
async fn live_nodes(worker: &CoreWorker) -> ionet_common::IonetResult<Vec<(NodeId, String)>> {
    let request = ionet_common::rpc::proto::gcs::GetAllNodesRequest { include_dead: false, ..Default::default() };
    let reply = worker.call_head(request, |mut gcs, request| async move { gcs.get_all_nodes(request).await }).await?;
    Ok(reply
        .nodes
        .into_iter()
        .filter(|node| node.state != ionet_common::rpc::proto::common::NodeState::Dead as i32)
        .filter_map(|node| Some((NodeId::from_bytes(&node.node_id).ok()?, node.address)))
        .collect())
}

/// Follows one node's output for `job` until the node or the driver goes. A stream that
/// breaks is not opened again (it would start over from the first line).
async fn follow_node(
    worker: Arc<CoreWorker>,
    job: JobId,
    address: String,
    followed: Arc<Followed>,
    follower: Arc<Follower>,
) {
    let ip = ionet_worker::logs::ip_of(&address).to_string();
    if let Ok(channel) = worker.channel(&address) {
        drop(worker);
        let mut client =
            NodeManagerClient::new(channel).max_decoding_message_size(ionet_common::rpc::DEFAULT_MAX_MESSAGE_BYTES);
        if let Ok(response) =
            client.stream_logs(StreamLogsRequest { job_id: job.to_vec(), worker_address: String::new() }).await
        {
            let mut batches = response.into_inner();
            while let Ok(Some(batch)) = batches.message().await {
                follower.print(batch.lines, &ip);
                followed.passes.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    followed.done.store(true, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_a_kind_prints_and_repeats_fold_into_one_line() {
        let mut dedup = Deduper::new(true);
        let start = Instant::now();
        let first = dedup.line(start, "1@a", "(f pid=1, ip=a)".into(), "step 1 done".into());
        assert_eq!(first.as_deref(), Some("(f pid=1, ip=a) step 1 done"));
        for pid in 2..=100 {
            let source = format!("{pid}@a");
            let repeat = dedup.line(start, &source, format!("(f pid={pid}, ip=a)"), format!("step {pid} done"));
            assert_eq!(repeat, None, "a repeat from another worker within the window is counted");
        }
        assert!(dedup.line(start, "5@b", "(g pid=5, ip=b)".into(), "other".into()).is_some());
        assert!(dedup.flush(start + Duration::from_secs(1), false).is_empty(), "the window is still open");
        let folded = dedup.flush(start + DEDUP_WINDOW, false);
        assert_eq!(folded, ["(f pid=100, ip=a) step 100 done [repeated 99x across cluster]"]);
        // After the window the kind prints again at once.
        assert!(dedup.line(start + DEDUP_WINDOW, "1@a", "(f pid=1, ip=a)".into(), "step 1 done".into()).is_some());
    }

    #[test]
    fn one_workers_own_lines_all_print() {
        let mut dedup = Deduper::new(true);
        let now = Instant::now();
        for epoch in 0..10 {
            let line = dedup.line(now, "7@a", "(train pid=7, ip=a)".into(), format!("epoch {epoch}"));
            assert!(line.is_some(), "epoch {epoch} prints");
        }
        assert!(dedup.flush(now + DEDUP_WINDOW, true).is_empty());
    }

    #[test]
    fn without_dedup_every_line_prints() {
        let mut dedup = Deduper::new(false);
        let now = Instant::now();
        assert!(dedup.line(now, "1@a", "(f pid=1, ip=a)".into(), "same".into()).is_some());
        assert!(dedup.line(now, "2@a", "(f pid=2, ip=a)".into(), "same".into()).is_some());
        assert!(dedup.flush(now + DEDUP_WINDOW, true).is_empty());
    }
}
