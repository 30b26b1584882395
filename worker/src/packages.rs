//! What a job ships with it (Ray's `working_dir` and `py_modules`): a directory zipped
//! into a package named by its content, uploaded once to the head, pulled and unpacked
//! once per node that needs it.
//!
//! A package is a zip of the directory's files (paths relative to it, or, for a module,
//! under its own name), without `.git` and `__pycache__` and what `excludes` names, at
//! most [`MAX_PACKAGE_BYTES`] unpacked. Its name, `_ionet_pkg_<hash>.zip`, hashes every
//! file's path, mode and bytes, so the same directory is the same package wherever it
//! is zipped. A runtime environment names it as Ray does, `gcs://<name>`.
//!
//! Nodes keep unpacked packages in a cache ([`PackageCache`]): one directory per account
//! and package, unpacked once (into a fresh directory renamed into place, so a half-made
//! one is never used), readable by the account's group only, writable by nobody but the
//! daemon. Unpacking refuses paths that leave the directory, links, and archives that
//! unpack past the size limit.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use ionet_common::auth::Bearer;
use ionet_common::rpc::proto::common::JobPackages;
use ionet_common::rpc::proto::gcs::GetPackageRequest;
use ionet_common::{IonetError, IonetResult};
use sha2::{Digest, Sha256};

pub use ionet_common::jobs::{checked_package_name, package_name_of_uri, MAX_PACKAGE_BYTES, PACKAGE_URI_SCHEME};

/// The most files a package holds.
pub const MAX_PACKAGE_FILES: usize = 100_000;
/// Directories never packed.
const ALWAYS_EXCLUDED: [&str; 2] = [".git", "__pycache__"];

/// A packed directory.
pub struct Package {
    pub name: String,
    pub bytes: Vec<u8>,
    /// Files packed, and their bytes unpacked.
    pub files: usize,
    pub size: u64,
}

impl Package {
    pub fn uri(&self) -> String {
        format!("{PACKAGE_URI_SCHEME}{}", self.name)
    }
}

/// Packs `dir` (its contents at the top; with `under_own_name`, inside a directory named
/// as it is, as a Python module is), leaving out `excludes` (names of files or directories
/// anywhere, or paths relative to `dir`; `*` matches within a name).
pub fn package_directory(dir: &Path, excludes: &[String], under_own_name: bool) -> IonetResult<Package> {
    let meta = std::fs::metadata(dir)
        .map_err(|err| IonetError::InvalidArgument(format!("cannot pack {}: {err}", dir.display())))?;
    if !meta.is_dir() {
        return Err(IonetError::InvalidArgument(format!("{} is not a directory to pack", dir.display())));
    }
    let prefix = if under_own_name {
        let name =
            dir.canonicalize()?.file_name().map(|name| name.to_string_lossy().into_owned()).ok_or_else(|| {
                IonetError::InvalidArgument(format!("{} has no name to pack it under", dir.display()))
            })?;
        format!("{name}/")
    } else {
        String::new()
    };
    let mut files = Vec::new();
    collect(dir, "", excludes, &mut files)?;
    files.sort();
    let mut hash = Sha256::new();
    let mut size = 0u64;
    let mut archive = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for relative in &files {
        let path = dir.join(relative);
        let mode = std::fs::metadata(&path)?.permissions().mode();
        let bytes = std::fs::read(&path)?;
        size += bytes.len() as u64;
        if size > MAX_PACKAGE_BYTES {
            return Err(IonetError::InvalidArgument(format!(
                "{} holds more than {} MiB (the most a package may hold): leave large files out with excludes, or \
                 fetch them from storage in the job",
                dir.display(),
                MAX_PACKAGE_BYTES / (1024 * 1024)
            )));
        }
        if files.len() > MAX_PACKAGE_FILES {
            return Err(IonetError::InvalidArgument(format!(
                "{} holds more than {MAX_PACKAGE_FILES} files (the most a package may hold)",
                dir.display()
            )));
        }
        let executable = mode & 0o111 != 0;
        let name = format!("{prefix}{relative}");
        hash.update(name.as_bytes());
        hash.update([0, u8::from(executable)]);
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(&bytes);
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(if executable { 0o755 } else { 0o644 })
            .last_modified_time(zip::DateTime::default());
        archive.start_file(name, options).map_err(zip_error)?;
        archive.write_all(&bytes)?;
    }
    let bytes = archive.finish().map_err(zip_error)?.into_inner();
    let digest = hex::encode(hash.finalize());
    Ok(Package { name: format!("_ionet_pkg_{}.zip", &digest[..32]), bytes, files: files.len(), size })
}

