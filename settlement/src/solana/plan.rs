//! Payout planning, pure: what each provider is owed in the paid asset, the instructions
//! that pay it, and how those instructions are cut into transactions that fit a packet.
//!
//! Nothing here signs, sends or reads a clock; the driver in `mod.rs` persists the plan
//! before the first signature, so a plan is computed once per epoch and never again.

use std::collections::BTreeMap;
use std::fmt;

use ionet_common::resources::MicroUsd;
use serde::{Deserialize, Serialize};
use solana_hash::Hash;
use solana_instruction::{AccountMeta, Instruction};
use solana_keypair::Keypair;
use solana_message::Message;
use solana_pubkey::Pubkey;
use solana_transaction::Transaction;

use crate::error::{SettlementError, SettlementResult};
use crate::ledger::EpochSummary;

/// The largest serialized transaction a validator accepts (IPv6 MTU minus headers).
pub const PACKET_DATA_SIZE: usize = 1232;

/// The SPL Memo program (v2+: checks that the listed accounts signed).
pub const MEMO_PROGRAM_ID: Pubkey = solana_pubkey::pubkey!("MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr");

/// The classic SPL Token program (the only one `transfer_checked` is built for here).
pub const TOKEN_PROGRAM_ID: Pubkey = spl_token_interface::ID;

const MICRO_USD_PER_USD: u128 = 1_000_000;

/// What providers are paid in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PayoutAsset {
    /// Native SOL by system transfers, at a fixed rate:
    /// `lamports = floor(micro_usd × lamports_per_usd / 1_000_000)`. The rate is the
    /// operator's (an oracle price is deliberately out of scope: a payout must be
    /// reproducible from the ledger and the config alone).
    Sol { lamports_per_usd: u64 },
    /// An SPL Token mint (USDC or any other) by `transfer_checked` into each provider's
    /// associated token account. With 6 decimals one base unit is one micro-USD, exactly;
    /// with more, `micro_usd × 10^(decimals − 6)`; with fewer, floored.
    Token { mint: Pubkey, decimals: u8 },
}

impl PayoutAsset {
    /// The provider's amount in the asset's base units (lamports or token base units).
    pub fn amount(&self, micro_usd: MicroUsd) -> SettlementResult<u64> {
        let overflow = || SettlementError::Overflow(format!("payout of {micro_usd} micro-USD in {self}"));
        match *self {
            PayoutAsset::Sol { lamports_per_usd } => {
                let lamports = micro_usd as u128 * lamports_per_usd as u128 / MICRO_USD_PER_USD;
                u64::try_from(lamports).map_err(|_| overflow())
            }
            PayoutAsset::Token { decimals, .. } if decimals >= 6 => {
                let scale = 10u64.checked_pow(u32::from(decimals) - 6).ok_or_else(overflow)?;
                micro_usd.checked_mul(scale).ok_or_else(overflow)
            }
            PayoutAsset::Token { decimals, .. } => Ok(micro_usd / 10u64.pow(6 - u32::from(decimals))),
        }
    }

    pub fn validate(&self) -> SettlementResult<()> {
        match *self {
            PayoutAsset::Sol { lamports_per_usd: 0 } => {
                Err(SettlementError::PayoutConfig("lamports_per_usd must be positive".into()))
            }
            PayoutAsset::Token { decimals, .. } if decimals > 6 + 19 => {
                Err(SettlementError::PayoutConfig(format!("token decimals {decimals} out of range (at most 25)")))
            }
            _ => Ok(()),
        }
    }
}

/// The operator's spelling (`--payout-asset`): `sol:<lamports per USD>` or
/// `spl:<mint address>:<decimals>`.
impl std::str::FromStr for PayoutAsset {
    type Err = SettlementError;

