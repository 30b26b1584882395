//! Names submitted jobs share between the head and the nodes: submission ids and the
//! packages a job ships (Ray's `working_dir` and `py_modules`, `gcs://<name>`). Both
//! name files on the head and on nodes, so both are checked the same way everywhere. And
//! what a runtime environment may say (its keys, `env_vars`, packages and requirements),
//! read alike by the head's submissions and a driver's `init(runtime_env=…)`.

use crate::error::{IonetError, IonetResult};
use crate::rpc::proto::common::{JobPackages, RuntimeEnv, WorkerCommand};

/// Options of `pip install` a runtime environment may pass (where packages come from and
/// which kind), each with whether it takes a value.
pub const ALLOWED_PIP_OPTIONS: [(&str, bool); 13] = [
    ("--index-url", true),
    ("-i", true),
    ("--extra-index-url", true),
    ("--find-links", true),
    ("-f", true),
    ("--trusted-host", true),
    ("--only-binary", true),
    ("--no-binary", true),
    ("--no-index", false),
    ("--pre", false),
    ("--no-deps", false),
    ("--prefer-binary", false),
    ("--no-build-isolation", false),
];

/// Checks a runtime environment's `pip` / `uv` requirements and options: requirements
/// are not options, options are [`ALLOWED_PIP_OPTIONS`] (with their values), the
/// installer is pip or uv.
pub fn check_pip(packages: &JobPackages) -> IonetResult<()> {
    if packages.pip.is_empty() && !packages.pip_options.is_empty() {
        return Err(IonetError::InvalidArgument("install options without packages to install".into()));
    }
    for requirement in &packages.pip {
        if requirement.trim().is_empty() || requirement.starts_with('-') || requirement.contains('\0') {
            return Err(IonetError::InvalidArgument(format!(
                "{requirement:?} is not a requirement (options go in pip_install_options)"
            )));
        }
    }
    let mut options = packages.pip_options.iter();
    while let Some(option) = options.next() {
        let (name, inline) = match option.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (option.as_str(), None),
        };
        let Some((_, takes_value)) = ALLOWED_PIP_OPTIONS.iter().find(|(allowed, _)| *allowed == name) else {
            return Err(IonetError::InvalidArgument(format!(
                "install option {option:?} is not allowed: a runtime environment chooses where packages come from \
                 ({}), the node where they go",
                ALLOWED_PIP_OPTIONS.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", ")
            )));
        };
        if *takes_value && inline.is_none() && options.next().is_none() {
            return Err(IonetError::InvalidArgument(format!("install option {name} needs a value")));
        }
    }
    match packages.pip_tool.as_str() {
        "" | "pip" | "uv" => Ok(()),
        other => Err(IonetError::InvalidArgument(format!("{other:?} is not an installer (pip or uv)"))),
    }
}

/// The most bytes a package holds unpacked (and the most the head takes in one upload).
pub const MAX_PACKAGE_BYTES: u64 = 100 * 1024 * 1024;
/// The scheme of a package's URI in a runtime environment (Ray's).
pub const PACKAGE_URI_SCHEME: &str = "gcs://";
/// The longest submission id.
const MAX_SUBMISSION_ID: usize = 128;

/// A submission id fit to name files: letters, digits, `-`, `_` and `.`, not starting
/// with a dot, at most 128 bytes.
pub fn checked_submission_id(id: &str) -> IonetResult<&str> {
    let fits = !id.is_empty()
        && id.len() <= MAX_SUBMISSION_ID
        && !id.starts_with('.')
        && id.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'));
    if fits {
        Ok(id)
    } else {
        Err(IonetError::InvalidArgument(format!(
            "submission id {id:?} is not valid: 1 to {MAX_SUBMISSION_ID} letters, digits, '-', '_' or '.', not \
             starting with '.'"
        )))
    }
}

/// A package name fit to name a file: letters, digits, `-`, `_`, `.`, ending `.zip` or
/// `.whl` (Ray's packages), at most 255 bytes.
pub fn checked_package_name(name: &str) -> IonetResult<&str> {
    let fits = name.len() <= 255
        && !name.starts_with('.')
        && (name.ends_with(".zip") || name.ends_with(".whl"))
        && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'));
    if fits {
        Ok(name)
    } else {
        Err(IonetError::InvalidArgument(format!(
            "{name:?} is not a package name: letters, digits, '-', '_' and '.', ending .zip or .whl"
        )))
    }
}

