//! Filling the ledger's mirror (`hot.rs`) from the database: whole at start and after a failed
//! group, and for a management write only the credentials it touched.
//!
//! A whole load reads every credential and opens every token: 1.7 s with 100,000 credentials,
//! all of it with the request path stopped (the gate's write side). A management write names
//! what it touched ([`Touched`]); those rows alone are read again and put in place, each
//! provider's ordered lists changed by binary-search inserts and removals (or re-sorted when
//! many changed), so the mirror comes out the same as a whole load would make it, cursors
//! included. Round-robin cursors are carried by the credential each last picked, which keeps its
//! creation number (`seq`) while others come, go or move: both ways of filling the mirror
//! carry them so, and a test checks the two agree.

use super::hot::{Hot, HotCred, HotRes, MAX_COUNTER, ProviderList};
use crate::crypto::{Field, Sealer, Secret};
use crate::domain::status::StoredState;
use crate::store::Result;
use crate::store::reservation::ReservationKind;
use sqlx::SqlitePool;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;

/// Past this many credentials changed in one provider, its lists are sorted again rather than
/// changed one credential at a time (each insert or removal moves the rest of a list).
const FEW: usize = 16;

/// A write that touched at least this many credentials, and more than half as many as the
/// mirror holds (a first import), loads it whole instead: one scan in creation order, rather
/// than a lookup per credential, to the same mirror.
pub(in crate::store) const MANY: usize = 1000;

/// What a management write changed of what the mirror holds (see `Store::exclusive`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::store) enum Touched {
    /// Nothing the mirror holds: a dry run, an import that changed nothing.
    Nothing,
    /// These credentials: added, changed (row, counter or reservations) or deleted.
    Credentials(Vec<String>),
    /// Every credential of this provider (a quota change for all of them).
    Provider(String),
    /// More than is worth naming (start-up, key rotation): the mirror is loaded again whole.
    Everything,
}

impl Touched {
    pub(in crate::store) fn credential(id: &str) -> Touched {
        Touched::Credentials(vec![id.to_string()])
    }
}

/// A credential as the mirror reads it.
struct MirrorRow {
    id: String,
    provider: String,
    seq: i64,
    priority: i64,
    disabled: bool,
    state: String,
    expires_at: Option<i64>,
    cooldown_until: Option<i64>,
    exhausted_until: Option<i64>,
    token_sealed: Option<Vec<u8>>,
    has_refresh_token: bool,
    limit_tokens: Option<i64>,
    used: i64,
    period_start: i64,
    oauth: bool,
    /// copilot's `extra.api_base` (read for copilot rows only).
    api_base: Option<String>,
}

/// A reservation as the mirror reads it.
struct ReservationRow {
    id: String,
    credential_id: String,
    provider: String,
    tokens: i64,
    kind: String,
    expires_at: Option<i64>,
    created_at: i64,
}

/// The mirror's credential rows; `$rest` (a string literal) ends the statement.
macro_rules! credential_rows {
    ($rest:tt $(, $arg:expr)*) => {
        sqlx::query_as!(
            MirrorRow,
            r#"SELECT c.id, c.provider, c.seq, c.priority, c.disabled AS "disabled!: bool",
                      c.state, c.expires_at, c.cooldown_until, c.exhausted_until,
                      c.token_sealed,
                      (c.refresh_token_sealed IS NOT NULL) AS "has_refresh_token!: bool",
                      q.limit_tokens, q.used, q.period_start,
                      (c.kind = 'oauth') AS "oauth!: bool",
                      CASE WHEN c.provider = 'copilot'
                           THEN json_extract(c.extra, '$.api_base') END AS "api_base?: String"
               FROM credentials c JOIN quotas q ON q.credential_id = c.id "# + $rest
            $(, $arg)*
        )
    };
}