    fn from_str(text: &str) -> SettlementResult<Self> {
        let invalid = |why: String| {
            SettlementError::PayoutConfig(format!(
                "payout asset {text:?}: {why} (expected sol:<lamports per USD> or spl:<mint>:<decimals>)"
            ))
        };
        let asset = match text.split(':').collect::<Vec<_>>().as_slice() {
            ["sol", rate] => PayoutAsset::Sol {
                lamports_per_usd: rate.parse().map_err(|err| invalid(format!("bad lamports per USD: {err}")))?,
            },
            ["spl", mint, decimals] => PayoutAsset::Token {
                mint: mint.parse().map_err(|err| invalid(format!("bad mint address: {err}")))?,
                decimals: decimals.parse().map_err(|err| invalid(format!("bad decimals: {err}")))?,
            },
            _ => return Err(invalid("unknown form".into())),
        };
        asset.validate()?;
        Ok(asset)
    }
}

/// Stable text stored with a planned epoch: a later run under another asset refuses to
/// continue it (its amounts were computed for this one).
impl fmt::Display for PayoutAsset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PayoutAsset::Sol { lamports_per_usd } => write!(f, "sol@{lamports_per_usd}-lamports-per-usd"),
            PayoutAsset::Token { mint, decimals } => write!(f, "spl-token:{mint}:{decimals}-decimals"),
        }
    }
}

/// One provider's payout in an epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderPayout {
    /// The provider's wallet (base58), as in the ledger.
    pub wallet: String,
    /// What the ledger credited it this epoch and this payout pays.
    pub micro_usd: MicroUsd,
    /// The same in the asset's base units.
    pub amount: u64,
}

/// A provider the epoch owes that is not paid on chain, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedPayout {
    pub wallet: String,
    pub micro_usd: MicroUsd,
    pub reason: String,
}

/// Each provider's payout for an epoch, by wallet: its revenue, plus its availability
/// reward when `include_rewards` (together, what the ledger credited `provider:<wallet>`
/// in that epoch). Wallets that are not Solana addresses and amounts that round to zero
/// base units are skipped (their earnings stay in the ledger), not failed: one bad wallet
/// must not hold up every other provider.
pub fn plan_payouts(
    summary: &EpochSummary,
    asset: &PayoutAsset,
    include_rewards: bool,
) -> SettlementResult<(Vec<ProviderPayout>, Vec<SkippedPayout>)> {
    let mut owed: BTreeMap<&str, MicroUsd> = BTreeMap::new();
    for provider in &summary.providers {
        let reward = if include_rewards { provider.reward } else { 0 };
        // Funded usage and receivables its payers paid since: never usage nobody funded.
        let micro_usd = provider
            .revenue
            .checked_add(provider.repaid)
            .and_then(|earned| earned.checked_add(reward))
            .ok_or_else(|| SettlementError::Overflow(format!("payout of provider {}", provider.wallet)))?;
        let total = owed.entry(provider.wallet.as_str()).or_default();
        *total = total
            .checked_add(micro_usd)
            .ok_or_else(|| SettlementError::Overflow(format!("payout of provider {}", provider.wallet)))?;
    }
    let mut payouts = Vec::with_capacity(owed.len());
    let mut skipped = Vec::new();
    for (wallet, micro_usd) in owed {
        if micro_usd == 0 {
            continue;
        }
        let skip = |reason: String| SkippedPayout { wallet: wallet.to_string(), micro_usd, reason };
        if let Err(err) = wallet.parse::<Pubkey>() {
            skipped.push(skip(format!("wallet is not a solana address: {err}")));
            continue;
        }
        let amount = asset.amount(micro_usd)?;
        if amount == 0 {
            skipped.push(skip(format!("rounds to 0 base units of {asset}")));
            continue;
        }
        payouts.push(ProviderPayout { wallet: wallet.to_string(), micro_usd, amount });
    }
    Ok((payouts, skipped))
}

/// The memo of batch `index` (1-based) of `count`.
pub fn memo_text(epoch_id: u64, index: usize, count: usize) -> String {
    format!("ionet settlement epoch {epoch_id} batch {index}/{count}")
}

/// An SPL Memo instruction whose listed signers the memo program checks.
pub fn memo_instruction(memo: &str, signers: &[&Pubkey]) -> Instruction {
    Instruction {
        program_id: MEMO_PROGRAM_ID,
        accounts: signers.iter().map(|signer| AccountMeta::new_readonly(**signer, true)).collect(),
        data: memo.as_bytes().to_vec(),
    }
}

