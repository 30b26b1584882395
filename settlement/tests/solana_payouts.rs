//! Solana payouts against an in-process SVM (litesvm) running the real SPL Token,
//! Associated Token Account and Memo programs: exact amounts, packet-sized batches with
//! memos, and at-most-once payment across re-runs, crashes, lost acknowledgements and
//! expired blockhashes.
#![cfg(feature = "svm")]

use std::time::Duration;

use ionet_common::resources::{CPU, GPU};
use ionet_common::{JobId, NodeId, Quantity, ResourceSet};
use ionet_settlement::solana::plan::associated_token_address;
use ionet_settlement::solana::svm::SvmChain;
use ionet_settlement::solana::{
    AttemptState, ChainAccount, EpochPayouts, MemoryPayoutStore, PayoutAsset, PayoutChain, PayoutConfig, PayoutOutcome,
    PayoutReport, PayoutStore, RedbPayoutStore, RpcChain, SignatureStatus, SolanaPayouter, PACKET_DATA_SIZE,
    TOKEN_PROGRAM_ID,
};
use ionet_settlement::{EpochSpec, EpochSummary, Ledger, LedgerConfig, MemoryStore, SettlementError, SettlementResult};
use ionet_settlement::{RecordId, UsageRecord};
use solana_hash::Hash;
use solana_keypair::Keypair;
use solana_pubkey::Pubkey;
use solana_signature::Signature;
use solana_signer::Signer;
use solana_transaction::Transaction;

const SOL: u64 = 1_000_000_000;

/// How a [`FaultyChain`] mishandles the next send of a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SendFault {
    None,
    /// The transaction executes, the caller hears an error (timeout, crash after send).
    LoseAck {
        after_sends: usize,
    },
    /// The transaction never reaches the chain; the caller hears an error.
    Drop {
        after_sends: usize,
    },
}

struct FaultyChain {
    inner: SvmChain,
    fault: SendFault,
    sends: usize,
}

impl PayoutChain for FaultyChain {
    fn send_transaction(&mut self, transaction: &Transaction) -> SettlementResult<Signature> {
        let sends = self.sends;
        self.sends += 1;
        let lost = || Err(SettlementError::Chain { operation: "send_transaction", message: "connection reset".into() });
        match self.fault {
            SendFault::Drop { after_sends } if sends == after_sends => {
                self.fault = SendFault::None;
                lost()
            }
            SendFault::LoseAck { after_sends } if sends == after_sends => {
                self.fault = SendFault::None;
                self.inner.send_transaction(transaction)?;
                lost()
            }
            _ => self.inner.send_transaction(transaction),
        }
    }

    fn signature_status(&mut self, signature: &Signature) -> SettlementResult<Option<SignatureStatus>> {
        self.inner.signature_status(signature)
    }

    fn latest_blockhash(&mut self) -> SettlementResult<Hash> {
        self.inner.latest_blockhash()
    }

    fn is_blockhash_valid(&mut self, blockhash: &Hash) -> SettlementResult<bool> {
        self.inner.is_blockhash_valid(blockhash)
    }

    fn get_account(&mut self, address: &Pubkey) -> SettlementResult<Option<ChainAccount>> {
        self.inner.get_account(address)
    }
}

/// A store whose process "dies" on the first write recording a landed batch: the
/// transaction went out and landed, the record of it did not.
struct CrashBeforeRecordingLanded<S> {
    inner: S,
    armed: bool,
}

impl<S: PayoutStore> PayoutStore for CrashBeforeRecordingLanded<S> {
    fn epoch_payouts(&self, epoch_id: u64) -> SettlementResult<Option<EpochPayouts>> {
        self.inner.epoch_payouts(epoch_id)
    }

    fn put_epoch_payouts(&mut self, payouts: &EpochPayouts) -> SettlementResult<()> {
        let landed = payouts.batches.iter().any(|batch| batch.landed().is_some());
        if self.armed && landed {
            self.armed = false;
            return Err(SettlementError::Io(std::io::Error::other("simulated crash before recording")));
        }
        self.inner.put_epoch_payouts(payouts)
    }

    fn epochs(&self) -> SettlementResult<Vec<u64>> {
        self.inner.epochs()
    }
}

