//! `ionet quote`: the live node table turned into the scheduler's [`ClusterView`] and
//! priced by [`ionet_scheduler::quote`] against the built-in list prices. The decision
//! is the scheduler's; this file only fetches, converts and prints.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use ionet_common::resources::{format_usd, parse_usd};
use ionet_common::rpc::proto::common::NodeInfo;
use ionet_common::rpc::proto::gcs::GetAllNodesRequest;
use ionet_common::IonetError;
use ionet_scheduler::{ClusterView, PriceTable, Quote, QuoteRank, QuoteRequest};
use serde_json::{json, Value};

use crate::cli::QuoteArgs;
use crate::cluster_view::node_view;
use crate::commands::{resolve_head_address, resolve_reader_credential};
use crate::logging;
use crate::node_spec::parse_size;
use crate::session::SessionDir;

fn request(args: &QuoteArgs) -> Result<QuoteRequest> {
    Ok(QuoteRequest {
        gpus: args.gpus,
        gpu_type: args.gpu_type.clone(),
        min_gpu_memory_bytes: args.min_gpu_memory.as_deref().map(parse_size).transpose()?,
        region: args.region.clone(),
        max_price_per_gpu_hour: args
            .max_price
            .as_deref()
            .map(|text| parse_usd(text).map_err(|_| anyhow!("--max-price {text:?} is not a USD amount such as 2.0")))
            .transpose()?,
        hours: args.hours,
        rank: if args.rank == "per-tflop" { QuoteRank::PerTflop } else { QuoteRank::Price },
        min_reliability_bps: args
            .min_reliability
            .map(ionet_common::reliability::parse_share)
            .transpose()
            .map_err(|why| anyhow!("--min-reliability: {why}"))?,
    })
}

/// The cluster as the scheduler sees it; nodes it refuses are skipped with a warning.
fn cluster_view(nodes: &[NodeInfo]) -> ClusterView {
    let mut view = ClusterView::new();
    for node in nodes {
        let added = node_view(node).map_err(anyhow::Error::from).and_then(|v| view.upsert_node(v).map_err(Into::into));
        if let Err(err) = added {
            tracing::warn!(node = %hex::encode(&node.node_id), error = %err, "node left out of the quote");
        }
    }
    view
}

fn quote_json(quote: &Quote, addresses: &BTreeMap<Vec<u8>, String>) -> Value {
    json!({
        "gpus": quote.gpus,
        "hours": quote.hours,
        "placements": quote.placements.iter().map(|p| json!({
            "node_id": p.node_id.hex(),
            "node_id_short": p.node_id.short(),
            "address": addresses.get(p.node_id.as_bytes()).cloned().unwrap_or_default(),
            "gpus": p.gpus,
            "accelerator_type": p.accelerator_type,
            "region": p.region,
            "price_per_gpu_hour_micros": p.price_per_gpu_hour,
            "price_per_gpu_hour": format_usd(p.price_per_gpu_hour),
            "gpu_tflops": p.gpu_tflops_milli as f64 / 1000.0,
            "price_per_tflop_hour_micros": p.price_per_tflop_hour(),
            "reliability": f64::from(p.reliability_bps) / f64::from(ionet_common::reliability::FULL),
        })).collect::<Vec<_>>(),
        "rank": match quote.rank { QuoteRank::Price => "price", QuoteRank::PerTflop => "per-tflop" },
        "hourly_micros": quote.hourly,
        "hourly": format_usd(quote.hourly),
        "total_micros": quote.total,
        "total": format_usd(quote.total),
        "list_hourly_micros": quote.list_hourly,
        "list_total_micros": quote.list_total,
        "saving_micros": quote.saving,
        "saving_percent": quote.saving_percent(),
        "list_prices": quote.list_prices.iter().map(|l| json!({
            "model": l.model,
            "per_gpu_hour_micros": l.per_gpu_hour,
            "source": l.source,
            "as_of": l.as_of,
        })).collect::<Vec<_>>(),
    })
}