/// The paying account of `authority`: the authority itself for SOL, its associated
/// token account for a token.
pub fn source_account(asset: &PayoutAsset, authority: &Pubkey) -> Pubkey {
    match asset {
        PayoutAsset::Sol { .. } => *authority,
        PayoutAsset::Token { mint, .. } => associated_token_address(authority, mint),
    }
}

/// The amount an SPL token account's data holds (layout: mint 32 bytes, owner 32, amount
/// u64 LE, ...); `None` when the data is too short to be one.
pub fn token_account_amount(data: &[u8]) -> Option<u64> {
    data.get(64..72).map(|bytes| u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
}

pub fn associated_token_address(wallet: &Pubkey, mint: &Pubkey) -> Pubkey {
    spl_associated_token_account_interface::address::get_associated_token_address_with_program_id(
        wallet,
        mint,
        &TOKEN_PROGRAM_ID,
    )
}

fn parse_wallet(wallet: &str) -> SettlementResult<Pubkey> {
    wallet.parse().map_err(|err| SettlementError::PayoutConfig(format!("wallet {wallet:?} is not an address: {err}")))
}

/// The instructions paying one provider: a system transfer, or an idempotent creation of
/// its associated token account followed by a `transfer_checked` into it.
pub fn payout_instructions(
    asset: &PayoutAsset,
    authority: &Pubkey,
    payout: &ProviderPayout,
) -> SettlementResult<Vec<Instruction>> {
    let wallet = parse_wallet(&payout.wallet)?;
    match asset {
        PayoutAsset::Sol { .. } => {
            Ok(vec![solana_system_interface::instruction::transfer(authority, &wallet, payout.amount)])
        }
        PayoutAsset::Token { mint, decimals } => {
            let create =
                spl_associated_token_account_interface::instruction::create_associated_token_account_idempotent(
                    authority,
                    &wallet,
                    mint,
                    &TOKEN_PROGRAM_ID,
                );
            let transfer = spl_token_interface::instruction::transfer_checked(
                &TOKEN_PROGRAM_ID,
                &associated_token_address(authority, mint),
                mint,
                &associated_token_address(&wallet, mint),
                authority,
                &[],
                payout.amount,
                *decimals,
            )
            .map_err(|err| SettlementError::PayoutConfig(format!("transfer_checked: {err}")))?;
            Ok(vec![create, transfer])
        }
    }
}

/// The message of one batch: every payout's instructions, then the memo. The authority
/// pays the fees and signs alone.
pub fn batch_message(
    asset: &PayoutAsset,
    authority: &Pubkey,
    payouts: &[ProviderPayout],
    memo: &str,
    nonce: Option<&Pubkey>,
) -> SettlementResult<Message> {
    let mut instructions = Vec::with_capacity(payouts.len() * 2 + 2);
    // Against a durable nonce the first instruction advances it: the transaction stays
    // valid until it lands (or another use of the nonce moves it on), so it is signed once.
    if let Some(nonce) = nonce {
        instructions.push(solana_system_interface::instruction::advance_nonce_account(nonce, authority));
    }
    for payout in payouts {
        instructions.extend(payout_instructions(asset, authority, payout)?);
    }
    instructions.push(memo_instruction(memo, &[authority]));
    Ok(Message::new(&instructions, Some(authority)))
}

/// The signed transaction of one batch. Ed25519 signing is deterministic, so the same
/// batch, memo, blockhash and key give the same bytes and the same signature: a stored
/// attempt can be rebuilt exactly for a resend.
pub fn batch_transaction(
    asset: &PayoutAsset,
    authority: &Keypair,
    payouts: &[ProviderPayout],
    memo: &str,
    nonce: Option<&Pubkey>,
    blockhash: Hash,
) -> SettlementResult<Transaction> {
    use solana_signer::Signer;
    let message = batch_message(asset, &authority.pubkey(), payouts, memo, nonce)?;
    let mut transaction = Transaction::new_unsigned(message);
    transaction
        .try_sign(&[authority], blockhash)
        .map_err(|err| SettlementError::PayoutConfig(format!("signing payout transaction: {err}")))?;
    Ok(transaction)
}

fn short_vec_len(len: usize, out: &mut Vec<u8>) {
    let mut rest = len;
    loop {
        let byte = (rest & 0x7f) as u8;
        rest >>= 7;
        if rest == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// The size of a nonce account (its `Versions` state).
pub const NONCE_ACCOUNT_SIZE: usize = 80;

/// The value a durable-nonce transaction must carry as its blockhash now, read from the
/// nonce account's data: bincode of `Versions::Current(State::Initialized(Data))`, that
/// is a u32 version (1), a u32 state (1: initialized), the authority (32 bytes), the
/// durable nonce (32 bytes), then the fee calculator. Refuses an account that is not an
/// initialized nonce of `authority`.
pub fn nonce_value(data: &[u8], authority: &Pubkey) -> SettlementResult<Hash> {
    let bad = |why: &str| SettlementError::PayoutConfig(format!("the payout nonce account {why}"));
    if data.len() < 72 {
        return Err(bad("is not a nonce account (too short)"));
    }
    let word = |at: usize| u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"));
    if word(0) > 1 || word(4) != 1 {
        return Err(bad("is not an initialized nonce account"));
    }
    let owner = Pubkey::try_from(&data[8..40]).map_err(|_| bad("has no authority"))?;
    if owner != *authority {
        return Err(bad(&format!("is under authority {owner}, not the payout authority {authority}")));
    }
    let value: [u8; 32] = data[40..72].try_into().expect("32 bytes");
    Ok(Hash::new_from_array(value))
}

/// A transaction's wire bytes (what is sent and what must fit in a packet):
/// short-vec signature count, the signatures, the serialized message.
pub fn wire_bytes(transaction: &Transaction) -> Vec<u8> {
    let message = transaction.message.serialize();
    let mut bytes = Vec::with_capacity(3 + transaction.signatures.len() * 64 + message.len());
    short_vec_len(transaction.signatures.len(), &mut bytes);
    for signature in &transaction.signatures {
        bytes.extend_from_slice(signature.as_ref());
    }
    bytes.extend_from_slice(&message);
    bytes
}

/// The wire size of a message once signed by its required signers.
pub fn signed_size(message: &Message) -> usize {
    let signatures = usize::from(message.header.num_required_signatures);
    let mut prefix = Vec::new();
    short_vec_len(signatures, &mut prefix);
    prefix.len() + signatures * 64 + message.serialize().len()
}

/// Cuts payouts, in order, into as few consecutive batches as fit: each batch's signed
/// transaction, memo included, is at most [`PACKET_DATA_SIZE`] bytes. Sizes are measured
/// with the widest memo the epoch can have (`batch N/N` with N = number of payouts), so
/// the real memo never makes a batch grow past the limit.
pub fn split_batches(
    epoch_id: u64,
    asset: &PayoutAsset,
    authority: &Pubkey,
    payouts: &[ProviderPayout],
    nonce: Option<&Pubkey>,
) -> SettlementResult<Vec<Vec<ProviderPayout>>> {
    let widest_memo = memo_text(epoch_id, payouts.len(), payouts.len());
    let mut batches: Vec<Vec<ProviderPayout>> = Vec::new();
    let mut current: Vec<ProviderPayout> = Vec::new();
    for payout in payouts {
        current.push(payout.clone());
        if signed_size(&batch_message(asset, authority, &current, &widest_memo, nonce)?) <= PACKET_DATA_SIZE {
            continue;
        }
        let payout = current.pop().expect("just pushed");
        if current.is_empty() {
            return Err(SettlementError::PayoutConfig(format!(
                "a single payout to {} does not fit in one transaction",
                payout.wallet
            )));
        }
        batches.push(std::mem::take(&mut current));
        current.push(payout);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wallet(seed: u8) -> String {
        Pubkey::new_from_array([seed; 32]).to_string()
    }

    #[test]
    fn assets_parse_from_the_operators_spelling() {
        let mint = Pubkey::new_unique();
        assert_eq!(format!("spl:{mint}:6").parse::<PayoutAsset>().unwrap(), PayoutAsset::Token { mint, decimals: 6 });
        assert_eq!("sol:6000000".parse::<PayoutAsset>().unwrap(), PayoutAsset::Sol { lamports_per_usd: 6_000_000 });
        for bad in ["sol:0", "sol:x", "spl:notakey:6", "spl:11111111111111111111111111111111:40", "usdc", ""] {
            let err = bad.parse::<PayoutAsset>().unwrap_err().to_string();
            assert!(err.contains("payout") || err.contains("decimals") || err.contains("lamports"), "{bad}: {err}");
        }
    }

    #[test]
    fn six_decimal_tokens_are_micro_usd_exactly() {
        let asset = PayoutAsset::Token { mint: Pubkey::new_from_array([9; 32]), decimals: 6 };
        for micro in [1, 999_999, 1_000_000, 123_456_789_012] {
            assert_eq!(asset.amount(micro).unwrap(), micro);
        }
        let nine = PayoutAsset::Token { mint: Pubkey::new_from_array([9; 32]), decimals: 9 };
        assert_eq!(nine.amount(1_500_000).unwrap(), 1_500_000_000);
        let two = PayoutAsset::Token { mint: Pubkey::new_from_array([9; 32]), decimals: 2 };
        assert_eq!(two.amount(1_239_999).unwrap(), 123);
    }

    #[test]
    fn sol_rate_floors_to_lamports() {
        // 1 USD = 0.00666… SOL at 150 USD/SOL = 6_666_666 lamports.
        let asset = PayoutAsset::Sol { lamports_per_usd: 6_666_666 };
        assert_eq!(asset.amount(1_000_000).unwrap(), 6_666_666);
        assert_eq!(asset.amount(1).unwrap(), 6);
        assert_eq!(asset.amount(2_500_000).unwrap(), 16_666_665);
        assert!(PayoutAsset::Sol { lamports_per_usd: 0 }.validate().is_err());
    }

    #[test]
    fn batches_fit_the_packet_and_keep_order() {
        let authority = Pubkey::new_from_array([1; 32]);
        let payouts: Vec<_> =
            (10..60u8).map(|seed| ProviderPayout { wallet: wallet(seed), micro_usd: 5, amount: 5 }).collect();
        for asset in [
            PayoutAsset::Token { mint: Pubkey::new_from_array([2; 32]), decimals: 6 },
            PayoutAsset::Sol { lamports_per_usd: 1_000_000_000 },
        ] {
            let batches = split_batches(7, &asset, &authority, &payouts, None).unwrap();
            assert!(batches.len() > 1, "{asset}: 50 payouts fit in one transaction?");
            let flat: Vec<_> = batches.iter().flatten().cloned().collect();
            assert_eq!(flat, payouts);
            for (index, batch) in batches.iter().enumerate() {
                let memo = memo_text(7, index + 1, batches.len());
                let size = signed_size(&batch_message(&asset, &authority, batch, &memo, None).unwrap());
                assert!(size <= PACKET_DATA_SIZE, "{asset}: batch {index} is {size} bytes");
                if index + 1 < batches.len() {
                    let mut bigger = batch.clone();
                    bigger.push(batches[index + 1][0].clone());
                    let size = signed_size(&batch_message(&asset, &authority, &bigger, &memo, None).unwrap());
                    assert!(size > PACKET_DATA_SIZE, "{asset}: batch {index} could have taken one more");
                }
            }
        }
    }

    #[test]
    fn wire_bytes_match_the_computed_size() {
        let authority = Keypair::new_from_array([3; 32]);
        let asset = PayoutAsset::Token { mint: Pubkey::new_from_array([2; 32]), decimals: 6 };
        let payouts = vec![ProviderPayout { wallet: wallet(20), micro_usd: 10, amount: 10 }];
        let memo = memo_text(1, 1, 1);
        let transaction = batch_transaction(&asset, &authority, &payouts, &memo, None, Hash::default()).unwrap();
        assert_eq!(wire_bytes(&transaction).len(), signed_size(&transaction.message));
        let again = batch_transaction(&asset, &authority, &payouts, &memo, None, Hash::default()).unwrap();
        assert_eq!(wire_bytes(&again), wire_bytes(&transaction), "signing must be deterministic");
    }
}
