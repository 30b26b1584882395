//! Submitted jobs' entrypoints on this node: the head's job server picks the node and
//! asks it to run one (`NodeManager/RunEntrypoint`, the head's control credential only).
//!
//! The node runs the command line with `sh -c` as a user of its own (a fresh uid in the
//! account's group, when the daemon is root), in a working directory of its own, in a
//! process group of its own (so stopping it stops what it started), dying with the
//! daemon. It is told where the cluster is and how to start its jobs: `IONET_ADDRESS`
//! (the head), `IONET_API_KEY` (the submission's credential, which starts jobs paid by
//! the account only while the submission runs; never the account's key),
//! `IONET_DRIVER_NODE` (this node, for its drivers), `IONET_CA_FILE` (the cluster CA),
//! `IONET_JOB_SUBMISSION_ID`, the runtime environment's `env_vars`, and the whole of it
//! (`IONET_RUNTIME_ENV`, which its drivers pass on to their workers). Its directory is a
//! copy of the job's working dir, if it ships one; that and its modules are on its
//! `PYTHONPATH` (unpacked once per node, [`crate::packages`]). What it prints
//! goes to `logs/entrypoint-<submission>.log` and streams to the head as written; its end
//! closes the stream with its exit code or signal. A stream the head drops stops it.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ionet_common::authz::{Authorizer, Principal};
use ionet_common::jobs::checked_submission_id;
use ionet_common::rpc::proto::node::{entrypoint_event, EntrypointEvent, EntrypointExit, RunEntrypointRequest};
use ionet_common::{IonetError, IonetResult};
use tokio::sync::mpsc;

use crate::identities::WorkerIdentities;
use crate::packages::PackageCache;
use crate::pip_envs::PipEnvs;

use ionet_common::auth::Bearer;

/// What an entrypoint's drivers pass on to their workers: the runtime environment's
/// packages and `env_vars`, as JSON.
pub const RUNTIME_ENV_ENV: &str = "IONET_RUNTIME_ENV";
/// The entrypoint's copy of its job's working dir (where its drivers find the programs it
/// ships).
pub const WORKING_DIR_ENV: &str = "IONET_WORKING_DIR";

