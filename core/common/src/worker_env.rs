//! The worker-process protocol: what a node daemon puts in the environment of a worker it
//! starts (`ionet_worker::lease`), and what the worker reads back (`ionet::init`), in one
//! type both sides use, so the two can never drift apart.
//!
//! A worker is a program re-executed with [`WORKER_MODE`] set; everything else it needs
//! to join its node is in the variables [`WorkerEnv::to_vars`] lists, except its job's
//! credential, which never enters the environment (where any process of the same user
//! could read it in `/proc/<pid>/environ`): the daemon writes it into a pipe the worker
//! hands the worker as its standard input ([`CredentialPipe`]), and the worker reads it
//! once ([`take_credential`], which leaves `/dev/null` in its place) and makes itself
//! undumpable ([`keep_memory_private`]). What a daemon cannot set without forking
//! (which copies its page tables: most of a worker's start in a large daemon) the worker
//! sets itself first thing ([`settle_worker_process`]): it dies with its daemon and
//! creates files for its own user alone. The language
//! bindings' own variables (worker argv, namespace) travel in the lease request's
//! `WorkerCommand` and are not part of this protocol.

use crate::error::{IonetError, IonetResult};
use crate::ids::{JobId, NodeId, WorkerId};

/// Set (to `1`) in a worker's environment: `ionet::init` serves tasks instead of returning.
pub const WORKER_MODE: &str = "IONET_WORKER_MODE";
/// Set (to `1`) when the worker's output goes to a file its node daemon follows for the
/// job's driver: the worker then names what it runs there ([`OUTPUT_NAME_MARKER`]).
pub const OUTPUT_FOLLOWED: &str = "IONET_WORKER_OUTPUT_FOLLOWED";
/// A line a worker writes to its output before the lines of a task or actor it starts
/// running: this marker, then the name (Ray's `(name pid=…, ip=…)` prefix comes from it).
pub const OUTPUT_NAME_MARKER: &str = ":ionet_task:";
/// Set when the worker was started inside a task's or actor's own runtime environment
/// (Ray's JSON, [`crate::jobs::runtime_env_json`]): the tasks and actors it starts
/// inherit it.
pub const RUNTIME_ENV: &str = "IONET_WORKER_RUNTIME_ENV";
const WORKER_ID: &str = "IONET_WORKER_ID";
const NODE_ADDRESS: &str = "IONET_NODE_ADDRESS";
const NODE_ID: &str = "IONET_NODE_ID";
const JOB_ID: &str = "IONET_JOB_ID";
const GPU_IDS: &str = "IONET_GPU_IDS";
const CREDENTIAL_FD: &str = "IONET_CREDENTIAL_FD";
/// The pid of the daemon that started the worker: the worker dies with it.
const DAEMON_PID: &str = "IONET_DAEMON_PID";
const OBJECT_STORE_DIR: &str = "IONET_OBJECT_STORE_DIR";
const GCS_ADDRESS: &str = "IONET_GCS_ADDRESS";
const HEAD_KEY: &str = "IONET_HEAD_KEY";
const CLUSTER_CA: &str = "IONET_CLUSTER_CA";

/// What a worker process is told about its place in the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerEnv {
    pub worker_id: WorkerId,
    pub node_id: NodeId,
    /// Its node daemon's address (it registers there).
    pub node_address: String,
    pub job_id: JobId,
    /// The GPUs leased to it (also in `CUDA_VISIBLE_DEVICES`).
    pub gpu_ids: Vec<u32>,
    /// The node's object-store directory (shared memory).
    pub object_store_dir: String,
    pub gcs_address: String,
    /// The head's public key (hex; empty before the node learned it): the worker's own
    /// server accepts the credentials it signed (its job's driver's, the operator's).
    pub head_key: String,
    /// The cluster CA (PEM; public) when the cluster speaks TLS, else empty: the worker
    /// trusts it for its calls and serves TLS itself.
    pub cluster_ca: String,
}

