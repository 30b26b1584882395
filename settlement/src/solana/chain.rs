//! The chain as the payout driver sees it: five calls, so that tests run against an
//! in-process SVM and a deployment against an RPC node.

use std::path::Path;

use solana_commitment_config::CommitmentConfig;
use solana_hash::Hash;
use solana_keypair::Keypair;
use solana_message::{Message, VersionedMessage};
use solana_pubkey::Pubkey;
use solana_rpc_client::api::config::{RpcTransactionConfig, UiTransactionEncoding};
use solana_rpc_client::rpc_client::{GetConfirmedSignaturesForAddress2Config, RpcClient};
use solana_signature::Signature;
use solana_transaction::versioned::VersionedTransaction;
use solana_transaction::Transaction;

use super::deposits::DepositSource;

use crate::error::{SettlementError, SettlementResult};

/// What the chain knows of a signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureStatus {
    /// Seen, not yet at the chain's commitment: it may still land, or vanish with its
    /// fork. Either way it must not be re-signed yet.
    Processing,
    /// Executed successfully at the chain's commitment.
    Landed,
    /// Executed with this error: the transaction moved nothing (but paid its fee).
    Failed(String),
}

/// An account as read from the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainAccount {
    pub lamports: u64,
    pub owner: Pubkey,
    pub data: Vec<u8>,
}

/// The calls the payout driver makes. Implementations map transport errors to
/// [`SettlementError::Chain`] (retryable).
pub trait PayoutChain {
    /// Submits a signed transaction. An error does not mean it was not received: the
    /// driver stores the transaction first and learns its fate from its status.
    fn send_transaction(&mut self, transaction: &Transaction) -> SettlementResult<Signature>;

    /// `None`: not found. The RPC implementation searches the ledger history too, so a
    /// transaction that landed long ago is still found.
    fn signature_status(&mut self, signature: &Signature) -> SettlementResult<Option<SignatureStatus>>;

    fn latest_blockhash(&mut self) -> SettlementResult<Hash>;

    /// Whether a transaction signed with `blockhash` may still land.
    fn is_blockhash_valid(&mut self, blockhash: &Hash) -> SettlementResult<bool>;

    fn get_account(&mut self, address: &Pubkey) -> SettlementResult<Option<ChainAccount>>;
}

impl<C: PayoutChain + ?Sized> PayoutChain for &mut C {
    fn send_transaction(&mut self, transaction: &Transaction) -> SettlementResult<Signature> {
        (**self).send_transaction(transaction)
    }

    fn signature_status(&mut self, signature: &Signature) -> SettlementResult<Option<SignatureStatus>> {
        (**self).signature_status(signature)
    }

    fn latest_blockhash(&mut self) -> SettlementResult<Hash> {
        (**self).latest_blockhash()
    }

    fn is_blockhash_valid(&mut self, blockhash: &Hash) -> SettlementResult<bool> {
        (**self).is_blockhash_valid(blockhash)
    }

    fn get_account(&mut self, address: &Pubkey) -> SettlementResult<Option<ChainAccount>> {
        (**self).get_account(address)
    }
}

impl<C: PayoutChain + ?Sized> PayoutChain for Box<C> {
    fn send_transaction(&mut self, transaction: &Transaction) -> SettlementResult<Signature> {
        (**self).send_transaction(transaction)
    }

    fn signature_status(&mut self, signature: &Signature) -> SettlementResult<Option<SignatureStatus>> {
        (**self).signature_status(signature)
    }

    fn latest_blockhash(&mut self) -> SettlementResult<Hash> {
        (**self).latest_blockhash()
    }

    fn is_blockhash_valid(&mut self, blockhash: &Hash) -> SettlementResult<bool> {
        (**self).is_blockhash_valid(blockhash)
    }

    fn get_account(&mut self, address: &Pubkey) -> SettlementResult<Option<ChainAccount>> {
        (**self).get_account(address)
    }
}

/// A Solana RPC node, through the blocking client. Call it from a plain thread or
/// `spawn_blocking`, never from a tokio worker (each call blocks until the node answers).
pub struct RpcChain {
    client: RpcClient,
    commitment: CommitmentConfig,
}

impl std::fmt::Debug for RpcChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcChain").field("url", &self.client.url()).field("commitment", &self.commitment).finish()
    }
}

impl RpcChain {
    /// `commitment` decides when a payout counts as landed; `confirmed` (default in
    /// [`RpcChain::new`]) is final in practice, `finalized` waits ~13 s more.
    pub fn with_commitment(url: impl ToString, commitment: CommitmentConfig) -> Self {
        RpcChain { client: RpcClient::new_with_commitment(url.to_string(), commitment), commitment }
    }

    pub fn new(url: impl ToString) -> Self {
        Self::with_commitment(url, CommitmentConfig::confirmed())
    }
}

fn chain_error(operation: &'static str) -> impl Fn(solana_rpc_client::api::client_error::Error) -> SettlementError {
    move |err| SettlementError::Chain { operation, message: err.to_string() }
}

impl PayoutChain for RpcChain {
    fn send_transaction(&mut self, transaction: &Transaction) -> SettlementResult<Signature> {
        self.client.send_transaction(transaction).map_err(chain_error("send_transaction"))
    }

