//! Price quotes: the cheapest way to get `n` GPUs now, and what it saves against list price.
//!
//! A quote fills the cheapest matching nodes first with their free whole GPUs (ties: the node
//! with more free GPUs, so the job spans fewer nodes, then node id). Free whole GPUs are
//! `floor(available GPU)`: a node whose GPUs are partly shared offers only what is whole.

use std::collections::BTreeMap;
use std::fmt;

use ionet_common::resources::{format_usd, parse_usd, MicroUsd, GPU, SCALE};
use ionet_common::NodeId;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cluster::ClusterView;
use crate::error::{SchedulerError, SchedulerResult};
use crate::node::NodeView;

/// The list-price table shipped with the crate.
pub const DEFAULT_PRICE_TABLE: &str = include_str!("../data/gpu-list-prices.toml");

/// One on-demand list price.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ListPrice {
    pub model: String,
    pub per_gpu_hour: MicroUsd,
    /// Provider and instance the figure comes from.
    pub source: String,
    /// When it was taken, as written in the table.
    pub as_of: String,
}

/// On-demand list prices by GPU model. Lookups ignore case and punctuation
/// (`a100 80gb` finds `A100-80GB`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PriceTable {
    by_model: BTreeMap<String, ListPrice>,
}

#[derive(Deserialize)]
struct PriceFile {
    gpu: Vec<PriceFileEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFileEntry {
    model: String,
    usd_per_gpu_hour: String,
    source: String,
    as_of: String,
}

fn model_key(model: &str) -> String {
    model.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_uppercase()).collect()
}

impl PriceTable {
    /// The table in `data/gpu-list-prices.toml`.
    pub fn builtin() -> Self {
        Self::from_toml(DEFAULT_PRICE_TABLE).expect("the shipped price table parses (tested)")
    }

    pub fn from_toml(text: &str) -> SchedulerResult<Self> {
        let file: PriceFile = toml::from_str(text).map_err(|err| SchedulerError::PriceTable(err.to_string()))?;
        let mut by_model = BTreeMap::new();
        for entry in file.gpu {
            let per_gpu_hour = parse_usd(&entry.usd_per_gpu_hour)
                .map_err(|err| SchedulerError::PriceTable(format!("model {}: {err}", entry.model)))?;
            let price = ListPrice { model: entry.model, per_gpu_hour, source: entry.source, as_of: entry.as_of };
            if by_model.insert(model_key(&price.model), price.clone()).is_some() {
                return Err(SchedulerError::PriceTable(format!("model {} is listed twice", price.model)));
            }
        }
        Ok(Self { by_model })
    }

    pub fn get(&self, model: &str) -> Option<&ListPrice> {
        self.by_model.get(&model_key(model))
    }

    pub fn iter(&self) -> impl Iterator<Item = &ListPrice> {
        self.by_model.values()
    }
}

/// What `ionet quote` asks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuoteRequest {
    pub gpus: u32,
    /// GPU model, e.g. `A100-80GB`; any model when `None`.
    pub gpu_type: Option<String>,
    pub min_gpu_memory_bytes: Option<u64>,
    /// Matches the node label `region`.
    pub region: Option<String>,
    pub max_price_per_gpu_hour: Option<MicroUsd>,
    /// How long the GPUs are wanted; fractions allowed (priced to the milli-hour).
    pub hours: f64,
    /// What "cheapest" means.
    #[serde(default)]
    pub rank: QuoteRank,
    /// Only nodes whose reliability score is at least this, in basis points.
    #[serde(default)]
    pub min_reliability_bps: Option<u32>,
}

/// How a quote ranks GPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum QuoteRank {
    /// Lowest price per GPU-hour first.
    #[default]
    Price,
    /// Lowest price per TFLOP-hour first (price per GPU-hour over the GPU's FP32 TFLOPS,
    /// as measured by the head's check): a slower GPU that is cheaper still for the work
    /// it does comes first. GPUs of unknown speed come last.
    PerTflop,
}

/// GPUs taken from one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotePlacement {
    pub node_id: NodeId,
    pub accelerator_type: Option<String>,
    pub region: Option<String>,
    pub gpus: u32,
    pub price_per_gpu_hour: MicroUsd,
    /// The node's per-GPU FP32 TFLOPS in thousandths (0: unknown).
    pub gpu_tflops_milli: u64,
    /// The head's reliability score of the node, in basis points.
    pub reliability_bps: u32,
}

