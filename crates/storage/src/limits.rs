//! Spend controls as stored: the `limits` of API keys and organizations
//! (defined in [`domain::limits`]), the model scope (`allowed_models`) of API
//! keys, the prices of a provider's models and what a request costs under
//! them. Each is parsed once from the client's JSON into a type that cannot
//! hold a bad value; money is a decimal, never a float.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::ValidationError;

pub use crate::domain::limits::{
    parse_usd, usd_like, Limits, Money, BUDGET_SCALE, COUNT_LIMITS, MAX_COUNT, MAX_USD,
};

/// Most decimal places of a price per million tokens.
pub const PRICE_SCALE: u32 = 12;
/// Most patterns in `allowed_models`, and most prices on a provider.
pub const MAX_PATTERNS: usize = 100;
/// Longest pattern, in characters.
pub const MAX_PATTERN_CHARS: usize = 256;

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
    use std::str::FromStr;

    use super::*;
    use serde_json::json;

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