fn usage(id: u128, wallet: &str, gpu_minutes: u64, end_ms: u64) -> UsageRecord {
    UsageRecord {
        record_id: RecordId(id),
        job_id: JobId::from_sequence(id as u32),
        payer_account: "acme".into(),
        node_id: NodeId::from_array([id as u8; 28]),
        provider_wallet: wallet.into(),
        resources: ResourceSet::new().with(GPU, Quantity::whole(1)).with(CPU, Quantity::whole(4)),
        start_ms: end_ms - gpu_minutes * 60_000,
        end_ms,
        price_per_gpu_hour: 2_345_678,
        price_per_cpu_hour: 10_001,
    }
}

/// Settles an epoch in which each wallet sold a different, odd number of GPU-minutes,
/// through the real ledger: the summary the head would hand to `pay_epoch`.
fn settled_epoch(epoch_id: u64, wallets: &[Pubkey]) -> EpochSummary {
    let mut ledger = Ledger::new(MemoryStore::new(), LedgerConfig::default()).unwrap();
    ledger.add_credits("acme", 1_000_000_000).unwrap();
    let end_ms = 100 * 3_600_000;
    let records: Vec<_> = wallets
        .iter()
        .enumerate()
        .map(|(i, wallet)| usage(i as u128 + 1, &wallet.to_string(), 7 + 13 * i as u64, end_ms))
        .collect();
    ledger.accept_records(&records).unwrap();
    ledger.settle_epoch(&EpochSpec::new(epoch_id, end_ms)).unwrap().summary().clone()
}

struct TokenSetup {
    chain: SvmChain,
    authority: Keypair,
    mint: Pubkey,
    providers: Vec<Pubkey>,
}

/// A 6-decimal mint whose authority holds `funds` base units in its associated account.
fn token_setup(providers: usize, funds: u64) -> TokenSetup {
    let chain = SvmChain::new();
    let authority = Keypair::new();
    chain.airdrop(&authority.pubkey(), 100 * SOL);
    let mint = chain.create_funded_mint(&authority, 6, funds);
    let providers = (0..providers).map(|_| Keypair::new().pubkey()).collect();
    TokenSetup { chain, authority, mint, providers }
}

fn config(asset: PayoutAsset) -> PayoutConfig {
    PayoutConfig {
        confirm_timeout: Duration::from_secs(5),
        poll_interval: Duration::from_millis(1),
        ..PayoutConfig::new(asset)
    }
}

fn token_payouter<C: PayoutChain, S: PayoutStore>(setup: &TokenSetup, chain: C, store: S) -> SolanaPayouter<C, S> {
    let asset = PayoutAsset::Token { mint: setup.mint, decimals: 6 };
    SolanaPayouter::new(chain, store, setup.authority.insecure_clone(), config(asset)).unwrap()
}

fn provider_token_balances(setup: &TokenSetup) -> Vec<u64> {
    setup
        .providers
        .iter()
        .map(|wallet| setup.chain.token_balance(&associated_token_address(wallet, &setup.mint)))
        .collect()
}

/// What each provider must receive: revenue + reward, micro-USD = base units at 6 decimals.
fn expected(summary: &EpochSummary, providers: &[Pubkey]) -> Vec<u64> {
    providers
        .iter()
        .map(|wallet| {
            let provider = summary.providers.iter().find(|p| p.wallet == wallet.to_string()).unwrap();
            provider.revenue + provider.reward
        })
        .collect()
}

fn assert_each_batch_landed_once(report: &PayoutReport) {
    for batch in &report.batches {
        assert!(!batch.signature.is_empty(), "batch {} has no landed transaction", batch.index);
    }
}

