//! Paid-in credits: tenants transfer the payout asset (SOL, or the SPL token such as
//! USDC) to the cluster's deposit address with a memo naming their account,
//! `ionet:<account>`; the head credits each landed transfer once, keyed by its
//! signature ([`Ledger::deposit_once`](crate::Ledger::deposit_once)), at the asset's
//! rate. A transfer without a valid memo is held: listed, credited to nobody.
//!
//! [`observe`] reads a landed transaction (pure): the amount it moved into the deposit
//! account (system transfers to the owner for SOL; `Transfer`/`TransferChecked` of the
//! mint into the owner's associated token account for a token) and its memo.

use solana_pubkey::Pubkey;
use solana_signature::Signature;
use solana_transaction::Transaction;

use super::plan::{associated_token_address, PayoutAsset, MEMO_PROGRAM_ID, TOKEN_PROGRAM_ID};
use crate::error::SettlementResult;

/// The memo prefix that names the account to credit.
pub const MEMO_PREFIX: &str = "ionet:";

/// Where tenants pay: the owner itself for SOL, its associated token account for a token.
pub fn deposit_account(asset: &PayoutAsset, owner: &Pubkey) -> Pubkey {
    match asset {
        PayoutAsset::Sol { .. } => *owner,
        PayoutAsset::Token { mint, .. } => associated_token_address(owner, mint),
    }
}

/// What a landed transaction paid in: base units of the asset, and its memo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub amount: u64,
    pub memo: Option<String>,
}

/// The transfers of `transaction` into the deposit account of `owner` in `asset`, summed;
/// `None` when it paid nothing in.
pub fn observe(transaction: &Transaction, asset: &PayoutAsset, owner: &Pubkey) -> Option<Observed> {
    let message = &transaction.message;
    let key = |index: u8| message.account_keys.get(usize::from(index));
    let target = deposit_account(asset, owner);
    let mut amount = 0u64;
    let mut memo = None;
    for instruction in &message.instructions {
        let Some(program) = key(instruction.program_id_index) else { continue };
        let account = |position: usize| instruction.accounts.get(position).and_then(|&index| key(index));
        let data = &instruction.data;
        if *program == MEMO_PROGRAM_ID {
            memo = String::from_utf8(data.clone()).ok();
            continue;
        }
        let paid = match asset {
            // System `Transfer` (variant 2): [2, 0, 0, 0, lamports u64]; accounts: from, to.
            PayoutAsset::Sol { .. } if *program == solana_system_interface::program::ID => {
                (data.len() == 12 && data[..4] == [2, 0, 0, 0] && account(1) == Some(&target))
                    .then(|| u64::from_le_bytes(data[4..12].try_into().expect("8 bytes")))
            }
            // SPL Token `Transfer` (3): [3, amount]; accounts: source, destination, owner.
            // `TransferChecked` (12): [12, amount, decimals]; source, mint, destination, owner.
            PayoutAsset::Token { mint, .. } if *program == TOKEN_PROGRAM_ID => match data.first() {
                Some(3) if data.len() == 9 && account(1) == Some(&target) => {
                    Some(u64::from_le_bytes(data[1..9].try_into().expect("8 bytes")))
                }
                Some(12) if data.len() == 10 && account(1) == Some(mint) && account(2) == Some(&target) => {
                    Some(u64::from_le_bytes(data[1..9].try_into().expect("8 bytes")))
                }
                _ => None,
            },
            _ => None,
        };
        amount = amount.saturating_add(paid.unwrap_or(0));
    }
    (amount > 0).then_some(Observed { amount, memo })
}

/// The account a memo names, or why it names none.
pub fn account_of(memo: Option<&str>) -> Result<String, String> {
    let Some(memo) = memo else {
        return Err(format!("no memo: a deposit's memo must be {MEMO_PREFIX}<account>"));
    };
    let Some(account) = memo.trim().strip_prefix(MEMO_PREFIX) else {
        return Err(format!("memo {memo:?} does not start with {MEMO_PREFIX:?}"));
    };
    if account.is_empty() || account.chars().any(char::is_control) || account.len() > 128 {
        return Err(format!("memo {memo:?} names no valid account"));
    }
    Ok(account.to_string())
}