impl QuotePlacement {
    /// Micro-USD per TFLOP-hour, if the speed is known.
    pub fn price_per_tflop_hour(&self) -> Option<MicroUsd> {
        crate::node::price_per_tflop_hour(self.price_per_gpu_hour, self.gpu_tflops_milli)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Quote {
    /// Cheapest node first.
    pub placements: Vec<QuotePlacement>,
    pub gpus: u32,
    pub hours: f64,
    /// How the placements were ranked.
    pub rank: QuoteRank,
    /// Sum over placements of GPUs × price per GPU-hour.
    pub hourly: MicroUsd,
    pub total: MicroUsd,
    /// The same GPUs at on-demand list price; `None` when a model is not in the table.
    pub list_hourly: Option<MicroUsd>,
    pub list_total: Option<MicroUsd>,
    /// `list_total - total` (negative when the cluster is dearer than list).
    pub saving: Option<i64>,
    /// The list prices used.
    pub list_prices: Vec<ListPrice>,
}

impl Quote {
    /// Saving as a share of the list total, in percent (one decimal).
    pub fn saving_percent(&self) -> Option<f64> {
        let (saving, list) = (self.saving?, self.list_total?);
        (list > 0).then(|| (saving as f64 * 1000.0 / list as f64).round() / 10.0)
    }
}

impl fmt::Display for Quote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} GPUs for {} h: ${}/h, ${} in total",
            self.gpus,
            self.hours,
            format_usd(self.hourly),
            format_usd(self.total)
        )?;
        for placement in &self.placements {
            writeln!(
                f,
                "  node {}: {} x {} at ${}/GPU-h{}",
                placement.node_id.short(),
                placement.gpus,
                placement.accelerator_type.as_deref().unwrap_or("GPU"),
                format_usd(placement.price_per_gpu_hour),
                placement.region.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
            )?;
        }
        match (self.list_total, self.saving, self.saving_percent()) {
            (Some(list), Some(saving), percent) => {
                let (word, amount) =
                    if saving >= 0 { ("saves", saving as u64) } else { ("costs more by", saving.unsigned_abs()) };
                write!(
                    f,
                    "on-demand list price ${}: {word} ${}{}",
                    format_usd(list),
                    format_usd(amount),
                    percent.map(|p| format!(" ({:.1}%)", p.abs())).unwrap_or_default()
                )?;
                for price in &self.list_prices {
                    write!(
                        f,
                        "\n  {}: ${}/GPU-h, {} (as of {})",
                        price.model,
                        format_usd(price.per_gpu_hour),
                        price.source,
                        price.as_of
                    )?;
                }
                Ok(())
            }
            _ => write!(f, "no list price known for these GPU models"),
        }
    }
}

/// Why there is no quote.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum QuoteRefusal {
    /// Not enough matching GPUs are free now; the counts say what is short.
    #[error("{message}")]
    NotEnoughGpus {
        asked: u32,
        /// Free whole GPUs on alive nodes that match every condition.
        matching_available: u32,
        /// GPUs on those nodes that exist but are in use.
        matching_busy: u32,
        /// Free GPUs that match everything but the price cap.
        available_above_price: u32,
        message: String,
    },
    #[error("invalid quote request: {0}")]
    InvalidRequest(String),
}

fn whole_gpus(quantity: ionet_common::Quantity) -> u32 {
    (quantity.units().max(0) / SCALE) as u32
}

