//! Secrets: the redacting [`Secret`] wrapper, the seal/open seam every stored secret passes
//! through, keyed fingerprints for de-duplication, and token previews.
//!
//! Sealing is the only way a secret reaches the database. With encryption off the sealed form
//! is the plain bytes behind a version byte; with it on, AES-256-GCM-SIV with a random 96-bit
//! nonce per write, the key id in the stored value (as Vault's barrier does), and as associated
//! data the database's id, the row, the field and the key id, so a value opens only where it
//! was sealed.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// A secret string. `Debug` and `Display` print nothing of it, so it cannot leak through a log
/// line, an error message or a panic; the value is reached only through [`Secret::expose`].
/// It is not `Clone`, so every copy in memory is one somebody made on purpose (shared through
/// an `Arc` where several owners need it), and its bytes are wiped when it is dropped.
/// The default is empty (an unset key in the config).
#[derive(Default, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

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

/// Which secret field a sealed value belongs to. Part of the associated data, so a value
/// sealed for one field cannot be opened as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Token,
    RefreshToken,
    ClientSecret,
    /// A key behind [`Fingerprinter`], stored in the `fingerprint_keys` table.
    FingerprintKey,
    /// The marker in `meta` that tells, at start, whether the configured key is this
    /// database's (see [`Sealer::seal_key_check`]).
    KeyCheck,
}

impl Field {
    pub fn as_str(self) -> &'static str {
        match self {
            Field::Token => "token",
            Field::RefreshToken => "refresh_token",
            Field::ClientSecret => "client_secret",
            Field::FingerprintKey => "fingerprint_key",
            Field::KeyCheck => "key_check",
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
/// Version byte of the first AES-256-GCM-SIV format, whose associated data has no database id:
/// `1 | key_id (u32 BE) | nonce (12) | ct‖tag`. Read only to upgrade it.
const SEALED_V1: u8 = 1;
/// Version byte of the current format: the layout of v1, with the database id in the
/// associated data.
const SEALED_V2: u8 = 2;
const NONCE_LEN: usize = 12;
const HEADER_LEN: usize = 1 + 4 + NONCE_LEN;
const TAG_LEN: usize = 16;

/// The form a stored value is in, from its version byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// In clear (version 0).
    Plain,
    /// Sealed without the database id (version 1, before the id existed).
    Legacy,
    /// Sealed in the current format (version 2).
    Sealed,
    /// Empty, or a version byte this program never wrote.
    Unknown,
}

/// The form of a stored value.
pub fn form_of(stored: &[u8]) -> Form {
    match stored.first() {
        Some(&PLAIN_V0) => Form::Plain,
        Some(&SEALED_V1) => Form::Legacy,
        Some(&SEALED_V2) => Form::Sealed,
        _ => Form::Unknown,
    }
}

/// A 256-bit encryption key and its id. The id is derived from the key (the first four bytes
/// of a hash of it), so a stored value tells which key sealed it without revealing the key.
/// Not `Clone`; wiped when dropped (the cipher made from it wipes its own copy too).
pub struct EncryptionKey {
    key: Zeroizing<[u8; 32]>,
    id: u32,
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncryptionKey(id {:08x})", self.id)
    }
}

impl EncryptionKey {
    pub fn new(key: Zeroizing<[u8; 32]>) -> Self {
        use sha2::Digest;
        let digest = Sha256::new()
            .chain_update(b"cliproxyapi key id\0")
            .chain_update(key.as_slice())
            .finalize();
        let id = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        EncryptionKey { key, id }
    }

    /// Parse the base64 text of 32 bytes (what `cliproxyapi gen-key` prints).
    pub fn from_base64(text: &str) -> Result<Self, String> {
        use base64::Engine;
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| "is not base64 (make one with `cliproxyapi gen-key`)".to_string())?,
        );
        if bytes.len() != 32 {
            return Err(format!(
                "is {} bytes; it must be 32 (make one with `cliproxyapi gen-key`)",
                bytes.len()
            ));
        }
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&bytes);
        Ok(Self::new(key))
    }

    /// A fresh random key, as base64.
    pub fn generate_base64() -> String {
        use base64::Engine;
        let key = Zeroizing::new(rand::random::<[u8; 32]>());
        base64::engine::general_purpose::STANDARD.encode(key.as_slice())
    }

    pub fn id(&self) -> u32 {
        self.id
    }
}

