//! Proofs that a node's GPUs are what its provider declares: a compute and a memory
//! challenge per GPU, shared by the prover (the node daemon) and the verifier (the head).
//!
//! The head sends a fresh random seed per GPU ([`GpuChallenge`]); the node answers in
//! two rounds:
//! 1. **commit** ([`GpuCommit`]): the Merkle root of the rows of `C = A·B`, where `A`
//!    (`n×k`) and `B` (`k×n`) are seeded random matrices, and the Merkle root of the
//!    chunks of a seeded fill of the GPU's memory;
//! 2. **reveal** ([`GpuReveal`]): for the rows and chunks the head names only after the
//!    commit ([`Sample`]), their contents and Merkle paths. The head recomputes each named
//!    row on its CPU (`k·n` multiply-adds), regenerates each named chunk, and checks both
//!    against the committed roots ([`verify`]).
//!
//! A node that computed a fraction `f` of the rows wrong is caught with probability
//! `1 − (1 − f)^s` for `s` sampled rows; one that skipped part of the fill, likewise per
//! sampled chunk. Entries of `A` and `B` are integers in `[-4, 4]` held as `f32`: every
//! partial sum of a row of `C` is an integer of magnitude at most `16·k < 2^24`, exact in
//! `f32` whatever the order of summation, so cuBLAS on a GPU and this CPU code give the
//! same bits. The matrices and the fill are counter-mode (any entry from its index), so a
//! GPU generates them in parallel.
//!
//! What the memory challenge does not prove: a chunk is cheap to regenerate from its
//! index, so a node that kept only the Merkle tree could answer by regenerating the few
//! sampled chunks; the reveal's deadline bounds that only as far as regeneration is
//! slower than reading. A memory-hard fill (each chunk depending on data-dependent reads
//! of earlier ones) closes that gap and is not built yet.
//!
//! Timings are the head's: it measures from sending the challenge to receiving the
//! commit, so the TFLOPS and bandwidth it derives are lower bounds (they include the
//! network and the fill). [`deadline_for`] allows the declared model's published figures
//! ([`PUBLISHED`]) slowed by [`SLOWDOWN_ALLOWED`], plus an allowance for the network: a
//! card much slower than what it claims misses it where the work outweighs the allowance
//! (see [`SLOWDOWN_ALLOWED`]).

use std::time::Duration;

use sha2::{Digest as _, Sha256};

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// Published figures of a GPU model: dense FP32 TFLOPS (what `C = A·B` in `f32` runs at
/// without tensor cores) and memory bandwidth, each from its maker's data sheet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelFigures {
    pub model: &'static str,
    pub fp32_tflops: f64,
    pub bandwidth_gb_per_s: f64,
    pub source: &'static str,
}

/// The models the head knows the figures of. A model not listed is challenged with the
/// slowest listed figures.
pub const PUBLISHED: &[ModelFigures] = &[
    ModelFigures {
        model: "H100",
        fp32_tflops: 67.0,
        bandwidth_gb_per_s: 3350.0,
        source: "NVIDIA H100 Tensor Core GPU datasheet (SXM5), 2023",
    },
    ModelFigures {
        model: "A100-80GB",
        fp32_tflops: 19.5,
        bandwidth_gb_per_s: 2039.0,
        source: "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM), 2021",
    },
    ModelFigures {
        model: "A100-40GB",
        fp32_tflops: 19.5,
        bandwidth_gb_per_s: 1555.0,
        source: "NVIDIA A100 Tensor Core GPU datasheet (40GB SXM), 2021",
    },
    ModelFigures { model: "L40S", fp32_tflops: 91.6, bandwidth_gb_per_s: 864.0, source: "NVIDIA L40S datasheet, 2023" },
    ModelFigures {
        model: "RTX4090",
        fp32_tflops: 82.6,
        bandwidth_gb_per_s: 1008.0,
        source: "NVIDIA Ada Lovelace architecture whitepaper v1.01 (GeForce RTX 4090), 2023",
    },
    ModelFigures {
        model: "RTX3090",
        fp32_tflops: 35.6,
        bandwidth_gb_per_s: 936.0,
        source: "NVIDIA Ampere GA102 GPU architecture whitepaper v2.1 (GeForce RTX 3090), 2021",
    },
    ModelFigures {
        model: "A10G",
        fp32_tflops: 31.2,
        bandwidth_gb_per_s: 600.0,
        source: "NVIDIA A10 datasheet (A10G is AWS's variant of A10), 2021",
    },
    ModelFigures {
        model: "L4",
        fp32_tflops: 30.3,
        bandwidth_gb_per_s: 300.0,
        source: "NVIDIA L4 Tensor Core GPU datasheet, 2023",
    },
    ModelFigures {
        model: "V100",
        fp32_tflops: 15.7,
        bandwidth_gb_per_s: 900.0,
        source: "NVIDIA Tesla V100 datasheet (SXM2), 2018",
    },
    ModelFigures {
        model: "T4",
        fp32_tflops: 8.1,
        bandwidth_gb_per_s: 320.0,
        source: "NVIDIA T4 Tensor Core GPU datasheet, 2019",
    },
];