/// The package a runtime environment's URI names (`gcs://<name>`).
pub fn package_name_of_uri(uri: &str) -> IonetResult<&str> {
    let name = uri.strip_prefix(PACKAGE_URI_SCHEME).ok_or_else(|| {
        IonetError::InvalidArgument(format!(
            "{uri:?} is not an uploaded package (gcs://<name>): upload the directory first (`ionet job submit \
             --working-dir DIR` and ionet.job_submission do)"
        ))
    })?;
    checked_package_name(name)
}

/// Keys of a runtime environment ionet applies (`excludes` is the uploader's: what it
/// left out of the packages).
pub const RUNTIME_ENV_KEYS: [&str; 6] = ["env_vars", "working_dir", "py_modules", "excludes", "pip", "uv"];
/// Keys of Ray's runtime environments ionet does not support yet.
pub const RUNTIME_ENV_LATER: [&str; 5] = ["conda", "container", "image_uri", "java_jars", "config"];

/// A runtime environment's `env_vars`, after checking every key of it is known.
pub fn env_vars_of(
    runtime_env: &serde_json::Map<String, serde_json::Value>,
) -> IonetResult<std::collections::HashMap<String, String>> {
    for key in runtime_env.keys() {
        if RUNTIME_ENV_LATER.contains(&key.as_str()) {
            return Err(IonetError::InvalidArgument(format!(
                "runtime_env key {key:?} is not supported by ionet yet (supported: {})",
                RUNTIME_ENV_KEYS.join(", ")
            )));
        }
        if !RUNTIME_ENV_KEYS.contains(&key.as_str()) {
            return Err(IonetError::InvalidArgument(format!(
                "unknown runtime_env key {key:?}: known keys are {}",
                RUNTIME_ENV_KEYS.join(", ")
            )));
        }
    }
    let mut env = std::collections::HashMap::new();
    match runtime_env.get("env_vars") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(vars)) => {
            for (name, value) in vars {
                let serde_json::Value::String(value) = value else {
                    return Err(IonetError::InvalidArgument(format!(
                        "runtime_env env_vars[{name:?}] must be a string, not {value}"
                    )));
                };
                check_env_var(name, value)?;
                env.insert(name.clone(), value.clone());
            }
        }
        Some(other) => {
            return Err(IonetError::InvalidArgument(format!(
                "runtime_env env_vars must be an object of strings, not {other}"
            )))
        }
    }
    Ok(env)
}

/// The packages a runtime environment names (`working_dir`, `py_modules`: uploaded
/// packages' URIs), checked for shape.
pub fn packages_of(runtime_env: &serde_json::Map<String, serde_json::Value>) -> IonetResult<JobPackages> {
    let mut packages = JobPackages::default();
    match runtime_env.get("working_dir") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::String(uri)) => {
            package_name_of_uri(uri)?;
            packages.working_dir = uri.clone();
        }
        Some(other) => {
            return Err(IonetError::InvalidArgument(format!("runtime_env working_dir must be a string, not {other}")))
        }
    }
    match runtime_env.get("py_modules") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Array(uris)) => {
            for uri in uris {
                let serde_json::Value::String(uri) = uri else {
                    return Err(IonetError::InvalidArgument(format!(
                        "runtime_env py_modules must be a list of strings, not one holding {uri}"
                    )));
                };
                package_name_of_uri(uri)?;
                packages.py_modules.push(uri.clone());
            }
        }
        Some(other) => {
            return Err(IonetError::InvalidArgument(format!("runtime_env py_modules must be a list, not {other}")))
        }
    }
    excludes_of(runtime_env)?;
    for tool in ["pip", "uv"] {
        let (requirements, options) = match runtime_env.get(tool) {
            None | Some(serde_json::Value::Null) => continue,
            // Ray's forms: a list of requirements, or {"packages": [...], options}.
            Some(list @ serde_json::Value::Array(_)) => (strings(tool, list)?, Vec::new()),
            Some(serde_json::Value::Object(spec)) => {
                let requirements = strings(tool, spec.get("packages").unwrap_or(&serde_json::Value::Null))?;
                let options = match spec
                    .get(&format!("{tool}_pip_install_options"))
                    .or(spec.get(&format!("{tool}_install_options")))
                    .or(spec.get("pip_install_options"))
                {
                    Some(options) => strings(tool, options)?,
                    None => Vec::new(),
                };
                (requirements, options)
            }
            Some(other) => {
                return Err(IonetError::InvalidArgument(format!(
                    "runtime_env {tool} must be a list of requirements or {{\"packages\": [...]}}, not {other}"
                )))
            }
        };
        if !packages.pip_tool.is_empty() {
            return Err(IonetError::InvalidArgument("runtime_env may name pip or uv, not both".into()));
        }
        packages.pip = requirements;
        packages.pip_options = options;
        packages.pip_tool = tool.to_string();
    }
    check_pip(&packages)?;
    Ok(packages)
}

