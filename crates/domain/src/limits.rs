//! The `limits` of an API key or an organization, parsed once from the
//! client's JSON into a type that cannot hold a bad value; money is a
//! decimal, never a float. Storage keeps them, the limiter enforces them.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ValidationError;

pub use rust_decimal::Decimal as Money;

/// Largest count a limit may name (exact in every arithmetic it meets,
/// a Lua number included).
pub const MAX_COUNT: u64 = 1_000_000_000_000_000;
/// Largest money amount (USD) a budget or a price may name.
pub const MAX_USD: u64 = 1_000_000_000_000;
/// Most decimal places of a budget (micro-dollars: what the counters hold).
pub const BUDGET_SCALE: u32 = 6;

/// The names of the integer limits, in the order answers list them.
pub const COUNT_LIMITS: [&str; 5] = [
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent_requests",
    "tokens_per_day",
    "tokens_per_month",
];

/// Limits of an API key or an organization; `None`: no limit of that kind.
/// A count of 0 blocks every request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub max_concurrent_requests: Option<u64>,
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
    #[serde(default)]
    pub tokens_per_month: Option<u64>,
    /// USD, at most [`BUDGET_SCALE`] decimal places; JSON carries it as a string.
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub budget_per_month_usd: Option<Decimal>,
    /// A warning threshold, in percent (1–100) of each limit above: shown
    /// in `/limits`, and alerted on for the day and month budgets.
    #[serde(default)]
    pub soft_limit_percent: Option<u8>,
}

impl Limits {
    /// True when no limit is set. A soft threshold alone limits nothing, so
    /// it does not count: such a key never reaches the limiter.
    pub fn is_empty(&self) -> bool {
        // Destructured, so a new limit cannot be forgotten here.
        let Self {
            requests_per_minute,
            tokens_per_minute,
            max_concurrent_requests,
            tokens_per_day,
            tokens_per_month,
            budget_per_month_usd,
            soft_limit_percent: _,
        } = self;
        [
            requests_per_minute,
            tokens_per_minute,
            max_concurrent_requests,
            tokens_per_day,
            tokens_per_month,
        ]
        .iter()
        .all(|l| l.is_none())
            && budget_per_month_usd.is_none()
    }

    /// The soft threshold of the integer limit `max`: the least count that
    /// is at least `soft_limit_percent` % of it.
    pub fn soft_count(&self, max: u64) -> Option<u64> {
        let pct = u128::from(self.soft_limit_percent?);
        Some((u128::from(max) * pct).div_ceil(100) as u64)
    }

    /// The soft threshold of the money limit `max`, rounded up to the
    /// micro-dollar (what the counters hold).
    pub fn soft_usd(&self, max: Decimal) -> Option<Decimal> {
        let pct = Decimal::from(self.soft_limit_percent?);
        let exact = max.checked_mul(pct)? / Decimal::ONE_HUNDRED;
        Some(exact.round_dp_with_strategy(
            BUDGET_SCALE,
            rust_decimal::RoundingStrategy::ToPositiveInfinity,
        ))
    }

    /// The integer limit named `name` (one of [`COUNT_LIMITS`]).
    pub fn count(&self, name: &str) -> Option<u64> {
        match name {
            "requests_per_minute" => self.requests_per_minute,
            "tokens_per_minute" => self.tokens_per_minute,
            "max_concurrent_requests" => self.max_concurrent_requests,
            "tokens_per_day" => self.tokens_per_day,
            "tokens_per_month" => self.tokens_per_month,
            _ => None,
        }
    }

    fn count_mut(&mut self, name: &str) -> Option<&mut Option<u64>> {
        Some(match name {
            "requests_per_minute" => &mut self.requests_per_minute,
            "tokens_per_minute" => &mut self.tokens_per_minute,
            "max_concurrent_requests" => &mut self.max_concurrent_requests,
            "tokens_per_day" => &mut self.tokens_per_day,
            "tokens_per_month" => &mut self.tokens_per_month,
            _ => return None,
        })
    }

