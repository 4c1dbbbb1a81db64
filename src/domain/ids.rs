//! Typed ids for what crosses modules: a credential, a reservation (or lease) and a provider
//! name are all text, and a function taking two or three of them must not take them in the
//! wrong order. Each is a distinct type over the same text; none is a secret (ids are random,
//! names are config), so `Debug` and `Display` print them.
//!
//! An id is read as text only when asked (`as_str`, `AsRef<str>`): it does not deref to `str`,
//! since with a deref every function taking `&str` would take any of the three ids unasked, and
//! two of them in the wrong order. Text into an id is always spelled out too.
//!
//! ```compile_fail
//! fn provider_text(_: &str) {}
//! provider_text(&cliproxyapi::domain::CredentialId::new("cred_x"));
//! ```
//!
//! ```
//! fn provider_text(_: &str) {}
//! provider_text(cliproxyapi::domain::CredentialId::new("cred_x").as_str());
//! ```

use serde::{Deserialize, Serialize};
use std::borrow::Borrow;
use std::fmt;

macro_rules! text_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(text: impl Into<String>) -> Self {
                $name(text.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl From<String> for $name {
            fn from(text: String) -> Self {
                $name(text)
            }
        }

        impl From<&str> for $name {
            fn from(text: &str) -> Self {
                $name(text.to_string())
            }
        }

        /// Maps keyed by the id are looked up by its text.
        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

text_id!(
    /// A credential's id: `cred_` and 20 random letters and digits.
    CredentialId
);
text_id!(
    /// A reservation's id, which is also a lease's id.
    ReservationId
);
text_id!(
    /// A provider's name as config and the registry know it (`claude`, `openai`, …).
    ProviderName
);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn ids_print_and_serialize_as_their_text_and_look_up_by_it() {
        let id = CredentialId::new("cred_abc");
        assert_eq!(id.to_string(), "cred_abc");
        assert_eq!(format!("{id:?}"), "\"cred_abc\"");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"cred_abc\"");
        let back: CredentialId = serde_json::from_str("\"cred_abc\"").unwrap();
        assert_eq!(back, id);
        let map: HashMap<CredentialId, u8> = [(id.clone(), 1)].into();
        assert_eq!(map.get("cred_abc"), Some(&1));
        assert!(id == "cred_abc");
    }
}