/// The mirror's reservation rows; `$rest` (a string literal) ends the statement.
macro_rules! reservation_rows {
    ($rest:tt $(, $arg:expr)*) => {
        sqlx::query_as!(
            ReservationRow,
            "SELECT id, credential_id, provider, tokens, kind, expires_at, created_at
             FROM reservations "
                + $rest
            $(, $arg)*
        )
    };
}

impl HotCred {
    /// The counters as stored, read within the counter bound so that an edited database cannot
    /// make a sum wrap; nothing reserved yet (`hold` adds the reservations).
    fn from_row(r: &MirrorRow) -> HotCred {
        HotCred {
            seq: r.seq,
            priority: r.priority,
            limit: r.limit_tokens.map(|l| l.clamp(0, MAX_COUNTER)),
            used: r.used.clamp(0, MAX_COUNTER),
            reserved: 0,
            leased: 0,
            disabled: r.disabled,
            state: StoredState::parse(&r.state),
            expires_at: r.expires_at,
            has_refresh_token: r.has_refresh_token,
            cooldown_until: r.cooldown_until,
            exhausted_until: r.exhausted_until,
            has_token: r.token_sealed.is_some(),
            period_start: r.period_start,
            oauth: r.oauth,
        }
    }

    fn hold(&mut self, r: &HotRes) {
        self.reserved = self.reserved.saturating_add(r.tokens);
        if r.kind == ReservationKind::Lease {
            self.leased = self.leased.saturating_add(r.tokens);
        }
    }
}

impl From<ReservationRow> for HotRes {
    fn from(r: ReservationRow) -> HotRes {
        HotRes {
            credential_id: r.credential_id,
            provider: r.provider,
            // Rows are written bounded; read bounded too.
            tokens: r.tokens.clamp(0, MAX_COUNTER),
            kind: if r.kind == "lease" {
                ReservationKind::Lease
            } else {
                ReservationKind::Request
            },
            expires_at: r.expires_at,
            created_at: r.created_at,
        }
    }
}

/// Where a list's round-robin cursors stand, as the creation number of the credential each
/// last picked (`None`: nothing picked yet), so they can be put back after the list changed.
struct Marks {
    rr: Option<i64>,
    levels: Vec<(i64, Option<i64>)>,
}

