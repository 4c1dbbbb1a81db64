//! Secrets: the redacting [`Secret`] wrapper, the seal/open seam every stored secret passes
//! through, keyed fingerprints for de-duplication, and token previews.
//!
//! Sealing is the only way a secret reaches the database. With encryption off the sealed form
//! is the plain bytes behind a version byte; with it on, AES-256-GCM-SIV with a random 96-bit
//! nonce per write, the row and field (and key id) as associated data, and the key id in the
//! stored value, as Vault's barrier does.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use subtle::ConstantTimeEq;

/// A secret string. `Debug` and `Display` print nothing of it, so it cannot leak through a log
/// line, an error message or a panic; the value is reached only through [`Secret::expose`].
/// The default is empty (an unset key in the config).
#[derive(Clone, Default, PartialEq, Eq)]
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
/// Version byte of an AES-256-GCM-SIV value: `1 | key_id (u32 BE) | nonce (12) | ct‖tag`.
const SEALED_V1: u8 = 1;
const NONCE_LEN: usize = 12;
const HEADER_LEN: usize = 1 + 4 + NONCE_LEN;

/// A 256-bit encryption key and its id. The id is derived from the key (the first four bytes
/// of a hash of it), so a stored value tells which key sealed it without revealing the key.
#[derive(Clone)]
pub struct EncryptionKey {
    key: [u8; 32],
    id: u32,
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncryptionKey(id {:08x})", self.id)
    }
}

impl EncryptionKey {
    pub fn new(key: [u8; 32]) -> Self {
        use sha2::Digest;
        let digest = Sha256::new()
            .chain_update(b"cliproxyapi key id\0")
            .chain_update(key)
            .finalize();
        let id = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        EncryptionKey { key, id }
    }

    /// Parse the base64 text of 32 bytes (what `cliproxyapi gen-key` prints).
    pub fn from_base64(text: &str) -> Result<Self, String> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| "is not base64 (make one with `cliproxyapi gen-key`)".to_string())?;
        let key: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            format!(
                "is {} bytes; it must be 32 (make one with `cliproxyapi gen-key`)",
                b.len()
            )
        })?;
        Ok(Self::new(key))
    }

    /// A fresh random key, as base64.
    pub fn generate_base64() -> String {
        use base64::Engine;
        let key: [u8; 32] = rand::random();
        base64::engine::general_purpose::STANDARD.encode(key)
    }

    pub fn id(&self) -> u32 {
        self.id
    }
}

#[derive(Clone)]
enum Mode {
    Plain,
    Encrypted {
        cipher: Box<aes_gcm_siv::Aes256GcmSiv>,
        key_id: u32,
    },
}

/// The seal/open seam. Cheap to clone; shared by the store.
#[derive(Clone)]
pub struct Sealer {
    mode: Mode,
}

impl Default for Sealer {
    fn default() -> Self {
        Sealer::plain()
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.mode {
            Mode::Plain => f.write_str("Sealer(plain)"),
            Mode::Encrypted { key_id, .. } => {
                write!(f, "Sealer(aes-256-gcm-siv, key {key_id:08x})")
            }
        }
    }
}

/// The associated data of a sealed value: where it lives and under which key, so a value
/// copied to another row or field, or presented as another key's, does not open.
fn aad(owner: &str, field: Field, key_id: u32) -> Vec<u8> {
    format!("cliproxyapi/v1/{owner}/{}/{key_id:08x}", field.as_str()).into_bytes()
}

impl Sealer {
    /// A sealer that stores values in clear behind a version byte (encryption off).
    pub fn plain() -> Self {
        Sealer { mode: Mode::Plain }
    }

    /// A sealer that encrypts with AES-256-GCM-SIV under `key`.
    pub fn encrypted(key: &EncryptionKey) -> Self {
        use aes_gcm_siv::KeyInit;
        let cipher = aes_gcm_siv::Aes256GcmSiv::new(&key.key.into());
        Sealer {
            mode: Mode::Encrypted {
                cipher: Box::new(cipher),
                key_id: key.id,
            },
        }
    }

