//! The head's checks of nodes' GPUs: the verifier side of [`ionet_common::gpu_proof`].
//!
//! A node with GPUs registers as `PENDING` and takes no work (its record tells every
//! scheduler to pass it by, and the head bills none of its leases) until it passes. It asks
//! for its check (`StartGpuCheck`): a fresh seed per GPU, sizes and a deadline. Simulated
//! (declared) GPUs get a small product and a 1 MiB fill and the configured deadline; real
//! ones a 4096² product and a fill of nine tenths of their declared memory, due within what their model's
//! published figures take, slowed by [`SLOWDOWN_ALLOWED`], plus the configured allowance.
//! It commits (`CommitGpuCheck`, answered with the rows and chunks sampled now) and
//! reveals (`RevealGpuCheck`, answered with the verdict). Both must arrive by the deadline,
//! counted from the challenge on the head's clock. A pass records the measured lower
//! bounds; a failure quarantines the node (`FAILED`, with the reason) until it passes
//! again. The record lives in the node's row ([`GcsState::record_gpu_check`]), so it is
//! stored, listed with the node and kept across the node's re-registrations.
//!
//! [`SLOWDOWN_ALLOWED`]: ionet_common::gpu_proof::SLOWDOWN_ALLOWED

use std::time::{Duration, Instant};

use dashmap::DashMap;
use ionet_common::gpu_proof::{self, ComputeTask, GpuChallenge, GpuCommit, GpuReveal, MemoryTask, Opening, Sample};
use ionet_common::rpc::proto::common::NodeInfo;
use ionet_common::rpc::proto::gcs as wire;
use ionet_common::NodeId;
use rand::RngCore;

/// Sizes of a simulated GPU's check: about 4 M multiply-adds and a 1 MiB fill.
const SIMULATED_N: u32 = 128;
const SIMULATED_K: u32 = 128;
const SIMULATED_CHUNK_BYTES: u32 = 4096;
const SIMULATED_CHUNKS: u32 = 256;
/// Sizes of a real GPU's check: a 4096² product (137 GFLOP) and most of its declared memory.
const REAL_N: u32 = 4096;
const REAL_K: u32 = 4096;
const REAL_CHUNK_BYTES: u32 = 1 << 20;
/// Tenths of a real GPU's declared memory the fill takes: the rest is the driver's, the
/// context's and the leaves'.
const REAL_FILL_TENTHS: u64 = 9;
/// Rows and chunks opened per GPU: a node wrong on a tenth of either is caught with
/// probability 1 − 0.9¹⁶ ≈ 81% per check, on half of either with 99.998%.
const ROWS_SAMPLED: usize = 16;
const CHUNKS_SAMPLED: usize = 16;
/// Most GPUs one node may list (and the head check at once).
const MAX_GPUS: usize = 64;

/// A check under way for one node.
struct Open {
    check_id: u64,
    challenges: Vec<GpuChallenge>,
    started: Instant,
    deadline: Duration,
    /// Set by the commit: what it committed, what was sampled, and when.
    committed: Option<(Vec<GpuCommit>, Vec<Sample>, Duration)>,
}

/// What a node's answer came to.
pub enum Outcome {
    /// More is expected: the samples to open.
    Sampled(Vec<wire::GpuSample>),
    Passed {
        tflops: f64,
        bandwidth_gb_per_s: f64,
        took: Duration,
    },
    Failed(String),
}

/// When a node's next check is due, and since when it has been asked for it.
struct Schedule {
    next: Instant,
    asked: Option<Instant>,
    /// Since when, with its check due, the node has said a GPU is busy while the head's
    /// lease book has no lease of its GPUs running (a lease not reported yet, or a dodge).
    busy_unbilled_since: Option<Instant>,
    /// When the lease book last showed a lease of its GPUs running (read again only after
    /// [`BOOK_READ_EVERY`]: a long lease does not make every heartbeat scan the book).
    leased_at: Option<Instant>,
    /// Whether it has been told it is overdue (a lease put its check off too long).
    overdue: bool,
}

