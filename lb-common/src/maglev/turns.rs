//! The weighted turn order shared by both populate implementations.
//!
//! Backend `i` takes a turn in round `r` when `r * w_i` reaches its
//! threshold, which then grows by the largest weight; within a round,
//! backends go in canonical order. A backend of the largest weight takes a
//! turn every round, one of half that weight every other round.

use std::{cmp::Reverse, collections::BinaryHeap, ops::Range, vec::Vec};

/// A source of turns: the backend of each, forever (the caller stops when
/// the table is full).
///
/// # Safety
/// `next_backend` only returns indices below `backends()`: the fast
/// populate indexes its per-backend arrays with them unchecked.
pub(super) unsafe trait TurnOrder {
    fn next_backend(&mut self) -> usize;
    fn backends(&self) -> usize;
    /// Whether two consecutive turns are never the same backend's.
    fn distinct_neighbours(&self) -> bool {
        false
    }

    /// Whether `take_run` returns many turns at once (enough to fill
    /// vectors of eight).
    fn long_runs(&self) -> bool {
        false
    }

    /// Takes the next turns, which are those of some of backends
    /// `start..end`, each at most once, in index order: all of them (true),
    /// or those left in `takers` (false). At most `max` turns (at least one
    /// if `max` is not 0, though a run may take none).
    fn take_run(&mut self, max: usize, takers: &mut Vec<u32>) -> (Range<usize>, bool) {
        let _ = (max, takers);
        let i = self.next_backend();
        (i..i + 1, true)
    }
}

/// Equal weights: every backend every round, in order.
pub(super) struct RoundRobin {
    at: usize,
    backends: usize,
}

impl RoundRobin {
    pub fn new(backends: usize) -> Self {
        assert!(backends > 0);
        RoundRobin { at: 0, backends }
    }
}

// SAFETY: `at` wraps to 0 at `backends`.
unsafe impl TurnOrder for RoundRobin {
    fn backends(&self) -> usize {
        self.backends
    }

    fn distinct_neighbours(&self) -> bool {
        self.backends > 1
    }

    fn long_runs(&self) -> bool {
        self.backends >= 16
    }

    /// The rest of the round, or its next `max` turns.
    #[inline(always)]
    fn take_run(&mut self, max: usize, _: &mut Vec<u32>) -> (Range<usize>, bool) {
        let start = self.at;
        let end = (start + max.max(1)).min(self.backends);
        self.at = if end == self.backends { 0 } else { end };
        (start..end, true)
    }

    #[inline(always)]
    fn next_backend(&mut self) -> usize {
        let i = self.at;
        self.at = if i + 1 == self.backends { 0 } else { i + 1 };
        i
    }
}

/// Any weights.
pub(super) struct Turns<'a> {
    weights: &'a [u32],
    state: Vec<TurnState>,
    order: Order,
    round: u64,
    at: usize,
}

enum Order {
    /// Equal weights: every backend every round.
    RoundRobin,
    /// Most backends take a turn in most rounds: visit them all.
    Scan,
    /// Few backends per round (a few heavy, many light): the next turns by
    /// (round, index), instead of visiting every backend every round.
    Queue(BinaryHeap<Reverse<(u64, usize)>>),
}

/// The round of a backend's next turn, `ceil(threshold / w)`, kept as a
/// quotient and remainder that grow by `max / w` and `max % w`, so a turn
/// costs no division.
#[derive(Clone, Copy)]
struct TurnState {
    whole: u64,
    part: u64,
    quotient: u64,
    remainder: u64,
    /// u64::MAX for weight 0: never.
    next_round: u64,
}

impl<'a> Turns<'a> {
    /// `weights` must hold a non-zero weight.
    pub fn new(weights: &'a [u32]) -> Self {
        let max_weight = *weights.iter().max().unwrap_or(&0) as u64;
        let state: Vec<TurnState> = weights
            .iter()
            .map(|&w| {
                let divisor = (w as u64).max(1);
                TurnState {
                    whole: max_weight / divisor,
                    part: max_weight % divisor,
                    quotient: 0,
                    remainder: 0,
                    next_round: if w == 0 { u64::MAX } else { 0 },
                }
            })
            .collect();
        let total: u64 = weights.iter().map(|&w| w as u64).sum();
        let order = if weights.iter().all(|&w| w as u64 == max_weight) {
            Order::RoundRobin
        } else if total * 4 >= max_weight * weights.len() as u64 {
            Order::Scan
        } else {
            Order::Queue(
                (0..weights.len())
                    .filter(|&i| weights[i] > 0)
                    .map(|i| Reverse((0, i)))
                    .collect(),
            )
        };
        Turns {
            weights,
            state,
            order,
            round: 0,
            at: 0,
        }
    }

    /// A scan past the last backend starts the next round.
    #[inline(always)]
    fn wrap_round(&mut self) {
        if self.at == self.weights.len() {
            self.at = 0;
            self.round += 1;
        }
    }

