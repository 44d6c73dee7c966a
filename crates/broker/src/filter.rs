//! Subscription filter policies over CloudEvent attributes (SNS semantics).
//!
//! A policy maps attribute names to a list of conditions. An event matches
//! when every named attribute matches at least one of its conditions (AND
//! across attributes, OR within one). Conditions:
//!
//! | written as | matches |
//! |---|---|
//! | `"order.placed"`, `42`, `true` | exactly that value |
//! | `{ prefix = "eu-" }` | strings starting with it |
//! | `{ anything-but = ["a", "b"] }` (or one value, or `{ prefix = ".." }`) | present and none of those |
//! | `{ numeric = [">=", 10, "<", 20] }` | numbers (or numeric strings) in range |
//! | `{ exists = true }` / `{ exists = false }` | presence / absence |
//!
//! As in SNS, an attribute a policy names must be present for the policy to
//! match, except under `exists = false`.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

use crate::cloudevent::{AttrValue, CloudEvent};

/// Why a filter policy is malformed.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("attribute `{attribute}`: {problem}")]
    Invalid { attribute: String, problem: String },
}

/// A subscription filter policy; the empty policy matches every event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FilterPolicy {
    rules: BTreeMap<String, Vec<Condition>>,
}

/// One condition on one attribute.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    Exact(Scalar),
    Prefix(String),
    AnythingBut(Vec<Scalar>),
    AnythingButPrefix(String),
    Numeric(Vec<(NumericOp, f64)>),
    Exists(bool),
}

/// A literal value in a policy.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    String(String),
    Number(f64),
    Bool(bool),
}

/// A comparison in a numeric condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumericOp {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

impl FilterPolicy {
    /// Builds a policy from attribute rules, checking each condition.
    pub fn new(
        rules: impl IntoIterator<Item = (String, Vec<Condition>)>,
    ) -> Result<Self, FilterError> {
        let rules: BTreeMap<_, _> = rules.into_iter().collect();
        for (attribute, conditions) in &rules {
            if conditions.is_empty() {
                return Err(FilterError::Invalid {
                    attribute: attribute.clone(),
                    problem: "needs at least one condition".into(),
                });
            }
            for c in conditions {
                if let Condition::Numeric(ops) = c
                    && (ops.is_empty() || ops.len() > 2)
                {
                    return Err(FilterError::Invalid {
                        attribute: attribute.clone(),
                        problem: "numeric takes one or two comparisons, e.g. [\">=\", 1, \"<\", 5]"
                            .into(),
                    });
                }
            }
        }
        Ok(Self { rules })
    }

    /// A policy that matches events whose `type` is one of `types`.
    pub fn types<S: Into<String>>(types: impl IntoIterator<Item = S>) -> Self {
        let conditions = types
            .into_iter()
            .map(|t| Condition::Exact(Scalar::String(t.into())))
            .collect();
        Self {
            rules: BTreeMap::from([("type".to_owned(), conditions)]),
        }
    }

    /// Whether the policy has no rules (matches everything).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `event` passes the policy.
    pub fn matches(&self, event: &CloudEvent) -> bool {
        self.rules.iter().all(|(name, conditions)| {
            let value = event.attribute(name);
            conditions.iter().any(|c| c.matches(value))
        })
    }
}

impl Condition {
    fn matches(&self, value: Option<&AttrValue>) -> bool {
        match (self, value) {
            (Self::Exists(want), v) => *want == v.is_some(),
            (_, None) => false,
            (Self::Exact(s), Some(v)) => s.equals(v),
            (Self::Prefix(p), Some(AttrValue::String(s))) => s.starts_with(p.as_str()),
            (Self::Prefix(_), Some(_)) => false,
            (Self::AnythingBut(list), Some(v)) => !list.iter().any(|s| s.equals(v)),
            (Self::AnythingButPrefix(p), Some(v)) => !v.to_text().starts_with(p.as_str()),
            (Self::Numeric(ops), Some(v)) => match v.as_number() {
                Some(n) => ops.iter().all(|(op, bound)| op.holds(n, *bound)),
                None => false,
            },
        }
    }
}

impl Scalar {
    fn equals(&self, v: &AttrValue) -> bool {
        match (self, v) {
            (Self::String(a), AttrValue::String(b)) => a == b,
            (Self::Number(a), v) => v.as_number() == Some(*a),
            (Self::Bool(a), AttrValue::Bool(b)) => a == b,
            (Self::Bool(a), AttrValue::String(b)) => b == if *a { "true" } else { "false" },
            _ => false,
        }
    }
}

impl NumericOp {
    fn holds(self, n: f64, bound: f64) -> bool {
        match self {
            Self::Eq => n == bound,
            Self::Lt => n < bound,
            Self::Le => n <= bound,
            Self::Gt => n > bound,
            Self::Ge => n >= bound,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "=" => Self::Eq,
            "<" => Self::Lt,
            "<=" => Self::Le,
            ">" => Self::Gt,
            ">=" => Self::Ge,
            _ => return None,
        })
    }
}