impl Schedule {
    /// Due at `next`, not asked yet.
    fn at(next: Instant) -> Self {
        Self { next, asked: None, busy_unbilled_since: None, leased_at: None, overdue: false }
    }
}

/// How often a due node's heartbeat reads the lease book while its GPUs stay leased.
const BOOK_READ_EVERY: Duration = Duration::from_secs(5);

/// What a heartbeat's node is doing with its GPUs, by its word and by the head's book.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuUse {
    /// The head's lease book has a lease of its GPUs running: never checked now.
    Leased,
    /// No lease the head knows of, and the node says its GPUs are free.
    Idle,
    /// No lease the head knows of, yet the node says a GPU is busy.
    Busy,
}

/// What a heartbeat tells a node of its checks.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    No,
    /// Ask for a check now.
    Now,
    /// It was asked long enough ago and did not take it: a failure.
    Missed(String),
    /// A lease of its GPUs has put its due check off for longer than allowed: it takes no
    /// new leases and earns no rewards until it passes (said once per schedule).
    Overdue,
}

/// The checks under way, and when each node's next is due.
#[derive(Default)]
pub struct GpuChecks {
    open: DashMap<NodeId, Open>,
    schedule: DashMap<NodeId, Schedule>,
    /// When each node last started a check.
    started: DashMap<NodeId, Instant>,
}

impl GpuChecks {
    /// Forgets what it keeps of nodes `known` says the head no longer holds (forgotten
    /// after their death).
    pub fn forget_unknown(&self, known: impl Fn(&NodeId) -> bool) {
        self.open.retain(|node, _| known(node));
        self.schedule.retain(|node, _| known(node));
        self.started.retain(|node, _| known(node));
    }