/// How often a running entrypoint's output file is read.
const OUTPUT_PASS: Duration = Duration::from_millis(50);
/// The most output bytes one event carries.
const MAX_OUTPUT_EVENT: usize = 256 * 1024;
/// How long a stopped entrypoint has between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(3);
/// What an entrypoint inherits of the daemon's environment (nothing else of the
/// provider's passes).
const INHERITED_ENV: [&str; 6] = ["PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "SSL_CERT_FILE"];

/// Where an entrypoint finds the cluster, as this node knows it.
#[derive(Clone, Debug, Default)]
pub struct EntrypointSetting {
    /// This node's own address (its drivers work through it).
    pub node_address: String,
    /// The cluster CA (PEM), when the cluster speaks TLS.
    pub cluster_ca: Option<String>,
}

/// The entrypoints running on this node.
pub struct Entrypoints {
    /// Process group (= pid) of each running entrypoint, by submission.
    running: Arc<Mutex<HashMap<String, u32>>>,
    identities: Option<Arc<WorkerIdentities>>,
    /// Where output files go.
    log_dir: PathBuf,
    /// Under it, each entrypoint's working directory.
    work_root: PathBuf,
    setting: Mutex<EntrypointSetting>,
    /// The node's leases (GPU ids for entrypoints that hold GPUs).
    leases: std::sync::OnceLock<Arc<crate::lease::Leases>>,
    /// The node's unpacked packages.
    cache: Arc<PackageCache>,
    /// The node's installed requirements.
    envs: Arc<PipEnvs>,
}

impl Entrypoints {
    pub fn new(
        identities: Option<Arc<WorkerIdentities>>,
        log_dir: PathBuf,
        work_root: PathBuf,
        cache: Arc<PackageCache>,
        envs: Arc<PipEnvs>,
    ) -> Self {
        Self {
            running: Arc::default(),
            identities,
            log_dir,
            work_root,
            setting: Default::default(),
            leases: Default::default(),
            cache,
            envs,
        }
    }

    /// The node's leases, whose bundles entrypoints occupy.
    pub fn set_leases(&self, leases: Arc<crate::lease::Leases>) {
        let _ = self.leases.set(leases);
    }

    fn leases(&self) -> IonetResult<&Arc<crate::lease::Leases>> {
        self.leases.get().ok_or_else(|| IonetError::Internal("entrypoints have no lease book to take GPUs from".into()))
    }

    /// What entrypoints started from now on are told about this node.
    pub fn set(&self, setting: EntrypointSetting) {
        *self.setting.lock().unwrap_or_else(|p| p.into_inner()) = setting;
    }

    /// Starts `request`'s entrypoint; its events (started, output, exited) arrive on the
    /// receiver. `authorizer` checks the credential it is to start jobs with.
    pub async fn run(
        &self,
        request: RunEntrypointRequest,
        authorizer: &Authorizer,
    ) -> IonetResult<mpsc::Receiver<EntrypointEvent>> {
        let id = checked_submission_id(&request.submission_id)?.to_string();
        if request.entrypoint.trim().is_empty() {
            return Err(IonetError::InvalidArgument("the entrypoint is empty: name a command to run".into()));
        }
        let account = match authorizer.authenticate(Some(format!("Bearer {}", request.credential).as_bytes())) {
            Ok(Principal::Submission { id: named, account, .. }) if *named == *id => account,
            Ok(other) => {
                return Err(IonetError::PermissionDenied(format!(
                    "an entrypoint of submission {id} runs with that submission's credential, not that of {other}"
                )))
            }
            Err(why) => return Err(IonetError::Unauthenticated(format!("the entrypoint's credential: {why}"))),
        };
        {
            // Taken now (pid 0 until it starts), so a second request waits for nothing.
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if running.contains_key(&id) {
                return Err(IonetError::AlreadyExists(format!(
                    "submission {id}'s entrypoint already runs on this node"
                )));
            }
            running.insert(id.clone(), 0);
        }
        // Given back unless it started (also when the head gives up waiting and this
        // future is dropped while the packages are fetched).
        let mut slot = Slot { running: self.running.clone(), id: Some(id.clone()) };
        let started = self.start(&id, &account, request).await;
        if started.is_ok() {
            slot.id = None;
        }
        started
    }

    async fn start(
        &self,
        id: &str,
        account: &Arc<str>,
        request: RunEntrypointRequest,
    ) -> IonetResult<mpsc::Receiver<EntrypointEvent>> {
        let identity = self.identities.as_ref().map(|identities| identities.fresh(account)).transpose()?;
        let setting = self.setting.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let packages = request.packages.clone().unwrap_or_default();
        let credential = Bearer::new(&request.credential)?;
        // The bundle the head holds for it: its alone while it runs (no lease in it), its
        // GPUs seen by it alone.
        let occupied = match request.placement_group_id.is_empty() {
            true => None,
            false => Some(self.leases()?.occupy_bundle(&request.placement_group_id, request.bundle_index)?),
        };
        let mut guard = BundleGuard {
            leases: self.leases.get().cloned(),
            bundle: (request.placement_group_id.clone(), request.bundle_index),
            held: occupied,
        };
        let mut unpacked = self
            .cache
            .unpack_all(&packages, account, identity.map(|identity| identity.gid), &request.gcs_address, &credential)
            .await
            .map_err(|err| IonetError::FailedPrecondition(format!("the job's packages: {err}")))?;
        // Its requirements, installed by the node's `python3` (what `python3` on its PATH
        // is, which is what a Python entrypoint runs).
        if let Some(env) = self.envs.ensure(&packages, crate::pip_envs::NODE_PYTHON).await? {
            unpacked.add_env(env);
        }
        let owner = identity.map(|identity| (identity.uid, identity.gid));
        let (root, working_dir) = (self.work_root.clone(), unpacked.working_dir.clone());
        let dir_id = id.to_string();
        let work_dir = tokio::task::spawn_blocking(move || work_dir(&root, &dir_id, working_dir.as_deref(), owner))
            .await
            .map_err(|err| IonetError::Internal(format!("making the entrypoint's directory: {err}")))??;
        let log_path = self.log_dir.join(format!("entrypoint-{id}.log"));
        // The tenant's output: the daemon's to read, nobody else's.
        let output = std::fs::File::options().write(true).create(true).truncate(true).mode(0o600).open(&log_path)?;
        // Its own copy of the working dir comes first on its Python path, then the modules.
        let mut python_path = unpacked.python_path.clone();
        if unpacked.working_dir.is_some() {
            python_path[0] = work_dir.clone();
        }
        let existing = request.env.get("PYTHONPATH").cloned().or_else(|| std::env::var("PYTHONPATH").ok());
        let path = unpacked.path_before(std::env::var("PATH").ok().as_deref());
        let python_path = crate::packages::Unpacked { working_dir: None, python_path, scripts: None }
            .python_path_before(existing.as_deref());
        // What its drivers pass on to their workers (Ray's runtime environment).
        let runtime_env = serde_json::json!({
            "working_dir": packages.working_dir,
            "py_modules": packages.py_modules,
            "pip": packages.pip,
            "pip_options": packages.pip_options,
            "pip_tool": packages.pip_tool,
            "env_vars": request.env,
        });
        let mut command = tokio::process::Command::new("sh");
        command.arg("-c").arg(&request.entrypoint).current_dir(&work_dir).stdin(Stdio::null());
        // The provider's environment is not the tenant's to read: only what a program
        // needs to run passes (no GPU either, until the entrypoint holds some).
        command.env_clear();
        for name in INHERITED_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        let visible = guard.held.as_ref().map(|(gpus, _)| gpus.gpu_ids()).unwrap_or_default();
        let visible = visible.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        command
            .env("CUDA_VISIBLE_DEVICES", &visible)
            .env("IONET_ADDRESS", &request.gcs_address)
            .env("IONET_API_KEY", &request.credential)
            .env("IONET_DRIVER_NODE", &setting.node_address)
            .env("IONET_JOB_SUBMISSION_ID", id)
            .env("PYTHONUNBUFFERED", "1")
            .env("HOME", &work_dir)
            .env(WORKING_DIR_ENV, &work_dir)
            .env(RUNTIME_ENV_ENV, runtime_env.to_string());
        if let Some(ca) = &setting.cluster_ca {
            let path = work_dir.join(".ionet_cluster_ca.pem");
            std::fs::write(&path, ca)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
            command.env(crate::session::CA_FILE_ENV, path);
        }
        command.envs(&request.env);
        if !python_path.is_empty() {
            command.env("PYTHONPATH", python_path);
        }
        if let Some(path) = path {
            command.env("PATH", path);
        }
        command.stdout(output.try_clone()?).stderr(output);
        if let Some(identity) = identity {
            command.uid(identity.uid).gid(identity.gid);
        }
        // SAFETY: setsid, prctl and umask are async-signal-safe. The entrypoint leads a
        // process group of its own (stopping it stops its children) and dies with the
        // daemon.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                libc::umask(0o077);
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|err| {
            IonetError::FailedPrecondition(format!("cannot start the entrypoint of submission {id}: {err}"))
        })?;
        let pid = child.id().unwrap_or_default();
        self.running.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), pid);
        tracing::info!(submission = %id, pid, "entrypoint started");
        let (sender, receiver) = mpsc::channel(16);
        let running = self.running.clone();
        let id = id.to_string();
        let cleanup = work_dir.clone();
        let gpus = guard.take();
        tokio::spawn(async move {
            let _gpus = gpus;
            let _ = sender.send(event(entrypoint_event::Event::StartedPid(pid))).await;
            let mut tail = Tail { path: log_path, offset: 0 };
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    _ = sender.closed() => {
                        // Nobody supervises it any more: it stops.
                        tracing::warn!(submission = %id, "the head stopped following the entrypoint: stopping it");
                        stop_group(pid).await;
                        break child.wait().await;
                    }
                    _ = tokio::time::sleep(OUTPUT_PASS) => {
                        if !tail.send_new(&sender).await {
                            stop_group(pid).await;
                            break child.wait().await;
                        }
                    }
                }
            };
            // What it left running in its group ends with it, and its group is no longer
            // one a stop may signal.
            kill_group(pid);
            running.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            tail.send_new(&sender).await;
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(cleanup)).await;
            let exit = match status {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    EntrypointExit {
                        code: status.code().unwrap_or(-1),
                        signal: status.signal().unwrap_or(0),
                        error: String::new(),
                    }
                }
                Err(err) => EntrypointExit { code: -1, signal: 0, error: format!("waiting for the entrypoint: {err}") },
            };
            tracing::info!(submission = %id, code = exit.code, signal = exit.signal, "entrypoint ended");
            let _ = sender.send(event(entrypoint_event::Event::Exited(exit))).await;
        });
        Ok(receiver)
    }

    /// Stops submission `id`'s entrypoint and what it started (SIGTERM, then SIGKILL after
    /// [`STOP_GRACE`]); whether one ran here.
    pub fn stop(&self, id: &str) -> bool {
        let Some(pid) = self.running.lock().unwrap_or_else(|p| p.into_inner()).get(id).copied() else {
            return false;
        };
        if pid == 0 {
            // Still being prepared: it starts, then the head's stop reaches it again.
            return true;
        }
        tracing::info!(submission = %id, pid, "stopping the entrypoint");
        tokio::spawn(stop_group(pid));
        true
    }
}

