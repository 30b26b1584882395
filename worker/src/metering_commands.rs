//! `ionet usage`, `ionet job cost`, `ionet ledger balances`, `ionet settle`, `ionet
//! earnings` and `ionet credits add|refund`: thin clients of the head's metering service. Amounts travel
//! as integer micro-USD and are shown as USD; `--json` prints both.

use anyhow::{anyhow, bail, Result};
use ionet_common::resources::{format_usd, parse_usd, ResourceSet};
use ionet_common::rpc::proto::metering::*;
use ionet_common::rpc::MeteringClient;
use ionet_common::{IonetError, JobId, NodeId};
use serde_json::{json, Value};

use crate::cli::{
    BalancesArgs, CreditsAddArgs, CreditsRefundArgs, DepositsArgs, EarningsArgs, HeadArgs, JobCostArgs, PayoutsArgs,
    SettleArgs, UsageArgs,
};
use crate::commands::{resolve_admin_credential, resolve_head_address, resolve_reader_credential};
use crate::logging;
use crate::session::SessionDir;

/// Who a metering command speaks as.
#[derive(Clone, Copy, PartialEq, Eq)]
enum As {
    /// A reader (an API key, or the operator's credential): usage and balances.
    Reader,
    /// The operator (the admin credential): moving money.
    Admin,
}