    /// Schedules `node`'s next check after one that took `took`: a random time around
    /// `interval`, stretched so checks take at most `idle_share_bps` of the time between.
    pub fn schedule_next(&self, node: NodeId, took: Duration, interval: Duration, idle_share_bps: u32) {
        let floor = took.mul_f64(10_000.0 / f64::from(idle_share_bps.max(1)));
        let mean = interval.max(floor);
        let next = Instant::now() + mean.mul_f64(rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..1.5));
        self.schedule.insert(node, Schedule::at(next));
    }

    /// Whether a heartbeat of `node` should ask it for a check; one asked `grace` ago and
    /// not started since has missed it. `uses` says what its GPUs are doing, asked only
    /// when a check is due (it reads the head's lease book). A node with a GPU leased by
    /// the head's book is not asked: the check waits until none is, but once it has
    /// waited `max_defer` the node is overdue (a provider leasing a sliver of its own GPU
    /// to itself would never be checked again). One that says a GPU is busy while the book
    /// has no lease of it waits too, but only for `grace`: a lease the node has not
    /// reported by then is not one the check could disturb.
    pub fn on_heartbeat(
        &self,
        node: NodeId,
        uses: impl FnOnce() -> GpuUse,
        grace: Duration,
        max_defer: Duration,
    ) -> Due {
        // A check started and left unanswered past its deadline is over: a failure.
        if let Some((_, open)) = self.open.remove_if(&node, |_, open| open.started.elapsed() > open.deadline) {
            return Due::Missed(format!(
                "left its check unanswered past the deadline of {:.2} s",
                open.deadline.as_secs_f64()
            ));
        }
        if self.open.contains_key(&node) {
            return Due::No;
        }
        let now = Instant::now();
        let waited = {
            let Some(schedule) = self.schedule.get(&node) else { return Due::No };
            match schedule.asked {
                Some(asked) if now.duration_since(asked) > grace => Some(now.duration_since(asked)),
                Some(_) => return Due::Now,
                None if now < schedule.next => return Due::No,
                // Leased at the last look: the book is read again only every few seconds.
                None if schedule.leased_at.is_some_and(|at| now.duration_since(at) < BOOK_READ_EVERY.min(grace)) => {
                    return Due::No
                }
                None => None,
            }
        };
        let Some(waited) = waited else {
            // Due: what its GPUs are doing, read with no guard of the schedule held.
            let uses = uses();
            let Some(mut schedule) = self.schedule.get_mut(&node) else { return Due::No };
            let ask = match uses {
                GpuUse::Leased => {
                    schedule.busy_unbilled_since = None;
                    schedule.leased_at = Some(now);
                    if !schedule.overdue && now.saturating_duration_since(schedule.next) > max_defer {
                        schedule.overdue = true;
                        return Due::Overdue;
                    }
                    false
                }
                GpuUse::Idle => true,
                GpuUse::Busy => {
                    let since = *schedule.busy_unbilled_since.get_or_insert(now);
                    now.duration_since(since) > grace
                }
            };
            if !ask || schedule.asked.is_some() {
                return if schedule.asked.is_some() { Due::Now } else { Due::No };
            }
            schedule.asked = Some(now);
            schedule.busy_unbilled_since = None;
            schedule.leased_at = None;
            return Due::Now;
        };
        // The guard is dropped: removing under it would wait on its own shard's lock.
        self.schedule.remove(&node);
        Due::Missed(format!("asked for a check of its GPUs {:.1} s ago, it did not take it", waited.as_secs_f64()))
    }

    /// Schedules a check for a node that has had its first (by this head or an earlier
    /// one: the schedule is not stored) and has none scheduled.
    pub fn ensure_scheduled(&self, node: NodeId, interval: Duration) {
        // Read first: a heartbeat of a scheduled node takes no write lock.
        if self.schedule.contains_key(&node) || self.open.contains_key(&node) {
            return;
        }
        self.schedule.entry(node).or_insert_with(|| {
            Schedule::at(Instant::now() + interval.mul_f64(rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..1.5)))
        });
    }

    /// Asks `node` for a check at its next idle heartbeat (the operator cleared it).
    pub fn due_now(&self, node: NodeId) {
        // One already asked for keeps its grace running.
        self.schedule
            .entry(node)
            .and_modify(|schedule| schedule.next = Instant::now())
            .or_insert_with(|| Schedule::at(Instant::now()));
    }

    /// Whether `node` may start a check now: always when the head asked for one; unasked,
    /// only while it is not passing (`not_passing`: its first, to lift a quarantine, or
    /// overdue), never while the head's book has a lease of its GPUs running (`leased`),
    /// and at most once per `gap` (each check costs the head a recomputation).
    pub fn may_start(
        &self,
        node: NodeId,
        not_passing: bool,
        leased: impl FnOnce() -> bool,
        gap: Duration,
    ) -> Result<(), String> {
        if self.schedule.get(&node).is_some_and(|schedule| schedule.asked.is_some()) {
            return Ok(());
        }
        if !not_passing {
            return Err(format!(
                "node {} passed its last GPU check: the next is the head's to ask for (in a heartbeat reply)",
                node.short()
            ));
        }
        if leased() {
            return Err(format!(
                "node {} has a lease of its GPUs running: a check never lands on a leased GPU (the head asks \
                 for one once they are free)",
                node.short()
            ));
        }
        let since = self.started.get(&node).map(|started| started.elapsed());
        if let Some(since) = since.filter(|since| *since < gap) {
            return Err(format!(
                "node {} may start a GPU check unasked at most once per {:.0} s: again in {:.0} s",
                node.short(),
                gap.as_secs_f64(),
                (gap - since).as_secs_f64().ceil()
            ));
        }
        Ok(())
    }

    /// Ends a check the node left under way (it asked for another): the reason to record
    /// as a failure, if there was one.
    pub fn abandon(&self, node: NodeId) -> Option<String> {
        self.open.remove(&node).map(|_| "asked for a new check with one under way: the one it left is failed".into())
    }

    /// A fresh challenge for every GPU of `node`, replacing any check it had under way.
    pub fn start(&self, node: &NodeInfo, allowance: Duration) -> Result<wire::StartGpuCheckReply, String> {
        let node_id = NodeId::from_bytes(&node.node_id).map_err(|err| err.to_string())?;
        if node.gpus.is_empty() {
            return Err(format!("node {} lists no GPUs to check", node_id.short()));
        }
        if node.gpus.len() > MAX_GPUS {
            return Err(format!(
                "node {} lists {} GPUs; at most {MAX_GPUS} are checked on one node",
                node_id.short(),
                node.gpus.len()
            ));
        }
        let total = node.total.clone().unwrap_or_default().to_set().map_err(|err| err.to_string())?;
        let declared = total.get(ionet_common::resources::GPU);
        if declared.as_f64() > node.gpus.len() as f64 {
            return Err(format!(
                "node {} offers {declared} GPUs but lists {}: each GPU it offers must be listed to be checked",
                node_id.short(),
                node.gpus.len()
            ));
        }
        let mut rng = rand::thread_rng();
        let mut seed = || {
            let mut seed = [0u8; 32];
            rng.fill_bytes(&mut seed);
            seed
        };
        let mut challenges = Vec::with_capacity(node.gpus.len());
        let mut deadline = allowance;
        for gpu in &node.gpus {
            let (compute, memory) = if gpu.simulated {
                (
                    ComputeTask { seed: seed(), n: SIMULATED_N, k: SIMULATED_K },
                    MemoryTask { seed: seed(), chunk_bytes: SIMULATED_CHUNK_BYTES, chunks: SIMULATED_CHUNKS },
                )
            } else {
                let fill = gpu.memory_bytes / 10 * REAL_FILL_TENTHS;
                let chunks = (fill / u64::from(REAL_CHUNK_BYTES)).clamp(1, u64::from(u32::MAX)) as u32;
                let compute = ComputeTask { seed: seed(), n: REAL_N, k: REAL_K };
                let memory = MemoryTask { seed: seed(), chunk_bytes: REAL_CHUNK_BYTES, chunks };
                // A model without published figures is held to the slowest listed.
                let model = if gpu_proof::published(&gpu.model).is_some() { gpu.model.as_str() } else { "T4" };
                let due = gpu_proof::deadline_for(model, &compute, &memory, allowance).unwrap_or(allowance);
                deadline = deadline.max(due);
                (compute, memory)
            };
            challenges.push(GpuChallenge { gpu_index: gpu.index, compute, memory });
        }
        let check_id = rng.next_u64();
        let reply = wire::StartGpuCheckReply {
            check_id,
            challenges: challenges.iter().map(challenge_to_wire).collect(),
            deadline_ms: deadline.as_millis() as u64,
        };
        self.open.insert(node_id, Open { check_id, challenges, started: Instant::now(), deadline, committed: None });
        self.started.insert(node_id, Instant::now());
        Ok(reply)
    }

    /// The node's commit: past the deadline or malformed, a failure; else the samples.
    pub fn commit(&self, node_id: NodeId, check_id: u64, commits: &[wire::GpuCommit]) -> Result<Outcome, String> {
        let mut open = self.open_check(node_id, check_id)?;
        let (elapsed, deadline) = (open.started.elapsed(), open.deadline);
        let read = if elapsed > deadline {
            Err(late(elapsed, deadline))
        } else if open.committed.is_some() {
            // Committing again would draw new samples until they fell on what it got right.
            Err("committed twice to one check".to_string())
        } else {
            commits_from_wire(&open.challenges, commits)
        };
        let commits = match read {
            Ok(commits) => commits,
            Err(why) => {
                drop(open);
                self.open.remove_if(&node_id, |_, open| open.check_id == check_id);
                return Ok(Outcome::Failed(why));
            }
        };
        let mut rng = rand::thread_rng();
        let samples: Vec<Sample> = open
            .challenges
            .iter()
            .map(|challenge| Sample {
                gpu_index: challenge.gpu_index,
                rows: gpu_proof::pick(&mut rng, challenge.compute.n, ROWS_SAMPLED),
                chunks: gpu_proof::pick(&mut rng, challenge.memory.chunks, CHUNKS_SAMPLED),
            })
            .collect();
        let wire_samples = samples
            .iter()
            .map(|sample| wire::GpuSample {
                gpu_index: sample.gpu_index,
                rows: sample.rows.clone(),
                chunks: sample.chunks.clone(),
            })
            .collect();
        open.committed = Some((commits, samples, elapsed));
        Ok(Outcome::Sampled(wire_samples))
    }

    /// The node's reveal: verified on a blocking thread (a real GPU's rows are 16 M
    /// multiply-adds each); the check is over either way.
    pub async fn reveal(
        &self,
        node_id: NodeId,
        check_id: u64,
        reveals: Vec<wire::GpuReveal>,
    ) -> Result<Outcome, String> {
        drop(self.open_check(node_id, check_id)?);
        let (_, open) = self
            .open
            .remove_if(&node_id, |_, open| open.check_id == check_id)
            .ok_or("the check was ended meanwhile")?;
        let elapsed = open.started.elapsed();
        if elapsed > open.deadline {
            return Ok(Outcome::Failed(late(elapsed, open.deadline)));
        }
        let Some((commits, samples, committed_after)) = open.committed else {
            return Ok(Outcome::Failed("revealed before committing".into()));
        };
        let challenges = open.challenges;
        let verdict = tokio::task::spawn_blocking(move || {
            let mut tflops = f64::INFINITY;
            let mut bandwidth = f64::INFINITY;
            for (((challenge, commit), sample), reveal) in challenges.iter().zip(&commits).zip(&samples).zip(&reveals) {
                let reveal = match reveal_from_wire(reveal) {
                    Ok(reveal) => reveal,
                    Err(why) => return Outcome::Failed(format!("GPU {}: {why}", challenge.gpu_index)),
                };
                match gpu_proof::verify(challenge, commit, sample, &reveal, committed_after, open.deadline) {
                    gpu_proof::Verdict::Passed { tflops: t, bandwidth_gb_per_s: b } => {
                        tflops = tflops.min(t);
                        bandwidth = bandwidth.min(b);
                    }
                    gpu_proof::Verdict::Failed(why) => return Outcome::Failed(why),
                }
            }
            if reveals.len() != challenges.len() {
                return Outcome::Failed(format!(
                    "revealed {} GPU(s) of the {} challenged",
                    reveals.len(),
                    challenges.len()
                ));
            }
            Outcome::Passed { tflops, bandwidth_gb_per_s: bandwidth, took: open.started.elapsed() }
        })
        .await
        .map_err(|err| format!("verifying the check failed: {err}"))?;
        Ok(verdict)
    }

    fn open_check(
        &self,
        node_id: NodeId,
        check_id: u64,
    ) -> Result<dashmap::mapref::one::RefMut<'_, NodeId, Open>, String> {
        match self.open.get_mut(&node_id) {
            Some(open) if open.check_id == check_id => Ok(open),
            _ => Err(format!(
                "node {} has no GPU check {check_id} under way (ask for one with StartGpuCheck)",
                node_id.short()
            )),
        }
    }
}

