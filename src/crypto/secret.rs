//! The redacting [`Secret`] wrapper every token, key and opened secret lives in.

use std::fmt;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// A secret string. `Debug` and `Display` print nothing of it, so it cannot leak through a log
/// line, an error message or a panic; the value is reached only through [`Secret::expose`].
/// It is not `Clone`, so every copy in memory is one somebody made on purpose (shared through
/// an `Arc` where several owners need it), and its bytes are wiped when it is dropped.
/// The default is empty (an unset key in the config).
#[derive(Default, PartialEq, Eq)]
pub struct Secret(pub(super) Zeroizing<String>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Zeroizing::new(value.into()))
    }

    /// Take the secret out, leaving an empty one (a setting no longer needed after start).
    pub fn take(&mut self) -> Secret {
        std::mem::take(self)
    }

    /// The secret in clear. Every caller is a place where the token legitimately leaves us
    /// (sealing, hashing, an upstream request header).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Constant-time comparison, for checking keys presented by clients.
    pub fn ct_eq(&self, other: &str) -> bool {
        self.0.as_bytes().ct_eq(other.as_bytes()).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A secret is text, taken exactly as written. Anything else (a number, a boolean, a list) is
/// refused rather than converted, since a conversion changes the secret (`000123` would become
/// `123`), and the refusal never repeats the value, as serde's own "invalid type" message does.
impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl Text {
            fn refuse<E: serde::de::Error>(what: &str) -> Result<Secret, E> {
                Err(E::custom(format!(
                    "expected text, found {what} (the value is not shown; quote it)"
                )))
            }
        }
        impl<'de> serde::de::Visitor<'de> for Text {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("text")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Secret, E> {
                Self::refuse("a boolean")
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Secret, E> {
                Self::refuse("a number")
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Secret, E> {
                Self::refuse("a number")
            }
            fn visit_i128<E: serde::de::Error>(self, _: i128) -> Result<Secret, E> {
                Self::refuse("a number")
            }
            fn visit_u128<E: serde::de::Error>(self, _: u128) -> Result<Secret, E> {
                Self::refuse("a number")
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Secret, E> {
                Self::refuse("a number")
            }
            fn visit_char<E: serde::de::Error>(self, v: char) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }
            fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<Secret, E> {
                Self::refuse("bytes")
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Secret, E> {
                Self::refuse("nothing")
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Secret, E> {
                Self::refuse("nothing")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
                Self::refuse("a list")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
                Self::refuse("a map")
            }
        }
        d.deserialize_any(Text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("sk-ant-supersecret");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{s}"), "***");
        assert!(!format!("{:?}", Some(&s)).contains("super"));
    }

    #[test]
    fn a_taken_secret_leaves_an_empty_one() {
        let mut s = Secret::new("hunter2hunter2");
        let taken = s.take();
        assert!(s.is_empty());
        assert_eq!(taken.expose(), "hunter2hunter2");
    }

    #[test]
    fn secrets_deserialize_only_from_text() {
        let ok: Secret = serde_json::from_str(r#""000123""#).unwrap();
        assert_eq!(ok.expose(), "000123");
        for (json, what) in [
            ("123456789", "number"),
            ("-5", "number"),
            ("1.5e300", "number"),
            ("true", "boolean"),
            ("null", "nothing"),
            (r#"["sk-in-a-list"]"#, "list"),
            (r#"{"k": "sk-in-a-map"}"#, "map"),
        ] {
            let e = serde_json::from_str::<Secret>(json)
                .unwrap_err()
                .to_string();
            assert!(e.contains(what), "{json}: {e}");
            for shown in ["123456789", "1.5", "sk-in", "true"] {
                assert!(!e.contains(shown), "{json}: {e}");
            }
        }
    }
}
