//! The session directory: how `ionet` commands on one machine find each other.
//!
//! Layout (as Ray's `session_latest`):
//! - `head_address`: `host:port` of the control store, written by the head once serving;
//! - `job_server_address`: `http(s)://host:port` of the head's job server (Ray's Jobs
//!   REST API), written by the head once serving;
//! - `jobs/logs/job-driver-<submission>.log`: what each submitted job's entrypoint
//!   printed, and `jobs/packages/`: the packages tenants uploaded, kept by the head;
//! - `admin_credential`: the operator's credential (mode 0600), signed by the head at
//!   each start (money and the operator's controls need it);
//! - `signing_key`: the head's credential signing key (mode 0600), unless `--storage`
//!   keeps it beside the tables;
//! - `node_key`: this machine's node daemons' private key (mode 0600), unless
//!   `--node-key` puts it elsewhere;
//! - `ca.pem`: the cluster CA of a head serving TLS (the head writes it; a node joining
//!   with `--ca-hash` writes the one it fetched and checked), which this machine's
//!   commands and drivers trust; `ca_key`: the CA's key (mode 0600), on the head's
//!   machine, unless `--storage` keeps it beside the tables;
//! - `worker_uids`: the next id for jobs' workers (uids) and accounts (gids) on this
//!   machine, taken under a lock by every root node daemon of the session (see
//!   `crate::identities`);
//! - `pids/<role>-<pid>.pid`: one file per daemon started here, written once it is ready
//!   and removed when it exits; `ionet stop` signals every pid listed;
//! - `logs/<role>-<pid>.log`: each daemon's log; `logs/<role>.out` its raw stderr.
//!
//! The directory is this user's alone (mode 0700, checked to be this user's); files are
//! written through a new private file (`O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600) renamed
//! into place, so a file or link planted there first is never followed or reused.
//!
//! The default is `<system temp dir>/ionet-<uid>/session_latest` (one per user); `--temp-dir` or
//! `IONET_SESSION_DIR` point elsewhere, so several clusters can share one machine.

use std::fs;
use std::path::{Path, PathBuf};

use ionet_common::auth::Bearer;
use ionet_common::{IonetError, IonetResult};

pub const SESSION_DIR_ENV: &str = "IONET_SESSION_DIR";
/// A file holding the cluster CA (PEM) to trust, for a process outside the cluster's
/// session directories.
pub const CA_FILE_ENV: &str = "IONET_CA_FILE";

#[derive(Clone, Debug)]
pub struct SessionDir {
    root: PathBuf,
    /// The per-user directory above the default root (`<temp dir>/ionet-<uid>`): checked
    /// to be this user's and private too, so nobody can swap the session under it.
    private_parent: Option<PathBuf>,
}

/// What a pid file says about one daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonRecord {
    pub role: String,
    pub pid: u32,
    pub path: PathBuf,
}

fn io_error(path: &Path, err: std::io::Error) -> IonetError {
    IonetError::Io(std::io::Error::new(err.kind(), format!("{}: {err}", path.display())))
}

