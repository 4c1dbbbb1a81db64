//! Secrets: the redacting [`Secret`] wrapper, the seal/open seam every stored secret passes
//! through, keyed fingerprints for de-duplication, and token previews.
//!
//! Sealing is the only way a secret reaches the database. Today the sealed form is the plain
//! bytes behind a version byte; AES-256-GCM-SIV slots in behind the same two functions, with the
//! credential id and field name as associated data, so callers already pass both.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use subtle::ConstantTimeEq;

/// A secret string. `Debug` and `Display` print nothing of it, so it cannot leak through a log
/// line, an error message or a panic; the value is reached only through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
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

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Which secret field of a credential a sealed value belongs to. Part of the associated data,
/// so a value sealed for one field cannot be opened as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Token,
    RefreshToken,
    ClientSecret,
    /// The key behind [`Fingerprinter`], stored in the `meta` table.
    FingerprintKey,
}

impl Field {
    pub fn as_str(self) -> &'static str {
        match self {
            Field::Token => "token",
            Field::RefreshToken => "refresh_token",
            Field::ClientSecret => "client_secret",
            Field::FingerprintKey => "fingerprint_key",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the stored {field} of {owner} cannot be opened: {reason}")]
    Open {
        owner: String,
        field: &'static str,
        reason: &'static str,
    },
}

/// Version byte of a value stored in clear (encryption off).
const PLAIN_V0: u8 = 0;

/// The seal/open seam. Cheap to clone; shared by the store.
#[derive(Clone, Default)]
pub struct Sealer {
    _private: (),
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealer(plain)")
    }
}

impl Sealer {
    /// A sealer that stores values in clear behind a version byte (encryption off).
    pub fn plain() -> Self {
        Sealer { _private: () }
    }

    /// Seal `secret` as field `field` of the row `owner` (a credential id, or `meta`).
    pub fn seal(&self, _owner: &str, _field: Field, secret: &Secret) -> Vec<u8> {
        let mut out = Vec::with_capacity(secret.0.len() + 1);
        out.push(PLAIN_V0);
        out.extend_from_slice(secret.0.as_bytes());
        out
    }

    /// Open what [`Sealer::seal`] produced for the same owner and field.
    pub fn open(&self, owner: &str, field: Field, sealed: &[u8]) -> Result<Secret, CryptoError> {
        let err = |reason| CryptoError::Open {
            owner: owner.to_string(),
            field: field.as_str(),
            reason,
        };
        match sealed.split_first() {
            Some((&PLAIN_V0, rest)) => String::from_utf8(rest.to_vec())
                .map(Secret)
                .map_err(|_| err("the stored value is not UTF-8")),
            Some(_) => Err(err(
                "the value is encrypted, but encryption is not configured",
            )),
            None => Err(err("the stored value is empty")),
        }
    }
}

/// Keyed fingerprints of provider + token, used to find the same credential again without
/// keeping or comparing the token in clear. The key is random per database (see the store).
#[derive(Clone)]
pub struct Fingerprinter {
    key: [u8; 32],
}

impl fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprinter(***)")
    }
}

impl Fingerprinter {
    pub fn new(key: [u8; 32]) -> Self {
        Fingerprinter { key }
    }

    /// A fresh random key for a new database.
    pub fn random_key() -> [u8; 32] {
        rand::random()
    }

    fn mac(&self, parts: &[&[u8]]) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key size");
        for part in parts {
            // Length-prefix every part so ("ab","c") and ("a","bc") differ.
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().to_vec()
    }

    /// The identity of a credential: its provider and its identifying secret.
    pub fn credential(&self, provider: &str, secret: &Secret) -> Vec<u8> {
        self.mac(&[
            b"credential",
            provider.as_bytes(),
            secret.expose().as_bytes(),
        ])
    }

    /// A digest of an import entry's whole content (which includes secrets), to tell whether an
    /// entry changed since it was last imported.
    pub fn content(&self, canonical: &[u8]) -> Vec<u8> {
        self.mac(&[b"content", canonical])
    }
}

/// What the API shows of a token: a few characters from each end, never more than a quarter of
/// the token from either side, so a short token is not all but given away.
pub fn token_preview(token: &str) -> String {
    let chars: Vec<char> = token.chars().collect();
    let n = chars.len();
    let head = (n / 4).min(6);
    let tail = (n / 4).min(4);
    let head: String = chars[..head].iter().collect();
    let tail: String = chars[n - tail..].iter().collect();
    format!("{head}…{tail}")
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
    fn preview_shows_little() {
        assert_eq!(
            token_preview("sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789wxyz"),
            "sk-ant…wxyz"
        );
        assert_eq!(token_preview("sk-ant-key1"), "sk…y1");
        assert_eq!(token_preview("abc"), "…");
        assert_eq!(token_preview(""), "…");
    }

    #[test]
    fn plain_roundtrip_and_garbage() {
        let s = Sealer::plain();
        let sealed = s.seal("cred_1", Field::Token, &Secret::new("tok"));
        assert_eq!(
            s.open("cred_1", Field::Token, &sealed).unwrap().expose(),
            "tok"
        );
        assert!(s.open("cred_1", Field::Token, &[]).is_err());
        assert!(s.open("cred_1", Field::Token, &[7, 1, 2]).is_err());
    }

    #[test]
    fn fingerprints_are_keyed_and_separated() {
        let a = Fingerprinter::new([1; 32]);
        let b = Fingerprinter::new([2; 32]);
        let t = Secret::new("tok");
        assert_ne!(a.credential("claude", &t), b.credential("claude", &t));
        assert_ne!(a.credential("claude", &t), a.credential("openai", &t));
        assert_eq!(a.credential("claude", &t), a.credential("claude", &t));
    }
}