/// A fresh working directory for submission `id` under `root` (a copy of
/// `working_dir`, if it ships one): the entrypoint's own, its account's group may enter
/// it (its drivers' workers on this node start where the driver runs).
fn work_dir(root: &Path, id: &str, working_dir: Option<&Path>, owner: Option<(u32, u32)>) -> IonetResult<PathBuf> {
    let dir = root.join(id);
    if std::fs::symlink_metadata(&dir).is_ok() {
        std::fs::remove_dir_all(&dir)?;
    }
    match working_dir {
        Some(from) => crate::packages::copy_tree(from, &dir, owner)?,
        None => {
            std::fs::DirBuilder::new().mode(0o750).create(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
            }
        }
    }
    Ok(dir)
}

/// The bundle an entrypoint occupies, given back when it ends (or when it never started).
struct BundleGuard {
    leases: Option<Arc<crate::lease::Leases>>,
    bundle: (Vec<u8>, u32),
    /// Its GPU ids, and all it holds.
    held: Option<(ionet_scheduler::GpuAssignment, ionet_common::ResourceSet)>,
}

impl BundleGuard {
    /// The guard, moved out (the caller's copy gives nothing back).
    fn take(&mut self) -> BundleGuard {
        BundleGuard { leases: self.leases.clone(), bundle: self.bundle.clone(), held: self.held.take() }
    }
}

