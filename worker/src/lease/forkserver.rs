//! Forkservers: a job's worker program started once on this node to fork its workers
//! (`WorkerCommand::forks`, which Python drivers set). Most of a Python worker's start is
//! its interpreter's own and its imports; a child forked from an interpreter that has
//! done both is serving in a few milliseconds.
//!
//! The protocol runs over a socket pair of sequenced packets, the server's standard
//! input; each message is JSON, with descriptors beside it:
//! - server → daemon, once: `{"ready": true}`, when it has imported what it forks with;
//! - daemon → server, per worker: `{"vars": [[name, value], …], "output": bool}` (the
//!   worker's protocol variables) with the worker's credential pipe (its standard input
//!   to be) and, when `output`, its output file;
//! - server → daemon: `{}` with a pidfd of the child, or `{"error": "…"}`.
//!
//! The server holds no credential (each worker's comes in its own pipe) and is the
//! job's own code: what it answers is checked. The pidfd must be of a live process that
//! the server itself forked, as the job's user, since it becomes the daemon's way to stop
//! the worker (a pidfd of another process would have the daemon kill that one). A server
//! that fails to start, stalls or answers wrongly is stopped, and the job's workers start
//! directly for a while; one that died is started again at the next worker. The workers it
//! forked outlive it (they watch the daemon themselves: `worker_env::FORKED`).

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ionet_common::rpc::proto::common::WorkerCommand;
use ionet_common::{IonetError, IonetResult, JobId};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};
use tokio::io::unix::AsyncFd;

/// How long a forkserver may take to import what it forks with.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one fork may take to be answered.
const FORK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a job's workers start directly after its forkserver failed.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// The most forkservers a node runs at once (one per job and command: a task's own
/// `env_vars` is a command of its own); workers past it start directly.
const MAX_SERVERS: usize = 32;
/// The longest message a forkserver may send.
const MAX_REPLY_BYTES: usize = 4096;

/// The forkservers of this node's jobs, one per job, command and user.
#[derive(Default)]
pub(super) struct Forkservers {
    slots: DashMap<String, Arc<tokio::sync::Mutex<Slot>>>,
}

#[derive(Default)]
struct Slot {
    job_id: Option<JobId>,
    server: Option<Server>,
    last_used: Option<Instant>,
    failed_until: Option<Instant>,
}

struct Server {
    channel: AsyncFd<OwnedFd>,
    /// Killed when dropped (and reaped by tokio).
    child: tokio::process::Child,
}

/// A worker a forkserver forked: not this daemon's child, so watched (and stopped)
/// through its pidfd.
pub(super) struct Forked {
    pub pid: u32,
    pub pidfd: Arc<AsyncFd<OwnedFd>>,
}

/// What identifies a forkserver: a worker forked from it is one the command would start.
pub(super) fn key_of(job_id: JobId, command: &WorkerCommand, uid: u32) -> String {
    let env: std::collections::BTreeMap<_, _> = command.env.iter().collect();
    format!("{job_id}\0{uid}\0{:?}\0{env:?}\0{}\0{:?}", command.argv, command.cwd, command.packages)
}

impl Forkservers {
    /// Forks a worker from the forkserver of `key`, started first with `start` if there
    /// is none. `vars` are the worker's own protocol variables, `credential` its
    /// credential pipe, `output` its output file; `uid` is who the worker must run as.
    /// An error means the worker should be started directly.
    pub async fn fork(
        &self,
        key: String,
        job_id: JobId,
        start: impl FnOnce() -> IonetResult<tokio::process::Command>,
        uid: u32,
        request: ForkRequest<'_>,
    ) -> IonetResult<Forked> {
        let slot = self.slots.entry(key).or_default().clone();
        let mut slot = slot.lock().await;
        let now = Instant::now();
        if slot.failed_until.is_some_and(|until| now < until) {
            return Err(IonetError::Unavailable("the job's forkserver failed recently".into()));
        }
        if let Some(server) = slot.server.as_mut() {
            if !matches!(server.child.try_wait(), Ok(None)) {
                tracing::warn!(job = %job_id, "a forkserver exited; starting another");
                slot.server = None;
            }
        }
        if slot.server.is_none() {
            if self.running() >= MAX_SERVERS {
                return Err(IonetError::Unavailable(format!("{MAX_SERVERS} forkservers run on this node")));
            }
            slot.job_id = Some(job_id);
            match Server::start(start()?).await {
                Ok(server) => slot.server = Some(server),
                Err(err) => {
                    slot.failed_until = Some(now + RETRY_AFTER);
                    return Err(err);
                }
            }
        }
        let Some(server) = slot.server.as_mut() else { unreachable!("started above") };
        let forked = match tokio::time::timeout(FORK_TIMEOUT, server.fork(uid, request)).await {
            Ok(forked) => forked,
            Err(_) => Err(IonetError::Timeout(format!("the forkserver did not fork within {FORK_TIMEOUT:?}"))),
        };
        match forked {
            Ok(forked) => {
                slot.last_used = Some(Instant::now());
                Ok(forked)
            }
            Err(err) => {
                // Stopped (dropping it kills it): the job's workers start directly for a
                // while, and a later one starts a new server.
                slot.server = None;
                slot.failed_until = Some(Instant::now() + RETRY_AFTER);
                Err(err)
            }
        }
    }

