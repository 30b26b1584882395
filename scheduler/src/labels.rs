//! Label selectors: constraints on a node's string labels (`region`, `provider`, ...).
//!
//! Grammar (whitespace is free around tokens; keys and values are
//! `[A-Za-z0-9_.\-/:]+`):
//!
//! ```text
//! key = value          key == value
//! key != value
//! key in (v1, v2, ...)
//! key not in (v1, v2, ...)
//! ```
//!
//! As in Kubernetes, `!=` and `not in` match a node that has no such label at all, while `=`
//! and `in` require the label to be present.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::error::{SchedulerError, SchedulerResult};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LabelSelector {
    Equals { key: String, value: String },
    NotEquals { key: String, value: String },
    In { key: String, values: Vec<String> },
    NotIn { key: String, values: Vec<String> },
}

impl LabelSelector {
    /// Parses one selector such as `region in (eu, us)`.
    pub fn parse(text: &str) -> SchedulerResult<Self> {
        let error = |reason: &str| SchedulerError::InvalidLabelSelector {
            selector: text.to_string(),
            reason: reason.to_string(),
        };
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(error("is empty"));
        }
        let key_end = trimmed.find(|c: char| !is_token_char(c)).unwrap_or(trimmed.len());
        let key = &trimmed[..key_end];
        if key.is_empty() {
            return Err(error("must start with a label key"));
        }
        let rest = trimmed[key_end..].trim_start();
        if rest.is_empty() {
            return Err(error("has no operator after the key (expected =, !=, in (...) or not in (...))"));
        }
        let key = key.to_string();
        if let Some(value) = rest.strip_prefix("!=") {
            return Ok(LabelSelector::NotEquals { key, value: parse_value(value).map_err(|why| error(&why))? });
        }
        if let Some(value) = rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')) {
            return Ok(LabelSelector::Equals { key, value: parse_value(value).map_err(|why| error(&why))? });
        }
        if let Some(list) = strip_keyword(rest, "not") {
            let list = strip_keyword(list, "in").ok_or_else(|| error("expected `in` after `not`"))?;
            return Ok(LabelSelector::NotIn { key, values: parse_list(list).map_err(|why| error(&why))? });
        }
        if let Some(list) = strip_keyword(rest, "in") {
            return Ok(LabelSelector::In { key, values: parse_list(list).map_err(|why| error(&why))? });
        }
        Err(error(&format!("unknown operator at {rest:?} (expected =, !=, in (...) or not in (...))")))
    }

    /// One entry of Ray's `label_selector` dict: `"eu"` (equals), `"!eu"` (not equals),
    /// `"in(eu,us)"` and `"!in(eu,us)"`; checked by the same grammar as [`Self::parse`].
    pub fn from_ray(key: &str, value: &str) -> SchedulerResult<Self> {
        let value = value.trim();
        let (negated, rest) = match value.strip_prefix('!') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, value),
        };
        let text = match strip_keyword(rest, "in") {
            Some(list) if list.trim_start().starts_with('(') => {
                format!("{key} {}in {}", if negated { "not " } else { "" }, list.trim())
            }
            _ => format!("{key} {} {rest}", if negated { "!=" } else { "=" }),
        };
        Self::parse(&text)
    }

    pub fn key(&self) -> &str {
        match self {
            LabelSelector::Equals { key, .. }
            | LabelSelector::NotEquals { key, .. }
            | LabelSelector::In { key, .. }
            | LabelSelector::NotIn { key, .. } => key,
        }
    }

    /// Whether a node with these labels satisfies the selector.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(self.key()).map(String::as_str);
        match self {
            LabelSelector::Equals { value: want, .. } => value == Some(want.as_str()),
            LabelSelector::NotEquals { value: want, .. } => value != Some(want.as_str()),
            LabelSelector::In { values, .. } => value.is_some_and(|v| values.iter().any(|w| w == v)),
            LabelSelector::NotIn { values, .. } => value.is_none_or(|v| values.iter().all(|w| w != v)),
        }
    }
}

impl FromStr for LabelSelector {
    type Err = SchedulerError;
    fn from_str(text: &str) -> SchedulerResult<Self> {
        Self::parse(text)
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabelSelector::Equals { key, value } => write!(f, "{key} = {value}"),
            LabelSelector::NotEquals { key, value } => write!(f, "{key} != {value}"),
            LabelSelector::In { key, values } => write!(f, "{key} in ({})", values.join(", ")),
            LabelSelector::NotIn { key, values } => {
                write!(f, "{key} not in ({})", values.join(", "))
            }
        }
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | ':')
}