/// Quotes the cheapest placement of `request.gpus` GPUs on the cluster as it is now.
pub fn quote(view: &ClusterView, request: QuoteRequest, prices: &PriceTable) -> Result<Quote, QuoteRefusal> {
    if request.gpus == 0 {
        return Err(QuoteRefusal::InvalidRequest("asked for 0 GPUs; ask for at least 1".into()));
    }
    if !request.hours.is_finite() || request.hours <= 0.0 || request.hours > 1e9 {
        return Err(QuoteRefusal::InvalidRequest(format!("hours must be a positive number, got {}", request.hours)));
    }
    let matches_except_price = |node: &NodeView| {
        request.min_gpu_memory_bytes.is_none_or(|min| node.min_gpu_memory_bytes().is_some_and(|have| have >= min))
            && request.region.as_ref().is_none_or(|region| node.labels.get("region") == Some(region))
            && request.min_reliability_bps.is_none_or(|min| node.reliability_bps >= min)
    };
    let within_price =
        |node: &NodeView| request.max_price_per_gpu_hour.is_none_or(|max| node.price_per_gpu_hour <= max);
    let mut candidates: Vec<(&NodeView, u32)> = Vec::new();
    let (mut busy, mut above_price) = (0u32, 0u32);
    for node in view.alive_nodes_of(request.gpu_type.as_deref()) {
        if !matches_except_price(node) {
            continue;
        }
        let free = whole_gpus(node.available.get(GPU));
        if within_price(node) {
            busy += whole_gpus(node.total.get(GPU)).saturating_sub(free);
            if free > 0 {
                candidates.push((node, free));
            }
        } else {
            above_price += free;
        }
    }
    candidates.sort_by(|(a, a_free), (b, b_free)| {
        let first = match request.rank {
            QuoteRank::Price => a.price_per_gpu_hour.cmp(&b.price_per_gpu_hour),
            // a.price / a.tflops against b.price / b.tflops, crosswise; unknown speed last.
            QuoteRank::PerTflop => (a.gpu_tflops_milli == 0).cmp(&(b.gpu_tflops_milli == 0)).then(
                (a.price_per_gpu_hour as u128 * b.gpu_tflops_milli as u128)
                    .cmp(&(b.price_per_gpu_hour as u128 * a.gpu_tflops_milli as u128)),
            ),
        };
        first
            .then(a.price_per_gpu_hour.cmp(&b.price_per_gpu_hour))
            .then(b_free.cmp(a_free))
            .then(a.node_id.cmp(&b.node_id))
    });
    let available: u32 = candidates.iter().map(|(_, free)| *free).sum();
    if available < request.gpus {
        return Err(refusal(&request, available, busy, above_price));
    }
    let mut placements = Vec::new();
    let mut wanted = request.gpus;
    for (node, free) in candidates {
        if wanted == 0 {
            break;
        }
        let take = free.min(wanted);
        wanted -= take;
        placements.push(QuotePlacement {
            node_id: node.node_id,
            accelerator_type: node.accelerator().map(str::to_string),
            region: node.labels.get("region").cloned(),
            gpus: take,
            price_per_gpu_hour: node.price_per_gpu_hour,
            gpu_tflops_milli: node.gpu_tflops_milli,
            reliability_bps: node.reliability_bps,
        });
    }
    let millihours = (request.hours * 1000.0).round() as u128;
    let for_hours = |hourly: MicroUsd| (hourly as u128 * millihours / 1000) as MicroUsd;
    let hourly: MicroUsd = placements.iter().map(|p| p.gpus as MicroUsd * p.price_per_gpu_hour).sum();
    let mut list_prices: Vec<ListPrice> = Vec::new();
    let mut list_hourly: Option<MicroUsd> = Some(0);
    for placement in &placements {
        let list = placement.accelerator_type.as_deref().and_then(|model| prices.get(model));
        match list {
            Some(list) => {
                list_hourly = list_hourly.map(|sum| sum + placement.gpus as MicroUsd * list.per_gpu_hour);
                if !list_prices.contains(list) {
                    list_prices.push(list.clone());
                }
            }
            None => list_hourly = None,
        }
    }
    let total = for_hours(hourly);
    let list_total = list_hourly.map(for_hours);
    Ok(Quote {
        placements,
        gpus: request.gpus,
        hours: request.hours,
        rank: request.rank,
        hourly,
        total,
        list_hourly,
        list_total,
        saving: list_total.map(|list| list as i64 - total as i64),
        list_prices,
    })
}