#[test]
fn token_payout_to_25_providers_moves_exact_amounts_in_packet_sized_batches_with_memos() {
    let setup = token_setup(25, 10_000_000_000);
    let summary = settled_epoch(7, &setup.providers);
    let want = expected(&summary, &setup.providers);
    assert!(want.iter().all(|&amount| amount > 0));
    assert!(want.iter().any(|amount| amount % 1_000_000 != 0), "amounts should have sub-dollar digits");
    let source = associated_token_address(&setup.authority.pubkey(), &setup.mint);
    let source_before = setup.chain.token_balance(&source);

    let mut payouter = token_payouter(&setup, setup.chain.clone(), MemoryPayoutStore::new());
    let report = payouter.pay_epoch(&summary).unwrap();

    assert_eq!(report.outcome, PayoutOutcome::Paid);
    assert_eq!(provider_token_balances(&setup), want);
    let total: u64 = want.iter().sum();
    assert_eq!(report.total_amount, total);
    assert_eq!(report.total_micro_usd, summary.total_usage + summary.total_rewards);
    assert_eq!(setup.chain.token_balance(&source), source_before - total);
    assert!(report.batches.len() >= 2, "25 token payouts cannot fit one transaction");
    assert_each_batch_landed_once(&report);

    let record = payouter.store().epoch_payouts(7).unwrap().unwrap();
    let count = record.batches.len();
    for batch in &record.batches {
        assert_eq!(batch.attempts.len(), 1);
        let attempt = batch.landed().unwrap();
        assert!(
            attempt.transaction.len() <= PACKET_DATA_SIZE,
            "batch {} is {} bytes",
            batch.index,
            attempt.transaction.len()
        );
        let memo = format!("ionet settlement epoch 7 batch {}/{count}", batch.index);
        let logs = setup.chain.logs(&attempt.signature);
        assert!(logs.iter().any(|line| line.contains(&memo)), "no memo {memo:?} in {logs:#?}");
    }
    // Batches are as full as the packet allows: all but the last cannot take one more.
    let sizes: Vec<_> = record.batches.iter().map(|b| b.payouts.len()).collect();
    assert!(sizes[..count - 1].iter().all(|&n| n >= *sizes.last().unwrap()), "{sizes:?}");

    // Re-running the completed epoch moves nothing, not even a fee.
    let authority_lamports = setup.chain.lamports(&setup.authority.pubkey());
    let again = payouter.pay_epoch(&summary).unwrap();
    assert_eq!(again.outcome, PayoutOutcome::AlreadyPaid);
    assert_eq!(again.batches, report.batches);
    assert_eq!(provider_token_balances(&setup), want);
    assert_eq!(setup.chain.lamports(&setup.authority.pubkey()), authority_lamports);

    // A new payouter over the same store (a restart) agrees.
    let (_, store) = payouter.into_parts();
    let mut restarted = token_payouter(&setup, setup.chain.clone(), store);
    assert_eq!(restarted.pay_epoch(&summary).unwrap().outcome, PayoutOutcome::AlreadyPaid);
    assert_eq!(provider_token_balances(&setup), want);
}

#[test]
fn crash_after_sending_before_recording_then_rerun_pays_once() {
    let setup = token_setup(25, 10_000_000_000);
    let summary = settled_epoch(3, &setup.providers);
    let want = expected(&summary, &setup.providers);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("payouts.redb");

    let store = CrashBeforeRecordingLanded { inner: RedbPayoutStore::open(&path).unwrap(), armed: true };
    let mut payouter = token_payouter(&setup, setup.chain.clone(), store);
    let err = payouter.pay_epoch(&summary).unwrap_err();
    assert!(matches!(err, SettlementError::Io(_)), "{err}");
    drop(payouter);

    // The first batch landed on chain; its record still says in flight.
    let paid_first: Vec<u64> = provider_token_balances(&setup);
    assert!(paid_first.iter().any(|&b| b > 0) && paid_first.contains(&0), "{paid_first:?}");
    let store = RedbPayoutStore::open(&path).unwrap();
    let record = store.epoch_payouts(3).unwrap().unwrap();
    assert_eq!(record.batches[0].attempts.len(), 1);
    assert_eq!(record.batches[0].attempts[0].state, AttemptState::InFlight);

    // Its blockhash expires before the restart: found landed, it must not be re-signed.
    setup.chain.expire_blockhash();
    let mut payouter = token_payouter(&setup, setup.chain.clone(), store);
    let report = payouter.pay_epoch(&summary).unwrap();
    assert_eq!(report.outcome, PayoutOutcome::Paid);
    assert_eq!(provider_token_balances(&setup), want);
    assert!(report.batches.iter().all(|batch| batch.attempts == 1), "{:?}", report.batches);
    assert_eq!(payouter.pay_epoch(&summary).unwrap().outcome, PayoutOutcome::AlreadyPaid);
    assert_eq!(provider_token_balances(&setup), want);
}

