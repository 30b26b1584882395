//! Python packages a job asks for (Ray's `pip` and `uv` runtime environments): installed
//! once per node per requirements, shared by every job that asks for the same.
//!
//! An environment is a directory the packages are installed into (`pip install
//! --target`, or `uv pip install --target`), put on the job's `PYTHONPATH` (its scripts'
//! `bin/` first on `PATH`) for its entrypoint and its workers. It is named by a hash of
//! the tool, the requirements, the install options and the interpreter's version tag, so
//! jobs asking the same get the same directory, built once.
//!
//! A build runs as a user of its own (a fresh uid, when the daemon is root: an sdist's
//! `setup.py` runs as nobody the node knows), with a cleared environment, into a fresh
//! directory renamed into place when it succeeded; then every process of that uid is
//! killed and the daemon takes the tree over (nobody may change it after, everybody may
//! read it). A failed build leaves nothing behind, and its error carries the end of the
//! tool's output. Only options that choose where packages come from pass
//! (`ionet_common::jobs::check_pip`); where they go is the node's.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use ionet_common::jobs::check_pip;
use ionet_common::rpc::proto::common::JobPackages;
use ionet_common::{IonetError, IonetResult};
use sha2::{Digest, Sha256};

use crate::identities::WorkerIdentities;

/// The interpreter requirements are installed by (and for): the node's own `python3`,
/// found on the daemon's PATH, never a program a job names (the install starts with the
/// daemon's rights).
pub const NODE_PYTHON: &str = "python3";
/// How long a build may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How much of a failed build's output its error carries.
const ERROR_TAIL_BYTES: usize = 4000;
/// What a build inherits of the daemon's environment.
const INHERITED_ENV: [&str; 6] = ["PATH", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "PIP_INDEX_URL"];
/// The file a finished environment holds, saying what it holds and when it was built.
pub const MARKER: &str = ".ionet-env.json";

/// A node's package environments.
pub struct PipEnvs {
    root: PathBuf,
    identities: Option<Arc<WorkerIdentities>>,
    /// One build at a time per environment (others wait for it).
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Each interpreter's version tag (`cpython-311`), asked once.
    tags: std::sync::Mutex<HashMap<String, String>>,
}

/// An environment ready for a process: `dir` goes on its `PYTHONPATH`, `bin` on its `PATH`.
pub struct PipEnv {
    pub dir: PathBuf,
}

impl PipEnv {
    /// Its requirements' scripts.
    pub fn bin(&self) -> PathBuf {
        self.dir.join("bin")
    }
}

impl PipEnvs {
    pub fn new(root: PathBuf, identities: Option<Arc<WorkerIdentities>>) -> Self {
        Self { root, identities, locks: Default::default(), tags: Default::default() }
    }

    /// The environment of `packages`' requirements for `python` (built now if this node
    /// has none yet); `None` when they name none.
    pub async fn ensure(&self, packages: &JobPackages, python: &str) -> IonetResult<Option<PipEnv>> {
        if packages.pip.is_empty() {
            return Ok(None);
        }
        check_pip(packages)?;
        let tag = self.tag_of(python).await?;
        let tool = if packages.pip_tool.is_empty() { "pip" } else { packages.pip_tool.as_str() };
        let mut hash = Sha256::new();
        for part in [tool, tag.as_str()].into_iter().chain(packages.pip.iter().map(String::as_str)) {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        hash.update([1]);
        for option in &packages.pip_options {
            hash.update(option.as_bytes());
            hash.update([0]);
        }
        let name = hex::encode(&hash.finalize()[..12]);
        let dir = self.root.join(&name);
        let lock = self.locks.lock().unwrap_or_else(|p| p.into_inner()).entry(name.clone()).or_default().clone();
        let _building = lock.lock().await;
        if dir.join(MARKER).is_file() {
            return Ok(Some(PipEnv { dir }));
        }
        let fresh = self.root.join(format!(".building-{name}"));
        let built = self.build(packages, tool, python, &fresh).await;
        if let Err(err) = built {
            let _ = std::fs::remove_dir_all(&fresh);
            return Err(err);
        }
        std::fs::rename(&fresh, &dir)?;
        tracing::info!(env = %name, packages = ?packages.pip, "package environment built");
        Ok(Some(PipEnv { dir }))
    }

    /// `python`'s version tag (`sys.implementation.cache_tag`).
    async fn tag_of(&self, python: &str) -> IonetResult<String> {
        if let Some(tag) = self.tags.lock().unwrap_or_else(|p| p.into_inner()).get(python) {
            return Ok(tag.clone());
        }
        let output = tokio::process::Command::new(python)
            .args(["-c", "import sys; print(sys.implementation.cache_tag)"])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|err| {
                IonetError::FailedPrecondition(format!("cannot run {python} to install packages for: {err}"))
            })?;
        let tag = String::from_utf8_lossy(&output.stdout).trim().to_string();
        if !output.status.success() || tag.is_empty() {
            return Err(IonetError::FailedPrecondition(format!("{python} did not say its version")));
        }
        self.tags.lock().unwrap_or_else(|p| p.into_inner()).insert(python.to_string(), tag.clone());
        Ok(tag)
    }