fn is_token(text: &str) -> bool {
    !text.is_empty() && text.chars().all(is_token_char)
}

/// Strips a keyword that must be followed by whitespace or `(`.
fn strip_keyword<'a>(text: &'a str, keyword: &str) -> Option<&'a str> {
    let rest = text.strip_prefix(keyword)?;
    match rest.chars().next() {
        Some(c) if c.is_whitespace() || c == '(' => Some(rest.trim_start()),
        _ => None,
    }
}

fn parse_value(text: &str) -> Result<String, String> {
    let value = text.trim();
    if value.is_empty() {
        return Err("has no value after the operator".into());
    }
    if !is_token(value) {
        return Err(format!("value {value:?} may only hold letters, digits and _ - . / :"));
    }
    Ok(value.to_string())
}

fn parse_list(text: &str) -> Result<Vec<String>, String> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| "expected a parenthesised list such as (eu, us)".to_string())?;
    let values: Vec<String> = inner
        .split(',')
        .map(|v| v.trim())
        .map(|v| {
            if is_token(v) {
                Ok(v.to_string())
            } else if v.is_empty() {
                Err("has an empty value in its list".to_string())
            } else {
                Err(format!("list value {v:?} may only hold letters, digits and _ - . / :"))
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn rays_label_selector_entries_read_as_selectors() {
        let read = |key, value| LabelSelector::from_ray(key, value).unwrap().to_string();
        assert_eq!(read("region", "eu"), "region = eu");
        assert_eq!(read("region", "!eu"), "region != eu");
        assert_eq!(read("region", "in(eu, us)"), "region in (eu, us)");
        assert_eq!(read("region", "!in(eu,us)"), "region not in (eu, us)");
        assert_eq!(read("region", "india"), "region = india", "a value that begins with `in`");
        for (key, value) in [("region", ""), ("region", "in("), ("bad key", "eu"), ("region", "!")] {
            assert!(LabelSelector::from_ray(key, value).is_err(), "{key:?}: {value:?} was accepted");
        }
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(
            LabelSelector::parse("region in (eu, us)").unwrap(),
            LabelSelector::In { key: "region".into(), values: vec!["eu".into(), "us".into()] }
        );
        assert_eq!(
            LabelSelector::parse(" provider != x ").unwrap(),
            LabelSelector::NotEquals { key: "provider".into(), value: "x".into() }
        );
        assert_eq!(
            LabelSelector::parse("region=eu").unwrap(),
            LabelSelector::Equals { key: "region".into(), value: "eu".into() }
        );
        assert_eq!(LabelSelector::parse("region == eu").unwrap(), LabelSelector::parse("region = eu").unwrap());
        assert_eq!(
            LabelSelector::parse("tier not in(spot,preemptible)").unwrap(),
            LabelSelector::NotIn { key: "tier".into(), values: vec!["spot".into(), "preemptible".into()] }
        );
        let selector = LabelSelector::parse("region in (eu, us)").unwrap();
        assert_eq!(selector.to_string(), "region in (eu, us)");
        assert_eq!(LabelSelector::parse(&selector.to_string()).unwrap(), selector);
    }

    #[test]
    fn errors_name_the_selector_and_the_problem() {
        let cases = [
            ("", "is empty"),
            ("region", "no operator"),
            ("region ~ eu", "unknown operator"),
            ("region =", "no value"),
            ("region in eu", "parenthesised list"),
            ("region in (eu,)", "empty value"),
            ("region not (eu)", "expected `in` after `not`"),
            ("region = e u", "may only hold"),
            ("= eu", "must start with a label key"),
        ];
        for (text, expected) in cases {
            let err = LabelSelector::parse(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(err.contains(&format!("{text:?}")), "{text:?}: {err}");
        }
    }

    #[test]
    fn matching_follows_kubernetes_for_missing_labels() {
        let node = labels(&[("region", "eu"), ("provider", "acme")]);
        let bare = labels(&[]);
        let check = |s: &str, l: &BTreeMap<String, String>| LabelSelector::parse(s).unwrap().matches(l);
        assert!(check("region = eu", &node));
        assert!(!check("region = us", &node));
        assert!(!check("region = eu", &bare));
        assert!(check("provider != x", &node));
        assert!(check("provider != x", &bare));
        assert!(!check("provider != acme", &node));
        assert!(check("region in (us, eu)", &node));
        assert!(!check("region in (us, eu)", &bare));
        assert!(!check("region not in (us, eu)", &node));
        assert!(check("region not in (us, eu)", &bare));
    }
}