fn refusal(request: &QuoteRequest, available: u32, busy: u32, above_price: u32) -> QuoteRefusal {
    let mut ask = format!(
        "asked for {} {}GPU{}",
        request.gpus,
        request.gpu_type.as_deref().map(|model| format!("{model} ")).unwrap_or_default(),
        if request.gpus == 1 { "" } else { "s" }
    );
    if let Some(min) = request.min_gpu_memory_bytes {
        ask.push_str(&format!(" with at least {} GiB each", min >> 30));
    }
    if let Some(region) = &request.region {
        ask.push_str(&format!(" in region {region}"));
    }
    if let Some(min) = request.min_reliability_bps {
        ask.push_str(&format!(" on nodes of reliability >= {}", ionet_common::reliability::format(min)));
    }
    let cap = request.max_price_per_gpu_hour.map(|max| format!("${}/GPU-h", format_usd(max)));
    if let Some(cap) = &cap {
        ask.push_str(&format!(" at most {cap}"));
    }
    let mut notes = Vec::new();
    if busy > 0 {
        notes.push(format!("{busy} more exist but are busy"));
    }
    if above_price > 0 {
        if let Some(cap) = &cap {
            notes.push(format!("{above_price} more are available above {cap}"));
        }
    }
    let notes = if notes.is_empty() { String::new() } else { format!(" ({})", notes.join("; ")) };
    let message = format!("{ask}; the cluster has {available} available that match{notes}");
    QuoteRefusal::NotEnoughGpus {
        asked: request.gpus,
        matching_available: available,
        matching_busy: busy,
        available_above_price: above_price,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    fn cluster() -> ClusterView {
        let mut view = ClusterView::new();
        for node in [
            gpu_node(1, 32, "A100-80GB", 8, 190).with_label("region", "eu"),
            gpu_node(2, 32, "A100-80GB", 4, 150).with_label("region", "eu"),
            gpu_node(3, 32, "A100-80GB", 8, 140).with_label("region", "us"),
            gpu_node(4, 32, "A100-80GB", 2, 250).with_label("region", "eu"),
            gpu_node(5, 32, "RTX4090", 4, 40).with_label("region", "eu"),
        ] {
            view.upsert_node(node).unwrap();
        }
        view
    }

    fn request(gpus: u32) -> QuoteRequest {
        QuoteRequest {
            gpus,
            gpu_type: Some("A100-80GB".into()),
            min_gpu_memory_bytes: None,
            region: Some("eu".into()),
            max_price_per_gpu_hour: None,
            hours: 2.0,
            rank: QuoteRank::Price,
            min_reliability_bps: None,
        }
    }

    /// A node whose GPUs measured `tflops` each.
    fn measured(n: u32, model: &str, price_usd_cents: u64, tflops: f64) -> NodeView {
        let mut node = gpu_node(n, 16, model, 4, price_usd_cents);
        node.gpu_tflops_milli = (tflops * 1000.0) as u64;
        node
    }

    #[test]
    fn ranked_per_tflop_a_slower_gpu_that_is_cheaper_for_its_work_comes_first() {
        let mut view = ClusterView::new();
        // A T4 at $0.10 does 8.1 TFLOPS ($0.0123 per TFLOP-hour); an H100 at $2.10 does 67
        // ($0.0313); an A100 at $0.60 does 19.5 ($0.0308); a node of unknown speed at $0.05.
        for node in [
            measured(1, "H100", 210, 67.0),
            measured(2, "T4", 10, 8.1),
            measured(3, "A100-80GB", 60, 19.5),
            measured(4, "L4", 5, 0.0),
        ] {
            view.upsert_node(node).unwrap();
        }
        let ask = |gpus: u32, rank: QuoteRank| {
            let request = QuoteRequest { gpu_type: None, region: None, rank, ..request(gpus) };
            let quote = quote(&view, request, &PriceTable::builtin()).unwrap();
            quote.placements.iter().map(|p| p.accelerator_type.clone().unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(ask(4, QuoteRank::PerTflop), ["T4"], "slower but cheaper per TFLOP-hour");
        assert_eq!(ask(12, QuoteRank::PerTflop), ["T4", "A100-80GB", "H100"], "then by price per TFLOP-hour");
        assert_eq!(ask(16, QuoteRank::PerTflop).last().unwrap(), "L4", "unknown speed last");
        // By price alone the A100 comes after the unknown L4, and the H100 last.
        assert_eq!(ask(16, QuoteRank::Price), ["L4", "T4", "A100-80GB", "H100"]);
        let view_quote = quote(
            &view,
            QuoteRequest { gpu_type: None, region: None, rank: QuoteRank::PerTflop, ..request(4) },
            &PriceTable::builtin(),
        )
        .unwrap();
        assert_eq!(view_quote.placements[0].price_per_tflop_hour(), Some(12_345), "$0.10 / 8.1 TFLOPS");
    }

    #[test]
    fn a_minimum_reliability_leaves_out_nodes_that_score_below_it() {
        let mut view = cluster();
        let mut flaky = view.node(&id(2)).unwrap().clone();
        flaky.reliability_bps = 6_000;
        view.upsert_node(flaky).unwrap();
        let all = quote(&view, request(4), &PriceTable::builtin()).unwrap();
        assert_eq!((all.placements[0].node_id, all.placements[0].reliability_bps), (id(2), 6_000), "the cheapest");
        let ask = QuoteRequest { min_reliability_bps: Some(9_000), ..request(4) };
        let reliable = quote(&view, ask.clone(), &PriceTable::builtin()).unwrap();
        assert!(reliable.placements.iter().all(|p| p.node_id != id(2) && p.reliability_bps == 10_000), "{reliable:?}");
        let refusal = quote(&view, QuoteRequest { gpus: 12, ..ask }, &PriceTable::builtin()).unwrap_err();
        assert!(refusal.to_string().contains("on nodes of reliability >= 0.90"), "{refusal}");
    }

    #[test]
    fn the_shipped_table_has_every_required_model() {
        let table = PriceTable::builtin();
        for model in ["A100-80GB", "A100-40GB", "H100", "L40S", "A10G", "RTX4090", "RTX3090", "V100", "T4"] {
            let price = table.get(model).unwrap_or_else(|| panic!("{model} missing"));
            assert!(price.per_gpu_hour > 0 && !price.source.is_empty() && !price.as_of.is_empty());
        }
        assert_eq!(table.get("a100 80gb").unwrap().model, "A100-80GB");
        assert!(PriceTable::from_toml(
            "[[gpu]]\nmodel = \"X\"\nusd_per_gpu_hour = \"abc\"\nsource = \"s\"\nas_of = \"d\""
        )
        .is_err());
    }

    #[test]
    fn fills_the_cheapest_nodes_first() {
        let quote = quote(&cluster(), request(10), &PriceTable::builtin()).unwrap();
        let taken: Vec<(NodeId, u32)> = quote.placements.iter().map(|p| (p.node_id, p.gpus)).collect();
        assert_eq!(taken, vec![(id(2), 4), (id(1), 6)]);
        assert_eq!(quote.hourly, 4 * 1_500_000 + 6 * 1_900_000);
        assert_eq!(quote.total, 2 * quote.hourly);
        assert_eq!(quote.list_hourly, Some(10 * 5_120_000));
        assert_eq!(quote.saving, Some(2 * (51_200_000 - 17_400_000)));
        let text = quote.to_string();
        assert!(text.contains("$17.40/h") && text.contains("AWS p4de.24xlarge"), "{text}");
    }

    #[test]
    fn refusals_say_what_is_short() {
        let mut view = cluster();
        view.allocate(&id(1), &gpus(0, "2")).unwrap();
        let mut ask = request(12);
        ask.max_price_per_gpu_hour = Some(2_000_000);
        let refusal = quote(&view, ask, &PriceTable::builtin()).unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "asked for 12 A100-80GB GPUs in region eu at most $2.00/GPU-h; the cluster has 10 \
             available that match (2 more exist but are busy; 2 more are available above $2.00/GPU-h)"
        );
        let mut ask = request(11);
        ask.max_price_per_gpu_hour = Some(2_000_000);
        let QuoteRefusal::NotEnoughGpus { matching_available, matching_busy, available_above_price, .. } =
            quote(&view, ask, &PriceTable::builtin()).unwrap_err()
        else {
            panic!()
        };
        assert_eq!((matching_available, matching_busy, available_above_price), (10, 2, 2));
        assert!(matches!(quote(&view, request(0), &PriceTable::builtin()), Err(QuoteRefusal::InvalidRequest(_))));
    }

    #[test]
    fn any_model_and_memory_filters() {
        let mut ask = request(4);
        ask.gpu_type = None;
        let cheapest = quote(&cluster(), ask.clone(), &PriceTable::builtin()).unwrap();
        assert_eq!(cheapest.placements[0].accelerator_type.as_deref(), Some("RTX4090"));
        ask.min_gpu_memory_bytes = Some(40 * GIB);
        let big = quote(&cluster(), ask, &PriceTable::builtin()).unwrap();
        assert_eq!(big.placements[0].node_id, id(2));
    }
}