/// Runs `call` against the head's metering service, on a runtime of its own.
fn with_metering<T>(
    head: &HeadArgs,
    role: As,
    call: impl AsyncFnOnce(MeteringClient) -> Result<T, tonic::Status>,
) -> Result<T> {
    logging::init_client();
    let session = SessionDir::resolve(head.session.temp_dir.as_deref());
    let address = resolve_head_address(head.address.as_deref(), &session)?;
    let credential = match role {
        As::Reader => resolve_reader_credential(head.credential.as_deref(), &session)?,
        As::Admin => resolve_admin_credential(head.credential.as_deref(), &session)?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime
        .block_on(async {
            let client = ionet_common::rpc::metering_client(&address, &credential).await?;
            call(client).await.map_err(IonetError::from)
        })
        .map_err(Into::into)
}

/// USD with a sign, e.g. `-12.50`.
fn signed_usd(micros: i64) -> String {
    let text = format_usd(micros.unsigned_abs());
    if micros < 0 {
        format!("-{text}")
    } else {
        text
    }
}

fn short_hex(bytes: &[u8]) -> String {
    let mut text = hex::encode(bytes);
    text.truncate(8);
    text
}

fn resources_of(record: &UsageRecord) -> ResourceSet {
    record.resources.clone().unwrap_or_default().to_set().unwrap_or_default()
}

fn record_json(record: &UsageRecord) -> Value {
    let resources = resources_of(record);
    json!({
        "record_id": record.record_id,
        "lease_id": hex::encode(&record.lease_id),
        "job_id": hex::encode(&record.job_id),
        "payer_account": record.payer_account,
        "node_id": hex::encode(&record.node_id),
        "provider_wallet": record.provider_wallet,
        "resources": resources.iter().map(|(name, quantity)| (name.to_string(), json!(quantity.as_f64()))).collect::<serde_json::Map<_, _>>(),
        "start_ms": record.start_ms,
        "end_ms": if record.open { Value::Null } else { json!(record.end_ms) },
        "duration_ms": if record.open { Value::Null } else { json!(record.end_ms.saturating_sub(record.start_ms)) },
        "open": record.open,
        "segment": record.segment,
        "price_per_gpu_hour_micros": record.price_per_gpu_hour_micros,
        "price_per_cpu_hour_micros": record.price_per_cpu_hour_micros,
        "cost_micros": record.cost_micros,
        "cost": format_usd(record.cost_micros),
        "settled": record.settled,
        "settled_epoch": if record.settled { json!(record.settled_epoch) } else { Value::Null },
        "node_started_ms": said(record.node_started_ms),
        "holder_started_ms": said(record.holder_started_ms),
        "node_ended_ms": said(record.node_ended_ms),
        "holder_ended_ms": said(record.holder_ended_ms),
        "ended_by": if record.open { Value::Null } else { json!(record.ended_by) },
    })
}

/// A side's word (0: not said).
fn said(ms: u64) -> Value {
    if ms == 0 {
        Value::Null
    } else {
        json!(ms)
    }
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS.mmm UTC`.
pub(crate) fn utc(ms: u64) -> String {
    let (days, of_day) = ((ms / 86_400_000) as i64, ms % 86_400_000);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03} UTC",
        of_day / 3_600_000,
        of_day / 60_000 % 60,
        of_day / 1_000 % 60,
        of_day % 1_000
    )
}

/// Who said what of a record's lease, and which word counted (`ionet usage --explain`).
fn explain(record: &UsageRecord) -> Vec<String> {
    let word = |ms: u64| if ms == 0 { "not said".to_string() } else { utc(ms) };
    let mut lines = Vec::new();
    if record.segment > 0 {
        lines.push(format!(
            "continued  {} (cut {} time(s) at an epoch's end before)",
            utc(record.start_ms),
            record.segment
        ));
    } else {
        let later = if record.holder_started_ms >= record.node_started_ms { "holder" } else { "node" };
        lines
            .push(format!("started    {} when both had said so (the {later}'s word, the later)", utc(record.start_ms)));
    }
    lines.push(format!("  node     granted {}", word(record.node_started_ms)));
    lines.push(format!("  holder   confirmed {}", word(record.holder_started_ms)));
    if record.open {
        lines.push("ended      not yet (the record runs while both sides say the lease runs)".to_string());
        return lines;
    }
    let by = match record.ended_by.as_str() {
        "holder" => "the holder gave the lease back first",
        "node" => "the node ended it first",
        "node dead" => "its node was declared dead (its last heartbeat)",
        "job finished" => "its job finished",
        "unfunded" => "its payer's credit ran out",
        "epoch" => "cut at an epoch's end; the lease went on in the next record",
        "" => "ended before leases had two sides",
        other => other,
    };
    lines.push(format!("ended      {} ({by})", utc(record.end_ms)));
    if record.ended_by != "epoch" {
        lines.push(format!("  holder   gave back {}", word(record.holder_ended_ms)));
        lines.push(format!("  node     ended {}", word(record.node_ended_ms)));
    }
    lines
}

/// `ionet usage`.
pub fn usage(args: UsageArgs) -> Result<()> {
    let job_id = args.job.as_deref().map(str::parse::<JobId>).transpose()?;
    let node_id = args.node.as_deref().map(str::parse::<NodeId>).transpose()?;
    let request = ListUsageRequest {
        job_id: job_id.map(|id| id.to_vec()).unwrap_or_default(),
        node_id: node_id.map(|id| id.to_vec()).unwrap_or_default(),
    };
    let records = with_metering(&args.head, As::Reader, async move |mut client| {
        Ok(client.list_usage(request).await?.into_inner().records)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&Value::Array(records.iter().map(record_json).collect()))?);
        return Ok(());
    }
    if records.is_empty() {
        println!("no usage recorded");
        return Ok(());
    }
    println!(
        "{:<8}  {:<8}  {:<8}  {:<14}  {:<16}  {:<14}  {:>10}  {:>12}  {}",
        "RECORD", "JOB", "NODE", "PAYER", "PROVIDER", "RESOURCES", "SECONDS", "COST (USD)", "STATE"
    );
    for record in &records {
        let resources = resources_of(record);
        let state = if record.open {
            "open".to_string()
        } else if record.settled {
            format!("settled in epoch {}", record.settled_epoch)
        } else {
            "pending".to_string()
        };
        let seconds = if record.open {
            "-".to_string()
        } else {
            format!("{:.3}", record.end_ms.saturating_sub(record.start_ms) as f64 / 1000.0)
        };
        println!(
            "{:<8}  {:<8}  {:<8}  {:<14}  {:<16}  {:<14}  {:>10}  {:>12}  {}",
            &record.record_id[..8.min(record.record_id.len())],
            hex::encode(&record.job_id),
            short_hex(&record.node_id),
            record.payer_account,
            record.provider_wallet,
            resources.to_string(),
            seconds,
            format_usd(record.cost_micros),
            state
        );
        if args.explain {
            for line in explain(record) {
                println!("    {line}");
            }
        }
    }
    Ok(())
}

/// `ionet job cost`: a job's bill so far, as a table, JSON or CSV.
pub fn job_cost(args: JobCostArgs) -> Result<()> {
    let job_id: JobId = args.job.parse()?;
    let request = JobCostRequest { job_id: job_id.to_vec() };
    let bill = with_metering(&args.head, As::Reader, async move |mut client| {
        Ok(client.job_cost(request).await?.into_inner())
    })?;
    let resources = |line: &ReceiptLine| line.resources.clone().unwrap_or_default().to_set().unwrap_or_default();
    let seconds = |line: &ReceiptLine| line.end_ms.saturating_sub(line.start_ms) as f64 / 1000.0;
    if args.json {
        let lines: Vec<Value> = bill
            .lines
            .iter()
            .map(|line| {
                json!({
                    "lease_id": hex::encode(&line.lease_id),
                    "record_id": line.record_id,
                    "node_id": hex::encode(&line.node_id),
                    "gpu_model": line.gpu_model,
                    "resources": resources(line).iter().map(|(name, quantity)| (name.to_string(), json!(quantity.as_f64()))).collect::<serde_json::Map<_, _>>(),
                    "start_ms": line.start_ms,
                    "end_ms": line.end_ms,
                    "seconds": seconds(line),
                    "price_per_gpu_hour_micros": line.price_per_gpu_hour_micros,
                    "price_per_cpu_hour_micros": line.price_per_cpu_hour_micros,
                    "cost_micros": line.cost_micros,
                    "fee_micros": line.fee_micros,
                    "open": line.open,
                    "ended_by": line.ended_by,
                })
            })
            .collect();
        let receipt = json!({
            "job_id": hex::encode(&bill.job_id),
            "payer_account": bill.payer_account,
            "fee_bps": bill.fee_bps,
            "as_of_ms": bill.as_of_ms,
            "running": bill.running,
            "lines": lines,
            "total_cost_micros": bill.total_cost_micros,
            "total_fee_micros": bill.total_fee_micros,
            "total_micros": bill.total_cost_micros + bill.total_fee_micros,
        });
        println!("{}", serde_json::to_string_pretty(&receipt)?);
        return Ok(());
    }
    if args.csv {
        println!("lease_id,record_id,node_id,gpu_model,resources,start_ms,end_ms,seconds,price_per_gpu_hour_usd,price_per_cpu_hour_usd,cost_usd,fee_usd,open");
        for line in &bill.lines {
            println!(
                "{},{},{},{},\"{}\",{},{},{:.3},{},{},{},{},{}",
                hex::encode(&line.lease_id),
                line.record_id,
                hex::encode(&line.node_id),
                line.gpu_model,
                resources(line),
                line.start_ms,
                line.end_ms,
                seconds(line),
                format_usd_exact(line.price_per_gpu_hour_micros),
                format_usd_exact(line.price_per_cpu_hour_micros),
                format_usd_exact(line.cost_micros),
                format_usd_exact(line.fee_micros),
                line.open
            );
        }
        return Ok(());
    }
    let state = if bill.running { "running" } else { "finished" };
    println!("job {} (payer {}), {state}; as of {}", hex::encode(&bill.job_id), bill.payer_account, utc(bill.as_of_ms));
    if bill.lines.is_empty() {
        println!("no leases billed");
        return Ok(());
    }
    println!(
        "{:<8}  {:<8}  {:<12}  {:<16}  {:>10}  {:>10}  {:>12}  {:>10}  {}",
        "LEASE", "NODE", "GPU", "RESOURCES", "SECONDS", "$/GPU-H", "COST", "FEE", "STATE"
    );
    for line in &bill.lines {
        println!(
            "{:<8}  {:<8}  {:<12}  {:<16}  {:>10.3}  {:>10}  {:>12}  {:>10}  {}",
            short_hex(&line.lease_id),
            short_hex(&line.node_id),
            if line.gpu_model.is_empty() { "-" } else { line.gpu_model.as_str() },
            resources(line).to_string(),
            seconds(line),
            format_usd(line.price_per_gpu_hour_micros),
            format_usd_exact(line.cost_micros),
            format_usd_exact(line.fee_micros),
            if line.open { "running".to_string() } else { format!("ended by {}", line.ended_by) },
        );
    }
    println!(
        "total {} + fee {} ({} bps) = {}",
        format_usd_exact(bill.total_cost_micros),
        format_usd_exact(bill.total_fee_micros),
        bill.fee_bps,
        format_usd_exact(bill.total_cost_micros + bill.total_fee_micros)
    );
    Ok(())
}

/// Micro-USD as dollars to the micro-dollar (`$0.000342`).
fn format_usd_exact(micros: u64) -> String {
    format!("${}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

/// `ionet ledger balances`.
pub fn balances(args: BalancesArgs) -> Result<()> {
    let balances = with_metering(&args.head, As::Reader, async |mut client| {
        Ok(client.balances(BalancesRequest {}).await?.into_inner().balances)
    })?;
    let sum: i64 = balances.iter().map(|b| b.balance_micros).sum();
    if args.json {
        let rows: Vec<Value> = balances
            .iter()
            .map(|b| json!({"account": b.account, "balance_micros": b.balance_micros, "balance": signed_usd(b.balance_micros)}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&json!({"balances": rows, "sum_micros": sum}))?);
        return Ok(());
    }
    if balances.is_empty() {
        println!("the ledger is empty");
        return Ok(());
    }
    // As wide as the longest account (a provider's Solana address makes 53 characters).
    let width = balances.iter().map(|b| b.account.len()).max().unwrap_or(0).max(20);
    println!("{:<width$}  {:>16}", "ACCOUNT", "BALANCE (USD)");
    for balance in &balances {
        println!("{:<width$}  {:>16}", balance.account, signed_usd(balance.balance_micros));
    }
    println!("{:<width$}  {:>16}", "(sum)", signed_usd(sum));
    Ok(())
}

fn summary_json(summary: &EpochSummary, dry_run: bool) -> Value {
    json!({
        "dry_run": dry_run,
        "epoch_id": summary.epoch_id,
        "end_ms": summary.end_ms,
        "fee_bps": summary.fee_bps,
        "records": summary.records,
        "total_usage_micros": summary.total_usage_micros,
        "total_fee_micros": summary.total_fee_micros,
        "total_rewards_micros": summary.total_rewards_micros,
        "reward_remainder_micros": summary.reward_remainder_micros,
        "payers": summary.payers.iter().map(|p| json!({
            "payer": p.payer,
            "usage_micros": p.usage_micros,
            "fee_micros": p.fee_micros,
            "shortfall_micros": p.shortfall_micros,
            "balance_after_micros": p.balance_after_micros,
        })).collect::<Vec<_>>(),
        "providers": summary.providers.iter().map(|p| json!({
            "wallet": p.wallet,
            "revenue_micros": p.revenue_micros,
            "reward_micros": p.reward_micros,
            "power_cost_micros": p.power_cost_micros,
            "uptime_ms": p.uptime_ms,
            "gpu_capacity": p.gpu_capacity_units as f64 / ionet_common::resources::SCALE as f64,
            "records": p.records,
        })).collect::<Vec<_>>(),
    })
}

/// `ionet settle`.
pub fn settle(args: SettleArgs) -> Result<()> {
    let dry_run = args.dry_run;
    let summary = with_metering(&args.head, As::Admin, async move |mut client| {
        Ok(client.settle(SettleRequest { dry_run }).await?.into_inner().summary.unwrap_or_default())
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary_json(&summary, dry_run))?);
        return Ok(());
    }
    println!(
        "{} epoch {} (ending at {} ms): {} record(s), usage ${}, fee ${} ({} bps), rewards ${}",
        if dry_run { "dry run: would close" } else { "closed" },
        summary.epoch_id,
        summary.end_ms,
        summary.records,
        format_usd(summary.total_usage_micros),
        format_usd(summary.total_fee_micros),
        summary.fee_bps,
        format_usd(summary.total_rewards_micros)
    );
    for payer in &summary.payers {
        println!(
            "  payer {}: usage ${} + fee ${}; balance after ${}{}",
            payer.payer,
            format_usd(payer.usage_micros),
            format_usd(payer.fee_micros),
            signed_usd(payer.balance_after_micros),
            if payer.shortfall_micros > 0 {
                format!(" (short by ${})", format_usd(payer.shortfall_micros))
            } else {
                String::new()
            }
        );
    }
    for provider in &summary.providers {
        println!(
            "  provider {}: revenue ${}, reward ${}, uptime {} s",
            provider.wallet,
            format_usd(provider.revenue_micros),
            format_usd(provider.reward_micros),
            provider.uptime_ms / 1000
        );
    }
    Ok(())
}

/// `ionet earnings`.
pub fn earnings(args: EarningsArgs) -> Result<()> {
    let wallet = args.wallet.clone();
    let reply = with_metering(&args.head, As::Reader, async move |mut client| {
        Ok(client.earnings(EarningsRequest { wallet }).await?.into_inner())
    })?;
    let total_revenue: u64 = reply.epochs.iter().map(|e| e.revenue_micros).sum();
    let total_reward: u64 = reply.epochs.iter().map(|e| e.reward_micros).sum();
    if args.json {
        let epochs: Vec<Value> = reply
            .epochs
            .iter()
            .map(|e| {
                json!({
                    "epoch_id": e.epoch_id,
                    "revenue_micros": e.revenue_micros,
                    "reward_micros": e.reward_micros,
                    "power_cost_micros": e.power_cost_micros,
                    "net_micros": e.net_micros,
                    "uptime_ms": e.uptime_ms,
                    "gpu_capacity": e.gpu_capacity_units as f64 / ionet_common::resources::SCALE as f64,
                    "rewards_withheld": e.rewards_withheld,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "wallet": args.wallet,
                "balance_micros": reply.balance_micros,
                "total_revenue_micros": total_revenue,
                "total_reward_micros": total_reward,
                "epochs": epochs,
            }))?
        );
        return Ok(());
    }
    if reply.epochs.is_empty() {
        println!("no settled earnings for wallet {}", args.wallet);
    } else {
        println!(
            "{:>6}  {:>14}  {:>14}  {:>14}  {:>10}",
            "EPOCH", "REVENUE (USD)", "REWARD (USD)", "NET (USD)", "UPTIME S"
        );
        for e in &reply.epochs {
            println!(
                "{:>6}  {:>14}  {:>14}  {:>14}  {:>10}",
                e.epoch_id,
                format_usd(e.revenue_micros),
                format_usd(e.reward_micros),
                signed_usd(e.net_micros),
                e.uptime_ms / 1000
            );
            for why in &e.rewards_withheld {
                println!("        reward withheld: {why}");
            }
        }
    }
    println!(
        "wallet {}: revenue ${}, rewards ${}; balance ${}",
        args.wallet,
        format_usd(total_revenue),
        format_usd(total_reward),
        signed_usd(reply.balance_micros)
    );
    Ok(())
}

/// `ionet payouts`.
pub fn payouts(args: PayoutsArgs) -> Result<()> {
    let reply = with_metering(&args.head, As::Reader, async move |mut client| {
        Ok(client.list_payouts(ListPayoutsRequest {}).await?.into_inner())
    })?;
    if args.json {
        let epochs: Vec<Value> = reply
            .epochs
            .iter()
            .map(|epoch| {
                let batches: Vec<Value> = epoch
                    .batches
                    .iter()
                    .map(|b| {
                        json!({
                            "index": b.index, "payouts": b.payouts, "micro_usd": b.micro_usd, "amount": b.amount,
                            "state": b.state, "signature": b.signature, "attempts": b.attempts,
                        })
                    })
                    .collect();
                json!({
                    "epoch_id": epoch.epoch_id, "asset": epoch.asset, "authority": epoch.authority,
                    "complete": epoch.complete, "skipped": epoch.skipped, "batches": batches,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&json!({ "enabled": reply.enabled, "epochs": epochs }))?);
        return Ok(());
    }
    if !reply.enabled {
        println!(
            "the head does not pay out on chain (start it with --payout-rpc-url, --payout-keypair, --payout-asset)"
        );
        return Ok(());
    }
    if reply.epochs.is_empty() {
        println!("no epoch has been paid out yet");
        return Ok(());
    }
    println!("{:>6}  {:>5}  {:>8}  {:>12}  {:<10}  SIGNATURE", "EPOCH", "BATCH", "PAYOUTS", "USD", "STATE");
    for epoch in &reply.epochs {
        for b in &epoch.batches {
            println!(
                "{:>6}  {:>5}  {:>8}  {:>12}  {:<10}  {}",
                epoch.epoch_id,
                b.index,
                b.payouts,
                format_usd(b.micro_usd),
                b.state,
                b.signature
            );
        }
        if epoch.skipped > 0 {
            println!(
                "{:>6}  {} provider(s) skipped (not a Solana wallet, or under one base unit)",
                epoch.epoch_id, epoch.skipped
            );
        }
    }
    Ok(())
}

/// `ionet credits add`.
pub fn credits_add(args: CreditsAddArgs) -> Result<()> {
    let amount_micros = parse_usd(&args.amount).map_err(|_| {
        anyhow!("amount {:?} is not a valid USD amount: give a positive number such as 100 or 12.50", args.amount)
    })?;
    if amount_micros == 0 {
        bail!("amount {:?} is zero: give a positive number of USD", args.amount);
    }
    let account = args.account.clone();
    let balance = with_metering(&args.head, As::Admin, async move |mut client| {
        Ok(client.add_credits(AddCreditsRequest { account, amount_micros }).await?.into_inner().balance_micros)
    })?;
    println!("added ${} to payer {}; balance ${}", format_usd(amount_micros), args.account, signed_usd(balance));
    Ok(())
}

/// `ionet credits refund`.
pub fn credits_refund(args: CreditsRefundArgs) -> Result<()> {
    let account = args.account.clone();
    let refunded = with_metering(&args.head, As::Admin, async move |mut client| {
        Ok(client.refund(RefundRequest { account }).await?.into_inner().refunded_micros)
    })?;
    if refunded == 0 {
        println!("payer {} has no unused credit to refund", args.account);
    } else {
        println!("refunded ${} to payer {}", format_usd(refunded), args.account);
    }
    Ok(())
}

/// `ionet credits deposit-address` (`address_only`) and `ionet credits deposits`.
pub fn deposits(args: DepositsArgs, address_only: bool) -> Result<()> {
    let reply = with_metering(&args.head, As::Reader, async |mut client| {
        Ok(client.deposits(DepositsRequest {}).await?.into_inner())
    })?;
    if args.json {
        let deposits: Vec<Value> = reply
            .deposits
            .iter()
            .map(|d| json!({"signature": d.signature, "amount": d.amount, "micro_usd": d.micro_usd, "account": d.account, "state": d.state}))
            .collect();
        let value = json!({"watching": reply.watching, "reason": reply.reason, "address": reply.address, "asset": reply.asset, "memo": reply.memo, "deposits": deposits});
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    if !reply.watching {
        bail!("{}", reply.reason);
    }
    if address_only {
        println!("pay {} to {} with the memo {}", reply.asset, reply.address, reply.memo);
        return Ok(());
    }
    if reply.deposits.is_empty() {
        println!("no deposits seen at {}", reply.address);
        return Ok(());
    }
    println!("{:<88}  {:>14}  {:<16}  {}", "SIGNATURE", "USD", "ACCOUNT", "STATE");
    for deposit in &reply.deposits {
        println!(
            "{:<88}  {:>14}  {:<16}  {}",
            deposit.signature,
            format_usd_exact(deposit.micro_usd),
            if deposit.account.is_empty() { "-" } else { deposit.account.as_str() },
            deposit.state
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn times_print_as_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14 22:13:20.123 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000 UTC");
    }
}
