//! The mirror a management write leaves, following only what the write touched, is the one a
//! whole load of the database would make from the mirror before the write (cursors carried the
//! same way), field by field: after random sequences of adds, updates, deletes, quota changes
//! and imports, with reservations and leases taken, settled and released between them.

use super::{difference, snapshot};
use crate::config::SelectionStrategy;
use crate::crypto::{Encryption, Secret};
use crate::domain::Usage;
use crate::domain::{CredentialId, CredentialKind, NewCredential, OauthExtra, ProviderName};
use crate::import::{Batch, Entry};
use crate::store::{
    CredentialPatch, ImportMode, Mark, QuotaPatch, ReservationKind, ReserveRequest, Store,
    StoreOptions,
};
use chrono::{DateTime, Utc};
use proptest::prelude::*;

const PROVIDERS: [&str; 3] = ["openai", "claude", "gemini"];

#[derive(Debug, Clone)]
enum Step {
    Add {
        provider: usize,
        token: u8,
        priority: i64,
        limit: Option<u64>,
    },
    Update {
        pick: usize,
        priority: Option<i64>,
        disabled: Option<bool>,
        token: Option<u8>,
        expired: Option<bool>,
    },
    Delete {
        pick: usize,
    },
    Quota {
        provider: usize,
        pick: Option<usize>,
        limit: Option<Option<u64>>,
        used: Option<u64>,
        reset: bool,
    },
    Import {
        entries: Vec<(usize, u8, i64, Option<u64>)>,
        dry_run: bool,
        files: bool,
    },
    Reserve {
        provider: usize,
        tokens: u64,
        strategy: SelectionStrategy,
        lease: bool,
    },
    Settle {
        pick: usize,
        used: u64,
    },
    Release {
        pick: usize,
        mark: u8,
    },
}

/// Few priorities, so levels are shared, and the ends of the range.
fn priority() -> impl Strategy<Value = i64> {
    prop_oneof![0i64..3, Just(-1_000_000), Just(1_000_000)]
}

fn limit() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![Just(None), Just(Some(0)), (1u64..5000).prop_map(Some)]
}

fn strategy() -> impl Strategy<Value = SelectionStrategy> {
    prop_oneof![
        Just(SelectionStrategy::RoundRobin),
        Just(SelectionStrategy::Priority),
        Just(SelectionStrategy::QuotaAware),
    ]
}

fn import_provider() -> impl Strategy<Value = usize> {
    prop_oneof![4 => Just(0), 1 => 1..PROVIDERS.len()]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..PROVIDERS.len(), 0u8..24, priority(), limit()).prop_map(
            |(provider, token, priority, limit)| Step::Add { provider, token, priority, limit }
        ),
        3 => (
            any::<usize>(),
            proptest::option::of(priority()),
            proptest::option::of(any::<bool>()),
            proptest::option::weighted(0.2, 0u8..24),
            proptest::option::weighted(0.2, any::<bool>()),
        )
            .prop_map(|(pick, priority, disabled, token, expired)| Step::Update {
                pick,
                priority,
                disabled,
                token,
                expired,
            }),
        2 => any::<usize>().prop_map(|pick| Step::Delete { pick }),
        2 => (
            0..PROVIDERS.len(),
            proptest::option::of(any::<usize>()),
            proptest::option::of(limit()),
            proptest::option::of(0u64..5000),
            any::<bool>(),
        )
            .prop_map(|(provider, pick, limit, used, reset)| Step::Quota {
                provider,
                pick,
                limit,
                used,
                reset,
            }),
        // Up to 60 entries, most of one provider, so that its lists are often sorted again
        // whole (more than `FEW` changed) rather than changed in place.
        1 => (
            prop::collection::vec((import_provider(), 0u8..64, priority(), limit()), 0..60),
            proptest::bool::weighted(0.2),
            any::<bool>(),
        )
            .prop_map(|(entries, dry_run, files)| Step::Import { entries, dry_run, files }),
        4 => (0..PROVIDERS.len(), 1u64..3000, strategy(), any::<bool>()).prop_map(
            |(provider, tokens, strategy, lease)| Step::Reserve { provider, tokens, strategy, lease }
        ),
        2 => (any::<usize>(), 0u64..3000).prop_map(|(pick, used)| Step::Settle { pick, used }),
        2 => (any::<usize>(), 0u8..6).prop_map(|(pick, mark)| Step::Release { pick, mark }),
    ]
}