fn zip_error(err: zip::result::ZipError) -> IonetError {
    IonetError::InvalidArgument(format!("packing: {err}"))
}

/// The files under `dir/relative`, as paths relative to `dir` (`/`-separated).
fn collect(dir: &Path, relative: &str, excludes: &[String], out: &mut Vec<String>) -> IonetResult<()> {
    let here = if relative.is_empty() { dir.to_path_buf() } else { dir.join(relative) };
    for entry in std::fs::read_dir(&here)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = if relative.is_empty() { name.clone() } else { format!("{relative}/{name}") };
        if ALWAYS_EXCLUDED.contains(&name.as_str()) || excluded(&path, &name, excludes) {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect(dir, &path, excludes, out)?;
        } else if kind.is_file() {
            out.push(path);
        } else if kind.is_symlink() {
            // A link is followed when it names a file inside the packed directory's world;
            // a dangling one is left out.
            if std::fs::metadata(entry.path()).is_ok_and(|meta| meta.is_file()) {
                out.push(path);
            }
        }
    }
    Ok(())
}

fn excluded(path: &str, name: &str, excludes: &[String]) -> bool {
    excludes.iter().any(|pattern| {
        let pattern = pattern.trim_end_matches('/');
        let pattern = pattern.strip_prefix("./").unwrap_or(pattern);
        matches(pattern, name) || matches(pattern, path) || path.starts_with(&format!("{pattern}/"))
    })
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters.
fn matches(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            let Some(rest) = text.strip_prefix(head) else { return false };
            (0..=rest.len()).filter(|at| rest.is_char_boundary(*at)).any(|at| matches(tail, &rest[at..]))
        }
    }
}

/// Unpacks `archive` into `into` (which must not exist yet), refusing paths that leave
/// it, links, and more than [`MAX_PACKAGE_BYTES`] unpacked.
pub fn unpack(archive: &[u8], into: &Path) -> IonetResult<()> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(archive))
        .map_err(|err| IonetError::InvalidArgument(format!("the package is not a zip archive: {err}")))?;
    if zip.len() > MAX_PACKAGE_FILES {
        return Err(IonetError::InvalidArgument(format!("the package holds more than {MAX_PACKAGE_FILES} files")));
    }
    std::fs::create_dir(into)?;
    let mut left = MAX_PACKAGE_BYTES;
    for index in 0..zip.len() {
        let mut entry =
            zip.by_index(index).map_err(|err| IonetError::InvalidArgument(format!("the package: {err}")))?;
        let Some(relative) = entry.enclosed_name() else {
            return Err(IonetError::InvalidArgument(format!(
                "the package holds {:?}, a path outside its directory",
                entry.name()
            )));
        };
        if relative.components().any(|part| !matches!(part, Component::Normal(_))) {
            return Err(IonetError::InvalidArgument(format!("the package holds an odd path {:?}", entry.name())));
        }
        let path = into.join(&relative);
        if entry.is_dir() {
            std::fs::create_dir_all(&path)?;
            continue;
        }
        if entry.is_symlink() {
            return Err(IonetError::InvalidArgument(format!("the package holds a link, {:?}", entry.name())));
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut file = std::fs::File::options().write(true).create_new(true).open(&path)?;
        // Read one byte past what is left: an archive that unpacks larger than it says
        // is refused, not trusted.
        let copied = std::io::copy(&mut (&mut entry).take(left + 1), &mut file)?;
        if copied > left {
            return Err(IonetError::InvalidArgument(format!(
                "the package unpacks to more than {} MiB",
                MAX_PACKAGE_BYTES / (1024 * 1024)
            )));
        }
        left -= copied;
        let executable = entry.unix_mode().is_some_and(|mode| mode & 0o111 != 0);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(if executable { 0o750 } else { 0o640 }))?;
    }
    Ok(())
}

/// Gives `dir` and everything under it to group `gid` (read, and enter directories), the
/// daemon keeping ownership; without a group, the daemon's own (workers run as it).
fn share_with_group(dir: &Path, gid: Option<u32>) -> IonetResult<()> {
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if std::fs::metadata(dir)?.is_dir() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
        for entry in std::fs::read_dir(dir)? {
            share_with_group(&entry?.path(), gid)?;
        }
    } else {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o750))?;
    }
    if let Some(gid) = gid {
        std::os::unix::fs::chown(dir, None, Some(gid))?;
    }
    Ok(())
}

