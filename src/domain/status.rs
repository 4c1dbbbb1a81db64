//! A credential's effective status: one pure function of what is stored about it and the
//! time, used by the list (`store/credentials.rs`), by selection and by the ledger's answer
//! for "nothing usable" (`store/ledger/hot.rs`), so that what the list calls `active` is
//! exactly what the request path may pick.
//!
//! The rule, first match wins: disabled by a user; marked invalid; expired (marked so, past
//! `expires_at`, or without an access token); exhausted (marked so while the mark holds, or
//! its counter at its limit); cooling down; else active. Only `active` credentials are
//! selected. An OAuth credential whose access token expired but which has a refresh token is
//! `expired` with the reason "awaiting refresh": a refresh brings it back.

use serde::{Deserialize, Serialize};

/// The effective status of a credential, as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Active,
    Cooldown,
    Exhausted,
    Expired,
    Invalid,
    Disabled,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Active,
        Status::Cooldown,
        Status::Exhausted,
        Status::Expired,
        Status::Invalid,
        Status::Disabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Cooldown => "cooldown",
            Status::Exhausted => "exhausted",
            Status::Expired => "expired",
            Status::Invalid => "invalid",
            Status::Disabled => "disabled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// The last mark a credential received, as stored (the `state` column). A cooldown is not a
/// state: it is a date of its own (`cooldown_until`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredState {
    Active,
    /// Rejected by the provider.
    Invalid,
    /// Its token expired and no refresh brought a new one.
    Expired,
    /// Out of credit or quota: until `exhausted_until` when the provider named a date, else
    /// until the next reset.
    Exhausted,
}

impl StoredState {
    pub fn as_str(self) -> &'static str {
        match self {
            StoredState::Active => "active",
            StoredState::Invalid => "invalid",
            StoredState::Expired => "expired",
            StoredState::Exhausted => "exhausted",
        }
    }

    /// The state a stored text names. The schema admits only these four; anything else
    /// (a database edited by hand) reads as invalid, so it is never selected.
    pub fn parse(s: &str) -> StoredState {
        match s {
            "active" => StoredState::Active,
            "expired" => StoredState::Expired,
            "exhausted" => StoredState::Exhausted,
            _ => StoredState::Invalid,
        }
    }
}

/// What the rule reads of a stored credential. Times are unix seconds, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State<'a> {
    pub disabled: bool,
    pub stored: StoredState,
    /// Why the last mark was made, in the provider's words, when a mark gave one.
    pub state_reason: Option<&'a str>,
    /// When the access token (or the key) stops being valid.
    pub expires_at: Option<i64>,
    pub has_refresh_token: bool,
    /// Whether there is an access token (or key) at all: copilot's comes with the first
    /// refresh.
    pub has_token: bool,
    pub exhausted_until: Option<i64>,
    pub cooldown_until: Option<i64>,
    pub limit: Option<i64>,
    pub used: i64,
}

/// Why a credential has its status: the rule's answer before it is put in words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    Disabled,
    Invalid,
    /// Marked expired (its token expired and a refresh did not bring a new one).
    MarkedExpired,
    /// No valid access token, but a refresh token to get one.
    AwaitingRefresh,
    /// No valid token, and nothing to refresh it with.
    TokenExpired,
    /// Marked exhausted, and the mark holds.
    MarkedExhausted,
    /// The counter is at its limit.
    LimitReached,
    Cooldown,
    Active,
}

impl Cause {
    pub fn status(self) -> Status {
        match self {
            Cause::Disabled => Status::Disabled,
            Cause::Invalid => Status::Invalid,
            Cause::MarkedExpired | Cause::AwaitingRefresh | Cause::TokenExpired => Status::Expired,
            Cause::MarkedExhausted | Cause::LimitReached => Status::Exhausted,
            Cause::Cooldown => Status::Cooldown,
            Cause::Active => Status::Active,
        }
    }
}

impl State<'_> {
    /// Marked exhausted, and the mark still holds at `now`: without a date until a reset,
    /// with one until that date.
    pub fn marked_exhausted(&self, now: i64) -> bool {
        self.stored == StoredState::Exhausted && self.exhausted_until.is_none_or(|u| u > now)
    }

    /// The rule (see the module's documentation), without words: cheap enough for every
    /// candidate the request path looks at.
    pub fn cause(&self, now: i64) -> Cause {
        if self.disabled {
            Cause::Disabled
        } else if self.stored == StoredState::Invalid {
            Cause::Invalid
        } else if self.stored == StoredState::Expired {
            Cause::MarkedExpired
        } else if !self.has_token || self.expires_at.is_some_and(|e| e <= now) {
            if self.has_refresh_token {
                Cause::AwaitingRefresh
            } else {
                Cause::TokenExpired
            }
        } else if self.marked_exhausted(now) {
            Cause::MarkedExhausted
        } else if self.limit.is_some_and(|l| self.used >= l) {
            Cause::LimitReached
        } else if self.cooldown_until.is_some_and(|c| c > now) {
            Cause::Cooldown
        } else {
            Cause::Active
        }
    }

    /// The effective status at `now`.
    pub fn status(&self, now: i64) -> Status {
        self.cause(now).status()
    }
}

/// The effective status at `now` and why, as the list shows them (`status_reason`): the
/// provider's words for a mark that holds, else a sentence of ours; none when active.
pub fn effective(state: &State, now: i64) -> (Status, Option<String>) {
    let cause = state.cause(now);
    let stored = |default: &str| Some(state.state_reason.unwrap_or(default).to_string());
    let limit = || {
        state
            .limit
            .map(|l| format!("used {} of its {l} tokens this period", state.used))
    };
    let reason = match cause {
        Cause::Active => None,
        Cause::Disabled => Some("disabled by a user".to_string()),
        Cause::Invalid => stored("rejected by the provider"),
        Cause::MarkedExpired => stored("token expired"),
        Cause::AwaitingRefresh => Some("awaiting refresh".to_string()),
        Cause::TokenExpired => Some("token expired".to_string()),
        Cause::MarkedExhausted => state.state_reason.map(str::to_string).or_else(limit),
        Cause::LimitReached => limit(),
        Cause::Cooldown => stored("rate-limited by the provider"),
    };
    (cause.status(), reason)
}

#[cfg(test)]
mod tests;