fn late(elapsed: Duration, deadline: Duration) -> String {
    format!("answered in {:.2} s, past the deadline of {:.2} s", elapsed.as_secs_f64(), deadline.as_secs_f64())
}

fn challenge_to_wire(challenge: &GpuChallenge) -> wire::GpuChallenge {
    wire::GpuChallenge {
        gpu_index: challenge.gpu_index,
        compute_seed: challenge.compute.seed.to_vec(),
        n: challenge.compute.n,
        k: challenge.compute.k,
        memory_seed: challenge.memory.seed.to_vec(),
        chunk_bytes: challenge.memory.chunk_bytes,
        chunks: challenge.memory.chunks,
    }
}

/// The challenge a node was sent, read back on the node.
pub fn challenge_from_wire(challenge: &wire::GpuChallenge) -> Result<GpuChallenge, String> {
    let challenge = GpuChallenge {
        gpu_index: challenge.gpu_index,
        compute: ComputeTask { seed: digest(&challenge.compute_seed, "compute seed")?, n: challenge.n, k: challenge.k },
        memory: MemoryTask {
            seed: digest(&challenge.memory_seed, "memory seed")?,
            chunk_bytes: challenge.chunk_bytes,
            chunks: challenge.chunks,
        },
    };
    gpu_proof::check_sizes(&challenge)?;
    Ok(challenge)
}