/// The random id of a database, kept in its `meta` table and part of the associated data of
/// every value sealed in it, so a value copied from another database under the same key does
/// not open. Not a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseId(String);

impl DatabaseId {
    /// A fresh id: 16 random bytes as lowercase hex.
    pub fn random() -> Self {
        DatabaseId(to_hex(&rand::random::<[u8; 16]>()))
    }

    /// The id as stored, if it is one (32 lowercase hex digits).
    pub fn parse(stored: &[u8]) -> Option<Self> {
        let ok = stored.len() == 32
            && stored
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
        ok.then(|| DatabaseId(String::from_utf8_lossy(stored).into_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A key ready to seal: the cipher and the key's id. Shared, never copied, by every sealer
/// made from it.
struct Keyed {
    cipher: aes_gcm_siv::Aes256GcmSiv,
    key_id: u32,
}

/// What the config asks for: secrets in clear, or sealed under a key. Bound to a database's id
/// ([`Encryption::for_database`]) it becomes the [`Sealer`] of that database.
#[derive(Clone, Default)]
pub struct Encryption {
    keyed: Option<Arc<Keyed>>,
}

impl fmt::Debug for Encryption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.keyed {
            None => f.write_str("Encryption(off)"),
            Some(k) => write!(f, "Encryption(aes-256-gcm-siv, key {:08x})", k.key_id),
        }
    }
}

impl Encryption {
    /// Secrets stored in clear behind a version byte (encryption off).
    pub fn off() -> Self {
        Encryption { keyed: None }
    }

    /// Secrets sealed with AES-256-GCM-SIV under `key`.
    pub fn with_key(key: &EncryptionKey) -> Self {
        use aes_gcm_siv::KeyInit;
        Encryption {
            keyed: Some(Arc::new(Keyed {
                cipher: aes_gcm_siv::Aes256GcmSiv::new_from_slice(key.key.as_slice())
                    .expect("a 32-byte key is an AES-256 key"),
                key_id: key.id,
            })),
        }
    }

    pub fn is_on(&self) -> bool {
        self.keyed.is_some()
    }

    /// The id of the key; `None` when off.
    pub fn key_id(&self) -> Option<u32> {
        self.keyed.as_ref().map(|k| k.key_id)
    }

    /// The sealer of the database `database`.
    pub fn for_database(&self, database: &DatabaseId) -> Sealer {
        Sealer {
            keyed: self.keyed.clone(),
            database: database.clone(),
        }
    }
}

/// The seal/open seam of one database. Cheap to clone; shared by the store.
#[derive(Clone)]
pub struct Sealer {
    keyed: Option<Arc<Keyed>>,
    database: DatabaseId,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.keyed {
            None => f.write_str("Sealer(plain)"),
            Some(k) => write!(f, "Sealer(aes-256-gcm-siv, key {:08x})", k.key_id),
        }
    }
}

/// Length-prefix every part so no two different lists of parts give the same bytes.
fn push_parts(out: &mut Vec<u8>, parts: &[&[u8]]) {
    for part in parts {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
}

/// The associated data of a current (v2) value: in which database, row and field it lives,
/// under which key, so a value copied to another database, row or field, or presented as
/// another key's, does not open.
fn aad_v2(database: &DatabaseId, owner: &str, field: Field, key_id: u32) -> Vec<u8> {
    let mut out = b"cliproxyapi/v2".to_vec();
    push_parts(
        &mut out,
        &[
            database.as_str().as_bytes(),
            owner.as_bytes(),
            field.as_str().as_bytes(),
            &key_id.to_be_bytes(),
        ],
    );
    out
}

/// The associated data of a v1 value (no database id).
fn aad_v1(owner: &str, field: Field, key_id: u32) -> Vec<u8> {
    format!("cliproxyapi/v1/{owner}/{}/{key_id:08x}", field.as_str()).into_bytes()
}

/// The text sealed as the key check.
const KEY_CHECK: &str = "cliproxyapi key check";

impl Sealer {
    pub fn is_encrypted(&self) -> bool {
        self.keyed.is_some()
    }

    /// The id of the key values are sealed with; `None` when plain.
    pub fn key_id(&self) -> Option<u32> {
        self.keyed.as_ref().map(|k| k.key_id)
    }

    pub fn database(&self) -> &DatabaseId {
        &self.database
    }

    /// Seal `secret` as field `field` of the row `owner` (a credential id, or `meta`).
    pub fn seal(&self, owner: &str, field: Field, secret: &Secret) -> Vec<u8> {
        let Some(keyed) = &self.keyed else {
            let mut out = Vec::with_capacity(secret.0.len() + 1);
            out.push(PLAIN_V0);
            out.extend_from_slice(secret.0.as_bytes());
            return out;
        };
        use aes_gcm_siv::aead::{Aead, Payload};
        // A fresh random nonce per write; with GCM-SIV a repeat would only reveal that the
        // same plaintext was sealed twice.
        let nonce: [u8; NONCE_LEN] = rand::random();
        let aad = aad_v2(&self.database, owner, field, keyed.key_id);
        let ct = keyed
            .cipher
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: secret.0.as_bytes(),
                    aad: &aad,
                },
            )
            .expect("AES-GCM-SIV encryption of a short secret cannot fail");
        let mut out = Vec::with_capacity(HEADER_LEN + ct.len());
        out.push(SEALED_V2);
        out.extend_from_slice(&keyed.key_id.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Open what [`Sealer::seal`] produced for the same owner and field. Only this sealer's
    /// form opens: with encryption on, a value in clear is refused (it can only have been
    /// written behind the program's back), and so is a value of the old format that did not
    /// open when the database was upgraded.
    pub fn open(&self, owner: &str, field: Field, sealed: &[u8]) -> Result<Secret, CryptoError> {
        let err = open_error(owner, field);
        match (form_of(sealed), &self.keyed) {
            (Form::Plain, None) => utf8(sealed[1..].to_vec()).map_err(err),
            (Form::Plain, Some(_)) => Err(err(
                "the value is stored in clear in an encrypted database, so it is refused; give the credential a new token",
            )),
            (Form::Legacy | Form::Sealed, None) => Err(err(
                "the value is encrypted, but encryption is not configured",
            )),
            (Form::Legacy, Some(_)) => Err(err(
                "the value is in the sealed format of before the database id and did not open when the database was upgraded",
            )),
            (Form::Sealed, Some(keyed)) => {
                let aad = |key_id| aad_v2(&self.database, owner, field, key_id);
                decrypt(keyed, sealed, aad).map_err(err)
            }
            (Form::Unknown, _) if sealed.is_empty() => Err(err("the stored value is empty")),
            (Form::Unknown, _) => Err(err("the stored value has an unknown format")),
        }
    }

    /// Open a value stored in clear, for the one migration that may seal one: turning
    /// encryption on over a database whose secrets are all in clear.
    pub fn open_plain(
        &self,
        owner: &str,
        field: Field,
        stored: &[u8],
    ) -> Result<Secret, CryptoError> {
        let err = open_error(owner, field);
        match form_of(stored) {
            Form::Plain => utf8(stored[1..].to_vec()).map_err(err),
            _ => Err(err("the value is not stored in clear")),
        }
    }

    /// Open a value of the first sealed format (no database id in its associated data)
    /// under this sealer's key, for the migration that re-seals those values once.
    pub fn open_legacy(
        &self,
        owner: &str,
        field: Field,
        stored: &[u8],
    ) -> Result<Secret, CryptoError> {
        let err = open_error(owner, field);
        match (form_of(stored), &self.keyed) {
            (Form::Legacy, Some(keyed)) => {
                decrypt(keyed, stored, |key_id| aad_v1(owner, field, key_id)).map_err(err)
            }
            _ => Err(err("the value is not in the first sealed format")),
        }
    }

    /// The key check marker: a known text sealed under this key for this database. `None`
    /// when encryption is off (a database in clear has no marker).
    pub fn seal_key_check(&self) -> Option<Vec<u8>> {
        self.is_encrypted()
            .then(|| self.seal("meta", Field::KeyCheck, &Secret::new(KEY_CHECK)))
    }

    /// Does the key check marker open under this key, in this database?
    pub fn verify_key_check(&self, stored: &[u8]) -> Result<(), CryptoError> {
        let err = open_error("meta", Field::KeyCheck);
        if form_of(stored) != Form::Sealed {
            return Err(err("the marker is not sealed, so `meta` was altered"));
        }
        let text = self.open("meta", Field::KeyCheck, stored)?;
        if text.expose() != KEY_CHECK {
            return Err(err("the marker holds another text, so `meta` was altered"));
        }
        Ok(())
    }
}

fn open_error(owner: &str, field: Field) -> impl Fn(&'static str) -> CryptoError + '_ {
    move |reason| CryptoError::Open {
        owner: owner.to_string(),
        field: field.as_str(),
        reason,
    }
}

fn utf8(bytes: Vec<u8>) -> Result<Secret, &'static str> {
    match String::from_utf8(bytes) {
        Ok(text) => Ok(Secret::new(text)),
        Err(e) => {
            // Not a secret we can use, but still a secret's bytes: wiped before they go.
            drop(Zeroizing::new(e.into_bytes()));
            Err("the stored value is not UTF-8")
        }
    }
}

/// Decrypt a v1 or v2 value (`version | key id | nonce | ct‖tag`) under `keyed`, with the
/// associated data `aad` gives for the key id.
fn decrypt(
    keyed: &Keyed,
    stored: &[u8],
    aad: impl Fn(u32) -> Vec<u8>,
) -> Result<Secret, &'static str> {
    use aes_gcm_siv::aead::{Aead, Payload};
    if stored.len() < HEADER_LEN + TAG_LEN {
        return Err("the stored value is truncated");
    }
    let stored_id = u32::from_be_bytes([stored[1], stored[2], stored[3], stored[4]]);
    if stored_id != keyed.key_id {
        return Err("the value was sealed with another key than the configured one");
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&stored[5..HEADER_LEN]);
    let plain = keyed
        .cipher
        .decrypt(
            &nonce.into(),
            Payload {
                msg: &stored[HEADER_LEN..],
                aad: &aad(keyed.key_id),
            },
        )
        .map_err(|_| {
            "the value does not authenticate: it was altered, or moved from another credential, field or database"
        })?;
    utf8(plain)
}

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

/// Key prefixes the providers publish (they name the kind of key, not the key), longest first
/// where one begins another. A preview keeps the prefix, without its final separator.
const PUBLIC_PREFIXES: &[&str] = &[
    "sk-ant-",
    "sk-proj-",
    "sk-svcacct-",
    "sk-admin-",
    "sk-",
    "AIza",
    "gsk_",
    "ghu_",
    "gho_",
    "ghp_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "xai-",
];

/// What the API shows of a token: its public prefix when it has a known one, and the last 4
/// characters of the rest, fewer for a short token, so never more than a quarter of the part
/// that is secret (`sk-ant-api03-…wxyz` shows as `sk-ant…wxyz`).
pub fn token_preview(token: &str) -> String {
    let prefix = PUBLIC_PREFIXES
        .iter()
        .find(|p| token.starts_with(**p))
        .copied()
        .unwrap_or("");
    let rest: Vec<char> = token[prefix.len()..].chars().collect();
    let tail = (rest.len() / 4).min(4);
    let tail: String = rest[rest.len() - tail..].iter().collect();
    format!("{}…{tail}", prefix.trim_end_matches(['-', '_']))
}

/// The preview of a credential whose token does not open: nothing of it.
pub const PREVIEW_UNKNOWN: &str = "…";

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

