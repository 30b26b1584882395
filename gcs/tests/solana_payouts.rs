//! The head pays settled epochs on Solana: a control store served on loopback, its
//! metering fed leases, `Settle` called over gRPC, and the payouts executed as real
//! transactions by an in-process Solana runtime (litesvm with the SPL programs). Checks
//! that each provider's associated token account receives exactly what the ledger
//! credited it, that the ledger records the payout once (provider → funding), and that a
//! restart, or a head that died between the chain and the ledger, pays nothing twice.
#![cfg(feature = "solana")]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ionet_common::clock::ManualClock;
use ionet_common::config::ClusterConfig;
use ionet_common::resources::{parse_usd, Quantity, CPU, GPU};
use ionet_common::rpc::proto::common::{JobInfo, NodeInfo};
use ionet_common::rpc::proto::metering::{
    DepositsRequest, HeldLease, LeaseStartedRequest, ListPayoutsReply, ListPayoutsRequest, SettleRequest,
};
use ionet_common::{JobId, LeaseId, NodeId, ResourceSet};
use ionet_gcs::payouts::PayoutSettings;
use ionet_gcs::{GcsServer, GcsServerOptions};
use ionet_settlement::solana::plan::associated_token_address;
use ionet_settlement::solana::svm::SvmChain;
use ionet_settlement::solana::{PayoutAsset, PayoutConfig, RedbPayoutStore, RpcChain, SolanaPayouter};
use ionet_settlement::{Account, EntryKind};
use solana_keypair::Keypair;
use solana_pubkey::Pubkey;
use solana_signer::Signer;
use tokio::net::TcpListener;

const START: u64 = 1_700_000_000_000;
const SOL: u64 = 1_000_000_000;
const HOUR: u64 = 3_600_000;

struct Chain {
    svm: SvmChain,
    authority: Keypair,
    /// The head's durable nonce account key (the same across restarts, as its file).
    nonce: Keypair,
    mint: Pubkey,
    providers: Vec<Pubkey>,
    /// The runtime's history as a Solana RPC node, where the head reads deposits.
    rpc_url: String,
}

impl Chain {
    fn new(providers: usize) -> Self {
        let svm = SvmChain::new();
        let authority = Keypair::new();
        svm.airdrop(&authority.pubkey(), 10 * SOL);
        let mint = svm.create_funded_mint(&authority, 6, 1_000_000_000);
        let providers = (0..providers).map(|_| Keypair::new().pubkey()).collect();
        let rpc_url = svm.serve_rpc().expect("a loopback RPC front");
        Chain { svm, authority, nonce: Keypair::new(), mint, providers, rpc_url }
    }

    fn payout_config(&self) -> PayoutConfig {
        PayoutConfig {
            confirm_timeout: Duration::from_secs(5),
            poll_interval: Duration::from_millis(1),
            ..PayoutConfig::new(PayoutAsset::Token { mint: self.mint, decimals: 6 })
        }
    }

    fn settings(&self, store: &Path) -> PayoutSettings {
        PayoutSettings {
            chain: Box::new(self.svm.clone()),
            authority: self.authority.insecure_clone(),
            config: self.payout_config(),
            store_path: Some(store.to_path_buf()),
            retry_interval: Duration::from_millis(50),
            nonce: Some(self.nonce.insecure_clone()),
            deposits: Some(Box::new(RpcChain::new(&self.rpc_url))),
        }
    }

    fn balances(&self) -> Vec<u64> {
        self.providers
            .iter()
            .map(|wallet| self.svm.token_balance(&associated_token_address(wallet, &self.mint)))
            .collect()
    }
}

fn options(dir: &Path, clock: &ManualClock) -> GcsServerOptions {
    // Nodes here never heartbeat, and epochs close only when asked.
    let config = ClusterConfig {
        heartbeat_timeout_ms: 30 * 24 * HOUR,
        epoch_length_ms: 365 * 24 * HOUR,
        ..ClusterConfig::default()
    };
    let mut options = GcsServerOptions::new(config);
    options.clock = Arc::new(clock.clone());
    options.storage = ionet_gcs::storage::StorageLocation::File(dir.join("gcs.redb"));
    options.ledger_path = Some(dir.join("ledger.redb"));
    options
}

async fn start(options: GcsServerOptions) -> GcsServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    GcsServer::start(options, listener).await.unwrap()
}

