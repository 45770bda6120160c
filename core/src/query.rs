//! The query language of collection queries: a [`Filter`] over JSON documents, an [`Order`] and
//! a limit, together a [`Query`]. Pure: store nodes evaluate filters during their scans with
//! [`Filter::matches`] and sort with [`compare_values`], so the JSON form below is the wire format
//! (`QueryRequest.query` and `ScanAtRequest.filter` in `node.proto`).
//!
//! # The JSON form of a filter
//!
//! A filter is a JSON object. Its entries are combined with AND (`{}` matches every document):
//!
//! - `"field.path": value`: the field equals `value` (deep equality, numbers by value: `1`
//!   equals `1.0`). A dotted path walks nested objects (and arrays, by a decimal index).
//! - `"field.path": {"$op": operand, ...}`: an operator object, every operator must hold:
//!   `$eq`, `$ne`, `$gt`, `$gte`, `$lt`, `$lte` (comparisons hold only between values of the
//!   same JSON type, ordered by [`compare_values`]), `$in` / `$nin` (an array of values),
//!   `$exists` (a boolean), and `$not` (an operator object or a value, negated). An object
//!   mixing `$` keys with other keys is refused.
//! - `"$and": [filter, ...]`, `"$or": [filter, ...]`, `"$not": filter`.
//!
//! A missing field equals nothing and compares with nothing, so `$ne`, `$nin` and `$not` match
//! documents without the field: `{"$not": f}` is exactly the complement of `f`.
//!
//! ```
//! use causeway_core::query::{Filter, QueryLimits};
//! use serde_json::json;
//!
//! let f = Filter::parse(
//!     &json!({"status": "open", "total": {"$gte": 10}, "$or": [{"tags": {"$exists": true}}, {"vip": true}]}),
//!     &QueryLimits::default(),
//! )
//! .unwrap();
//! assert!(f.matches(&json!({"status": "open", "total": 12.5, "vip": true})));
//! assert!(!f.matches(&json!({"status": "open", "total": 9, "vip": true})));
//! ```
//!
//! A [`Query`] is `{"filter": {...}, "order": {"path": "a.b", "descending": false}, "limit": 10}`;
//! every field may be left out.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Limits on the size of a filter, so a request cannot make a store node do unbounded work per
/// document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueryLimits {
    /// Deepest nesting of `$and` / `$or` / `$not`. Default 16.
    pub max_depth: usize,
    /// Most predicates and combinators in one filter. Default 256. A query's filter is bounded
    /// as parsed too ([`Filter::extent`]).
    pub max_nodes: usize,
    /// Most values in one `$in` / `$nin` array. Default 1024.
    pub max_in_values: usize,
    /// Most segments in one field path. Default 32.
    pub max_path_segments: usize,
    /// Longest field path, in bytes. Default 1024.
    pub max_path_bytes: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            max_depth: 16,
            max_nodes: 256,
            max_in_values: 1024,
            max_path_segments: 32,
            max_path_bytes: 1024,
        }
    }
}

/// Why a filter or query was refused. `Display` names the problem for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("a filter must be a JSON object")]
    NotAnObject,
    #[error("unknown operator {0:?}")]
    UnknownOperator(String),
    #[error("operator {0:?} is not allowed here")]
    MisplacedOperator(String),
    #[error("an operator object may not mix operators ('$...') with field names")]
    MixedOperatorsAndFields,
    #[error("operator {op} expects {expected}")]
    BadOperand {
        op: &'static str,
        expected: &'static str,
    },
    #[error("filter nesting is deeper than the limit of {max}")]
    TooDeep { max: usize },
    #[error("filter has more than {max} predicates")]
    TooLarge { max: usize },
    #[error("operator {op} has more than {max} values")]
    TooManyValues { op: &'static str, max: usize },
    #[error("invalid field path {path:?}: {why}")]
    BadPath { path: String, why: &'static str },
    #[error("invalid query: {0}")]
    BadQuery(String),
}

/// A field path: object keys (or decimal array indexes) from the top of the document.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FieldPath(Vec<String>);

impl FieldPath {
    /// Parses a dotted path (`a.b.c`): non-empty segments, within the limits, not starting
    /// with `$` (those are operators).
    pub fn parse(path: &str, limits: &QueryLimits) -> Result<FieldPath, QueryError> {
        let bad = |why| QueryError::BadPath {
            path: path.chars().take(128).collect(),
            why,
        };
        if path.len() > limits.max_path_bytes {
            return Err(bad("too long"));
        }
        if path.starts_with('$') {
            return Err(bad("a path may not start with '$'"));
        }
        let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return Err(bad("empty segment"));
        }
        if segments.len() > limits.max_path_segments {
            return Err(bad("too many segments"));
        }
        Ok(FieldPath(segments))
    }

    pub fn segments(&self) -> &[String] {
        &self.0
    }

    /// The value at this path in `doc`, if any.
    pub fn lookup<'a>(&self, doc: &'a Value) -> Option<&'a Value> {
        self.0.iter().try_fold(doc, |v, seg| match v {
            Value::Object(m) => m.get(seg),
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        })
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// A comparison of a field with one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompareOp {
    Eq,
    Gt,
    Gte,
    Lt,
    Lte,
}