    /// How many forkservers run (one being started or used counts).
    pub fn running(&self) -> usize {
        self.slots.iter().filter(|slot| slot.try_lock().map_or(true, |slot| slot.server.is_some())).count()
    }

    /// Stops the forkservers unused for `idle` whose jobs have no worker here (`busy`),
    /// and forgets what is left of them.
    pub fn reap(&self, idle: Duration, busy: impl Fn(&JobId) -> bool) {
        let now = Instant::now();
        self.slots.retain(|_, slot| {
            // One a fork is about to use (it holds the slot, not yet its lock) stays.
            if Arc::strong_count(slot) > 1 {
                return true;
            }
            let Ok(mut slot) = slot.try_lock() else { return true };
            let unused = slot.last_used.is_none_or(|used| now.duration_since(used) > idle);
            if slot.server.is_some() && unused && !slot.job_id.as_ref().is_some_and(&busy) {
                slot.server = None;
            }
            slot.server.is_some() || slot.failed_until.is_some_and(|until| now < until)
        });
    }

    /// Whether no forkserver is known (none running, none recently failed).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Stops every forkserver (daemon shutdown).
    pub fn stop_all(&self) {
        self.slots.clear();
    }
}

/// One worker to fork.
pub(super) struct ForkRequest<'a> {
    pub vars: &'a [(&'static str, String)],
    pub credential: OwnedFd,
    pub output: Option<BorrowedFd<'a>>,
}

impl Server {
    async fn start(mut command: tokio::process::Command) -> IonetResult<Self> {
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        let (ours, theirs) =
            rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
                .map_err(std::io::Error::from)?;
        rustix::io::ioctl_fionbio(&ours, true).map_err(std::io::Error::from)?;
        command
            .stdin(std::process::Stdio::from(theirs))
            .env(ionet_common::worker_env::FORKSERVER, "1")
            .envs([ionet_common::worker_env::daemon_var()])
            .kill_on_drop(true);
        let mut child =
            command.spawn().map_err(|err| IonetError::Internal(format!("cannot start a forkserver: {err}")))?;
        // Its end closes here: the server's exit is this end's end of file.
        drop(command);
        let channel = register(ours)?;
        let ready = tokio::select! {
            ready = receive(&channel) => ready,
            status = child.wait() => Err(IonetError::Internal(format!(
                "the forkserver exited as it started ({})",
                status.map(|s| s.to_string()).unwrap_or_else(|err| err.to_string())
            ))),
            _ = tokio::time::sleep(READY_TIMEOUT) => Err(IonetError::Timeout(format!(
                "the forkserver was not ready within {READY_TIMEOUT:?}"
            ))),
        };
        let (message, fds) = ready?;
        if !fds.is_empty() || message.get("ready") != Some(&serde_json::Value::Bool(true)) {
            return Err(IonetError::Internal(format!("the forkserver began with {message}, not readiness")));
        }
        Ok(Server { channel, child })
    }

    async fn fork(&mut self, uid: u32, request: ForkRequest<'_>) -> IonetResult<Forked> {
        let message = serde_json::json!({ "vars": request.vars, "output": request.output.is_some() });
        let mut fds = vec![request.credential.as_fd()];
        fds.extend(request.output);
        send(&self.channel, message.to_string().as_bytes(), &fds).await?;
        drop(fds);
        // The worker holds its copy of the pipe now (or never will): this one closes.
        drop(request.credential);
        let (reply, mut fds) = receive(&self.channel).await?;
        if let Some(error) = reply.get("error") {
            return Err(IonetError::Internal(format!("the forkserver could not fork: {error}")));
        }
        let (Some(pidfd), true) = (fds.pop(), fds.is_empty()) else {
            return Err(IonetError::Internal(format!("the forkserver answered {reply} without one pidfd")));
        };
        let server_pid =
            self.child.id().ok_or_else(|| IonetError::Internal("the forkserver exited as it forked".into()))?;
        let pid = verify_forked(&pidfd, server_pid, uid)?;
        Ok(Forked { pid, pidfd: Arc::new(register(pidfd)?) })
    }
}

