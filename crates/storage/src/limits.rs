//! Spend controls as stored: the `limits` of API keys and organizations, the
//! model scope (`allowed_models`) of API keys, the prices of a provider's
//! models and what a request costs under them. Each is parsed once from the
//! client's JSON into a type that cannot hold a bad value; money is a
//! decimal, never a float.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::ValidationError;

pub use rust_decimal::Decimal as Money;

/// Largest count a limit may name (exact in every arithmetic it meets,
/// a Lua number included).
pub const MAX_COUNT: u64 = 1_000_000_000_000_000;
/// Largest money amount (USD) a budget or a price may name.
pub const MAX_USD: u64 = 1_000_000_000_000;
/// Most decimal places of a budget (micro-dollars: what the counters hold).
pub const BUDGET_SCALE: u32 = 6;
/// Most decimal places of a price per million tokens.
pub const PRICE_SCALE: u32 = 12;
/// Most patterns in `allowed_models`, and most prices on a provider.
pub const MAX_PATTERNS: usize = 100;
/// Longest pattern, in characters.
pub const MAX_PATTERN_CHARS: usize = 256;

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
}

impl Limits {
    /// True when no limit is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
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
        let map = match value {
            Value::Null => return Ok(Self::default()),
            Value::Object(m) => m,
            _ => {
                return Err(vec![ValidationError::new(
                    "limits",
                    "limits must be an object (or null for none)",
                )])
            }
        };
        let mut out = Self::default();
        let mut errors = Vec::new();
        for (k, v) in map {
            if let Some(slot) = out.count_mut(k) {
                let field = count_field(k);
                match v {
                    Value::Null => {}
                    Value::Number(n) => match n.as_u64().filter(|n| *n <= MAX_COUNT) {
                        Some(n) => *slot = Some(n),
                        None => errors.push(count_error(field)),
                    },
                    _ => errors.push(count_error(field)),
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
                        "limits has an unknown field; the fields are {}, budget_per_month_usd",
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

/// A model pattern: `*` matches any run of characters, `/` included.
/// `{customName}/{modelName}` patterns (`mycompany/*`, `*/llama-3-8b`), or a
/// bare one with a `*` (`*`, `my*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct ModelPattern(String);

impl ModelPattern {
    /// Parses one entry of `allowed_models`.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let bad = |why: &str| {
            ValidationError::new(
                "allowed_models",
                format!("allowed_models entries are patterns like `mycompany/*` or `mycompany/llama-3-8b` (`*` matches anything, `/` too): {why}"),
            )
        };
        check_pattern_text(raw).map_err(bad)?;
        let (head, tail) = match raw.split_once('/') {
            Some((h, t)) => (h, Some(t)),
            None => (raw, None),
        };
        if head.is_empty() || !head.bytes().all(|b| b.is_ascii_lowercase() || b == b'*') {
            return Err(bad(
                "the part before the first `/` is a provider name (a-z) or has a `*`",
            ));
        }
        match tail {
            Some("") => Err(bad("a model name (or `*`) must follow the `/`")),
            None if !head.contains('*') => Err(bad(
                "a pattern without `/` must contain `*`; name a model as `{customName}/{modelName}`",
            )),
            _ => Ok(Self(raw.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `model` matches the pattern as a whole.
    pub fn matches(&self, model: &str) -> bool {
        glob(self.0.as_bytes(), model.as_bytes())
    }

    /// Characters other than `*`: the more, the more specific.
    fn literal_len(&self) -> usize {
        self.0.bytes().filter(|b| *b != b'*').count()
    }

    fn is_exact(&self) -> bool {
        !self.0.contains('*')
    }
}

/// Common rules of every pattern: 1 to [`MAX_PATTERN_CHARS`] characters, no
/// whitespace or control characters.
fn check_pattern_text(raw: &str) -> Result<(), &'static str> {
    if raw.is_empty() || raw.chars().count() > MAX_PATTERN_CHARS {
        return Err("each must be 1 to 256 characters");
    }
    if raw.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("whitespace and control characters are not allowed");
    }
    Ok(())
}

/// `*`-only glob, iterative with one backtrack point: linear in practice,
/// never exponential whatever the pattern.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|b| *b == b'*')
}

/// Parses `allowed_models`: `null` allows every model, `[]` none.
pub fn parse_allowed_models(value: &Value) -> Result<Option<Vec<ModelPattern>>, ValidationError> {
    let items = match value {
        Value::Null => return Ok(None),
        Value::Array(a) => a,
        _ => {
            return Err(ValidationError::new(
                "allowed_models",
                "allowed_models must be an array of patterns, or null for every model",
            ))
        }
    };
    if items.len() > MAX_PATTERNS {
        return Err(ValidationError::new(
            "allowed_models",
            format!("allowed_models may hold at most {MAX_PATTERNS} patterns"),
        ));
    }
    let mut out: Vec<ModelPattern> = Vec::with_capacity(items.len());
    for item in items {
        let Value::String(s) = item else {
            return Err(ValidationError::new(
                "allowed_models",
                "allowed_models entries must be strings",
            ));
        };
        let p = ModelPattern::parse(s)?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(Some(out))
}

/// Whether a key whose scope is `allowed` may call `model`
/// (`{customName}/{modelName}`): `None` allows all, an empty list nothing.
pub fn model_allowed(allowed: Option<&[ModelPattern]>, model: &str) -> bool {
    allowed.is_none_or(|ps| ps.iter().any(|p| p.matches(model)))
}

/// The price of one model (or pattern of models) of a provider, in USD per
/// million tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    /// The upstream model name (`llama-3-8b`), a pattern (`llama-*`), or `*`.
    pub model: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub input_per_million_usd: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub output_per_million_usd: Decimal,
}

impl Price {
    /// What `prompt_tokens` in and `completion_tokens` out cost, in USD.
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> Decimal {
        let part = |tokens: u64, per_million: Decimal| {
            Decimal::from(tokens)
                .checked_mul(per_million)
                .unwrap_or(Decimal::MAX)
        };
        let total = part(prompt_tokens, self.input_per_million_usd)
            .checked_add(part(completion_tokens, self.output_per_million_usd))
            .unwrap_or(Decimal::MAX);
        (total / Decimal::from(1_000_000)).normalize()
    }

    fn pattern(&self) -> ModelPattern {
        ModelPattern(self.model.clone())
    }
}

/// A provider's prices; at most one per `model` value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Prices(pub Vec<Price>);

impl Prices {
    /// Parses the client's `prices` array (`null`: none).
    pub fn parse(value: &Value) -> Result<Self, ValidationError> {
        let bad = |m: String| ValidationError::new("prices", m);
        let items = match value {
            Value::Null => return Ok(Self::default()),
            Value::Array(a) => a,
            _ => return Err(bad("prices must be an array of {\"model\",\"input_per_million_usd\",\"output_per_million_usd\"}".into())),
        };
        if items.len() > MAX_PATTERNS {
            return Err(bad(format!(
                "prices may hold at most {MAX_PATTERNS} entries"
            )));
        }
        let mut out: Vec<Price> = Vec::with_capacity(items.len());
        for item in items {
            let Value::Object(m) = item else {
                return Err(bad("each price must be an object".into()));
            };
            if m.keys().any(|k| {
                !["model", "input_per_million_usd", "output_per_million_usd"].contains(&k.as_str())
            }) {
                return Err(bad("a price has an unknown field; the fields are model, input_per_million_usd, output_per_million_usd".into()));
            }
            let model = match m.get("model") {
                Some(Value::String(s)) => s.clone(),
                _ => {
                    return Err(bad(
                        "each price needs a `model`: a model name, a pattern with `*`, or `*`"
                            .into(),
                    ))
                }
            };
            check_pattern_text(&model).map_err(|why| bad(format!("price model: {why}")))?;
            if out.iter().any(|p| p.model == model) {
                return Err(bad("two prices name the same model".into()));
            }
            let amount = |name: &'static str| -> Result<Decimal, ValidationError> {
                let v = m
                    .get(name)
                    .ok_or_else(|| bad(format!("each price needs `{name}`")))?;
                parse_usd("prices", v, PRICE_SCALE)
            };
            out.push(Price {
                input_per_million_usd: amount("input_per_million_usd")?,
                output_per_million_usd: amount("output_per_million_usd")?,
                model,
            });
        }
        Ok(Self(out))
    }

    /// The price of `model` (the upstream model name): an exact entry, else
    /// the matching pattern with the most literal characters (so `*` last);
    /// ties go to the entry listed first.
    pub fn lookup(&self, model: &str) -> Option<&Price> {
        if let Some(p) = self
            .0
            .iter()
            .find(|p| p.model == model && !p.model.contains('*'))
        {
            return Some(p);
        }
        let mut best: Option<(&Price, usize)> = None;
        for p in &self.0 {
            let pat = p.pattern();
            if pat.is_exact() || !pat.matches(model) {
                continue;
            }
            let n = pat.literal_len();
            if best.is_none_or(|(_, b)| n > b) {
                best = Some((p, n));
            }
        }
        best.map(|(p, _)| p)
    }

    /// What a request for `model` costs, or `None` without a price or
    /// without any token count.
    pub fn cost(
        &self,
        model: &str,
        prompt_tokens: Option<i64>,
        completion_tokens: Option<i64>,
    ) -> Option<Decimal> {
        if prompt_tokens.is_none() && completion_tokens.is_none() {
            return None;
        }
        let n = |t: Option<i64>| t.unwrap_or(0).max(0) as u64;
        self.lookup(model)
            .map(|p| p.cost(n(prompt_tokens), n(completion_tokens)))
    }

    /// The entry with the highest per-million price, input or output (a
    /// money reservation must cover whichever model ends up serving).
    pub fn highest(&self) -> Option<&Price> {
        self.0
            .iter()
            .max_by_key(|p| p.input_per_million_usd.max(p.output_per_million_usd))
    }
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
    fn patterns_match_across_slashes() {
        let p = |s: &str| ModelPattern::parse(s).unwrap();
        assert!(p("mycompany/*").matches("mycompany/meta-llama/Llama-3-8B"));
        assert!(!p("mycompany/*").matches("other/x"));
        assert!(p("*").matches("a/b/c"));
        assert!(p("*/llama-*").matches("a/llama-3"));
        assert!(p("my*/x").matches("mycompany/x"));
        assert!(!p("mycompany/x").matches("mycompany/xy"));
        assert!(p("a/*b*c*d").matches("a/xxbxxcxxd"));
        assert!(!p("a/*b*c*d").matches("a/xxbxxcxx"));
        for bad in [
            "",
            "MyCo/x",
            "mycompany",
            "mycompany/",
            "my co/x",
            "/x",
            &"a/".repeat(200),
        ] {
            assert!(ModelPattern::parse(bad).is_err(), "{bad}");
        }
        let scope = parse_allowed_models(&json!(["mycompany/*"])).unwrap();
        assert!(model_allowed(scope.as_deref(), "mycompany/m"));
        assert!(!model_allowed(scope.as_deref(), "other/m"));
        assert!(!model_allowed(Some(&[]), "mycompany/m"));
        assert!(model_allowed(None, "anything/m"));
        assert!(parse_allowed_models(&json!(vec!["a/*"; 101])).is_err());
        assert!(parse_allowed_models(&json!([1])).is_err());
    }

    #[test]
    fn the_most_specific_price_wins_and_costs_are_exact() {
        let prices = Prices::parse(&json!([
            {"model": "*", "input_per_million_usd": "1", "output_per_million_usd": "1"},
            {"model": "llama-*", "input_per_million_usd": "0.5", "output_per_million_usd": "0.5"},
            {"model": "llama-3-*", "input_per_million_usd": "0.2", "output_per_million_usd": "0.4"},
            {"model": "llama-3-8b", "input_per_million_usd": "0.10", "output_per_million_usd": "0.20"},
        ]))
        .unwrap();
        assert_eq!(prices.lookup("llama-3-8b").unwrap().model, "llama-3-8b");
        assert_eq!(prices.lookup("llama-3-70b").unwrap().model, "llama-3-*");
        assert_eq!(prices.lookup("llama-2").unwrap().model, "llama-*");
        assert_eq!(prices.lookup("mistral").unwrap().model, "*");
        // 1000 * 0.10 / 1e6 + 2000 * 0.20 / 1e6 = 0.0005
        assert_eq!(
            prices.cost("llama-3-8b", Some(1000), Some(2000)),
            Some(Decimal::from_str("0.0005").unwrap())
        );
        assert_eq!(prices.cost("llama-3-8b", None, None), None);
        assert_eq!(Prices::default().cost("x", Some(1), Some(1)), None);
        // 0.1 + 0.2 stays 0.3 (no binary floating point).
        let p = Price {
            model: "m".into(),
            input_per_million_usd: Decimal::from_str("0.1").unwrap(),
            output_per_million_usd: Decimal::from_str("0.2").unwrap(),
        };
        assert_eq!(
            p.cost(1_000_000, 1_000_000),
            Decimal::from_str("0.3").unwrap()
        );
        for bad in [
            json!({}),
            json!([{"model": "m"}]),
            json!([{"model": "m", "input_per_million_usd": "-1", "output_per_million_usd": "1"}]),
            json!([{"model": "m", "input_per_million_usd": "1", "output_per_million_usd": "1", "x": 1}]),
            json!([{"model": "m", "input_per_million_usd": "1", "output_per_million_usd": "1"},
                   {"model": "m", "input_per_million_usd": "1", "output_per_million_usd": "1"}]),
        ] {
            assert_eq!(Prices::parse(&bad).unwrap_err().field, "prices", "{bad}");
        }
    }
}
