//! Reading credential files and bulk bodies into validated [`NewCredential`]s, with a report
//! entry for every source that could not be used, and ([`plan`]) deciding what importing them
//! does over what the store holds. No I/O beyond reading files; the store reads its snapshot
//! and applies the plan.

pub mod plan;

pub use plan::{Change, ImportMode, ImportReport, Notice};

use crate::crypto::Secret;
use crate::domain::{AuthMethod, CredentialKind, NewCredential, OauthExtra};
use crate::providers::Registry;
use crate::quota::CounterTokens;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Files larger than this are refused unread: no credential file is anywhere near it.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
const MAX_TOKEN_LEN: usize = 16 * 1024;
const MAX_LABEL_LEN: usize = 256;
const PRIORITY_RANGE: std::ops::RangeInclusive<i64> = -1_000_000..=1_000_000;

/// A source that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImportError {
    pub source: String,
    pub error: String,
}

/// One good entry, with where it came from (`file:auths/claude.json`, `body[3]`, …).
#[derive(Debug)]
pub struct Entry {
    pub source: String,
    pub credential: NewCredential,
}

/// Everything read from a set of sources: good entries and errors.
#[derive(Debug, Default)]
pub struct Batch {
    pub entries: Vec<Entry>,
    pub errors: Vec<ImportError>,
    /// Files read, for the report.
    pub files: usize,
}

/// The shape a credential arrives in, as a file entry, bulk body entry or POST body. Read-only
/// fields of the API representation are accepted and ignored, so an export imports again.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialInput {
    pub provider: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<CredentialKind>,
    pub token: Option<Secret>,
    pub access_token: Option<Secret>,
    pub refresh_token: Option<Secret>,
    pub expires_at: Option<DateTime<Utc>>,
    pub priority: Option<i64>,
    pub label: Option<String>,
    pub quota: Option<QuotaInput>,
    pub disabled: Option<bool>,
    // kiro
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub client_secret_expires_at: Option<DateTime<Utc>>,
    pub region: Option<String>,
    pub start_url: Option<String>,
    pub auth_method: Option<AuthMethod>,
    // Read-only fields of the API representation: accepted so an export imports again, and
    // never read.
    #[allow(dead_code)]
    id: Option<IgnoredAny>,
    #[allow(dead_code)]
    status: Option<IgnoredAny>,
    #[allow(dead_code)]
    status_reason: Option<IgnoredAny>,
    #[allow(dead_code)]
    token_preview: Option<IgnoredAny>,
    #[allow(dead_code)]
    cooldown_until: Option<IgnoredAny>,
    #[allow(dead_code)]
    exhausted_until: Option<IgnoredAny>,
    #[allow(dead_code)]
    last_used_at: Option<IgnoredAny>,
    #[allow(dead_code)]
    last_refresh_at: Option<IgnoredAny>,
    #[allow(dead_code)]
    source: Option<IgnoredAny>,
    #[allow(dead_code)]
    created_at: Option<IgnoredAny>,
    #[allow(dead_code)]
    updated_at: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaInput {
    /// `Some(None)` for an explicit `null` (unlimited), `None` when absent (the provider's
    /// default limit).
    #[serde(default, deserialize_with = "nullable")]
    pub limit: Option<Option<CounterTokens>>,
    pub used: Option<CounterTokens>,
    #[allow(dead_code)]
    remaining: Option<IgnoredAny>,
    #[allow(dead_code)]
    reserved: Option<IgnoredAny>,
    #[allow(dead_code)]
    period_start: Option<IgnoredAny>,
    #[allow(dead_code)]
    next_reset: Option<IgnoredAny>,
}

/// `Some(None)` for an explicit `null`, `None` for an absent field (with `#[serde(default)]`).
pub fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Deserialize `value` as `T`, naming the field at fault: `quota.limit: invalid type: …`.
pub fn from_value<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." || path.is_empty() {
            inner
        } else {
            format!("{path}: {inner}")
        }
    })
}

/// Checks a secret that will be sent in an HTTP header one day.
pub fn check_secret(field: &str, s: &Secret) -> Result<(), String> {
    let v = s.expose();
    if v.is_empty() {
        return Err(format!("{field} is empty"));
    }
    if v.len() > MAX_TOKEN_LEN {
        return Err(format!("{field} is longer than {MAX_TOKEN_LEN} bytes"));
    }
    if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{field} contains whitespace or control characters"));
    }
    Ok(())
}

pub fn check_label(label: &str) -> Result<(), String> {
    if label.chars().count() > MAX_LABEL_LEN {
        return Err(format!("label is longer than {MAX_LABEL_LEN} characters"));
    }
    if label.chars().any(char::is_control) {
        return Err("label contains control characters".into());
    }
    Ok(())
}