/// How much slower than its published figures a GPU may measure and still pass: the
/// head's timings include the network and the fill, and real kernels reach a fraction of
/// peak. A card posing as one 4× faster than it is misses the deadline only where the work
/// outweighs the allowance added for the network: at today's sizes (a 4096² product, a
/// few ms on a data-centre GPU) and the default 10 s allowance, only a gross pretence is
/// caught by time; sizing the work to the allowance is still to come.
pub const SLOWDOWN_ALLOWED: f64 = 4.0;

/// The published figures of `model` (case and spacing ignored), if the head knows them.
pub fn published(model: &str) -> Option<&'static ModelFigures> {
    let wanted = normalise(model);
    PUBLISHED.iter().find(|figures| normalise(figures.model) == wanted)
}

fn normalise(model: &str) -> String {
    model.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_uppercase()).collect()
}

/// The compute task: `C = A·B` with `A` `n×k` and `B` `k×n`, seeded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComputeTask {
    pub seed: Digest,
    pub n: u32,
    pub k: u32,
}

/// The memory task: `chunks` chunks of `chunk_bytes` each, seeded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryTask {
    pub seed: Digest,
    pub chunk_bytes: u32,
    pub chunks: u32,
}

/// What the head asks of one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuChallenge {
    pub gpu_index: u32,
    pub compute: ComputeTask,
    pub memory: MemoryTask,
}

/// The node's first answer for one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuCommit {
    pub gpu_index: u32,
    pub compute_root: Digest,
    pub memory_root: Digest,
}

/// What the head names after the commit, for one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub gpu_index: u32,
    pub rows: Vec<u32>,
    pub chunks: Vec<u32>,
}

/// One leaf revealed: its bytes and its Merkle path (siblings, leaf to root).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opening {
    pub index: u32,
    pub data: Vec<u8>,
    pub path: Vec<Digest>,
}

/// The node's second answer for one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuReveal {
    pub gpu_index: u32,
    pub rows: Vec<Opening>,
    pub chunks: Vec<Opening>,
}

/// Largest `k` whose row sums stay exact in `f32` (`16·k < 2^24`).
pub const MAX_K: u32 = 1 << 20;

/// Largest `n` and `k` a prover accepts: `B` is then 256 MiB as `i32`.
pub const MAX_SIDE: u32 = 8192;

impl ComputeTask {
    /// Multiply-adds of the product (each 2 floating-point operations).
    pub fn flops(&self) -> f64 {
        2.0 * f64::from(self.n) * f64::from(self.n) * f64::from(self.k)
    }

    /// `A[i][j]`, an integer in `[-4, 4]`.
    pub fn a(&self, i: u32, j: u32) -> i32 {
        entry(key(&self.seed, b"A"), u64::from(i) * u64::from(self.k) + u64::from(j))
    }

    /// `B[i][j]`, an integer in `[-4, 4]`.
    pub fn b(&self, i: u32, j: u32) -> i32 {
        entry(key(&self.seed, b"B"), u64::from(i) * u64::from(self.n) + u64::from(j))
    }

    /// The keys of `A` and `B`: entry `i` (row-major) of either is
    /// `splitmix64(key ^ i·golden) mod 9 − 4`, what a GPU generates in parallel.
    pub fn keys(&self) -> (u64, u64) {
        (key(&self.seed, b"A"), key(&self.seed, b"B"))
    }

