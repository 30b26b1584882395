//! An in-process Solana runtime as a [`PayoutChain`] (feature `svm`): litesvm with the
//! real System, SPL Token, Associated Token Account and Memo programs, so that payouts
//! are tested as real transactions without a network. A blockhash is valid while it is
//! the latest (litesvm's rule); a signature's status is its entry in the history.
//! Clones share one runtime, so a test can read balances while the head pays.

use std::sync::{Arc, Mutex, MutexGuard};

use litesvm::LiteSVM;
use solana_hash::Hash;
use solana_instruction::Instruction;
use solana_keypair::Keypair;
use solana_pubkey::Pubkey;
use solana_signature::Signature;
use solana_signer::Signer;
use solana_transaction::Transaction;

use super::chain::{ChainAccount, PayoutChain, SignatureStatus};
use super::plan::{associated_token_address, TOKEN_PROGRAM_ID};
use crate::error::{SettlementError, SettlementResult};

/// The size of an SPL Token mint account.
const MINT_SIZE: usize = 82;

#[derive(Clone)]
pub struct SvmChain {
    svm: Arc<Mutex<LiteSVM>>,
    /// Every transaction that landed through this chain, in order (an RPC node's
    /// history, served by [`SvmChain::serve_rpc`]).
    landed: Arc<Mutex<Vec<(Signature, Transaction)>>>,
}

impl std::fmt::Debug for SvmChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvmChain").finish_non_exhaustive()
    }
}

impl Default for SvmChain {
    fn default() -> Self {
        Self::new()
    }
}

