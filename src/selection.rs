//! The selection strategies, as plain functions over the candidates the store found usable
//! inside its reservation transaction (every candidate has room for the reservation).

use crate::config::SelectionStrategy;

/// A usable credential, as selection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    /// Creation order: the last tie-break.
    pub seq: i64,
    pub priority: i64,
    pub limit: Option<u64>,
    pub used: u64,
    pub reserved: u64,
    /// When it was last picked (a global, increasing number): round-robin takes the oldest.
    pub last_pick: i64,
}

impl Candidate {
    /// What is left after what is used and reserved; unlimited counts as the most.
    fn room(&self) -> u64 {
        self.limit
            .map(|l| l.saturating_sub(self.used).saturating_sub(self.reserved))
            .unwrap_or(u64::MAX)
    }
}

/// The index of the candidate to use, or `None` when there is none.
pub fn pick(strategy: SelectionStrategy, candidates: &[Candidate]) -> Option<usize> {
    let lru = |c: &Candidate| (c.last_pick, c.seq);
    let indexed = candidates.iter().enumerate();
    match strategy {
        SelectionStrategy::RoundRobin => indexed.min_by_key(|(_, c)| lru(c)),
        SelectionStrategy::Priority => indexed.min_by_key(|(_, c)| (c.priority, lru(c))),
        SelectionStrategy::QuotaAware => {
            indexed.min_by_key(|(_, c)| (std::cmp::Reverse(c.room()), lru(c)))
        }
    }
    .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, priority: i64, limit: Option<u64>, used: u64, last_pick: i64) -> Candidate {
        Candidate {
            id: id.into(),
            seq: id.len() as i64,
            priority,
            limit,
            used,
            reserved: 0,
            last_pick,
        }
    }

    #[test]
    fn strategies() {
        let cs = [
            c("a", 2, Some(100), 10, 5),
            c("bb", 1, Some(100), 90, 7),
            c("ccc", 1, None, 0, 6),
        ];
        assert_eq!(pick(SelectionStrategy::RoundRobin, &cs), Some(0));
        assert_eq!(
            pick(SelectionStrategy::Priority, &cs),
            Some(2),
            "lowest number, then least recent"
        );
        assert_eq!(
            pick(SelectionStrategy::QuotaAware, &cs),
            Some(2),
            "unlimited is the most room"
        );
        let cs = [c("a", 1, Some(100), 10, 5), c("bb", 1, Some(100), 90, 1)];
        assert_eq!(pick(SelectionStrategy::QuotaAware, &cs), Some(0));
        assert_eq!(pick(SelectionStrategy::RoundRobin, &[]), None);
    }

    #[test]
    fn round_robin_is_even() {
        let mut cs = vec![
            c("a", 1, None, 0, 0),
            c("bb", 1, None, 0, 0),
            c("ccc", 1, None, 0, 0),
        ];
        let mut counts = [0; 3];
        for pick_no in 1..=300 {
            let i = pick(SelectionStrategy::RoundRobin, &cs).unwrap();
            counts[i] += 1;
            cs[i].last_pick = pick_no;
        }
        assert_eq!(counts, [100, 100, 100]);
    }
}