/// A node's unpacked packages.
pub struct PackageCache {
    root: PathBuf,
    /// One unpacking at a time per package (others wait for it).
    locks: std::sync::Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl PackageCache {
    pub fn new(root: PathBuf) -> Self {
        Self { root, locks: Default::default() }
    }

    /// Where `account`'s package `name` is unpacked on this node (it may not be yet).
    pub fn path(&self, account: &str, name: &str) -> PathBuf {
        let account = hex::encode(&Sha256::digest(account.as_bytes())[..8]);
        self.root.join(account).join(name.trim_end_matches(".zip").trim_end_matches(".whl"))
    }

    /// `account`'s package `name` unpacked here, fetched with `fetch` the first time;
    /// readable by group `gid`.
    pub async fn ensure<F, Fut>(&self, account: &str, name: &str, gid: Option<u32>, fetch: F) -> IonetResult<PathBuf>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = IonetResult<Vec<u8>>>,
    {
        checked_package_name(name)?;
        let path = self.path(account, name);
        let lock = self.locks.lock().unwrap_or_else(|p| p.into_inner()).entry(path.clone()).or_default().clone();
        let _unpacking = lock.lock().await;
        if path.is_dir() {
            return Ok(path);
        }
        let archive = fetch().await?;
        let parent = path.parent().expect("a package's path has an account directory").to_path_buf();
        let target = path.clone();
        tokio::task::spawn_blocking(move || -> IonetResult<()> {
            std::fs::create_dir_all(&parent)?;
            // Others pass through to the packages their group may read.
            std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o711))?;
            let fresh = parent.join(format!(".unpacking-{}", rand_suffix()));
            let unpacked = unpack(&archive, &fresh).and_then(|()| share_with_group(&fresh, gid));
            if let Err(err) = unpacked {
                let _ = std::fs::remove_dir_all(&fresh);
                return Err(err);
            }
            std::fs::rename(&fresh, &target)?;
            Ok(())
        })
        .await
        .map_err(|err| IonetError::Internal(format!("unpacking a package: {err}")))??;
        tracing::info!(package = %name, path = %path.display(), "package unpacked");
        Ok(path)
    }
}

/// `account`'s package `name` from the head, fetched with `credential` (a credential of
/// that account: a job's, or a submission's).
pub async fn fetch(gcs_address: &str, credential: &Bearer, name: &str) -> IonetResult<Vec<u8>> {
    let mut head = ionet_common::rpc::gcs_client(gcs_address, credential).await?;
    let mut chunks = head.get_package(GetPackageRequest { name: name.to_string() }).await?.into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = chunks.message().await? {
        bytes.extend_from_slice(&chunk.data);
        if bytes.len() as u64 > MAX_PACKAGE_BYTES {
            return Err(IonetError::InvalidArgument(format!("package {name} is larger than a package may be")));
        }
    }
    Ok(bytes)
}

/// A job's packages, unpacked on this node: its working dir (if it ships one) and the
/// directories to put on its Python path (the working dir first, then the modules).
pub struct Unpacked {
    pub working_dir: Option<PathBuf>,
    pub python_path: Vec<PathBuf>,
    /// The scripts of its installed requirements (`crate::pip_envs`), for `PATH`.
    pub scripts: Option<PathBuf>,
}

impl Unpacked {
    /// `existing` (a `PYTHONPATH`-style list) with the packages' directories before it.
    pub fn python_path_before(&self, existing: Option<&str>) -> String {
        let mut entries: Vec<String> = self.python_path.iter().map(|dir| dir.to_string_lossy().into_owned()).collect();
        entries.extend(existing.filter(|existing| !existing.is_empty()).map(str::to_string));
        entries.join(":")
    }

    /// `existing` (a `PATH`-style list) with the installed requirements' scripts first.
    pub fn path_before(&self, existing: Option<&str>) -> Option<String> {
        let scripts = self.scripts.as_ref()?.to_string_lossy().into_owned();
        Some(match existing.filter(|existing| !existing.is_empty()) {
            Some(existing) => format!("{scripts}:{existing}"),
            None => scripts,
        })
    }

    /// Adds an installed requirements environment (after the packages on the path).
    pub fn add_env(&mut self, env: crate::pip_envs::PipEnv) {
        self.scripts = Some(env.bin());
        self.python_path.push(env.dir);
    }
}

impl PackageCache {
    /// `packages` of `account` unpacked here (fetched from the head at `gcs_address` with
    /// `credential` when not yet), readable by group `gid`.
    pub async fn unpack_all(
        &self,
        packages: &JobPackages,
        account: &str,
        gid: Option<u32>,
        gcs_address: &str,
        credential: &Bearer,
    ) -> IonetResult<Unpacked> {
        let mut unpacked = Unpacked { working_dir: None, python_path: Vec::new(), scripts: None };
        let uris = Some(&packages.working_dir).filter(|uri| !uri.is_empty()).into_iter().chain(&packages.py_modules);
        for (index, uri) in uris.enumerate() {
            let name = package_name_of_uri(uri)?;
            let dir = self.ensure(account, name, gid, || fetch(gcs_address, credential, name)).await?;
            if index == 0 && !packages.working_dir.is_empty() {
                unpacked.working_dir = Some(dir.clone());
            }
            unpacked.python_path.push(dir);
        }
        Ok(unpacked)
    }
}