impl CompareOp {
    fn name(self) -> &'static str {
        match self {
            CompareOp::Eq => "$eq",
            CompareOp::Gt => "$gt",
            CompareOp::Gte => "$gte",
            CompareOp::Lt => "$lt",
            CompareOp::Lte => "$lte",
        }
    }
}

/// A parsed filter. `$ne` parses as `Not(Compare Eq)` and `$nin` as `Not(In)`, so the tree
/// has few shapes and `Not` is always the exact complement.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// Every filter holds (`[]`: always true).
    And(Vec<Filter>),
    /// Some filter holds (`[]`: always false).
    Or(Vec<Filter>),
    Not(Box<Filter>),
    Compare {
        path: FieldPath,
        op: CompareOp,
        value: Value,
    },
    In {
        path: FieldPath,
        values: Vec<Value>,
    },
    Exists {
        path: FieldPath,
        exists: bool,
    },
}

impl Default for Filter {
    /// The filter that matches every document (`{}`).
    fn default() -> Self {
        Filter::And(Vec::new())
    }
}

/// Parsing state: the count of nodes so far, against the limits.
struct Parser<'a> {
    limits: &'a QueryLimits,
    nodes: usize,
}

impl Parser<'_> {
    fn count(&mut self) -> Result<(), QueryError> {
        self.nodes += 1;
        if self.nodes > self.limits.max_nodes {
            return Err(QueryError::TooLarge {
                max: self.limits.max_nodes,
            });
        }
        Ok(())
    }

    fn check_depth(&self, depth: usize) -> Result<(), QueryError> {
        if depth > self.limits.max_depth {
            return Err(QueryError::TooDeep {
                max: self.limits.max_depth,
            });
        }
        Ok(())
    }

    /// A filter object (top level, or an element of `$and` / `$or`, or the operand of `$not`).
    fn filter(&mut self, value: &Value, depth: usize) -> Result<Filter, QueryError> {
        self.check_depth(depth)?;
        let Value::Object(map) = value else {
            return Err(QueryError::NotAnObject);
        };
        let mut parts = Vec::with_capacity(map.len());
        for (key, operand) in map {
            parts.push(match key.as_str() {
                "$and" | "$or" => {
                    let Value::Array(items) = operand else {
                        return Err(QueryError::BadOperand {
                            op: if key == "$and" { "$and" } else { "$or" },
                            expected: "an array of filters",
                        });
                    };
                    self.count()?;
                    let fs = items
                        .iter()
                        .map(|i| self.filter(i, depth + 1))
                        .collect::<Result<Vec<_>, _>>()?;
                    if key == "$and" {
                        Filter::And(fs)
                    } else {
                        Filter::Or(fs)
                    }
                }
                "$not" => {
                    self.count()?;
                    Filter::Not(Box::new(self.filter(operand, depth + 1)?))
                }
                k if k.starts_with('$') => {
                    return Err(if is_field_operator(k) {
                        QueryError::MisplacedOperator(k.to_owned())
                    } else {
                        QueryError::UnknownOperator(k.chars().take(64).collect())
                    })
                }
                path => {
                    let path = FieldPath::parse(path, self.limits)?;
                    self.field(&path, operand, depth)?
                }
            });
        }
        Ok(if parts.len() == 1 {
            parts.pop().unwrap_or_default()
        } else {
            Filter::And(parts)
        })
    }

    /// The condition on one field: a value (equality) or an operator object.
    fn field(
        &mut self,
        path: &FieldPath,
        operand: &Value,
        depth: usize,
    ) -> Result<Filter, QueryError> {
        self.check_depth(depth)?;
        let ops = match operand {
            Value::Object(m) if !m.is_empty() && m.keys().any(|k| k.starts_with('$')) => m,
            value => {
                self.count()?;
                return Ok(Filter::Compare {
                    path: path.clone(),
                    op: CompareOp::Eq,
                    value: value.clone(),
                });
            }
        };
        if !ops.keys().all(|k| k.starts_with('$')) {
            return Err(QueryError::MixedOperatorsAndFields);
        }
        let mut parts = Vec::with_capacity(ops.len());
        for (op, arg) in ops {
            self.count()?;
            let path = path.clone();
            parts.push(match op.as_str() {
                "$eq" => compare(path, CompareOp::Eq, arg),
                "$gt" => compare(path, CompareOp::Gt, arg),
                "$gte" => compare(path, CompareOp::Gte, arg),
                "$lt" => compare(path, CompareOp::Lt, arg),
                "$lte" => compare(path, CompareOp::Lte, arg),
                "$ne" => Filter::Not(Box::new(compare(path, CompareOp::Eq, arg))),
                "$in" => self.values("$in", path, arg)?,
                "$nin" => Filter::Not(Box::new(self.values("$nin", path, arg)?)),
                "$exists" => match arg {
                    Value::Bool(exists) => Filter::Exists {
                        path,
                        exists: *exists,
                    },
                    _ => {
                        return Err(QueryError::BadOperand {
                            op: "$exists",
                            expected: "true or false",
                        })
                    }
                },
                "$not" => Filter::Not(Box::new(self.field(&path, arg, depth + 1)?)),
                "$and" | "$or" => return Err(QueryError::MisplacedOperator(op.clone())),
                other => {
                    return Err(QueryError::UnknownOperator(
                        other.chars().take(64).collect(),
                    ))
                }
            });
        }
        Ok(if parts.len() == 1 {
            parts.pop().unwrap_or_default()
        } else {
            Filter::And(parts)
        })
    }

    fn values(
        &mut self,
        op: &'static str,
        path: FieldPath,
        arg: &Value,
    ) -> Result<Filter, QueryError> {
        let Value::Array(values) = arg else {
            return Err(QueryError::BadOperand {
                op,
                expected: "an array of values",
            });
        };
        if values.len() > self.limits.max_in_values {
            return Err(QueryError::TooManyValues {
                op,
                max: self.limits.max_in_values,
            });
        }
        Ok(Filter::In {
            path,
            values: values.clone(),
        })
    }
}

