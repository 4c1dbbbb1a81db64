//! Secrets: the redacting [`Secret`] wrapper, the seal/open seam every stored secret passes
//! through, keyed fingerprints for de-duplication, token previews, and the argon2id policy of
//! the management key.
//!
//! Sealing is the only way a secret reaches the database. With encryption off the sealed form
//! is the plain bytes behind a version byte; with it on, AES-256-GCM-SIV with a random 96-bit
//! nonce per write, the key id in the stored value (as Vault's barrier does), and as associated
//! data the database's id, the row, the field and the key id, so a value opens only where it
//! was sealed.
//!
//! Layout: `secret` (the wrapper), `seal` (keys, database ids, formats, the [`Sealer`]),
//! `fingerprint`, `preview`, `password` (argon2id hashes and their policy).

mod fingerprint;
mod password;
mod preview;
mod seal;
mod secret;

pub use fingerprint::Fingerprinter;
pub use password::{
    HASH_PARAMS, OWASP_MINIMUMS, PHC_MAX, PhcParams, check_phc, hash_secret, hash_secret_with,
    is_phc, verify_secret,
};
pub use preview::{PREVIEW_UNKNOWN, token_preview};
pub use seal::{CryptoError, DatabaseId, Encryption, EncryptionKey, Field, Form, Sealer, form_of};
pub use secret::Secret;

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
