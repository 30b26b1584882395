//! `ionet devnet` and `ionet wallet`: a local Solana chain to pay providers on, and the
//! wallets they are paid into.
//!
//! - `ionet devnet start` runs the in-process Solana runtime (litesvm, with the real System,
//!   SPL Token, Associated Token Account and Memo programs) as a daemon of the session,
//!   behind Solana's JSON-RPC on a loopback port (`SvmChain::serve_rpc`). It makes a payout
//!   authority holding SOL for fees and rent and a 6-decimal test dollar ("devUSD", one
//!   base unit a micro-dollar, as USDC) and writes `devnet/devnet.json` (RPC URL, keypair
//!   file, asset): the head's `--payout-*` flags, as for a real cluster. Its state is in
//!   memory: stopping it (`ionet stop`, after the head) forgets every transaction, as
//!   `solana-test-validator --reset` does. Needs the binary feature `devnet`.
//! - `ionet wallet new FILE` writes a new keypair (the Solana CLI's format, mode 0600,
//!   never over an existing file) and prints its address, a provider's `--wallet`.
//! - `ionet wallet balance ADDRESS` reads what an address holds of the payout asset through
//!   any Solana RPC node (the session's devnet unless `--rpc-url` and `--asset` say
//!   otherwise): a provider checks a payout without trusting the head's word for it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::cli::SessionArgs;
use crate::session::SessionDir;

/// What a running devnet tells the head and the operator (`devnet/devnet.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DevnetInfo {
    /// The JSON-RPC endpoint (loopback).
    pub rpc_url: String,
    /// The payout authority's address and its keypair file.
    pub authority: String,
    pub keypair: PathBuf,
    /// The test dollar's mint, and the head's `--payout-asset` for it.
    pub mint: String,
    pub asset: String,
}

#[derive(Debug, Args, Clone)]
pub struct DevnetStartArgs {
    /// SOL given to the payout authority for transaction fees and new accounts' rent.
    #[arg(long, default_value_t = 10)]
    pub sol: u64,
    /// devUSD (the test dollar) minted to the payout authority to pay providers with.
    #[arg(long, default_value_t = 1_000)]
    pub usd: u64,
    /// Run in the foreground (what `start` launches in the background).
    #[arg(long, hide = true)]
    pub block: bool,
    #[command(flatten)]
    pub session: SessionArgs,
}

#[derive(Debug, Args, Clone)]
pub struct WalletNewArgs {
    /// Where to write the keypair (a JSON array of 64 bytes, as `solana-keygen new`).
    pub path: PathBuf,
}

#[derive(Debug, Args, Clone)]
pub struct WalletBalanceArgs {
    /// The wallet's address (base58).
    pub address: String,
    /// The Solana RPC node to ask. Default: the session's devnet.
    #[arg(long = "rpc-url")]
    pub rpc_url: Option<String>,
    /// The asset, as the head's --payout-asset: sol:<lamports per USD> or
    /// spl:<mint>:<decimals>. Default: the session's devnet's.
    #[arg(long)]
    pub asset: Option<String>,
    /// One JSON object: address, asset, amount (base units), decimals, usd_micros.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub session: SessionArgs,
}

const INFO_FILE: &str = "devnet.json";

fn devnet_dir(session: &SessionDir) -> PathBuf {
    session.path().join("devnet")
}