#[test]
fn lost_send_acknowledgement_then_rerun_pays_once() {
    let setup = token_setup(25, 10_000_000_000);
    let summary = settled_epoch(4, &setup.providers);
    let want = expected(&summary, &setup.providers);
    let chain = FaultyChain { inner: setup.chain.clone(), fault: SendFault::LoseAck { after_sends: 1 }, sends: 0 };
    let mut payouter = token_payouter(&setup, chain, MemoryPayoutStore::new());
    let err = payouter.pay_epoch(&summary).unwrap_err();
    assert!(err.is_retryable(), "{err}");

    let report = payouter.pay_epoch(&summary).unwrap();
    assert_eq!(provider_token_balances(&setup), want);
    assert!(report.batches.iter().all(|batch| batch.attempts == 1), "{:?}", report.batches);
}

#[test]
fn dropped_transaction_is_resent_as_is_or_resigned_only_after_its_blockhash_expired() {
    let setup = token_setup(25, 10_000_000_000);
    let summary = settled_epoch(5, &setup.providers);
    let want = expected(&summary, &setup.providers);
    // Batch 1 is dropped on the way; its blockhash is still valid on the re-run, so the
    // same bytes go out again. Batch 2 is dropped and its blockhash expires: a new
    // transaction is signed for it, once.
    let chain = FaultyChain { inner: setup.chain.clone(), fault: SendFault::Drop { after_sends: 0 }, sends: 0 };
    let mut payouter = token_payouter(&setup, chain, MemoryPayoutStore::new());
    payouter.pay_epoch(&summary).unwrap_err();
    assert_eq!(provider_token_balances(&setup), vec![0; 25]);
    payouter.chain().fault = SendFault::Drop { after_sends: 2 };
    payouter.pay_epoch(&summary).unwrap_err();
    setup.chain.expire_blockhash();
    let report = payouter.pay_epoch(&summary).unwrap();

    assert_eq!(provider_token_balances(&setup), want);
    let attempts: Vec<_> = report.batches.iter().map(|batch| batch.attempts).collect();
    assert_eq!(attempts[..2], [1, 2], "{attempts:?}");
    let record = payouter.store().epoch_payouts(5).unwrap().unwrap();
    assert_eq!(record.batches[1].attempts[0].state, AttemptState::Expired);
    assert_eq!(record.batches[1].attempts[1].state, AttemptState::Landed);
}

#[test]
fn short_funds_sign_nothing_and_a_funded_rerun_pays() {
    let setup = token_setup(3, 10);
    let summary = settled_epoch(9, &setup.providers);
    let mut payouter = token_payouter(&setup, setup.chain.clone(), MemoryPayoutStore::new());
    let err = payouter.pay_epoch(&summary).unwrap_err();
    assert!(matches!(err, SettlementError::PayoutFundsShort { available: 10, .. }), "{err}");
    let record = payouter.store().epoch_payouts(9).unwrap().unwrap();
    assert!(record.batches.iter().all(|batch| batch.attempts.is_empty()));

    setup.chain.execute(
        &[spl_token_interface::instruction::mint_to(
            &TOKEN_PROGRAM_ID,
            &setup.mint,
            &associated_token_address(&setup.authority.pubkey(), &setup.mint),
            &setup.authority.pubkey(),
            &[],
            1_000_000_000,
        )
        .unwrap()],
        &[&setup.authority],
    );
    payouter.pay_epoch(&summary).unwrap();
    assert_eq!(provider_token_balances(&setup), expected(&summary, &setup.providers));
}