impl SessionDir {
    /// `explicit`, else `IONET_SESSION_DIR`, else the default under the temp dir.
    pub fn resolve(explicit: Option<&Path>) -> Self {
        let chosen = explicit
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(SESSION_DIR_ENV).filter(|value| !value.is_empty()).map(PathBuf::from));
        match chosen {
            Some(root) => Self { root, private_parent: None },
            None => {
                // SAFETY: geteuid has no preconditions and cannot fail.
                let uid = unsafe { libc::geteuid() };
                let parent = std::env::temp_dir().join(format!("ionet-{uid}"));
                Self { root: parent.join("session_latest"), private_parent: Some(parent) }
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    fn pids(&self) -> PathBuf {
        self.root.join("pids")
    }

    pub fn create(&self) -> IonetResult<()> {
        if let Some(parent) = &self.private_parent {
            ionet_common::files::private_dir(parent).map_err(|err| io_error(parent, err))?;
        }
        for dir in [self.root.clone(), self.logs(), self.pids()] {
            ionet_common::files::private_dir(&dir).map_err(|err| io_error(&dir, err))?;
        }
        Ok(())
    }

    /// Writes atomically (a new private file renamed into place), so readers never see
    /// half a file and nothing planted at the name is followed.
    fn write_file(&self, name: &str, contents: &str) -> IonetResult<()> {
        self.create()?;
        let path = self.root.join(name);
        ionet_common::files::replace_private(&path, contents.as_bytes()).map_err(|err| io_error(&path, err))
    }

    /// A file of the session, if it is as this user wrote it: every file here is written
    /// private, so one that is not (another user's, a link, readable by others) is not
    /// trusted.
    fn read_file(&self, name: &str) -> Option<String> {
        let bytes = ionet_common::files::read_private(&self.root.join(name)).ok()?;
        let text = String::from_utf8(bytes).ok()?.trim().to_string();
        (!text.is_empty()).then_some(text)
    }

    pub fn write_head_address(&self, address: &str) -> IonetResult<()> {
        self.write_file("head_address", address)
    }

    pub fn head_address(&self) -> Option<String> {
        self.read_file("head_address")
    }

    pub fn write_job_server_address(&self, address: &str) -> IonetResult<()> {
        self.write_file("job_server_address", address)
    }

    pub fn job_server_address(&self) -> Option<String> {
        self.read_file("job_server_address")
    }

    /// Where the head keeps what submitted jobs print, and the packages they ship.
    pub fn jobs(&self) -> PathBuf {
        self.root.join("jobs")
    }

    /// The cluster CA (PEM) a client of a TLS endpoint trusts: `IONET_CA_FILE`, else the
    /// one in this session.
    pub fn cluster_ca_to_trust(&self) -> IonetResult<Option<String>> {
        match std::env::var_os(CA_FILE_ENV).filter(|path| !path.is_empty()) {
            Some(path) => fs::read_to_string(&path).map(Some).map_err(|err| io_error(Path::new(&path), err)),
            None => Ok(self.cluster_ca()),
        }
    }

    /// The operator's credential (see `ionet_common::authz`).
    pub fn write_admin_credential(&self, credential: &Bearer) -> IonetResult<()> {
        self.write_file("admin_credential", credential.as_str())
    }

    pub fn admin_credential(&self) -> Option<Bearer> {
        self.read_file("admin_credential").and_then(|text| Bearer::new(&text).ok())
    }

    /// Where a node daemon keeps its private key unless `--node-key` says otherwise.
    pub fn node_key(&self) -> PathBuf {
        self.root.join("node_key")
    }

    /// The cluster CA this machine trusts (PEM), if its cluster speaks TLS.
    pub fn write_cluster_ca(&self, pem: &str) -> IonetResult<()> {
        self.write_file("ca.pem", pem)
    }

    pub fn cluster_ca(&self) -> Option<String> {
        self.read_file("ca.pem").map(|pem| pem + "\n")
    }

    /// Where the head keeps its CA (key, certificate) when no `--storage` is given.
    pub fn ca_paths(&self) -> (PathBuf, PathBuf) {
        (self.root.join("ca_key"), self.root.join("ca.pem"))
    }

    /// Makes this process trust the cluster at `address` if it speaks TLS: the CA in
    /// `IONET_CA_FILE`, else the one in this session.
    pub fn trust_cluster_ca(&self, address: &str) -> IonetResult<()> {
        if !ionet_common::rpc::is_tls_address(address) {
            return Ok(());
        }
        let pem = match std::env::var_os(CA_FILE_ENV).filter(|path| !path.is_empty()) {
            Some(path) => fs::read_to_string(&path).map_err(|err| io_error(Path::new(&path), err))?,
            None => self.cluster_ca().ok_or_else(|| {
                IonetError::Config(format!(
                    "{address} speaks TLS and this machine has not its CA: set {CA_FILE_ENV} to the CA file \
                     (ca.pem in the head's session directory), or join the machine with `ionet start --ca-hash`"
                ))
            })?,
        };
        ionet_common::tls::trust(&pem)
    }

    /// Where the head keeps its signing key when no `--storage` is given.
    pub fn signing_key(&self) -> PathBuf {
        self.root.join("signing_key")
    }

    pub fn pid_file(&self, role: &str, pid: u32) -> PathBuf {
        self.pids().join(format!("{role}-{pid}.pid"))
    }

    /// Records a ready daemon; returns the file to remove when it exits.
    pub fn write_pid(&self, role: &str, pid: u32) -> IonetResult<PathBuf> {
        self.create()?;
        let path = self.pid_file(role, pid);
        ionet_common::files::replace_private(&path, format!("{pid}\n").as_bytes())
            .map_err(|err| io_error(&path, err))?;
        Ok(path)
    }

    /// Every daemon recorded here, nodes before heads (the order `stop` uses).
    pub fn daemons(&self) -> Vec<DaemonRecord> {
        let Ok(entries) = fs::read_dir(self.pids()) else {
            return Vec::new();
        };
        let mut records: Vec<DaemonRecord> = entries
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                let path = entry.path();
                let stem = path.file_stem()?.to_str()?.to_string();
                let (role, pid) = stem.rsplit_once('-')?;
                Some(DaemonRecord { role: role.to_string(), pid: pid.parse().ok()?, path })
            })
            .collect();
        records.sort_by_key(|record| (record.role == "head", record.pid));
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip_and_daemons_list_nodes_first() {
        let dir = tempfile::tempdir().unwrap();
        let session = SessionDir::resolve(Some(dir.path()));
        assert!(session.head_address().is_none());
        session.write_head_address("127.0.0.1:6380").unwrap();
        assert_eq!(session.head_address().unwrap(), "127.0.0.1:6380");
        let token = Bearer::new("ionet1.credential.signature").unwrap();
        session.write_admin_credential(&token).unwrap();
        assert_eq!(session.admin_credential().unwrap(), token);
        use std::os::unix::fs::PermissionsExt;
        // A file someone made readable to others is not trusted.
        let path = dir.path().join("admin_credential");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(session.admin_credential().is_none());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let mode = fs::metadata(dir.path().join("admin_credential")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777, 0o700, "the directory is private");
        // A link planted where the admin credential goes is replaced, never written through.
        let elsewhere = dir.path().join("elsewhere");
        fs::remove_file(dir.path().join("admin_credential")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("admin_credential")).unwrap();
        session.write_admin_credential(&token).unwrap();
        assert!(!elsewhere.exists());
        assert_eq!(session.admin_credential().unwrap(), token);
        session.write_pid("head", 10).unwrap();
        session.write_pid("node", 20).unwrap();
        let roles: Vec<_> = session.daemons().into_iter().map(|record| (record.role, record.pid)).collect();
        assert_eq!(roles, vec![("node".to_string(), 20), ("head".to_string(), 10)]);
    }
}
