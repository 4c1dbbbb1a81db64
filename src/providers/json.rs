//! Reading and changing clients' JSON bodies without building them.
//!
//! A body of tens of MiB parsed into a `serde_json::Value` takes tens of times its size (every
//! element a tagged value in a map that keeps its order): one 31 MiB array of zeros took the
//! server past 1.2 GB. So the request path never builds one from a client's body. It reads the
//! few fields it needs, each only if it has the expected kind, skipping everything else as it
//! is parsed ([`Pick`]); and when a body must change, it splits only the top-level object into
//! its members, each kept as its raw text, replaces one, and joins them again ([`Members`]):
//! about the body's own size, whatever is inside.

use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;
use std::marker::PhantomData;

/// A JSON number as a token count is read from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Quantity {
    /// A whole number that is not negative (`100`, `100.0`, `1e3`).
    Whole(u64),
    /// Anything else: negative, fractional, or past `u64`.
    Other(f64),
}

impl Quantity {
    fn float(f: f64) -> Quantity {
        if f.is_finite() && f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(&f) {
            Quantity::Whole(f as u64)
        } else {
            Quantity::Other(f)
        }
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quantity::Whole(n) => write!(f, "{n}"),
            Quantity::Other(x) => write!(f, "{x}"),
        }
    }
}

/// A value the request path reads only when it has one kind; any other value is skipped as
/// it is parsed, never built.
pub trait Pick: Sized {
    fn string(_: &str) -> Option<Self> {
        None
    }
    fn boolean(_: bool) -> Option<Self> {
        None
    }
    fn number(_: Quantity) -> Option<Self> {
        None
    }
    /// An object: read what is wanted of it, skip the rest.
    fn object<'de, A: MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

impl Pick for String {
    fn string(s: &str) -> Option<Self> {
        Some(s.to_string())
    }
}

impl Pick for bool {
    fn boolean(b: bool) -> Option<Self> {
        Some(b)
    }
}

impl Pick for Quantity {
    fn number(n: Quantity) -> Option<Self> {
        Some(n)
    }
}

/// `Some` when the value had the kind `T` reads.
#[derive(Debug, Default)]
pub struct Picked<T>(pub Option<T>);

impl<'de, T: Pick> Deserialize<'de> for Picked<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<T>(PhantomData<T>);
        impl<'de, T: Pick> Visitor<'de> for Visit<T> {
            type Value = Picked<T>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Picked(T::string(v)))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Picked(T::boolean(v)))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Picked(T::number(Quantity::Whole(v))))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                let n = u64::try_from(v).map_or(Quantity::Other(v as f64), Quantity::Whole);
                Ok(Picked(T::number(n)))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Picked(T::number(Quantity::float(v))))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(Picked(None))
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(Picked(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Picked(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::object(map).map(Picked)
            }
        }
        d.deserialize_any(Visit(PhantomData))
    }
}

/// Whether a body is a JSON object, from its first byte.
pub fn is_object(body: &[u8]) -> bool {
    body.trim_ascii_start().first() == Some(&b'{')
}

/// Why a body that should be a JSON object is not: `None` when it is JSON of another kind
/// (checked without building it), `Some` with the parser's error when it is not JSON.
pub fn not_an_object(body: &[u8]) -> Option<serde_json::Error> {
    serde_json::from_slice::<IgnoredAny>(body).err()
}

/// A top-level JSON object as its members in order, each value kept as its raw text. A key
/// given twice stays twice (readers take the last), except where [`Members::set`] replaced it.
#[derive(Debug)]
pub struct Members(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = Members;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Box<RawValue>>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(Visit)
    }
}

impl Members {
    /// The members of `body`. `Err(None)` when it is JSON but not an object; `Err(Some(e))`
    /// when it is not JSON.
    pub fn parse(body: &[u8]) -> Result<Members, Option<serde_json::Error>> {
        if !is_object(body) {
            return Err(not_an_object(body));
        }
        serde_json::from_slice(body).map_err(Some)
    }