#[test]
fn sol_payout_to_a_few_providers() {
    let chain = SvmChain::new();
    let authority = Keypair::new();
    chain.airdrop(&authority.pubkey(), 1_000 * SOL);
    let providers: Vec<Pubkey> = (0..4).map(|_| Keypair::new().pubkey()).collect();
    // Providers need no account beforehand, but a new one must end rent-exempt:
    // make the payouts large enough (at 150 USD/SOL).
    let summary = settled_epoch(2, &providers);
    let lamports_per_usd = SOL / 150;
    let asset = PayoutAsset::Sol { lamports_per_usd };
    let mut payouter =
        SolanaPayouter::new(chain.clone(), MemoryPayoutStore::new(), authority.insecure_clone(), config(asset.clone()))
            .unwrap();
    let report = payouter.pay_epoch(&summary).unwrap();
    assert_eq!(report.batches.len(), 1);
    let want: Vec<u64> = expected(&summary, &providers)
        .into_iter()
        .map(|micro| (micro as u128 * lamports_per_usd as u128 / 1_000_000) as u64)
        .collect();
    let got: Vec<u64> = providers.iter().map(|wallet| chain.lamports(wallet)).collect();
    assert_eq!(got, want);
    let logs = chain.logs(&report.batches[0].signature);
    assert!(logs.iter().any(|line| line.contains("ionet settlement epoch 2 batch 1/1")), "{logs:#?}");

    assert_eq!(payouter.pay_epoch(&summary).unwrap().outcome, PayoutOutcome::AlreadyPaid);
    let got: Vec<u64> = providers.iter().map(|wallet| chain.lamports(wallet)).collect();
    assert_eq!(got, want);
}

/// A payouter whose batches are signed against a durable nonce account of the authority
/// (created here, as the head does at start).
fn nonce_payouter<C: PayoutChain, S: PayoutStore>(
    setup: &TokenSetup,
    nonce: &Keypair,
    chain: C,
    store: S,
) -> SolanaPayouter<C, S> {
    let asset = PayoutAsset::Token { mint: setup.mint, decimals: 6 };
    let config = PayoutConfig { nonce_account: Some(nonce.pubkey()), ..config(asset) };
    // Created (or found) on the chain itself, before any fault is injected.
    let mut setup_payouter = SolanaPayouter::new(
        setup.chain.clone(),
        MemoryPayoutStore::new(),
        setup.authority.insecure_clone(),
        config.clone(),
    )
    .unwrap();
    assert_eq!(setup_payouter.ensure_nonce_account(nonce).unwrap(), nonce.pubkey());
    SolanaPayouter::new(chain, store, setup.authority.insecure_clone(), config).unwrap()
}

#[test]
fn nonce_payouts_are_signed_once_through_a_crash_after_signing_and_after_sending() {
    let setup = token_setup(25, 10_000_000_000);
    let nonce = Keypair::new();
    let summary = settled_epoch(11, &setup.providers);
    let want = expected(&summary, &setup.providers);
    // Batch 1 is signed and stored, then the process "dies" before it leaves (dropped).
    let chain = FaultyChain { inner: setup.chain.clone(), fault: SendFault::Drop { after_sends: 0 }, sends: 0 };
    let mut payouter = nonce_payouter(&setup, &nonce, chain, MemoryPayoutStore::new());
    payouter.pay_epoch(&summary).unwrap_err();
    assert_eq!(provider_token_balances(&setup), vec![0; 25]);
    // A long outage: many blockhashes expire. The stored transaction is still good.
    for _ in 0..5 {
        setup.chain.expire_blockhash();
    }
    // Batch 2 lands but the acknowledgement is lost (a crash after sending).
    payouter.chain().fault = SendFault::LoseAck { after_sends: 2 };
    payouter.pay_epoch(&summary).unwrap_err();
    let report = payouter.pay_epoch(&summary).unwrap();
    assert_eq!(provider_token_balances(&setup), want);
    assert!(report.batches.iter().all(|batch| batch.attempts == 1), "signed once each: {:?}", report.batches);
    let record = payouter.store().epoch_payouts(11).unwrap().unwrap();
    assert_eq!(record.nonce_account, nonce.pubkey().to_string());
    // Every attempt was signed against the nonce (its first instruction advances it).
    for batch in &record.batches {
        let attempt = batch.landed().unwrap();
        assert!(setup.chain.logs(&attempt.signature).iter().any(|line| line.contains("ionet settlement epoch 11")));
    }
    assert_eq!(payouter.pay_epoch(&summary).unwrap().outcome, PayoutOutcome::AlreadyPaid);
    // The nonce account is there once: asking again creates nothing.
    let lamports = setup.chain.lamports(&setup.authority.pubkey());
    assert_eq!(payouter.ensure_nonce_account(&nonce).unwrap(), nonce.pubkey());
    assert_eq!(setup.chain.lamports(&setup.authority.pubkey()), lamports);
}

