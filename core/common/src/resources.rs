//! Resource quantities and sets, in exact fixed point.
//!
//! A [`Quantity`] counts ten-thousandths of a resource (`GPU` fractions go down to
//! 0.0001, as in Ray), held in an `i64`, so sums never drift: 10,000 additions of
//! 0.0001 GPU are exactly 1 GPU. `memory` and `GPU_memory` are counted in bytes
//! with the same scale (an `i64` of ten-thousandths still holds ~900 TB).
//!
//! A [`ResourceSet`] maps resource names to positive quantities; zero entries are
//! never stored, so two sets that hold the same amounts compare equal. Names are
//! `CPU`, `GPU`, `memory`, `GPU_memory`, `accelerator_type:<model>` (1 unit per node
//! carrying that model, as Ray does) and any custom name.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Add, Sub};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{IonetError, IonetResult};

pub const CPU: &str = "CPU";
pub const GPU: &str = "GPU";
pub const MEMORY: &str = "memory";
pub const GPU_MEMORY: &str = "GPU_memory";
pub const ACCELERATOR_PREFIX: &str = "accelerator_type:";

/// Units per whole resource.
/// Longest resource name read from the wire.
pub const MAX_NAME_BYTES: usize = 256;

pub const SCALE: i64 = 10_000;

/// An exact quantity of a resource, in 1/10000 units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Quantity(i64);

impl Quantity {
    pub const ZERO: Quantity = Quantity(0);

    pub const fn from_units(units: i64) -> Self {
        Self(units)
    }

    pub const fn whole(count: i64) -> Self {
        Self(count * SCALE)
    }

    pub const fn units(self) -> i64 {
        self.0
    }

    /// Converts a float, rounding to the nearest 1/10000; refuses negative,
    /// non-finite or out-of-range values.
    pub fn from_f64(value: f64) -> IonetResult<Self> {
        if !value.is_finite() || value < 0.0 {
            return Err(IonetError::InvalidArgument(format!(
                "resource quantity must be a finite non-negative number, got {value}"
            )));
        }
        let scaled = (value * SCALE as f64).round();
        if scaled > i64::MAX as f64 {
            return Err(IonetError::InvalidArgument(format!("resource quantity {value} is too large")));
        }
        Ok(Self(scaled as i64))
    }