    /// `B`, row-major (`k×n`).
    pub fn b_matrix(&self) -> Vec<i32> {
        let key = key(&self.seed, b"B");
        (0..u64::from(self.k) * u64::from(self.n)).map(|index| entry(key, index)).collect()
    }

    /// Row `i` of `C`, given `B` (from [`ComputeTask::b_matrix`]).
    pub fn row(&self, i: u32, b: &[i32]) -> Vec<i32> {
        let n = self.n as usize;
        let mut row = vec![0i32; n];
        for p in 0..self.k {
            let a = self.a(i, p);
            if a == 0 {
                continue;
            }
            let b_row = &b[p as usize * n..(p as usize + 1) * n];
            for (c, b) in row.iter_mut().zip(b_row) {
                *c += a * b;
            }
        }
        row
    }
}

impl MemoryTask {
    pub fn bytes(&self) -> u64 {
        u64::from(self.chunk_bytes) * u64::from(self.chunks)
    }

    /// The key of the fill: word `i` of it (little-endian, chunk after chunk) is
    /// `splitmix64(key ^ i·golden)`.
    pub fn key(&self) -> u64 {
        key(&self.seed, b"M")
    }

    /// Chunk `j` of the fill.
    pub fn chunk(&self, j: u32) -> Vec<u8> {
        let key = self.key();
        let words = u64::from(self.chunk_bytes / 8);
        let first = u64::from(j) * words;
        (first..first + words).flat_map(|index| splitmix64(key ^ index.wrapping_mul(GOLDEN)).to_le_bytes()).collect()
    }
}

/// Bytes of a row of `C` as committed: each entry as a little-endian `i32`.
pub fn row_bytes(row: &[i32]) -> Vec<u8> {
    row.iter().flat_map(|value| value.to_le_bytes()).collect()
}

pub fn row_leaf(i: u32, bytes: &[u8]) -> Digest {
    leaf(b"ionet-proof-row", i, bytes)
}

