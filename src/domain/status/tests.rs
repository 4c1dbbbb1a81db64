//! The status rule over every case it names, at the edges of its dates, and over every
//! combination of the stored fields (the order of the rule, and what each status implies).

use super::*;

const NOW: i64 = 1_800_000_000;

/// An active API key: nothing marked, no dates, unlimited.
fn fine() -> State<'static> {
    State {
        disabled: false,
        stored: StoredState::Active,
        state_reason: None,
        expires_at: None,
        has_refresh_token: false,
        has_token: true,
        exhausted_until: None,
        cooldown_until: None,
        limit: None,
        used: 0,
    }
}

fn at(state: State, now: i64) -> (Status, Option<String>) {
    effective(&state, now)
}

fn some(s: &str) -> Option<String> {
    Some(s.to_string())
}

#[test]
fn each_case_and_its_reason() {
    let reason = Some("the provider's words");
    let cases: Vec<(&str, State, Status, Option<String>)> = vec![
        ("active", fine(), Status::Active, None),
        (
            "a future expiry",
            State {
                expires_at: Some(NOW + 1),
                ..fine()
            },
            Status::Active,
            None,
        ),
        (
            "disabled",
            State {
                disabled: true,
                ..fine()
            },
            Status::Disabled,
            some("disabled by a user"),
        ),
        (
            "invalid, with the provider's words",
            State {
                stored: StoredState::Invalid,
                state_reason: reason,
                ..fine()
            },
            Status::Invalid,
            some("the provider's words"),
        ),
        (
            "invalid, without",
            State {
                stored: StoredState::Invalid,
                ..fine()
            },
            Status::Invalid,
            some("rejected by the provider"),
        ),
        (
            "marked expired",
            State {
                stored: StoredState::Expired,
                has_refresh_token: true,
                ..fine()
            },
            Status::Expired,
            some("token expired"),
        ),
        (
            "marked expired, with the provider's words",
            State {
                stored: StoredState::Expired,
                state_reason: reason,
                ..fine()
            },
            Status::Expired,
            some("the provider's words"),
        ),
        (
            "past its expiry, with a refresh token",
            State {
                expires_at: Some(NOW - 1),
                has_refresh_token: true,
                ..fine()
            },
            Status::Expired,
            some("awaiting refresh"),
        ),
        (
            "past its expiry, without a refresh token",
            State {
                expires_at: Some(NOW - 1),
                ..fine()
            },
            Status::Expired,
            some("token expired"),
        ),
        (
            "no access token yet, with a refresh token",
            State {
                has_token: false,
                has_refresh_token: true,
                ..fine()
            },
            Status::Expired,
            some("awaiting refresh"),
        ),
        (
            "exhausted without a date",
            State {
                stored: StoredState::Exhausted,
                state_reason: reason,
                exhausted_until: None,
                ..fine()
            },
            Status::Exhausted,
            some("the provider's words"),
        ),
        (
            "exhausted until a date ahead",
            State {
                stored: StoredState::Exhausted,
                state_reason: reason,
                exhausted_until: Some(NOW + 1),
                ..fine()
            },
            Status::Exhausted,
            some("the provider's words"),
        ),
        (
            "exhausted until a date past",
            State {
                stored: StoredState::Exhausted,
                state_reason: reason,
                exhausted_until: Some(NOW - 1),
                ..fine()
            },
            Status::Active,
            None,
        ),
        (
            "exhausted without words, with a limit",
            State {
                stored: StoredState::Exhausted,
                limit: Some(100),
                used: 40,
                ..fine()
            },
            Status::Exhausted,
            some("used 40 of its 100 tokens this period"),
        ),
        (
            "exhausted without words or a limit",
            State {
                stored: StoredState::Exhausted,
                ..fine()
            },
            Status::Exhausted,
            None,
        ),
        (
            "limit reached",
            State {
                limit: Some(100),
                used: 100,
                ..fine()
            },
            Status::Exhausted,
            some("used 100 of its 100 tokens this period"),
        ),
        (
            "limit reached, the words of an earlier cooldown not shown",
            State {
                limit: Some(10),
                used: 12,
                state_reason: reason,
                ..fine()
            },
            Status::Exhausted,
            some("used 12 of its 10 tokens this period"),
        ),
        (
            "under the limit",
            State {
                limit: Some(100),
                used: 99,
                ..fine()
            },
            Status::Active,
            None,
        ),
        (
            "cooling down, with the provider's words",
            State {
                cooldown_until: Some(NOW + 30),
                state_reason: reason,
                ..fine()
            },
            Status::Cooldown,
            some("the provider's words"),
        ),
        (
            "cooling down, without",
            State {
                cooldown_until: Some(NOW + 30),
                ..fine()
            },
            Status::Cooldown,
            some("rate-limited by the provider"),
        ),
        (
            "a cooldown past",
            State {
                cooldown_until: Some(NOW - 30),
                state_reason: reason,
                ..fine()
            },
            Status::Active,
            None,
        ),
    ];
    for (name, state, status, reason) in cases {
        assert_eq!(at(state, NOW), (status, reason), "{name}");
        assert_eq!(state.status(NOW), status, "{name}");
    }
}