/// The first index in `0..len` for which `before` is false (`before` is true, then false).
fn lower_bound(len: usize, before: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, len);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if before(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

impl ProviderList {
    /// The positions of `level` in `by_priority`.
    fn run(&self, level: i64) -> std::ops::Range<usize> {
        self.levels.partition_point(|l| *l < level)..self.levels.partition_point(|l| *l <= level)
    }

    /// The marks of the round-robin cursor and of the cursors of `levels` (those that have one).
    fn marks(
        &self,
        levels: impl IntoIterator<Item = i64>,
        seq_of: impl Fn(&str) -> Option<i64>,
    ) -> Marks {
        // A cursor is the position after the last pick (taken modulo the length by `rotate`).
        let last = |ids: &[String], cursor: usize| {
            (cursor > 0 && !ids.is_empty())
                .then(|| seq_of(&ids[(cursor - 1) % ids.len()]))
                .flatten()
        };
        Marks {
            rr: last(&self.by_seq, self.rr_cursor),
            levels: levels
                .into_iter()
                .filter_map(|level| {
                    let cursor = *self.level_cursors.get(&level)?;
                    Some((level, last(&self.by_priority[self.run(level)], cursor)))
                })
                .collect(),
        }
    }

    /// Put the cursors back after the marked credentials (or where they would be, if gone); a
    /// level left empty loses its cursor.
    fn restore(&mut self, marks: &Marks, seq_of: impl Fn(&str) -> Option<i64>) {
        let after = |ids: &[String], mark: Option<i64>| {
            mark.map_or(0, |s| {
                ids.partition_point(|id| seq_of(id).is_some_and(|seq| seq <= s))
            })
        };
        self.rr_cursor = after(&self.by_seq, marks.rr);
        for (level, mark) in &marks.levels {
            let run = self.run(*level);
            if run.is_empty() {
                self.level_cursors.remove(level);
            } else {
                let cursor = after(&self.by_priority[run], *mark);
                self.level_cursors.insert(*level, cursor);
            }
        }
    }

    /// Sort `by_seq` by creation, then `by_priority` (and `levels`) from it: by priority, then
    /// creation. Keys are looked up once per credential, not at every comparison.
    pub(in crate::store::ledger) fn sort(&mut self, creds: &HashMap<String, HotCred>) {
        let key = |id: &String| {
            creds
                .get(id)
                .map_or((i64::MAX, i64::MAX), |c| (c.priority, c.seq))
        };
        let mut keyed: Vec<((i64, i64), String)> =
            self.by_seq.drain(..).map(|id| (key(&id), id)).collect();
        // Stable, and nearly free on rows that come in creation order already.
        keyed.sort_by_key(|(k, _)| k.1);
        self.by_seq = keyed.iter().map(|(_, id)| id.clone()).collect();
        keyed.sort_by_key(|(k, _)| *k);
        self.levels = keyed.iter().map(|(k, _)| k.0).collect();
        self.by_priority = keyed.into_iter().map(|(_, id)| id).collect();
    }

    /// Where (priority, seq) goes in `by_priority`.
    fn priority_slot(&self, at: (i64, i64), seq_of: &impl Fn(&str) -> Option<i64>) -> usize {
        lower_bound(self.by_priority.len(), |i| {
            (
                self.levels[i],
                seq_of(&self.by_priority[i]).unwrap_or(i64::MIN),
            ) < at
        })
    }

    /// Take `id` out of `by_seq`; false when it is not where its `seq` says.
    fn remove_by_seq(&mut self, id: &str, seq: i64, seq_of: &impl Fn(&str) -> Option<i64>) -> bool {
        let i = self
            .by_seq
            .partition_point(|x| seq_of(x).unwrap_or(i64::MIN) < seq);
        if self.by_seq.get(i).is_none_or(|x| x != id) {
            return false;
        }
        self.by_seq.remove(i);
        true
    }

    /// Take `id` out of `by_priority`; false when it is not where (priority, seq) says.
    fn remove_by_priority(
        &mut self,
        id: &str,
        at: (i64, i64),
        seq_of: &impl Fn(&str) -> Option<i64>,
    ) -> bool {
        let i = self.priority_slot(at, seq_of);
        if self.by_priority.get(i).is_none_or(|x| x != id) {
            return false;
        }
        self.by_priority.remove(i);
        self.levels.remove(i);
        true
    }

    fn insert_by_seq(&mut self, id: &str, seq: i64, seq_of: &impl Fn(&str) -> Option<i64>) {
        let i = self
            .by_seq
            .partition_point(|x| seq_of(x).unwrap_or(i64::MIN) < seq);
        self.by_seq.insert(i, id.to_string());
    }

    fn insert_by_priority(
        &mut self,
        id: &str,
        at: (i64, i64),
        seq_of: &impl Fn(&str) -> Option<i64>,
    ) {
        let i = self.priority_slot(at, seq_of);
        self.by_priority.insert(i, id.to_string());
        self.levels.insert(i, at.0);
    }
}

/// Carry the cursors of `old_lists` (over `old_creds`) into `new`, a mirror of the same
/// database later, by the credentials they last picked.
fn carry_cursors(
    old_lists: &HashMap<String, ProviderList>,
    old_creds: &HashMap<String, HotCred>,
    new: &mut Hot,
) {
    let Hot { creds, lists, .. } = new;
    for (provider, list) in lists.iter_mut() {
        let Some(was) = old_lists.get(provider) else {
            continue;
        };
        let marks = was.marks(was.level_cursors.keys().copied(), |id| {
            old_creds.get(id).map(|c| c.seq)
        });
        list.restore(&marks, |id| creds.get(id).map(|c| c.seq));
    }
}

/// A whole mirror from the database's rows, without cursors; `token` keeps or opens each
/// stored token (`None`: it does not open, and `open_token` reports that on use).
fn build(
    rows: Vec<MirrorRow>,
    reservations: Vec<ReservationRow>,
    mut token: impl FnMut(&str, Vec<u8>) -> Option<(Vec<u8>, Arc<Secret>)>,
) -> Hot {
    let mut hot = Hot::default();
    for mut r in rows {
        let cred = HotCred::from_row(&r);
        if let Some(t) = r
            .token_sealed
            .take()
            .and_then(|sealed| token(&r.id, sealed))
        {
            hot.tokens.insert(r.id.clone(), t);
        }
        if let Some(base) = r.api_base.take() {
            hot.api_bases.insert(r.id.clone(), base.into());
        }
        hot.lists
            .entry(r.provider)
            .or_default()
            .by_seq
            .push(r.id.clone());
        hot.creds.insert(r.id, cred);
    }
    for r in reservations {
        let id = r.id.clone();
        let res = HotRes::from(r);
        if let Some(c) = hot.creds.get_mut(&res.credential_id) {
            c.hold(&res);
        }
        hot.reservations.insert(id, res);
    }
    let Hot { creds, lists, .. } = &mut hot;
    for list in lists.values_mut() {
        list.sort(creds);
    }
    hot
}

/// Load the mirror whole (under the gate's write side: at start, by the ledger after a failed
/// group, or for a write that touched too much to name). Tokens are opened here, and kept
/// across loads while their stored value is unchanged.
#[tracing::instrument(skip_all)]
pub(in crate::store) async fn load(
    writer: &SqlitePool,
    sealer: &Sealer,
    mirror: &Mutex<Hot>,
) -> Result<()> {
    let rows = credential_rows!("ORDER BY c.seq").fetch_all(writer).await?;
    let reservations = reservation_rows!("").fetch_all(writer).await?;
    let mut kept = std::mem::take(&mut mirror.lock().unwrap_or_else(|p| p.into_inner()).tokens);
    let mut hot = build(rows, reservations, |id, sealed| match kept.remove(id) {
        Some((was, secret)) if was == sealed => Some((was, secret)),
        _ => open(sealer, id, sealed),
    });
    let mut current = mirror.lock().unwrap_or_else(|p| p.into_inner());
    carry_cursors(&current.lists, &current.creds, &mut hot);
    hot.gone_leases = std::mem::take(&mut current.gone_leases);
    *current = hot;
    Ok(())
}

fn open(sealer: &Sealer, id: &str, sealed: Vec<u8>) -> Option<(Vec<u8>, Arc<Secret>)> {
    let secret = sealer.open(id, Field::Token, &sealed).ok()?;
    Some((sealed, Arc::new(secret)))
}

/// Make the mirror follow a management write (under the gate's write side, right after it).
/// Returns how many credentials it read again.
#[tracing::instrument(level = "debug", skip_all)]
pub(in crate::store) async fn follow(
    writer: &SqlitePool,
    sealer: &Sealer,
    mirror: &Mutex<Hot>,
    touched: &Touched,
) -> Result<usize> {
    let whole = || async {
        load(writer, sealer, mirror).await?;
        Ok(mirror.lock().unwrap_or_else(|p| p.into_inner()).creds.len())
    };
    let (rows, reservations) = match touched {
        Touched::Nothing => return Ok(0),
        Touched::Everything => return whole().await,
        Touched::Credentials(ids) => {
            let held = mirror.lock().unwrap_or_else(|p| p.into_inner()).creds.len();
            if ids.len() >= MANY && ids.len().saturating_mul(2) > held {
                return whole().await;
            }
            let ids = serde_json::to_string(ids).expect("strings serialize");
            let rows = credential_rows!("WHERE c.id IN (SELECT value FROM json_each(?1))", ids)
                .fetch_all(writer)
                .await?;
            let reservations = reservation_rows!(
                "WHERE credential_id IN (SELECT value FROM json_each(?1))",
                ids
            )
            .fetch_all(writer)
            .await?;
            (rows, reservations)
        }
        Touched::Provider(provider) => {
            let rows = credential_rows!("WHERE c.provider = ?1", provider)
                .fetch_all(writer)
                .await?;
            let reservations = reservation_rows!(
                "WHERE credential_id IN (SELECT id FROM credentials WHERE provider = ?1)",
                provider
            )
            .fetch_all(writer)
            .await?;
            (rows, reservations)
        }
    };
    let mut hot = mirror.lock().unwrap_or_else(|p| p.into_inner());
    // What the mirror held of the scope, and what the database now holds: a credential in the
    // first only was deleted.
    let mut ids: Vec<String> = match touched {
        Touched::Credentials(ids) => ids.clone(),
        Touched::Provider(p) => hot
            .lists
            .get(p)
            .map(|l| l.by_seq.clone())
            .unwrap_or_default(),
        Touched::Nothing | Touched::Everything => Vec::new(),
    };
    ids.extend(rows.iter().map(|r| r.id.clone()));
    ids.sort_unstable();
    ids.dedup();
    let read = rows.len();
    hot.replace(&ids, rows, reservations, sealer);
    Ok(read)
}

/// Where a credential sits in its provider's lists.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Place {
    provider: String,
    priority: i64,
    seq: i64,
}