fn print_quote(quote: &Quote, addresses: &BTreeMap<Vec<u8>, String>) {
    println!(
        "{} GPU(s) for {} h: ${}/h, ${} in total",
        quote.gpus,
        quote.hours,
        format_usd(quote.hourly),
        format_usd(quote.total)
    );
    println!(
        "  {:<8}  {:<22}  {:>4}  {:<12}  {:>12}  {:<6}  {:>8}  {:>12}  {:>11}",
        "NODE", "ADDRESS", "GPUS", "TYPE", "USD/GPU-H", "REGION", "TFLOPS", "USD/TFLOP-H", "RELIABILITY"
    );
    for p in &quote.placements {
        let tflops =
            if p.gpu_tflops_milli > 0 { format!("{:.1}", p.gpu_tflops_milli as f64 / 1000.0) } else { "?".into() };
        let per_tflop =
            p.price_per_tflop_hour().map(|micros| format!("{:.4}", micros as f64 / 1e6)).unwrap_or("?".into());
        println!(
            "  {:<8}  {:<22}  {:>4}  {:<12}  {:>12}  {:<6}  {:>8}  {:>12}  {:>11}",
            p.node_id.short(),
            addresses.get(p.node_id.as_bytes()).map(String::as_str).unwrap_or("?"),
            p.gpus,
            p.accelerator_type.as_deref().unwrap_or("GPU"),
            format_usd(p.price_per_gpu_hour),
            p.region.as_deref().unwrap_or("-"),
            tflops,
            per_tflop,
            ionet_common::reliability::format(p.reliability_bps),
        );
    }
    match (quote.list_hourly, quote.list_total, quote.saving) {
        (Some(list_hourly), Some(list_total), Some(saving)) => {
            println!("on-demand list price: ${}/h, ${} in total", format_usd(list_hourly), format_usd(list_total));
            let percent = quote.saving_percent().map(|p| format!(" ({:.1}%)", p.abs())).unwrap_or_default();
            if saving >= 0 {
                println!("saving: ${}{percent}", format_usd(saving as u64));
            } else {
                println!("costs more than list by ${}{percent}", format_usd(saving.unsigned_abs()));
            }
            for list in &quote.list_prices {
                println!(
                    "  {}: ${}/GPU-h, {} (as of {})",
                    list.model,
                    format_usd(list.per_gpu_hour),
                    list.source,
                    list.as_of
                );
            }
        }
        _ => println!("no list price known for these GPU models"),
    }
}

/// `ionet quote`. A refusal is an error (exit code 1) whose message says what is short.
pub fn quote(args: QuoteArgs) -> Result<()> {
    logging::init_client();
    let request = request(&args)?;
    let session = SessionDir::resolve(args.head.session.temp_dir.as_deref());
    let address = resolve_head_address(args.head.address.as_deref(), &session)?;
    let credential = resolve_reader_credential(args.head.credential.as_deref(), &session)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let nodes = runtime.block_on(async {
        let mut client = ionet_common::rpc::gcs_client(&address, &credential).await?;
        let reply = client.get_all_nodes(GetAllNodesRequest { include_dead: false, ..Default::default() }).await?;
        Ok::<_, IonetError>(reply.into_inner().nodes)
    })?;
    let addresses: BTreeMap<Vec<u8>, String> =
        nodes.iter().map(|node| (node.node_id.clone(), node.address.clone())).collect();
    let quote = ionet_scheduler::quote(&cluster_view(&nodes), request, &PriceTable::builtin())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&quote_json(&quote, &addresses))?);
    } else {
        print_quote(&quote, &addresses);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ionet_common::resources::{Quantity, ResourceSet, GPU};
    use ionet_common::NodeId;

    #[test]
    fn the_live_table_prices_like_the_scheduler() {
        let node = |price: &str, region: &str| {
            let total = ResourceSet::new().with(GPU, Quantity::whole(4));
            NodeInfo {
                node_id: NodeId::random().to_vec(),
                address: "127.0.0.1:1".into(),
                total: Some((&total).into()),
                available: Some((&total).into()),
                accelerator_type: "A100-80GB".into(),
                price_per_gpu_hour_micros: parse_usd(price).unwrap(),
                labels: [("region".to_string(), region.to_string())].into(),
                state: ionet_common::rpc::proto::common::NodeState::Alive as i32,
                ..Default::default()
            }
        };
        let nodes = [node("1.20", "eu"), node("0.90", "us")];
        let ask = QuoteRequest {
            gpus: 6,
            gpu_type: Some("A100-80GB".into()),
            min_gpu_memory_bytes: None,
            region: None,
            max_price_per_gpu_hour: None,
            hours: 24.0,
            rank: QuoteRank::Price,
            min_reliability_bps: None,
        };
        let priced = ionet_scheduler::quote(&cluster_view(&nodes), ask, &PriceTable::builtin()).unwrap();
        assert_eq!(priced.hourly, 6_000_000);
        assert_eq!(priced.total, 144_000_000);
    }
}
