//! Keyed fingerprints, to find the same credential again without keeping its token in clear.

use super::{Secret, to_hex};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Keyed fingerprints of provider + token, used to find the same credential again without
/// keeping or comparing the token in clear. The key is random per database and replaced by
/// `rotate-key` (see the store).
/// Clones share one key, which is wiped when the last of them is dropped.
#[derive(Clone)]
pub struct Fingerprinter {
    key: Arc<Zeroizing<[u8; 32]>>,
}

impl fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprinter(***)")
    }
}

impl Fingerprinter {
    pub fn new(key: Zeroizing<[u8; 32]>) -> Self {
        Fingerprinter { key: Arc::new(key) }
    }

    /// A fresh random key.
    pub fn random_key() -> Zeroizing<[u8; 32]> {
        Zeroizing::new(rand::random())
    }

    /// The key as stored (sealed): 64 hex digits.
    pub fn key_text(&self) -> Secret {
        Secret::new(to_hex(self.key.as_slice()))
    }

    /// The key from its stored text, if it is 64 hex digits.
    pub fn from_text(text: &Secret) -> Option<Self> {
        let hex = text.expose().as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let mut key = Zeroizing::new([0u8; 32]);
        for (out, pair) in key.iter_mut().zip(hex.chunks(2)) {
            *out = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(Fingerprinter::new(key))
    }

    fn mac(&self, parts: &[&[u8]]) -> Vec<u8> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(self.key.as_slice()).expect("HMAC takes any key size");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_keyed_and_separated() {
        let a = Fingerprinter::new(Zeroizing::new([1; 32]));
        let b = Fingerprinter::new(Zeroizing::new([2; 32]));
        let t = Secret::new("tok");
        assert_ne!(a.credential("claude", &t), b.credential("claude", &t));
        assert_ne!(a.credential("claude", &t), a.credential("openai", &t));
        assert_eq!(a.credential("claude", &t), a.credential("claude", &t));
        let again = Fingerprinter::from_text(&a.key_text()).unwrap();
        assert_eq!(again.credential("claude", &t), a.credential("claude", &t));
        for bad in ["", "00", &"g".repeat(64), &"0".repeat(63), &"é".repeat(32)] {
            assert!(
                Fingerprinter::from_text(&Secret::new(bad)).is_none(),
                "{bad}"
            );
        }
    }
}