fn compare(path: FieldPath, op: CompareOp, value: &Value) -> Filter {
    Filter::Compare {
        path,
        op,
        value: value.clone(),
    }
}

fn is_field_operator(k: &str) -> bool {
    matches!(
        k,
        "$eq" | "$ne" | "$gt" | "$gte" | "$lt" | "$lte" | "$in" | "$nin" | "$exists"
    )
}

impl Filter {
    /// Parses the JSON form of a filter within `limits`.
    ///
    /// The limits bound the text as written. Its tree may be larger ([`Filter::extent`]): several
    /// fields of one object, or several operators on one field, are joined by an `$and`, and
    /// `$ne` / `$nin` are a `$not` of `$eq` / `$in`. [`Query::parse`] bounds the tree too, since a
    /// query travels on in its JSON form. This rule is part of how log records apply (a
    /// transaction's conditions): it must not change.
    pub fn parse(value: &Value, limits: &QueryLimits) -> Result<Filter, QueryError> {
        Parser { limits, nodes: 0 }.filter(value, 0)
    }

    /// Refuses a filter whose tree ([`Filter::extent`]) is past `limits`. Within them, its JSON
    /// form ([`Filter::to_json`]) parses within them too: the text's counts never exceed the
    /// tree's.
    pub fn check_extent(&self, limits: &QueryLimits) -> Result<(), QueryError> {
        let (nodes, depth) = self.extent();
        if nodes > limits.max_nodes {
            return Err(QueryError::TooLarge {
                max: limits.max_nodes,
            });
        }
        if depth > limits.max_depth {
            return Err(QueryError::TooDeep {
                max: limits.max_depth,
            });
        }
        Ok(())
    }

    /// The nodes of this filter's tree (predicates, and the `$and`, `$or` and `$not` joining
    /// them) and its depth (the root at 0): what [`QueryLimits`] bound.
    pub fn extent(&self) -> (usize, usize) {
        match self {
            Filter::And(fs) | Filter::Or(fs) => fs
                .iter()
                .map(Filter::extent)
                .fold((1, 0), |(nodes, depth), (n, d)| {
                    (nodes + n, depth.max(d + 1))
                }),
            Filter::Not(f) => {
                let (nodes, depth) = f.extent();
                (nodes + 1, depth + 1)
            }
            Filter::Compare { .. } | Filter::In { .. } | Filter::Exists { .. } => (1, 0),
        }
    }

    /// Parses JSON text (as `ScanAtRequest.filter` carries it); empty text is the filter that
    /// matches everything.
    pub fn parse_str(text: &str, limits: &QueryLimits) -> Result<Filter, QueryError> {
        if text.trim().is_empty() {
            return Ok(Filter::default());
        }
        let value: Value =
            serde_json::from_str(text).map_err(|e| QueryError::BadQuery(e.to_string()))?;
        Filter::parse(&value, limits)
    }