pub fn chunk_leaf(j: u32, bytes: &[u8]) -> Digest {
    leaf(b"ionet-proof-chunk", j, bytes)
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(GOLDEN);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn key(seed: &Digest, what: &[u8]) -> u64 {
    let digest = Sha256::new().chain_update(b"ionet-proof-key").chain_update(seed).chain_update(what).finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

fn entry(key: u64, index: u64) -> i32 {
    (splitmix64(key ^ index.wrapping_mul(GOLDEN)) % 9) as i32 - 4
}

fn leaf(tag: &[u8], index: u32, data: &[u8]) -> Digest {
    Sha256::new().chain_update(tag).chain_update(index.to_le_bytes()).chain_update(data).finalize().into()
}

fn parent(left: &Digest, right: &Digest) -> Digest {
    Sha256::new().chain_update([1u8]).chain_update(left).chain_update(right).finalize().into()
}

/// A Merkle tree over leaf digests; an odd last node is carried up a level unchanged.
#[derive(Clone, Debug)]
pub struct MerkleTree {
    levels: Vec<Vec<Digest>>,
}

impl MerkleTree {
    /// The tree of `leaves` (at least one).
    pub fn new(leaves: Vec<Digest>) -> Self {
        assert!(!leaves.is_empty(), "a Merkle tree of nothing");
        let mut levels = vec![leaves];
        while levels.last().expect("a level").len() > 1 {
            let below = levels.last().expect("a level");
            let above = below
                .chunks(2)
                .map(|pair| if let [left, right] = pair { parent(left, right) } else { pair[0] })
                .collect();
            levels.push(above);
        }
        MerkleTree { levels }
    }

    pub fn root(&self) -> Digest {
        self.levels.last().expect("a level")[0]
    }

    pub fn leaves(&self) -> usize {
        self.levels[0].len()
    }

    /// The siblings from leaf `index` up to the root.
    pub fn path(&self, index: usize) -> Vec<Digest> {
        let mut path = Vec::new();
        let mut i = index;
        for level in &self.levels[..self.levels.len() - 1] {
            let sibling = i ^ 1;
            if sibling < level.len() {
                path.push(level[sibling]);
            }
            i /= 2;
        }
        path
    }
}

/// Whether `leaf` is leaf `index` of the tree of `leaves` leaves whose root is `root`.
pub fn verify_path(root: &Digest, leaves: usize, index: usize, leaf: Digest, path: &[Digest]) -> bool {
    if index >= leaves {
        return false;
    }
    let (mut node, mut i, mut width, mut siblings) = (leaf, index, leaves, path.iter());
    while width > 1 {
        let sibling = i ^ 1;
        if sibling < width {
            let Some(sibling_digest) = siblings.next() else { return false };
            node = if i % 2 == 0 { parent(&node, sibling_digest) } else { parent(sibling_digest, &node) };
        }
        i /= 2;
        width = width.div_ceil(2);
    }
    siblings.next().is_none() && node == *root
}

/// A backend that answers challenges: the CPU one here for simulated GPUs, CUDA's where
/// a GPU is present.
pub trait Prover {
    /// What runs the challenge (`cpu`, `cuda`).
    fn backend(&self) -> &'static str;

    /// Runs the product and the fill for one GPU and keeps what the reveal needs.
    fn run(&mut self, challenge: &GpuChallenge) -> Result<Answer, String>;
}

/// The state a prover keeps between the commit and the reveal for one GPU: every row of
/// `C` and every chunk (a real GPU keeps the fill in its memory; these trees' leaves and
/// the rows are on the host).
pub struct Answer {
    pub gpu_index: u32,
    rows: Vec<Vec<u8>>,
    row_tree: MerkleTree,
    memory: Box<dyn Fn(u32) -> Vec<u8> + Send>,
    chunk_tree: MerkleTree,
}

impl Answer {
    /// An answer from the rows of `C` (as [`row_bytes`]), the leaves of the fill, and how
    /// to read a chunk back from wherever the fill lives.
    pub fn new(
        gpu_index: u32,
        rows: Vec<Vec<u8>>,
        chunk_leaves: Vec<Digest>,
        memory: Box<dyn Fn(u32) -> Vec<u8> + Send>,
    ) -> Self {
        let row_tree = MerkleTree::new(rows.iter().enumerate().map(|(i, row)| row_leaf(i as u32, row)).collect());
        Answer { gpu_index, rows, row_tree, memory, chunk_tree: MerkleTree::new(chunk_leaves) }
    }

    pub fn commit(&self) -> GpuCommit {
        GpuCommit { gpu_index: self.gpu_index, compute_root: self.row_tree.root(), memory_root: self.chunk_tree.root() }
    }

    /// Opens what the head named; an index out of range is an error, not a panic.
    pub fn reveal(&self, sample: &Sample) -> Result<GpuReveal, String> {
        let rows = sample
            .rows
            .iter()
            .map(|&i| {
                let data = self.rows.get(i as usize).ok_or_else(|| format!("row {i} is out of range"))?.clone();
                Ok(Opening { index: i, data, path: self.row_tree.path(i as usize) })
            })
            .collect::<Result<_, String>>()?;
        let chunks = sample
            .chunks
            .iter()
            .map(|&j| {
                if j as usize >= self.chunk_tree.leaves() {
                    return Err(format!("chunk {j} is out of range"));
                }
                Ok(Opening { index: j, data: (self.memory)(j), path: self.chunk_tree.path(j as usize) })
            })
            .collect::<Result<_, String>>()?;
        Ok(GpuReveal { gpu_index: self.gpu_index, rows, chunks })
    }
}

/// Runs challenges on the CPU, for simulated GPUs (and as the reference the CUDA backend
/// is checked against).
#[derive(Debug, Default)]
pub struct CpuProver;

impl Prover for CpuProver {
    fn backend(&self) -> &'static str {
        "cpu"
    }

    fn run(&mut self, challenge: &GpuChallenge) -> Result<Answer, String> {
        check_sizes(challenge)?;
        let compute = &challenge.compute;
        let b = compute.b_matrix();
        let rows = (0..compute.n).map(|i| row_bytes(&compute.row(i, &b))).collect();
        let memory = challenge.memory.clone();
        let fill: Vec<Vec<u8>> = (0..memory.chunks).map(|j| memory.chunk(j)).collect();
        let leaves = fill.iter().enumerate().map(|(j, chunk)| chunk_leaf(j as u32, chunk)).collect();
        Ok(Answer::new(challenge.gpu_index, rows, leaves, Box::new(move |j| fill[j as usize].clone())))
    }
}

/// Refuses sizes a prover must not be made to allocate or that break exactness.
pub fn check_sizes(challenge: &GpuChallenge) -> Result<(), String> {
    let ComputeTask { n, k, .. } = challenge.compute;
    let MemoryTask { chunk_bytes, chunks, .. } = challenge.memory;
    if n == 0 || k == 0 || k > MAX_SIDE || n > MAX_SIDE {
        return Err(format!("matrix sizes n={n} k={k} are out of range"));
    }
    if chunks == 0 || chunk_bytes == 0 || chunk_bytes % 8 != 0 || chunk_bytes > 1 << 20 || chunks > 1 << 20 {
        return Err(format!("memory chunks {chunks} × {chunk_bytes} bytes are out of range"));
    }
    Ok(())
}

/// What the head concluded of one GPU.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Passed {
        /// Lower bounds: the work over the head's time from challenge to commit.
        tflops: f64,
        bandwidth_gb_per_s: f64,
    },
    Failed(String),
}

