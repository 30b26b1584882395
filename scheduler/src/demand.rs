//! A resource demand with its placement constraints.

use std::fmt;

use ionet_common::resources::{ACCELERATOR_PREFIX, GPU};
use ionet_common::{Quantity, ResourceSet};

use crate::error::SchedulerResult;
use crate::labels::LabelSelector;
use crate::node::{NodeState, NodeView};

/// What a task, actor or bundle needs: resources it consumes plus constraints on the node.
///
/// `accelerator_type:<model>` entries are constraints, not consumables: [`Demand::new`] moves
/// them into `accelerator_type`, so two tasks asking for the same model can share a node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    /// Consumed while the work runs.
    pub resources: ResourceSet,
    /// The node's GPU model must be this one.
    pub accelerator_type: Option<String>,
    /// Every GPU of the node must have at least this much memory.
    pub min_gpu_memory_per_gpu: Option<u64>,
    /// Every selector must match the node's labels.
    pub label_selectors: Vec<LabelSelector>,
    /// The node's reliability score must be at least this, in basis points.
    pub min_reliability_bps: Option<u32>,
}

impl Demand {
    /// A demand for `resources`; an `accelerator_type:<model>` entry becomes the accelerator
    /// constraint.
    pub fn new(resources: ResourceSet) -> Self {
        let (resources, accelerator_type) = split_accelerator(resources);
        Self { resources, accelerator_type, ..Self::default() }
    }

    pub fn with_accelerator_type(mut self, model: impl Into<String>) -> Self {
        self.accelerator_type = Some(model.into());
        self
    }

    pub fn with_min_gpu_memory_per_gpu(mut self, bytes: u64) -> Self {
        self.min_gpu_memory_per_gpu = Some(bytes);
        self
    }

    pub fn with_min_reliability_bps(mut self, bps: u32) -> Self {
        self.min_reliability_bps = Some(bps);
        self
    }

    pub fn with_label_selector(mut self, selector: LabelSelector) -> Self {
        self.label_selectors.push(selector);
        self
    }

    /// Parses and adds selectors such as `"region in (eu, us)"`.
    pub fn with_label_selectors<S: AsRef<str>>(
        mut self,
        selectors: impl IntoIterator<Item = S>,
    ) -> SchedulerResult<Self> {
        for text in selectors {
            self.label_selectors.push(LabelSelector::parse(text.as_ref())?);
        }
        Ok(self)
    }

    pub fn gpus(&self) -> Quantity {
        self.resources.get(GPU)
    }

    /// The constraints alone: node state is not checked here.
    pub fn fits_constraints(&self, node: &NodeView) -> bool {
        if let Some(model) = &self.accelerator_type {
            if node.accelerator() != Some(model.as_str()) {
                return false;
            }
        }
        if let Some(min) = self.min_gpu_memory_per_gpu {
            if node.min_gpu_memory_bytes().is_none_or(|have| have < min) {
                return false;
            }
        }
        if self.min_reliability_bps.is_some_and(|min| node.reliability_bps < min) {
            return false;
        }
        self.label_selectors.iter().all(|selector| selector.matches(&node.labels))
    }

    /// Whether an alive `node` can take this demand with what it has free now.
    pub fn fits_now(&self, node: &NodeView) -> bool {
        node.state == NodeState::Alive && node.available.contains(&self.resources) && self.fits_constraints(node)
    }

    /// Whether an alive `node` could take this demand once idle.
    pub fn fits_when_idle(&self, node: &NodeView) -> bool {
        node.state == NodeState::Alive && node.total.contains(&self.resources) && self.fits_constraints(node)
    }
}

impl From<ResourceSet> for Demand {
    fn from(resources: ResourceSet) -> Self {
        Demand::new(resources)
    }
}

impl fmt::Display for Demand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.resources)?;
        if let Some(model) = &self.accelerator_type {
            write!(f, " on {model}")?;
        }
        if let Some(bytes) = self.min_gpu_memory_per_gpu {
            write!(f, " with >= {} GiB per GPU", bytes as f64 / (1u64 << 30) as f64)?;
        }
        if !self.label_selectors.is_empty() {
            let selectors: Vec<String> = self.label_selectors.iter().map(|s| s.to_string()).collect();
            write!(f, " where {}", selectors.join(" and "))?;
        }
        if let Some(min) = self.min_reliability_bps {
            write!(f, " on nodes of reliability >= {}", ionet_common::reliability::format(min))?;
        }
        Ok(())
    }
}

/// Moves `accelerator_type:<model>` entries out of a resource set.
pub(crate) fn split_accelerator(resources: ResourceSet) -> (ResourceSet, Option<String>) {
    let mut consumed = ResourceSet::new();
    let mut accelerator = None;
    for (name, quantity) in resources.iter() {
        match name.strip_prefix(ACCELERATOR_PREFIX) {
            Some(model) => accelerator = Some(model.to_string()),
            None => consumed.set(name, quantity),
        }
    }
    (consumed, accelerator)
}