    /// `Secret`, `EncryptionKey` and the cipher holders cannot be copied by accident: this
    /// stops compiling as soon as one of them implements `Clone` (the name would then be
    /// ambiguous between the two impls).
    #[test]
    fn keys_and_secrets_are_not_clone() {
        trait AmbiguousIfClone<A> {
            fn check() {}
        }
        impl<T> AmbiguousIfClone<()> for T {}
        impl<T: Clone> AmbiguousIfClone<u8> for T {}
        <Secret as AmbiguousIfClone<_>>::check();
        <EncryptionKey as AmbiguousIfClone<_>>::check();
        <Keyed as AmbiguousIfClone<_>>::check();
    }

    #[test]
    fn a_taken_secret_leaves_an_empty_one() {
        let mut s = Secret::new("hunter2hunter2");
        let taken = s.take();
        assert!(s.is_empty());
        assert_eq!(taken.expose(), "hunter2hunter2");
    }

    #[test]
    fn preview_shows_little() {
        // Known public prefixes stay; of the rest, the last 4 characters at most, and never
        // more than a quarter of it.
        for (token, preview) in [
            (
                "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789wxyz",
                "sk-ant…wxyz",
            ),
            ("sk-proj-abcdefghijklmnopqrstuvwxyz0123", "sk-proj…0123"),
            ("sk-abcdefghijklmnopqrstuvwxyz0123", "sk…0123"),
            ("AIzaSyA-abcdefghijklmnopqrstuvwxyz0123", "AIza…0123"),
            ("gsk_abcdefghijklmnopqrstuvwxyz0123", "gsk…0123"),
            ("ghu_abcdefghijklmnop", "ghu…mnop"),
            ("gho_abcdefghijklmnop", "gho…mnop"),
            ("ghp_abcdefghijklmnop", "ghp…mnop"),
            ("github_pat_11ABCDEFG0123456789", "github_pat…6789"),
            ("xai-abcdefghijklmnop", "xai…mnop"),
            ("plainabcdefghijklmnop", "…mnop"),
            ("sk-ant-key1", "sk-ant…1"),
            ("sk-ant-", "sk-ant…"),
            ("abcdefgh", "…gh"),
            ("abcdefg", "…g"),
            ("abc", "…"),
            ("", "…"),
            ("ééééééééé", "…éé"),
        ] {
            assert_eq!(token_preview(token), preview, "{token}");
        }
        // Never more than a quarter of the secret part, whatever its length.
        for n in 0..64 {
            let token: String = std::iter::repeat_n('x', n).collect();
            let shown = token_preview(&token).chars().filter(|c| *c == 'x').count();
            assert!(shown * 4 <= n && shown <= 4, "{n}: {shown}");
        }
    }