    fn signature_status(&mut self, signature: &Signature) -> SettlementResult<Option<SignatureStatus>> {
        let statuses = self
            .client
            .get_signature_statuses_with_history(std::slice::from_ref(signature))
            .map_err(chain_error("get_signature_statuses"))?
            .value;
        Ok(statuses.into_iter().next().flatten().map(|status| {
            if !status.satisfies_commitment(self.commitment) {
                SignatureStatus::Processing
            } else if let Some(err) = status.err {
                SignatureStatus::Failed(err.to_string())
            } else {
                SignatureStatus::Landed
            }
        }))
    }

    fn latest_blockhash(&mut self) -> SettlementResult<Hash> {
        self.client.get_latest_blockhash().map_err(chain_error("get_latest_blockhash"))
    }

    fn is_blockhash_valid(&mut self, blockhash: &Hash) -> SettlementResult<bool> {
        // Validity at `processed`: a blockhash any fork still accepts may still land there.
        self.client
            .is_blockhash_valid(blockhash, CommitmentConfig::processed())
            .map_err(chain_error("is_blockhash_valid"))
    }

    fn get_account(&mut self, address: &Pubkey) -> SettlementResult<Option<ChainAccount>> {
        let account = self
            .client
            .get_account_with_commitment(address, self.commitment)
            .map_err(chain_error("get_account"))?
            .value;
        Ok(account.map(|account| ChainAccount { lamports: account.lamports, owner: account.owner, data: account.data }))
    }
}

/// The most signatures one `getSignaturesForAddress` call returns.
const SIGNATURES_PER_PAGE: usize = 1_000;

impl DepositSource for RpcChain {
    /// `getSignaturesForAddress` back to `after` (paged, newest first, at the chain's
    /// commitment), then `getTransaction` of each that succeeded.
    fn landed_to(
        &mut self,
        account: &Pubkey,
        after: Option<&Signature>,
    ) -> SettlementResult<Vec<(Signature, Transaction)>> {
        let mut statuses = Vec::new();
        let mut before = None;
        loop {
            let config = GetConfirmedSignaturesForAddress2Config {
                before,
                until: after.copied(),
                limit: Some(SIGNATURES_PER_PAGE),
                commitment: Some(self.commitment),
            };
            let page = self
                .client
                .get_signatures_for_address_with_config(account, config)
                .map_err(chain_error("get_signatures_for_address"))?;
            let full = page.len() == SIGNATURES_PER_PAGE;
            statuses.extend(page);
            match statuses.last() {
                Some(oldest) if full => {
                    let oldest = parse_signature(&oldest.signature)?;
                    if before == Some(oldest) {
                        break; // the node answered the same page again: no further back
                    }
                    before = Some(oldest);
                }
                _ => break,
            }
        }
        let mut landed = Vec::with_capacity(statuses.len());
        for status in statuses.iter().rev().filter(|status| status.err.is_none()) {
            let signature = parse_signature(&status.signature)?;
            let config = RpcTransactionConfig {
                encoding: Some(UiTransactionEncoding::Base64),
                commitment: Some(self.commitment),
                max_supported_transaction_version: Some(0),
            };
            let found =
                self.client.get_transaction_with_config(&signature, config).map_err(chain_error("get_transaction"))?;
            let meta = found.transaction.meta;
            if meta.as_ref().is_some_and(|meta| meta.err.is_some()) {
                continue;
            }
            let Some(transaction) = found.transaction.transaction.decode() else {
                let message = format!("transaction {signature} could not be decoded");
                return Err(SettlementError::Chain { operation: "get_transaction", message });
            };
            let (writable, readonly) = meta
                .and_then(|meta| meta.loaded_addresses.map(|loaded| (loaded.writable, loaded.readonly)))
                .unwrap_or_default();
            landed.push((signature, with_loaded_keys(transaction, &writable, &readonly)?));
        }
        Ok(landed)
    }
}

fn parse_signature(text: &str) -> SettlementResult<Signature> {
    text.parse().map_err(|err| SettlementError::Chain {
        operation: "get_signatures_for_address",
        message: format!("the node returned signature {text:?}: {err}"),
    })
}

/// A transaction with every account its instructions index, as the runtime loaded them:
/// a v0 message's static keys, then the writable and the read-only addresses its lookup
/// tables resolved to (the order instruction indices count in). A v1 message has no
/// lookup tables.
fn with_loaded_keys(
    transaction: VersionedTransaction,
    writable: &[String],
    readonly: &[String],
) -> SettlementResult<Transaction> {
    let signatures = transaction.signatures;
    let message = match transaction.message {
        VersionedMessage::Legacy(message) => message,
        VersionedMessage::V0(message) => {
            let mut account_keys = message.account_keys;
            for address in writable.iter().chain(readonly) {
                account_keys.push(address.parse().map_err(|err| SettlementError::Chain {
                    operation: "get_transaction",
                    message: format!("the node returned loaded address {address:?}: {err}"),
                })?);
            }
            Message {
                header: message.header,
                account_keys,
                recent_blockhash: message.recent_blockhash,
                instructions: message.instructions,
            }
        }
        // No lookup tables in v1: its keys are all static.
        VersionedMessage::V1(message) => Message {
            header: message.header,
            account_keys: message.account_keys,
            recent_blockhash: message.lifetime_specifier,
            instructions: message.instructions,
        },
    };
    Ok(Transaction { signatures, message })
}

/// Reads a keypair file in the Solana CLI's format (a JSON array of 64 bytes).
pub fn read_keypair_file(path: impl AsRef<Path>) -> SettlementResult<Keypair> {
    let path = path.as_ref();
    solana_keypair::read_keypair_file(path)
        .map_err(|err| SettlementError::PayoutConfig(format!("reading keypair {}: {err}", path.display())))
}
