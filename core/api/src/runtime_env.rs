//! A driver's runtime environment (`InitConfig::runtime_env`, Python's
//! `init(runtime_env=…)`): what every worker of its job starts inside, as Ray's.
//!
//! Local directories (`working_dir`, `py_modules`) are packed by content and uploaded once
//! to the head as the account's packages (`Gcs/HasPackage`, `Gcs/PutPackage`: the
//! account's key, which the driver starts its job with); the job's worker command then
//! names them by URI, and each node that runs the job's workers pulls and unpacks them
//! ([`ionet_worker::packages`]), installs `pip`/`uv` requirements once per node
//! ([`ionet_worker::pip_envs`]), and starts the workers inside with `env_vars` set.
//!
//! In a submitted job's entrypoint the submission's environment applies first and
//! `init`'s keys replace it key by key (`env_vars` merged, `init`'s winning); such an
//! entrypoint holds a submission's credential, which uploads nothing: its local
//! directories belong in the submission's runtime environment.

use std::path::Path;

use ionet_common::jobs::{env_vars_of, packages_of, PACKAGE_URI_SCHEME};
use ionet_common::rpc::proto::common::{JobPackages, WorkerCommand};
use ionet_common::rpc::proto::gcs::{GetPackageRequest, PutPackageRequest};
use ionet_common::rpc::GcsClient;
use ionet_common::{IonetError, IonetResult};
use serde_json::{Map, Value};

/// The bytes of one upload chunk.
const CHUNK_BYTES: usize = 1024 * 1024;

/// Applies `runtime_env` (Ray's shape) to the job's worker `command`, uploading its local
/// directories first.
pub(crate) async fn apply(gcs: &mut GcsClient, runtime_env: &Value, command: &mut WorkerCommand) -> IonetResult<()> {
    let Value::Object(runtime_env) = runtime_env else {
        return Err(IonetError::InvalidArgument(format!("runtime_env must be a mapping, not {runtime_env}")));
    };
    // Its shape first: nothing is uploaded for an environment that is refused anyway.
    env_vars_of(runtime_env)?;
    let mut uploaded = runtime_env.clone();
    let excludes = ionet_common::jobs::excludes_of(runtime_env)?;
    if let Some(Value::String(dir)) = uploaded.get_mut("working_dir") {
        if !dir.starts_with(PACKAGE_URI_SCHEME) {
            *dir = match submitted_working_dir(dir, command) {
                Some(uri) => uri,
                None => upload(gcs, Path::new(dir.as_str()), &excludes, false).await?,
            };
        }
    }
    if let Some(Value::Array(modules)) = uploaded.get_mut("py_modules") {
        for module in modules {
            if let Value::String(dir) = module {
                if !dir.starts_with(PACKAGE_URI_SCHEME) {
                    *dir = upload(gcs, Path::new(dir.as_str()), &excludes, true).await?;
                }
            }
        }
    }
    let env_vars = env_vars_of(&uploaded)?;
    let packages = packages_of(&uploaded)?;
    command.env.extend(env_vars);
    command.packages = merged(command.packages.take(), packages, &uploaded);
    Ok(())
}

/// The submission's working dir package when `dir` is where this entrypoint runs (its
/// unpacked copy: `init(runtime_env={"working_dir": "."})` in a submitted program, which
/// uploads nothing).
fn submitted_working_dir(dir: &str, command: &WorkerCommand) -> Option<String> {
    let here = std::env::var_os(ionet_worker::entrypoints::WORKING_DIR_ENV)?;
    let shipped =
        command.packages.as_ref().map(|packages| packages.working_dir.clone()).filter(|uri| !uri.is_empty())?;
    let same = std::fs::canonicalize(dir).ok()? == std::fs::canonicalize(here).ok()?;
    same.then_some(shipped)
}

/// `before` (a submission's packages) with what `runtime_env` names replacing it, key by
/// key; `None` when nothing is shipped.
fn merged(before: Option<JobPackages>, named: JobPackages, runtime_env: &Map<String, Value>) -> Option<JobPackages> {
    let names = |key: &str| runtime_env.get(key).is_some_and(|value| !value.is_null());
    let mut packages = before.unwrap_or_default();
    if names("working_dir") {
        packages.working_dir = named.working_dir;
    }
    if names("py_modules") {
        packages.py_modules = named.py_modules;
    }
    if names("pip") || names("uv") {
        packages.pip = named.pip;
        packages.pip_options = named.pip_options;
        packages.pip_tool = named.pip_tool;
    }
    let empty = packages.working_dir.is_empty() && packages.py_modules.is_empty() && packages.pip.is_empty();
    (!empty).then_some(packages)
}

/// Packs `dir` and uploads it unless the head has it; its URI.
async fn upload(gcs: &mut GcsClient, dir: &Path, excludes: &[String], under_own_name: bool) -> IonetResult<String> {
    let (dir, excludes) = (dir.to_path_buf(), excludes.to_vec());
    let package = tokio::task::spawn_blocking(move || {
        ionet_worker::packages::package_directory(&dir, &excludes, under_own_name)
            .map_err(|err| IonetError::InvalidArgument(format!("runtime_env: {err}")))
    })
    .await
    .map_err(|err| IonetError::Internal(format!("packing a runtime_env directory: {err}")))??;
    let uri = package.uri();
    let name = package.name.clone();
    let refused = |status: tonic::Status| match IonetError::from(status) {
        IonetError::PermissionDenied(why) => IonetError::PermissionDenied(format!(
            "uploading runtime_env package {name}: {why} (a submitted job's entrypoint uploads nothing: name the \
             directory in the submission's runtime_env)"
        )),
        IonetError::InvalidArgument(why) => {
            IonetError::InvalidArgument(format!("uploading runtime_env package {name}: {why}"))
        }
        other => other,
    };
    let exists = gcs.has_package(GetPackageRequest { name: package.name.clone() }).await.map_err(refused)?;
    if exists.into_inner().exists {
        return Ok(uri);
    }
    let chunks: Vec<PutPackageRequest> = package
        .bytes
        .chunks(CHUNK_BYTES)
        .map(|data| PutPackageRequest { name: package.name.clone(), data: data.to_vec() })
        .collect();
    gcs.put_package(tokio_stream::iter(chunks)).await.map_err(refused)?;
    tracing::info!(package = %package.name, files = package.files, bytes = package.bytes.len(), "runtime_env package uploaded");
    Ok(uri)
}