pub fn check_priority(p: i64) -> Result<(), String> {
    if PRIORITY_RANGE.contains(&p) {
        Ok(())
    } else {
        Err(format!(
            "priority must be between {} and {}",
            PRIORITY_RANGE.start(),
            PRIORITY_RANGE.end()
        ))
    }
}

impl CredentialInput {
    /// Validate into a new credential. `default_provider` comes from a file name; a POST has
    /// none, so there `provider` is required.
    pub fn validate(
        self,
        registry: &Registry,
        default_provider: Option<&str>,
    ) -> Result<NewCredential, String> {
        let provider = match (self.provider, default_provider) {
            (Some(p), _) => p,
            (None, Some(p)) => p.to_string(),
            (None, None) => return Err("provider is required".into()),
        };
        if !registry.contains(&provider) {
            return Err(format!("unknown provider `{provider}`"));
        }
        let kind = self.kind.unwrap_or(
            if self.access_token.is_some() || self.refresh_token.is_some() {
                CredentialKind::Oauth
            } else {
                CredentialKind::ApiKey
            },
        );
        let token = match (self.token, self.access_token) {
            (Some(_), Some(_)) => {
                return Err("give either token or access_token, not both".into());
            }
            (Some(t), None) | (None, Some(t)) => Some(t),
            (None, None) => None,
        };
        match kind {
            CredentialKind::ApiKey => {
                if token.is_none() {
                    return Err("token is required".into());
                }
                if self.refresh_token.is_some() {
                    return Err("refresh_token is only for type oauth".into());
                }
            }
            CredentialKind::Oauth => {
                if token.is_none() && self.refresh_token.is_none() {
                    return Err("an oauth credential needs access_token or refresh_token".into());
                }
            }
        }
        if let Some(t) = &token {
            check_secret("token", t)?;
        }
        if let Some(t) = &self.refresh_token {
            check_secret("refresh_token", t)?;
        }
        if let Some(t) = &self.client_secret {
            check_secret("client_secret", t)?;
        }
        let extra = OauthExtra {
            client_id: self.client_id,
            client_secret_expires_at: self.client_secret_expires_at,
            region: self.region,
            start_url: self.start_url,
            auth_method: self.auth_method,
            // Never from a file: only a token answer the allowlist allowed sets it.
            api_base: None,
            // Never from a file either: only a login sets it.
            account: None,
        };
        if provider != "kiro" {
            if !extra.is_empty() || self.client_secret.is_some() {
                return Err(
                    "client_id, client_secret, client_secret_expires_at, region, start_url and auth_method are kiro fields"
                        .into(),
                );
            }
        } else if kind == CredentialKind::ApiKey
            && (!extra.is_empty() || self.client_secret.is_some())
        {
            return Err("kiro client fields need type oauth".into());
        }
        let priority = self.priority.unwrap_or(100);
        check_priority(priority)?;
        if let Some(label) = &self.label {
            check_label(label)?;
        }
        let (limit, used) = self
            .quota
            .map(|q| {
                (
                    q.limit.map(|l| l.map(CounterTokens::get)),
                    q.used.map_or(0, CounterTokens::get),
                )
            })
            .unwrap_or((None, 0));
        Ok(NewCredential {
            provider,
            kind,
            token,
            refresh_token: self.refresh_token,
            client_secret: self.client_secret,
            extra,
            priority,
            label: self.label,
            limit,
            used,
            disabled: self.disabled.unwrap_or(false),
            expires_at: self.expires_at,
        })
    }
}

/// Split a parsed document into its entries: one object, an array of objects, or the list
/// response shape `{"auths": [...]}` (optionally with `"provider"`, as the per-provider list).
fn entries_of(doc: Value) -> Result<(Vec<Value>, Option<String>), String> {
    match doc {
        Value::Array(items) => Ok((items, None)),
        Value::Object(mut map) if map.contains_key("auths") => {
            let provider = match map.remove("provider") {
                None => None,
                Some(Value::String(p)) => Some(p),
                Some(_) => return Err("provider: expected a string".into()),
            };
            if let Some(key) = map.keys().find(|k| *k != "auths") {
                return Err(format!(
                    "unknown field `{key}` beside `auths` (expected only `auths` and `provider`)"
                ));
            }
            match map.remove("auths") {
                Some(Value::Array(items)) => Ok((items, provider)),
                _ => Err("auths: expected an array of credentials".into()),
            }
        }
        obj @ Value::Object(_) => Ok((vec![obj], None)),
        _ => Err("expected a credential object, an array of them, or {\"auths\": [...]}".into()),
    }
}