    pub fn is_encrypted(&self) -> bool {
        matches!(self.mode, Mode::Encrypted { .. })
    }

    /// The id of the key values are sealed with; `None` when plain.
    pub fn key_id(&self) -> Option<u32> {
        match &self.mode {
            Mode::Plain => None,
            Mode::Encrypted { key_id, .. } => Some(*key_id),
        }
    }

    /// Whether `sealed` is already in this sealer's form (same mode, same key).
    pub fn is_current(&self, sealed: &[u8]) -> bool {
        match (&self.mode, sealed.first()) {
            (Mode::Plain, Some(&PLAIN_V0)) => true,
            (Mode::Encrypted { key_id, .. }, Some(&SEALED_V1)) => {
                sealed.len() >= HEADER_LEN && sealed[1..5] == key_id.to_be_bytes()
            }
            _ => false,
        }
    }

    /// Seal `secret` as field `field` of the row `owner` (a credential id, or `meta`).
    pub fn seal(&self, owner: &str, field: Field, secret: &Secret) -> Vec<u8> {
        match &self.mode {
            Mode::Plain => {
                let mut out = Vec::with_capacity(secret.0.len() + 1);
                out.push(PLAIN_V0);
                out.extend_from_slice(secret.0.as_bytes());
                out
            }
            Mode::Encrypted { cipher, key_id } => {
                use aes_gcm_siv::aead::{Aead, Payload};
                // A fresh random nonce per write; with GCM-SIV a repeat would only reveal
                // that the same plaintext was sealed twice.
                let nonce: [u8; NONCE_LEN] = rand::random();
                let aad = aad(owner, field, *key_id);
                let ct = cipher
                    .encrypt(
                        &nonce.into(),
                        Payload {
                            msg: secret.0.as_bytes(),
                            aad: &aad,
                        },
                    )
                    .expect("AES-GCM-SIV encryption of a short secret cannot fail");
                let mut out = Vec::with_capacity(HEADER_LEN + ct.len());
                out.push(SEALED_V1);
                out.extend_from_slice(&key_id.to_be_bytes());
                out.extend_from_slice(&nonce);
                out.extend_from_slice(&ct);
                out
            }
        }
    }

    /// Open what [`Sealer::seal`] produced for the same owner and field. Values stored in
    /// clear open under any sealer, so turning encryption on can read them to seal them.
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
            Some((&SEALED_V1, rest)) => {
                let Mode::Encrypted { cipher, key_id } = &self.mode else {
                    return Err(err(
                        "the value is encrypted, but encryption is not configured",
                    ));
                };
                if rest.len() < 4 + NONCE_LEN + 16 {
                    return Err(err("the stored value is truncated"));
                }
                let stored_id = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
                if stored_id != *key_id {
                    return Err(err(
                        "the value was sealed with another key than the configured one",
                    ));
                }
                use aes_gcm_siv::aead::{Aead, Payload};
                let nonce: [u8; NONCE_LEN] = rest[4..4 + NONCE_LEN].try_into().expect("12 bytes");
                let aad = aad(owner, field, *key_id);
                let plain = cipher
                    .decrypt(
                        &nonce.into(),
                        Payload {
                            msg: &rest[4 + NONCE_LEN..],
                            aad: &aad,
                        },
                    )
                    .map_err(|_| {
                        err("the value does not authenticate: it was altered, or moved from another credential or field")
                    })?;
                String::from_utf8(plain)
                    .map(Secret)
                    .map_err(|_| err("the stored value is not UTF-8"))
            }
            Some(_) => Err(err("the stored value has an unknown format")),
            None => Err(err("the stored value is empty")),
        }
    }
}