    async fn build(&self, packages: &JobPackages, tool: &str, python: &str, into: &Path) -> IonetResult<()> {
        if std::fs::symlink_metadata(into).is_ok() {
            std::fs::remove_dir_all(into)?;
        }
        std::fs::create_dir(into)?;
        let home = into.join(".home");
        std::fs::create_dir(&home)?;
        let builder = self.identities.as_ref().map(|identities| identities.builder()).transpose()?;
        if let Some(builder) = builder {
            for dir in [into, home.as_path()] {
                std::os::unix::fs::chown(dir, Some(builder.uid), Some(builder.gid))?;
            }
        }
        let mut command = match tool {
            "uv" => {
                let mut command = tokio::process::Command::new("uv");
                command.args(["pip", "install", "--python", python, "--no-cache", "--target"]).arg(into);
                command
            }
            _ => {
                let mut command = tokio::process::Command::new(python);
                command
                    .args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--no-cache-dir"])
                    .arg("--target")
                    .arg(into);
                command
            }
        };
        command.args(&packages.pip_options).arg("--").args(&packages.pip);
        command.env_clear();
        for name in INHERITED_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        command.env("HOME", &home).current_dir(into).stdin(Stdio::null()).kill_on_drop(true);
        if let Some(builder) = builder {
            command.uid(builder.uid).gid(builder.gid);
        }
        let output = tokio::time::timeout(BUILD_TIMEOUT, command.output())
            .await
            .map_err(|_| IonetError::FailedPrecondition(format!("installing {:?} took over 15 minutes", packages.pip)))?
            .map_err(|err| {
                IonetError::FailedPrecondition(format!("cannot run {tool} to install {:?}: {err}", packages.pip))
            });
        // Nobody may enter the tree any more but the daemon (the builder's processes, or a
        // program of its uid left elsewhere, cannot reach it; its parent is the daemon's),
        // and nothing the build started runs on (the uid was fresh: its processes are the
        // build's alone).
        // SAFETY: geteuid and getegid have no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        std::os::unix::fs::lchown(into, Some(uid), Some(gid))?;
        std::fs::set_permissions(into, std::fs::Permissions::from_mode(0o700))?;
        if let Some(builder) = builder {
            kill_all_of(builder.uid, builder.gid).await;
        }
        let output = output?;
        if !output.status.success() {
            let mut log = String::from_utf8_lossy(&output.stdout).into_owned();
            log.push_str(&String::from_utf8_lossy(&output.stderr));
            let mut from = log.len().saturating_sub(ERROR_TAIL_BYTES);
            while !log.is_char_boundary(from) {
                from += 1;
            }
            return Err(IonetError::FailedPrecondition(format!(
                "runtime_env setup failed: {tool} install of {:?} exited with {}; its output ends:\n{}",
                packages.pip,
                output.status,
                log[from..].trim()
            )));
        }
        std::fs::remove_dir_all(&home)?;
        if let Some(builder) = builder {
            // Only what the build made is taken over: a link to, or a second name of, a
            // file elsewhere fails the build.
            take_over(into, builder.uid)?;
        }
        let built_at_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let marker = serde_json::json!({
            "tool": tool,
            "packages": packages.pip,
            "options": packages.pip_options,
            "built_at_ms": built_at_ms,
        });
        // Written new, never through whatever the build left under that name.
        let marker_path = into.join(MARKER);
        if std::fs::symlink_metadata(&marker_path).is_ok() {
            std::fs::remove_file(&marker_path)?;
        }
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&marker_path)?;
        std::io::Write::write_all(&mut file, marker.to_string().as_bytes())?;
        std::fs::set_permissions(into, std::fs::Permissions::from_mode(0o755))?;
        Ok(())
    }
}

/// Kills every process of `uid` (a builder's: fresh, so they are the build's alone).
async fn kill_all_of(uid: u32, gid: u32) {
    // A child that becomes `uid` and signals all it may: every process of that uid, itself
    // too (so it never gets to run anything).
    let mut command = tokio::process::Command::new("/bin/true");
    command.uid(uid).gid(gid).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: kill is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::kill(-1, libc::SIGKILL);
            Ok(())
        });
    }
    if let Ok(mut child) = command.spawn() {
        let _ = child.wait().await;
    }
}

/// Makes the tree at `path`, which the builder `builder` made, the daemon's own, readable
/// (and, where it was, executable) by all, writable by nobody else. Links are left as
/// they are, never followed; an entry the builder does not own, or a file with a second
/// name (a hard link to a file elsewhere), fails it.
fn take_over(path: &Path, builder: u32) -> IonetResult<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let own_top = meta.uid() == uid;
    if !own_top && meta.uid() != builder || meta.is_file() && meta.nlink() > 1 {
        return Err(IonetError::FailedPrecondition(format!(
            "runtime_env setup failed: the install left {} (not its own, or a second name of a file elsewhere)",
            path.display()
        )));
    }
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    let shared = if meta.is_dir() || meta.mode() & 0o100 != 0 { 0o755 } else { 0o644 };
    if !meta.is_dir() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(shared))?;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            take_over(&entry?.path(), builder)?;
        }
        // A directory is opened to others once all under it is the daemon's.
        if !own_top {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(shared))?;
        }
    }
    Ok(())
}