/// The pid of the process `pidfd` refers to, if it is a pidfd of a live process that
/// `parent` forked, running as `uid`.
fn verify_forked(pidfd: &OwnedFd, parent: u32, uid: u32) -> IonetResult<u32> {
    let fd = pidfd.as_raw_fd();
    let wrong = |why: String| IonetError::PermissionDenied(format!("the forkserver's answer: {why}"));
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))?;
    if target.as_os_str() != "anon_inode:[pidfd]" {
        return Err(wrong(format!("{} is not a pidfd", target.display())));
    }
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    let pid = info
        .lines()
        .find_map(|line| line.strip_prefix("Pid:"))
        .and_then(|pid| pid.trim().parse::<i64>().ok())
        .ok_or_else(|| wrong("its pidfd names no pid".into()))?;
    let pid = u32::try_from(pid).ok().filter(|pid| *pid > 0).ok_or_else(|| wrong("the worker is gone".into()))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|err| wrong(format!("cannot read process {pid}: {err}")))?;
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|values| values.split_whitespace().filter_map(|v| v.parse().ok()).collect())
            .unwrap_or_default()
    };
    let (ppid, uids) = (field("PPid:"), field("Uid:"));
    if ppid != [parent] {
        return Err(wrong(format!("process {pid} is not its own child")));
    }
    if uids.len() != 4 || uids.iter().any(|id| *id != uid) {
        return Err(wrong(format!("process {pid} does not run as uid {uid} alone")));
    }
    // Still alive after the reading: the pid was this process's all along (a live
    // process's pid is never another's).
    if has_exited(pidfd.as_fd()) {
        return Err(wrong("the worker is gone".into()));
    }
    Ok(pid)
}

