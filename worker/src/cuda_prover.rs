//! The GPU check's prover for real GPUs: the challenge of [`ionet_common::gpu_proof`] run
//! on the device it names. The seeded matrices and the memory fill are generated on the
//! GPU (kernels in `cuda/prover.cu`, compiled by NVRTC at run time), the product is
//! cuBLAS's `sgemm`, and the fill's leaves are hashed on the GPU, where the fill stays
//! until the head's sample is opened. Its answers equal the CPU prover's bit for bit:
//! the kernels are checked against it on every machine (`tests/cuda_kernels_on_host.rs`,
//! compiling them as C++) and the whole prover where a GPU is (`tests/cuda_prover.rs`).
//!
//! Everything CUDA is loaded at run time (the driver, cuBLAS, NVRTC); a machine without
//! them gets an error saying which is missing, never a panic.

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm as _, GemmConfig};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg as _};
use cudarc::nvrtc::Ptx;
use ionet_common::gpu_proof::{self, Answer, Digest, GpuChallenge, Prover};

const KERNELS: &str = include_str!("cuda/prover.cu");

/// Threads per block; kernels loop over what a capped grid does not cover.
const BLOCK: u32 = 256;
const MAX_BLOCKS: u64 = 1 << 16;

/// Runs challenges on this machine's GPUs (a clone per GPU, each in a thread of its own).
#[derive(Clone)]
pub struct CudaProver {
    ptx: Ptx,
}

impl CudaProver {
    /// A prover, if the driver, cuBLAS and NVRTC load and the kernels compile.
    pub fn new() -> Result<Self, String> {
        // SAFETY: each only tries to open its shared library; no CUDA call is made.
        let present = unsafe {
            [
                ("the CUDA driver (libcuda)", cudarc::driver::sys::is_culib_present()),
                ("cuBLAS (libcublas)", cudarc::cublas::sys::is_culib_present()),
                ("NVRTC (libnvrtc)", cudarc::nvrtc::sys::is_culib_present()),
            ]
        };
        if let Some((missing, _)) = present.iter().find(|(_, present)| !present) {
            return Err(format!("{missing} is not on this machine"));
        }
        let ptx =
            cudarc::nvrtc::compile_ptx(KERNELS).map_err(|err| format!("compiling the prover's kernels: {err}"))?;
        Ok(CudaProver { ptx })
    }
}

fn cuda<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |err| format!("{what}: {err}")
}