fn digest(bytes: &[u8], what: &str) -> Result<gpu_proof::Digest, String> {
    bytes.try_into().map_err(|_| format!("a {what} of {} bytes, not 32", bytes.len()))
}

fn commits_from_wire(challenges: &[GpuChallenge], commits: &[wire::GpuCommit]) -> Result<Vec<GpuCommit>, String> {
    let challenged = challenges.iter().map(|challenge| challenge.gpu_index);
    if !challenged.eq(commits.iter().map(|commit| commit.gpu_index)) {
        // Counts, not the lists: what a node sends does not go into its record whole.
        return Err(format!(
            "committed for {} GPU(s), not the {} challenged in order",
            commits.len(),
            challenges.len()
        ));
    }
    commits
        .iter()
        .map(|commit| {
            Ok(GpuCommit {
                gpu_index: commit.gpu_index,
                compute_root: digest(&commit.compute_root, "compute root")?,
                memory_root: digest(&commit.memory_root, "memory root")?,
            })
        })
        .collect()
}

fn reveal_from_wire(reveal: &wire::GpuReveal) -> Result<GpuReveal, String> {
    let openings = |openings: &[wire::GpuOpening]| -> Result<Vec<Opening>, String> {
        openings
            .iter()
            .map(|opening| {
                Ok(Opening {
                    index: opening.index,
                    data: opening.data.clone(),
                    path: opening.path.iter().map(|node| digest(node, "Merkle path node")).collect::<Result<_, _>>()?,
                })
            })
            .collect()
    };
    Ok(GpuReveal { gpu_index: reveal.gpu_index, rows: openings(&reveal.rows)?, chunks: openings(&reveal.chunks)? })
}