    /// Gives backend `i` its turn if it is due in this round.
    #[inline(always)]
    fn take_if_due(&mut self, i: usize) -> bool {
        let due = self.state[i].next_round <= self.round;
        if due {
            advance(&mut self.state[i], self.weights[i]);
        }
        due
    }

    /// Whether every backend takes a turn every round.
    pub fn is_round_robin(&self) -> bool {
        matches!(self.order, Order::RoundRobin)
    }
}

// SAFETY: every order yields an index of `weights` (the scan and the
// round robin wrap at its length, the queue holds only its indices).
unsafe impl TurnOrder for Turns<'_> {
    fn backends(&self) -> usize {
        self.weights.len()
    }

    /// Scans of 16 backends or more: most backends of a round take a turn.
    fn long_runs(&self) -> bool {
        matches!(self.order, Order::Scan) && self.weights.len() >= 16
    }

    /// In a scan, the turns among the next `max` backends of the round.
    fn take_run(&mut self, max: usize, takers: &mut Vec<u32>) -> (Range<usize>, bool) {
        let Order::Scan = self.order else {
            let i = self.next_backend();
            return (i..i + 1, true);
        };
        self.wrap_round();
        let start = self.at;
        let end = (start + max.max(1)).min(self.weights.len());
        takers.clear();
        for i in start..end {
            if self.take_if_due(i) {
                takers.push(i as u32);
            }
        }
        self.at = end;
        (start..end, false)
    }

    #[inline(always)]
    fn next_backend(&mut self) -> usize {
        match &mut self.order {
            Order::RoundRobin => {
                let i = self.at;
                self.at = if i + 1 == self.weights.len() {
                    0
                } else {
                    i + 1
                };
                i
            }
            Order::Scan => loop {
                self.wrap_round();
                let i = self.at;
                self.at += 1;
                if self.take_if_due(i) {
                    return i;
                }
            },
            Order::Queue(queue) => {
                let mut top = queue.peek_mut().expect("a backend of non-zero weight");
                let i = top.0.1;
                top.0.0 = advance(&mut self.state[i], self.weights[i]);
                i
            }
        }
    }
}

/// Takes a turn for a backend of weight `w`; returns its next round.
#[inline(always)]
fn advance(s: &mut TurnState, w: u32) -> u64 {
    s.quotient += s.whole;
    s.remainder += s.part;
    if s.remainder >= w as u64 {
        s.quotient += 1;
        s.remainder -= w as u64;
    }
    s.next_round = s.quotient + (s.remainder > 0) as u64;
    s.next_round
}

#[cfg(test)]
mod tests {
    use std::vec;

    use super::*;

    /// The turn order straight from the definition, with divisions.
    fn by_definition(weights: &[u32], count: usize) -> Vec<usize> {
        let max = *weights.iter().max().unwrap() as u64;
        let mut threshold = vec![0u64; weights.len()];
        let mut out = Vec::new();
        let mut round = 0u64;
        while out.len() < count {
            for (i, &w) in weights.iter().enumerate() {
                if w > 0 && round * w as u64 >= threshold[i] && out.len() < count {
                    threshold[i] += max;
                    out.push(i);
                }
            }
            round += 1;
        }
        out
    }

    #[test]
    fn every_order_follows_the_definition() {
        for weights in [
            vec![3u32, 3, 3],
            vec![1, 2, 3, 4, 10, 0, 5],
            vec![1000, 1, 1, 1, 1, 1, 1, 1, 1, 1],
            vec![0, 7, 0, 1],
            vec![0, 100, 0, 1, 1],
            vec![5],
        ] {
            let mut turns = Turns::new(&weights);
            let got: Vec<usize> = (0..5000).map(|_| turns.next_backend()).collect();
            assert_eq!(got, by_definition(&weights, 5000), "weights {weights:?}");
        }
    }

    /// Runs (the batched rounds' way to take turns), mixed with single
    /// turns, give the same order.
    #[test]
    fn runs_follow_the_definition() {
        let mut weights: Vec<u32> = (0..40).map(|i| 1 + i % 4).collect();
        weights[7] = 0;
        for weights in [weights, vec![2; 20]] {
            let mut turns = Turns::new(&weights);
            let mut got = Vec::new();
            let mut takers = Vec::new();
            let mut max = 1;
            while got.len() < 5000 {
                let (run, all) = turns.take_run(max, &mut takers);
                if all {
                    got.extend(run);
                } else {
                    assert!(takers.iter().all(|&i| run.contains(&(i as usize))));
                    got.extend(takers.iter().map(|&i| i as usize));
                }
                got.push(turns.next_backend());
                max = max % 23 + 1;
            }
            got.truncate(5000);
            assert_eq!(got, by_definition(&weights, 5000), "weights {weights:?}");
        }
    }
}
