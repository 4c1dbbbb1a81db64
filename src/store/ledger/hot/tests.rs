//! The mirror's decisions on their own, without a database: which credential each strategy
//! picks (creation order, priority levels, room; never an excluded one, never one the status
//! rule does not call active), how room counts what is used and reserved, and which answer
//! each way of having nothing to pick gets.

use super::*;

const P: &str = "openai";
/// 2027-01-15 08:00:00 UTC.
const NOW: i64 = 1_800_000_000;
/// The start of NOW's day, the period of a daily schedule.
const DAY: i64 = 1_799_971_200;
/// The next daily reset after NOW.
const MIDNIGHT: i64 = DAY + 86_400;

/// An active, unlimited credential created `seq`th at `priority`.
fn cred(seq: i64, priority: i64) -> HotCred {
    HotCred {
        period_start: DAY,
        ..HotCred::at_rest(seq, priority)
    }
}

fn id(seq: usize) -> String {
    format!("c{seq}")
}

/// A mirror of provider `P` holding `creds`, `c0`, `c1`, … in creation order, its lists as a
/// load makes them.
fn hot(creds: Vec<HotCred>) -> Hot {
    let mut hot = Hot::default();
    let mut list = ProviderList::default();
    for (i, c) in creds.into_iter().enumerate() {
        list.by_seq.push(id(i));
        hot.creds.insert(id(i), c);
    }
    list.sort(&hot.creds);
    hot.lists.insert(P.to_string(), list);
    hot
}

/// Hold `tokens` on credential `seq` by a reservation of `kind` (a lease ending at `ends`).
fn hold(hot: &mut Hot, seq: usize, tokens: i64, kind: ReservationKind, ends: Option<i64>) {
    let c = hot.creds.get_mut(&id(seq)).unwrap();
    c.reserved += tokens;
    if kind == ReservationKind::Lease {
        c.leased += tokens;
    }
    let n = hot.reservations.len();
    hot.reservations.insert(
        format!("res_{n}"),
        HotRes {
            credential_id: id(seq),
            provider: P.to_string(),
            tokens,
            kind,
            expires_at: ends,
            created_at: NOW,
        },
    );
}

fn picks(hot: &mut Hot, strategy: SelectionStrategy, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| hot.pick(P, 1, strategy, &[], NOW).unwrap_or_default())
        .collect()
}

fn why(hot: &Hot, tokens: i64, schedule: &ResetSchedule) -> Unavailable {
    hot.why(P, tokens, &[], NOW, schedule)
}

const STRATEGIES: [SelectionStrategy; 3] = [
    SelectionStrategy::RoundRobin,
    SelectionStrategy::Priority,
    SelectionStrategy::QuotaAware,
];

#[test]
fn round_robin_goes_round_in_creation_order_past_what_cannot_be_picked() {
    // Priorities do not matter to round-robin.
    let mut h = hot(vec![cred(0, 3), cred(1, 1), cred(2, 2)]);
    let rr = SelectionStrategy::RoundRobin;
    assert_eq!(picks(&mut h, rr, 4), ["c0", "c1", "c2", "c0"]);
    h.creds.get_mut("c2").unwrap().cooldown_until = Some(NOW + 60);
    assert_eq!(picks(&mut h, rr, 3), ["c1", "c0", "c1"]);
    // Usable again once its cooldown ends: the cursor goes on from the last pick.
    h.creds.get_mut("c2").unwrap().cooldown_until = Some(NOW);
    assert_eq!(picks(&mut h, rr, 3), ["c2", "c0", "c1"]);
}

#[test]
fn priority_drains_the_lowest_number_and_rotates_within_it() {
    let mut h = hot(vec![cred(0, 2), cred(1, 1), cred(2, 1), cred(3, 3)]);
    let pr = SelectionStrategy::Priority;
    assert_eq!(picks(&mut h, pr, 3), ["c1", "c2", "c1"]);
    // The level's credentials out: the next level, then the one after.
    h.creds.get_mut("c1").unwrap().disabled = true;
    h.creds.get_mut("c2").unwrap().state = StoredState::Invalid;
    assert_eq!(picks(&mut h, pr, 2), ["c0", "c0"]);
    let c0 = h.creds.get_mut("c0").unwrap();
    c0.limit = Some(10);
    c0.used = 10;
    assert_eq!(picks(&mut h, pr, 1), ["c3"]);
}