// The wire forms, as written in JSON or TOML.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    Many(Vec<RawCondition>),
    One(RawCondition),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawCondition {
    Scalar(RawScalar),
    Object(RawObject),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawScalar {
    Bool(bool),
    Number(f64),
    String(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawObject {
    prefix: Option<String>,
    #[serde(rename = "anything-but")]
    anything_but: Option<RawAnythingBut>,
    numeric: Option<Vec<RawScalar>>,
    exists: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawAnythingBut {
    Many(Vec<RawScalar>),
    One(RawScalar),
    Prefix { prefix: String },
}

impl From<RawScalar> for Scalar {
    fn from(r: RawScalar) -> Self {
        match r {
            RawScalar::Bool(b) => Self::Bool(b),
            RawScalar::Number(n) => Self::Number(n),
            RawScalar::String(s) => Self::String(s),
        }
    }
}

fn convert(attribute: &str, raw: RawCondition) -> Result<Condition, FilterError> {
    let bad = |problem: &str| FilterError::Invalid {
        attribute: attribute.to_owned(),
        problem: problem.to_owned(),
    };
    let obj = match raw {
        RawCondition::Scalar(s) => return Ok(Condition::Exact(s.into())),
        RawCondition::Object(o) => o,
    };
    let set = [
        obj.prefix.is_some(),
        obj.anything_but.is_some(),
        obj.numeric.is_some(),
        obj.exists.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set != 1 {
        return Err(bad(
            "a condition object takes exactly one of prefix, anything-but, numeric, exists",
        ));
    }
    if let Some(p) = obj.prefix {
        return Ok(Condition::Prefix(p));
    }
    if let Some(e) = obj.exists {
        return Ok(Condition::Exists(e));
    }
    if let Some(a) = obj.anything_but {
        return Ok(match a {
            RawAnythingBut::Many(v) => {
                Condition::AnythingBut(v.into_iter().map(Into::into).collect())
            }
            RawAnythingBut::One(v) => Condition::AnythingBut(vec![v.into()]),
            RawAnythingBut::Prefix { prefix } => Condition::AnythingButPrefix(prefix),
        });
    }
    let tokens = obj.numeric.unwrap_or_default();
    if tokens.len() % 2 != 0 || tokens.is_empty() || tokens.len() > 4 {
        return Err(bad(
            "numeric is a list of operator/number pairs, e.g. [\">=\", 1, \"<\", 5]",
        ));
    }
    let mut ops = Vec::new();
    for pair in tokens.chunks(2) {
        match (&pair[0], &pair[1]) {
            (RawScalar::String(op), RawScalar::Number(n)) => {
                let op = NumericOp::parse(op)
                    .ok_or_else(|| bad("numeric operators are =, <, <=, >, >="))?;
                ops.push((op, *n));
            }
            _ => return Err(bad("numeric pairs are an operator string then a number")),
        }
    }
    Ok(Condition::Numeric(ops))
}

impl<'de> Deserialize<'de> for FilterPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw: BTreeMap<String, OneOrMany> = BTreeMap::deserialize(d)?;
        let mut rules = Vec::with_capacity(raw.len());
        for (attribute, conds) in raw {
            let list = match conds {
                OneOrMany::Many(v) => v,
                OneOrMany::One(c) => vec![c],
            };
            let conditions = list
                .into_iter()
                .map(|c| convert(&attribute, c))
                .collect::<Result<Vec<_>, _>>()
                .map_err(serde::de::Error::custom)?;
            rules.push((attribute, conditions));
        }
        FilterPolicy::new(rules).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ext: &[(&str, &str)]) -> CloudEvent {
        CloudEvent::new(
            "1",
            "/shop/orders",
            "order.placed",
            ext,
            &serde_json::json!({}),
        )
        .unwrap()
    }

    fn policy(json: serde_json::Value) -> FilterPolicy {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn exact_prefix_and_lists() {
        let e = event(&[("region", "eu-west")]);
        assert!(policy(serde_json::json!({"type": ["order.placed", "x"]})).matches(&e));
        assert!(policy(serde_json::json!({"type": "order.placed"})).matches(&e));
        assert!(!policy(serde_json::json!({"type": ["x"]})).matches(&e));
        assert!(policy(serde_json::json!({"region": [{"prefix": "eu-"}]})).matches(&e));
        assert!(!policy(serde_json::json!({"region": [{"prefix": "us-"}]})).matches(&e));
        assert!(
            !policy(serde_json::json!({"type": "order.placed", "region": "us"})).matches(&e),
            "AND across attributes"
        );
        assert!(FilterPolicy::default().matches(&e));
    }

    #[test]
    fn anything_but_numeric_exists() {
        let e = event(&[("amount", "150"), ("region", "eu")]);
        assert!(
            policy(serde_json::json!({"region": [{"anything-but": ["us", "ap"]}]})).matches(&e)
        );
        assert!(!policy(serde_json::json!({"region": [{"anything-but": "eu"}]})).matches(&e));
        assert!(
            !policy(serde_json::json!({"region": [{"anything-but": {"prefix": "e"}}]})).matches(&e)
        );
        assert!(
            !policy(serde_json::json!({"missing": [{"anything-but": "eu"}]})).matches(&e),
            "absent attributes never match anything-but"
        );
        assert!(
            policy(serde_json::json!({"amount": [{"numeric": [">=", 100, "<", 200]}]})).matches(&e)
        );
        assert!(!policy(serde_json::json!({"amount": [{"numeric": [">", 150]}]})).matches(&e));
        assert!(policy(serde_json::json!({"amount": [150]})).matches(&e));
        assert!(policy(serde_json::json!({"region": [{"exists": true}]})).matches(&e));
        assert!(policy(serde_json::json!({"nope": [{"exists": false}]})).matches(&e));
        assert!(!policy(serde_json::json!({"nope": [{"exists": true}]})).matches(&e));
    }

    #[test]
    fn malformed_policies_are_rejected() {
        for bad in [
            serde_json::json!({"a": [{"numeric": [">", "x"]}]}),
            serde_json::json!({"a": [{"numeric": ["~", 1]}]}),
            serde_json::json!({"a": [{"prefix": "x", "exists": true}]}),
            serde_json::json!({"a": [{"bogus": 1}]}),
            serde_json::json!({"a": []}),
        ] {
            assert!(
                serde_json::from_value::<FilterPolicy>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }
}