/// Checks one GPU's answer: the commit came within `deadline` (`elapsed` is the head's
/// time from sending the challenge to receiving the commit), the reveal opens exactly
/// what was sampled, each row equals the head's own computation of it and each chunk
/// the seeded fill, and both sit under the committed roots.
pub fn verify(
    challenge: &GpuChallenge,
    commit: &GpuCommit,
    sample: &Sample,
    reveal: &GpuReveal,
    elapsed: Duration,
    deadline: Duration,
) -> Verdict {
    if elapsed > deadline {
        return Verdict::Failed(format!(
            "GPU {}: answered in {:.2} s, past its deadline of {:.2} s",
            challenge.gpu_index,
            elapsed.as_secs_f64(),
            deadline.as_secs_f64()
        ));
    }
    let gpu = challenge.gpu_index;
    if commit.gpu_index != gpu || reveal.gpu_index != gpu || sample.gpu_index != gpu {
        return Verdict::Failed(format!("GPU {gpu}: the answer is for another GPU"));
    }
    // Counts, not the lists: what a node sends does not go into its record whole.
    if !reveal.rows.iter().map(|opening| opening.index).eq(sample.rows.iter().copied()) {
        return Verdict::Failed(format!(
            "GPU {gpu}: opened {} row(s), not the {} sampled",
            reveal.rows.len(),
            sample.rows.len()
        ));
    }
    if !reveal.chunks.iter().map(|opening| opening.index).eq(sample.chunks.iter().copied()) {
        return Verdict::Failed(format!(
            "GPU {gpu}: opened {} chunk(s), not the {} sampled",
            reveal.chunks.len(),
            sample.chunks.len()
        ));
    }
    let compute = &challenge.compute;
    // The paths first: they are cheap, the product is not.
    for opening in &reveal.rows {
        let leaf = row_leaf(opening.index, &opening.data);
        if !verify_path(&commit.compute_root, compute.n as usize, opening.index as usize, leaf, &opening.path) {
            return Verdict::Failed(format!("GPU {gpu}: row {} is not the one committed", opening.index));
        }
    }
    let b = compute.b_matrix();
    for opening in &reveal.rows {
        if opening.data != row_bytes(&compute.row(opening.index, &b)) {
            return Verdict::Failed(format!("GPU {gpu}: row {} of the product is wrong", opening.index));
        }
    }
    let memory = &challenge.memory;
    for opening in &reveal.chunks {
        if opening.data != memory.chunk(opening.index) {
            return Verdict::Failed(format!("GPU {gpu}: memory chunk {} does not hold the fill", opening.index));
        }
        let leaf = chunk_leaf(opening.index, &opening.data);
        if !verify_path(&commit.memory_root, memory.chunks as usize, opening.index as usize, leaf, &opening.path) {
            return Verdict::Failed(format!("GPU {gpu}: memory chunk {} is not the one committed", opening.index));
        }
    }
    let seconds = elapsed.as_secs_f64().max(1e-6);
    Verdict::Passed {
        tflops: compute.flops() / seconds / 1e12,
        bandwidth_gb_per_s: memory.bytes() as f64 / seconds / 1e9,
    }
}