impl Hot {
    /// The provider whose list holds `id` (found by its creation number, so a few binary
    /// searches rather than a scan).
    fn provider_of(&self, id: &str, seq: i64) -> Option<String> {
        self.lists.iter().find_map(|(provider, list)| {
            let i = list
                .by_seq
                .partition_point(|x| self.creds.get(x).map_or(i64::MIN, |c| c.seq) < seq);
            (list.by_seq.get(i).is_some_and(|x| x == id)).then(|| provider.clone())
        })
    }

    /// Replace what the mirror holds of the credentials `ids` by `rows` and `reservations`
    /// (theirs, as the database now holds them; an id without a row was deleted).
    fn replace(
        &mut self,
        ids: &[String],
        rows: Vec<MirrorRow>,
        reservations: Vec<ReservationRow>,
        sealer: &Sealer,
    ) {
        let mut rows: HashMap<String, MirrorRow> =
            rows.into_iter().map(|r| (r.id.clone(), r)).collect();
        // The credentials whose place in the lists changes, by provider.
        let mut moves: Vec<(&str, Option<Place>, Option<Place>)> = Vec::new();
        for id in ids {
            let row = rows.get(id);
            let before = self.creds.get(id).and_then(|c| {
                // A credential's provider never changes (its fingerprint is made with it), so
                // only a deleted one's is looked up.
                let provider = match row {
                    Some(r) => r.provider.clone(),
                    None => self.provider_of(id, c.seq)?,
                };
                Some(Place {
                    provider,
                    priority: c.priority,
                    seq: c.seq,
                })
            });
            let after = row.map(|r| Place {
                provider: r.provider.clone(),
                priority: r.priority,
                seq: r.seq,
            });
            if before != after {
                moves.push((id, before, after));
            }
        }
        let mut by_provider: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, (_, before, after)) in moves.iter().enumerate() {
            for place in [before, after].into_iter().flatten() {
                let list = by_provider.entry(place.provider.as_str()).or_default();
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
        }

        // Before the credentials change: the cursors' marks, and the few removals.
        let mut plans = Vec::with_capacity(by_provider.len());
        for (provider, changed) in by_provider {
            let creds = &self.creds;
            let seq_of = |id: &str| creds.get(id).map(|c| c.seq);
            let list = self.lists.entry(provider.to_string()).or_default();
            let here = |p: &Option<Place>| p.clone().filter(|p| p.provider == provider);
            let few = changed.len() <= FEW;
            let levels: Vec<i64> = if few {
                changed
                    .iter()
                    .flat_map(|&i| [here(&moves[i].1), here(&moves[i].2)])
                    .flatten()
                    .map(|p| p.priority)
                    .collect()
            } else {
                list.level_cursors.keys().copied().collect()
            };
            let marks = list.marks(levels, seq_of);
            let mut in_place = few;
            if few {
                for &i in &changed {
                    let (id, before, after) = (&moves[i].0, here(&moves[i].1), here(&moves[i].2));
                    let Some(b) = before else { continue };
                    let stays = after.as_ref();
                    if stays.map(|a| a.seq) != Some(b.seq) {
                        in_place &= list.remove_by_seq(id, b.seq, &seq_of);
                    }
                    if stays.map(|a| (a.priority, a.seq)) != Some((b.priority, b.seq)) {
                        in_place &= list.remove_by_priority(id, (b.priority, b.seq), &seq_of);
                    }
                }
            }
            plans.push((provider, changed, marks, in_place));
        }

        // The credentials themselves, their tokens and their reservations.
        let touched: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut gone = Vec::new();
        self.reservations.retain(|id, r| {
            let keep = !touched.contains(r.credential_id.as_str());
            // The lease went with its credential (the rows cascade): remembered for renewals.
            if !keep
                && !rows.contains_key(&r.credential_id)
                && let Some(at) = r.expires_at.filter(|_| r.kind == ReservationKind::Lease)
            {
                gone.push((id.clone(), at));
            }
            keep
        });
        for (id, at) in gone {
            self.remember_gone_lease(id, at);
        }
        for id in ids {
            match rows.remove(id) {
                Some(mut r) => {
                    self.creds.insert(id.clone(), HotCred::from_row(&r));
                    match r.api_base.take() {
                        Some(base) => self.api_bases.insert(id.clone(), base.into()),
                        None => self.api_bases.remove(id),
                    };
                    match r.token_sealed.take() {
                        Some(sealed)
                            if self.tokens.get(id).is_some_and(|(was, _)| *was == sealed) => {}
                        Some(sealed) => match open(sealer, id, sealed) {
                            Some(t) => {
                                self.tokens.insert(id.clone(), t);
                            }
                            None => {
                                self.tokens.remove(id);
                            }
                        },
                        None => {
                            self.tokens.remove(id);
                        }
                    }
                }
                None => {
                    self.creds.remove(id);
                    self.tokens.remove(id);
                    self.api_bases.remove(id);
                }
            }
        }
        for r in reservations {
            let id = r.id.clone();
            let res = HotRes::from(r);
            if let Some(c) = self.creds.get_mut(&res.credential_id) {
                c.hold(&res);
            }
            self.reservations.insert(id, res);
        }

        // After: the few inserts, or the lists sorted again; then the cursors back.
        for (provider, changed, marks, in_place) in plans {
            let creds = &self.creds;
            let seq_of = |id: &str| creds.get(id).map(|c| c.seq);
            let Some(list) = self.lists.get_mut(provider) else {
                continue;
            };
            let here = |p: &Option<Place>| p.clone().filter(|p| p.provider == provider);
            if in_place {
                for &i in &changed {
                    let (id, before, after) = (&moves[i].0, here(&moves[i].1), here(&moves[i].2));
                    let Some(a) = after else { continue };
                    let stayed = before.as_ref();
                    if stayed.map(|b| b.seq) != Some(a.seq) {
                        list.insert_by_seq(id, a.seq, &seq_of);
                    }
                    if stayed.map(|b| (b.priority, b.seq)) != Some((a.priority, a.seq)) {
                        list.insert_by_priority(id, (a.priority, a.seq), &seq_of);
                    }
                }
            } else {
                // Every changed credential out, those that belong here back in, then sorted.
                let moved: HashSet<&str> = changed.iter().map(|&i| moves[i].0).collect();
                list.by_seq.retain(|id| !moved.contains(id.as_str()));
                list.by_seq.extend(
                    changed
                        .iter()
                        .filter(|&&i| here(&moves[i].2).is_some())
                        .map(|&i| moves[i].0.to_string()),
                );
                list.sort(creds);
            }
            list.restore(&marks, seq_of);
            if list.by_seq.is_empty() {
                self.lists.remove(provider);
            }
        }
    }
}