impl Drop for BundleGuard {
    fn drop(&mut self) {
        if let (Some(leases), Some((gpus, held))) = (&self.leases, self.held.take()) {
            leases.vacate_bundle(&self.bundle.0, self.bundle.1, &gpus, &held);
        }
    }
}

/// Gives back an entrypoint's place in the running table unless it started.
struct Slot {
    running: Arc<Mutex<HashMap<String, u32>>>,
    id: Option<String>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }
    }
}

fn event(event: entrypoint_event::Event) -> EntrypointEvent {
    EntrypointEvent { event: Some(event) }
}

/// SIGKILL to what is left of process group `pgid` (its leader was just reaped).
fn kill_group(pgid: u32) {
    if let Ok(pgid) = i32::try_from(pgid) {
        if pgid > 1 {
            // SAFETY: signalling the group this daemon started (setsid in the child).
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

/// SIGTERM to process group `pgid`, then SIGKILL after the grace if it is still there.
async fn stop_group(pgid: u32) {
    let Ok(pgid) = i32::try_from(pgid) else { return };
    if pgid <= 1 {
        return;
    }
    // SAFETY: signalling a process group this daemon started (setsid in the child).
    unsafe {
        libc::kill(-pgid, libc::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    // SAFETY: signal 0 only checks whether the group still has members.
    while tokio::time::Instant::now() < deadline && unsafe { libc::kill(-pgid, 0) } == 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SAFETY: as above.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// The part of an entrypoint's output file sent so far.
struct Tail {
    path: PathBuf,
    offset: u64,
}

impl Tail {
    /// Sends what was written since the last pass; false when the head is gone.
    async fn send_new(&mut self, sender: &mpsc::Sender<EntrypointEvent>) -> bool {
        loop {
            let chunk = match read_from(&self.path, self.offset) {
                Ok(chunk) => chunk,
                Err(err) => {
                    tracing::warn!(path = %self.path.display(), error = %err, "cannot read an entrypoint's output");
                    return true;
                }
            };
            if chunk.is_empty() {
                return true;
            }
            self.offset += chunk.len() as u64;
            if sender.send(event(entrypoint_event::Event::Output(chunk))).await.is_err() {
                return false;
            }
        }
    }
}

/// Up to [`MAX_OUTPUT_EVENT`] bytes of `path` from `offset`.
fn read_from(path: &Path, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut chunk = Vec::new();
    file.take(MAX_OUTPUT_EVENT as u64).read_to_end(&mut chunk)?;
    Ok(chunk)
}