impl WorkerEnv {
    /// The variables to set in the worker's environment (worker mode included).
    pub fn to_vars(&self) -> Vec<(&'static str, String)> {
        let gpus = self.gpu_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        vec![
            (WORKER_MODE, "1".into()),
            (WORKER_ID, self.worker_id.hex()),
            (NODE_ADDRESS, self.node_address.clone()),
            (NODE_ID, self.node_id.hex()),
            (JOB_ID, self.job_id.hex()),
            (OBJECT_STORE_DIR, self.object_store_dir.clone()),
            (GCS_ADDRESS, self.gcs_address.clone()),
            (HEAD_KEY, self.head_key.clone()),
            (CLUSTER_CA, self.cluster_ca.clone()),
            ("CUDA_VISIBLE_DEVICES", gpus.clone()),
            (GPU_IDS, gpus),
        ]
    }

    /// Whether this process was started as a worker.
    pub fn is_worker() -> bool {
        std::env::var_os(WORKER_MODE).is_some()
    }

    /// This worker's environment, read by `lookup` (`std::env::var` in a worker).
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> IonetResult<Self> {
        let var = |name: &str| {
            lookup(name).ok_or_else(|| IonetError::Config(format!("a worker process needs {name} in its environment")))
        };
        let worker_id = var(WORKER_ID)?.parse()?;
        let gpu_ids = var(GPU_IDS)?
            .split(',')
            .filter(|id| !id.is_empty())
            .map(|id| id.parse().map_err(|_| IonetError::Config(format!("{GPU_IDS}: {id:?} is not a GPU index"))))
            .collect::<IonetResult<_>>()?;
        Ok(WorkerEnv {
            worker_id,
            node_id: var(NODE_ID)?.parse()?,
            node_address: var(NODE_ADDRESS)?,
            job_id: var(JOB_ID)?.parse()?,
            gpu_ids,
            object_store_dir: lookup(OBJECT_STORE_DIR).unwrap_or_default(),
            gcs_address: lookup(GCS_ADDRESS).unwrap_or_default(),
            head_key: lookup(HEAD_KEY).unwrap_or_default(),
            cluster_ca: lookup(CLUSTER_CA).unwrap_or_default(),
        })
    }

    /// This process's worker environment.
    pub fn from_process() -> IonetResult<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }
}

/// A pipe holding a worker's credential, its write end already closed: the worker gets
/// the read end as its standard input ([`CREDENTIAL_FD`] says `0`) and reads the
/// credential whole.
pub struct CredentialPipe {
    read: std::os::fd::OwnedFd,
}

impl CredentialPipe {
    pub fn holding(credential: &str) -> IonetResult<Self> {
        use std::io::Write;
        use std::os::fd::FromRawFd;
        // Far below a pipe's capacity, so the write never waits for a reader.
        if credential.len() > 16 * 1024 {
            return Err(IonetError::InvalidArgument("a credential is at most 16 KiB".into()));
        }
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors on success; both close on exec, so no
        // other child inherits them (the worker's copy is its stdin, duplicated at spawn).
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: the descriptors are fresh and owned here.
        let (read, write) = unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) };
        let mut write = write;
        write.write_all(credential.as_bytes())?;
        Ok(Self { read })
    }

    /// The variables telling the worker where to read its credential, and which daemon
    /// it dies with (this process).
    pub fn vars(&self) -> [(&'static str, String); 2] {
        [(CREDENTIAL_FD, "0".to_string()), daemon_var()]
    }

    /// The read end, to be the worker's standard input.
    pub fn into_stdin(self) -> std::process::Stdio {
        std::process::Stdio::from(self.read)
    }

    /// The read end, to be passed to the forkserver that makes it its worker's standard
    /// input.
    pub fn into_fd(self) -> std::os::fd::OwnedFd {
        self.read
    }
}

/// Set (to `1`) in a forkserver's environment (a job's command that `forks`): the
/// program serves its node daemon's fork requests on its standard input, a socket, and
/// each child it forks goes on as a worker (with its own protocol variables).
pub const FORKSERVER: &str = "IONET_FORKSERVER";

/// The variable naming this process as the daemon a forkserver dies with.
pub fn daemon_var() -> (&'static str, String) {
    (DAEMON_PID, std::process::id().to_string())
}