    /// Whether `doc` satisfies this filter.
    pub fn matches(&self, doc: &Value) -> bool {
        match self {
            Filter::And(fs) => fs.iter().all(|f| f.matches(doc)),
            Filter::Or(fs) => fs.iter().any(|f| f.matches(doc)),
            Filter::Not(f) => !f.matches(doc),
            Filter::Compare { path, op, value } => {
                let Some(field) = path.lookup(doc) else {
                    return false;
                };
                if *op == CompareOp::Eq {
                    return compare_values(field, value) == Ordering::Equal;
                }
                if type_rank(field) != type_rank(value) {
                    return false;
                }
                let ord = compare_values(field, value);
                match op {
                    CompareOp::Gt => ord == Ordering::Greater,
                    CompareOp::Gte => ord != Ordering::Less,
                    CompareOp::Lt => ord == Ordering::Less,
                    CompareOp::Lte => ord != Ordering::Greater,
                    CompareOp::Eq => ord == Ordering::Equal,
                }
            }
            Filter::In { path, values } => path.lookup(doc).is_some_and(|field| {
                values
                    .iter()
                    .any(|v| compare_values(field, v) == Ordering::Equal)
            }),
            Filter::Exists { path, exists } => path.lookup(doc).is_some() == *exists,
        }
    }

    /// The JSON form, which [`Filter::parse`] reads back to an equal filter.
    pub fn to_json(&self) -> Value {
        let single = |path: &FieldPath, op: &str, arg: Value| {
            let mut ops = Map::new();
            ops.insert(op.to_owned(), arg);
            let mut m = Map::new();
            m.insert(path.to_string(), Value::Object(ops));
            Value::Object(m)
        };
        match self {
            Filter::And(fs) => {
                let mut m = Map::new();
                m.insert(
                    "$and".into(),
                    Value::Array(fs.iter().map(Filter::to_json).collect()),
                );
                Value::Object(m)
            }
            Filter::Or(fs) => {
                let mut m = Map::new();
                m.insert(
                    "$or".into(),
                    Value::Array(fs.iter().map(Filter::to_json).collect()),
                );
                Value::Object(m)
            }
            Filter::Not(f) => {
                let mut m = Map::new();
                m.insert("$not".into(), f.to_json());
                Value::Object(m)
            }
            Filter::Compare { path, op, value } => single(path, op.name(), value.clone()),
            Filter::In { path, values } => single(path, "$in", Value::Array(values.clone())),
            Filter::Exists { path, exists } => single(path, "$exists", Value::Bool(*exists)),
        }
    }
}

impl Serialize for Filter {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Filter {
    /// Deserialises within the default [`QueryLimits`]; use [`Filter::parse`] for others.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Filter::parse(&value, &QueryLimits::default()).map_err(serde::de::Error::custom)
    }
}

/// The rank of a JSON value's type in the total order: null < bool < number < string < array <
/// object.
fn type_rank(v: &Value) -> u8 {
    match v {
        Value::Null => 0,
        Value::Bool(_) => 1,
        Value::Number(_) => 2,
        Value::String(_) => 3,
        Value::Array(_) => 4,
        Value::Object(_) => 5,
    }
}

/// A total order over JSON values: by type (null < bool < number < string < array < object),
/// then numbers by exact numeric value (`1` equals `1.0`, `2^53 + 1` is above `2^53` as a
/// float), strings by bytes, arrays lexicographically, objects by their entries sorted by key.
pub fn compare_values(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Null, Value::Null) => Ordering::Equal,
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Number(x), Value::Number(y)) => compare_numbers(x, y),
        (Value::String(x), Value::String(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Value::Array(x), Value::Array(y)) => {
            for (p, q) in x.iter().zip(y) {
                let o = compare_values(p, q);
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        }
        (Value::Object(x), Value::Object(y)) => {
            let mut xs: Vec<_> = x.iter().collect();
            let mut ys: Vec<_> = y.iter().collect();
            xs.sort_by(|p, q| p.0.cmp(q.0));
            ys.sort_by(|p, q| p.0.cmp(q.0));
            for ((kx, vx), (ky, vy)) in xs.iter().zip(&ys) {
                let o = kx
                    .as_bytes()
                    .cmp(ky.as_bytes())
                    .then_with(|| compare_values(vx, vy));
                if o != Ordering::Equal {
                    return o;
                }
            }
            xs.len().cmp(&ys.len())
        }
        _ => type_rank(a).cmp(&type_rank(b)),
    }
}

fn as_integer(n: &serde_json::Number) -> Option<i128> {
    n.as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
}