#[test]
fn nonce_payout_landed_but_not_recorded_is_found_after_a_restart() {
    let setup = token_setup(25, 10_000_000_000);
    let nonce = Keypair::new();
    let summary = settled_epoch(12, &setup.providers);
    let want = expected(&summary, &setup.providers);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("payouts.redb");
    let store = CrashBeforeRecordingLanded { inner: RedbPayoutStore::open(&path).unwrap(), armed: true };
    let mut payouter = nonce_payouter(&setup, &nonce, setup.chain.clone(), store);
    assert!(matches!(payouter.pay_epoch(&summary).unwrap_err(), SettlementError::Io(_)));
    drop(payouter);
    for _ in 0..5 {
        setup.chain.expire_blockhash();
    }
    // The restart finds batch 1 landed (not resent, not re-signed) and pays the rest.
    let mut payouter = nonce_payouter(&setup, &nonce, setup.chain.clone(), RedbPayoutStore::open(&path).unwrap());
    let report = payouter.pay_epoch(&summary).unwrap();
    assert_eq!(provider_token_balances(&setup), want);
    assert!(report.batches.iter().all(|batch| batch.attempts == 1), "{:?}", report.batches);
    // The epoch keeps its own nonce whatever a later config says.
    let (_, store) = payouter.into_parts();
    let mut plain = token_payouter(&setup, setup.chain.clone(), store);
    assert_eq!(plain.pay_epoch(&summary).unwrap().outcome, PayoutOutcome::AlreadyPaid);
    assert_eq!(provider_token_balances(&setup), want);
}

#[test]
fn a_nonce_account_the_authority_cannot_pay_for_is_an_error_not_a_spin() {
    let setup = token_setup(1, 1_000);
    let poor = Keypair::new();
    let asset = PayoutAsset::Token { mint: setup.mint, decimals: 6 };
    let config = PayoutConfig { confirm_timeout: Duration::from_millis(20), ..config(asset) };
    let mut payouter = SolanaPayouter::new(setup.chain.clone(), MemoryPayoutStore::new(), poor, config).unwrap();
    let err = payouter.ensure_nonce_account(&Keypair::new()).unwrap_err();
    assert!(err.to_string().contains("did not appear"), "{err}");
}

/// The head's path in a deployment: the payouter speaks JSON-RPC to a node
/// ([`RpcChain`]), here the in-process runtime behind its loopback front. A nonce account
/// is made, every provider is paid its exact amount once, and the balances, statuses and
/// accounts read over RPC are the runtime's.
#[test]
fn nonce_payouts_through_the_rpc_client_against_the_runtime_behind_its_rpc_front() {
    let setup = token_setup(12, 10_000_000_000);
    let nonce = Keypair::new();
    let summary = settled_epoch(5, &setup.providers);
    let want = expected(&summary, &setup.providers);
    let url = setup.chain.serve_rpc().unwrap();
    let asset = PayoutAsset::Token { mint: setup.mint, decimals: 6 };
    let config = PayoutConfig { nonce_account: Some(nonce.pubkey()), ..config(asset) };
    let mut payouter =
        SolanaPayouter::new(RpcChain::new(&url), MemoryPayoutStore::new(), setup.authority.insecure_clone(), config)
            .unwrap();
    assert_eq!(payouter.ensure_nonce_account(&nonce).unwrap(), nonce.pubkey());
    let report = payouter.pay_epoch(&summary).unwrap();
    assert_each_batch_landed_once(&report);
    assert_eq!(provider_token_balances(&setup), want);
    assert_eq!(payouter.pay_epoch(&summary).unwrap().outcome, PayoutOutcome::AlreadyPaid);
    assert_eq!(provider_token_balances(&setup), want, "paid once");

    // What a wallet or explorer reads over the same RPC front.
    let client = solana_rpc_client::rpc_client::RpcClient::new(url);
    let account = associated_token_address(&setup.providers[3], &setup.mint);
    let balance = client.get_token_account_balance(&account).unwrap();
    assert_eq!((balance.amount, balance.decimals), (want[3].to_string(), 6));
    assert_eq!(balance.ui_amount_string, format!("{}", want[3] as f64 / 1e6));
    assert_eq!(client.get_balance(&setup.authority.pubkey()).unwrap(), setup.chain.lamports(&setup.authority.pubkey()));
    let signature: Signature = report.batches[0].signature.parse().unwrap();
    let status = client.get_signature_statuses(&[signature]).unwrap().value[0].clone().unwrap();
    assert!(status.err.is_none(), "{status:?}");
    assert_eq!(client.get_account(&account).unwrap().owner, TOKEN_PROGRAM_ID);
    let unknown = Keypair::new().pubkey();
    assert!(client.get_account_with_commitment(&unknown, Default::default()).unwrap().value.is_none());
    let refused = client.get_token_account_balance(&unknown).unwrap_err().to_string();
    assert!(refused.contains("not a token account"), "{refused}");
    // A transaction the runtime refuses (a transfer of more lamports than the payer has)
    // is refused to the sender, as a node's preflight refuses it.
    let poor = Keypair::new();
    let transfer = solana_system_interface::instruction::transfer(&poor.pubkey(), &unknown, 5);
    let blockhash = client.get_latest_blockhash().unwrap();
    let transaction = Transaction::new_signed_with_payer(&[transfer], Some(&poor.pubkey()), &[&poor], blockhash);
    let refused = client.send_transaction(&transaction).unwrap_err().to_string();
    assert!(refused.contains("simulation failed"), "{refused}");
}

