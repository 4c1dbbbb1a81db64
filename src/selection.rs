//! The selection strategies, as plain functions. The ledger runs them over its in-memory
//! mirror inside the group it is deciding; `usable(i)` says whether the i-th credential is
//! usable and has room for the reservation.
//!
//! - round_robin: the next usable credential after the last one picked, in creation order.
//! - priority: the lowest priority number with a usable credential; within that level,
//!   round-robin.
//! - quota_aware: the most room left (limit - used - reserved; unlimited counts as the most);
//!   ties go to the earliest created.
//!
//! Round-robin and priority keep a cursor, so a pick is a step, not a scan of every credential;
//! quota_aware has to look at every usable one.

/// Round-robin over `len` credentials from `cursor`: the index picked and the new cursor.
pub fn rotate(len: usize, cursor: usize, usable: impl Fn(usize) -> bool) -> Option<(usize, usize)> {
    if len == 0 {
        return None;
    }
    let start = cursor % len;
    (0..len)
        .map(|k| (start + k) % len)
        .find(|&i| usable(i))
        .map(|i| (i, i + 1))
}

/// Priority: `levels` are the priority numbers of credentials sorted by (priority, creation);
/// `cursors` holds each level's round-robin cursor. The index picked, if any.
pub fn by_priority(
    levels: &[i64],
    cursors: &mut std::collections::HashMap<i64, usize>,
    usable: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut start = 0;
    while start < levels.len() {
        let level = levels[start];
        let end = levels[start..]
            .iter()
            .position(|p| *p != level)
            .map_or(levels.len(), |n| start + n);
        let cursor = cursors.get(&level).copied().unwrap_or(0);
        if let Some((k, next)) = rotate(end - start, cursor, |k| usable(start + k)) {
            cursors.insert(level, next);
            return Some(start + k);
        }
        start = end;
    }
    None
}

/// Quota-aware: among `rooms` (room left per credential, `None` when unusable, `u64::MAX` when
/// unlimited), the index with the most.
pub fn most_room(rooms: impl Iterator<Item = Option<u64>>) -> Option<usize> {
    let mut best: Option<(usize, u64)> = None;
    for (i, room) in rooms.enumerate() {
        if let Some(r) = room
            && best.is_none_or(|(_, b)| r > b)
        {
            best = Some((i, r));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn round_robin_is_even_and_skips_the_unusable() {
        let mut counts = [0; 3];
        let mut cursor = 0;
        for _ in 0..300 {
            let (i, next) = rotate(3, cursor, |_| true).unwrap();
            counts[i] += 1;
            cursor = next;
        }
        assert_eq!(counts, [100, 100, 100]);
        assert_eq!(rotate(3, 1, |i| i != 1), Some((2, 3)));
        assert_eq!(rotate(3, 0, |_| false), None);
        assert_eq!(rotate(0, 0, |_| true), None);
    }

    #[test]
    fn priority_drains_the_lowest_number_and_rotates_within_it() {
        let levels = [1, 1, 2, 3];
        let mut cursors = HashMap::new();
        let picks: Vec<usize> = (0..4)
            .map(|_| by_priority(&levels, &mut cursors, |_| true).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 0, 1]);
        assert_eq!(by_priority(&levels, &mut cursors, |i| i >= 2), Some(2));
        assert_eq!(by_priority(&levels, &mut cursors, |i| i == 3), Some(3));
        assert_eq!(by_priority(&levels, &mut cursors, |_| false), None);
    }

    #[test]
    fn quota_aware_takes_the_most_room() {
        assert_eq!(
            most_room([Some(10), Some(90), None, Some(50)].into_iter()),
            Some(1)
        );
        assert_eq!(most_room([Some(10), Some(u64::MAX)].into_iter()), Some(1));
        assert_eq!(
            most_room([Some(5), Some(5)].into_iter()),
            Some(0),
            "ties: the earliest"
        );
        assert_eq!(most_room([None, None].into_iter()), None);
    }
}