fn credential(provider: usize, token: u8, priority: i64, limit: Option<u64>) -> NewCredential {
    let provider = PROVIDERS[provider];
    NewCredential {
        provider: provider.to_string(),
        kind: CredentialKind::ApiKey,
        token: Some(Secret::new(format!("sk-mirror-{provider}-{token:03}"))),
        refresh_token: None,
        client_secret: None,
        extra: OauthExtra::default(),
        priority,
        label: Some(format!("t{token}")),
        // None names no limit: the provider's default (which `Quota` steps set) applies.
        limit: limit.map(Some),
        used: 0,
        disabled: false,
        expires_at: None,
    }
}

/// The ids the mirror holds, in a stable order to pick from.
fn ids(store: &Store) -> Vec<String> {
    let hot = store.hot.lock().unwrap();
    let mut ids: Vec<String> = hot.creds.keys().cloned().collect();
    ids.sort();
    ids
}

async fn open(dir: &std::path::Path) -> Store {
    Store::open(StoreOptions {
        path: dir.join("mirror.db"),
        encryption: Encryption::off(),
        schedules: Default::default(),
        default_limits: Default::default(),
        read_connections: 2,
    })
    .await
    .unwrap()
}

/// Run `steps`; after each, the mirror must equal a whole load.
async fn run(steps: Vec<Step>) {
    // On tmpfs where there is one: every write syncs, and the disk's syncs would make each
    // case take seconds.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .unwrap();
    let store = open(dir.path()).await;
    let now: DateTime<Utc> = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    let mut live: Vec<String> = Vec::new();
    for (n, step) in steps.iter().enumerate() {
        let before = snapshot(&store.hot);
        let management = apply(&store, step, now, &mut live).await;
        // A management write is compared with a whole load carrying the cursors from before
        // it; a ledger operation moves cursors itself, so its own result is the reference.
        let reference = if management {
            before
        } else {
            snapshot(&store.hot)
        };
        if let Some(d) = difference(&store.writer, &store.sealer, &store.hot, &reference)
            .await
            .unwrap()
        {
            panic!("after step {n} ({step:?}): {d}");
        }
    }
    store.close().await;
}

