//! Options of Python tasks and actors as typed values: `ionet._ionet.Options(...)` takes
//! Ray's option names as keywords (an unknown one is a `TypeError`), converts each with
//! the parsers Rust callers use (`SchedulingStrategy::from_str`, `retries_from_ray`,
//! `bundle_from_ray`, `LabelSelector::from_ray` through `TaskOptions::wire_strategy`),
//! and holds the result. The Python side builds one when a function or class is
//! decorated or given `.options()`, so a call converts nothing.

use std::collections::BTreeMap;

use ionet::actor::ActorOptions;
use ionet::{bundle_from_ray, retries_from_ray, IonetResult, SchedulingStrategy, TaskOptions};
use pyo3::prelude::*;

use crate::OrRaise;

/// Options of a task or an actor, converted once.
#[pyclass(frozen, name = "Options", module = "ionet._ionet")]
pub(crate) struct Options {
    /// A task's options; for an actor, the resources it holds (`actor.resources`).
    pub(crate) actor: ActorOptions,
    /// A generator task: its consumer reads it while it runs, so it never runs inside
    /// a wait for it.
    pub(crate) generator: bool,
}

impl Options {
    pub(crate) fn task(&self) -> TaskOptions {
        self.actor.resources.clone()
    }
}

#[pymethods]
impl Options {
    /// Unset options take the defaults of a task (1 CPU, 3 retries) or, with `actor`, of
    /// an actor (no CPU). `scheduling_strategy` is a strategy's text (`DEFAULT`, `SPREAD`,
    /// `COST`, `node:<id>[:soft]`); `placement_group` a group's hex id with Ray's
    /// `bundle_index` (-1: any bundle).
    #[new]
    #[pyo3(signature = (
        *, actor = false, generator = false, num_cpus = None, num_gpus = None, memory = None,
        accelerator_type = None, resources = None, max_retries = None, retry_exceptions = None,
        max_calls = None, scheduling_strategy = None, placement_group = None, bundle_index = -1,
        label_selector = None, name = None, namespace = None, lifetime = None, get_if_exists = false,
        max_restarts = None, max_task_retries = None, max_concurrency = None, runtime_env = None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        actor: bool,
        generator: bool,
        num_cpus: Option<f64>,
        num_gpus: Option<f64>,
        memory: Option<u64>,
        accelerator_type: Option<String>,
        resources: Option<BTreeMap<String, f64>>,
        max_retries: Option<i64>,
        retry_exceptions: Option<bool>,
        max_calls: Option<u32>,
        scheduling_strategy: Option<String>,
        placement_group: Option<String>,
        bundle_index: i64,
        label_selector: Option<BTreeMap<String, String>>,
        name: Option<String>,
        namespace: Option<String>,
        lifetime: Option<String>,
        get_if_exists: bool,
        max_restarts: Option<i32>,
        max_task_retries: Option<i32>,
        max_concurrency: Option<u32>,
        runtime_env: Option<String>,
    ) -> PyResult<Self> {
        let defaults = if actor {
            ActorOptions::default()
        } else {
            ActorOptions { resources: TaskOptions::default(), ..ActorOptions::default() }
        };
        let task = || -> IonetResult<TaskOptions> {
            let base = &defaults.resources;
            let task = TaskOptions {
                num_cpus: num_cpus.unwrap_or(base.num_cpus),
                num_gpus: num_gpus.unwrap_or(base.num_gpus),
                memory: memory.unwrap_or(base.memory),
                accelerator_type,
                resources: resources.unwrap_or_default(),
                max_retries: max_retries.map(retries_from_ray).transpose()?.unwrap_or(base.max_retries),
                retry_exceptions: retry_exceptions.unwrap_or(base.retry_exceptions),
                max_calls: max_calls.unwrap_or(base.max_calls),
                scheduling_strategy: scheduling_strategy
                    .map(|text| text.parse::<SchedulingStrategy>())
                    .transpose()?
                    .unwrap_or_default(),
                label_selector: label_selector.unwrap_or_default(),
                placement_group: placement_group
                    .map(|group| Ok::<_, ionet::IonetError>((group.parse()?, bundle_from_ray(bundle_index)?)))
                    .transpose()?,
                runtime_env: runtime_env
                    .map(|json| {
                        let value: serde_json::Value = serde_json::from_str(&json).map_err(|err| {
                            ionet::IonetError::InvalidArgument(format!("runtime_env is not JSON: {err}"))
                        })?;
                        // Checked now, so a bad one fails the `.options()` call naming it.
                        ionet_common::jobs::task_runtime_env(&value)?;
                        Ok::<_, ionet::IonetError>(value)
                    })
                    .transpose()?,
                // A task's name (an actor's names the actor, below).
                name: if actor { None } else { name.clone().filter(|name| !name.is_empty()) },
            };
            // Parsed now, so a bad selector fails the `.options()` call naming it.
            task.wire_strategy()?;
            Ok(task)
        };
        let actor = ActorOptions {
            resources: task().or_raise()?,
            name: name.filter(|name| !name.is_empty()),
            namespace,
            detached: lifetime.as_deref() == Some("detached"),
            get_if_exists,
            max_restarts: max_restarts.unwrap_or(defaults.max_restarts),
            max_task_retries: max_task_retries.unwrap_or(defaults.max_task_retries),
            max_concurrency: max_concurrency.unwrap_or(defaults.max_concurrency),
            class_label: None,
            // Python actors keep a process each (one interpreter lock per actor).
            share_process: false,
        };
        Ok(Options { actor, generator })
    }

    fn __repr__(&self) -> String {
        format!("Options({:?}, generator={})", self.actor, self.generator)
    }
}