/// A variable a runtime environment may set.
fn check_env_var(name: &str, value: &str) -> IonetResult<()> {
    if name.is_empty() || name.contains('=') || name.contains('\0') || value.contains('\0') {
        return Err(IonetError::InvalidArgument(format!("runtime_env env_vars has an invalid variable {name:?}")));
    }
    Ok(())
}

/// A runtime environment's `excludes` (patterns its uploader left out of the packages).
pub fn excludes_of(runtime_env: &serde_json::Map<String, serde_json::Value>) -> IonetResult<Vec<String>> {
    match runtime_env.get("excludes") {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(list @ serde_json::Value::Array(_)) => strings("excludes", list),
        Some(other) => Err(IonetError::InvalidArgument(format!("runtime_env excludes must be a list, not {other}"))),
    }
}

/// A runtime environment's list of strings under `key`.
fn strings(key: &str, value: &serde_json::Value) -> IonetResult<Vec<String>> {
    let serde_json::Value::Array(items) = value else {
        return Err(IonetError::InvalidArgument(format!("runtime_env {key} needs a list of strings, not {value}")));
    };
    items
        .iter()
        .map(|item| {
            item.as_str()
                .map(str::to_string)
                .ok_or_else(|| IonetError::InvalidArgument(format!("runtime_env {key} holds {item}, not a string")))
        })
        .collect()
}

/// A task's or actor's `runtime_env` (Ray's shape): its `env_vars` and `pip` / `uv`.
/// `working_dir` and `py_modules` are the job's (`init`, or the submission): refused here,
/// saying so.
pub fn task_runtime_env(runtime_env: &serde_json::Value) -> IonetResult<RuntimeEnv> {
    let serde_json::Value::Object(runtime_env) = runtime_env else {
        return Err(IonetError::InvalidArgument(format!("runtime_env must be a mapping, not {runtime_env}")));
    };
    let env_vars = env_vars_of(runtime_env)?;
    for key in ["working_dir", "py_modules"] {
        if runtime_env.get(key).is_some_and(|value| !value.is_null()) {
            return Err(IonetError::InvalidArgument(format!(
                "runtime_env {key} is the job's: set it in init(runtime_env=...) or the job's submission (a task or \
                 actor may add env_vars and pip or uv requirements)"
            )));
        }
    }
    let packages = packages_of(runtime_env)?;
    Ok(RuntimeEnv { env_vars, packages: (!packages.pip.is_empty()).then_some(packages) })
}

/// `child` over `parent` (a task's environment over the one its submitter runs in, as
/// Ray's inheritance): env_vars merged, the child's winning; the child's requirements
/// replacing the parent's when it names any. `None` when neither says anything.
pub fn merged_runtime_env(parent: Option<&RuntimeEnv>, child: Option<&RuntimeEnv>) -> Option<RuntimeEnv> {
    let mut merged = parent.cloned().unwrap_or_default();
    if let Some(child) = child {
        merged.env_vars.extend(child.env_vars.iter().map(|(name, value)| (name.clone(), value.clone())));
        if child.packages.as_ref().is_some_and(|packages| !packages.pip.is_empty()) {
            merged.packages = child.packages.clone();
        }
    }
    let empty = merged.env_vars.is_empty() && merged.packages.as_ref().is_none_or(|packages| packages.pip.is_empty());
    (!empty).then_some(merged)
}

