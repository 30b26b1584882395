//! Paying settled epochs out on Solana from the head (feature `solana`).
//!
//! A background task walks the ledger's closed epochs in order and hands each one that is
//! not yet fully paid to the settlement crate's [`SolanaPayouter`], on a blocking thread
//! (the RPC client blocks). It runs on every tick and right after each settlement.
//!
//! Invariants:
//! - The payouter's store (its own redb file beside the ledger) holds each epoch's plan
//!   and every signed transaction before it is sent, so a head killed at any point
//!   resumes the payout without paying anyone twice (see `ionet_settlement::solana`).
//! - Every landed batch is then posted to the ledger (provider → funding, kind `Payout`)
//!   under the once-only reference `solana:<epoch>:<batch>`; posting is repeated for every
//!   landed batch on every pass until the epoch is complete and posted, so a crash between
//!   the chain and the ledger loses nothing and posts nothing twice.
//! - An epoch that cannot be paid now (the authority is short of funds, the RPC node is
//!   down) stops the pass: later epochs wait, so payouts land in epoch order.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ionet_settlement::solana::{
    read_keypair_file, EpochPayouts, MemoryPayoutStore, PayoutAsset, PayoutChain, PayoutConfig, PayoutStore,
    RedbPayoutStore, RpcChain, SolanaPayouter,
};
use ionet_settlement::EpochSummary;
use solana_keypair::Keypair;
use tokio::sync::watch;

use ionet_common::rpc::proto::metering::{DepositInfo, DepositsReply, EpochPayoutInfo, PayoutBatchInfo};
use ionet_common::IonetError;
use ionet_settlement::solana::deposits::{self, DepositSource};
use ionet_settlement::solana::AttemptState;
use solana_pubkey::Pubkey;
use solana_signature::Signature;

use crate::error::{GcsError, GcsResult};
use crate::metering::{GcsLedger, Metering, PayoutView};
use crate::state::blocking;

type Payouter = SolanaPayouter<Box<dyn PayoutChain + Send>, Box<dyn PayoutStore>>;

/// How the head pays: the chain, the paying keypair, the asset, where the state lives.
pub struct PayoutSettings {
    pub chain: Box<dyn PayoutChain + Send>,
    pub authority: Keypair,
    pub config: PayoutConfig,
    /// The payout state file; `None`: in memory (tests only: a restart would forget
    /// transactions in flight).
    pub store_path: Option<PathBuf>,
    /// How often pending payouts are retried.
    pub retry_interval: Duration,
    /// The durable nonce account every payout transaction advances, so each is signed
    /// once (created under the authority on the first pass if it does not exist).
    /// `None`: transactions are signed against recent blockhashes.
    pub nonce: Option<Keypair>,
    /// Where landed transfers into the deposit address are read (`None`: deposits are not
    /// watched).
    pub deposits: Option<Box<dyn DepositSource + Send>>,
}

impl std::fmt::Debug for PayoutSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayoutSettings")
            .field("asset", &self.config.asset)
            .field("store_path", &self.store_path)
            .finish()
    }
}

impl PayoutSettings {
    /// Settings for a Solana RPC node at `rpc_url`, paying from the keypair file at
    /// `keypair_path` (the Solana CLI's JSON format) in `asset` (`sol:<lamports per USD>`
    /// or `spl:<mint>:<decimals>`).
    pub fn rpc(rpc_url: &str, keypair_path: &std::path::Path, asset: &str, store_path: PathBuf) -> GcsResult<Self> {
        let asset: PayoutAsset = asset.parse()?;
        let authority = read_keypair_file(keypair_path)?;
        // The nonce account's key lives beside the payout state (it only signs the
        // account's creation; the authority advances it).
        let nonce = load_or_create_keypair(&store_path.with_file_name("payout_nonce.json"))?;
        if !(rpc_url.starts_with("http://") || rpc_url.starts_with("https://")) {
            let why = format!("payout RPC URL {rpc_url:?} is not an http(s) URL");
            return Err(GcsError::Ionet(IonetError::InvalidArgument(why)));
        }
        Ok(PayoutSettings {
            chain: Box::new(RpcChain::new(rpc_url)),
            authority,
            config: PayoutConfig::new(asset),
            store_path: Some(store_path),
            retry_interval: Duration::from_secs(30),
            nonce: Some(nonce),
            deposits: Some(Box::new(RpcChain::new(rpc_url))),
        })
    }
}

