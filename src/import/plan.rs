//! What an import does, decided over a [`Snapshot`] of what the store holds for the batch:
//! which entries create a credential, which update one in place, which are left alone, and
//! what the report says about each. Pure: the store reads the snapshot and applies the
//! [`Plan`] in the same write transaction, so any backend applies the same decisions.
//!
//! The rules (README, "Credential files (`auths/`)", "How import behaves"):
//! - a credential is known by its fingerprint (provider and identifying secret); of several
//!   entries with the same fingerprint the first wins (sorted path order for files, entry order
//!   for a body), and each later one is skipped with a notice naming both sources: two sources
//!   applied in turn would undo each other's settings at every import, and overwrite what was
//!   changed through the API;
//! - an entry of a known credential whose content digest is that of the credential's last
//!   import is unchanged and skipped, leaving what was changed through the API alone; any other
//!   is an update in place;
//! - an entry of a credential deleted through the API (a tombstone) is skipped with a notice
//!   when it comes from files, and lifts the tombstone when it is posted (an explicit add);
//! - anything else creates a credential.

use super::{Entry, ImportError};
use serde::Serialize;
use std::collections::HashMap;

/// Where a batch came from, which decides what a tombstone means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportMode {
    /// Files in `auth_dir` (at start, `cliproxyapi import`, or a rescan): a credential deleted
    /// through the API stays deleted.
    Files,
    /// Credentials posted to the import endpoint: an explicit add, which lifts a tombstone.
    Body,
}

/// Something worth telling about an entry that was not an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Notice {
    pub source: String,
    pub notice: String,
}

/// The import report (README, "Management API", bulk import; `cliproxyapi import` prints it),
/// with the ids of the credentials each source made or changed for the auth log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    pub imported: usize,
    pub updated: usize,
    pub skipped: usize,
    pub errors: Vec<ImportError>,
    pub notices: Vec<Notice>,
    #[serde(skip)]
    pub changes: Vec<Change>,
}

/// A credential an import created or updated, for the auth log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub source: String,
    pub credential_id: String,
    pub provider: String,
    pub created: bool,
}

/// An entry with its keyed hashes under the current fingerprint key.
#[derive(Debug)]
pub struct Keyed {
    pub entry: Entry,
    /// Which credential it is (provider and identifying secret).
    pub fingerprint: Vec<u8>,
    /// Everything the entry says, to tell an unchanged entry from a changed one.
    pub digest: Vec<u8>,
}

/// A batch ready to plan: one entry per credential, and what was already found wrong with it.
#[derive(Debug)]
pub struct Prepared {
    pub entries: Vec<Keyed>,
    duplicates: Vec<Notice>,
    errors: Vec<ImportError>,
}

impl Prepared {
    /// Keep the first entry of each fingerprint, in batch order; each later one becomes a
    /// notice naming the source that wins. `errors` (sources that could not be read) are
    /// carried into the report.
    pub fn new(entries: Vec<Keyed>, errors: Vec<ImportError>) -> Prepared {
        let mut first: HashMap<Vec<u8>, String> = HashMap::with_capacity(entries.len());
        let mut kept = Vec::with_capacity(entries.len());
        let mut duplicates = Vec::new();
        for keyed in entries {
            match first.get(&keyed.fingerprint) {
                Some(winner) => duplicates.push(Notice {
                    notice: format!(
                        "duplicate: the same credential (provider and token) as {winner}, which comes first and wins; this entry is ignored"
                    ),
                    source: keyed.entry.source,
                }),
                None => {
                    first.insert(keyed.fingerprint.clone(), keyed.entry.source.clone());
                    kept.push(keyed);
                }
            }
        }
        Prepared {
            entries: kept,
            duplicates,
            errors,
        }
    }

    /// The fingerprints the snapshot must cover, one per entry.
    pub fn fingerprints(&self) -> impl Iterator<Item = &[u8]> {
        self.entries.iter().map(|k| k.fingerprint.as_slice())
    }
}

/// A credential the store holds, as an import sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub id: String,
    /// The digest of the entry it was last imported from; `None` when it never was (added
    /// through the API).
    pub import_digest: Option<Vec<u8>>,
}

/// What the store holds for a batch's fingerprints, read in the transaction that applies the
/// plan (or, for the read-only check that an import has nothing to write, outside any).
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Live credentials by fingerprint.
    pub credentials: HashMap<Vec<u8>, Known>,
    /// Tombstones by fingerprint: the id of the credential that was deleted. Needed only for
    /// fingerprints without a live credential, which decides alone.
    pub tombstones: HashMap<Vec<u8>, String>,
}

