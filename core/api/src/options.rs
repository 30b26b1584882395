//! Per-call options of remote functions, with Ray's names.

use std::collections::BTreeMap;

use ionet_common::rpc::proto::node::{SchedulingKind, SchedulingStrategy as WireStrategy};
use ionet_common::{NodeId, PlacementGroupId};

use crate::placement_group::PlacementGroup;

/// The bundle index that stands for "any bundle of the group".
pub const ANY_BUNDLE: u32 = u32::MAX;

/// Where a task may run.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum SchedulingStrategy {
    /// Prefer the caller's node until it is half used, then the least used node.
    #[default]
    Default,
    /// Spread over the nodes that fit.
    Spread,
    /// On this node; with `soft`, elsewhere when it cannot.
    NodeAffinity { node_id: NodeId, soft: bool },
    /// On the cheapest node that fits, by its price per GPU-hour (ties: the least used).
    Cost,
}

impl std::str::FromStr for SchedulingStrategy {
    type Err = ionet_common::IonetError;

    /// A strategy by name, as Python's `scheduling_strategy="..."` gives it: `DEFAULT`,
    /// `SPREAD` or `COST` (any case).
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name.to_ascii_uppercase().as_str() {
            "DEFAULT" => Ok(SchedulingStrategy::Default),
            "SPREAD" => Ok(SchedulingStrategy::Spread),
            "COST" => Ok(SchedulingStrategy::Cost),
            _ => Err(ionet_common::IonetError::InvalidArgument(format!(
                "unknown scheduling strategy {name:?} (DEFAULT, SPREAD or COST; a node or a placement group by their own types)"
            ))),
        }
    }
}

/// Options of one call (`f::options(TaskOptions { .. }).remote(..)`).
#[derive(Clone, Debug, PartialEq)]
pub struct TaskOptions {
    /// CPUs held while the task runs (default 1, as Ray).
    pub num_cpus: f64,
    /// GPUs held; fractions share a GPU (0.5 = half of one).
    pub num_gpus: f64,
    /// Bytes of memory held.
    pub memory: u64,
    /// Only on nodes with this GPU model (e.g. "A100-80GB").
    pub accelerator_type: Option<String>,
    pub resources: BTreeMap<String, f64>,
    /// Retries when the worker process dies (default 3, as Ray).
    pub max_retries: u32,
    /// Also retry when the task returns an error or panics.
    pub retry_exceptions: bool,
    /// A worker process runs at most this many calls of the function, then is replaced
    /// (Ray's `max_calls`, for code that leaks memory, GPU memory say); 0: no limit.
    pub max_calls: u32,
    pub scheduling_strategy: SchedulingStrategy,
    /// Only on nodes whose labels match, as Ray's `label_selector`: label → `"eu"`,
    /// `"!eu"`, `"in(eu,us)"` or `"!in(eu,us)"`.
    pub label_selector: BTreeMap<String, String>,
    /// Run inside this bundle (group id, bundle index), from its reserved resources.
    pub placement_group: Option<(PlacementGroupId, u32)>,
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self {
            num_cpus: 1.0,
            num_gpus: 0.0,
            memory: 0,
            accelerator_type: None,
            resources: BTreeMap::new(),
            max_retries: 3,
            retry_exceptions: false,
            max_calls: 0,
            scheduling_strategy: SchedulingStrategy::Default,
            label_selector: BTreeMap::new(),
            placement_group: None,
        }
    }
}

impl TaskOptions {
    pub fn num_cpus(mut self, cpus: f64) -> Self {
        self.num_cpus = cpus;
        self
    }

    pub fn num_gpus(mut self, gpus: f64) -> Self {
        self.num_gpus = gpus;
        self
    }

    /// See [`TaskOptions::max_calls`].
    pub fn max_calls(mut self, calls: u32) -> Self {
        self.max_calls = calls;
        self
    }

    pub fn memory(mut self, bytes: u64) -> Self {
        self.memory = bytes;
        self
    }

    pub fn accelerator_type(mut self, model: impl Into<String>) -> Self {
        self.accelerator_type = Some(model.into());
        self
    }

    pub fn resource(mut self, name: impl Into<String>, quantity: f64) -> Self {
        self.resources.insert(name.into(), quantity);
        self
    }

    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    pub fn retry_exceptions(mut self, retry: bool) -> Self {
        self.retry_exceptions = retry;
        self
    }

    pub fn scheduling_strategy(mut self, strategy: SchedulingStrategy) -> Self {
        self.scheduling_strategy = strategy;
        self
    }

    /// Only on nodes whose label `key` matches `value` (see [`TaskOptions::label_selector`]).
    pub fn label_selector(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.label_selector.insert(key.into(), value.into());
        self
    }

    /// The strategy and label selectors as the node daemons read them; a selector that
    /// does not parse is refused here, naming it.
    pub fn wire_strategy(&self) -> ionet_common::IonetResult<WireStrategy> {
        let mut wire = match &self.scheduling_strategy {
            SchedulingStrategy::Default => WireStrategy::default(),
            SchedulingStrategy::Spread => WireStrategy { kind: SchedulingKind::Spread as i32, ..Default::default() },
            SchedulingStrategy::Cost => WireStrategy { kind: SchedulingKind::Cost as i32, ..Default::default() },
            SchedulingStrategy::NodeAffinity { node_id, soft } => WireStrategy {
                kind: SchedulingKind::NodeAffinity as i32,
                node_id: node_id.to_vec(),
                soft: *soft,
                ..Default::default()
            },
        };
        for (key, value) in &self.label_selector {
            let selector = ionet_scheduler::LabelSelector::from_ray(key, value)
                .map_err(|err| ionet_common::IonetError::InvalidArgument(format!("label_selector: {err}")))?;
            wire.label_selectors.push(selector.to_string());
        }
        Ok(wire)
    }

    /// Runs the task inside bundle `bundle_index` of `group`, on the bundle's node and from
    /// its reserved resources.
    pub fn placement_group(mut self, group: &PlacementGroup, bundle_index: u32) -> Self {
        self.placement_group = Some((group.id(), bundle_index));
        self
    }

    /// Runs the task inside any bundle of `group` with room (Ray's `bundle_index=-1`):
    /// the task's lease requests go to the group's bundles in turn, and the first bundle
    /// to grant one runs it.
    pub fn placement_group_any_bundle(mut self, group: &PlacementGroup) -> Self {
        self.placement_group = Some((group.id(), ANY_BUNDLE));
        self
    }

    /// The resource demand these options make.
    pub(crate) fn demand(&self) -> ionet_common::IonetResult<ionet_common::ResourceSet> {
        use ionet_common::resources::{Quantity, ACCELERATOR_PREFIX, CPU, GPU, MEMORY};
        let mut demand = ionet_common::ResourceSet::new()
            .with(CPU, Quantity::from_f64(self.num_cpus)?)
            .with(GPU, Quantity::from_f64(self.num_gpus)?)
            .with(MEMORY, Quantity::from_units((self.memory as i64).saturating_mul(ionet_common::resources::SCALE)));
        if self.num_gpus > 1.0 && self.num_gpus.fract() != 0.0 {
            return Err(ionet_common::IonetError::InvalidArgument(format!(
                "num_gpus {} must be whole above 1 (fractions share one GPU)",
                self.num_gpus
            )));
        }
        if let Some(model) = &self.accelerator_type {
            demand.set(format!("{ACCELERATOR_PREFIX}{model}"), Quantity::from_units(1));
        }
        for (name, quantity) in &self.resources {
            demand.set(name.clone(), Quantity::from_f64(*quantity)?);
        }
        Ok(demand)
    }
}
