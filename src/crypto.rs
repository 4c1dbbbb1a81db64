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

/// The cost of an argon2id hash: memory in KiB, passes, lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhcParams {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

/// What `hash-secret` uses: RFC 9106's second recommended option (64 MiB, 3 passes, 4 lanes),
/// for machines without the 2 GiB its first option takes; with a 16-byte salt and 32-byte tag.
pub const HASH_PARAMS: PhcParams = PhcParams {
    m_kib: 65_536,
    t: 3,
    p: 4,
};

/// OWASP's argon2id minimums: each (memory KiB, passes) pair costs an attacker about as much as
/// the others. A key is accepted if it reaches at least one of them.
pub const OWASP_MINIMUMS: [(u32, u32); 5] = [
    (47_104, 1),
    (19_456, 2),
    (12_288, 3),
    (9_216, 4),
    (7_168, 5),
];
/// The most a configured hash may ask per check: each check in flight holds `m` of memory, so
/// the string in the config must not be able to ask for any amount.
pub const PHC_MAX: PhcParams = PhcParams {
    m_kib: 262_144,
    t: 16,
    p: 16,
};
/// Tag lengths accepted, in bytes: shorter ones make a lucky guess likelier than the key's own
/// strength; the PHC format stores at most 64.
const PHC_TAG_BYTES: std::ops::RangeInclusive<usize> = 16..=64;

/// Whether a configured management key is meant as an argon2 PHC string (and so must pass
/// [`check_phc`]) rather than plain text.
pub fn is_phc(s: &str) -> bool {
    s.starts_with("$argon2")
}

/// The argon2id PHC string of `secret` with [`HASH_PARAMS`] (what `cliproxyapi hash-secret`
/// prints). CPU- and memory-heavy: call it off the async runtime.
pub fn hash_secret(secret: &str) -> Result<String, String> {
    hash_secret_with(secret, HASH_PARAMS)
}