    pub fn as_f64(self) -> f64 {
        self.0 as f64 / SCALE as f64
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub fn checked_add(self, other: Quantity) -> Option<Quantity> {
        self.0.checked_add(other.0).map(Quantity)
    }

    pub fn checked_sub(self, other: Quantity) -> Option<Quantity> {
        self.0.checked_sub(other.0).map(Quantity)
    }
}

/// Saturating: quantities come from peers (a node's declared total, a report), and a sum
/// of hostile ones must neither wrap nor panic a daemon. `checked_add` says when it would.
impl Add for Quantity {
    type Output = Quantity;
    fn add(self, other: Quantity) -> Quantity {
        Quantity(self.0.saturating_add(other.0))
    }
}

/// Saturating, as [`Add`].
impl Sub for Quantity {
    type Output = Quantity;
    fn sub(self, other: Quantity) -> Quantity {
        Quantity(self.0.saturating_sub(other.0))
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let magnitude = self.0.unsigned_abs();
        let whole = magnitude / SCALE as u64;
        let fraction = magnitude % SCALE as u64;
        if fraction == 0 {
            write!(f, "{sign}{whole}")
        } else {
            let digits = format!("{fraction:04}");
            write!(f, "{sign}{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

impl FromStr for Quantity {
    type Err = IonetError;

    /// Parses a decimal exactly ("0.0001", "2", "1.5"); more than four decimals is refused
    /// rather than silently rounded.
    fn from_str(text: &str) -> IonetResult<Self> {
        let invalid = |why: &str| IonetError::InvalidArgument(format!("resource quantity {text:?} {why}"));
        let trimmed = text.trim();
        let (whole, fraction) = trimmed.split_once('.').unwrap_or((trimmed, ""));
        if whole.is_empty() && fraction.is_empty() {
            return Err(invalid("is empty"));
        }
        if !whole.chars().all(|c| c.is_ascii_digit()) || !fraction.chars().all(|c| c.is_ascii_digit()) {
            return Err(invalid("is not a non-negative decimal number"));
        }
        if fraction.len() > 4 {
            return Err(invalid("has more than 4 decimals (the resolution is 0.0001)"));
        }
        let whole: i64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| invalid("is too large"))? };
        let fraction_units: i64 = format!("{fraction:0<4}").parse().unwrap_or(0);
        whole
            .checked_mul(SCALE)
            .and_then(|units| units.checked_add(fraction_units))
            .map(Quantity)
            .ok_or_else(|| invalid("is too large"))
    }
}

/// A set of named resource quantities. Zero entries are never stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceSet(BTreeMap<String, Quantity>);

impl ResourceSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builder-style insert; a zero quantity removes the entry.
    pub fn with(mut self, name: impl Into<String>, quantity: Quantity) -> Self {
        self.set(name, quantity);
        self
    }

    pub fn set(&mut self, name: impl Into<String>, quantity: Quantity) {
        let name = name.into();
        if quantity.is_zero() {
            self.0.remove(&name);
        } else {
            self.0.insert(name, quantity);
        }
    }

    pub fn get(&self, name: &str) -> Quantity {
        self.0.get(name).copied().unwrap_or_default()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, Quantity)> {
        self.0.iter().map(|(name, quantity)| (name.as_str(), *quantity))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether every quantity in `demand` is available here.
    pub fn contains(&self, demand: &ResourceSet) -> bool {
        demand.iter().all(|(name, quantity)| self.get(name) >= quantity)
    }

    /// Adds `other` entry by entry.
    pub fn add(&mut self, other: &ResourceSet) {
        for (name, quantity) in other.iter() {
            let sum = self.get(name) + quantity;
            self.set(name, sum);
        }
    }

    /// Subtracts `demand`, refusing (and changing nothing) when any entry would go negative.
    pub fn try_subtract(&mut self, demand: &ResourceSet) -> IonetResult<()> {
        if let Some((name, quantity)) = demand.iter().find(|(name, quantity)| self.get(name) < *quantity) {
            return Err(IonetError::InvalidArgument(format!(
                "cannot take {quantity} {name}: only {} available",
                self.get(name)
            )));
        }
        for (name, quantity) in demand.iter() {
            let rest = self.get(name) - quantity;
            self.set(name, rest);
        }
        Ok(())
    }

    /// The units map used on the wire.
    pub fn to_units(&self) -> std::collections::HashMap<String, i64> {
        self.0.iter().map(|(name, quantity)| (name.clone(), quantity.units())).collect()
    }

    /// Reads the wire form, refusing negative entries and names that are blank, longer
    /// than [`MAX_NAME_BYTES`] or hold control characters.
    pub fn from_units<'a>(units: impl IntoIterator<Item = (&'a String, &'a i64)>) -> IonetResult<Self> {
        let mut set = ResourceSet::new();
        for (name, units) in units {
            if name.trim().is_empty() {
                return Err(IonetError::InvalidArgument("resource name is empty".into()));
            }
            if name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
                return Err(IonetError::InvalidArgument(format!(
                    "resource name {name:?} is not printable text of at most {MAX_NAME_BYTES} bytes"
                )));
            }
            if *units < 0 {
                return Err(IonetError::InvalidArgument(format!("resource {name} has negative quantity {units}")));
            }
            set.set(name.clone(), Quantity::from_units(*units));
        }
        Ok(set)
    }

    /// Parses a JSON object of custom resources such as `{"tpu": 2, "ssd": 0.5}`.
    pub fn from_json(text: &str) -> IonetResult<Self> {
        let map: BTreeMap<String, f64> = serde_json::from_str(text).map_err(|err| {
            IonetError::InvalidArgument(format!("resources must be a JSON object of name to number: {err}"))
        })?;
        let mut set = ResourceSet::new();
        for (name, value) in map {
            if name.is_empty() {
                return Err(IonetError::InvalidArgument("resource name is empty".into()));
            }
            set.set(name, Quantity::from_f64(value)?);
        }
        Ok(set)
    }
}

impl fmt::Display for ResourceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (index, (name, quantity)) in self.iter().enumerate() {
            if index > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{name}: {quantity}")?;
        }
        f.write_str("}")
    }
}

/// Micro-USD (1 USD = 1,000,000): integer money, used for prices and the ledger.
pub type MicroUsd = u64;

/// Parses a USD amount such as "1.20" exactly into micro-USD.
pub fn parse_usd(text: &str) -> IonetResult<MicroUsd> {
    let invalid = |why: &str| IonetError::InvalidArgument(format!("price {text:?} {why}"));
    let trimmed = text.trim().trim_start_matches('$');
    let (whole, fraction) = trimmed.split_once('.').unwrap_or((trimmed, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(invalid("is empty"));
    }
    if !whole.chars().all(|c| c.is_ascii_digit()) || !fraction.chars().all(|c| c.is_ascii_digit()) {
        return Err(invalid("is not a non-negative decimal number of USD"));
    }
    if fraction.len() > 6 {
        return Err(invalid("has more than 6 decimals (the resolution is one micro-USD)"));
    }
    let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| invalid("is too large"))? };
    let fraction_micros: u64 = format!("{fraction:0<6}").parse().unwrap_or(0);
    whole
        .checked_mul(1_000_000)
        .and_then(|micros| micros.checked_add(fraction_micros))
        .ok_or_else(|| invalid("is too large"))
}