    /// The raw value of `key` (its last occurrence).
    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| &**v)
    }

    /// Set `key` to `value`: in the place of its last occurrence (earlier ones are dropped, so
    /// every reader sees the new value), or at the end.
    pub fn set(&mut self, key: &str, value: Box<RawValue>) {
        match self.0.iter().rposition(|(k, _)| k == key) {
            Some(last) => {
                self.0[last].1 = value;
                let mut i = 0;
                self.0.retain(|(k, _)| {
                    let keep = k != key || i == last;
                    i += 1;
                    keep
                });
            }
            None => self.0.push((key.to_string(), value)),
        }
    }

    /// The object as JSON text.
    pub fn to_json(&self) -> String {
        let size = self
            .0
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>();
        let mut out = String::with_capacity(size + 2);
        out.push('{');
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(k).expect("a string serializes"));
            out.push(':');
            out.push_str(v.get());
        }
        out.push('}');
        out
    }
}

/// `value` as raw JSON text.
pub fn raw(value: &impl serde::Serialize) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("a plain value serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_keep_raw_values_and_replace_in_place() {
        let body = br#" {"model": "a/b", "messages": [{"x": [1, 2.50, "\ud83d\ude00"]}], "n": 1e3, "model": "c"} "#;
        let mut m = Members::parse(body).unwrap();
        assert_eq!(m.get("model").unwrap().get(), "\"c\"");
        assert_eq!(m.get("n").unwrap().get(), "1e3");
        m.set("model", raw(&"b"));
        assert_eq!(
            m.to_json(),
            r#"{"messages":[{"x": [1, 2.50, "\ud83d\ude00"]}],"n":1e3,"model":"b"}"#
        );
        m.set(
            "stream_options",
            raw(&serde_json::json!({"include_usage": true})),
        );
        let v: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["messages"][0]["x"][1], 2.5);
        // Keys with characters JSON escapes come back escaped.
        let m = Members::parse(br#"{"a\"b\n": 1}"#).unwrap();
        assert_eq!(m.to_json(), r#"{"a\"b\n":1}"#);
        for (body, json) in [
            (&b"[1]"[..], true),
            (b"\"x\"", true),
            (b"null", true),
            (b"{\"a\": ", false),
            (b"", false),
            (b"{} {}", false),
            (b"[1", false),
        ] {
            match Members::parse(body) {
                Err(None) => assert!(json, "{body:?}"),
                Err(Some(_)) => assert!(!json, "{body:?}"),
                Ok(_) => panic!("{body:?} is not an object"),
            }
        }
    }

    #[test]
    fn picks_read_one_kind_and_skip_the_rest() {
        let s = |t: &str| serde_json::from_str::<Picked<String>>(t).unwrap().0;
        assert_eq!(s("\"m\""), Some("m".into()));
        for other in ["5", "true", "null", "[\"m\"]", "{\"m\": 1}"] {
            assert_eq!(s(other), None, "{other}");
        }
        let n = |t: &str| serde_json::from_str::<Picked<Quantity>>(t).unwrap().0;
        assert_eq!(n("7"), Some(Quantity::Whole(7)));
        assert_eq!(n("7.0"), Some(Quantity::Whole(7)));
        assert_eq!(n("1e3"), Some(Quantity::Whole(1000)));
        assert_eq!(n("18446744073709551615"), Some(Quantity::Whole(u64::MAX)));
        assert_eq!(n("-1"), Some(Quantity::Other(-1.0)));
        assert_eq!(n("0.5"), Some(Quantity::Other(0.5)));
        assert_eq!(n("1e300"), Some(Quantity::Other(1e300)));
        assert_eq!(n("\"7\""), None);
        let b = |t: &str| serde_json::from_str::<Picked<bool>>(t).unwrap().0;
        assert_eq!(b("true"), Some(true));
        assert_eq!(b("1"), None);
    }
}