/// `runtime_env` as Ray's JSON, keys sorted: what names it (worker pools are keyed by it)
/// and what a worker started inside it reads back ([`task_runtime_env`] parses it).
pub fn runtime_env_json(runtime_env: &RuntimeEnv) -> String {
    let env_vars: std::collections::BTreeMap<&String, &String> = runtime_env.env_vars.iter().collect();
    let mut json = serde_json::json!({ "env_vars": env_vars });
    if let Some(packages) = runtime_env.packages.as_ref().filter(|packages| !packages.pip.is_empty()) {
        let tool = if packages.pip_tool.is_empty() { "pip" } else { packages.pip_tool.as_str() };
        json[tool] = serde_json::json!({ "packages": packages.pip, "pip_install_options": packages.pip_options });
    }
    json.to_string()
}

/// Starts a worker of `command` inside `runtime_env` (a task's or actor's own): its
/// env_vars added, its requirements replacing the job's, and the environment named in
/// [`crate::worker_env::RUNTIME_ENV`] for the worker's own tasks to inherit. Checked
/// first: a request carries it.
pub fn apply_runtime_env(command: &mut WorkerCommand, runtime_env: &RuntimeEnv) -> IonetResult<()> {
    for (name, value) in &runtime_env.env_vars {
        check_env_var(name, value)?;
    }
    if let Some(packages) = runtime_env.packages.as_ref().filter(|packages| !packages.pip.is_empty()) {
        if !packages.working_dir.is_empty() || !packages.py_modules.is_empty() {
            return Err(IonetError::InvalidArgument(
                "a task's or actor's runtime_env ships no packages of its own: they are the job's".into(),
            ));
        }
        check_pip(packages)?;
        let shipped = command.packages.get_or_insert_with(JobPackages::default);
        shipped.pip = packages.pip.clone();
        shipped.pip_options = packages.pip_options.clone();
        shipped.pip_tool = packages.pip_tool.clone();
    }
    command.env.extend(runtime_env.env_vars.iter().map(|(name, value)| (name.clone(), value.clone())));
    command.env.insert(crate::worker_env::RUNTIME_ENV.to_string(), runtime_env_json(runtime_env));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_reach_other_files_are_refused() {
        for good in ["raysubmit_AbC123", "job-1.2_x"] {
            assert!(checked_submission_id(good).is_ok(), "{good}");
        }
        for bad in ["", "..", ".hidden", "a/b", "a b", "x\0", &"x".repeat(129)] {
            let err = checked_submission_id(bad).unwrap_err().to_string();
            assert!(err.contains("is not valid"), "{bad:?}: {err}");
        }
        assert_eq!(package_name_of_uri("gcs://_ray_pkg_abc.zip").unwrap(), "_ray_pkg_abc.zip");
        for bad in ["/home/me/project", "gcs://../x.zip", "gcs://x.tar", "gcs://.x.zip", "s3://b/x.zip"] {
            assert!(package_name_of_uri(bad).is_err(), "{bad}");
        }
    }

    fn packages(pip: &[&str], options: &[&str]) -> JobPackages {
        JobPackages {
            pip: pip.iter().map(|item| item.to_string()).collect(),
            pip_options: options.iter().map(|item| item.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_install_options_that_choose_where_packages_come_from_pass() {
        assert!(check_pip(&packages(&["requests==2.31"], &["--no-index", "--find-links", "/wheels"])).is_ok());
        assert!(check_pip(&packages(&["x"], &["--index-url=https://pypi.example/simple"])).is_ok());
        for options in [&["--target", "/etc"][..], &["--prefix=/usr"], &["--user"], &["-e", "."]] {
            let err = check_pip(&packages(&["x"], options)).unwrap_err().to_string();
            assert!(err.contains("is not allowed"), "{options:?}: {err}");
        }
        let smuggled = check_pip(&packages(&["--target=/etc"], &[])).unwrap_err().to_string();
        assert!(smuggled.contains("is not a requirement"), "{smuggled}");
        assert!(check_pip(&packages(&["x"], &["--find-links"])).is_err(), "an option missing its value");
    }
}