/// The mirror's lists and credentials at one moment, to carry cursors from (see `difference`).
#[cfg(any(test, debug_assertions))]
pub(in crate::store) struct Snapshot {
    lists: HashMap<String, ProviderList>,
    creds: HashMap<String, HotCred>,
}

#[cfg(any(test, debug_assertions))]
pub(in crate::store) fn snapshot(mirror: &Mutex<Hot>) -> Snapshot {
    let hot = mirror.lock().unwrap_or_else(|p| p.into_inner());
    Snapshot {
        lists: hot.lists.clone(),
        creds: hot.creds.clone(),
    }
}

/// Whether the mirror differs from the one a whole load of the database now would make from
/// `before` (the mirror before a write, for its cursors), and how (ids and numbers only, never
/// a token). For checks: debug builds run it after every management write
/// (`Store::exclusive`), and a test after random sequences of writes.
#[cfg(any(test, debug_assertions))]
pub(in crate::store) async fn difference(
    writer: &SqlitePool,
    sealer: &Sealer,
    mirror: &Mutex<Hot>,
    before: &Snapshot,
) -> Result<Option<String>> {
    let rows = credential_rows!("ORDER BY c.seq").fetch_all(writer).await?;
    let reservations = reservation_rows!("").fetch_all(writer).await?;
    let mut whole = build(rows, reservations, |id, sealed| open(sealer, id, sealed));
    carry_cursors(&before.lists, &before.creds, &mut whole);
    let held = mirror.lock().unwrap_or_else(|p| p.into_inner());
    Ok(compare(&held, &whole))
}