fn compare_numbers(x: &serde_json::Number, y: &serde_json::Number) -> Ordering {
    match (as_integer(x), as_integer(y)) {
        (Some(i), Some(j)) => i.cmp(&j),
        (Some(i), None) => compare_int_float(i, y.as_f64().unwrap_or(0.0)),
        (None, Some(j)) => compare_int_float(j, x.as_f64().unwrap_or(0.0)).reverse(),
        (None, None) => {
            let (p, q) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
            // JSON has no NaN or infinities; -0.0 and 0.0 are the same number.
            p.partial_cmp(&q).unwrap_or(Ordering::Equal)
        }
    }
}

/// Compares an integer with a float exactly. Rounding is monotone, so when `i as f64` differs
/// from `f` it orders them; when it equals `f`, `f` is integral and within `i128`, so compare
/// as integers.
fn compare_int_float(i: i128, f: f64) -> Ordering {
    let r = i as f64;
    match r.partial_cmp(&f) {
        Some(Ordering::Equal) => i.cmp(&(f as i128)),
        Some(o) => o,
        None => Ordering::Equal,
    }
}

/// The order of a query's results: by the value at `path` (numeric segments index arrays, as
/// in filters), in the total order of [`compare_values`]. A document without the field sorts
/// before every value, `null` included, when ascending, and so after every value when
/// descending. Ties are broken by the store (by key, ascending either way).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Order {
    /// A dotted field path.
    pub path: String,
    #[serde(default)]
    pub descending: bool,
}

impl Order {
    /// Compares two documents in this order.
    pub fn compare(&self, a: &Value, b: &Value) -> Ordering {
        let path = self.field_path();
        self.compare_keys(path.lookup(a), path.lookup(b))
    }

    /// The path as segments, to look a document's sort key up with [`FieldPath::lookup`].
    pub fn field_path(&self) -> FieldPath {
        FieldPath(self.path.split('.').map(str::to_owned).collect())
    }

    /// Compares two sort keys (the values at the path, `None` for a document without it) in
    /// this order: `None` first ascending, last descending.
    pub fn compare_keys(&self, a: Option<&Value>, b: Option<&Value>) -> Ordering {
        let o = match (a, b) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Less,
            (Some(_), None) => Ordering::Greater,
            (Some(x), Some(y)) => compare_values(x, y),
        };
        if self.descending {
            o.reverse()
        } else {
            o
        }
    }
}

/// A collection query: which documents, in which order, how many per page.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    #[serde(default)]
    pub filter: Filter,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<Order>,
    /// At most this many documents per page; `None` = the server's maximum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