/// Copies the tree at `from` into `to` (which must not exist), owned by `owner` (uid, gid).
pub fn copy_tree(from: &Path, to: &Path, owner: Option<(u32, u32)>) -> IonetResult<()> {
    std::fs::create_dir(to)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o750))?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target, owner)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&target, Some(uid), Some(gid))?;
        }
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(to, Some(uid), Some(gid))?;
    }
    Ok(())
}

fn rand_suffix() -> String {
    use rand::Rng;
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(dir: &Path) {
        std::fs::create_dir_all(dir.join("pkg/__pycache__")).unwrap();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(dir.join("pkg/__init__.py"), "X = 1\n").unwrap();
        std::fs::write(dir.join("pkg/__pycache__/x.pyc"), "junk").unwrap();
        std::fs::write(dir.join("data/big.bin"), vec![7u8; 1000]).unwrap();
        std::fs::write(dir.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(dir.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn a_directory_packs_by_content_and_unpacks_the_same() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        tree(one.path());
        tree(two.path());
        let first = package_directory(one.path(), &[], false).unwrap();
        let second = package_directory(two.path(), &[], false).unwrap();
        assert_eq!(first.name, second.name, "the same content, the same package");
        assert_eq!(first.files, 3, "__pycache__ stays out");
        std::fs::write(two.path().join("pkg/__init__.py"), "X = 2\n").unwrap();
        assert_ne!(package_directory(two.path(), &[], false).unwrap().name, first.name);
        let without = package_directory(one.path(), &["data".to_string()], false).unwrap();
        assert_eq!(without.files, 2);
        assert_eq!(package_directory(one.path(), &["*.bin".to_string()], false).unwrap().files, 2);

        let out = tempfile::tempdir().unwrap();
        let into = out.path().join("unpacked");
        unpack(&first.bytes, &into).unwrap();
        assert_eq!(std::fs::read_to_string(into.join("pkg/__init__.py")).unwrap(), "X = 1\n");
        let mode = std::fs::metadata(into.join("run.sh")).unwrap().permissions().mode();
        assert!(mode & 0o100 != 0, "executables stay executable");
        let module = package_directory(&one.path().join("pkg"), &[], true).unwrap();
        let as_module = out.path().join("module");
        unpack(&module.bytes, &as_module).unwrap();
        assert!(as_module.join("pkg/__init__.py").is_file(), "a module keeps its own name");
    }

    #[test]
    fn an_oversize_directory_is_refused_naming_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("huge")).unwrap();
        file.set_len(MAX_PACKAGE_BYTES + 1).unwrap();
        let err = package_directory(dir.path(), &[], false).err().unwrap().to_string();
        assert!(err.contains("more than 100 MiB"), "{err}");
    }

    #[test]
    fn archives_that_link_or_unpack_past_the_limit_are_refused() {
        let out = tempfile::tempdir().unwrap();
        let mut archive = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        archive.add_symlink("etc", "/etc", zip::write::SimpleFileOptions::default()).unwrap();
        let linked = archive.finish().unwrap().into_inner();
        let err = unpack(&linked, &out.path().join("linked")).unwrap_err().to_string();
        assert!(err.contains("holds a link"), "{err}");
        // Zeros compress to almost nothing: the limit counts what comes out.
        let mut archive = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .large_file(true);
        archive.start_file("zeros", options).unwrap();
        let block = vec![0u8; 1024 * 1024];
        for _ in 0..=MAX_PACKAGE_BYTES / block.len() as u64 {
            archive.write_all(&block).unwrap();
        }
        let bomb = archive.finish().unwrap().into_inner();
        assert!(bomb.len() < 1024 * 1024, "{} bytes packed", bomb.len());
        let err = unpack(&bomb, &out.path().join("bomb")).unwrap_err().to_string();
        assert!(err.contains("unpacks to more than 100 MiB"), "{err}");
    }

    #[test]
    fn archives_that_escape_or_link_are_refused() {
        let mut archive = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        archive.start_file("../escape", zip::write::SimpleFileOptions::default()).unwrap();
        archive.write_all(b"x").unwrap();
        let bytes = archive.finish().unwrap().into_inner();
        let out = tempfile::tempdir().unwrap();
        let err = unpack(&bytes, &out.path().join("a")).unwrap_err().to_string();
        assert!(err.contains("outside its directory"), "{err}");
    }
}