/// One write of a plan, in batch order.
#[derive(Debug)]
pub enum Action<'a> {
    /// Insert a credential (and its counter); first delete its tombstone when `lift_tombstone`.
    Create {
        keyed: &'a Keyed,
        source: String,
        lift_tombstone: bool,
    },
    /// Replace credential `id`'s secrets and settings (never its live counters).
    Update {
        keyed: &'a Keyed,
        id: String,
        source: String,
    },
}

impl Action<'_> {
    pub fn keyed(&self) -> &Keyed {
        match self {
            Action::Create { keyed, .. } | Action::Update { keyed, .. } => keyed,
        }
    }

    /// The `source` the credential row keeps: the file, or `import:api` for a posted body.
    pub fn source(&self) -> &str {
        match self {
            Action::Create { source, .. } | Action::Update { source, .. } => source,
        }
    }

    /// The audit log's action.
    pub fn audit_action(&self) -> &'static str {
        match self {
            Action::Create { .. } => "credential.import",
            Action::Update { .. } => "credential.import_update",
        }
    }

    /// The report's line for this action once applied to credential `id`.
    pub fn change(&self, id: &str) -> Change {
        let keyed = self.keyed();
        Change {
            source: keyed.entry.source.clone(),
            credential_id: id.to_string(),
            provider: keyed.entry.credential.provider.clone(),
            created: matches!(self, Action::Create { .. }),
        }
    }
}

/// What an import will do: its writes, and its report but for the changes, which the store
/// adds (with the new credentials' ids) as it applies the writes.
#[derive(Debug)]
pub struct Plan<'a> {
    pub actions: Vec<Action<'a>>,
    pub report: ImportReport,
}

impl Plan<'_> {
    /// Whether applying it writes nothing (every entry unchanged, or skipped), so the store
    /// need not take the write lock at all.
    pub fn writes_nothing(&self) -> bool {
        self.actions.is_empty()
    }
}