    /// Parses the client's `limits` object (`null`: no limits). Every refusal
    /// names the field as `limits.<name>`; all are reported.
    pub fn parse(value: &Value) -> Result<Self, Vec<ValidationError>> {
        let Some(map) = crate::settings_object(
            value,
            "limits",
            "limits must be an object (or null for none)",
        )?
        else {
            return Ok(Self::default());
        };
        let mut out = Self::default();
        let mut errors = Vec::new();
        for (k, v) in map {
            if let Some(slot) = out.count_mut(k) {
                match crate::optional_integer(v, 0..=MAX_COUNT) {
                    Ok(n) => *slot = n,
                    Err(()) => errors.push(count_error(count_field(k))),
                }
            } else if k == "soft_limit_percent" {
                match crate::optional_integer(v, 1..=100) {
                    Ok(n) => out.soft_limit_percent = n.map(|n| n as u8),
                    Err(()) => errors.push(ValidationError::new(
                        "limits.soft_limit_percent",
                        "limits.soft_limit_percent must be an integer from 1 to 100 (percent of each limit that counts as nearly used up), or null for none",
                    )),
                }
            } else if k == "budget_per_month_usd" {
                match v {
                    Value::Null => {}
                    _ => match parse_usd("limits.budget_per_month_usd", v, BUDGET_SCALE) {
                        Ok(d) => out.budget_per_month_usd = Some(d),
                        Err(e) => errors.push(e),
                    },
                }
            } else {
                errors.push(ValidationError::new(
                    "limits",
                    format!(
                        "limits has an unknown field; the fields are {}, budget_per_month_usd, soft_limit_percent",
                        COUNT_LIMITS.join(", ")
                    ),
                ));
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }
}

/// `limits.<name>` as a `'static` field name.
fn count_field(name: &str) -> &'static str {
    match name {
        "requests_per_minute" => "limits.requests_per_minute",
        "tokens_per_minute" => "limits.tokens_per_minute",
        "max_concurrent_requests" => "limits.max_concurrent_requests",
        "tokens_per_day" => "limits.tokens_per_day",
        _ => "limits.tokens_per_month",
    }
}

fn count_error(field: &'static str) -> ValidationError {
    ValidationError::new(
        field,
        format!("{field} must be an integer from 0 to {MAX_COUNT} (0 blocks every request), or null for no limit"),
    )
}

/// `amount` as answers write money: as many decimal places as it needs,
/// and at least as many as `like` (the limit it is compared with) was
/// written with, so a `"12.50"` budget shows `"10.00"` used, not `"10"`.
pub fn usd_like(amount: Decimal, like: Decimal) -> String {
    let mut d = amount.normalize();
    if d.scale() < like.scale() {
        d.rescale(like.scale());
    }
    d.to_string()
}

/// A non-negative USD amount given as a decimal string (`"12.50"`) or a JSON
/// number; parsed from its text, so no binary floating point is involved.
pub fn parse_usd(field: &'static str, v: &Value, scale: u32) -> Result<Decimal, ValidationError> {
    let bad = || {
        ValidationError::new(
            field,
            format!("{field} must be a decimal amount in USD from 0 to {MAX_USD} with at most {scale} decimal places, e.g. \"12.50\""),
        )
    };
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return Err(bad()),
    };
    if text.is_empty() || text.len() > 40 || !text.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        return Err(bad());
    }
    let d = Decimal::from_str(&text).map_err(|_| bad())?;
    if d.is_sign_negative() || d > Decimal::from(MAX_USD) || d.normalize().scale() > scale {
        return Err(bad());
    }
    // Kept as written ("12.50" stays "12.50") unless it has trailing zeros
    // past the allowed places.
    Ok(if d.scale() > scale { d.normalize() } else { d })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn limits_parse_and_name_their_fields() {
        let l = Limits::parse(&json!({"requests_per_minute": 60, "tokens_per_day": null,
                                      "budget_per_month_usd": "12.50"}))
        .unwrap();
        assert_eq!(l.requests_per_minute, Some(60));
        assert_eq!(l.tokens_per_day, None);
        assert_eq!(l.budget_per_month_usd, Some(Decimal::new(125, 1)));
        assert_eq!(
            Limits::parse(&json!({"max_concurrent_requests": 0}))
                .unwrap()
                .max_concurrent_requests,
            Some(0)
        );
        assert!(Limits::parse(&Value::Null).unwrap().is_empty());
        let fields = |v: Value| -> Vec<&'static str> {
            Limits::parse(&v)
                .unwrap_err()
                .into_iter()
                .map(|e| e.field)
                .collect()
        };
        assert_eq!(
            fields(json!({"requests_per_minute": -1})),
            ["limits.requests_per_minute"]
        );
        assert_eq!(
            fields(json!({"tokens_per_minute": 1.5})),
            ["limits.tokens_per_minute"]
        );
        assert_eq!(
            fields(json!({"tokens_per_month": "5"})),
            ["limits.tokens_per_month"]
        );
        assert_eq!(
            fields(json!({"budget_per_month_usd": "-1"})),
            ["limits.budget_per_month_usd"]
        );
        assert_eq!(
            fields(json!({"budget_per_month_usd": "1e3"})),
            ["limits.budget_per_month_usd"]
        );
        assert_eq!(
            fields(json!({"budget_per_month_usd": "0.0000001"})),
            ["limits.budget_per_month_usd"]
        );
        assert_eq!(fields(json!({"rpm": 1})), ["limits"]);
        assert_eq!(fields(json!([1])), ["limits"]);
        // Stored JSON keeps money as a string.
        let stored = serde_json::to_value(&l).unwrap();
        assert_eq!(stored["budget_per_month_usd"], "12.50");
        assert_eq!(serde_json::from_value::<Limits>(stored).unwrap(), l);
        assert_eq!(parse_usd("x", &json!(0.1), 6).unwrap(), Decimal::new(1, 1));
    }

    #[test]
    fn soft_thresholds_round_up_and_limit_nothing_alone() {
        let soft = Limits::parse(&json!({"soft_limit_percent": 80})).unwrap();
        assert_eq!(soft.soft_limit_percent, Some(80));
        assert!(soft.is_empty(), "a soft threshold alone is not a limit");
        assert_ne!(soft, Limits::default());
        assert_eq!(soft.soft_count(100), Some(80));
        // The least count at or above 80 % of 7 (5.6).
        assert_eq!(soft.soft_count(7), Some(6));
        assert_eq!(soft.soft_count(0), Some(0));
        assert_eq!(soft.soft_count(MAX_COUNT), Some(MAX_COUNT / 10 * 8));
        let max = Decimal::from_str("12.50").unwrap();
        assert_eq!(usd_like(soft.soft_usd(max).unwrap(), max), "10.00");
        let tiny = Decimal::from_str("0.000001").unwrap();
        assert_eq!(
            soft.soft_usd(tiny),
            Some(tiny),
            "rounded up to the micro-dollar"
        );
        assert_eq!(
            usd_like(Decimal::new(1_234_500, 6), Decimal::from(5)),
            "1.2345"
        );
        assert_eq!(usd_like(Decimal::ZERO, max), "0.00");
        assert_eq!(Limits::default().soft_count(10), None);
        for bad in [json!(0), json!(101), json!(50.5), json!("80"), json!(-1)] {
            let e = Limits::parse(&json!({ "soft_limit_percent": bad })).unwrap_err();
            assert_eq!(e[0].field, "limits.soft_limit_percent");
        }
        assert_eq!(
            Limits::parse(&json!({"soft_limit_percent": null})).unwrap(),
            Limits::default()
        );
        let stored = serde_json::to_value(&soft).unwrap();
        assert_eq!(stored["soft_limit_percent"], 80);
        assert_eq!(serde_json::from_value::<Limits>(stored).unwrap(), soft);
    }
}