/// The head reads its deposit address over Solana's JSON-RPC: every landed transfer into
/// it, oldest first, across more than one page of `getSignaturesForAddress`, then only
/// those after the last one read; transfers elsewhere are not returned.
#[test]
fn deposits_are_read_over_rpc_across_pages_and_after_a_cursor() {
    use ionet_settlement::solana::deposits::{self, DepositSource};

    let svm = SvmChain::new();
    let (owner, tenant, elsewhere) = (Keypair::new().pubkey(), Keypair::new(), Keypair::new().pubkey());
    // Both recipients exist (a transfer of a few lamports into a new account fails for rent).
    for account in [&tenant.pubkey(), &owner, &elsewhere] {
        svm.airdrop(account, 10 * SOL);
    }
    let asset = PayoutAsset::Sol { lamports_per_usd: 1 };
    let mut sender = svm.clone();
    let mut pay = |to: &Pubkey, lamports: u64, memo: &str| {
        let instructions = [
            solana_system_interface::instruction::transfer(&tenant.pubkey(), to, lamports),
            solana_instruction::Instruction::new_with_bytes(
                ionet_settlement::solana::MEMO_PROGRAM_ID,
                memo.as_bytes(),
                vec![],
            ),
        ];
        let blockhash = sender.latest_blockhash().unwrap();
        let transaction =
            Transaction::new_signed_with_payer(&instructions, Some(&tenant.pubkey()), &[&tenant], blockhash);
        let signature = sender.send_transaction(&transaction).unwrap();
        assert_eq!(sender.signature_status(&signature).unwrap(), Some(SignatureStatus::Landed));
        signature
    };
    // More than a page (1,000 signatures): each a distinct amount, so a distinct transaction.
    let first: Vec<Signature> = (1..=1_001).map(|lamports| pay(&owner, lamports, "ionet:acme")).collect();
    pay(&elsewhere, 7, "ionet:acme");

    let mut rpc = RpcChain::new(svm.serve_rpc().unwrap());
    let landed = rpc.landed_to(&owner, None).unwrap();
    let read: Vec<Signature> = landed.iter().map(|(signature, _)| *signature).collect();
    assert_eq!(read, first, "every transfer in, oldest first, none elsewhere");
    let seen = deposits::observe(&landed[41].1, &asset, &owner).unwrap();
    assert_eq!((seen.amount, seen.memo.as_deref()), (42, Some("ionet:acme")));

    let later = pay(&owner, 5_000, "ionet:bob");
    let next = rpc.landed_to(&owner, first.last()).unwrap();
    assert_eq!(next.iter().map(|(signature, _)| *signature).collect::<Vec<_>>(), vec![later]);
    assert!(rpc.landed_to(&owner, Some(&later)).unwrap().is_empty());
}