#[test]
fn quota_aware_takes_the_most_room_counting_reservations() {
    let mut h = hot(vec![cred(0, 1), cred(1, 1), cred(2, 1)]);
    let qa = SelectionStrategy::QuotaAware;
    for (seq, (limit, used)) in [(100, 50), (1000, 0), (1000, 0)].into_iter().enumerate() {
        let c = h.creds.get_mut(&id(seq)).unwrap();
        c.limit = Some(limit);
        c.used = used;
    }
    // Ties go to the earliest created.
    assert_eq!(picks(&mut h, qa, 2), ["c1", "c1"]);
    hold(&mut h, 1, 960, ReservationKind::Request, None);
    assert_eq!(picks(&mut h, qa, 1), ["c2"]);
    hold(&mut h, 2, 990, ReservationKind::Lease, Some(NOW + 600));
    assert_eq!(picks(&mut h, qa, 1), ["c0"], "50 left beats 40 and 10");
    // Unlimited is the most room of all.
    h.creds.get_mut("c0").unwrap().limit = None;
    assert_eq!(picks(&mut h, qa, 1), ["c0"]);
}

#[test]
fn an_excluded_credential_is_never_picked() {
    for strategy in STRATEGIES {
        let mut h = hot(vec![cred(0, 1), cred(1, 1), cred(2, 2)]);
        let exclude = [id(0), id(2)];
        for _ in 0..4 {
            assert_eq!(
                h.pick(P, 1, strategy, &exclude, NOW).as_deref(),
                Some("c1"),
                "{strategy:?}"
            );
        }
        let all = [id(0), id(1), id(2)];
        assert_eq!(h.pick(P, 1, strategy, &all, NOW), None, "{strategy:?}");
        assert_eq!(
            h.why(P, 1, &all, NOW, &ResetSchedule::Daily),
            Unavailable::Unusable
        );
    }
}

/// Every way a credential can be out, and a few ways it is back: picked exactly when the
/// status rule says `active`, by every strategy.
#[test]
fn only_what_the_status_rule_calls_active_is_picked() {
    type Change = fn(&mut HotCred);
    let cases: [(&str, Change, bool); 14] = [
        ("as is", |_| {}, true),
        ("disabled", |c| c.disabled = true, false),
        ("invalid", |c| c.state = StoredState::Invalid, false),
        ("marked expired", |c| c.state = StoredState::Expired, false),
        (
            "past its expiry, refreshable",
            |c| {
                c.expires_at = Some(NOW);
                c.has_refresh_token = true;
            },
            false,
        ),
        ("past its expiry", |c| c.expires_at = Some(NOW - 1), false),
        ("expiry ahead", |c| c.expires_at = Some(NOW + 1), true),
        ("no token", |c| c.has_token = false, false),
        ("exhausted", |c| c.state = StoredState::Exhausted, false),
        (
            "exhausted until a date ahead",
            |c| {
                c.state = StoredState::Exhausted;
                c.exhausted_until = Some(NOW + 1);
            },
            false,
        ),
        (
            "exhausted until a date past",
            |c| {
                c.state = StoredState::Exhausted;
                c.exhausted_until = Some(NOW);
            },
            true,
        ),
        (
            "limit reached",
            |c| {
                c.limit = Some(5);
                c.used = 5;
            },
            false,
        ),
        ("cooling", |c| c.cooldown_until = Some(NOW + 1), false),
        ("cooled", |c| c.cooldown_until = Some(NOW), true),
    ];
    for (name, change, picked) in cases {
        for strategy in STRATEGIES {
            let mut c = cred(0, 1);
            change(&mut c);
            assert_eq!(
                c.state().status(NOW) == Status::Active,
                picked,
                "{name}: the rule"
            );
            let mut h = hot(vec![c]);
            assert_eq!(
                h.pick(P, 1, strategy, &[], NOW).is_some(),
                picked,
                "{name}, {strategy:?}"
            );
        }
    }
}

#[test]
fn room_counts_used_and_reserved_and_never_wraps() {
    let mut c = cred(0, 1);
    c.limit = Some(100);
    c.used = 60;
    c.reserved = 30;
    assert!(c.has_room(10));
    assert!(!c.has_room(11));
    assert!(c.has_room(-5), "a negative ask is no tokens");
    assert_eq!(c.room(), 10);
    c.reserved = 50;
    assert_eq!(c.room(), 0, "over-reserved reads as no room, not negative");
    let mut u = cred(1, 1);
    assert_eq!(u.room(), u64::MAX);
    assert!(u.has_room(MAX_COUNTER));
    // Sums past i64::MAX are never room, limited or not.
    u.used = MAX_COUNTER;
    u.reserved = i64::MAX - MAX_COUNTER;
    assert!(u.has_room(0));
    assert!(!u.has_room(1));
    u.limit = Some(i64::MAX);
    assert!(!u.has_room(1));

    // A pick asks for room for its tokens: too big for one, the next is taken.
    let mut a = cred(0, 1);
    a.limit = Some(100);
    a.used = 60;
    let mut b = cred(1, 1);
    b.limit = Some(1000);
    let mut h = hot(vec![a, b]);
    for strategy in STRATEGIES {
        assert_eq!(
            h.pick(P, 41, strategy, &[], NOW).as_deref(),
            Some("c1"),
            "{strategy:?}"
        );
        assert_eq!(h.pick(P, 1001, strategy, &[], NOW), None, "{strategy:?}");
    }
}