    fn db(id: &str) -> DatabaseId {
        DatabaseId::parse(id.as_bytes()).unwrap()
    }

    fn key() -> EncryptionKey {
        EncryptionKey::from_base64(&EncryptionKey::generate_base64()).unwrap()
    }

    #[test]
    fn plain_roundtrip_and_garbage() {
        let s = Encryption::off().for_database(&DatabaseId::random());
        let sealed = s.seal("cred_1", Field::Token, &Secret::new("tok"));
        assert_eq!(sealed[0], 0);
        assert_eq!(
            s.open("cred_1", Field::Token, &sealed).unwrap().expose(),
            "tok"
        );
        assert!(s.open("cred_1", Field::Token, &[]).is_err());
        assert!(s.open("cred_1", Field::Token, &[7, 1, 2]).is_err());
        assert!(s.open("cred_1", Field::Token, &[0, 0xff]).is_err());
        assert!(s.seal_key_check().is_none());
        assert!(DatabaseId::parse(b"0123").is_none());
        assert!(DatabaseId::parse(b"0123456789ABCDEF0123456789abcdef").is_none());
        assert!(DatabaseId::parse(DatabaseId::random().as_str().as_bytes()).is_some());
    }

    #[test]
    fn encrypted_roundtrip_binding_and_keys() {
        let (k1, k2) = (key(), key());
        assert_ne!(k1.id(), k2.id());
        let here = db("0123456789abcdef0123456789abcdef");
        let there = db("fedcba9876543210fedcba9876543210");
        let s1 = Encryption::with_key(&k1).for_database(&here);
        let secret = Secret::new("sk-ant-top-secret");
        let a = s1.seal("cred_a", Field::Token, &secret);
        let b = s1.seal("cred_a", Field::Token, &secret);
        assert_eq!(a[0], 2);
        assert_ne!(a, b, "fresh nonce per write");
        assert!(!a.windows(10).any(|w| w == b"top-secret"));
        assert_eq!(s1.open("cred_a", Field::Token, &a).unwrap(), secret);
        assert_eq!(form_of(&a), Form::Sealed);
        // Moved to another row, field or database: does not open.
        assert!(s1.open("cred_b", Field::Token, &a).is_err());
        assert!(s1.open("cred_a", Field::RefreshToken, &a).is_err());
        let elsewhere = Encryption::with_key(&k1).for_database(&there);
        let e = elsewhere.open("cred_a", Field::Token, &a).unwrap_err();
        assert!(e.to_string().contains("database"), "{e}");
        // Another key, or no key: does not open, and says why.
        let e = Encryption::with_key(&k2)
            .for_database(&here)
            .open("cred_a", Field::Token, &a)
            .unwrap_err();
        assert!(e.to_string().contains("another key"));
        let plain = Encryption::off().for_database(&here);
        assert!(plain.open("cred_a", Field::Token, &a).is_err());
        // Tampering is detected, at any byte.
        for i in 0..a.len() {
            let mut t = a.clone();
            t[i] ^= 1;
            assert!(s1.open("cred_a", Field::Token, &t).is_err(), "byte {i}");
        }
        for len in 0..a.len() {
            assert!(s1.open("cred_a", Field::Token, &a[..len]).is_err(), "{len}");
        }
        // A value in clear is refused by an encrypting sealer, whatever it holds; only the
        // migration of turning encryption on reads one.
        for text in ["", "sk-planted", "x"] {
            let p = plain.seal("cred_a", Field::Token, &Secret::new(text));
            let e = s1.open("cred_a", Field::Token, &p).unwrap_err();
            assert!(e.to_string().contains("in clear"), "{e}");
            assert_eq!(
                s1.open_plain("cred_a", Field::Token, &p).unwrap().expose(),
                text
            );
        }
        assert!(s1.open_plain("cred_a", Field::Token, &a).is_err());
        assert!(format!("{s1:?} {k1:?}").contains(&format!("{:08x}", k1.id())));
        assert!(
            EncryptionKey::from_base64("c2hvcnQ=")
                .unwrap_err()
                .contains("32")
        );
        assert!(EncryptionKey::from_base64("!!").is_err());
    }

