//! The seal/open seam: encryption keys, database ids, the stored formats, and the
//! [`Sealer`] every stored secret passes through.

use super::{Secret, to_hex};
use sha2::Sha256;
use std::fmt;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Which secret field a sealed value belongs to. Part of the associated data, so a value
/// sealed for one field cannot be opened as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Token,
    RefreshToken,
    ClientSecret,
    /// A device-flow login's device code, bound to its session id.
    DeviceCode,
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
            Field::DeviceCode => "device_code",
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
/// Version byte of the first AES-256-GCM-SIV format, written by builds before the database id
/// (no database id in its associated data). This version never opens one: the schema those
/// builds made is not the one it migrates (README, Encryption at rest). The byte is recognised
/// only so that such a value is refused by name rather than as an unknown one.
const OBSOLETE_V1: u8 = 1;
/// Version byte of the current format: `2 | key_id (u32 BE) | nonce (12) | ct‖tag`, with the
/// database id in the associated data.
const SEALED_V2: u8 = 2;
const NONCE_LEN: usize = 12;
const HEADER_LEN: usize = 1 + 4 + NONCE_LEN;
const TAG_LEN: usize = 16;

/// The form a stored value is in, from its version byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// In clear (version 0).
    Plain,
    /// Sealed in the first format (version 1, before the database id), which this version
    /// cannot open.
    Obsolete,
    /// Sealed in the current format (version 2).
    Sealed,
    /// Empty, or a version byte this program never wrote.
    Unknown,
}

/// The form of a stored value.
pub fn form_of(stored: &[u8]) -> Form {
    match stored.first() {
        Some(&PLAIN_V0) => Form::Plain,
        Some(&OBSOLETE_V1) => Form::Obsolete,
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

/// The text sealed as the key check.
const KEY_CHECK: &str = "cliproxyapi key check";

/// Why a value of the first sealed format is refused.
const OBSOLETE_REASON: &str = "the value is sealed in the first format (version 1, before the database id), which only earlier builds wrote and this version cannot open; give the credential a new token";

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
    /// written behind the program's back), and a value of the first sealed format is refused
    /// whatever the key, as this version cannot open it.
    pub fn open(&self, owner: &str, field: Field, sealed: &[u8]) -> Result<Secret, CryptoError> {
        let err = open_error(owner, field);
        match (form_of(sealed), &self.keyed) {
            (Form::Plain, None) => utf8(sealed[1..].to_vec()).map_err(err),
            (Form::Plain, Some(_)) => Err(err(
                "the value is stored in clear in an encrypted database, so it is refused; give the credential a new token",
            )),
            (Form::Obsolete, _) => Err(err(OBSOLETE_REASON)),
            (Form::Sealed, None) => Err(err(
                "the value is encrypted, but encryption is not configured",
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

/// Decrypt a v2 value (`version | key id | nonce | ct‖tag`) under `keyed`, with the
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

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A value with the first format's version byte (its layout, under the current key and
    /// associated data, or cut short) is refused by name, with or without a key, and never by
    /// a panic.
    #[test]
    fn values_of_the_first_format_are_refused_by_name() {
        let here = Encryption::with_key(&key()).for_database(&DatabaseId::random());
        let plain = Encryption::off().for_database(here.database());
        let mut old = here.seal("cred_a", Field::Token, &Secret::new("sk-old"));
        old[0] = OBSOLETE_V1;
        for value in [&old[..], &old[..1], &old[..HEADER_LEN]] {
            assert_eq!(form_of(value), Form::Obsolete);
            for sealer in [&here, &plain] {
                let e = sealer.open("cred_a", Field::Token, value).unwrap_err();
                assert!(e.to_string().contains(OBSOLETE_REASON), "{e}");
            }
            assert!(here.open_plain("cred_a", Field::Token, value).is_err());
            assert!(here.verify_key_check(value).is_err());
        }
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
}