/// The keypair in the Solana CLI's JSON file at `path`, made (0600) if absent.
fn load_or_create_keypair(path: &std::path::Path) -> GcsResult<Keypair> {
    if path.exists() {
        return Ok(read_keypair_file(path)?);
    }
    let keypair = Keypair::new();
    // The Solana CLI's format: a JSON array of the 64 secret and public key bytes.
    let bytes: Vec<String> = keypair.to_bytes().iter().map(u8::to_string).collect();
    let text = format!("[{}]", bytes.join(","));
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|err| GcsError::Storage(format!("cannot create {}: {err}", path.display())))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|err| GcsError::Storage(format!("cannot write {}: {err}", path.display())))?;
    Ok(keypair)
}

/// The head's payer: one payouter, used by one pass at a time.
pub struct Payouts {
    payouter: Arc<Mutex<Payouter>>,
    metering: Arc<Metering>,
    ledger: GcsLedger,
    /// Epochs paid in full and posted to the ledger: never looked at again.
    done: Mutex<BTreeSet<u64>>,
    retry_interval: Duration,
    /// The nonce account's keypair until the account is known to exist.
    nonce: Mutex<Option<Keypair>>,
    /// Landed transfers into the deposit account, and what each came to.
    deposits: Arc<Mutex<Option<Box<dyn DepositSource + Send>>>>,
    /// The last transaction read from the deposit source (the next scan starts after it).
    cursor: Arc<Mutex<Option<Signature>>>,
    seen: Arc<Mutex<Vec<DepositInfo>>>,
    asset: PayoutAsset,
    owner: Pubkey,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Payouts {
    /// Opens the payout store and attaches the payer to `metering` (for `ListPayouts`).
    pub async fn open(settings: PayoutSettings, metering: Arc<Metering>) -> GcsResult<Arc<Self>> {
        let PayoutSettings { chain, authority, mut config, store_path, retry_interval, nonce, deposits } = settings;
        let (asset, owner) = (config.asset.clone(), solana_signer::Signer::pubkey(&authority));
        config.nonce_account = nonce.as_ref().map(solana_signer::Signer::pubkey);
        let payouter = blocking(move || {
            let store: Box<dyn PayoutStore> =
                match &store_path {
                    Some(path) => Box::new(RedbPayoutStore::open(path).map_err(|err| {
                        GcsError::Storage(format!("cannot open payout store {}: {err}", path.display()))
                    })?),
                    None => Box::new(MemoryPayoutStore::new()),
                };
            Ok(SolanaPayouter::new(chain, store, authority, config)?)
        })
        .await?;
        tracing::info!(authority = %payouter.authority(), source = %payouter.source_account(), "solana payouts enabled");
        let payouts = Arc::new(Payouts {
            payouter: Arc::new(Mutex::new(payouter)),
            ledger: metering.ledger().clone(),
            metering: metering.clone(),
            done: Mutex::new(BTreeSet::new()),
            retry_interval,
            nonce: Mutex::new(nonce),
            deposits: Arc::new(Mutex::new(deposits)),
            cursor: Arc::new(Mutex::new(None)),
            seen: Arc::new(Mutex::new(Vec::new())),
            asset,
            owner,
        });
        let view: Arc<dyn PayoutView> = payouts.clone();
        metering.set_payouts(Arc::downgrade(&view));
        Ok(payouts)
    }

    /// The payout state of every epoch that has one, oldest first.
    pub async fn records(&self) -> GcsResult<Vec<EpochPayouts>> {
        let payouter = self.payouter.clone();
        blocking(move || {
            let payouter = lock(&payouter);
            let store = payouter.store();
            let mut all = Vec::new();
            for epoch in store.epochs()? {
                all.extend(store.epoch_payouts(epoch)?);
            }
            Ok(all)
        })
        .await
    }

    /// One pass: pays and posts every closed epoch not yet done, in order, stopping at
    /// the first that cannot be finished now. Returns how many epochs are done in all.
    pub async fn pay_pending(&self) -> GcsResult<usize> {
        // First make sure the nonce account exists (once per process).
        let nonce = lock(&self.nonce).as_ref().map(Keypair::insecure_clone);
        if let Some(nonce) = nonce {
            let payouter = self.payouter.clone();
            let address = blocking(move || Ok(lock(&payouter).ensure_nonce_account(&nonce)?)).await?;
            tracing::info!(nonce = %address, "payouts are signed against this durable nonce account");
            *lock(&self.nonce) = None;
        }
        let ledger = self.ledger.clone();
        let epochs: Vec<EpochSummary> = blocking(move || Ok(ledger.lock().epochs()?)).await?;
        for summary in epochs {
            if lock(&self.done).contains(&summary.epoch_id) {
                continue;
            }
            let epoch_id = summary.epoch_id;
            let payouter = self.payouter.clone();
            let ledger = self.ledger.clone();
            let complete = blocking(move || {
                let mut payouter = lock(&payouter);
                let paid = payouter.pay_epoch(&summary);
                // Post what landed even when the rest failed: it moved money.
                let record = payouter.store().epoch_payouts(summary.epoch_id)?;
                if let Some(record) = &record {
                    post_landed(&ledger, record)?;
                }
                let report = paid?;
                tracing::info!(
                    epoch = report.epoch_id,
                    outcome = ?report.outcome,
                    batches = report.batches.len(),
                    total = report.total_amount,
                    "epoch payout finished"
                );
                Ok(record.is_some_and(|record| record.is_complete()))
            })
            .await;
            match complete {
                Ok(true) => {
                    lock(&self.done).insert(epoch_id);
                }
                Ok(false) => break,
                Err(err) => {
                    tracing::warn!(epoch = epoch_id, error = %err, "epoch payout not finished; retrying later");
                    break;
                }
            }
        }
        Ok(lock(&self.done).len())
    }

    /// Reads the transfers into the deposit account that landed since the last scan and
    /// credits each with a valid memo once (keyed by its signature, so the rescan of a
    /// head that restarted credits nothing twice); the others are held. Returns how many
    /// were newly credited.
    pub async fn scan_deposits(&self) -> GcsResult<usize> {
        let (source, cursor, seen, ledger) =
            (self.deposits.clone(), self.cursor.clone(), self.seen.clone(), self.ledger.clone());
        let (asset, owner) = (self.asset.clone(), self.owner);
        blocking(move || {
            let mut source = lock(&source);
            let Some(source) = source.as_mut() else { return Ok(0) };
            let after = *lock(&cursor);
            let landed = source.landed_to(&deposits::deposit_account(&asset, &owner), after.as_ref())?;
            let Some(&(last, _)) = landed.last() else { return Ok(0) };
            let mut listed = Vec::with_capacity(landed.len());
            let mut credited = 0;
            for (signature, transaction) in landed {
                let Some(observed) = deposits::observe(&transaction, &asset, &owner) else { continue };
                let micro_usd = deposits::micro_usd_of(&asset, observed.amount);
                let (account, state) = match deposits::account_of(observed.memo.as_deref()) {
                    Ok(account) if micro_usd > 0 => {
                        let reference = format!("solana:{signature}");
                        match ledger.lock().deposit_once(&account, micro_usd, &reference) {
                            Ok(fresh) => {
                                if fresh {
                                    credited += 1;
                                    tracing::info!(%account, micro_usd, %signature, "deposit credited");
                                }
                                (account, "credited".to_string())
                            }
                            // One deposit the ledger refuses (too large) holds up no other.
                            Err(err @ ionet_settlement::SettlementError::InvalidAmount { .. }) => {
                                (String::new(), format!("held: {err}"))
                            }
                            // The cursor stays: the next scan reads these again.
                            Err(err) => return Err(err.into()),
                        }
                    }
                    Ok(_) => (String::new(), "held: worth less than a micro-USD".to_string()),
                    Err(why) => (String::new(), format!("held: {why}")),
                };
                listed.push(DepositInfo {
                    signature: signature.to_string(),
                    amount: observed.amount,
                    micro_usd,
                    account,
                    state,
                });
            }
            lock(&seen).extend(listed);
            *lock(&cursor) = Some(last);
            Ok(credited)
        })
        .await
    }

    /// Runs passes on every wake-up and every retry interval until `stopped`.
    pub async fn run(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.retry_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.metering.settled().notified() => {}
                _ = stopped.changed() => return,
            }
            if let Err(err) = self.scan_deposits().await {
                tracing::warn!(error = %err, "reading the deposit address failed; retrying later");
            }
            if let Err(err) = self.pay_pending().await {
                tracing::warn!(error = %err, "payout pass failed; retrying later");
            }
        }
    }
}

