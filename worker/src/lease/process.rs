//! Worker processes: how a daemon starts one (telling it its place in the environment
//! protocol of `ionet_common::worker_env`), learns its address, stops it, and sees it exit.

use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ionet_common::rpc::proto::common::WorkerCommand;
use ionet_common::worker_env::{CredentialPipe, WorkerEnv};
use ionet_common::{IonetError, IonetResult, JobId, WorkerId};
use tokio::sync::oneshot;

use super::forkserver::{self, ForkRequest, Forked};
use super::state::{Doing, Granted, PoolKey, Process};
use super::{Leases, MeterEvent, Worker};

/// How long an idle worker past the pool's soft limit is kept for reuse (Ray's
/// `idle_worker_killing_time_threshold_ms`): starting a worker costs far more than
/// keeping one a second.
pub(super) const EXCESS_IDLE_GRACE: Duration = Duration::from_secs(1);

/// The most output files of one job a node follows (its latest workers').
const MAX_FOLLOWED_FILES_PER_JOB: usize = 512;

/// What a Python driver names as its path for its workers (`ionet._worker`).
const PYTHON_DRIVER_PATH: &str = "IONET_PYTHONPATH";

/// How long a started worker may take to register.
const WORKER_START_TIMEOUT: Duration = Duration::from_secs(60);