/// `fd` in this runtime's reactor.
fn register(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is one open descriptor for as long as it lives, and the
    // `AsyncFd` owns it.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

/// Whether the process of `pidfd` has exited (its pidfd is readable).
pub(super) fn has_exited(pidfd: BorrowedFd<'_>) -> bool {
    let mut poll = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd for a descriptor borrowed for the call; a zero timeout.
    unsafe { libc::poll(&mut poll, 1, 0) == 1 }
}

/// Stops the process of `pidfd` (a pidfd never names another process, unlike a pid).
pub(super) fn kill(pidfd: &AsyncFd<OwnedFd>) {
    let _ = rustix::process::pidfd_send_signal(pidfd.get_ref(), rustix::process::Signal::KILL);
}

async fn send(channel: &AsyncFd<OwnedFd>, message: &[u8], fds: &[BorrowedFd<'_>]) -> IonetResult<()> {
    assert!(fds.len() <= 2, "at most two descriptors a message");
    loop {
        let mut guard = channel.writable().await?;
        let sent = guard.try_io(|channel| {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !fds.is_empty() {
                control.push(SendAncillaryMessage::ScmRights(fds));
            }
            rustix::net::sendmsg(channel.get_ref(), &[IoSlice::new(message)], &mut control, SendFlags::NOSIGNAL)
                .map_err(std::io::Error::from)
        });
        match sent {
            Ok(sent) => {
                sent.map_err(|err| IonetError::Internal(format!("cannot reach the forkserver: {err}")))?;
                return Ok(());
            }
            Err(_would_block) => continue,
        }
    }
}

async fn receive(channel: &AsyncFd<OwnedFd>) -> IonetResult<(serde_json::Value, Vec<OwnedFd>)> {
    loop {
        let mut guard = channel.readable().await?;
        let received = guard.try_io(|channel| {
            let mut buffer = vec![0u8; MAX_REPLY_BYTES];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let received = rustix::net::recvmsg(
                channel.get_ref(),
                &mut [IoSliceMut::new(&mut buffer)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let fds: Vec<OwnedFd> = control
                .drain()
                .flat_map(|message| match message {
                    RecvAncillaryMessage::ScmRights(fds) => fds.collect(),
                    _ => Vec::new(),
                })
                .collect();
            buffer.truncate(received.bytes);
            Ok((buffer, fds, received.flags))
        });
        let Ok(received) = received else { continue };
        let (bytes, fds, flags) =
            received.map_err(|err| IonetError::Internal(format!("cannot hear the forkserver: {err}")))?;
        if bytes.is_empty() {
            return Err(IonetError::Internal("the forkserver closed its socket".into()));
        }
        if flags.intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC) {
            return Err(IonetError::Internal(format!("the forkserver sent more than {MAX_REPLY_BYTES} bytes")));
        }
        let message = serde_json::from_slice(&bytes)
            .map_err(|err| IonetError::Internal(format!("the forkserver sent what is not JSON: {err}")))?;
        return Ok((message, fds));
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use ionet_common::worker_env::CredentialPipe;

    use super::*;

    fn pidfd_of(pid: u32) -> OwnedFd {
        rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(pid as i32).unwrap(),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap()
    }

    fn uid() -> u32 {
        rustix::process::geteuid().as_raw()
    }

    #[test]
    fn only_a_pidfd_of_a_live_child_of_the_server_as_the_jobs_user_is_taken() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pidfd = pidfd_of(child.id());
        let me = std::process::id();
        assert_eq!(verify_forked(&pidfd, me, uid()).unwrap(), child.id());
        // Another parent's, another user's, not a pidfd at all.
        assert!(matches!(verify_forked(&pidfd, 1, uid()), Err(IonetError::PermissionDenied(_))));
        assert!(matches!(verify_forked(&pidfd, me, uid() + 1), Err(IonetError::PermissionDenied(_))));
        let file: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        assert!(matches!(verify_forked(&file, me, uid()), Err(IonetError::PermissionDenied(_))));
        // Gone (exited, reaped or not): refused, and its pid is never signalled.
        kill(&register_blocking(pidfd_of(child.id())));
        child.wait().unwrap();
        assert!(has_exited(pidfd.as_fd()));
        assert!(matches!(verify_forked(&pidfd, me, uid()), Err(IonetError::PermissionDenied(_))));
    }

    /// Registers `fd` in a runtime made for the call (for `kill`, which needs none).
    fn register_blocking(fd: OwnedFd) -> AsyncFd<OwnedFd> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
        let _entered = runtime.enter();
        register(fd).unwrap()
    }

    /// A forkserver in a few lines of Python: honest (forks `sleep`) or lying (answers
    /// with a pidfd of its parent, the daemon).
    fn server(mode: &str) -> tokio::process::Command {
        let script = r#"
import os, socket, sys
channel = socket.socket(fileno=0)
channel.send(b'{"ready": true}')
while True:
    message, fds, _, _ = socket.recv_fds(channel, 1 << 20, 2)
    if not message:
        sys.exit(0)
    for fd in fds:
        os.close(fd)
    if sys.argv[1] == "honest":
        target = os.fork()
        if target == 0:
            os.execv("/bin/sleep", ["sleep", "30"])
    else:
        target = os.getppid()
    pidfd = os.pidfd_open(target)
    socket.send_fds(channel, [b"{}"], [pidfd])
    os.close(pidfd)
"#;
        let mut command = tokio::process::Command::new("python3");
        command.args(["-c", script, mode]);
        command
    }

    fn request<'a>(vars: &'a [(&'static str, String)]) -> ForkRequest<'a> {
        ForkRequest { vars, credential: CredentialPipe::holding("credential").unwrap().into_fd(), output: None }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_forkserver_that_names_another_process_is_stopped_and_that_process_spared() {
        let servers = Forkservers::default();
        let job = JobId::from_sequence(1);
        let vars = [("IONET_WORKER_ID", "00".to_string())];
        let forked = tokio::time::timeout(
            Duration::from_secs(30),
            servers.fork("lying".into(), job, || Ok(server("lying")), uid(), request(&vars)),
        )
        .await
        .unwrap();
        assert!(matches!(forked, Err(IonetError::PermissionDenied(_))), "{:?}", forked.err());
        assert_eq!(servers.running(), 0, "the lying server was stopped");
        // Its job's workers start directly for a while (no new server is asked).
        let again = servers.fork("lying".into(), job, || panic!("not started again"), uid(), request(&vars)).await;
        assert!(matches!(again, Err(IonetError::Unavailable(_))));

        // An honest one: its child is watched and stopped through the pidfd, and the
        // server goes once idle with no worker of its job left.
        let forked = tokio::time::timeout(
            Duration::from_secs(30),
            servers.fork("honest".into(), job, || Ok(server("honest")), uid(), request(&vars)),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(!has_exited(forked.pidfd.get_ref().as_fd()));
        kill(&forked.pidfd);
        let _exited = tokio::time::timeout(Duration::from_secs(10), forked.pidfd.readable()).await.unwrap().unwrap();
        assert_eq!(servers.running(), 1);
        servers.reap(Duration::from_secs(3600), |_| false);
        assert_eq!(servers.running(), 1, "used just now: kept");
        servers.reap(Duration::ZERO, |_| true);
        assert_eq!(servers.running(), 1, "its job still has workers here: kept");
        servers.reap(Duration::ZERO, |_| false);
        assert_eq!(servers.running(), 0);
    }
}