/// Formats micro-USD as dollars with cents, keeping any further precision.
pub fn format_usd(micros: MicroUsd) -> String {
    let whole = micros / 1_000_000;
    let fraction = micros % 1_000_000;
    let digits = format!("{fraction:06}");
    let trimmed = digits.trim_end_matches('0');
    if trimmed.len() <= 2 {
        format!("{whole}.{:0<2}", trimmed)
    } else {
        format!("{whole}.{trimmed}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ten_thousand_ten_thousandths_make_one_gpu() {
        let step: Quantity = "0.0001".parse().unwrap();
        let mut set = ResourceSet::new();
        let increment = ResourceSet::new().with(GPU, step);
        for _ in 0..10_000 {
            set.add(&increment);
        }
        assert_eq!(set.get(GPU), Quantity::whole(1));
        assert_eq!(set.get(GPU).to_string(), "1");
        // The float path agrees.
        let mut total = Quantity::ZERO;
        for _ in 0..10_000 {
            total = total + Quantity::from_f64(0.0001).unwrap();
        }
        assert_eq!(total, Quantity::whole(1));
    }

    #[test]
    fn parse_and_display() {
        assert_eq!("1.5".parse::<Quantity>().unwrap().units(), 15_000);
        assert_eq!(".25".parse::<Quantity>().unwrap().to_string(), "0.25");
        assert!("0.00001".parse::<Quantity>().is_err());
        assert!("-1".parse::<Quantity>().is_err());
        assert!("abc".parse::<Quantity>().is_err());
        assert!(Quantity::from_f64(f64::NAN).is_err());
    }

    #[test]
    fn subtract_refuses_overdraw_and_changes_nothing() {
        let mut available = ResourceSet::new().with(GPU, Quantity::whole(2)).with(CPU, Quantity::whole(4));
        let demand = ResourceSet::new().with(GPU, Quantity::whole(3)).with(CPU, Quantity::whole(1));
        let err = available.try_subtract(&demand).unwrap_err();
        assert!(err.to_string().contains("cannot take 3 GPU: only 2 available"), "{err}");
        assert_eq!(available.get(CPU), Quantity::whole(4));
        available.try_subtract(&ResourceSet::new().with(GPU, Quantity::whole(2))).unwrap();
        assert_eq!(available.get(GPU), Quantity::ZERO);
        assert_eq!(available.len(), 1, "zero entries are dropped");
    }

    #[test]
    fn usd_parse_and_format() {
        assert_eq!(parse_usd("1.20").unwrap(), 1_200_000);
        assert_eq!(parse_usd("$0.35").unwrap(), 350_000);
        assert_eq!(format_usd(1_200_000), "1.20");
        assert_eq!(format_usd(1_234_567), "1.234567");
        assert!(parse_usd("1.2345678").is_err());
        assert!(parse_usd("x").is_err());
    }

    #[test]
    fn custom_resources_from_json() {
        let set = ResourceSet::from_json(r#"{"tpu": 2, "ssd": 0.5}"#).unwrap();
        assert_eq!(set.get("tpu"), Quantity::whole(2));
        assert_eq!(set.get("ssd").to_string(), "0.5");
        assert!(ResourceSet::from_json(r#"{"tpu": -1}"#).is_err());
        assert!(ResourceSet::from_json("[1]").is_err());
    }

    proptest! {
        #[test]
        fn add_then_subtract_is_identity(a in 0i64..1_000_000_000, b in 0i64..1_000_000_000) {
            let mut set = ResourceSet::new().with(GPU, Quantity::from_units(a));
            let other = ResourceSet::new().with(GPU, Quantity::from_units(b));
            set.add(&other);
            set.try_subtract(&other).unwrap();
            prop_assert_eq!(set.get(GPU), Quantity::from_units(a));
        }

        #[test]
        fn display_parses_back(units in 0i64..10_000_000_000) {
            let quantity = Quantity::from_units(units);
            prop_assert_eq!(quantity.to_string().parse::<Quantity>().unwrap(), quantity);
        }
    }
}