/// Validate every entry of a parsed document into `batch`. Each bad entry is an error of its
/// own (`source[i]`); the good ones are kept.
pub fn add_document(
    batch: &mut Batch,
    registry: &Registry,
    source: &str,
    doc: Value,
    default_provider: Option<&str>,
) {
    let (items, list_provider) = match entries_of(doc) {
        Ok(x) => x,
        Err(error) => {
            batch.errors.push(ImportError {
                source: source.to_string(),
                error,
            });
            return;
        }
    };
    let default_provider = list_provider.as_deref().or(default_provider);
    let single = items.len() == 1;
    for (i, item) in items.into_iter().enumerate() {
        let entry_source = if single {
            source.to_string()
        } else {
            format!("{source}[{i}]")
        };
        let result = if item.is_object() {
            from_value::<CredentialInput>(item)
                .and_then(|input| input.validate(registry, default_provider))
        } else {
            Err("expected a credential object".into())
        };
        match result {
            Ok(credential) => batch.entries.push(Entry {
                source: entry_source,
                credential,
            }),
            Err(error) => batch.errors.push(ImportError {
                source: entry_source,
                error,
            }),
        }
    }
}

/// Should this directory entry be imported? `*.json`, but not `*.example.json`.
pub fn is_credential_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with(".json") && !name.ends_with(".example.json") && !name.starts_with('.')
}

/// The `source` of a file: `file:` and its path as given (relative paths stay relative).
pub fn file_source(path: &Path) -> String {
    let path = path.strip_prefix(".").unwrap_or(path);
    format!("file:{}", path.display())
}

/// What a file that is not a regular file is, for the report.
fn file_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

fn too_large() -> String {
    format!(
        "file is larger than the {} MiB a credential file may have",
        MAX_FILE_BYTES / 1024 / 1024
    )
}

/// Read a credential file (following symlinks): only a regular file, and never more than
/// [`MAX_FILE_BYTES`] whatever size it claims (`/proc` files claim 0 and may never end).
/// Anything else is checked before it is opened, since opening a FIFO waits for a writer and
/// opening a device may act on it; and the open is non-blocking and checked again, in case
/// the file was swapped between the two.
fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let check = |meta: std::fs::Metadata| {
        if !meta.file_type().is_file() {
            return Err(format!(
                "{} is not a regular file; only regular files are imported",
                file_kind(meta.file_type())
            ));
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(too_large());
        }
        Ok(())
    };
    let cannot = |e: std::io::Error| format!("cannot read file: {e}");
    check(std::fs::metadata(path).map_err(cannot)?)?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(cannot)?;
    check(file.metadata().map_err(cannot)?)?;
    let mut bytes = Vec::new();
    // Whole 64 KiB blocks, as `/proc/*/pagemap` refuses reads that are not a multiple of 8
    // bytes; the read stops as soon as the total passes the cap.
    let mut block = vec![0u8; 64 * 1024];
    loop {
        let n = match file.read(&mut block) {
            Ok(0) => return Ok(bytes),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(cannot(e)),
        };
        if bytes.len() + n > MAX_FILE_BYTES as usize {
            return Err(too_large());
        }
        bytes.extend_from_slice(&block[..n]);
    }
}

/// Read one credential file into `batch`.
#[tracing::instrument(level = "debug", skip_all, fields(path = %path.display()))]
pub fn read_file(batch: &mut Batch, registry: &Registry, path: &Path) {
    let source = file_source(path);
    let fail = |batch: &mut Batch, error: String| {
        batch.errors.push(ImportError {
            source: source.clone(),
            error,
        })
    };
    batch.files += 1;
    let bytes = match read_bounded(path) {
        Ok(b) => b,
        Err(e) => return fail(batch, e),
    };
    let text = match std::str::from_utf8(&bytes) {
        Ok(t) => t,
        Err(e) => {
            return fail(
                batch,
                format!(
                    "file is not UTF-8 (invalid byte at offset {})",
                    e.valid_up_to()
                ),
            );
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return fail(batch, "file is empty".into());
    }
    let doc: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return fail(batch, format!("invalid JSON: {e}")),
    };
    let stem = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".json"))
        .unwrap_or("");
    let default_provider = registry.from_file_stem(stem);
    let first_error = batch.errors.len();
    add_document(batch, registry, &source, doc, default_provider);
    if default_provider.is_none() {
        for e in &mut batch.errors[first_error..] {
            if e.error == "provider is required" {
                e.error = format!(
                    "provider is required: the file name `{stem}.json` names no known provider"
                );
            }
        }
    }
}