/// Set (to `1`) in the variables of a worker a forkserver forks: it watches its daemon
/// itself rather than dying with its parent (the server may end before its workers).
pub const FORKED: &str = "IONET_WORKER_FORKED";

/// The variables of a worker a forkserver forks, beyond its own.
pub fn forked_var() -> (&'static str, String) {
    (FORKED, "1".into())
}

/// First thing in a worker process, before any thread starts: what its daemon would
/// otherwise have set between fork and exec. What it creates is its own user's alone
/// (umask 077), and it dies with its parent: the daemon, or a launcher the job's command
/// runs it through (which itself does not die with the daemon: a job's command should
/// `exec` its worker). A worker a forkserver forked outlives the server instead (the
/// job's actors on it do not end with it): it is given a pidfd of its daemon to watch,
/// and exits when that is readable. A daemon that died before this ran is no longer an
/// ancestor of the process (its children were handed to another): the worker exits at
/// once.
pub fn settle_worker_process(lookup: impl Fn(&str) -> Option<String>) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let forked = lookup(FORKED).is_some_and(|value| value == "1");
    // SAFETY: umask and prctl have no memory effects.
    unsafe {
        libc::umask(0o077);
        if !forked {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        }
    }
    let gone = |daemon| -> ! {
        eprintln!("ionet worker: its node daemon (pid {daemon}) is gone");
        std::process::exit(1);
    };
    let daemon = lookup(DAEMON_PID).and_then(|pid| pid.parse::<libc::pid_t>().ok())?;
    // Opened before the daemon is found among the ancestors: then it is that process's.
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = forked.then(|| unsafe { libc::syscall(libc::SYS_pidfd_open, daemon, 0) });
    if !is_ancestor(daemon) {
        gone(daemon);
    }
    match pidfd {
        None => None,
        Some(fd) if fd < 0 => gone(daemon),
        // SAFETY: a fresh descriptor, owned here.
        Some(fd) => Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }),
    }
}

/// Whether `pid` is this process's parent, or its parent's, and so on (a dead process,
/// reaped or not, and a pid reused since, never is).
fn is_ancestor(pid: libc::pid_t) -> bool {
    // SAFETY: getppid has no memory effects.
    let mut current = unsafe { libc::getppid() };
    for _ in 0..64 {
        if current == pid {
            return true;
        }
        if current <= 1 {
            return false;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{current}/stat")) else { return false };
        // `pid (comm) state ppid …`: the command may hold spaces and parentheses.
        let parent = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
        match parent {
            Some(parent) => current = parent,
            None => return false,
        }
    }
    false
}

/// Takes the worker-protocol variables that name this process's own descriptors and
/// parent out of its environment, once read: a program a task starts must not take its
/// own standard input for a credential.
pub fn forget_process_vars() {
    std::env::remove_var(CREDENTIAL_FD);
    std::env::remove_var(DAEMON_PID);
    std::env::remove_var(FORKED);
}

/// The worker's side: reads its credential from the descriptor its daemon named, and
/// closes it (a second call finds nothing).
pub fn take_credential(lookup: impl Fn(&str) -> Option<String>) -> IonetResult<String> {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let text = lookup(CREDENTIAL_FD)
        .ok_or_else(|| IonetError::Config(format!("a worker process needs {CREDENTIAL_FD} in its environment")))?;
    let fd: std::os::fd::RawFd =
        text.parse().map_err(|_| IonetError::Config(format!("{CREDENTIAL_FD}: {text:?} is not a descriptor")))?;
    // SAFETY: the daemon passed this descriptor for this process to read once; checked to
    // be open before it is owned.
    if fd == 1 || fd == 2 || fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(IonetError::Config(format!("{CREDENTIAL_FD}: descriptor {fd} is not open")));
    }
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    use std::os::unix::fs::FileTypeExt;
    if !file.metadata()?.file_type().is_fifo() {
        // Not the daemon's pipe (a child that inherited the variable, not the descriptor):
        // leave it alone.
        std::mem::forget(file);
        return Err(IonetError::Config(format!("{CREDENTIAL_FD}: descriptor {fd} is not the credential pipe")));
    }
    let mut credential = String::new();
    let read = file.read_to_string(&mut credential);
    if fd == 0 {
        // Standard input stays open, on nothing: what later reads it (a task) finds EOF.
        std::mem::forget(file);
        let null = std::fs::File::open("/dev/null")?;
        // SAFETY: dup2 onto this process's stdin, whose pipe was read whole above.
        if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 0) } == -1 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    read?;
    Ok(credential.trim().to_string())
}

