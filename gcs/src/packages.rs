//! The packages tenants upload for their jobs (Ray's `working_dir` and `py_modules`):
//! kept on the head per account (a tenant's package name never reaches another tenant's
//! files, whatever it is named), written whole or not at all, and handed to the nodes
//! that run the account's jobs (`Gcs/GetPackage`, with a credential of that account).

use std::path::PathBuf;

use ionet_common::jobs::{checked_package_name, MAX_PACKAGE_BYTES};
use ionet_common::{IonetError, IonetResult};
use sha2::{Digest, Sha256};

pub struct PackageStore {
    dir: PathBuf,
}

impl PackageStore {
    pub fn new(dir: PathBuf) -> IonetResult<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// Where `account`'s package `name` is kept.
    pub fn path(&self, account: &str, name: &str) -> IonetResult<PathBuf> {
        let name = checked_package_name(name)?;
        let account = hex::encode(&Sha256::digest(account.as_bytes())[..8]);
        Ok(self.dir.join(account).join(name))
    }

    pub fn exists(&self, account: &str, name: &str) -> IonetResult<bool> {
        Ok(self.path(account, name)?.is_file())
    }

    /// Keeps `bytes` as `account`'s package `name` (replacing one of that name).
    pub async fn put(&self, account: &str, name: &str, bytes: axum::body::Bytes) -> IonetResult<()> {
        if bytes.len() as u64 > MAX_PACKAGE_BYTES {
            return Err(IonetError::InvalidArgument(format!(
                "package {name} is {} bytes: the most a package may be is {MAX_PACKAGE_BYTES}",
                bytes.len()
            )));
        }
        if !bytes.starts_with(b"PK") {
            return Err(IonetError::InvalidArgument(format!("package {name} is not a zip archive")));
        }
        let path = self.path(account, name)?;
        tokio::task::spawn_blocking(move || -> IonetResult<()> {
            let parent = path.parent().expect("a package's path has an account directory");
            std::fs::create_dir_all(parent)?;
            let mut fresh = tempfile::NamedTempFile::new_in(parent)?;
            std::io::Write::write_all(&mut fresh, &bytes)?;
            fresh.as_file().sync_all()?;
            fresh.persist(&path).map_err(|err| IonetError::from(err.error))?;
            Ok(())
        })
        .await
        .map_err(|err| IonetError::Internal(format!("storing a package: {err}")))??;
        tracing::info!(%account, package = %name, "package uploaded");
        Ok(())
    }

    /// `account`'s package `name`, whole.
    pub async fn read(&self, account: &str, name: &str) -> IonetResult<Vec<u8>> {
        let path = self.path(account, name)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(bytes),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                Err(IonetError::NotFound(format!("package {name} was not uploaded by account {account}")))
            }
            Err(err) => Err(err.into()),
        }
    }
}

/// The account whose submissions and packages `principal` reads and writes: an account's
/// key's own, or (the operator) `default`'s. A job's or a submission's credential, which
/// providers' nodes hold, has none.
pub fn own_account(principal: &ionet_common::authz::Principal) -> IonetResult<String> {
    use ionet_common::authz::Principal;
    match principal {
        Principal::Account(_) | Principal::Admin => Ok(principal.account().unwrap_or_default().to_string()),
        other => Err(IonetError::PermissionDenied(format!(
            "{other} has no submissions or packages of its own (an account's API key has)"
        ))),
    }
}