/// A date is the first second it no longer holds: an expiry at `now` has expired, an exhausted
/// mark or a cooldown until `now` is over.
#[test]
fn dates_end_at_their_second() {
    let expiring = State {
        expires_at: Some(NOW),
        ..fine()
    };
    assert_eq!(expiring.status(NOW - 1), Status::Active);
    assert_eq!(expiring.status(NOW), Status::Expired);
    let exhausted = State {
        stored: StoredState::Exhausted,
        exhausted_until: Some(NOW),
        ..fine()
    };
    assert_eq!(exhausted.status(NOW - 1), Status::Exhausted);
    assert_eq!(exhausted.status(NOW), Status::Active);
    assert!(exhausted.marked_exhausted(NOW - 1));
    assert!(!exhausted.marked_exhausted(NOW));
    let cooling = State {
        cooldown_until: Some(NOW),
        ..fine()
    };
    assert_eq!(cooling.status(NOW - 1), Status::Cooldown);
    assert_eq!(cooling.status(NOW), Status::Active);
}

/// Every combination of the stored fields (a date absent, past or ahead; a limit absent,
/// under or reached): the first cause in the rule's order wins, only a credential clear of
/// every cause is active, and only an active one has no reason.
#[test]
fn every_combination_follows_the_order() {
    let dates = [None, Some(NOW - 10), Some(NOW + 10)];
    let states = [
        StoredState::Active,
        StoredState::Invalid,
        StoredState::Expired,
        StoredState::Exhausted,
    ];
    let mut seen = std::collections::HashSet::new();
    let mut n = 0;
    for disabled in [false, true] {
        for stored in states {
            for expires_at in dates {
                for has_refresh_token in [false, true] {
                    for has_token in [false, true] {
                        for exhausted_until in dates {
                            for cooldown_until in dates {
                                for (limit, used) in [(None, 5), (Some(10), 5), (Some(10), 10)] {
                                    let state = State {
                                        disabled,
                                        stored,
                                        state_reason: None,
                                        expires_at,
                                        has_refresh_token,
                                        has_token,
                                        exhausted_until,
                                        cooldown_until,
                                        limit,
                                        used,
                                    };
                                    let (status, reason) = effective(&state, NOW);
                                    n += 1;
                                    seen.insert(state.cause(NOW));
                                    let expired = stored == StoredState::Expired
                                        || !has_token
                                        || expires_at.is_some_and(|e| e <= NOW);
                                    let exhausted = (stored == StoredState::Exhausted
                                        && exhausted_until.is_none_or(|u| u > NOW))
                                        || limit.is_some_and(|l| used >= l);
                                    let cooling = cooldown_until.is_some_and(|c| c > NOW);
                                    let want = if disabled {
                                        Status::Disabled
                                    } else if stored == StoredState::Invalid {
                                        Status::Invalid
                                    } else if expired {
                                        Status::Expired
                                    } else if exhausted {
                                        Status::Exhausted
                                    } else if cooling {
                                        Status::Cooldown
                                    } else {
                                        Status::Active
                                    };
                                    assert_eq!(status, want, "{state:?}");
                                    assert_eq!(
                                        reason.is_none(),
                                        status == Status::Active
                                            || (status == Status::Exhausted && limit.is_none()),
                                        "{state:?}: {reason:?}"
                                    );
                                    if status == Status::Expired {
                                        let refreshable =
                                            stored != StoredState::Expired && has_refresh_token;
                                        assert_eq!(
                                            reason.as_deref() == Some("awaiting refresh"),
                                            refreshable,
                                            "{state:?}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert_eq!(n, 2 * 4 * 3 * 2 * 2 * 3 * 3 * 3);
    assert_eq!(seen.len(), 9, "every cause is reached: {seen:?}");
}

#[test]
fn stored_states_read_back_and_unknown_text_is_never_selected() {
    for s in [
        StoredState::Active,
        StoredState::Invalid,
        StoredState::Expired,
        StoredState::Exhausted,
    ] {
        assert_eq!(StoredState::parse(s.as_str()), s);
    }
    assert_eq!(StoredState::parse("cooldown"), StoredState::Invalid);
    for s in Status::ALL {
        assert_eq!(Status::parse(s.as_str()), Some(s));
    }
}