impl Query {
    /// Parses a query's JSON form, checking the filter against `limits` and the order's path.
    pub fn parse(value: &Value, limits: &QueryLimits) -> Result<Query, QueryError> {
        let Value::Object(map) = value else {
            return Err(QueryError::BadQuery("a query must be a JSON object".into()));
        };
        if let Some(k) = map
            .keys()
            .find(|k| !matches!(k.as_str(), "filter" | "order" | "limit"))
        {
            return Err(QueryError::BadQuery(format!(
                "unknown field {:?}",
                k.chars().take(64).collect::<String>()
            )));
        }
        // The api-server forwards a query in its JSON form, whose filter is its tree: bounding
        // the tree here keeps that form within the limits the query met.
        let filter = match map.get("filter") {
            None | Some(Value::Null) => Filter::default(),
            Some(f) => Filter::parse(f, limits)?,
        };
        filter.check_extent(limits)?;
        let order = match map.get("order") {
            None | Some(Value::Null) => None,
            Some(o) => {
                let order: Order = serde_json::from_value(o.clone())
                    .map_err(|e| QueryError::BadQuery(format!("order: {e}")))?;
                FieldPath::parse(&order.path, limits)?;
                Some(order)
            }
        };
        let limit = match map.get("limit") {
            None | Some(Value::Null) => None,
            Some(l) => Some(
                l.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| {
                        QueryError::BadQuery("limit must be a positive integer".into())
                    })?,
            ),
        };
        Ok(Query {
            filter,
            order,
            limit,
        })
    }

    /// Parses a query's JSON text.
    pub fn parse_str(text: &str, limits: &QueryLimits) -> Result<Query, QueryError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| QueryError::BadQuery(e.to_string()))?;
        Query::parse(&value, limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse(v: Value) -> Filter {
        Filter::parse(&v, &QueryLimits::default()).unwrap()
    }

    fn err(v: Value) -> QueryError {
        Filter::parse(&v, &QueryLimits::default()).unwrap_err()
    }

    #[test]
    fn equality_and_dotted_paths() {
        let doc = json!({"a": {"b": {"c": 3}}, "s": "x", "arr": [1, {"k": 2}], "n": null});
        assert!(parse(json!({"a.b.c": 3})).matches(&doc));
        assert!(parse(json!({"a.b.c": 3.0})).matches(&doc));
        assert!(!parse(json!({"a.b.c": "3"})).matches(&doc));
        assert!(parse(json!({"a.b": {"c": 3}})).matches(&doc));
        assert!(parse(json!({"arr.1.k": 2})).matches(&doc));
        assert!(parse(json!({"n": null})).matches(&doc));
        assert!(!parse(json!({"missing": null})).matches(&doc));
        assert!(parse(json!({})).matches(&doc));
        assert!(parse(json!({"s": "x", "a.b.c": 3})).matches(&doc));
        assert!(!parse(json!({"s": "x", "a.b.c": 4})).matches(&doc));
    }

    #[test]
    fn comparisons_hold_within_one_type() {
        let doc = json!({"n": 5, "s": "m", "b": true});
        assert!(parse(json!({"n": {"$gt": 4}})).matches(&doc));
        assert!(parse(json!({"n": {"$gte": 5, "$lte": 5.0}})).matches(&doc));
        assert!(!parse(json!({"n": {"$lt": 5}})).matches(&doc));
        // A number is not greater than a string, nor less: comparisons are within a type.
        assert!(!parse(json!({"n": {"$lt": "a"}})).matches(&doc));
        assert!(!parse(json!({"n": {"$gt": "a"}})).matches(&doc));
        assert!(parse(json!({"s": {"$gt": "a", "$lt": "z"}})).matches(&doc));
        assert!(parse(json!({"b": {"$gt": false}})).matches(&doc));
        assert!(parse(json!({"n": {"$ne": 4}})).matches(&doc));
        assert!(parse(json!({"missing": {"$ne": 4}})).matches(&doc));
        assert!(!parse(json!({"missing": {"$gt": 4}})).matches(&doc));
    }

    #[test]
    fn sets_existence_and_combinators() {
        let doc = json!({"n": 5, "t": "x"});
        assert!(parse(json!({"n": {"$in": [1, 5]}})).matches(&doc));
        assert!(!parse(json!({"n": {"$nin": [1, 5]}})).matches(&doc));
        assert!(parse(json!({"missing": {"$nin": [1, 5]}})).matches(&doc));
        assert!(parse(json!({"t": {"$exists": true}, "u": {"$exists": false}})).matches(&doc));
        assert!(parse(json!({"$or": [{"n": 1}, {"t": "x"}]})).matches(&doc));
        assert!(!parse(json!({"$and": [{"n": 5}, {"t": "y"}]})).matches(&doc));
        assert!(parse(json!({"$not": {"n": 6}})).matches(&doc));
        assert!(parse(json!({"n": {"$not": {"$gt": 6}}})).matches(&doc));
        assert!(!parse(json!({"n": {"$not": 5}})).matches(&doc));
        assert!(parse(json!({"$and": []})).matches(&doc));
        assert!(!parse(json!({"$or": []})).matches(&doc));
    }

    #[test]
    fn bad_filters_are_refused_with_their_reason() {
        assert_eq!(err(json!([1])), QueryError::NotAnObject);
        assert!(matches!(
            err(json!({"$where": "x"})),
            QueryError::UnknownOperator(_)
        ));
        assert!(matches!(
            err(json!({"a": {"$regex": "x"}})),
            QueryError::UnknownOperator(_)
        ));
        assert!(matches!(
            err(json!({"$gt": 1})),
            QueryError::MisplacedOperator(_)
        ));
        assert!(matches!(
            err(json!({"a": {"$or": []}})),
            QueryError::MisplacedOperator(_)
        ));
        assert_eq!(
            err(json!({"a": {"$gt": 1, "b": 2}})),
            QueryError::MixedOperatorsAndFields
        );
        assert!(matches!(
            err(json!({"a": {"$in": 1}})),
            QueryError::BadOperand { .. }
        ));
        assert!(matches!(
            err(json!({"a": {"$exists": 1}})),
            QueryError::BadOperand { .. }
        ));
        assert!(matches!(
            err(json!({"$and": {}})),
            QueryError::BadOperand { .. }
        ));
        assert!(matches!(
            err(json!({"a..b": 1})),
            QueryError::BadPath { .. }
        ));
        assert!(matches!(err(json!({"": 1})), QueryError::BadPath { .. }));
        let mut deep = json!({"a": 1});
        for _ in 0..40 {
            deep = json!({ "$not": deep });
        }
        assert_eq!(err(deep), QueryError::TooDeep { max: 16 });
        let many: Vec<Value> = (0..300).map(|i| json!({ "a": i })).collect();
        assert_eq!(
            err(json!({ "$or": many })),
            QueryError::TooLarge { max: 256 }
        );
        let values: Vec<u32> = (0..2000).collect();
        assert!(matches!(
            err(json!({"a": {"$in": values}})),
            QueryError::TooManyValues { .. }
        ));
    }

    /// Several fields of one object are joined by an `$and`, and `$ne` is a `$not`: a query's
    /// limits count them, so a query at the limits has a JSON form within them too. A filter
    /// alone (a condition of a log record) keeps counting its text.
    #[test]
    fn a_query_within_the_limits_has_a_json_form_within_them() {
        let l = QueryLimits::default();
        let query = |filter: Value| Query::parse(&json!({ "filter": filter }), &l);
        let again = |q: &Query| Query::parse(&serde_json::to_value(q).unwrap(), &l);
        let fields = |n: usize| {
            let m: Map<String, Value> = (0..n).map(|i| (format!("f{i}"), json!(i))).collect();
            Value::Object(m)
        };
        // 255 fields and their `$and`: 256 nodes.
        let q = query(fields(255)).unwrap();
        assert_eq!(q.filter.extent(), (256, 1));
        assert_eq!(again(&q), Ok(q));
        assert_eq!(query(fields(256)), Err(QueryError::TooLarge { max: 256 }));
        assert!(
            Filter::parse(&fields(256), &l).is_ok(),
            "a condition's count changed"
        );
        // `$ne` nested in `$not`s and `$and`s of two fields: depth from the `$not` and `$and`
        // each implies.
        let nested = |levels: usize| {
            let mut f = json!({"a": {"$ne": 1}, "b": 2});
            for _ in 0..levels {
                f = json!({ "$not": f });
            }
            f
        };
        for levels in 0..20 {
            match query(nested(levels)) {
                Ok(q) => {
                    assert!(q.filter.extent().1 <= l.max_depth);
                    assert_eq!(again(&q), Ok(q));
                }
                Err(e) => assert_eq!(e, QueryError::TooDeep { max: 16 }, "{levels} levels"),
            }
        }
        assert!(query(nested(14)).is_ok());
        assert!(query(nested(15)).is_err());
        assert!(
            Filter::parse(&nested(15), &l).is_ok(),
            "a condition's count changed"
        );
    }

    #[test]
    fn queries_parse_with_defaults_and_refuse_unknown_fields() {
        let l = QueryLimits::default();
        let q = Query::parse(&json!({}), &l).unwrap();
        assert_eq!(q, Query::default());
        let q = Query::parse(
            &json!({"filter": {"a": 1}, "order": {"path": "b.c", "descending": true}, "limit": 5}),
            &l,
        )
        .unwrap();
        assert_eq!(q.limit, Some(5));
        assert_eq!(q.order.as_ref().unwrap().path, "b.c");
        let text = serde_json::to_string(&q).unwrap();
        assert_eq!(Query::parse_str(&text, &l).unwrap(), q);
        assert!(Query::parse(&json!({"filter": {}, "extra": 1}), &l).is_err());
        assert!(Query::parse(&json!({"limit": 0}), &l).is_err());
        assert!(Query::parse(&json!({"limit": -1}), &l).is_err());
        assert!(Query::parse(&json!({"order": {"path": ""}}), &l).is_err());
    }

    #[test]
    fn order_puts_missing_fields_first_ascending() {
        let o = Order {
            path: "x".into(),
            descending: false,
        };
        assert_eq!(o.compare(&json!({}), &json!({"x": null})), Ordering::Less);
        assert_eq!(
            o.compare(&json!({"x": 2}), &json!({"x": 10})),
            Ordering::Less
        );
        let d = Order {
            descending: true,
            ..o
        };
        assert_eq!(
            d.compare(&json!({"x": 2}), &json!({"x": 10})),
            Ordering::Greater
        );
    }

    #[test]
    fn order_indexes_arrays_and_puts_missing_before_null() {
        let o = Order {
            path: "items.1.qty".into(),
            descending: false,
        };
        let doc = |q: Value| json!({"items": [{"qty": 100}, {"qty": q}]});
        assert_eq!(o.compare(&doc(json!(2)), &doc(json!(10))), Ordering::Less);
        assert_eq!(
            o.compare(&json!({"items": [1]}), &doc(json!(null))),
            Ordering::Less
        );
        assert_eq!(
            o.compare(&doc(json!(null)), &doc(json!(false))),
            Ordering::Less
        );
        assert_eq!(o.field_path().lookup(&doc(json!("x"))), Some(&json!("x")));
        assert_eq!(o.compare_keys(None, Some(&Value::Null)), Ordering::Less);
        let d = Order {
            descending: true,
            ..o
        };
        assert_eq!(d.compare_keys(None, Some(&Value::Null)), Ordering::Greater);
        assert_eq!(d.compare_keys(None, None), Ordering::Equal);
    }

    #[test]
    fn numbers_compare_exactly_across_representations() {
        let big = json!(9_007_199_254_740_993_u64); // 2^53 + 1
        let big_float = json!(9_007_199_254_740_992.0_f64); // 2^53
        assert_eq!(compare_values(&big, &big_float), Ordering::Greater);
        assert_eq!(compare_values(&json!(1), &json!(1.0)), Ordering::Equal);
        assert_eq!(compare_values(&json!(-1), &json!(u64::MAX)), Ordering::Less);
        assert_eq!(compare_values(&json!(0.5), &json!(1)), Ordering::Less);
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-5i64..5).prop_map(|n| json!(n)),
            prop_oneof![Just(0.5f64), Just(-2.0), Just(3.0), Just(1e300)].prop_map(|f| json!(f)),
            Just(json!(u64::MAX)),
            "[a-c]{0,2}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::btree_map("[a-c]", inner, 0..3)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn arb_doc() -> impl Strategy<Value = Value> {
        prop::collection::btree_map("[a-c]", arb_value(), 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    fn arb_filter() -> impl Strategy<Value = Filter> {
        let path = prop_oneof![Just("a"), Just("b"), Just("c"), Just("a.b")]
            .prop_map(|p| FieldPath::parse(p, &QueryLimits::default()).unwrap());
        let op = prop_oneof![
            Just(CompareOp::Eq),
            Just(CompareOp::Gt),
            Just(CompareOp::Gte),
            Just(CompareOp::Lt),
            Just(CompareOp::Lte)
        ];
        let leaf = prop_oneof![
            (path.clone(), op, arb_value()).prop_map(|(path, op, value)| Filter::Compare {
                path,
                op,
                value
            }),
            (path.clone(), prop::collection::vec(arb_value(), 0..3))
                .prop_map(|(path, values)| Filter::In { path, values }),
            (path, any::<bool>()).prop_map(|(path, exists)| Filter::Exists { path, exists }),
        ];
        leaf.prop_recursive(3, 12, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Filter::And),
                prop::collection::vec(inner.clone(), 0..3).prop_map(Filter::Or),
                inner.prop_map(|f| Filter::Not(Box::new(f))),
            ]
        })
    }

    proptest! {
        #[test]
        fn not_is_the_complement(f in arb_filter(), doc in arb_doc()) {
            prop_assert_eq!(Filter::Not(Box::new(f.clone())).matches(&doc), !f.matches(&doc));
        }

        #[test]
        fn and_or_laws(f in arb_filter(), g in arb_filter(), doc in arb_doc()) {
            let and = Filter::And(vec![f.clone(), g.clone()]).matches(&doc);
            let or = Filter::Or(vec![f.clone(), g.clone()]).matches(&doc);
            prop_assert_eq!(and, f.matches(&doc) && g.matches(&doc));
            prop_assert_eq!(or, f.matches(&doc) || g.matches(&doc));
            // De Morgan.
            let not_and = Filter::Not(Box::new(Filter::And(vec![f.clone(), g.clone()])));
            let or_nots = Filter::Or(vec![Filter::Not(Box::new(f.clone())), Filter::Not(Box::new(g.clone()))]);
            prop_assert_eq!(not_and.matches(&doc), or_nots.matches(&doc));
            // Commutativity.
            prop_assert_eq!(and, Filter::And(vec![g.clone(), f.clone()]).matches(&doc));
            prop_assert_eq!(or, Filter::Or(vec![g, f]).matches(&doc));
        }

        #[test]
        fn json_form_round_trips(f in arb_filter(), doc in arb_doc()) {
            let back = Filter::parse(&f.to_json(), &QueryLimits { max_depth: 64, max_nodes: 4096, ..QueryLimits::default() }).unwrap();
            prop_assert_eq!(back.matches(&doc), f.matches(&doc));
            let text = serde_json::to_string(&f).unwrap();
            let again: Filter = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(again.matches(&doc), f.matches(&doc));
        }

        #[test]
        fn compare_values_is_a_total_order(a in arb_value(), b in arb_value(), c in arb_value()) {
            prop_assert_eq!(compare_values(&a, &a), Ordering::Equal);
            prop_assert_eq!(compare_values(&a, &b), compare_values(&b, &a).reverse());
            if compare_values(&a, &b) != Ordering::Greater && compare_values(&b, &c) != Ordering::Greater {
                prop_assert_ne!(compare_values(&a, &c), Ordering::Greater);
            }
            if compare_values(&a, &b) == Ordering::Equal {
                prop_assert_eq!(compare_values(&a, &c), compare_values(&b, &c));
            }
        }

        #[test]
        fn equality_filter_agrees_with_the_order(a in arb_value(), b in arb_value()) {
            let doc = json!({ "a": a });
            let f = Filter::Compare { path: FieldPath::parse("a", &QueryLimits::default()).unwrap(), op: CompareOp::Eq, value: b.clone() };
            prop_assert_eq!(f.matches(&doc), compare_values(&a, &b) == Ordering::Equal);
        }
    }
}
