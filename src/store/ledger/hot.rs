//! The ledger's in-memory mirror of the counters and usable credentials: what a group decides
//! on, so that picking a credential is a cursor step rather than a query.

use super::super::reservation::{ReservationKind, Unavailable};
use crate::config::SelectionStrategy;
use crate::crypto::Secret;
use crate::domain::status::{State, Status, StoredState};
use crate::quota::ResetSchedule;
use crate::selection;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Arc;

/// The most a counter holds ([`crate::quota::MAX_COUNTER_TOKENS`]), as the mirror's integers.
pub(super) const MAX_COUNTER: i64 = crate::quota::MAX_COUNTER_TOKENS as i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HotCred {
    pub(super) seq: i64,
    pub(super) priority: i64,
    pub(super) limit: Option<i64>,
    pub(super) used: i64,
    pub(super) reserved: i64,
    /// Reserved by leases (held until reported).
    pub(super) leased: i64,
    pub(super) disabled: bool,
    pub(super) state: StoredState,
    pub(super) expires_at: Option<i64>,
    pub(super) has_refresh_token: bool,
    pub(super) cooldown_until: Option<i64>,
    /// Until when an `exhausted` state holds, when the provider named a date.
    pub(super) exhausted_until: Option<i64>,
    pub(super) has_token: bool,
    pub(super) period_start: i64,
    /// An OAuth credential, whose `expires_at` is its access token's own expiry (a lease
    /// names it); an API key's never is.
    pub(super) oauth: bool,
}

impl HotCred {
    /// Its access token's expiry: an OAuth credential's `expires_at`, never an API key's.
    pub(super) fn token_expires_at(&self) -> Option<DateTime<Utc>> {
        self.expires_at
            .filter(|_| self.oauth)
            .map(crate::domain::from_unix)
    }

    /// An active, unlimited credential with a token, created `seq`th at `priority`, at rest
    /// (no reservation, no mark): what the ledger's tests build their mirrors from.
    #[cfg(test)]
    pub(super) fn at_rest(seq: i64, priority: i64) -> HotCred {
        HotCred {
            seq,
            priority,
            limit: None,
            used: 0,
            reserved: 0,
            leased: 0,
            disabled: false,
            state: StoredState::Active,
            expires_at: None,
            has_refresh_token: false,
            cooldown_until: None,
            exhausted_until: None,
            has_token: true,
            period_start: 0,
            oauth: false,
        }
    }

