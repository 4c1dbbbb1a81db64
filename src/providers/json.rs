//! Reading and changing clients' JSON bodies without building them.
//!
//! A body of tens of MiB parsed into a `serde_json::Value` takes tens of times its size (every
//! element a tagged value in a map that keeps its order): one 31 MiB array of zeros took the
//! server past 1.2 GB. So the request path never builds one from a client's body. It reads the
//! few fields it needs, each only if it has the expected kind, skipping everything else as it
//! is parsed ([`Pick`]); and when a body must change, it notes only where the values of the
//! one member to change are, and splices the new value there, keeping every other byte
//! ([`set_member`]): about the body's own size, whatever is inside (even a million tiny
//! members).

use serde::Deserialize;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
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

/// Matches an object key against the one wanted, without keeping it.
struct KeyIs<'k>(&'k str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        struct Visit<'k>(&'k str);
        impl<'de> Visitor<'de> for Visit<'_> {
            type Value = bool;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<bool, E> {
                Ok(v == self.0)
            }
        }
        d.deserialize_str(Visit(self.0))
    }
}

/// The values of one member of an object (every occurrence, as raw text borrowed from the
/// body), and how many members the object has; nothing else of it is kept.
struct FindMember<'k>(&'k str);

/// What [`FindMember`] found.
struct Found<'de> {
    values: Vec<&'de RawValue>,
    members: usize,
}

impl<'de> DeserializeSeed<'de> for FindMember<'_> {
    type Value = Found<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Found<'de>, D::Error> {
        struct Visit<'k>(&'k str);
        impl<'de> Visitor<'de> for Visit<'_> {
            type Value = Found<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found<'de>, A::Error> {
                let mut found = Found {
                    values: Vec::new(),
                    members: 0,
                };
                while let Some(wanted) = map.next_key_seed(KeyIs(self.0))? {
                    found.members += 1;
                    if wanted {
                        found.values.push(map.next_value::<&'de RawValue>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(found)
            }
        }
        d.deserialize_map(Visit(self.0))
    }
}

/// Find member `key` of the JSON object `body`. `Err(None)` when `body` is JSON but not an
/// object; `Err(Some(e))` when it is not JSON.
fn find<'a>(body: &'a [u8], key: &str) -> Result<Found<'a>, Option<serde_json::Error>> {
    if !is_object(body) {
        return Err(not_an_object(body));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let found = FindMember(key).deserialize(&mut de).map_err(Some)?;
    de.end().map_err(Some)?;
    Ok(found)
}

/// The raw value of member `key` of the JSON object `body` (its last occurrence, as readers
/// take it), if it has one.
pub fn member<'a>(
    body: &'a [u8],
    key: &str,
) -> Result<Option<&'a RawValue>, Option<serde_json::Error>> {
    find(body, key).map(|f| f.values.last().copied())
}

/// The JSON object `body` with member `key` set to `value` (JSON text): every occurrence of
/// the key gets it (so a reader that takes the first and one that takes the last agree), or
/// it is added at the end. The rest of the body is kept byte for byte: only the spans of the
/// key's values are noted while it is parsed, so this takes about the body's size whatever it
/// holds. `Err` as [`member`].
pub fn set_member(
    body: &[u8],
    key: &str,
    value: &str,
) -> Result<Vec<u8>, Option<serde_json::Error>> {
    let found = find(body, key)?;
    let mut out = Vec::with_capacity(body.len() + key.len() + value.len() + 8);
    if found.values.is_empty() {
        // Valid JSON, an object: its last byte that is not whitespace is its `}`.
        let end = body.trim_ascii_end().len() - 1;
        out.extend_from_slice(&body[..end]);
        if found.members > 0 {
            out.push(b',');
        }
        out.extend_from_slice(
            serde_json::to_string(key)
                .expect("a string serializes")
                .as_bytes(),
        );
        out.push(b':');
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(&body[end..]);
        return Ok(out);
    }
    let base = body.as_ptr() as usize;
    let mut copied = 0;
    for raw in &found.values {
        // Each value is a slice of `body` itself (borrowed, not copied).
        let start = raw.get().as_ptr() as usize - base;
        out.extend_from_slice(&body[copied..start]);
        out.extend_from_slice(value.as_bytes());
        copied = start + raw.get().len();
    }
    out.extend_from_slice(&body[copied..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_set_in_place_keeping_every_other_byte() {
        let set = |body: &str, key: &str, value: &str| {
            String::from_utf8(set_member(body.as_bytes(), key, value).unwrap()).unwrap()
        };
        let body = r#" {"model": "a/b", "messages": [{"x": [1, 2.50, "\ud83d\ude00"]}], "n": 1e3, "model" :"c"} "#;
        assert_eq!(
            set(body, "model", r#""b""#),
            r#" {"model": "b", "messages": [{"x": [1, 2.50, "\ud83d\ude00"]}], "n": 1e3, "model" :"b"} "#
        );
        assert_eq!(
            set(body, "stream_options", r#"{"include_usage":true}"#),
            r#" {"model": "a/b", "messages": [{"x": [1, 2.50, "\ud83d\ude00"]}], "n": 1e3, "model" :"c","stream_options":{"include_usage":true}} "#
        );
        // Nested keys of the same name are not members of the top level.
        assert_eq!(
            set(r#"{"a": {"model": 1}}"#, "model", "2"),
            r#"{"a": {"model": 1},"model":2}"#
        );
        assert_eq!(set("{}", "k", "true"), r#"{"k":true}"#);
        assert_eq!(
            set(" { } \n", "k", "1"),
            r#" { "k":1} 
"#
        );
        // A key written with escapes is the same key.
        assert_eq!(
            set(r#"{"mod\u0065l": 1}"#, "model", "2"),
            r#"{"mod\u0065l": 2}"#
        );
        // Keys with characters JSON escapes are added escaped.
        assert_eq!(set("{}", "a\"b\n", "1"), r#"{"a\"b\n":1}"#);
        assert_eq!(
            member(br#"{"s": 1, "s": {"x": 2}}"#, "s")
                .unwrap()
                .map(|r| r.get()),
            Some(r#"{"x": 2}"#)
        );
        assert!(member(br#"{"s": 1}"#, "t").unwrap().is_none());
        for (body, json) in [
            (&b"[1]"[..], true),
            (b"\"x\"", true),
            (b"null", true),
            (b"{\"a\": ", false),
            (b"", false),
            (b"{} {}", false),
            (b"[1", false),
        ] {
            match set_member(body, "k", "1") {
                Err(None) => assert!(json, "{body:?}"),
                Err(Some(_)) => assert!(!json, "{body:?}"),
                Ok(_) => panic!("{body:?} is not an object"),
            }
        }
        // Every result is JSON, whatever the body held.
        for body in [r#"{"a":1,"a":2}"#, r#"{"x":[{"y":"}"}]}"#, "{\"k\":null}"] {
            let out = set_member(body.as_bytes(), "k", "[1]").unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["k"], serde_json::json!([1]), "{body}");
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