/// Base units of `asset` as micro-USD: exact for a 6-decimal token, scaled for others;
/// SOL at the operator's fixed rate (floored).
pub fn micro_usd_of(asset: &PayoutAsset, amount: u64) -> u64 {
    let value = match asset {
        PayoutAsset::Sol { lamports_per_usd } => {
            u128::from(amount) * 1_000_000 / u128::from((*lamports_per_usd).max(1))
        }
        PayoutAsset::Token { decimals, .. } if *decimals >= 6 => {
            u128::from(amount) / 10u128.pow(u32::from(*decimals) - 6)
        }
        PayoutAsset::Token { decimals, .. } => u128::from(amount) * 10u128.pow(6 - u32::from(*decimals)),
    };
    u64::try_from(value).unwrap_or(u64::MAX)
}

/// Where the head learns of landed transactions that may pay into its deposit account.
pub trait DepositSource {
    /// The landed, successful transactions touching `account` after the one signed
    /// `after` (every one when `None`), oldest first. The caller keeps the cursor, so a
    /// scan that fails part-way is read again whole.
    fn landed_to(
        &mut self,
        account: &Pubkey,
        after: Option<&Signature>,
    ) -> SettlementResult<Vec<(Signature, Transaction)>>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use solana_hash::Hash;
    use solana_keypair::Keypair;
    use solana_message::Message;
    use solana_signer::Signer;

    fn signed(instructions: &[solana_instruction::Instruction], payer: &Keypair) -> Transaction {
        let mut transaction = Transaction::new_unsigned(Message::new(instructions, Some(&payer.pubkey())));
        transaction.try_sign(&[payer], Hash::default()).unwrap();
        transaction
    }

    fn memo(text: &str) -> solana_instruction::Instruction {
        solana_instruction::Instruction::new_with_bytes(MEMO_PROGRAM_ID, text.as_bytes(), vec![])
    }

    #[test]
    fn transfers_in_with_a_memo_are_observed_and_others_are_not() {
        let (tenant, owner, mint) = (Keypair::new(), Keypair::new().pubkey(), Keypair::new().pubkey());
        let sol = PayoutAsset::Sol { lamports_per_usd: 5_000_000 };
        let pay = solana_system_interface::instruction::transfer(&tenant.pubkey(), &owner, 25_000_000);
        let seen = observe(&signed(&[pay.clone(), memo("ionet:acme")], &tenant), &sol, &owner).unwrap();
        assert_eq!(seen, Observed { amount: 25_000_000, memo: Some("ionet:acme".into()) });
        assert_eq!(micro_usd_of(&sol, seen.amount), 5_000_000);
        // Paid elsewhere: nothing.
        let elsewhere = solana_system_interface::instruction::transfer(&tenant.pubkey(), &mint, 1);
        assert_eq!(observe(&signed(&[elsewhere], &tenant), &sol, &owner), None);

        let usdc = PayoutAsset::Token { mint, decimals: 6 };
        let from = associated_token_address(&tenant.pubkey(), &mint);
        let checked = spl_token_interface::instruction::transfer_checked(
            &TOKEN_PROGRAM_ID,
            &from,
            &mint,
            &deposit_account(&usdc, &owner),
            &tenant.pubkey(),
            &[],
            7_000_000,
            6,
        )
        .unwrap();
        let seen = observe(&signed(&[checked], &tenant), &usdc, &owner).unwrap();
        assert_eq!((seen.amount, seen.memo), (7_000_000, None));
        assert_eq!(micro_usd_of(&usdc, seen.amount), 7_000_000);
    }

    #[test]
    fn a_memo_names_an_account_or_says_why_not() {
        assert_eq!(account_of(Some("ionet:acme")), Ok("acme".into()));
        assert!(account_of(None).unwrap_err().contains("no memo"));
        assert!(account_of(Some("acme")).unwrap_err().contains("does not start with"));
        assert!(account_of(Some("ionet:")).unwrap_err().contains("names no valid account"));
    }
}
