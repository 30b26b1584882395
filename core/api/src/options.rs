//! Per-call options of remote functions, with Ray's names.

use std::collections::BTreeMap;

use ionet_common::rpc::proto::node::{SchedulingKind, SchedulingStrategy as WireStrategy};
use ionet_common::{NodeId, PlacementGroupId};

use crate::cluster_info::PlacementGroup;

pub use ionet_common::lease::ANY_BUNDLE;

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
    /// On the node that fits whose GPUs are cheapest for the work they do: price per
    /// TFLOP-hour, the head's measured speed (published figures for simulated GPUs).
    CostPerTflop,
}

impl std::str::FromStr for SchedulingStrategy {
    type Err = ionet_common::IonetError;

    /// A strategy by its text, the one grammar Rust and Python share: `DEFAULT`, `SPREAD`,
    /// `COST`, `COST_PER_TFLOP` (any case), `node:<hex id>` (only that node) or `node:<hex id>:soft`
    /// (elsewhere when it cannot). [`Display`](std::fmt::Display) writes the same forms.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |why: String| ionet_common::IonetError::InvalidArgument(why);
        if let Some(rest) = text.strip_prefix("node:") {
            let (id, soft) = match rest.split_once(':') {
                Some((id, "soft")) => (id, true),
                Some((_, other)) => {
                    return Err(invalid(format!("scheduling strategy {text:?}: {other:?} is not \"soft\"")))
                }
                None => (rest, false),
            };
            let node_id = id.parse().map_err(|err| invalid(format!("scheduling strategy {text:?}: {err}")))?;
            return Ok(SchedulingStrategy::NodeAffinity { node_id, soft });
        }
        match text.to_ascii_uppercase().as_str() {
            "DEFAULT" => Ok(SchedulingStrategy::Default),
            "SPREAD" => Ok(SchedulingStrategy::Spread),
            "COST" => Ok(SchedulingStrategy::Cost),
            "COST_PER_TFLOP" => Ok(SchedulingStrategy::CostPerTflop),
            _ => Err(invalid(format!(
                "unknown scheduling strategy {text:?} (DEFAULT, SPREAD, COST, COST_PER_TFLOP, node:<id> or \
                 node:<id>:soft)"
            ))),
        }
    }
}

impl std::fmt::Display for SchedulingStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SchedulingStrategy::Default => f.write_str("DEFAULT"),
            SchedulingStrategy::Spread => f.write_str("SPREAD"),
            SchedulingStrategy::Cost => f.write_str("COST"),
            SchedulingStrategy::CostPerTflop => f.write_str("COST_PER_TFLOP"),
            SchedulingStrategy::NodeAffinity { node_id, soft: false } => write!(f, "node:{}", node_id.hex()),
            SchedulingStrategy::NodeAffinity { node_id, soft: true } => write!(f, "node:{}:soft", node_id.hex()),
        }
    }
}

/// Ray's retry count: `-1` retries for ever ([`u32::MAX`]), `n >= 0` that many times.
pub fn retries_from_ray(retries: i64) -> ionet_common::IonetResult<u32> {
    match retries {
        -1 => Ok(u32::MAX),
        0.. => Ok(u32::try_from(retries).unwrap_or(u32::MAX)),
        _ => Err(ionet_common::IonetError::InvalidArgument(format!(
            "max_retries must be -1 (retry for ever) or at least 0, got {retries}"
        ))),
    }
}

/// Ray's bundle index: `-1` is any bundle of the group ([`ANY_BUNDLE`]).
pub fn bundle_from_ray(index: i64) -> ionet_common::IonetResult<u32> {
    match index {
        -1 => Ok(ANY_BUNDLE),
        0.. => u32::try_from(index)
            .ok()
            .filter(|&index| index != ANY_BUNDLE)
            .ok_or_else(|| ionet_common::IonetError::InvalidArgument(format!("bundle index {index} is too large"))),
        _ => Err(ionet_common::IonetError::InvalidArgument(format!(
            "placement_group_bundle_index must be -1 (any bundle) or an index, got {index}"
        ))),
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
    /// Ray's `runtime_env` of this task or actor, over its job's (and inherited by what it
    /// starts): `env_vars` (merged, its own winning) and `pip` / `uv` requirements
    /// (replacing the job's). Its workers run inside it and serve nothing else.
    pub runtime_env: Option<serde_json::Value>,
    /// What the state API and the timeline call the task (Ray's task `name`; default:
    /// its function's).
    pub name: Option<String>,
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
            runtime_env: None,
            name: None,
        }
    }
}

impl TaskOptions {
    /// See [`TaskOptions::name`].
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// See [`TaskOptions::runtime_env`] (e.g. `json!({"env_vars": {"MODE": "eval"}})`).
    pub fn runtime_env(mut self, runtime_env: serde_json::Value) -> Self {
        self.runtime_env = Some(runtime_env);
        self
    }

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
            SchedulingStrategy::CostPerTflop => {
                WireStrategy { kind: SchedulingKind::CostPerTflop as i32, ..Default::default() }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn strategies() -> impl Strategy<Value = SchedulingStrategy> {
        prop_oneof![
            Just(SchedulingStrategy::Default),
            Just(SchedulingStrategy::Spread),
            Just(SchedulingStrategy::Cost),
            Just(SchedulingStrategy::CostPerTflop),
            (any::<[u8; 28]>(), any::<bool>()).prop_map(|(id, soft)| SchedulingStrategy::NodeAffinity {
                node_id: NodeId::from_bytes(&id).unwrap(),
                soft
            }),
        ]
    }

    proptest! {
        /// Every strategy's text parses back to it: Python sends that text, Rust users
        /// may write it, and both go through the one parser.
        #[test]
        fn a_strategy_survives_its_text(strategy in strategies()) {
            prop_assert_eq!(strategy.to_string().parse::<SchedulingStrategy>().unwrap(), strategy);
        }
    }

    #[test]
    fn malformed_strategies_are_refused_naming_them() {
        for text in ["cheapest", "node:", "node:zz", "node:ab:hard", ""] {
            match text.parse::<SchedulingStrategy>() {
                Err(ionet_common::IonetError::InvalidArgument(message)) => assert!(message.contains(text), "{message}"),
                other => panic!("{text:?} must be refused, got {other:?}"),
            }
        }
        assert_eq!("spread".parse::<SchedulingStrategy>().unwrap(), SchedulingStrategy::Spread);
    }

    #[test]
    fn ray_counts_convert() {
        assert_eq!(retries_from_ray(-1).unwrap(), u32::MAX);
        assert_eq!(retries_from_ray(3).unwrap(), 3);
        assert!(retries_from_ray(-2).is_err());
        assert_eq!(bundle_from_ray(-1).unwrap(), ANY_BUNDLE);
        assert_eq!(bundle_from_ray(2).unwrap(), 2);
        assert!(bundle_from_ray(-5).is_err());
        assert!(bundle_from_ray(i64::from(u32::MAX)).is_err());
    }
}