/// Makes this process's memory and environment unreadable to other processes of its
/// user (`PR_SET_DUMPABLE` 0: `/proc/<pid>/mem`, `environ` and ptrace need privilege):
/// every ionet process holding a credential or a key calls it. It also turns core dumps
/// off.
pub fn keep_memory_private() {
    // SAFETY: prctl with PR_SET_DUMPABLE has no memory effects.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_reads_back_what_its_daemon_wrote() {
        let written = WorkerEnv {
            worker_id: WorkerId::random(),
            node_id: NodeId::random(),
            node_address: "10.0.0.7:4000".into(),
            job_id: JobId::from_bytes(&[0, 0, 0, 9]).unwrap(),
            gpu_ids: vec![0, 3],
            object_store_dir: "/dev/shm/ionet-objects".into(),
            gcs_address: "10.0.0.1:6380".into(),
            head_key: "ab".repeat(32),
            cluster_ca: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into(),
        };
        let vars: std::collections::HashMap<_, _> = written.to_vars().into_iter().collect();
        assert_eq!(vars["CUDA_VISIBLE_DEVICES"], "0,3");
        let read = WorkerEnv::from_vars(|name| vars.get(name).cloned()).unwrap();
        assert_eq!(read, written);
        let no_gpus = WorkerEnv { gpu_ids: Vec::new(), ..written };
        let vars: std::collections::HashMap<_, _> = no_gpus.to_vars().into_iter().collect();
        assert_eq!(WorkerEnv::from_vars(|name| vars.get(name).cloned()).unwrap(), no_gpus);
    }

    #[test]
    fn a_credential_travels_through_a_pipe_read_once() {
        let pipe = CredentialPipe::holding("ionet1.claims.signature").unwrap();
        let [(name, fd), (_, daemon)] = pipe.vars();
        assert_eq!((fd.as_str(), daemon), ("0", std::process::id().to_string()));
        // The worker owns (and closes) its end; here it is a descriptor of this process.
        let read: std::os::fd::OwnedFd = pipe.read;
        let copy = std::os::fd::IntoRawFd::into_raw_fd(read);
        let lookup = |wanted: &str| (wanted == name).then(|| copy.to_string());
        assert_eq!(take_credential(lookup).unwrap(), "ionet1.claims.signature");
        assert!(take_credential(|_| None).unwrap_err().to_string().contains(CREDENTIAL_FD));
        assert!(take_credential(|_| Some("stdin".into())).is_err());
        assert!(take_credential(|_| Some("1".into())).is_err(), "never an output stream");
        assert!(take_credential(|_| Some("2".into())).is_err(), "never an output stream");
    }

    #[test]
    fn a_daemon_counts_while_it_is_an_ancestor() {
        // SAFETY: getppid has no memory effects.
        let parent = unsafe { libc::getppid() };
        assert!(is_ancestor(parent));
        assert!(!is_ancestor(std::process::id() as libc::pid_t), "not its own ancestor");
        assert!(!is_ancestor(999_999_999), "no such process");
        // A child of this process is not its ancestor either.
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        assert!(!is_ancestor(child.id() as libc::pid_t));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_missing_or_malformed_variable_is_named() {
        let vars: std::collections::HashMap<&str, String> = [(WORKER_ID, "zz".to_string())].into_iter().collect();
        match WorkerEnv::from_vars(|name| vars.get(name).cloned()) {
            Err(error) => assert!(error.to_string().contains("zz"), "{error}"),
            Ok(env) => panic!("read {env:?}"),
        }
        match WorkerEnv::from_vars(|_| None) {
            Err(IonetError::Config(message)) => assert!(message.contains(WORKER_ID), "{message}"),
            other => panic!("{other:?}"),
        }
    }
}