/// The first difference between two mirrors, field by field.
#[cfg(any(test, debug_assertions))]
fn compare(held: &Hot, whole: &Hot) -> Option<String> {
    fn keys<V>(m: &HashMap<String, V>) -> std::collections::BTreeSet<&str> {
        m.keys().map(String::as_str).collect()
    }
    if keys(&held.creds) != keys(&whole.creds) {
        return Some(format!(
            "credentials: {:?} held, {:?} in the database",
            keys(&held.creds),
            keys(&whole.creds)
        ));
    }
    for (id, c) in &held.creds {
        if whole.creds[id] != *c {
            return Some(format!("{id}: {c:?} held, {:?} loaded", whole.creds[id]));
        }
    }
    if keys(&held.lists) != keys(&whole.lists) {
        return Some(format!(
            "providers: {:?} held, {:?} loaded",
            keys(&held.lists),
            keys(&whole.lists)
        ));
    }
    for (provider, l) in &held.lists {
        if whole.lists[provider] != *l {
            return Some(format!(
                "{provider}: {l:?} held, {:?} loaded",
                whole.lists[provider]
            ));
        }
    }
    if held.reservations.len() != whole.reservations.len()
        || held
            .reservations
            .iter()
            .any(|(id, r)| whole.reservations.get(id) != Some(r))
    {
        return Some(format!(
            "reservations: {:?} held, {:?} loaded",
            held.reservations, whole.reservations
        ));
    }
    let sealed = |m: &HashMap<String, (Vec<u8>, Arc<Secret>)>| -> BTreeMap<String, Vec<u8>> {
        m.iter()
            .map(|(id, (s, _))| (id.clone(), s.clone()))
            .collect()
    };
    if held.api_bases != whole.api_bases {
        return Some(format!(
            "API bases: {:?} held, {:?} loaded",
            held.api_bases, whole.api_bases
        ));
    }
    if sealed(&held.tokens) != sealed(&whole.tokens) {
        return Some(format!(
            "opened tokens: {:?} held, {:?} loaded",
            keys(&held.tokens),
            keys(&whole.tokens)
        ));
    }
    None
}

#[cfg(test)]
mod tests;
