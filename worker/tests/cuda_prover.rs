//! The CUDA prover against the CPU prover, where a GPU is present: for the same seeds and
//! sizes both commit to the same product and fill, and open the same rows and chunks.
//! Skipped (and says so) on a machine without the CUDA driver, cuBLAS, NVRTC or a GPU.

use ionet_common::gpu_proof::{ComputeTask, CpuProver, GpuChallenge, MemoryTask, Prover, Sample};
use ionet_worker::cuda_prover::CudaProver;

#[test]
fn the_cuda_backend_commits_to_what_the_cpu_backend_does() {
    let gpus = match ionet_worker::gpu::detect() {
        Ok(gpus) if !gpus.is_empty() => gpus,
        outcome => {
            eprintln!("skipped: no GPU here ({outcome:?})");
            return;
        }
    };
    let mut cuda = CudaProver::new().expect("a machine with a GPU has cuBLAS and NVRTC for the prover");
    for (size, chunks) in [(96, 50), (512, 300)] {
        let challenge = GpuChallenge {
            gpu_index: gpus[0].index,
            compute: ComputeTask { seed: [size as u8; 32], n: size, k: size + 40 },
            memory: MemoryTask { seed: [3; 32], chunk_bytes: 4096, chunks },
        };
        let on_gpu = cuda.run(&challenge).unwrap();
        let on_cpu = CpuProver.run(&challenge).unwrap();
        assert_eq!(on_gpu.commit(), on_cpu.commit(), "{size}×{size} product, {chunks} chunks");
        let sample =
            Sample { gpu_index: challenge.gpu_index, rows: vec![0, size / 2, size - 1], chunks: vec![0, chunks - 1] };
        assert_eq!(on_gpu.reveal(&sample).unwrap(), on_cpu.reveal(&sample).unwrap());
    }
    assert_eq!(cuda.backend(), "cuda");
}
