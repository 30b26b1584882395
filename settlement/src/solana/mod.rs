//! Paying settled epochs out on Solana (feature `solana`).
//!
//! After [`Ledger::settle_epoch`](crate::Ledger::settle_epoch), [`SolanaPayouter::pay_epoch`]
//! pays every provider of the [`EpochSummary`] what the epoch credited it, in SOL or in an
//! SPL token ([`PayoutAsset`]), from one authority keypair. Amounts and batches are
//! planned by [`plan`] (pure); the state lives in a [`PayoutStore`]; the chain is a
//! [`PayoutChain`] (an RPC node, or an in-process SVM in tests).
//!
//! Protocol, per epoch (properties in `README.md` beside this file):
//!
//! 1. Load the epoch's record. If absent: plan payouts and batches, store them. The
//!    batches of an epoch never change after this, so retries pay the same amounts.
//! 2. For each batch not yet landed, first resolve its in-flight attempt, if any: read
//!    whether its blockhash is still valid, *then* its signature's status (in that
//!    order: a transaction found missing after its blockhash expired can never land).
//!    Found landed → record; found failed → record (it moved nothing); not found with a
//!    valid blockhash → resend the same bytes and poll; not found, expired → record
//!    expired.
//! 3. With no in-flight or landed attempt: check the paying account holds the batch,
//!    sign with the latest blockhash, **store the attempt**, then send and poll as in 2.
//!
//! A crash anywhere leaves at most one in-flight attempt per batch, which the next run
//! resolves before it signs anything; a transaction that may have landed is never
//! replaced by another paying the same providers.

pub mod chain;
pub mod deposits;
pub mod plan;
pub mod store;
#[cfg(feature = "svm")]
pub mod svm;
#[cfg(feature = "svm")]
mod svm_rpc;

use std::time::{Duration, Instant};

use ionet_common::resources::MicroUsd;
use solana_hash::Hash;
use solana_keypair::Keypair;
use solana_pubkey::Pubkey;
use solana_signature::Signature;
use solana_signer::Signer;
use tracing::{info, warn};

pub use chain::{read_keypair_file, ChainAccount, PayoutChain, RpcChain, SignatureStatus};
pub use plan::{PayoutAsset, ProviderPayout, SkippedPayout, MEMO_PROGRAM_ID, PACKET_DATA_SIZE, TOKEN_PROGRAM_ID};
pub use store::{
    AttemptState, EpochPayouts, MemoryPayoutStore, PayoutAttempt, PayoutBatch, PayoutStore, RedbPayoutStore,
};

use crate::error::{SettlementError, SettlementResult};
use crate::ledger::EpochSummary;

/// Lamports that keep a nonce account (80 bytes) rent-exempt at the default rent:
/// `(80 + 128) × 3480 × 2`.
pub const NONCE_ACCOUNT_RENT: u64 = 1_447_680;

/// Fresh signatures one `pay_epoch` call may make for one batch before it gives up with
/// [`SettlementError::PayoutUnconfirmed`] (each needs the previous one expired).
const MAX_FRESH_ATTEMPTS_PER_CALL: usize = 3;

/// How epochs are paid.
#[derive(Clone, Debug)]
pub struct PayoutConfig {
    pub asset: PayoutAsset,
    /// Pay availability rewards with the revenue (true: everything the epoch credited
    /// `provider:<wallet>`). False pays usage revenue only.
    pub include_rewards: bool,
    /// How long one call waits for a sent transaction to land before returning
    /// `PayoutUnconfirmed` (the next call picks it up).
    pub confirm_timeout: Duration,
    /// Pause between status polls.
    pub poll_interval: Duration,
    /// A durable nonce account under the authority (see
    /// [`SolanaPayouter::ensure_nonce_account`]): every batch is signed once, against it,
    /// and a resend is always the same transaction. `None`: signed against recent
    /// blockhashes, re-signed only after one is seen expired unlanded.
    pub nonce_account: Option<Pubkey>,
}

impl PayoutConfig {
    pub fn new(asset: PayoutAsset) -> Self {
        PayoutConfig {
            asset,
            include_rewards: true,
            confirm_timeout: Duration::from_secs(90),
            poll_interval: Duration::from_millis(500),
            nonce_account: None,
        }
    }
}