/// How long a GPU of `model` may take to commit: the product and the fill at the model's
/// published figures slowed by [`SLOWDOWN_ALLOWED`], plus `allowance` for the network
/// and the hashing. `None` for a model whose figures the head does not know.
pub fn deadline_for(model: &str, compute: &ComputeTask, memory: &MemoryTask, allowance: Duration) -> Option<Duration> {
    let figures = published(model)?;
    let compute_secs = compute.flops() / (figures.fp32_tflops * 1e12);
    let memory_secs = memory.bytes() as f64 / (figures.bandwidth_gb_per_s * 1e9);
    Some(Duration::from_secs_f64((compute_secs + memory_secs) * SLOWDOWN_ALLOWED) + allowance)
}

/// Picks `count` distinct indices below `limit` (all of them when `count >= limit`),
/// in increasing order.
pub fn pick(rng: &mut impl rand::Rng, limit: u32, count: usize) -> Vec<u32> {
    let mut picked: Vec<u32> = if count as u64 >= u64::from(limit) {
        (0..limit).collect()
    } else {
        rand::seq::index::sample(rng, limit as usize, count).into_iter().map(|i| i as u32).collect()
    };
    picked.sort_unstable();
    picked
}

/// A check's state in words: `none`, `pending`, `passed`, `failed`, `overdue` or `untrusted` (what
/// `ionet status --json` and the dashboard show).
pub fn state_name(check: &crate::rpc::proto::common::GpuCheck) -> &'static str {
    use crate::rpc::proto::common::GpuCheckState;
    if check.untrusted_since_ms != 0 {
        return "untrusted";
    }
    match GpuCheckState::try_from(check.state) {
        Ok(GpuCheckState::Pending) => "pending",
        Ok(GpuCheckState::Passed) => "passed",
        Ok(GpuCheckState::Failed) => "failed",
        Ok(GpuCheckState::Overdue) => "overdue",
        Ok(GpuCheckState::None) | Err(_) => "none",
    }
}

/// Whether the head's check of `node`'s GPUs keeps it from new work: not passed yet,
/// failed (quarantined), overdue (a lease put its check off too long), or untrusted until
/// the operator clears it.
pub fn held_back(node: &crate::rpc::proto::common::NodeInfo) -> bool {
    use crate::rpc::proto::common::GpuCheckState;
    node.gpu_check.as_ref().is_some_and(|check| {
        check.untrusted_since_ms != 0
            || matches!(
                GpuCheckState::try_from(check.state),
                Ok(GpuCheckState::Pending | GpuCheckState::Failed | GpuCheckState::Overdue)
            )
    })
}

/// Why the head's check keeps `check`'s node from work, in words (empty: it does not).
pub fn held_back_because(check: &crate::rpc::proto::common::GpuCheck) -> String {
    match state_name(check) {
        "untrusted" => format!(
            "untrusted after repeated failed checks ({} on record) until the operator clears it (`ionet trust`); \
             the last: {}",
            check.recent_failures_ms.len(),
            check.reason
        ),
        "failed" => check.reason.clone(),
        "pending" => "not passed yet".into(),
        "overdue" => "its next check is overdue: a lease of its GPUs put it off longer than the head allows \
                      (`gpu_check_max_defer_ms`); no new leases until it passes one"
            .into(),
        _ => String::new(),
    }
}

/// A node's per-GPU FP32 TFLOPS in thousandths for ranking: the published figure of its
/// GPUs' model (the slowest of them), which a passed check vouches for; what the head
/// measured only for a real model it has no figure of. The head's measurement is a lower
/// bound timed from challenge to commit (the fill, hashing and network included), so it
/// cannot be set against published figures; timing the product alone is not built. 0 if
/// unknown.
pub fn gpu_tflops_milli(node: &crate::rpc::proto::common::NodeInfo) -> u64 {
    let figures: Option<Vec<f64>> = if node.gpus.is_empty() {
        published(&node.accelerator_type).map(|figures| vec![figures.fp32_tflops])
    } else {
        node.gpus.iter().map(|gpu| published(&gpu.model).map(|figures| figures.fp32_tflops)).collect()
    };
    if let Some(slowest) = figures.and_then(|figures| figures.into_iter().reduce(f64::min)) {
        return (slowest * 1000.0) as u64;
    }
    if tflops_measured(node) {
        let check = node.gpu_check.clone().unwrap_or_default();
        return (check.tflops * 1000.0) as u64;
    }
    0
}