/// The session's running devnet: one whose daemon is alive and wrote its file (a devnet
/// killed outright leaves its file behind, naming a chain that is gone).
pub fn running_devnet(session: &SessionDir) -> Option<DevnetInfo> {
    session.daemons().iter().find(|daemon| daemon.role == "devnet" && crate::commands::alive(daemon.pid))?;
    let text = std::fs::read(devnet_dir(session).join(INFO_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// `ionet devnet start`.
pub fn devnet_start(args: DevnetStartArgs) -> Result<()> {
    if !cfg!(feature = "devnet") {
        bail!("`ionet devnet` needs an ionet binary built with the local chain (cargo feature `devnet`)");
    }
    if args.usd.checked_mul(1_000_000).is_none() || args.sol.checked_mul(LAMPORTS_PER_SOL).is_none() {
        bail!("--usd {} / --sol {} is more than the chain can hold", args.usd, args.sol);
    }
    let session = SessionDir::resolve(args.session.temp_dir.as_deref());
    session.create()?;
    if args.block {
        return serve(&args, &session);
    }
    if let Some(info) = running_devnet(&session) {
        bail!("a devnet already runs for this session at {} (`ionet stop` stops it)", info.rpc_url);
    }
    let argv = ["devnet", "start", "--sol", &args.sol.to_string(), "--usd", &args.usd.to_string()];
    let argv = argv.into_iter().map(Into::into).collect();
    let pid = crate::commands::spawn_daemon("devnet", argv, &[], &session, std::time::Duration::from_secs(30))?;
    let info = running_devnet(&session).context("the devnet became ready without writing devnet.json")?;
    println!("a local Solana chain (the in-process runtime) serves JSON-RPC at {} (pid {pid})", info.rpc_url);
    println!(
        "payout authority {}: {} SOL for fees, {} devUSD (a 6-decimal SPL token, mint {}) to pay providers",
        info.authority, args.sol, args.usd, info.mint
    );
    println!(
        "pay out through it: ionet start --head --payout-rpc-url {} --payout-keypair {} --payout-asset {}",
        info.rpc_url,
        info.keypair.display(),
        info.asset
    );
    Ok(())
}

const LAMPORTS_PER_SOL: u64 = 1_000_000_000;

#[cfg(feature = "devnet")]
fn serve(args: &DevnetStartArgs, session: &SessionDir) -> Result<()> {
    use ionet_settlement::solana::svm::SvmChain;
    use solana_keypair::Keypair;
    use solana_signer::Signer;

    let pid = std::process::id();
    let _guard = crate::logging::init_daemon(&session.logs(), &format!("devnet-{pid}.log"), false);
    let chain = SvmChain::new();
    let authority = Keypair::new();
    chain.airdrop(&authority.pubkey(), args.sol * LAMPORTS_PER_SOL);
    let mint = chain.create_funded_mint(&authority, 6, args.usd * 1_000_000);
    let dir = devnet_dir(session);
    ionet_common::files::private_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let keypair = dir.join("authority.json");
    write_keypair(&keypair, &authority, true)?;
    let rpc_url = chain.serve_rpc().context("serving the devnet's RPC on loopback")?;
    let info = DevnetInfo {
        rpc_url,
        authority: authority.pubkey().to_string(),
        keypair,
        mint: mint.to_string(),
        asset: format!("spl:{mint}:6"),
    };
    let info_path = dir.join(INFO_FILE);
    ionet_common::files::replace_private(&info_path, &serde_json::to_vec_pretty(&info)?)?;
    session.write_pid("devnet", pid)?;
    tracing::info!(rpc = %info.rpc_url, authority = %info.authority, mint = %info.mint, "devnet ready");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let signal = runtime.block_on(crate::commands::wait_for_signal());
    tracing::info!(signal, "devnet stopping; its chain is forgotten");
    let _ = std::fs::remove_file(&info_path);
    Ok(())
}

#[cfg(not(feature = "devnet"))]
fn serve(_args: &DevnetStartArgs, _session: &SessionDir) -> Result<()> {
    unreachable!("devnet_start refuses first without the feature")
}

/// Writes `keypair` in the Solana CLI's format, mode 0600; `replace` for the devnet's own
/// throwaway authority, never for a wallet someone may have funded.
#[cfg(feature = "solana")]
fn write_keypair(path: &std::path::Path, keypair: &solana_keypair::Keypair, replace: bool) -> Result<()> {
    let bytes = serde_json::to_vec(&keypair.to_bytes().to_vec())?;
    let written = if replace {
        ionet_common::files::replace_private(path, &bytes)
    } else {
        ionet_common::files::write_new_private(path, &bytes)
    };
    written.with_context(|| format!("writing the keypair {}", path.display()))
}

/// `ionet wallet new FILE`.
pub fn wallet_new(args: WalletNewArgs) -> Result<()> {
    #[cfg(feature = "solana")]
    {
        use solana_signer::Signer;
        if args.path.exists() {
            bail!("{} exists: a wallet file is never overwritten (it may hold funds)", args.path.display());
        }
        let keypair = solana_keypair::Keypair::new();
        write_keypair(&args.path, &keypair, false)?;
        println!("{}", keypair.pubkey());
        Ok(())
    }
    #[cfg(not(feature = "solana"))]
    {
        let _ = args;
        bail!("`ionet wallet` needs an ionet binary built with Solana payouts (cargo feature `solana`)")
    }
}

/// `ionet wallet balance ADDRESS`.
pub fn wallet_balance(args: WalletBalanceArgs) -> Result<()> {
    #[cfg(feature = "solana")]
    {
        use ionet_settlement::solana::plan::{associated_token_address, token_account_amount};
        use ionet_settlement::solana::{PayoutAsset, PayoutChain, RpcChain};

        let session = SessionDir::resolve(args.session.temp_dir.as_deref());
        let devnet = running_devnet(&session);
        let (Some(rpc_url), Some(asset)) = (
            args.rpc_url.clone().or_else(|| devnet.as_ref().map(|info| info.rpc_url.clone())),
            args.asset.clone().or_else(|| devnet.as_ref().map(|info| info.asset.clone())),
        ) else {
            bail!("give --rpc-url and --asset (no devnet runs for this session to default to)");
        };
        let asset: PayoutAsset = asset.parse().with_context(|| format!("--asset {asset:?}"))?;
        let owner: solana_pubkey::Pubkey = args
            .address
            .parse()
            .map_err(|err| anyhow::anyhow!("{:?} is not a Solana address (base58): {err}", args.address))?;
        let mut chain = RpcChain::new(&rpc_url);
        let (amount, decimals) = match &asset {
            PayoutAsset::Token { mint, decimals } => {
                let account = chain.get_account(&associated_token_address(&owner, mint))?;
                let amount = account.and_then(|account| token_account_amount(&account.data)).unwrap_or(0);
                (amount, *decimals)
            }
            PayoutAsset::Sol { .. } => (chain.get_account(&owner)?.map_or(0, |account| account.lamports), 9),
        };
        let usd_micros = match asset {
            PayoutAsset::Token { decimals, .. } if decimals >= 6 => amount / 10u64.pow(u32::from(decimals) - 6),
            PayoutAsset::Token { decimals, .. } => amount.saturating_mul(10u64.pow(6 - u32::from(decimals))),
            PayoutAsset::Sol { lamports_per_usd } => {
                (u128::from(amount) * 1_000_000 / u128::from(lamports_per_usd)) as u64
            }
        };
        if args.json {
            let value = serde_json::json!({
                "address": owner.to_string(), "asset": asset.to_string(), "amount": amount,
                "decimals": decimals, "usd_micros": usd_micros,
            });
            println!("{value}");
        } else {
            let whole = 10u128.pow(u32::from(decimals));
            let units = format!(
                "{}.{:0width$}",
                u128::from(amount) / whole,
                u128::from(amount) % whole,
                width = usize::from(decimals)
            );
            let unit = if matches!(asset, PayoutAsset::Sol { .. }) { "SOL" } else { "tokens" };
            println!("{owner}: {units} {unit} (${}) of {asset}", ionet_common::resources::format_usd(usd_micros));
        }
        Ok(())
    }
    #[cfg(not(feature = "solana"))]
    {
        let _ = args;
        bail!("`ionet wallet` needs an ionet binary built with Solana payouts (cargo feature `solana`)")
    }
}