/// Apply one step; whether it was a management write.
async fn apply(store: &Store, step: &Step, now: DateTime<Utc>, live: &mut Vec<String>) -> bool {
    let pick = |ids: &[String], i: usize| (!ids.is_empty()).then(|| ids[i % ids.len()].clone());
    match step {
        Step::Add {
            provider,
            token,
            priority,
            limit,
        } => {
            let new = credential(*provider, *token, *priority, *limit);
            // A duplicate is refused before anything is written.
            let _ = store.add(&new, "api", "test", now).await;
            true
        }
        Step::Update {
            pick: i,
            priority,
            disabled,
            token,
            expired,
        } => {
            let Some(id) = pick(&ids(store), *i) else {
                return true;
            };
            let patch = CredentialPatch {
                token: token.map(|t| Secret::new(format!("sk-mirror-new-{t:03}"))),
                priority: *priority,
                disabled: *disabled,
                expires_at: expired.map(|e| e.then(|| now - chrono::Duration::hours(1))),
                ..Default::default()
            };
            let _ = store.update(&id.into(), &patch, "test", now).await;
            true
        }
        Step::Delete { pick: i } => {
            if let Some(id) = pick(&ids(store), *i) {
                store.delete(&id.into(), "test", now).await.unwrap();
            }
            true
        }
        Step::Quota {
            provider,
            pick: i,
            limit,
            used,
            reset,
        } => {
            let provider = ProviderName::from(PROVIDERS[*provider]);
            let id = i.and_then(|i| pick(&ids(store), i)).map(CredentialId::from);
            let patch = QuotaPatch {
                limit: *limit,
                used: *used,
                reset: *reset,
            };
            // An id of another provider is not found, before anything is written.
            let _ = store
                .set_quota(&provider, id.as_ref(), &patch, "test", now)
                .await;
            true
        }
        Step::Import {
            entries,
            dry_run,
            files,
        } => {
            let batch = Batch {
                entries: entries
                    .iter()
                    .enumerate()
                    .map(|(n, (provider, token, priority, limit))| Entry {
                        source: format!("file:auths/{n:02}.json"),
                        credential: credential(*provider, *token, *priority, *limit),
                    })
                    .collect(),
                ..Default::default()
            };
            let mode = if *files {
                ImportMode::Files
            } else {
                ImportMode::Body
            };
            store
                .import(batch, mode, "test", *dry_run, now)
                .await
                .unwrap();
            true
        }
        Step::Reserve {
            provider,
            tokens,
            strategy,
            lease,
        } => {
            let req = ReserveRequest {
                provider: &PROVIDERS[*provider].into(),
                tokens: *tokens,
                strategy: *strategy,
                exclude: &[],
                kind: if *lease {
                    ReservationKind::Lease
                } else {
                    ReservationKind::Request
                },
                expires_at: lease.then(|| now + chrono::Duration::minutes(10)),
            };
            if let Ok(r) = store.reserve(&req, now).await.unwrap() {
                live.push(r.id.into_string());
            }
            false
        }
        Step::Settle { pick: i, used } => {
            if !live.is_empty() {
                let id = live.swap_remove(i % live.len());
                let usage = Usage {
                    input: *used / 2,
                    output: *used - *used / 2,
                };
                // Its credential may be gone, and the reservation with it.
                store.settle(&id.into(), usage, false, now).await.unwrap();
            }
            false
        }
        Step::Release { pick: i, mark } => {
            if !live.is_empty() {
                let id = live.swap_remove(i % live.len());
                let mark = match mark {
                    0 => None,
                    1 => Some(Mark::Cooldown {
                        until: now + chrono::Duration::seconds(60),
                        reason: "test".into(),
                    }),
                    2 => Some(Mark::Exhausted {
                        reason: "test".into(),
                        until: None,
                    }),
                    // A date ahead, and one already past (usable again at once).
                    3 => Some(Mark::Exhausted {
                        reason: "test".into(),
                        until: Some(now + chrono::Duration::seconds(60)),
                    }),
                    4 => Some(Mark::Exhausted {
                        reason: "test".into(),
                        until: Some(now - chrono::Duration::seconds(60)),
                    }),
                    _ => Some(Mark::Invalid("test".into())),
                };
                store.release(&id.into(), mark.as_ref(), now).await.unwrap();
            }
            false
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_mirror_follows_writes_as_a_whole_load_would(steps in prop::collection::vec(step(), 1..60)) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(steps));
    }
}

/// A cursor stays on the credential it last picked while others come and go before it, in
/// both the way of filling the mirror: the next pick is the one after it.
#[test]
fn round_robin_goes_on_after_the_last_pick_whatever_comes_and_goes() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path()).await;
            let now: DateTime<Utc> = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
            let mut ids = Vec::new();
            for t in 0..6 {
                let row = store
                    .add(&credential(0, t, 1, None), "api", "test", now)
                    .await
                    .unwrap();
                ids.push(row.id);
            }
            let pick = || async {
                let req = ReserveRequest {
                    provider: &PROVIDERS[0].into(),
                    tokens: 1,
                    strategy: SelectionStrategy::RoundRobin,
                    exclude: &[],
                    kind: ReservationKind::Request,
                    expires_at: None,
                };
                let r = store.reserve(&req, now).await.unwrap().unwrap();
                store.release(&r.id, None, now).await.unwrap();
                r.credential_id
            };
            for id in &ids[..3] {
                assert_eq!(&pick().await, id);
            }
            // The last picked (2) and one before it (0) deleted, one added at the end: the next
            // is 3, then 4, 5, the new one, and round again from 1.
            store.delete(&ids[2], "test", now).await.unwrap();
            store.delete(&ids[0], "test", now).await.unwrap();
            let added = store
                .add(&credential(0, 9, 1, None), "api", "test", now)
                .await
                .unwrap()
                .id;
            let expected = [&ids[3], &ids[4], &ids[5], &added, &ids[1], &ids[3]];
            for id in expected {
                assert_eq!(&pick().await, id);
            }
            // The same after a whole load.
            super::load(&store.writer, &store.sealer, &store.hot)
                .await
                .unwrap();
            for id in [&ids[4], &ids[5], &added, &ids[1]] {
                assert_eq!(&pick().await, id);
            }
            store.close().await;
        });
}