fn gpu_node(wallet: &str, price: &str) -> NodeInfo {
    let total = ResourceSet::new().with(GPU, Quantity::whole(8)).with(CPU, Quantity::whole(32));
    NodeInfo {
        node_id: NodeId::random().to_vec(),
        address: "127.0.0.1:1".into(),
        total: Some((&total).into()),
        available: Some((&total).into()),
        price_per_gpu_hour_micros: parse_usd(price).unwrap(),
        wallet: wallet.into(),
        ..Default::default()
    }
}

/// Registers one node per wallet (plus one whose wallet is not a Solana address) and
/// runs a 2-GPU lease of `hours` on each; returns after the leases ended.
async fn run_leases(server: &GcsServer, clock: &ManualClock, wallets: &[String], hours: u64) {
    let state = server.state();
    let job = state.add_job(JobInfo { payer_account: "alice".into(), ..Default::default() }).await.unwrap();
    let job = JobId::from_bytes(&job.job_id).unwrap();
    server.metering().add_credits("alice", 1_000_000_000).await.unwrap();
    let gpus: ResourceSet = ResourceSet::new().with(GPU, Quantity::whole(2));
    let mut leases = Vec::new();
    for wallet in wallets {
        let node = gpu_node(wallet, "1.20");
        state.register_node(node.clone()).await.unwrap();
        // Its GPUs passed the head's check (that check's own tests: worker/tests/gpu_checks.rs).
        state.record_gpu_check(&NodeId::from_bytes(&node.node_id).unwrap(), Ok((1.0, 1.0, 1))).await.unwrap();
        let lease = start_two_party(server, job, &node, &gpus).await;
        leases.push(lease);
    }
    clock.advance_ms(hours * HOUR);
    for lease in leases {
        server.metering().lease_ended(lease.as_bytes()).await.unwrap();
    }
}