#[test]
fn nothing_to_pick_says_why() {
    let never = ResetSchedule::Never;
    let daily = ResetSchedule::Daily;
    // No credentials at all: an unknown provider, or an emptied list.
    let h = hot(Vec::new());
    assert_eq!(why(&h, 1, &never), Unavailable::NoCredentials);
    assert_eq!(
        h.why("claude", 1, &[], NOW, &never),
        Unavailable::NoCredentials
    );

    // Out until a user, an import or a refresh brings them back.
    let mut out = [cred(0, 1), cred(1, 1), cred(2, 1), cred(3, 1)];
    out[0].disabled = true;
    out[1].state = StoredState::Invalid;
    out[2].expires_at = Some(NOW - 1);
    out[2].has_refresh_token = true;
    out[3].has_token = false;
    let h = hot(out.to_vec());
    assert_eq!(why(&h, 1, &daily), Unavailable::Unusable);

    // Out of quota for good when nothing resets it: at its limit, marked without a date, or
    // too small for the request.
    let mut full = cred(0, 1);
    full.limit = Some(10);
    full.used = 10;
    let mut marked = cred(1, 1);
    marked.state = StoredState::Exhausted;
    let mut small = cred(2, 1);
    small.limit = Some(10);
    small.used = 5;
    for c in [&full, &marked, &small] {
        let h = hot(vec![c.clone()]);
        assert_eq!(why(&h, 6, &never), Unavailable::Exhausted);
        // With a daily reset: back at midnight.
        assert_eq!(
            why(&h, 6, &daily),
            Unavailable::Busy {
                retry_after: (MIDNIGHT - NOW) as u64,
                in_flight: false
            }
        );
    }

    // A mark with the provider's date: back then, reset or not; over the limit as well, at
    // whichever comes later.
    let mut dated = cred(0, 1);
    dated.state = StoredState::Exhausted;
    dated.exhausted_until = Some(NOW + 90);
    let h = hot(vec![dated.clone()]);
    let busy = |retry_after: i64, in_flight| Unavailable::Busy {
        retry_after: retry_after as u64,
        in_flight,
    };
    assert_eq!(why(&h, 1, &never), busy(90, false));
    dated.exhausted_until = Some(MIDNIGHT + 3600);
    dated.limit = Some(10);
    dated.used = 10;
    let h = hot(vec![dated.clone()]);
    assert_eq!(why(&h, 1, &daily), busy(MIDNIGHT + 3600 - NOW, false));
    assert_eq!(why(&h, 1, &never), Unavailable::Exhausted);

    // Cooling down: the earliest end among them, beside credentials out for good.
    let mut cooling = [cred(0, 1), cred(1, 1), full.clone()];
    cooling[0].cooldown_until = Some(NOW + 30);
    cooling[1].cooldown_until = Some(NOW + 20);
    let h = hot(cooling.to_vec());
    assert_eq!(why(&h, 1, &never), busy(20, false));

    // Room held by requests in flight: a second, and settlements will free it.
    let mut limited = cred(0, 1);
    limited.limit = Some(100);
    let mut h = hot(vec![limited.clone()]);
    hold(&mut h, 0, 95, ReservationKind::Request, None);
    assert_eq!(why(&h, 10, &never), busy(1, true));
    // Held by leases: until the first of them ends.
    let mut h = hot(vec![limited]);
    hold(&mut h, 0, 50, ReservationKind::Lease, Some(NOW + 600));
    hold(&mut h, 0, 45, ReservationKind::Lease, Some(NOW + 300));
    assert_eq!(why(&h, 10, &never), busy(300, false));
    // A lease past its end (not yet settled) still names at least a second.
    for r in h.reservations.values_mut() {
        r.expires_at = Some(NOW - 5);
    }
    assert_eq!(why(&h, 10, &never), busy(1, false));
}