/// The key id a stored value names, if it is encrypted.
pub fn sealed_key_id(sealed: &[u8]) -> Option<u32> {
    (sealed.first() == Some(&SEALED_V1) && sealed.len() >= 5)
        .then(|| u32::from_be_bytes([sealed[1], sealed[2], sealed[3], sealed[4]]))
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

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// OWASP's minimum for argon2id: 19 MiB of memory, 2 passes, 1 lane.
const ARGON2_M_KIB: u32 = 19_456;
const ARGON2_T: u32 = 2;
const ARGON2_P: u32 = 1;

/// Whether a configured management key is already an argon2 PHC string.
pub fn is_phc(s: &str) -> bool {
    s.starts_with("$argon2")
}

/// The argon2id PHC string of `secret` (what `cliproxyapi hash-secret` prints). CPU-heavy:
/// call it off the async runtime.
pub fn hash_secret(secret: &str) -> Result<String, String> {
    use argon2::password_hash::PasswordHasher;
    let params =
        argon2::Params::new(ARGON2_M_KIB, ARGON2_T, ARGON2_P, None).map_err(|e| e.to_string())?;
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(secret.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Check that `phc` is a PHC string argon2 can verify against.
pub fn check_phc(phc: &str) -> Result<(), String> {
    argon2::password_hash::phc::PasswordHash::new(phc)
        .map(|_| ())
        .map_err(|e| format!("not a valid argon2 PHC string ({e})"))
}

/// Does `presented` match the PHC string? Uses the parameters inside the string. CPU-heavy:
/// call it off the async runtime.
pub fn verify_secret(phc: &str, presented: &str) -> bool {
    use argon2::password_hash::PasswordVerifier;
    argon2::Argon2::default()
        .verify_password(presented.as_bytes(), phc)
        .is_ok()
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
    fn encrypted_roundtrip_binding_and_keys() {
        let k1 = EncryptionKey::from_base64(&EncryptionKey::generate_base64()).unwrap();
        let k2 = EncryptionKey::from_base64(&EncryptionKey::generate_base64()).unwrap();
        assert_ne!(k1.id(), k2.id());
        let s1 = Sealer::encrypted(&k1);
        let secret = Secret::new("sk-ant-top-secret");
        let a = s1.seal("cred_a", Field::Token, &secret);
        let b = s1.seal("cred_a", Field::Token, &secret);
        assert_ne!(a, b, "fresh nonce per write");
        assert!(!a.windows(10).any(|w| w == b"top-secret"));
        assert_eq!(s1.open("cred_a", Field::Token, &a).unwrap(), secret);
        assert_eq!(sealed_key_id(&a), Some(k1.id()));
        assert!(s1.is_current(&a));
        // Moved to another row or field: does not open.
        assert!(s1.open("cred_b", Field::Token, &a).is_err());
        assert!(s1.open("cred_a", Field::RefreshToken, &a).is_err());
        // Another key, or no key: does not open, and says why.
        let e = Sealer::encrypted(&k2)
            .open("cred_a", Field::Token, &a)
            .unwrap_err();
        assert!(e.to_string().contains("another key"));
        assert!(Sealer::plain().open("cred_a", Field::Token, &a).is_err());
        // Tampering is detected.
        let mut t = a.clone();
        *t.last_mut().unwrap() ^= 1;
        assert!(s1.open("cred_a", Field::Token, &t).is_err());
        // Plain values still open (so turning encryption on can seal them).
        let p = Sealer::plain().seal("cred_a", Field::Token, &secret);
        assert_eq!(s1.open("cred_a", Field::Token, &p).unwrap(), secret);
        assert!(!s1.is_current(&p));
        assert!(format!("{s1:?} {k1:?}").contains(&format!("{:08x}", k1.id())));
        assert!(
            EncryptionKey::from_base64("c2hvcnQ=")
                .unwrap_err()
                .contains("32")
        );
        assert!(EncryptionKey::from_base64("!!").is_err());
    }

    #[test]
    fn argon2id_hash_and_verify() {
        let phc = hash_secret("correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(is_phc(&phc));
        check_phc(&phc).unwrap();
        assert!(verify_secret(&phc, "correct horse"));
        assert!(!verify_secret(&phc, "correct horsf"));
        assert!(check_phc("$argon2id$nonsense").is_err());
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