async fn list_payouts(server: &GcsServer) -> ListPayoutsReply {
    let mut client = ionet_common::rpc::metering_client(
        &server.address().to_string(),
        &server.admin_credential(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    client.list_payouts(ListPayoutsRequest {}).await.unwrap().into_inner()
}

/// A lease of `gpus` on `node` for `job` that both sides say started: its node, then its
/// holder.
async fn start_two_party(server: &GcsServer, job: JobId, node: &NodeInfo, gpus: &ResourceSet) -> LeaseId {
    let lease = LeaseId::random();
    let started = LeaseStartedRequest {
        lease_id: lease.to_vec(),
        node_id: node.node_id.clone(),
        job_id: job.to_vec(),
        resources: Some(gpus.into()),
        ..Default::default()
    };
    server.metering().lease_started(&started).await.unwrap();
    let word =
        HeldLease { lease_id: lease.to_vec(), node_id: node.node_id.clone(), granted: true, ..Default::default() };
    server.metering().holder_report(job, &[word], false).await.unwrap();
    lease
}

/// Polls `ListPayouts` until `epochs` epochs are complete (10 s deadline).
async fn wait_paid(server: &GcsServer, epochs: usize) -> ListPayoutsReply {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = list_payouts(server).await;
        if reply.epochs.iter().filter(|epoch| epoch.complete).count() >= epochs {
            return reply;
        }
        assert!(Instant::now() < deadline, "payouts not complete in time: {reply:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn balance(server: &GcsServer, account: Account) -> i64 {
    let balances = server.metering().balances().await.unwrap();
    balances.iter().find(|(a, _)| *a == account).map(|(_, b)| *b).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_epoch_is_paid_to_each_provider_once_and_posted_to_the_ledger() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    let chain = Chain::new(3);
    let clock = ManualClock::new(START);
    let mut with_payouts = options(dir.path(), &clock);
    with_payouts.payouts = Some(chain.settings(&dir.path().join("payouts.redb")));
    let server = start(with_payouts).await;

    let mut wallets: Vec<String> = chain.providers.iter().map(Pubkey::to_string).collect();
    wallets.push("not-a-solana-wallet".into());
    run_leases(&server, &clock, &wallets, 3).await;

    // Settling moves money: the operator's credential.
    let admin = server.admin_credential(Duration::from_secs(600));
    let mut client = ionet_common::rpc::metering_client(&server.address().to_string(), &admin).await.unwrap();
    let summary = client.settle(SettleRequest { dry_run: false }).await.unwrap().into_inner().summary.unwrap();
    // 2 GPUs × 3 h × $1.20 = $7.20 per provider.
    for provider in &summary.providers {
        assert_eq!(provider.revenue_micros, 7_200_000, "{provider:?}");
    }
    let reply = wait_paid(&server, 1).await;
    assert!(reply.enabled);
    let epoch = &reply.epochs[0];
    assert_eq!((epoch.epoch_id, epoch.skipped), (0, 1), "{epoch:?}");
    let owed = |wallet: &str| {
        let provider = summary.providers.iter().find(|p| p.wallet == wallet).unwrap();
        provider.revenue_micros + provider.reward_micros
    };
    let expected: Vec<u64> = wallets[..3].iter().map(|wallet| owed(wallet)).collect();
    assert_eq!(chain.balances(), expected);
    let paid: u64 = epoch.batches.iter().map(|batch| batch.amount).sum();
    assert_eq!(paid, expected.iter().sum::<u64>());
    for batch in &epoch.batches {
        assert_eq!(batch.state, "landed");
        let logs = chain.svm.logs(&batch.signature).join("\n");
        assert!(logs.contains("ionet settlement epoch 0"), "memo missing: {logs}");
    }

    // The ledger: paid providers are at zero, the unpayable one keeps its earnings.
    for wallet in &wallets[..3] {
        assert_eq!(balance(&server, Account::provider(wallet.as_str())).await, 0, "{wallet}");
    }
    assert_eq!(balance(&server, Account::provider("not-a-solana-wallet")).await, owed("not-a-solana-wallet") as i64);
    let entries = server.metering().ledger().lock().entries(0, 1_000).unwrap();
    let payouts: Vec<_> = entries.iter().filter(|entry| entry.kind == EntryKind::Payout).collect();
    assert_eq!(payouts.len(), 3);
    assert!(payouts.iter().all(|entry| entry.credit == Account::Funding && entry.epoch_id == Some(0)));
    let sum: i64 = server.metering().balances().await.unwrap().iter().map(|(_, b)| b).sum();
    assert_eq!(sum, 0);

    // A restart on the same files pays nothing again and posts nothing again.
    server.shutdown().await;
    let mut again = options(dir.path(), &clock);
    again.payouts = Some(chain.settings(&dir.path().join("payouts.redb")));
    let server = start(again).await;
    let reply = wait_paid(&server, 1).await;
    assert_eq!(reply.epochs[0].batches, epoch.batches);
    // A second epoch with nothing in it completes without a transaction.
    let admin = server.admin_credential(Duration::from_secs(600));
    client = ionet_common::rpc::metering_client(&server.address().to_string(), &admin).await.unwrap();
    client.settle(SettleRequest { dry_run: false }).await.unwrap();
    let reply = wait_paid(&server, 2).await;
    assert!(reply.epochs[1].batches.iter().all(|batch| batch.payouts == 0 || batch.state == "landed"));
    assert_eq!(chain.balances(), expected);
    let entries_after = server.metering().ledger().lock().entries(0, 1_000).unwrap();
    assert_eq!(entries_after.iter().filter(|entry| entry.kind == EntryKind::Payout).count(), 3);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payout_that_landed_before_the_head_died_is_posted_once_and_not_resent() {
    let dir = tempfile::tempdir().unwrap();
    let chain = Chain::new(2);
    let clock = ManualClock::new(START);
    let payout_store = dir.path().join("payouts.redb");

    // A head without payouts settles an epoch.
    let server = start(options(dir.path(), &clock)).await;
    let wallets: Vec<String> = chain.providers.iter().map(Pubkey::to_string).collect();
    run_leases(&server, &clock, &wallets, 1).await;
    let summary = server.metering().settle_now(false).await.unwrap();
    assert!(!list_payouts(&server).await.enabled);
    server.shutdown().await;

    // The payer lands the epoch on chain, then "dies" before it posts to the ledger.
    {
        let store = RedbPayoutStore::open(&payout_store).unwrap();
        let mut payouter = SolanaPayouter::new(
            Box::new(chain.svm.clone()) as Box<dyn ionet_settlement::solana::PayoutChain + Send>,
            store,
            chain.authority.insecure_clone(),
            chain.payout_config(),
        )
        .unwrap();
        payouter.pay_epoch(&summary).unwrap();
    }
    let landed = chain.balances();
    assert!(landed.iter().all(|amount| *amount == 2_400_000), "{landed:?}");

    let mut restarted = options(dir.path(), &clock);
    restarted.payouts = Some(chain.settings(&payout_store));
    let server = start(restarted).await;
    wait_paid(&server, 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while balance(&server, Account::provider(wallets[0].as_str())).await != 0 {
        assert!(Instant::now() < deadline, "landed payout never posted to the ledger");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(chain.balances(), landed, "nothing was sent twice");
    for wallet in &wallets {
        assert_eq!(balance(&server, Account::provider(wallet.as_str())).await, 0);
    }
    let entries = server.metering().ledger().lock().entries(0, 1_000).unwrap();
    assert_eq!(entries.iter().filter(|entry| entry.kind == EntryKind::Payout).count(), 2);
    server.shutdown().await;
}

#[test]
fn bad_payout_configuration_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let keypair = dir.path().join("id.json");
    let key = Keypair::new();
    std::fs::write(&keypair, format!("{:?}", key.to_bytes().to_vec())).unwrap();
    let store = dir.path().join("p.redb");
    let mint = Pubkey::new_unique();
    let ok = PayoutSettings::rpc("http://127.0.0.1:8899", &keypair, &format!("spl:{mint}:6"), store.clone());
    assert!(ok.is_ok(), "{ok:?}");
    let err = |result: Result<PayoutSettings, ionet_gcs::GcsError>| result.unwrap_err().to_string();
    let bad_asset = err(PayoutSettings::rpc("http://127.0.0.1:8899", &keypair, "usdc", store.clone()));
    assert!(bad_asset.contains("\"usdc\""), "{bad_asset}");
    let missing = err(PayoutSettings::rpc("http://x", &dir.path().join("none.json"), "sol:1000", store.clone()));
    assert!(missing.contains("none.json"), "{missing}");
    let url = err(PayoutSettings::rpc("127.0.0.1:8899", &keypair, "sol:1000", store));
    assert!(url.contains("not an http(s) URL"), "{url}");
}

/// A payer with $1 of credit runs $2.40 of GPUs: its provider is paid $1 on chain, the
/// rest stays a receivable; once the payer pays its debt, the next epoch pays the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_nobody_funded_is_a_receivable_paid_once_the_payer_pays() {
    let dir = tempfile::tempdir().unwrap();
    let chain = Chain::new(1);
    let clock = ManualClock::new(START);
    let mut with_payouts = options(dir.path(), &clock);
    with_payouts.payouts = Some(chain.settings(&dir.path().join("payouts.redb")));
    let server = start(with_payouts).await;
    let wallet = chain.providers[0].to_string();

    let state = server.state();
    let job = state.add_job(JobInfo { payer_account: "frugal".into(), ..Default::default() }).await.unwrap();
    let job = JobId::from_bytes(&job.job_id).unwrap();
    server.metering().add_credits("frugal", 1_000_000).await.unwrap();
    let node = gpu_node(&wallet, "1.20");
    state.register_node(node.clone()).await.unwrap();
    // Its GPUs passed the head's check (that check's own tests: worker/tests/gpu_checks.rs).
    state.record_gpu_check(&NodeId::from_bytes(&node.node_id).unwrap(), Ok((1.0, 1.0, 1))).await.unwrap();
    let gpus: ResourceSet = ResourceSet::new().with(GPU, Quantity::whole(2));
    let lease = start_two_party(&server, job, &node, &gpus).await;
    clock.advance_ms(HOUR);
    // Ended by its node, or by the head as the credit ran out: at this moment either way.
    let _ = server.metering().lease_ended(lease.as_bytes()).await;

    let summary = server.metering().settle_now(false).await.unwrap();
    let provider = &summary.providers[0];
    assert_eq!((provider.revenue, provider.receivable), (1_000_000, 1_400_000), "{summary:?}");
    assert_eq!(summary.payers[0].unfunded, 1_400_000);
    wait_paid(&server, 1).await;
    assert_eq!(chain.balances(), vec![1_000_000], "paid on chain what was funded, no more");
    assert_eq!(balance(&server, Account::receivable("frugal", wallet.as_str())).await, 1_400_000);

    // The payer pays its $1.46 debt and more: the next epoch pays the provider the rest.
    server.metering().add_credits("frugal", 2_000_000).await.unwrap();
    clock.advance_ms(1_000);
    let summary = server.metering().settle_now(false).await.unwrap();
    assert_eq!(summary.providers[0].repaid, 1_400_000, "{summary:?}");
    wait_paid(&server, 2).await;
    assert_eq!(chain.balances(), vec![2_400_000]);
    assert_eq!(balance(&server, Account::receivable("frugal", wallet.as_str())).await, 0);
    let sum: i64 = server.metering().balances().await.unwrap().iter().map(|(_, b)| b).sum();
    assert_eq!(sum, 0);
    server.shutdown().await;
}

/// Tenants pay USDC into the head's deposit address with a memo naming their account:
/// the head reads them over Solana's JSON-RPC (the runtime's history behind a loopback
/// node) and credits each transfer once, also across a head restart between two of them;
/// one without a valid memo is held, listed to the operator, and credits nobody; a tenant
/// sees its own deposits only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_in_deposits_credit_their_accounts_once_also_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let chain = Chain::new(0);
    let clock = ManualClock::new(START);
    let mut with_payouts = options(dir.path(), &clock);
    with_payouts.payouts = Some(chain.settings(&dir.path().join("payouts.redb")));
    let server = start(with_payouts).await;
    let admin = server.admin_credential(Duration::from_secs(600));
    let mut client = ionet_common::rpc::metering_client(&server.address().to_string(), &admin).await.unwrap();
    let reply = client.deposits(DepositsRequest {}).await.unwrap().into_inner();
    assert!(reply.watching, "{reply:?}");
    assert_eq!(reply.address, associated_token_address(&chain.authority.pubkey(), &chain.mint).to_string());
    assert_eq!(reply.memo, "ionet:<account>");

    let (alice, bob, mallory) = (Keypair::new(), Keypair::new(), Keypair::new());
    for tenant in [&alice, &bob, &mallory] {
        chain.svm.airdrop(&tenant.pubkey(), SOL);
        chain.svm.mint_to_owner(&chain.authority, &chain.mint, &tenant.pubkey(), 10_000_000);
    }
    let owner = chain.authority.pubkey();
    chain.svm.pay_token(&alice, &chain.mint, 6, &owner, 5_000_000, Some("ionet:alice"));
    wait_balance(&server, "alice", 5_000_000).await;
    server.shutdown().await;

    // While the head is down: bob pays, and mallory pays without a memo.
    chain.svm.pay_token(&bob, &chain.mint, 6, &owner, 3_000_000, Some("ionet:bob"));
    let held = chain.svm.pay_token(&mallory, &chain.mint, 6, &owner, 1_000_000, None);
    let mut again = options(dir.path(), &clock);
    again.payouts = Some(chain.settings(&dir.path().join("payouts.redb")));
    let server = start(again).await;
    wait_balance(&server, "bob", 3_000_000).await;
    assert_eq!(balance(&server, Account::payer("alice")).await, 5_000_000, "credited once, not again");
    let admin = server.admin_credential(Duration::from_secs(600));
    let mut client = ionet_common::rpc::metering_client(&server.address().to_string(), &admin).await.unwrap();
    let deposits = client.deposits(DepositsRequest {}).await.unwrap().into_inner().deposits;
    assert_eq!(deposits.len(), 3, "{deposits:?}");
    let mallorys = deposits.iter().find(|deposit| deposit.signature == held.to_string()).unwrap();
    assert!(mallorys.account.is_empty() && mallorys.state.starts_with("held: no memo"), "{mallorys:?}");
    // A tenant sees its own deposits only: not another's, not the held one.
    let bobs_view = server.account_credential("bob", Duration::from_secs(600));
    let mut as_bob = ionet_common::rpc::metering_client(&server.address().to_string(), &bobs_view).await.unwrap();
    let seen: Vec<_> = as_bob.deposits(DepositsRequest {}).await.unwrap().into_inner().deposits;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!((seen[0].account.as_str(), seen[0].amount, seen[0].state.as_str()), ("bob", 3_000_000, "credited"));
    let credited: i64 = server
        .metering()
        .balances()
        .await
        .unwrap()
        .iter()
        .filter(|(account, _)| matches!(account, Account::Payer(_)))
        .map(|(_, balance)| balance)
        .sum();
    assert_eq!(credited, 8_000_000, "the held deposit credits nobody");
    server.shutdown().await;
}

async fn wait_balance(server: &GcsServer, payer: &str, micros: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while balance(server, Account::payer(payer)).await != micros {
        assert!(Instant::now() < deadline, "{payer} was never credited {micros}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