fn grid(count: u64, block: u32) -> LaunchConfig {
    let blocks = count.div_ceil(u64::from(block)).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// Fills `out` with `count` entries of the matrix keyed `key`.
fn entries(stream: &Arc<CudaStream>, kernel: &CudaFunction, out: &mut CudaSlice<f32>, key: u64) -> Result<(), String> {
    let count = out.len() as u64;
    let mut launch = stream.launch_builder(kernel);
    launch.arg(out).arg(&key).arg(&count);
    // SAFETY: the kernel writes `count` floats, the length of `out`.
    unsafe { launch.launch(grid(count, BLOCK)) }.map_err(cuda("generating a matrix"))?;
    Ok(())
}

impl Prover for CudaProver {
    fn backend(&self) -> &'static str {
        "cuda"
    }

    fn run(&mut self, challenge: &GpuChallenge) -> Result<Answer, String> {
        gpu_proof::check_sizes(challenge)?;
        let gpu = challenge.gpu_index;
        let context = CudaContext::new(gpu as usize).map_err(|err| format!("opening GPU {gpu}: {err}"))?;
        let stream = context.default_stream();
        let module = context.load_module(self.ptx.clone()).map_err(cuda("loading the prover's kernels"))?;
        let function = |name| module.load_function(name).map_err(cuda("finding a kernel"));
        let (entries_kernel, fill_kernel, leaves_kernel) =
            (function("ionet_entries")?, function("ionet_fill")?, function("ionet_chunk_leaves")?);

        // The product: row-major `C = A·B` is column-major `Cᵀ = Bᵀ·Aᵀ`, and a row-major
        // matrix read column-major is its transpose, so cuBLAS multiplies the buffers of B
        // and A in that order. Entries in [-4, 4] are exact in TF32 too, so tensor cores,
        // where cuBLAS uses them, give the same sums.
        let compute = &challenge.compute;
        let (n, k) = (compute.n as usize, compute.k as usize);
        let (key_a, key_b) = compute.keys();
        let mut a = stream.alloc_zeros::<f32>(n * k).map_err(cuda("allocating A"))?;
        let mut b = stream.alloc_zeros::<f32>(k * n).map_err(cuda("allocating B"))?;
        let mut c = stream.alloc_zeros::<f32>(n * n).map_err(cuda("allocating C"))?;
        entries(&stream, &entries_kernel, &mut a, key_a)?;
        entries(&stream, &entries_kernel, &mut b, key_b)?;
        let blas = CudaBlas::new(stream.clone()).map_err(cuda("starting cuBLAS"))?;
        let side = |value: usize| i32::try_from(value).map_err(|_| format!("matrix side {value} is too large"));
        let config = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: side(n)?,
            n: side(n)?,
            k: side(k)?,
            alpha: 1.0f32,
            lda: side(n)?,
            ldb: side(k)?,
            beta: 0.0f32,
            ldc: side(n)?,
        };
        // SAFETY: the sizes and leading dimensions are those of the buffers allocated above.
        unsafe { blas.gemm(config, &b, &a, &mut c) }.map_err(cuda("multiplying"))?;
        let product = stream.clone_dtoh(&c).map_err(cuda("reading the product"))?;
        let rows =
            product.chunks(n).map(|row| row.iter().flat_map(|&value| (value as i32).to_le_bytes()).collect()).collect();
        drop((a, b, c));

        // The fill, and its leaves hashed on the GPU: the fill never crosses the bus whole.
        let memory = &challenge.memory;
        let words = usize::try_from(memory.bytes() / 8).map_err(|_| "the fill is too large".to_string())?;
        // SAFETY: every word is written by the fill kernel before anything reads it.
        let mut fill = unsafe { stream.alloc::<u64>(words) }.map_err(cuda("allocating the fill"))?;
        let key = memory.key();
        let mut launch = stream.launch_builder(&fill_kernel);
        let total = words as u64;
        launch.arg(&mut fill).arg(&key).arg(&total);
        // SAFETY: the kernel writes `words` words, the length of `fill`.
        unsafe { launch.launch(grid(total, BLOCK)) }.map_err(cuda("filling memory"))?;
        let mut leaves = stream.alloc_zeros::<u8>(memory.chunks as usize * 32).map_err(cuda("allocating leaves"))?;
        let chunk_bytes = u64::from(memory.chunk_bytes);
        let mut launch = stream.launch_builder(&leaves_kernel);
        launch.arg(&fill).arg(&chunk_bytes).arg(&memory.chunks).arg(&mut leaves);
        // SAFETY: `chunks` chunks of `chunk_bytes` are `fill`; 32 bytes a chunk are `leaves`.
        unsafe { launch.launch(grid(u64::from(memory.chunks), 64)) }.map_err(cuda("hashing the fill"))?;
        let leaves: Vec<Digest> = stream
            .clone_dtoh(&leaves)
            .map_err(cuda("reading the fill's leaves"))?
            .chunks_exact(32)
            .map(|leaf| leaf.try_into().expect("32 bytes"))
            .collect();

        let per_chunk = memory.chunk_bytes as usize / 8;
        let reader = stream.clone();
        let chunk = move |j: u32| {
            let start = j as usize * per_chunk;
            match reader.clone_dtoh(&fill.slice(start..start + per_chunk)) {
                Ok(words) => words.iter().flat_map(|word| word.to_le_bytes()).collect(),
                Err(err) => {
                    // An empty chunk fails the head's check, which names the chunk.
                    tracing::warn!(gpu, chunk = j, "reading back a chunk of the fill failed: {err}");
                    Vec::new()
                }
            }
        };
        Ok(Answer::new(gpu, rows, leaves, Box::new(chunk)))
    }
}