impl SvmChain {
    pub fn new() -> Self {
        // No log limit: the memo is logged last, after every transfer.
        SvmChain {
            svm: Arc::new(Mutex::new(LiteSVM::new().with_log_bytes_limit(None))),
            landed: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub(super) fn svm(&self) -> MutexGuard<'_, LiteSVM> {
        self.svm.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The runtime's "slot": how many transactions landed through it.
    pub(super) fn slot(&self) -> u64 {
        self.history().len() as u64
    }

    /// The transactions that landed through this chain, oldest first.
    pub(super) fn history(&self) -> MutexGuard<'_, Vec<(Signature, Transaction)>> {
        self.landed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn airdrop(&self, account: &Pubkey, lamports: u64) {
        self.svm().airdrop(account, lamports).expect("airdrop into the in-process chain");
    }

    /// The balance of an SPL token account (0 when it does not exist).
    pub fn token_balance(&self, account: &Pubkey) -> u64 {
        self.svm()
            .get_account(account)
            .and_then(|account| super::plan::token_account_amount(&account.data))
            .unwrap_or(0)
    }

    pub fn lamports(&self, account: &Pubkey) -> u64 {
        self.svm().get_balance(account).unwrap_or(0)
    }

    /// The program logs of a transaction in the history (panics if it is absent or failed).
    pub fn logs(&self, signature: &str) -> Vec<String> {
        let signature: Signature = signature.parse().expect("a base58 signature");
        match self.svm().get_transaction(&signature).expect("transaction in history") {
            Ok(meta) => meta.logs.clone(),
            Err(failed) => panic!("transaction {signature} failed: {:?}", failed.err),
        }
    }

    pub fn expire_blockhash(&self) {
        self.svm().expire_blockhash();
    }

    /// Runs a set-up transaction paid by `signers[0]` (panics if it fails).
    pub fn execute(&self, instructions: &[Instruction], signers: &[&Keypair]) {
        let mut svm = self.svm();
        let transaction = Transaction::new_signed_with_payer(
            instructions,
            Some(&signers[0].pubkey()),
            signers,
            svm.latest_blockhash(),
        );
        svm.send_transaction(transaction).expect("setup transaction");
    }

    /// Mints `amount` of `mint` (whose authority is `authority`) to `owner`'s associated
    /// token account, creating it (set-up, not recorded as landed).
    pub fn mint_to_owner(&self, authority: &Keypair, mint: &Pubkey, owner: &Pubkey, amount: u64) {
        self.execute(
            &[
                spl_associated_token_account_interface::instruction::create_associated_token_account_idempotent(
                    &authority.pubkey(),
                    owner,
                    mint,
                    &TOKEN_PROGRAM_ID,
                ),
                spl_token_interface::instruction::mint_to(
                    &TOKEN_PROGRAM_ID,
                    mint,
                    &associated_token_address(owner, mint),
                    &authority.pubkey(),
                    &[],
                    amount,
                )
                .expect("mint_to"),
            ],
            &[authority],
        );
    }

    /// A tenant's payment: `amount` of `mint` from `from`'s associated token account to
    /// `to`'s, with `memo` if any, sent as a transaction of its own (recorded as landed).
    pub fn pay_token(
        &self,
        from: &Keypair,
        mint: &Pubkey,
        decimals: u8,
        to: &Pubkey,
        amount: u64,
        memo: Option<&str>,
    ) -> Signature {
        let mut instructions = vec![spl_token_interface::instruction::transfer_checked(
            &TOKEN_PROGRAM_ID,
            &associated_token_address(&from.pubkey(), mint),
            mint,
            &associated_token_address(to, mint),
            &from.pubkey(),
            &[],
            amount,
            decimals,
        )
        .expect("transfer_checked")];
        if let Some(memo) = memo {
            instructions.push(Instruction::new_with_bytes(super::plan::MEMO_PROGRAM_ID, memo.as_bytes(), vec![]));
        }
        let blockhash = self.svm().latest_blockhash();
        let transaction = Transaction::new_signed_with_payer(&instructions, Some(&from.pubkey()), &[from], blockhash);
        let mut chain = self.clone();
        PayoutChain::send_transaction(&mut chain, &transaction).expect("a tenant's payment lands")
    }

    /// Creates a mint with `decimals` whose authority is `authority` (funded with SOL
    /// beforehand), and mints `funds` base units into the authority's associated account.
    pub fn create_funded_mint(&self, authority: &Keypair, decimals: u8, funds: u64) -> Pubkey {
        let mint = Keypair::new();
        let rent = self.svm().minimum_balance_for_rent_exemption(MINT_SIZE);
        let owner = authority.pubkey();
        self.execute(
            &[
                solana_system_interface::instruction::create_account(
                    &owner,
                    &mint.pubkey(),
                    rent,
                    MINT_SIZE as u64,
                    &TOKEN_PROGRAM_ID,
                ),
                spl_token_interface::instruction::initialize_mint2(
                    &TOKEN_PROGRAM_ID,
                    &mint.pubkey(),
                    &owner,
                    None,
                    decimals,
                )
                .expect("initialize_mint2"),
                spl_associated_token_account_interface::instruction::create_associated_token_account_idempotent(
                    &owner,
                    &owner,
                    &mint.pubkey(),
                    &TOKEN_PROGRAM_ID,
                ),
                spl_token_interface::instruction::mint_to(
                    &TOKEN_PROGRAM_ID,
                    &mint.pubkey(),
                    &associated_token_address(&owner, &mint.pubkey()),
                    &owner,
                    &[],
                    funds,
                )
                .expect("mint_to"),
            ],
            &[authority, &mint],
        );
        mint.pubkey()
    }
}

/// Whether the transaction's first instruction is the System program's
/// `AdvanceNonceAccount` (variant 4), as a durable-nonce transaction's must be.
fn advances_a_nonce(transaction: &Transaction) -> bool {
    let message = &transaction.message;
    message.instructions.first().is_some_and(|first| {
        message.account_keys.get(usize::from(first.program_id_index)) == Some(&solana_system_interface::program::ID)
            && first.data.starts_with(&[4, 0, 0, 0])
    })
}

impl PayoutChain for SvmChain {
    fn send_transaction(&mut self, transaction: &Transaction) -> SettlementResult<Signature> {
        let Some(&signature) = transaction.signatures.first() else {
            let message = "a transaction without a signature".to_string();
            return Err(SettlementError::Chain { operation: "send_transaction", message });
        };
        let mut svm = self.svm();
        // A nonce advances once per blockhash; a real chain moves to a new blockhash every
        // slot, litesvm only when told: a durable-nonce transaction starts a new slot.
        if advances_a_nonce(transaction) {
            svm.expire_blockhash();
        }
        match svm.send_transaction(transaction.clone()) {
            Ok(meta) => {
                self.history().push((meta.signature, transaction.clone()));
                Ok(meta.signature)
            }
            // Included with an error: like an RPC node without preflight, the send "works".
            Err(_) if svm.get_transaction(&signature).is_some() => Ok(signature),
            Err(failed) => {
                Err(SettlementError::Chain { operation: "send_transaction", message: format!("{:?}", failed.err) })
            }
        }
    }

    fn signature_status(&mut self, signature: &Signature) -> SettlementResult<Option<SignatureStatus>> {
        Ok(self.svm().get_transaction(signature).map(|result| match result {
            Ok(_) => SignatureStatus::Landed,
            Err(failed) => SignatureStatus::Failed(failed.err.to_string()),
        }))
    }

    fn latest_blockhash(&mut self) -> SettlementResult<Hash> {
        Ok(self.svm().latest_blockhash())
    }

    fn is_blockhash_valid(&mut self, blockhash: &Hash) -> SettlementResult<bool> {
        Ok(*blockhash == self.svm().latest_blockhash())
    }

    fn get_account(&mut self, address: &Pubkey) -> SettlementResult<Option<ChainAccount>> {
        Ok(self.svm().get_account(address).map(|account| ChainAccount {
            lamports: account.lamports,
            owner: account.owner,
            data: account.data,
        }))
    }
}