/// The argon2id (version 19) PHC string of `secret` with the given cost and a random 16-byte
/// salt.
pub fn hash_secret_with(secret: &str, cost: PhcParams) -> Result<String, String> {
    use argon2::password_hash::PasswordHasher;
    let params =
        argon2::Params::new(cost.m_kib, cost.t, cost.p, Some(32)).map_err(|e| e.to_string())?;
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(secret.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Check `phc` against the policy: argon2id, version 19 written out, a salt and a tag of
/// 16 to 64 bytes, at least one of [`OWASP_MINIMUMS`], nothing above [`PHC_MAX`]. Returns
/// its cost.
pub fn check_phc(phc: &str) -> Result<PhcParams, String> {
    let hash = argon2::password_hash::phc::PasswordHash::new(phc)
        .map_err(|e| format!("not a valid argon2 PHC string ({e})"))?;
    let variant = hash.algorithm.as_str();
    if variant != "argon2id" {
        return Err(format!(
            "{variant} is not accepted, only argon2id (`cliproxyapi hash-secret` makes one)"
        ));
    }
    match hash.version {
        Some(19) => {}
        Some(v) => return Err(format!("argon2 version {v} is not accepted, only v=19")),
        None => return Err("the PHC string names no version; only v=19 is accepted".into()),
    }
    let param = |name: &'static str| {
        hash.params
            .get_decimal(name)
            .ok_or_else(|| format!("the PHC string gives no `{name}`; m, t and p are needed"))
    };
    let cost = PhcParams {
        m_kib: param("m")?,
        t: param("t")?,
        p: param("p")?,
    };
    let PhcParams { m_kib, t, p } = cost;
    if m_kib > PHC_MAX.m_kib || t > PHC_MAX.t || p > PHC_MAX.p {
        return Err(format!(
            "m={m_kib},t={t},p={p} is above the accepted maximum of m={},t={},p={}",
            PHC_MAX.m_kib, PHC_MAX.t, PHC_MAX.p
        ));
    }
    argon2::Params::try_from(&hash).map_err(|e| format!("invalid argon2 parameters ({e})"))?;
    if hash.salt.is_none() {
        return Err("the PHC string has no salt".into());
    }
    match &hash.hash {
        Some(tag) if PHC_TAG_BYTES.contains(&tag.len()) => {}
        Some(tag) => {
            return Err(format!(
                "a {}-byte hash is not accepted; 16 to 64 bytes",
                tag.len()
            ));
        }
        None => return Err("the PHC string has no hash".into()),
    }
    if !OWASP_MINIMUMS.iter().any(|&(m, tt)| m_kib >= m && t >= tt) {
        return Err(format!(
            "m={m_kib},t={t} is below OWASP's minimum for argon2id (m=19456,t=2, or m=47104,t=1, m=12288,t=3, m=9216,t=4, m=7168,t=5)"
        ));
    }
    Ok(cost)
}

/// Does `presented` match the PHC string? Uses the parameters inside the string, once it has
/// passed [`check_phc`]. CPU- and memory-heavy: call it off the async runtime.
pub fn verify_secret(phc: &str, presented: &str) -> bool {
    use argon2::password_hash::PasswordVerifier;
    if check_phc(phc).is_err() {
        return false;
    }
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
        assert!(phc.starts_with("$argon2id$v=19$m=65536,t=3,p=4$"), "{phc}");
        assert!(is_phc(&phc));
        assert_eq!(check_phc(&phc).unwrap(), HASH_PARAMS);
        let parsed = argon2::password_hash::phc::PasswordHash::new(&phc).unwrap();
        assert_eq!(parsed.salt.unwrap().as_ref().len(), 16);
        assert_eq!(parsed.hash.unwrap().len(), 32);
        assert!(verify_secret(&phc, "correct horse"));
        assert!(!verify_secret(&phc, "correct horsf"));
        assert!(!verify_secret(&phc, ""));
        assert!(check_phc("$argon2id$nonsense").is_err());
    }

    /// A PHC string with the given head, and a real salt and tag (made once).
    fn phc_of(head: &str) -> String {
        static REAL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let real = REAL.get_or_init(|| {
            let cost = PhcParams {
                m_kib: 7_168,
                t: 5,
                p: 1,
            };
            hash_secret_with("k", cost).unwrap()
        });
        let tail: Vec<&str> = real.rsplitn(3, '$').collect();
        format!("{head}${}${}", tail[1], tail[0])
    }

    #[test]
    fn phc_policy_refuses_weak_odd_and_huge_hashes() {
        let refused = [
            // Other variants and versions, whatever their cost.
            ("$argon2i$v=19$m=65536,t=3,p=4", "argon2i is not accepted"),
            ("$argon2d$v=19$m=65536,t=3,p=4", "argon2d is not accepted"),
            ("$argon2$v=19$m=65536,t=3,p=4", "argon2 is not accepted"),
            ("$argon2ix$v=19$m=65536,t=3,p=4", "not accepted"),
            ("$argon2id$v=16$m=65536,t=3,p=4", "version 16"),
            ("$argon2id$v=0$m=65536,t=3,p=4", "version 0"),
            (
                "$argon2id$v=4294967295$m=65536,t=3,p=4",
                "version 4294967295",
            ),
            ("$argon2id$m=65536,t=3,p=4", "no version"),
            // Below every OWASP pair.
            ("$argon2id$v=19$m=8,t=1,p=1", "below OWASP"),
            ("$argon2id$v=19$m=19455,t=2,p=1", "below OWASP"),
            ("$argon2id$v=19$m=47103,t=1,p=1", "below OWASP"),
            ("$argon2id$v=19$m=12287,t=3,p=1", "below OWASP"),
            ("$argon2id$v=19$m=9215,t=4,p=1", "below OWASP"),
            ("$argon2id$v=19$m=7167,t=16,p=1", "below OWASP"),
            (
                "$argon2id$v=19$m=262144,t=0,p=1",
                "invalid argon2 parameters",
            ),
            (
                "$argon2id$v=19$m=65536,t=3,p=0",
                "invalid argon2 parameters",
            ),
            // Above the ceiling that bounds memory and time.
            (
                "$argon2id$v=19$m=4294967295,t=3,p=4",
                "above the accepted maximum",
            ),
            (
                "$argon2id$v=19$m=262145,t=3,p=4",
                "above the accepted maximum",
            ),
            (
                "$argon2id$v=19$m=65536,t=17,p=4",
                "above the accepted maximum",
            ),
            (
                "$argon2id$v=19$m=65536,t=4294967295,p=4",
                "above the accepted maximum",
            ),
            (
                "$argon2id$v=19$m=65536,t=3,p=17",
                "above the accepted maximum",
            ),
            (
                "$argon2id$v=19$m=65536,t=3,p=16777215",
                "above the accepted maximum",
            ),
            ("$argon2id$v=19$t=3,p=4", "gives no `m`"),
            ("$argon2id$v=19$m=65536,p=4", "gives no `t`"),
            ("$argon2id$v=19$m=65536,t=3", "gives no `p`"),
        ];
        for (head, why) in refused {
            let phc = phc_of(head);
            let e = check_phc(&phc).unwrap_err();
            assert!(e.contains(why), "{phc}: {e}");
            assert!(!verify_secret(&phc, "k"), "{phc}");
        }
        // Malformed strings.
        for phc in [
            "$argon2id",
            "$argon2id$v=19$m=65536,t=3,p=4",
            "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ",
            "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA",
            "$argon2id$v=19$m=65536,t=3,p=4,x=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
            "$argon2id$v=19$m=-1,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
            "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA$x",
        ] {
            assert!(check_phc(phc).is_err(), "{phc}");
        }
        // A tag shorter than 16 bytes.
        let short = phc_of("$argon2id$v=19$m=7168,t=5,p=1");
        let (head, _) = short.rsplit_once('$').unwrap();
        let e = check_phc(&format!("{head}$aGFzaGhhc2hoYXNo")).unwrap_err();
        assert!(e.contains("12-byte hash"), "{e}");

        // Every OWASP pair and the ceiling itself are accepted, and verify.
        for (m, t, p) in [
            (47_104, 1, 1),
            (19_456, 2, 1),
            (12_288, 3, 1),
            (9_216, 4, 1),
            (7_168, 5, 1),
            (7_168, 16, 16),
            (65_536, 3, 4),
            (262_144, 1, 16),
        ] {
            let cost = PhcParams { m_kib: m, t, p };
            let phc = hash_secret_with("the key", cost).unwrap();
            assert_eq!(check_phc(&phc), Ok(cost), "{phc}");
            assert!(verify_secret(&phc, "the key"), "{phc}");
            assert!(!verify_secret(&phc, "the kez"), "{phc}");
        }
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