/// Read the credential files among `paths`: a directory contributes its `*.json` entries (not
/// recursively), a file is read as named. All are read in sorted path order, each once, so
/// that when two hold the same credential the first in that order wins. An entry named
/// `*.json` that is not a regular file (a folder, FIFO, socket, device, or a symlink to one)
/// is reported, not read.
#[tracing::instrument(skip_all, fields(paths = paths.len()))]
pub fn read_paths(registry: &Registry, paths: &[PathBuf]) -> Batch {
    let mut batch = Batch::default();
    let mut files: Vec<PathBuf> = Vec::new();
    for path in paths {
        if path.is_dir() {
            match std::fs::read_dir(path) {
                Ok(dir) => files.extend(
                    dir.filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| is_credential_file(p)),
                ),
                Err(e) => batch.errors.push(ImportError {
                    source: file_source(path),
                    error: format!("cannot read folder: {e}"),
                }),
            }
        } else if path.exists() {
            files.push(path.clone());
        } else {
            batch.errors.push(ImportError {
                source: file_source(path),
                error: "no such file or folder".into(),
            });
        }
    }
    files.sort();
    files.dedup();
    for file in files {
        read_file(&mut batch, registry, &file);
    }
    batch
}

/// Read a bulk import body (any file shape) into a batch; sources are `body` or `body[i]`.
/// The span names nothing of the body, which holds secrets.
#[tracing::instrument(skip_all)]
pub fn read_body(registry: &Registry, doc: Value) -> Batch {
    let mut batch = Batch::default();
    add_document(&mut batch, registry, "body", doc, None);
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn reg() -> Registry {
        Registry::from_config(&BTreeMap::new())
    }

    fn one(v: Value, default: Option<&str>) -> Result<NewCredential, String> {
        let mut b = Batch::default();
        add_document(&mut b, &reg(), "t", v, default);
        match (b.entries.pop(), b.errors.pop()) {
            (Some(e), None) => Ok(e.credential),
            (None, Some(e)) => Err(e.error),
            _ => panic!("one entry expected"),
        }
    }

    #[test]
    fn seed_shapes() {
        let c = one(
            json!({"type": "api_key", "token": "sk-ant-xxxxx", "priority": 1}),
            Some("claude"),
        )
        .unwrap();
        assert_eq!(c.provider, "claude");
        assert_eq!(c.priority, 1);
        let c = one(
            json!({"type": "api_key", "token": "sk-ant-xxxxx",
                   "quota": {"limit": 1000000, "used": 50000, "remaining": 950000}}),
            Some("claude"),
        )
        .unwrap();
        assert_eq!((c.limit, c.used), (Some(Some(1000000)), 50000));
        // A limit left out takes the provider's default; an explicit null is unlimited.
        for (quota, limit) in [
            (json!({"used": 5}), None),
            (json!(null), None),
            (json!({"limit": null}), Some(None)),
        ] {
            let e = one(
                json!({"token": "sk-ant-xxxxx", "quota": quota}),
                Some("claude"),
            );
            assert_eq!(e.unwrap().limit, limit, "{quota}");
        }
        assert_eq!(c.priority, 100);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = one(json!({"type": "api_key"}), Some("claude")).unwrap_err();
        assert_eq!(e, "token is required");
        let e = one(json!({"token": "x"}), None).unwrap_err();
        assert_eq!(e, "provider is required");
        let e = one(json!({"provider": "nope", "token": "x"}), None).unwrap_err();
        assert!(e.contains("unknown provider `nope`"));
        let e = one(json!({"token": "x", "colour": 1}), Some("claude")).unwrap_err();
        assert!(e.contains("colour"), "{e}");
        let e = one(
            json!({"token": "x", "quota": {"limit": "lots"}}),
            Some("claude"),
        )
        .unwrap_err();
        assert!(e.starts_with("quota.limit:"), "{e}");
        let e = one(json!({"token": "a b"}), Some("claude")).unwrap_err();
        assert!(e.contains("whitespace"));
        let e = one(json!({"token": "x", "region": "eu"}), Some("claude")).unwrap_err();
        assert!(e.contains("kiro fields"));
    }

    #[test]
    fn list_shape_and_export_fields() {
        let mut b = Batch::default();
        add_document(
            &mut b,
            &reg(),
            "f",
            json!({"auths": [
                {"id": "cred_1", "provider": "openai", "type": "api_key", "token": "k1",
                 "status": "active", "token_preview": "…", "quota": {"limit": null, "remaining": null,
                 "reserved": 0, "period_start": "x", "next_reset": null}, "created_at": "x"},
                {"provider": "openai", "token": 5}
            ]}),
            None,
        );
        assert_eq!(b.entries.len(), 1);
        assert_eq!(b.errors[0].source, "f[1]");
        assert!(
            b.errors[0].error.starts_with("token:"),
            "{}",
            b.errors[0].error
        );
    }

    #[test]
    fn oauth_identity_is_the_refresh_token() {
        let c = one(
            json!({"type": "oauth", "access_token": "a1", "refresh_token": "r1"}),
            Some("copilot"),
        )
        .unwrap();
        assert_eq!(c.identity().expose(), "r1");
        let c = one(json!({"type": "oauth"}), Some("copilot")).unwrap_err();
        assert!(c.contains("access_token or refresh_token"));
    }
}