/// Decide what importing `prepared` in `mode` does over `snapshot`.
pub fn plan<'a>(prepared: &'a Prepared, snapshot: &Snapshot, mode: ImportMode) -> Plan<'a> {
    let mut report = ImportReport {
        errors: prepared.errors.clone(),
        skipped: prepared.duplicates.len(),
        notices: prepared.duplicates.clone(),
        ..Default::default()
    };
    let mut actions = Vec::new();
    for keyed in &prepared.entries {
        let source = match mode {
            ImportMode::Files => keyed.entry.source.clone(),
            ImportMode::Body => "import:api".to_string(),
        };
        if let Some(known) = snapshot.credentials.get(&keyed.fingerprint) {
            if known.import_digest.as_deref() == Some(keyed.digest.as_slice()) {
                report.skipped += 1;
            } else {
                report.updated += 1;
                actions.push(Action::Update {
                    keyed,
                    id: known.id.clone(),
                    source,
                });
            }
            continue;
        }
        let tombstone = snapshot.tombstones.get(&keyed.fingerprint);
        if let (Some(old_id), ImportMode::Files) = (tombstone, mode) {
            report.skipped += 1;
            report.notices.push(Notice {
                source: keyed.entry.source.clone(),
                notice: format!(
                    "{old_id} was deleted through the management API and is not imported again; add it through the API to restore it"
                ),
            });
            continue;
        }
        report.imported += 1;
        actions.push(Action::Create {
            keyed,
            source,
            lift_tombstone: tombstone.is_some(),
        });
    }
    Plan { actions, report }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Registry;
    use serde_json::json;
    use std::collections::BTreeMap;

    /// Entries `(source, token)` of provider openai, keyed by their token (fingerprint) and
    /// `digest`.
    fn batch(entries: &[(&str, &str, &str)]) -> Vec<Keyed> {
        let registry = Registry::from_config(&BTreeMap::new());
        entries
            .iter()
            .map(|(source, token, digest)| {
                let mut b = super::super::read_body(
                    &registry,
                    json!({"provider": "openai", "token": token}),
                );
                let mut entry = b.entries.pop().expect("a valid entry");
                entry.source = source.to_string();
                Keyed {
                    entry,
                    fingerprint: token.as_bytes().to_vec(),
                    digest: digest.as_bytes().to_vec(),
                }
            })
            .collect()
    }

    fn known(entries: &[(&str, &str, Option<&str>)]) -> HashMap<Vec<u8>, Known> {
        entries
            .iter()
            .map(|(token, id, digest)| {
                (
                    token.as_bytes().to_vec(),
                    Known {
                        id: id.to_string(),
                        import_digest: digest.map(|d| d.as_bytes().to_vec()),
                    },
                )
            })
            .collect()
    }

    fn tombstones(entries: &[(&str, &str)]) -> HashMap<Vec<u8>, String> {
        entries
            .iter()
            .map(|(token, id)| (token.as_bytes().to_vec(), id.to_string()))
            .collect()
    }

    /// Each action as (kind, source of the entry, stored source, id or lifted tombstone).
    fn summary(plan: &Plan) -> Vec<(&'static str, String, String, String)> {
        plan.actions
            .iter()
            .map(|a| match a {
                Action::Create {
                    keyed,
                    source,
                    lift_tombstone,
                } => (
                    "create",
                    keyed.entry.source.clone(),
                    source.clone(),
                    if *lift_tombstone { "lift" } else { "" }.to_string(),
                ),
                Action::Update { keyed, id, source } => (
                    "update",
                    keyed.entry.source.clone(),
                    source.clone(),
                    id.clone(),
                ),
            })
            .collect()
    }

    fn counts(report: &ImportReport) -> (usize, usize, usize) {
        (report.imported, report.updated, report.skipped)
    }

    #[test]
    fn new_entries_create_in_batch_order() {
        let prepared = Prepared::new(batch(&[("f:b", "kb", "d"), ("f:a", "ka", "d")]), vec![]);
        let plan = plan(&prepared, &Snapshot::default(), ImportMode::Files);
        assert_eq!(
            summary(&plan),
            [
                ("create", "f:b".into(), "f:b".into(), String::new()),
                ("create", "f:a".into(), "f:a".into(), String::new()),
            ]
        );
        assert_eq!(counts(&plan.report), (2, 0, 0));
        assert!(plan.report.notices.is_empty() && plan.report.changes.is_empty());
        assert!(!plan.writes_nothing());
    }

    #[test]
    fn unchanged_entries_are_skipped_and_changed_ones_update_in_place() {
        let prepared = Prepared::new(
            batch(&[
                ("f:1", "k1", "same"),
                ("f:2", "k2", "new"),
                ("f:3", "k3", "d"),
            ]),
            vec![],
        );
        let snapshot = Snapshot {
            // k3 was added through the API: never imported, so any entry of it is a change.
            credentials: known(&[
                ("k1", "cred_1", Some("same")),
                ("k2", "cred_2", Some("old")),
                ("k3", "cred_3", None),
            ]),
            ..Default::default()
        };
        let plan = plan(&prepared, &snapshot, ImportMode::Files);
        assert_eq!(
            summary(&plan),
            [
                ("update", "f:2".into(), "f:2".into(), "cred_2".into()),
                ("update", "f:3".into(), "f:3".into(), "cred_3".into()),
            ]
        );
        assert_eq!(counts(&plan.report), (0, 2, 1));
        assert_eq!(plan.actions[0].audit_action(), "credential.import_update");
    }

    #[test]
    fn everything_unchanged_writes_nothing() {
        let prepared = Prepared::new(batch(&[("f:1", "k1", "d1"), ("f:2", "k2", "d2")]), vec![]);
        let snapshot = Snapshot {
            credentials: known(&[("k1", "cred_1", Some("d1")), ("k2", "cred_2", Some("d2"))]),
            ..Default::default()
        };
        let plan = plan(&prepared, &snapshot, ImportMode::Files);
        assert!(plan.writes_nothing());
        assert_eq!(counts(&plan.report), (0, 0, 2));
        // An empty batch too.
        let empty = Prepared::new(vec![], vec![]);
        assert!(super::plan(&empty, &Snapshot::default(), ImportMode::Body).writes_nothing());
    }

    #[test]
    fn a_tombstone_keeps_files_out_with_a_notice() {
        let prepared = Prepared::new(batch(&[("f:1", "k1", "d"), ("f:2", "k2", "d")]), vec![]);
        let snapshot = Snapshot {
            tombstones: tombstones(&[("k1", "cred_gone")]),
            ..Default::default()
        };
        let plan = plan(&prepared, &snapshot, ImportMode::Files);
        assert_eq!(
            summary(&plan),
            [("create", "f:2".into(), "f:2".into(), String::new())]
        );
        assert_eq!(counts(&plan.report), (1, 0, 1));
        assert_eq!(plan.report.notices.len(), 1);
        assert_eq!(plan.report.notices[0].source, "f:1");
        assert!(
            plan.report.notices[0]
                .notice
                .starts_with("cred_gone was deleted through the management API"),
            "{:?}",
            plan.report.notices
        );
    }

    #[test]
    fn a_posted_body_lifts_the_tombstone_and_is_stored_as_import_api() {
        let prepared = Prepared::new(
            batch(&[("body[0]", "k1", "d"), ("body[1]", "k2", "d")]),
            vec![],
        );
        let snapshot = Snapshot {
            credentials: known(&[("k2", "cred_2", Some("old"))]),
            tombstones: tombstones(&[("k1", "cred_gone")]),
        };
        let plan = plan(&prepared, &snapshot, ImportMode::Body);
        assert_eq!(
            summary(&plan),
            [
                (
                    "create",
                    "body[0]".into(),
                    "import:api".into(),
                    "lift".into()
                ),
                (
                    "update",
                    "body[1]".into(),
                    "import:api".into(),
                    "cred_2".into()
                ),
            ]
        );
        assert_eq!(counts(&plan.report), (1, 1, 0));
        assert!(plan.report.notices.is_empty());
        // The report names the entry's own source, the row keeps `import:api`.
        let change = plan.actions[0].change("cred_new");
        assert_eq!(
            change,
            Change {
                source: "body[0]".into(),
                credential_id: "cred_new".into(),
                provider: "openai".into(),
                created: true,
            }
        );
        assert_eq!(plan.actions[0].source(), "import:api");
        assert_eq!(plan.actions[0].audit_action(), "credential.import");
    }

    #[test]
    fn a_live_credential_decides_over_a_tombstone() {
        let prepared = Prepared::new(batch(&[("f:1", "k1", "d")]), vec![]);
        let snapshot = Snapshot {
            credentials: known(&[("k1", "cred_1", Some("d"))]),
            tombstones: tombstones(&[("k1", "cred_old")]),
        };
        for mode in [ImportMode::Files, ImportMode::Body] {
            let plan = plan(&prepared, &snapshot, mode);
            assert!(plan.writes_nothing(), "{mode:?}");
            assert_eq!(counts(&plan.report), (0, 0, 1));
            assert!(plan.report.notices.is_empty());
        }
    }

    #[test]
    fn the_first_entry_of_a_credential_wins_and_the_others_are_notices() {
        let prepared = Prepared::new(
            batch(&[
                ("f:a", "k1", "d1"),
                ("f:b", "k2", "d"),
                ("f:c", "k1", "d2"),
                ("f:d", "k1", "d3"),
            ]),
            vec![ImportError {
                source: "f:e".into(),
                error: "invalid JSON".into(),
            }],
        );
        assert_eq!(prepared.fingerprints().count(), 2);
        let snapshot = Snapshot {
            credentials: known(&[("k1", "cred_1", Some("d1"))]),
            ..Default::default()
        };
        let plan = plan(&prepared, &snapshot, ImportMode::Files);
        assert_eq!(
            summary(&plan),
            [("create", "f:b".into(), "f:b".into(), String::new())]
        );
        // Two duplicates and one unchanged entry skipped; the error carried.
        assert_eq!(counts(&plan.report), (1, 0, 3));
        assert_eq!(plan.report.errors.len(), 1);
        let notices: Vec<(&str, &str)> = plan
            .report
            .notices
            .iter()
            .map(|n| (n.source.as_str(), n.notice.as_str()))
            .collect();
        assert_eq!(notices.len(), 2);
        for (n, source) in notices.iter().zip(["f:c", "f:d"]) {
            assert_eq!(n.0, source);
            assert!(
                n.1.starts_with("duplicate: the same credential (provider and token) as f:a,"),
                "{}",
                n.1
            );
        }
    }

    #[test]
    fn duplicate_notices_come_before_tombstone_notices() {
        let prepared = Prepared::new(batch(&[("f:a", "k1", "d"), ("f:b", "k1", "d")]), vec![]);
        let snapshot = Snapshot {
            tombstones: tombstones(&[("k1", "cred_gone")]),
            ..Default::default()
        };
        let plan = plan(&prepared, &snapshot, ImportMode::Files);
        let sources: Vec<&str> = plan
            .report
            .notices
            .iter()
            .map(|n| n.source.as_str())
            .collect();
        assert_eq!(sources, ["f:b", "f:a"]);
        assert_eq!(counts(&plan.report), (0, 0, 2));
        assert!(plan.writes_nothing());
    }
}