/// What [`SolanaPayouter::pay_epoch`] found or did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayoutOutcome {
    /// This call finished the epoch's payout (some batches may have landed earlier).
    Paid,
    /// Every batch had landed before this call; nothing was sent.
    AlreadyPaid,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchReport {
    pub index: u32,
    /// The signature of the transaction that landed.
    pub signature: String,
    pub payouts: usize,
    pub amount: u64,
    /// Transactions signed for this batch so far (more than one after an expiry).
    pub attempts: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayoutReport {
    pub epoch_id: u64,
    pub outcome: PayoutOutcome,
    pub batches: Vec<BatchReport>,
    pub skipped: Vec<SkippedPayout>,
    pub total_micro_usd: MicroUsd,
    /// In the asset's base units.
    pub total_amount: u64,
}

/// How an in-flight attempt was resolved.
enum Resolution {
    Landed,
    Failed(String),
    Expired,
    StillInFlight,
}

/// Pays settled epochs from `authority` through `chain`, recording in `store`.
pub struct SolanaPayouter<C: PayoutChain, S: PayoutStore> {
    chain: C,
    store: S,
    authority: Keypair,
    config: PayoutConfig,
}

impl<C: PayoutChain, S: PayoutStore> std::fmt::Debug for SolanaPayouter<C, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SolanaPayouter")
            .field("authority", &self.authority.pubkey())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<C: PayoutChain, S: PayoutStore> SolanaPayouter<C, S> {
    /// `authority` signs every payout and pays the fees; for a token it owns the source
    /// associated token account (and pays the rent of providers' new token accounts).
    pub fn new(chain: C, store: S, authority: Keypair, config: PayoutConfig) -> SettlementResult<Self> {
        config.asset.validate()?;
        Ok(SolanaPayouter { chain, store, authority, config })
    }

    pub fn authority(&self) -> Pubkey {
        self.authority.pubkey()
    }

    /// Where payouts come from: the authority (SOL) or its associated token account.
    pub fn source_account(&self) -> Pubkey {
        plan::source_account(&self.config.asset, &self.authority.pubkey())
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn chain(&mut self) -> &mut C {
        &mut self.chain
    }

    pub fn into_parts(self) -> (C, S) {
        (self.chain, self.store)
    }

    /// Pays the providers of a settled epoch; see the module docs. Idempotent: calling
    /// again after any error or crash finishes the payout and pays nobody twice; calling
    /// after it finished sends nothing ([`PayoutOutcome::AlreadyPaid`]).
    pub fn pay_epoch(&mut self, summary: &EpochSummary) -> SettlementResult<PayoutReport> {
        let epoch_id = summary.epoch_id;
        let mut record = match self.store.epoch_payouts(epoch_id)? {
            Some(record) => {
                self.check_same_config(&record)?;
                record
            }
            None => {
                let record = self.plan_epoch(summary)?;
                self.store.put_epoch_payouts(&record)?;
                info!(
                    epoch = epoch_id,
                    batches = record.batches.len(),
                    skipped = record.skipped.len(),
                    asset = %self.config.asset,
                    "epoch payout planned"
                );
                record
            }
        };
        if record.is_complete() {
            return Ok(report(&record, PayoutOutcome::AlreadyPaid));
        }
        for position in 0..record.batches.len() {
            if record.batches[position].landed().is_none() {
                self.pay_batch(&mut record, position)?;
            }
        }
        info!(epoch = epoch_id, batches = record.batches.len(), "epoch paid out");
        Ok(report(&record, PayoutOutcome::Paid))
    }

    fn plan_epoch(&self, summary: &EpochSummary) -> SettlementResult<EpochPayouts> {
        let asset = &self.config.asset;
        let authority = self.authority.pubkey();
        let (payouts, skipped) = plan::plan_payouts(summary, asset, self.config.include_rewards)?;
        for skip in &skipped {
            warn!(epoch = summary.epoch_id, wallet = %skip.wallet, micro_usd = skip.micro_usd, reason = %skip.reason, "payout skipped");
        }
        let nonce = self.config.nonce_account;
        let batches = plan::split_batches(summary.epoch_id, asset, &authority, &payouts, nonce.as_ref())?
            .into_iter()
            .enumerate()
            .map(|(position, payouts)| PayoutBatch { index: position as u32 + 1, payouts, attempts: Vec::new() })
            .collect();
        Ok(EpochPayouts {
            epoch_id: summary.epoch_id,
            asset: asset.to_string(),
            authority: authority.to_string(),
            batches,
            skipped,
            nonce_account: nonce.map(|nonce| nonce.to_string()).unwrap_or_default(),
        })
    }

    fn check_same_config(&self, record: &EpochPayouts) -> SettlementResult<()> {
        let asset = self.config.asset.to_string();
        let authority = self.authority.pubkey().to_string();
        if record.asset != asset || record.authority != authority {
            return Err(SettlementError::PayoutConfig(format!(
                "epoch {} payout was planned in {} from {}, the config now pays {asset} from {authority}",
                record.epoch_id, record.asset, record.authority
            )));
        }
        // The nonce (or none) is the epoch's own, as planned: its transactions keep using
        // it whatever the config says now.
        Ok(())
    }

    /// Makes sure the durable nonce account `nonce` exists under the authority, creating
    /// it (paid by the authority) if it does not; returns its address. Idempotent: call
    /// it at every start.
    pub fn ensure_nonce_account(&mut self, nonce: &Keypair) -> SettlementResult<Pubkey> {
        const CREATIONS: usize = 3;
        let address = nonce.pubkey();
        let authority = self.authority.pubkey();
        for creation in 0..=CREATIONS {
            if let Some(account) = self.chain.get_account(&address)? {
                plan::nonce_value(&account.data, &authority)?;
                return Ok(address);
            }
            if creation == CREATIONS {
                break;
            }
            let instructions = solana_system_interface::instruction::create_nonce_account(
                &authority,
                &address,
                &authority,
                NONCE_ACCOUNT_RENT,
            );
            let blockhash = self.chain.latest_blockhash()?;
            let message = solana_message::Message::new(&instructions, Some(&authority));
            let mut transaction = solana_transaction::Transaction::new_unsigned(message);
            transaction
                .try_sign(&[&self.authority, nonce], blockhash)
                .map_err(|err| SettlementError::PayoutConfig(format!("signing the nonce account: {err}")))?;
            // Creating an account that exists fails and moves nothing: safe to repeat.
            if let Err(err) = self.chain.send_transaction(&transaction) {
                warn!(nonce = %address, error = %err, "sending the nonce account's creation failed");
            }
            info!(nonce = %address, authority = %authority, "payout nonce account creation sent");
            let deadline = Instant::now() + self.config.confirm_timeout;
            while Instant::now() < deadline && self.chain.get_account(&address)?.is_none() {
                std::thread::sleep(self.config.poll_interval);
            }
        }
        Err(SettlementError::PayoutConfig(format!(
            "the payout nonce account {address} did not appear after {CREATIONS} creations (does the authority \
             {authority} hold {NONCE_ACCOUNT_RENT} lamports for its rent?); trying again on the next pass"
        )))
    }

    /// The value the next transaction against `nonce` must carry.
    fn current_nonce(&mut self, nonce: &Pubkey) -> SettlementResult<Hash> {
        let account = self
            .chain
            .get_account(nonce)?
            .ok_or_else(|| SettlementError::PayoutConfig(format!("the payout nonce account {nonce} does not exist")))?;
        plan::nonce_value(&account.data, &self.authority.pubkey())
    }

    /// The nonce account an epoch's transactions advance, as planned.
    fn nonce_of(record: &EpochPayouts) -> SettlementResult<Option<Pubkey>> {
        if record.nonce_account.is_empty() {
            return Ok(None);
        }
        record.nonce_account.parse().map(Some).map_err(|_| {
            SettlementError::PayoutConfig(format!("stored nonce account {:?} is not an address", record.nonce_account))
        })
    }

    fn pay_batch(&mut self, record: &mut EpochPayouts, position: usize) -> SettlementResult<()> {
        let mut just_sent = false;
        let mut fresh_attempts = 0;
        loop {
            if let Some(attempt) = record.batches[position].in_flight().cloned() {
                let resolution = self.resolve(record, position, &attempt, just_sent)?;
                let batch = &mut record.batches[position];
                let stored = batch.attempts.iter_mut().find(|a| a.signature == attempt.signature).expect("in flight");
                let (epoch, index) = (record.epoch_id, batch.index);
                match resolution {
                    Resolution::StillInFlight => {
                        return Err(SettlementError::PayoutUnconfirmed {
                            epoch,
                            batch: index,
                            signature: attempt.signature,
                        });
                    }
                    Resolution::Landed => {
                        stored.state = AttemptState::Landed;
                        self.store.put_epoch_payouts(record)?;
                        info!(epoch, batch = index, signature = %attempt.signature, "payout batch landed");
                        return Ok(());
                    }
                    Resolution::Failed(error) => {
                        stored.state = AttemptState::Failed { error: error.clone() };
                        self.store.put_epoch_payouts(record)?;
                        return Err(SettlementError::PayoutFailed {
                            epoch,
                            batch: index,
                            signature: attempt.signature,
                            error,
                        });
                    }
                    Resolution::Expired => {
                        stored.state = AttemptState::Expired;
                        self.store.put_epoch_payouts(record)?;
                        warn!(epoch, batch = index, signature = %attempt.signature, "payout transaction expired unlanded; signing a new one");
                    }
                }
            }
            if fresh_attempts == MAX_FRESH_ATTEMPTS_PER_CALL {
                let batch = &record.batches[position];
                let signature = batch.attempts.last().map(|a| a.signature.clone()).unwrap_or_default();
                return Err(SettlementError::PayoutUnconfirmed {
                    epoch: record.epoch_id,
                    batch: batch.index,
                    signature,
                });
            }
            fresh_attempts += 1;
            self.check_funds(record, position)?;
            let blockhash = match Self::nonce_of(record)? {
                Some(nonce) => self.current_nonce(&nonce)?,
                None => self.chain.latest_blockhash()?,
            };
            let transaction = self.sign_batch(record, position, blockhash)?;
            // The attempt is durable before the transaction leaves this process.
            self.store.put_epoch_payouts(record)?;
            self.chain.send_transaction(&transaction)?;
            just_sent = true;
        }
    }

    /// Signs a new attempt for a batch and appends it (in memory) as in flight.
    fn sign_batch(
        &self,
        record: &mut EpochPayouts,
        position: usize,
        blockhash: Hash,
    ) -> SettlementResult<solana_transaction::Transaction> {
        let transaction = self.batch_transaction(record, position, blockhash)?;
        let batch = &mut record.batches[position];
        let bytes = plan::wire_bytes(&transaction);
        if bytes.len() > PACKET_DATA_SIZE {
            return Err(SettlementError::PayoutConfig(format!(
                "epoch {} batch {} is {} bytes, over the {PACKET_DATA_SIZE}-byte packet limit",
                record.epoch_id,
                batch.index,
                bytes.len()
            )));
        }
        batch.attempts.push(PayoutAttempt {
            signature: transaction.signatures[0].to_string(),
            blockhash: blockhash.to_string(),
            transaction: bytes,
            state: AttemptState::InFlight,
        });
        Ok(transaction)
    }

    /// The signed transaction of one batch with its memo, against `blockhash` (the nonce's
    /// value when the epoch pays against a nonce): deterministic, so a stored attempt can
    /// be rebuilt byte for byte.
    fn batch_transaction(
        &self,
        record: &EpochPayouts,
        position: usize,
        blockhash: Hash,
    ) -> SettlementResult<solana_transaction::Transaction> {
        let batch = &record.batches[position];
        let memo = plan::memo_text(record.epoch_id, batch.index as usize, record.batches.len());
        let nonce = Self::nonce_of(record)?;
        plan::batch_transaction(&self.config.asset, &self.authority, &batch.payouts, &memo, nonce.as_ref(), blockhash)
    }

    /// Refuses to sign a batch the paying account cannot cover (it would land failed and
    /// cost a fee). Fees and new token accounts' rent are on top, for SOL.
    fn check_funds(&mut self, record: &EpochPayouts, position: usize) -> SettlementResult<()> {
        let batch = &record.batches[position];
        let needed = batch.total_amount();
        let source = self.source_account();
        let available = match (&self.config.asset, self.chain.get_account(&source)?) {
            (_, None) => 0,
            (PayoutAsset::Sol { .. }, Some(account)) => account.lamports,
            (PayoutAsset::Token { .. }, Some(account)) => plan::token_account_amount(&account.data).unwrap_or(0),
        };
        if available < needed {
            return Err(SettlementError::PayoutFundsShort {
                epoch: record.epoch_id,
                batch: batch.index,
                account: source.to_string(),
                available,
                needed,
            });
        }
        Ok(())
    }

    /// Polls an in-flight attempt until it resolves or `confirm_timeout` passes.
    fn resolve(
        &mut self,
        record: &EpochPayouts,
        position: usize,
        attempt: &PayoutAttempt,
        mut resent: bool,
    ) -> SettlementResult<Resolution> {
        let parse_error = |what: &str| {
            SettlementError::PayoutConfig(format!("stored payout attempt has an invalid {what}: {}", attempt.signature))
        };
        let signature: Signature = attempt.signature.parse().map_err(|_| parse_error("signature"))?;
        let blockhash: Hash = attempt.blockhash.parse().map_err(|_| parse_error("blockhash"))?;
        let deadline = Instant::now() + self.config.confirm_timeout;
        let nonce = Self::nonce_of(record)?;
        loop {
            // Validity first: "not found" only proves the transaction dead if the
            // blockhash had already expired (or the nonce moved on) when the status was read.
            let valid = match &nonce {
                Some(nonce) => self.current_nonce(nonce)? == blockhash,
                None => self.chain.is_blockhash_valid(&blockhash)?,
            };
            match self.chain.signature_status(&signature)? {
                Some(SignatureStatus::Landed) => return Ok(Resolution::Landed),
                Some(SignatureStatus::Failed(error)) => return Ok(Resolution::Failed(error)),
                Some(SignatureStatus::Processing) => {}
                None if !valid => return Ok(Resolution::Expired),
                None if !resent => {
                    self.resend(record, position, attempt, blockhash)?;
                    resent = true;
                    continue;
                }
                None => {}
            }
            if Instant::now() >= deadline {
                return Ok(Resolution::StillInFlight);
            }
            std::thread::sleep(self.config.poll_interval);
        }
    }

    /// Sends a stored attempt again: the same bytes, so the same signature, which the
    /// chain executes at most once. The transaction is rebuilt (signing is deterministic)
    /// and must match what was stored.
    fn resend(
        &mut self,
        record: &EpochPayouts,
        position: usize,
        attempt: &PayoutAttempt,
        blockhash: Hash,
    ) -> SettlementResult<()> {
        let batch = &record.batches[position];
        let transaction = self.batch_transaction(record, position, blockhash)?;
        if plan::wire_bytes(&transaction) != attempt.transaction {
            return Err(SettlementError::PayoutConfig(format!(
                "epoch {} batch {}: stored transaction {} differs from the one this config signs",
                record.epoch_id, batch.index, attempt.signature
            )));
        }
        if let Err(err) = self.chain.send_transaction(&transaction) {
            // Its status decides; a resend that fails is just one fewer chance to land.
            warn!(epoch = record.epoch_id, batch = batch.index, signature = %attempt.signature, error = %err, "payout resend failed");
        }
        Ok(())
    }
}

fn report(record: &EpochPayouts, outcome: PayoutOutcome) -> PayoutReport {
    let batches: Vec<BatchReport> = record
        .batches
        .iter()
        .map(|batch| BatchReport {
            index: batch.index,
            signature: batch.landed().map(|a| a.signature.clone()).unwrap_or_default(),
            payouts: batch.payouts.len(),
            amount: batch.total_amount(),
            attempts: batch.attempts.len(),
        })
        .collect();
    let payouts = record.batches.iter().flat_map(|batch| &batch.payouts);
    PayoutReport {
        epoch_id: record.epoch_id,
        outcome,
        total_micro_usd: payouts.clone().map(|p| p.micro_usd).sum(),
        total_amount: payouts.map(|p| p.amount).sum(),
        batches,
        skipped: record.skipped.clone(),
    }
}