/// What a node sends: its commit for an answer.
pub fn commit_to_wire(commit: &GpuCommit) -> wire::GpuCommit {
    wire::GpuCommit {
        gpu_index: commit.gpu_index,
        compute_root: commit.compute_root.to_vec(),
        memory_root: commit.memory_root.to_vec(),
    }
}

/// What a node sends: its reveal.
pub fn reveal_to_wire(reveal: &GpuReveal) -> wire::GpuReveal {
    let openings = |openings: &[Opening]| {
        openings
            .iter()
            .map(|opening| wire::GpuOpening {
                index: opening.index,
                data: opening.data.clone(),
                path: opening.path.iter().map(|node| node.to_vec()).collect(),
            })
            .collect()
    };
    wire::GpuReveal { gpu_index: reveal.gpu_index, rows: openings(&reveal.rows), chunks: openings(&reveal.chunks) }
}

/// A sample as the node reads it.
pub fn sample_from_wire(sample: &wire::GpuSample) -> Sample {
    Sample { gpu_index: sample.gpu_index, rows: sample.rows.clone(), chunks: sample.chunks.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_check_is_asked_for_only_when_due_and_every_gpu_is_free() {
        let (idle, leased, busy) = (|| GpuUse::Idle, || GpuUse::Leased, || GpuUse::Busy);
        let checks = GpuChecks::default();
        let node = NodeId::random();
        assert_eq!(checks.on_heartbeat(node, idle, GRACE, HOUR), Due::No, "no check before the first ended");
        checks.schedule_next(node, Duration::ZERO, Duration::ZERO, 10_000);
        assert_eq!(checks.on_heartbeat(node, busy, GRACE, HOUR), Due::No, "busy by its word: waits a while");
        assert_eq!(checks.on_heartbeat(node, idle, GRACE, HOUR), Due::Now);
        assert_eq!(checks.on_heartbeat(node, leased, GRACE, HOUR), Due::Now, "asked until it starts");
        assert!(
            matches!(checks.on_heartbeat(node, leased, Duration::ZERO, HOUR), Due::Missed(why) if why.contains("did not take it"))
        );
        assert_eq!(checks.on_heartbeat(node, idle, GRACE, HOUR), Due::No, "a miss is recorded once");
        // Leased by the book: the check waits, and the book is not read again at once.
        checks.schedule_next(node, Duration::ZERO, Duration::ZERO, 10_000);
        assert_eq!(checks.on_heartbeat(node, leased, GRACE, HOUR), Due::No, "a GPU is leased: the check waits");
        assert_eq!(checks.on_heartbeat(node, || panic!("read the book again at once"), GRACE, HOUR), Due::No);
    }

    #[test]
    fn a_node_starts_checks_unasked_only_while_not_passing_and_at_most_once_per_gap() {
        let checks = GpuChecks::default();
        let node = node_with_gpus(1);
        let id = NodeId::from_bytes(&node.node_id).unwrap();
        let gap = Duration::from_secs(30);
        let leased = checks.may_start(id, true, || true, gap).unwrap_err();
        assert!(leased.contains("a check never lands on a leased GPU"), "{leased}");
        checks.may_start(id, true, || false, gap).expect("its first");
        checks.start(&node, Duration::from_secs(60)).unwrap();
        let again = checks.may_start(id, true, || false, gap).unwrap_err();
        assert!(again.contains("at most once per 30 s: again in 30 s"), "{again}");
        checks.may_start(id, true, || false, Duration::ZERO).expect("no gap configured");
        let passed = checks.may_start(id, false, || false, Duration::ZERO).unwrap_err();
        assert!(passed.contains("passed its last GPU check: the next is the head's to ask for"), "{passed}");
        // Asked by the head: whenever.
        checks.schedule_next(id, Duration::ZERO, Duration::ZERO, 10_000);
        checks.open.clear();
        assert_eq!(checks.on_heartbeat(id, || GpuUse::Idle, GRACE, HOUR), Due::Now);
        checks.may_start(id, false, || true, gap).expect("asked");
    }

    #[test]
    fn a_node_that_says_it_is_busy_with_no_lease_the_head_knows_of_is_checked_after_a_grace() {
        let checks = GpuChecks::default();
        let node = NodeId::random();
        checks.schedule_next(node, Duration::ZERO, Duration::ZERO, 10_000);
        let short = Duration::from_millis(30);
        assert_eq!(checks.on_heartbeat(node, || GpuUse::Busy, short, HOUR), Due::No, "a lease it has not reported yet");
        std::thread::sleep(short * 2);
        // A lease the book learns of resets the wait: a real one keeps the check off.
        assert_eq!(checks.on_heartbeat(node, || GpuUse::Leased, short, HOUR), Due::No);
        std::thread::sleep(short * 2);
        assert_eq!(checks.on_heartbeat(node, || GpuUse::Busy, short, HOUR), Due::No, "waits afresh");
        std::thread::sleep(short * 2);
        assert_eq!(
            checks.on_heartbeat(node, || GpuUse::Busy, short, HOUR),
            Due::Now,
            "busy by its word alone: checked"
        );
        // The book is read only when a check is due.
        let fresh = NodeId::random();
        checks.ensure_scheduled(fresh, Duration::from_secs(3600));
        assert_eq!(
            checks.on_heartbeat(fresh, || panic!("read the lease book for a check not due"), short, HOUR),
            Due::No
        );
    }

    #[test]
    fn a_lease_puts_a_due_check_off_only_so_long_then_the_node_is_overdue_once() {
        let checks = GpuChecks::default();
        let node = NodeId::random();
        let max_defer = Duration::from_millis(40);
        checks.schedule_next(node, Duration::ZERO, Duration::ZERO, 10_000);
        assert_eq!(checks.on_heartbeat(node, || GpuUse::Leased, GRACE, max_defer), Due::No, "deferred");
        std::thread::sleep(max_defer + Duration::from_millis(10));
        // The book is read again (a short grace shortens how long a look lasts).
        let short_grace = Duration::from_millis(5);
        assert_eq!(checks.on_heartbeat(node, || GpuUse::Leased, short_grace, max_defer), Due::Overdue);
        std::thread::sleep(short_grace * 2);
        assert_eq!(checks.on_heartbeat(node, || GpuUse::Leased, short_grace, max_defer), Due::No, "said once");
        // Its GPUs free at last (at the next look at the book): asked.
        std::thread::sleep(short_grace * 2);
        assert_eq!(checks.on_heartbeat(node, || GpuUse::Idle, short_grace, max_defer), Due::Now);
        // A pass schedules afresh: the next deferral has its full allowance again.
        checks.schedule_next(node, Duration::ZERO, Duration::ZERO, 10_000);
        assert_eq!(checks.on_heartbeat(node, || GpuUse::Leased, GRACE, HOUR), Due::No);
    }

    fn node_with_gpus(gpus: u32) -> NodeInfo {
        let total = ionet_common::ResourceSet::new()
            .with(ionet_common::resources::GPU, ionet_common::Quantity::whole(i64::from(gpus)));
        NodeInfo {
            node_id: NodeId::random().to_vec(),
            total: Some((&total).into()),
            gpus: (0..gpus)
                .map(|index| ionet_common::rpc::proto::common::GpuInfo {
                    index,
                    model: "H100".into(),
                    memory_bytes: 80 << 30,
                    simulated: true,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_real_gpu_fills_most_of_its_memory_within_what_its_model_takes() {
        let mut node = node_with_gpus(1);
        node.gpus[0].simulated = false;
        let start = checks_start(&node);
        let challenge = challenge_from_wire(&start.challenges[0]).unwrap();
        assert_eq!(challenge.compute.n, REAL_N);
        assert_eq!(challenge.memory.bytes(), (80u64 << 30) / 10 * 9, "nine tenths of the declared 80 GiB");
        let allowance = Duration::from_secs(1);
        let due = Duration::from_millis(start.deadline_ms);
        assert!(due > allowance && due < allowance * 2, "the H100's published figures: {due:?}");
        ionet_common::gpu_proof::check_sizes(&challenge).expect("a size the provers accept");
    }

    fn checks_start(node: &NodeInfo) -> wire::StartGpuCheckReply {
        GpuChecks::default().start(node, Duration::from_secs(1)).unwrap()
    }

    #[test]
    fn a_second_commit_fails_the_check() {
        use ionet_common::gpu_proof::{CpuProver, Prover};
        let checks = GpuChecks::default();
        let node = node_with_gpus(2);
        let node_id = NodeId::from_bytes(&node.node_id).unwrap();
        let start = checks.start(&node, Duration::from_secs(60)).unwrap();
        let commits: Vec<_> = start
            .challenges
            .iter()
            .map(|challenge| commit_to_wire(&CpuProver.run(&challenge_from_wire(challenge).unwrap()).unwrap().commit()))
            .collect();
        assert!(matches!(checks.commit(node_id, start.check_id, &commits), Ok(Outcome::Sampled(_))));
        let again = checks.commit(node_id, start.check_id, &commits);
        assert!(matches!(&again, Ok(Outcome::Failed(why)) if why == "committed twice to one check"));
        assert!(checks.commit(node_id, start.check_id, &commits).is_err(), "the check is over");
    }

    #[test]
    fn a_check_left_unanswered_past_its_deadline_fails_at_the_next_heartbeat() {
        let checks = GpuChecks::default();
        let node = node_with_gpus(1);
        let node_id = NodeId::from_bytes(&node.node_id).unwrap();
        checks.start(&node, Duration::ZERO).unwrap();
        let due = checks.on_heartbeat(node_id, || GpuUse::Idle, GRACE, HOUR);
        assert!(matches!(&due, Due::Missed(why) if why.contains("unanswered past the deadline")), "{due:?}");
        assert_eq!(checks.on_heartbeat(node_id, || GpuUse::Idle, GRACE, HOUR), Due::No);
        assert!(checks.start(&node_with_gpus(65), Duration::ZERO).unwrap_err().contains("at most 64"));
    }

    #[test]
    fn checks_take_at_most_their_share_of_idle_time() {
        let checks = GpuChecks::default();
        let node = NodeId::random();
        // A 2 s check at 1% of idle time: the next is at least 100 s away (200 s ± half).
        checks.schedule_next(node, Duration::from_secs(2), Duration::from_secs(1), 100);
        let next = checks.schedule.get(&node).unwrap().next.duration_since(Instant::now());
        assert!(next >= Duration::from_secs(99) && next <= Duration::from_secs(300), "{next:?}");
    }
}
