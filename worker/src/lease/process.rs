//! Worker processes: how a daemon starts one (the environment protocol a worker reads,
//! in one place for both sides), learns its address, stops it, and sees it exit.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ionet::rpc::proto::node::WorkerCommand;
use ionet::{IonetError, IonetResult, JobId, WorkerId};
use tokio::sync::oneshot;

use super::state::{Doing, Granted, PoolKey, Process};
use super::{Leases, MeterEvent, Worker};

/// Environment a worker process finds its node, job and GPUs in.
pub const WORKER_MODE_ENV: &str = "IONET_WORKER_MODE";
pub const WORKER_ID_ENV: &str = "IONET_WORKER_ID";
pub const NODE_ADDRESS_ENV: &str = "IONET_NODE_ADDRESS";
pub const NODE_ID_ENV: &str = "IONET_NODE_ID";
pub const JOB_ID_ENV: &str = "IONET_JOB_ID";
pub const GPU_IDS_ENV: &str = "IONET_GPU_IDS";
pub const TOKEN_ENV: &str = "IONET_TOKEN";
pub const OBJECT_STORE_DIR_ENV: &str = "IONET_OBJECT_STORE_DIR";
pub const GCS_ADDRESS_ENV: &str = "IONET_GCS_ADDRESS";

/// How long an idle worker past the pool's soft limit is kept for reuse (Ray's
/// `idle_worker_killing_time_threshold_ms`): starting a worker costs far more than
/// keeping one a second.
pub(super) const EXCESS_IDLE_GRACE: Duration = Duration::from_secs(1);

/// How long a started worker may take to register.
const WORKER_START_TIMEOUT: Duration = Duration::from_secs(60);

impl Leases {
    /// A worker announced its address.
    pub fn register_worker(&self, worker_id: &[u8], address: String) -> IonetResult<()> {
        let worker_id = WorkerId::from_bytes(worker_id)?;
        let (_, sender) = self.starting.remove(&worker_id).ok_or_else(|| {
            IonetError::NotFound(format!("worker {} was not started by this node", worker_id.short()))
        })?;
        let _ = sender.send(address);
        Ok(())
    }

    pub(super) async fn start_worker(
        self: &Arc<Self>,
        job_id: JobId,
        command: &WorkerCommand,
        key: PoolKey,
    ) -> IonetResult<Worker> {
        let worker_id = WorkerId::random();
        let mut process = tokio::process::Command::new(&command.argv[0]);
        process
            .args(&command.argv[1..])
            .envs(&command.env)
            .env(WORKER_MODE_ENV, "1")
            .env(WORKER_ID_ENV, worker_id.hex())
            .env(NODE_ADDRESS_ENV, &self.address)
            .env(NODE_ID_ENV, self.node_id.hex())
            .env(JOB_ID_ENV, job_id.hex())
            .env(TOKEN_ENV, &self.token)
            .env(OBJECT_STORE_DIR_ENV, self.object_store_dir.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .env(GCS_ADDRESS_ENV, self.gcs_address.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .env(GPU_IDS_ENV, key.gpu_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
            .env("CUDA_VISIBLE_DEVICES", key.gpu_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
            .stdin(Stdio::null());
        if !command.cwd.is_empty() {
            process.current_dir(&command.cwd);
        }
        if let Some(dir) = &self.options.log_dir {
            let path = dir.join(format!("worker-{}.log", worker_id.short()));
            let file = std::fs::File::create(&path)?;
            process.stdout(file.try_clone()?).stderr(file);
        }
        // SAFETY: prctl is async-signal-safe; a worker must not outlive its node daemon.
        unsafe {
            process.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let (sender, receiver) = oneshot::channel();
        self.starting.insert(worker_id, sender);
        let mut child = match process.spawn() {
            Ok(child) => child,
            Err(err) => {
                self.starting.remove(&worker_id);
                return Err(IonetError::Internal(format!("cannot start worker {:?}: {err}", command.argv[0])));
            }
        };
        let pid = child.id().unwrap_or(0);
        let starting = Process { pid, key, address: String::new(), doing: Doing::Starting };
        self.lock().processes.insert(worker_id, starting);
        let address = tokio::select! {
            address = receiver => address.map_err(|_| IonetError::Internal("worker registration dropped".into())),
            status = child.wait() => Err(IonetError::Internal(format!(
                "worker {} exited before registering ({}); is ionet::init() called first in main?",
                worker_id.short(),
                status.map(|s| s.to_string()).unwrap_or_else(|err| err.to_string())
            ))),
            _ = tokio::time::sleep(WORKER_START_TIMEOUT) => Err(IonetError::Timeout(format!(
                "worker {} did not register within {WORKER_START_TIMEOUT:?}", worker_id.short()
            ))),
        };
        let address = match address {
            Ok(address) => address,
            Err(err) => {
                self.starting.remove(&worker_id);
                self.lock().processes.remove(&worker_id);
                let _ = child.start_kill();
                return Err(err);
            }
        };
        if let Some(process) = self.lock().processes.get_mut(&worker_id) {
            process.address = address.clone();
        }
        // Watch the process: when it exits, its lease (if any) ends with it.
        let leases = self.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            leases.worker_exited(worker_id, status.map(|s| s.to_string()).unwrap_or_else(|err| err.to_string()));
        });
        tracing::debug!(worker = %worker_id.short(), pid, %address, "worker started");
        Ok(Worker { worker_id, address })
    }

    fn worker_exited(&self, worker_id: WorkerId, status: String) {
        let ended = {
            let mut state = self.lock();
            let ended = state.process_exited(worker_id, Instant::now(), self.options.max_blocked_workers);
            if let Some((lease_id, granted)) = &ended {
                if Granted::metered(&granted.resources, granted.bundle.as_ref()) {
                    self.meter(MeterEvent::Ended { lease_id: *lease_id });
                }
            }
            ended
        };
        if let Some((lease_id, _)) = ended {
            tracing::warn!(worker = %worker_id.short(), %status, lease = %lease_id.short(), "leased worker died; its lease ends");
            self.freed.notify_waiters();
        }
    }

    /// Stops workers idle past the timeout, and the excess over the pool's soft limit once
    /// idle for `EXCESS_IDLE_GRACE` (a tree of tasks or the next batch reuses them meanwhile).
    pub fn reap_idle(&self) {
        let options = &self.options;
        let doomed =
            self.lock().reap_idle(Instant::now(), options.max_idle_workers, options.idle_timeout, EXCESS_IDLE_GRACE);
        for pid in doomed {
            kill(pid);
        }
    }

    /// Stops every worker (daemon shutdown).
    pub fn stop_all_workers(&self) {
        let pids: Vec<u32> = self.lock().processes.values().map(|process| process.pid).collect();
        for pid in pids {
            kill(pid);
        }
    }
}

pub(super) fn kill(pid: u32) {
    if pid > 0 {
        // SAFETY: signalling a child process this daemon started.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}
