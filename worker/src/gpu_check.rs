//! The node's side of the head's GPU check (see `ionet_gcs::gpu_checks`): ask for the
//! challenge, run it (the CPU prover for simulated GPUs, the CUDA prover for real ones),
//! commit, open what the head samples, and learn the verdict. A node with real GPUs but
//! without what the CUDA prover loads (cuBLAS, NVRTC) says so and never answers on the
//! CPU: before its first pass it stays pending (taking no work); a later check it cannot
//! take is a failure like any other (the head cannot tell it from a dodge). Each GPU is
//! proved at once, in a thread of its own.

use ionet_common::gpu_proof::{Answer, CpuProver, Prover};
use ionet_common::rpc::proto::common::{GpuCheck, NodeInfo};
use ionet_common::rpc::proto::gcs::{CommitGpuCheckRequest, RevealGpuCheckRequest, StartGpuCheckRequest};
use ionet_common::rpc::GcsClient;
use ionet_gcs::gpu_checks::{challenge_from_wire, commit_to_wire, reveal_to_wire, sample_from_wire};

/// Runs one check of `node`'s GPUs against the head; the head's verdict, or why there
/// is none.
pub async fn prove(node: &NodeInfo, client: &mut GcsClient) -> Result<GpuCheck, String> {
    let cuda = match node.gpus.iter().find(|gpu| !gpu.simulated) {
        Some(real) => Some(
            crate::cuda_prover::CudaProver::new()
                .map_err(|why| format!("GPU {} ({}) is real and cannot be checked: {why}", real.index, real.model))?,
        ),
        None => None,
    };
    let simulated: Vec<u32> = node.gpus.iter().filter(|gpu| gpu.simulated).map(|gpu| gpu.index).collect();
    let node_id = node.node_id.clone();
    let status = |what: &'static str| move |status: tonic::Status| format!("{what}: {}", status.message());
    let start = client
        .start_gpu_check(StartGpuCheckRequest { node_id: node_id.clone() })
        .await
        .map_err(status("asking for the check"))?
        .into_inner();
    let challenges = start.challenges.iter().map(challenge_from_wire).collect::<Result<Vec<_>, _>>()?;
    // Each GPU at once, in a thread of its own: the head's deadline is one GPU's.
    let answers: Vec<Answer> = tokio::task::spawn_blocking(move || {
        std::thread::scope(|scope| {
            let running: Vec<_> = challenges
                .iter()
                .map(|challenge| {
                    let mut prover: Box<dyn Prover + Send> = match &cuda {
                        Some(cuda) if !simulated.contains(&challenge.gpu_index) => Box::new(cuda.clone()),
                        _ => Box::new(CpuProver),
                    };
                    scope.spawn(move || prover.run(challenge))
                })
                .collect();
            running
                .into_iter()
                .map(|thread| thread.join().unwrap_or_else(|_| Err("a GPU's prover panicked".to_string())))
                .collect::<Result<Vec<_>, String>>()
        })
    })
    .await
    .map_err(|err| format!("the prover failed: {err}"))??;
    let commits = answers.iter().map(|answer| commit_to_wire(&answer.commit())).collect();
    let samples = client
        .commit_gpu_check(CommitGpuCheckRequest { node_id: node_id.clone(), check_id: start.check_id, commits })
        .await
        .map_err(status("committing"))?
        .into_inner()
        .samples;
    let mut reveals = Vec::with_capacity(samples.len());
    for sample in &samples {
        let answer = answers
            .iter()
            .find(|answer| answer.gpu_index == sample.gpu_index)
            .ok_or_else(|| format!("the head sampled GPU {}, which was not challenged", sample.gpu_index))?;
        reveals.push(reveal_to_wire(&answer.reveal(&sample_from_wire(sample))?));
    }
    let reply = client
        .reveal_gpu_check(RevealGpuCheckRequest { node_id, check_id: start.check_id, reveals })
        .await
        .map_err(status("revealing"))?
        .into_inner();
    reply.check.ok_or_else(|| "the head sent no verdict".to_string())
}