/// Posts each landed batch of `record` to the ledger, once per batch.
fn post_landed(ledger: &GcsLedger, record: &EpochPayouts) -> GcsResult<()> {
    for batch in record.batches.iter().filter(|batch| batch.landed().is_some()) {
        let reference = format!("solana:{}:{}", record.epoch_id, batch.index);
        let payouts: Vec<(String, u64)> =
            batch.payouts.iter().map(|payout| (payout.wallet.clone(), payout.micro_usd)).collect();
        ledger.lock().record_payout(record.epoch_id, &reference, &payouts)?;
    }
    Ok(())
}

#[tonic::async_trait]
impl PayoutView for Payouts {
    async fn deposits(&self) -> GcsResult<DepositsReply> {
        let watching = lock(&self.deposits).is_some();
        Ok(DepositsReply {
            watching,
            reason: if watching { String::new() } else { "this head watches no deposit address".into() },
            address: deposits::deposit_account(&self.asset, &self.owner).to_string(),
            asset: self.asset.to_string(),
            memo: format!("{}<account>", deposits::MEMO_PREFIX),
            deposits: lock(&self.seen).clone(),
        })
    }

    async fn list(&self) -> GcsResult<Vec<EpochPayoutInfo>> {
        Ok(self.records().await?.iter().map(epoch_info).collect())
    }
}

fn epoch_info(record: &EpochPayouts) -> EpochPayoutInfo {
    let batches = record
        .batches
        .iter()
        .map(|batch| {
            let shown = batch.landed().or(batch.attempts.last());
            let state = match shown.map(|attempt| &attempt.state) {
                None => "not sent".to_string(),
                Some(AttemptState::Landed) => "landed".to_string(),
                Some(AttemptState::InFlight) => "in flight".to_string(),
                Some(AttemptState::Failed { error }) => format!("failed: {error}"),
                Some(AttemptState::Expired) => "expired".to_string(),
            };
            PayoutBatchInfo {
                index: batch.index,
                payouts: batch.payouts.len() as u32,
                micro_usd: batch.payouts.iter().map(|payout| payout.micro_usd).sum(),
                amount: batch.total_amount(),
                state,
                signature: shown.map(|attempt| attempt.signature.clone()).unwrap_or_default(),
                attempts: batch.attempts.len() as u32,
            }
        })
        .collect();
    EpochPayoutInfo {
        epoch_id: record.epoch_id,
        asset: record.asset.clone(),
        authority: record.authority.clone(),
        batches,
        skipped: record.skipped.len() as u32,
        complete: record.is_complete(),
    }
}
