//! Accounts and entries of the double-entry ledger.
//!
//! Every entry moves a positive amount of micro-USD from one account (`debit`, whose
//! balance falls) to another (`credit`, whose balance rises). A balance is therefore
//! credits − debits, and the sum of all balances is zero at every committed state:
//! money enters and leaves through the external [`Account::Funding`] account, whose
//! balance is minus everything deposited (and rewards emitted) and not yet refunded.

use std::fmt;
use std::str::FromStr;

use ionet_common::resources::MicroUsd;
use serde::{Deserialize, Serialize};

use crate::error::{SettlementError, SettlementResult};

/// An account of the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Account {
    /// The outside world: deposits come from it, refunds return to it, reward pools are
    /// emitted from it (by default). Its balance is normally negative.
    Funding,
    /// The protocol treasury: receives the fee and reward-split remainders.
    Treasury,
    /// A payer's prepaid credits (1 credit = 1 USD). Negative means debt.
    Payer(String),
    /// A provider's earnings, keyed by wallet.
    Provider(String),
    /// What a payer owes a provider for usage its balance did not fund: the provider's
    /// claim, moved to its earnings once the payer pays (`payer`, `wallet`).
    Receivable(String, String),
}

impl Account {
    pub fn payer(name: impl Into<String>) -> Self {
        Account::Payer(name.into())
    }

    pub fn provider(wallet: impl Into<String>) -> Self {
        Account::Provider(wallet.into())
    }

    pub fn receivable(payer: impl Into<String>, wallet: impl Into<String>) -> Self {
        Account::Receivable(payer.into(), wallet.into())
    }

    /// The stable string key used in storage and on the CLI: `funding`, `treasury`,
    /// `payer:<name>`, `provider:<wallet>`, `receivable:<length of name>:<name>:<wallet>`
    /// (names and wallets may hold colons; the length keeps the key unambiguous).
    pub fn key(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Account::Funding => f.write_str("funding"),
            Account::Treasury => f.write_str("treasury"),
            Account::Payer(name) => write!(f, "payer:{name}"),
            Account::Provider(wallet) => write!(f, "provider:{wallet}"),
            Account::Receivable(payer, wallet) => write!(f, "receivable:{}:{payer}:{wallet}", payer.len()),
        }
    }
}

impl FromStr for Account {
    type Err = SettlementError;

    fn from_str(text: &str) -> SettlementResult<Self> {
        match text {
            "funding" => return Ok(Account::Funding),
            "treasury" => return Ok(Account::Treasury),
            _ => {}
        }
        let invalid = |why| SettlementError::InvalidAccount(text.to_string(), why);
        let (kind, name) = text
            .split_once(':')
            .ok_or_else(|| invalid("expected funding, treasury, payer:<name> or provider:<wallet>"))?;
        if name.is_empty() {
            return Err(invalid("name is empty"));
        }
        match kind {
            "payer" => Ok(Account::Payer(name.to_string())),
            "provider" => Ok(Account::Provider(name.to_string())),
            "receivable" => {
                let bad = || invalid("expected receivable:<length of payer>:<payer>:<wallet>");
                let (length, rest) = name.split_once(':').ok_or_else(bad)?;
                let length: usize = length.parse().map_err(|_| bad())?;
                let payer = rest.get(..length).ok_or_else(bad)?;
                let wallet = rest.get(length..).and_then(|rest| rest.strip_prefix(':')).ok_or_else(bad)?;
                if payer.is_empty() || wallet.is_empty() {
                    return Err(bad());
                }
                Ok(Account::Receivable(payer.to_string(), wallet.to_string()))
            }
            _ => Err(invalid("expected funding, treasury, payer:<name> or provider:<wallet>")),
        }
    }
}

/// Why an entry was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    /// Funding → payer: prepaid credits bought.
    Deposit,
    /// Payer → funding: unused prepaid credits returned.
    Refund,
    /// Payer → provider: usage at the provider's price, one entry per (payer, provider)
    /// per epoch.
    Usage,
    /// Payer → treasury: the protocol fee, one entry per payer per epoch.
    Fee,
    /// Reward source → provider: availability reward.
    Reward,
    /// Reward source → treasury: what integer division left of the reward pool.
    RewardRemainder,
    /// Provider → funding: earnings paid out of the ledger (a landed on-chain payout).
    Payout,
    /// Payer → receivable: usage its balance did not fund, owed to the provider.
    Receivable,
    /// Receivable → provider: what the payer owed, once it has paid.
    Repaid,
}

/// One posted transfer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Position in the ledger, assigned by the store at commit (0 in a plan).
    pub sequence: u64,
    /// The epoch whose settlement made this entry; `None` for deposits and refunds.
    pub epoch_id: Option<u64>,
    pub kind: EntryKind,
    /// The account whose balance falls.
    pub debit: Account,
    /// The account whose balance rises.
    pub credit: Account,
    pub amount: MicroUsd,
}

impl LedgerEntry {
    pub fn new(epoch_id: Option<u64>, kind: EntryKind, debit: Account, credit: Account, amount: MicroUsd) -> Self {
        LedgerEntry { sequence: 0, epoch_id, kind, debit, credit, amount }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_keys_round_trip() {
        for account in [
            Account::Funding,
            Account::Treasury,
            Account::payer("alice"),
            Account::provider("So1ana:Wallet"),
            Account::receivable("a:b", "So1ana:Wallet"),
        ] {
            assert_eq!(account.key().parse::<Account>().unwrap(), account);
        }
        let err = "bank:x".parse::<Account>().unwrap_err().to_string();
        assert!(err.contains("\"bank:x\""), "{err}");
    }
}