/// Whether [`gpu_tflops_milli`] of `node` is what the head measured (a real model without
/// published figures that passed its check), not a published figure.
pub fn tflops_measured(node: &crate::rpc::proto::common::NodeInfo) -> bool {
    let check = node.gpu_check.clone().unwrap_or_default();
    let unlisted = node.gpus.iter().any(|gpu| published(&gpu.model).is_none());
    unlisted
        && check.state == crate::rpc::proto::common::GpuCheckState::Passed as i32
        && !check.simulated
        && check.tflops.is_finite()
        && check.tflops > 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn challenge(seed: u8) -> GpuChallenge {
        GpuChallenge {
            gpu_index: 2,
            compute: ComputeTask { seed: [seed; 32], n: 48, k: 40 },
            memory: MemoryTask { seed: [seed ^ 0xff; 32], chunk_bytes: 256, chunks: 37 },
        }
    }

    fn sample(challenge: &GpuChallenge) -> Sample {
        let mut rng = rand::thread_rng();
        Sample {
            gpu_index: challenge.gpu_index,
            rows: pick(&mut rng, challenge.compute.n, 8),
            chunks: pick(&mut rng, challenge.memory.chunks, 8),
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn an_honest_answer_passes_and_reports_its_speed() {
        let challenge = challenge(7);
        let answer = CpuProver.run(&challenge).unwrap();
        let commit = answer.commit();
        let sample = sample(&challenge);
        let reveal = answer.reveal(&sample).unwrap();
        let verdict = verify(&challenge, &commit, &sample, &reveal, Duration::from_millis(10), SECOND);
        let Verdict::Passed { tflops, bandwidth_gb_per_s } = verdict else { panic!("{verdict:?}") };
        assert!((tflops - 2.0 * 48.0 * 48.0 * 40.0 / 0.01 / 1e12).abs() < 1e-12);
        assert!((bandwidth_gb_per_s - 37.0 * 256.0 / 0.01 / 1e9).abs() < 1e-12);
    }

    #[test]
    fn the_product_is_exact_and_the_same_in_floating_point() {
        // What cuBLAS computes in f32, in any order of summation, equals the integers.
        let task = ComputeTask { seed: [3; 32], n: 16, k: 4096 };
        let b = task.b_matrix();
        let row = task.row(5, &b);
        let mut float = [0f32; 16];
        for p in (0..task.k).rev() {
            for (j, c) in float.iter_mut().enumerate() {
                *c += task.a(5, p) as f32 * task.b(p, j as u32) as f32;
            }
        }
        assert_eq!(row, float.map(|c| c as i32));
        assert!((-4..=4).contains(&task.a(1, 2)));
        assert_ne!(task.b_matrix(), ComputeTask { seed: [4; 32], ..task.clone() }.b_matrix(), "seeded");
    }

    #[test]
    fn a_wrong_product_is_caught() {
        let challenge = challenge(9);
        let honest = CpuProver.run(&challenge).unwrap();
        // A cheat that computes with another seed (a cached product) commits consistently
        // to the wrong rows.
        let cached = CpuProver
            .run(&GpuChallenge {
                compute: ComputeTask { seed: [1; 32], ..challenge.compute.clone() },
                ..challenge.clone()
            })
            .unwrap();
        let sample = sample(&challenge);
        let verdict =
            verify(&challenge, &cached.commit(), &sample, &cached.reveal(&sample).unwrap(), SECOND / 10, SECOND);
        assert!(matches!(&verdict, Verdict::Failed(why) if why.contains("of the product is wrong")), "{verdict:?}");
        // Right rows opened against another commit (rows swapped in after the fact).
        let reveal = honest.reveal(&sample).unwrap();
        let verdict = verify(&challenge, &cached.commit(), &sample, &reveal, SECOND / 10, SECOND);
        assert!(matches!(&verdict, Verdict::Failed(why) if why.contains("is not the one committed")), "{verdict:?}");
    }

    #[test]
    fn a_skipped_fill_is_caught() {
        let challenge = challenge(11);
        let memory = challenge.memory.clone();
        // Filled a third of the memory, zeros for the rest, committed to what it holds.
        let held = |j: u32| if j < memory.chunks / 3 { memory.chunk(j) } else { vec![0; memory.chunk_bytes as usize] };
        let leaves = (0..memory.chunks).map(|j| chunk_leaf(j, &held(j))).collect();
        let rows = {
            let b = challenge.compute.b_matrix();
            (0..challenge.compute.n).map(|i| row_bytes(&challenge.compute.row(i, &b))).collect()
        };
        let memory2 = memory.clone();
        let lazy = Answer::new(
            challenge.gpu_index,
            rows,
            leaves,
            Box::new(
                move |j| {
                    if j < memory2.chunks / 3 {
                        memory2.chunk(j)
                    } else {
                        vec![0; memory2.chunk_bytes as usize]
                    }
                },
            ),
        );
        let sample = Sample { gpu_index: 2, rows: vec![0], chunks: vec![1, 30] };
        let verdict = verify(&challenge, &lazy.commit(), &sample, &lazy.reveal(&sample).unwrap(), SECOND / 10, SECOND);
        assert_eq!(verdict, Verdict::Failed("GPU 2: memory chunk 30 does not hold the fill".into()));
    }

    #[test]
    fn a_late_answer_or_a_wrong_opening_fails() {
        let challenge = challenge(13);
        let answer = CpuProver.run(&challenge).unwrap();
        let sample = sample(&challenge);
        let reveal = answer.reveal(&sample).unwrap();
        let late = verify(&challenge, &answer.commit(), &sample, &reveal, SECOND * 3, SECOND * 2);
        assert!(matches!(&late, Verdict::Failed(why) if why.contains("past its deadline")), "{late:?}");
        // Opening other rows than the sampled ones (ones it got right).
        let other = Sample { rows: vec![0, 1], ..sample.clone() };
        let reveal = answer.reveal(&other).unwrap();
        let verdict = verify(&challenge, &answer.commit(), &sample, &reveal, SECOND / 10, SECOND);
        assert!(matches!(&verdict, Verdict::Failed(why) if why.contains("row(s), not the 8 sampled")), "{verdict:?}");
        assert!(answer.reveal(&Sample { rows: vec![48], ..sample }).is_err(), "out of range is an error");
    }

    #[test]
    fn merkle_paths_verify_for_every_leaf_of_odd_and_even_trees() {
        for leaves in [1usize, 2, 3, 5, 8, 13] {
            let digests: Vec<Digest> = (0..leaves).map(|i| leaf(b"t", i as u32, &[i as u8])).collect();
            let tree = MerkleTree::new(digests.clone());
            for (i, digest) in digests.iter().enumerate() {
                assert!(verify_path(&tree.root(), leaves, i, *digest, &tree.path(i)), "{leaves} leaves, leaf {i}");
                assert!(!verify_path(&tree.root(), leaves, i, [0; 32], &tree.path(i)));
            }
            assert!(!verify_path(&tree.root(), leaves, leaves, digests[0], &tree.path(0)));
        }
    }

    #[test]
    fn deadlines_follow_published_figures_and_unknown_models_have_none() {
        let compute = ComputeTask { seed: [0; 32], n: 4096, k: 4096 };
        let memory = MemoryTask { seed: [0; 32], chunk_bytes: 1 << 20, chunks: 1 << 14 };
        let h100 = deadline_for("h100", &compute, &memory, Duration::ZERO).unwrap();
        let t4 = deadline_for("T4", &compute, &memory, Duration::ZERO).unwrap();
        assert!(t4 > h100 * 5, "a T4 is given far longer than an H100: {t4:?} vs {h100:?}");
        assert!(deadline_for("Mystery-9000", &compute, &memory, Duration::ZERO).is_none());
        assert!(PUBLISHED.iter().all(|figures| !figures.source.is_empty()));
    }

    #[test]
    fn sizes_a_prover_must_not_allocate_are_refused() {
        let mut bad = challenge(1);
        bad.compute.k = MAX_K + 1;
        assert!(CpuProver.run(&bad).is_err());
        let mut bad = challenge(1);
        bad.memory.chunk_bytes = 7;
        assert!(CpuProver.run(&bad).is_err());
    }
}