    /// A value of the first format, sealed as the program before the database id did.
    fn seal_v1(key: &EncryptionKey, owner: &str, field: Field, text: &str) -> Vec<u8> {
        use aes_gcm_siv::KeyInit;
        use aes_gcm_siv::aead::{Aead, Payload};
        let cipher = aes_gcm_siv::Aes256GcmSiv::new_from_slice(key.key.as_slice()).unwrap();
        let nonce = [7u8; NONCE_LEN];
        let aad = aad_v1(owner, field, key.id());
        let ct = cipher
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: text.as_bytes(),
                    aad: &aad,
                },
            )
            .unwrap();
        [&[SEALED_V1][..], &key.id().to_be_bytes(), &nonce, &ct].concat()
    }

    #[test]
    fn legacy_values_open_only_for_their_migration() {
        let (k1, k2) = (key(), key());
        let s1 = Encryption::with_key(&k1).for_database(&DatabaseId::random());
        let old = seal_v1(&k1, "cred_a", Field::Token, "sk-old");
        assert_eq!(form_of(&old), Form::Legacy);
        assert_eq!(
            s1.open_legacy("cred_a", Field::Token, &old)
                .unwrap()
                .expose(),
            "sk-old"
        );
        let e = s1.open("cred_a", Field::Token, &old).unwrap_err();
        assert!(e.to_string().contains("format"), "{e}");
        assert!(s1.open_legacy("cred_b", Field::Token, &old).is_err());
        let s2 = Encryption::with_key(&k2).for_database(s1.database());
        assert!(s2.open_legacy("cred_a", Field::Token, &old).is_err());
        let v2 = s1.seal("cred_a", Field::Token, &Secret::new("sk-new"));
        assert!(s1.open_legacy("cred_a", Field::Token, &v2).is_err());
    }

    #[test]
    fn key_check_binds_key_and_database() {
        let (k1, k2) = (key(), key());
        let here = Encryption::with_key(&k1).for_database(&DatabaseId::random());
        let marker = here.seal_key_check().unwrap();
        here.verify_key_check(&marker).unwrap();
        let there = Encryption::with_key(&k1).for_database(&DatabaseId::random());
        assert!(there.verify_key_check(&marker).is_err());
        let other_key = Encryption::with_key(&k2).for_database(here.database());
        assert!(other_key.verify_key_check(&marker).is_err());
        // A marker in clear, or any other text sealed as the marker, does not pass.
        let plain = Encryption::off().for_database(here.database());
        let clear = plain.seal("meta", Field::KeyCheck, &Secret::new(KEY_CHECK));
        assert!(here.verify_key_check(&clear).is_err());
        let other = here.seal("meta", Field::KeyCheck, &Secret::new("something else"));
        assert!(here.verify_key_check(&other).is_err());
        assert!(here.verify_key_check(&[]).is_err());
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