impl Leases {
    /// What a worker this daemon starts is told (the protocol both sides share).
    fn worker_env(&self, worker_id: WorkerId, job_id: JobId, gpu_ids: &[u32]) -> WorkerEnv {
        WorkerEnv {
            worker_id,
            node_id: self.node_id,
            node_address: self.address.clone(),
            job_id,
            gpu_ids: gpu_ids.to_vec(),
            object_store_dir: self.object_store_dir.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            gcs_address: self.gcs_address.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            head_key: self.head_key.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            cluster_ca: self.cluster_ca.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// The job's credential, in a pipe for its new worker to read.
    fn credential_pipe(&self, job_id: JobId) -> IonetResult<CredentialPipe> {
        let credential = self
            .job_credentials
            .get(&job_id)
            .ok_or_else(|| IonetError::Internal(format!("no credential of job {job_id} to start its worker with")))?;
        CredentialPipe::holding(credential.as_str())
    }

    /// The packages `command` names for `job_id`'s workers, unpacked on this node (once
    /// per node; fetched from the head with the job's credential).
    async fn unpack_packages(
        &self,
        job_id: JobId,
        command: &WorkerCommand,
    ) -> IonetResult<Option<crate::packages::Unpacked>> {
        let Some(packages) = command
            .packages
            .as_ref()
            .filter(|p| !p.working_dir.is_empty() || !p.py_modules.is_empty() || !p.pip.is_empty())
        else {
            return Ok(None);
        };
        let cache = self.packages.get().ok_or_else(|| {
            IonetError::FailedPrecondition(format!("job {job_id} ships packages, and this node unpacks none"))
        })?;
        let account =
            self.job_accounts.get(&job_id).map(|account| account.clone()).ok_or_else(|| {
                IonetError::Internal(format!("no account of job {job_id} to unpack its packages for"))
            })?;
        let credential =
            self.job_credentials.get(&job_id).map(|credential| credential.clone()).ok_or_else(|| {
                IonetError::Internal(format!("no credential of job {job_id} to fetch its packages with"))
            })?;
        let gid = self.identities.get().map(|identities| identities.group_of_account(&account)).transpose()?;
        let gcs_address = self.gcs_address.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut unpacked =
            cache.unpack_all(packages, &account, gid, &gcs_address, &credential).await.map_err(|err| {
                IonetError::FailedPrecondition(format!("cannot start a worker of job {job_id}: its packages: {err}"))
            })?;
        // Its requirements, installed by the node's own `python3` (never a program the job
        // names: the install runs with the daemon's rights until it drops them).
        if let Some(envs) = self.pip_envs.get() {
            if let Some(env) = envs.ensure(packages, crate::pip_envs::NODE_PYTHON).await? {
                unpacked.add_env(env);
            }
        } else if !packages.pip.is_empty() {
            return Err(IonetError::FailedPrecondition(format!(
                "job {job_id} asks for packages this node installs none of"
            )));
        }
        Ok(Some(unpacked))
    }

    /// A worker announced its address.
    pub fn register_worker(&self, worker_id: &[u8], address: String) -> IonetResult<()> {
        let worker_id = WorkerId::from_bytes(worker_id)?;
        let (_, (_, sender)) = self.starting.remove(&worker_id).ok_or_else(|| {
            IonetError::NotFound(format!("worker {} was not started by this node", worker_id.short()))
        })?;
        let _ = sender.send(address);
        Ok(())
    }

    /// Who `job_id`'s workers run as: `None` for this daemon's own user, else (a root
    /// daemon) the job's own uid and gid.
    fn runs_as(&self, job_id: JobId) -> IonetResult<Option<(u32, u32)>> {
        let Some(identities) = self.identities.get() else { return Ok(None) };
        let account = self
            .job_accounts
            .get(&job_id)
            .map(|account| account.clone())
            .ok_or_else(|| IonetError::Internal(format!("no account of job {job_id} to start its worker as")))?;
        let identity = identities.of_job(job_id, &account)?;
        Ok(Some((identity.uid, identity.gid)))
    }

    /// What starts `command` for its job here (a worker, or its forkserver): the program
    /// and its environment, its user and directory; not what is each worker's own.
    fn job_process(
        &self,
        command: &WorkerCommand,
        unpacked: Option<&crate::packages::Unpacked>,
        runs_as: Option<(u32, u32)>,
    ) -> tokio::process::Command {
        let mut process = tokio::process::Command::new(&command.argv[0]);
        process
            .args(&command.argv[1..])
            // A runtime environment the daemon itself ran in is not its workers' (theirs is
            // in the command when they have one of their own).
            .env_remove(ionet_common::worker_env::RUNTIME_ENV)
            .envs(&command.env)
            // Secrets the daemon itself was started with are not its workers' to inherit.
            .env_remove("IONET_JOIN_TOKEN")
            .env_remove("IONET_CREDENTIAL")
            .env_remove("IONET_API_KEY")
            // Each worker is told whether its output is followed.
            .env_remove(ionet_common::worker_env::OUTPUT_FOLLOWED);
        // A root daemon runs each job's workers as a user of their own.
        if let Some((uid, gid)) = runs_as {
            process.uid(uid).gid(gid);
        }
        // The driver's directory, where this machine has it and the worker may enter it
        // (a driver elsewhere, or a directory of another user: the root instead). Changed
        // into after the worker became its job's user, so the check is the worker's own.
        let mut cwd = std::ffi::CString::new(command.cwd.as_bytes()).ok().filter(|_| !command.cwd.is_empty());
        if let Some(unpacked) = unpacked {
            // The job ships its code: the worker starts in its working dir, with it and its
            // modules first on its Python path.
            if let Some(dir) = &unpacked.working_dir {
                cwd = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok();
            }
            let python_path = command.env.get("PYTHONPATH").cloned().or_else(|| std::env::var("PYTHONPATH").ok());
            process.env("PYTHONPATH", unpacked.python_path_before(python_path.as_deref()));
            let driver_path = command.env.get(PYTHON_DRIVER_PATH).map(String::as_str);
            process.env(PYTHON_DRIVER_PATH, unpacked.python_path_before(driver_path));
            let path = command.env.get("PATH").cloned().or_else(|| std::env::var("PATH").ok());
            if let Some(path) = unpacked.path_before(path.as_deref()) {
                process.env("PATH", path);
            }
        }
        match runs_as {
            // Another user: set between fork and exec, where the check is the worker's own.
            // SAFETY: chdir, prctl and umask are async-signal-safe.
            Some(_) => unsafe {
                process.pre_exec(move || {
                    if libc::chdir(cwd.as_ref().map_or(c"/".as_ptr(), |cwd| cwd.as_ptr())) != 0 {
                        libc::chdir(c"/".as_ptr());
                    }
                    // A worker must not outlive its node daemon (the worker checks again).
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    // What the worker writes is its own alone unless it says otherwise.
                    libc::umask(0o077);
                    Ok(())
                });
            },
            // The daemon's own user: no code between fork and exec, so the spawn needs no
            // fork (a fork copies this daemon's page tables, most of a worker's start when
            // the daemon is large); the worker settles itself (`settle_worker_process`).
            None => {
                let dir = cwd
                    .as_ref()
                    .map(|cwd| std::path::PathBuf::from(std::ffi::OsStr::from_bytes(cwd.as_bytes())))
                    .filter(|dir| dir.is_dir());
                process.current_dir(dir.unwrap_or_else(|| "/".into()));
            }
        }
        process
    }

    /// The forkserver of `command`: the job's process, its output to a file of the job's
    /// where this node keeps them.
    fn forkserver_process(
        &self,
        job_id: JobId,
        command: &WorkerCommand,
        unpacked: Option<&crate::packages::Unpacked>,
        runs_as: Option<(u32, u32)>,
    ) -> IonetResult<tokio::process::Command> {
        let mut process = self.job_process(command, unpacked, runs_as);
        if let Some(dir) = &self.options.log_dir {
            let path = dir.join(format!("forkserver-{}.log", job_id.hex()));
            let file = std::fs::File::options().append(true).create(true).open(path)?;
            process.stdout(file.try_clone()?).stderr(file);
        }
        Ok(process)
    }

    /// Forks a worker from its job's forkserver (started first if need be); an error
    /// means the worker is to be started as a process of its own.
    async fn fork_worker(&self, launch: Launch<'_>) -> IonetResult<Spawned> {
        let Launch { job_id, command, unpacked, runs_as, vars, output } = launch;
        let credential = self.credential_pipe(job_id)?;
        let mut vars = vars.to_vec();
        vars.extend(credential.vars());
        vars.push(ionet_common::worker_env::forked_var());
        // SAFETY: geteuid has no memory effects.
        let uid = runs_as.map_or_else(|| unsafe { libc::geteuid() }, |(uid, _)| uid);
        let key = forkserver::key_of(job_id, command, uid);
        let request = ForkRequest { vars: &vars, credential: credential.into_fd(), output: output.map(AsFd::as_fd) };
        let start = || self.forkserver_process(job_id, command, unpacked, runs_as);
        let forked = self.forkservers.fork(key, job_id, start, uid, request).await?;
        self.pidfds.insert(forked.pid, forked.pidfd.clone());
        Ok(Spawned::Forked(forked))
    }

    /// Starts a worker as a process of its own.
    fn spawn(&self, launch: Launch<'_>) -> IonetResult<Spawned> {
        let Launch { job_id, command, unpacked, runs_as, vars, output } = launch;
        let mut process = self.job_process(command, unpacked, runs_as);
        process.envs(vars.iter().cloned());
        // The credential never enters the environment: the worker reads it from a pipe,
        // its standard input.
        let credential = self.credential_pipe(job_id)?;
        process.envs(credential.vars()).stdin(credential.into_stdin());
        if let Some(file) = output {
            process.stdout(file.try_clone()?).stderr(file.try_clone()?);
        }
        let child = process.spawn().map_err(|err| {
            let why = match runs_as {
                Some((uid, _)) if err.kind() == std::io::ErrorKind::PermissionDenied => format!(
                    " (the job's workers run as uid {uid}, a user of their own: its program, and every \
                     directory above it, must be readable and executable by all users)"
                ),
                _ => String::new(),
            };
            let message = format!("cannot start a worker of job {job_id} with {:?}: {err}{why}", command.argv[0]);
            // A program that is missing or not runnable stays so: the job hears it; a
            // fork that failed for want of memory or processes is tried again.
            match err.kind() {
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::NotFound => {
                    IonetError::FailedPrecondition(message)
                }
                _ => IonetError::Internal(message),
            }
        })?;
        // The worker holds its copy of the pipe now; this end closes here.
        drop(process);
        Ok(Spawned::Child(child))
    }

    /// A worker about to start: its id (awaited in `starting`), its protocol variables and
    /// its output file where this node keeps them.
    fn prepare_worker(&self, job_id: JobId, key: &PoolKey) -> IonetResult<Attempt> {
        let worker_id = WorkerId::random();
        let mut vars = self.worker_env(worker_id, job_id, &key.gpu_ids).to_vars();
        let mut output = None;
        if let Some(dir) = &self.options.log_dir {
            // The whole id, and a file of its own: another job's output is never appended to.
            let path = dir.join(format!("worker-{}.log", worker_id.hex()));
            let file = std::fs::File::options().write(true).create_new(true).open(&path)?;
            vars.push((ionet_common::worker_env::OUTPUT_FOLLOWED, "1".into()));
            output = Some((file, path));
        }
        let (sender, receiver) = oneshot::channel();
        self.starting.insert(worker_id, (job_id, sender));
        Ok(Attempt { worker_id, vars, output, receiver })
    }

    pub(super) async fn start_worker(
        self: &Arc<Self>,
        job_id: JobId,
        command: &WorkerCommand,
        key: PoolKey,
    ) -> IonetResult<Worker> {
        let unpacked = self.unpack_packages(job_id, command).await?;
        let runs_as = self.runs_as(job_id)?;
        let mut attempt = self.prepare_worker(job_id, &key)?;
        let mut spawned = None;
        if command.forks {
            let worker_id = attempt.worker_id;
            let output = attempt.output.as_ref().map(|(file, _)| file);
            let launch = Launch { job_id, command, unpacked: unpacked.as_ref(), runs_as, vars: &attempt.vars, output };
            match self.fork_worker(launch).await {
                Ok(forked) => spawned = Some(forked),
                Err(err) => {
                    tracing::warn!(job = %job_id, error = %err, "a worker starts without its job's forkserver");
                    // A child the server may have forked all the same is not this worker:
                    // the one started instead has an id (and output file) of its own.
                    self.starting.remove(&worker_id);
                    attempt = self.prepare_worker(job_id, &key)?;
                }
            }
        }
        let Attempt { worker_id, vars, output, receiver } = attempt;
        let spawned = match spawned {
            Some(spawned) => Ok(spawned),
            None => {
                let output = output.as_ref().map(|(file, _)| file);
                self.spawn(Launch { job_id, command, unpacked: unpacked.as_ref(), runs_as, vars: &vars, output })
            }
        };
        let mut spawned = match spawned {
            Ok(spawned) => spawned,
            Err(err) => {
                self.starting.remove(&worker_id);
                return Err(err);
            }
        };
        let pid = spawned.pid();
        if let Some((_, path)) = output {
            let mut files = self.job_logs.entry(job_id).or_default();
            files.push((pid, path));
            // Bounded: a job that started more workers here than this is followed for its
            // latest ones.
            if files.len() > MAX_FOLLOWED_FILES_PER_JOB {
                files.remove(0);
            }
        }
        let starting = Process { pid, key, address: String::new(), doing: Doing::Starting, holding: false };
        self.lock().processes.insert(worker_id, starting);
        let address = tokio::select! {
            address = receiver => address.map_err(|_| IonetError::Internal("worker registration dropped".into())),
            status = spawned.wait() => Err(IonetError::Internal(format!(
                "worker {} exited before registering ({status}); is ionet::init() called first in main?",
                worker_id.short(),
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
                spawned.kill();
                self.forget_pidfd(pid, &spawned);
                return Err(err);
            }
        };
        if let Some(process) = self.lock().processes.get_mut(&worker_id) {
            process.address = address.clone();
        }
        // Watch the process: when it exits, its lease (if any) ends with it, and what it
        // owned goes (however it ended: by itself, killed, or stopped by this daemon).
        let leases = self.clone();
        let exited_address = address.clone();
        tokio::spawn(async move {
            let status = spawned.wait().await;
            if let Some(hook) = leases.on_worker_exit.get() {
                hook(exited_address);
            }
            leases.worker_exited(worker_id, status);
            leases.forget_pidfd(pid, &spawned);
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
            self.kill(pid);
        }
        // A job's forkserver goes when unused for the idle time while its job has no
        // worker here.
        if !self.forkservers.is_empty() {
            let busy: std::collections::HashSet<Vec<u8>> =
                self.lock().processes.values().map(|process| process.key.job_id.clone()).collect();
            self.forkservers.reap(options.idle_timeout, |job_id| busy.contains(&job_id.to_vec()));
        }
    }

    /// Stops every worker (daemon shutdown), and the forkservers.
    pub fn stop_all_workers(&self) {
        self.forkservers.stop_all();
        let pids: Vec<u32> = self.lock().processes.values().map(|process| process.pid).collect();
        for pid in pids {
            self.kill(pid);
        }
    }

    /// Forgets a forked worker's pidfd: its own entry only (its pid, free once the server
    /// reaped it, may be another forked worker's by now).
    fn forget_pidfd(&self, pid: u32, spawned: &Spawned) {
        if let Spawned::Forked(forked) = spawned {
            self.pidfds.remove_if(&pid, |_, pidfd| Arc::ptr_eq(pidfd, &forked.pidfd));
        }
    }

    /// Stops a worker this daemon started (by its pidfd when a forkserver forked it).
    pub(super) fn kill(&self, pid: u32) {
        if let Some(pidfd) = self.pidfds.get(&pid) {
            forkserver::kill(&pidfd);
        } else if pid > 0 {
            // SAFETY: signalling a child process this daemon started.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    }
}

/// What a worker is started with, forked or not.
#[derive(Clone, Copy)]
struct Launch<'a> {
    job_id: JobId,
    command: &'a WorkerCommand,
    unpacked: Option<&'a crate::packages::Unpacked>,
    /// `None`: the daemon's own user; else (a root daemon) the job's uid and gid.
    runs_as: Option<(u32, u32)>,
    vars: &'a [(&'static str, String)],
    output: Option<&'a std::fs::File>,
}

/// A worker about to start (`Leases::prepare_worker`).
struct Attempt {
    worker_id: WorkerId,
    vars: Vec<(&'static str, String)>,
    output: Option<(std::fs::File, std::path::PathBuf)>,
    receiver: oneshot::Receiver<String>,
}

/// A worker process as started: this daemon's child, or a forkserver's.
enum Spawned {
    Child(tokio::process::Child),
    Forked(Forked),
}

impl Spawned {
    fn pid(&self) -> u32 {
        match self {
            Spawned::Child(child) => child.id().unwrap_or(0),
            Spawned::Forked(forked) => forked.pid,
        }
    }

    /// Waits for the process to exit; how it ended, where known.
    async fn wait(&mut self) -> String {
        match self {
            Spawned::Child(child) => child.wait().await.map(|s| s.to_string()).unwrap_or_else(|err| err.to_string()),
            Spawned::Forked(forked) => match forked.pidfd.readable().await {
                Ok(_) => "exited; forked by its job's forkserver".into(),
                Err(err) => err.to_string(),
            },
        }
    }

    fn kill(&mut self) {
        match self {
            Spawned::Child(child) => {
                let _ = child.start_kill();
            }
            Spawned::Forked(forked) => forkserver::kill(&forked.pidfd),
        }
    }
}