    /// What the status rule reads of the credential (the mirror keeps no reasons: selection
    /// needs none).
    pub(super) fn state(&self) -> State<'static> {
        State {
            disabled: self.disabled,
            stored: self.state,
            state_reason: None,
            expires_at: self.expires_at,
            has_refresh_token: self.has_refresh_token,
            has_token: self.has_token,
            exhausted_until: self.exhausted_until,
            cooldown_until: self.cooldown_until,
            limit: self.limit,
            used: self.used,
        }
    }

    /// Whether the request path may pick it at `now`: the status rule says `active`.
    pub(super) fn usable(&self, now: i64) -> bool {
        self.state().status(now) == Status::Active
    }

    /// Whether `tokens` more fit under the limit beside what is used and reserved. Saturating:
    /// counters and reservations are bounded where they come in, but a sum that would pass
    /// `i64::MAX` must still read as "no room", never wrap to room.
    pub(super) fn has_room(&self, tokens: i64) -> bool {
        // A sum past `i64::MAX` is never room, limited or not, so `reserved` stays exact.
        let total = self
            .used
            .checked_add(self.reserved)
            .and_then(|t| t.checked_add(tokens.max(0)));
        match (total, self.limit) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(total), Some(l)) => total <= l,
        }
    }

    /// Room left under the limit (`u64::MAX` when unlimited), for quota_aware.
    pub(super) fn room(&self) -> u64 {
        self.limit.map_or(u64::MAX, |l| {
            l.saturating_sub(self.used)
                .saturating_sub(self.reserved)
                .max(0) as u64
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HotRes {
    pub(super) credential_id: String,
    pub(super) provider: String,
    pub(super) tokens: i64,
    pub(super) kind: ReservationKind,
    /// When an unreported lease is settled at its reservation (unix seconds).
    pub(super) expires_at: Option<i64>,
    /// When its current term began (unix seconds): its creation, or a lease's last renewal,
    /// so that `expires_at - created_at` stays the lease's length.
    pub(super) created_at: i64,
}

/// A provider's credentials in selection order, with the round-robin cursors.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct ProviderList {
    /// Ids by creation order.
    pub(super) by_seq: Vec<String>,
    /// Ids by (priority, creation).
    pub(super) by_priority: Vec<String>,
    /// The priority of each entry of `by_priority`.
    pub(super) levels: Vec<i64>,
    pub(super) rr_cursor: usize,
    /// Per priority level, the next position within that level.
    pub(super) level_cursors: HashMap<i64, usize>,
}

/// The in-memory mirror of what the request path decides on.
#[derive(Debug, Default)]
pub(in crate::store) struct Hot {
    pub(super) creds: HashMap<String, HotCred>,
    pub(super) lists: HashMap<String, ProviderList>,
    pub(super) reservations: HashMap<String, HotRes>,
    /// Opened tokens with the sealed value they came from: opened when the mirror is loaded
    /// or follows a write (`mirror.rs`), and kept while the stored value is unchanged.
    /// Shared, not copied: a request holds the `Arc` while it sends the token.
    pub(in crate::store) tokens: HashMap<String, (Vec<u8>, Arc<Secret>)>,
    /// copilot credentials' API bases (`extra.api_base`), for those that have one: the
    /// request path sends their calls there unless the config names a base URL.
    pub(in crate::store) api_bases: HashMap<String, Arc<str>>,
    /// Leases that went with their credential when it was deleted, with their expiry, so a
    /// renewal can say why (`deleted`) rather than not knowing the lease. Kept while this
    /// server runs, at most [`GONE_LEASES`] of them.
    pub(super) gone_leases: HashMap<String, i64>,
}

/// Most leases of deleted credentials remembered (`Hot::gone_leases`).
pub(super) const GONE_LEASES: usize = 4096;

impl Hot {
    /// Remember the lease `id` (expiring at `expires_at`) as gone with its deleted credential;
    /// past [`GONE_LEASES`], the half that expire first are forgotten.
    pub(super) fn remember_gone_lease(&mut self, id: String, expires_at: i64) {
        if self.gone_leases.len() >= GONE_LEASES {
            let mut ends: Vec<i64> = self.gone_leases.values().copied().collect();
            let (_, median, _) = ends.select_nth_unstable(GONE_LEASES / 2);
            let median = *median;
            self.gone_leases.retain(|_, e| *e > median);
        }
        self.gone_leases.insert(id, expires_at);
    }

    /// The access-token expiry of credential `id` (an OAuth credential's `expires_at`).
    pub(in crate::store) fn token_expires_at(&self, id: &str) -> Option<DateTime<Utc>> {
        self.creds.get(id)?.token_expires_at()
    }

    /// Pick a usable credential with room for `tokens`, not in `exclude`.
    pub(super) fn pick(
        &mut self,
        provider: &str,
        tokens: i64,
        strategy: SelectionStrategy,
        exclude: &[String],
        now: i64,
    ) -> Option<String> {
        let creds = &self.creds;
        let list = self.lists.get_mut(provider)?;
        let ok = |id: &String| {
            !exclude.contains(id)
                && creds
                    .get(id)
                    .is_some_and(|c| c.usable(now) && c.has_room(tokens))
        };
        match strategy {
            SelectionStrategy::RoundRobin => {
                let (i, next) =
                    selection::rotate(list.by_seq.len(), list.rr_cursor, |i| ok(&list.by_seq[i]))?;
                list.rr_cursor = next;
                Some(list.by_seq[i].clone())
            }
            SelectionStrategy::Priority => {
                let i = selection::by_priority(&list.levels, &mut list.level_cursors, |i| {
                    ok(&list.by_priority[i])
                })?;
                Some(list.by_priority[i].clone())
            }
            SelectionStrategy::QuotaAware => {
                let rooms = list
                    .by_seq
                    .iter()
                    .map(|id| ok(id).then(|| creds[id].room()));
                selection::most_room(rooms).map(|i| list.by_seq[i].clone())
            }
        }
    }

    /// Why nothing could be picked.
    pub(super) fn why(
        &self,
        provider: &str,
        tokens: i64,
        exclude: &[String],
        now: i64,
        schedule: &ResetSchedule,
    ) -> Unavailable {
        let Some(list) = self.lists.get(provider).filter(|l| !l.by_seq.is_empty()) else {
            return Unavailable::NoCredentials;
        };
        let mut earliest: Option<i64> = None;
        let mut in_flight = false;
        // Some credential is out of room until a reset that its schedule never brings.
        let mut for_good = false;
        let mut lease_ends: Option<HashMap<&str, i64>> = None;
        let mut consider = |at: i64| earliest = Some(earliest.map_or(at, |e| e.min(at)));
        for id in &list.by_seq {
            let c = &self.creds[id];
            let state = c.state();
            let status = state.status(now);
            // Out until a user, an import or a refresh brings it back: no wait names an end.
            if matches!(status, Status::Disabled | Status::Invalid | Status::Expired)
                || exclude.contains(id)
            {
                continue;
            }
            let next_reset = || {
                schedule
                    .next_reset(crate::domain::from_unix(c.period_start))
                    .map(|t| t.timestamp())
            };
            let tokens = tokens.max(0);
            let over_limit = c
                .limit
                .is_some_and(|l| c.used >= l || c.used.saturating_add(tokens) > l);
            let marked = state.marked_exhausted(now);
            if over_limit || marked {
                // No reservation's end makes room: a mark with a date ends at that date, and
                // anything else only with a reset (a mark with a date on a credential also
                // over its limit, at whichever comes later).
                let until = c.exhausted_until.filter(|_| marked);
                let back = if over_limit || until.is_none() {
                    next_reset().map(|at| until.map_or(at, |u| u.max(at)))
                } else {
                    until
                };
                match back {
                    Some(at) => consider(at),
                    None => for_good = true,
                }
                continue;
            }
            if let (Status::Cooldown, Some(until)) = (status, c.cooldown_until) {
                consider(until);
                continue;
            }
            // The room is held by reservations. Those of requests end within the request
            // timeout, so a request may wait for them; leases last until reported or expired
            // (minutes), so when they are what holds the room, the answer names their end.
            let freed_by_requests = c
                .limit
                .is_none_or(|l| c.used.saturating_add(c.leased).saturating_add(tokens) <= l);
            if freed_by_requests {
                in_flight = true;
                consider(now.saturating_add(1));
            } else {
                // Built once per answer, and only when leases hold some credential's room.
                let ends = lease_ends.get_or_insert_with(|| self.first_lease_ends());
                let end = ends.get(id.as_str()).copied().unwrap_or(now);
                consider(end.max(now.saturating_add(1)));
            }
        }
        match earliest {
            Some(at) => Unavailable::Busy {
                retry_after: at.saturating_sub(now).max(1) as u64,
                in_flight,
            },
            None if for_good => Unavailable::Exhausted,
            None => Unavailable::Unusable,
        }
    }

    /// When the first lease of each credential that has one expires (unix seconds): one pass
    /// over the reservations.
    fn first_lease_ends(&self) -> HashMap<&str, i64> {
        let mut ends: HashMap<&str, i64> = HashMap::new();
        for r in self.reservations.values() {
            if let Some(at) = r.expires_at {
                ends.entry(r.credential_id.as_str())
                    .and_modify(|e| *e = (*e).min(at))
                    .or_insert(at);
            }
        }
        ends
    }
}

#[cfg(test)]
mod tests;
