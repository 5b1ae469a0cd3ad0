//! The auto-key counter of one table. Numbers are leased from the file `bandwidth` at a time:
//! the upper end of the lease is committed before any number of it is handed out, so a crash
//! can skip numbers but never hand one out twice.

use std::collections::VecDeque;

use crate::error::{Error, Result};

/// Called with the next number once a lease is committed (or with the reason it failed).
pub type NumberCallback = Box<dyn FnOnce(Result<u64>) + Send>;

pub struct KeySequence {
    next: u64,
    leased_until: u64,
    bandwidth: u64,
    lease_pending: bool,
    waiting: VecDeque<NumberCallback>,
}

/// What [`KeySequence::take`] asks of its caller.
pub enum Take {
    Number(u64),
    /// Queued; the caller must commit a lease up to this bound unless one is already on its way.
    NeedLease(Option<u64>),
}

impl KeySequence {
    /// `leased_until` is what the file says; numbers below it may have been handed out already.
    pub fn new(leased_until: u64, bandwidth: u64) -> Self {
        KeySequence {
            next: leased_until,
            leased_until,
            bandwidth: bandwidth.max(1),
            lease_pending: false,
            waiting: VecDeque::new(),
        }
    }

    pub fn take(&mut self, make_waiter: impl FnOnce() -> NumberCallback) -> Take {
        if self.next < self.leased_until && self.waiting.is_empty() {
            let n = self.next;
            self.next += 1;
            return Take::Number(n);
        }
        self.waiting.push_back(make_waiter());
        Take::NeedLease(self.request_lease())
    }

    fn request_lease(&mut self) -> Option<u64> {
        if self.lease_pending {
            return None;
        }
        self.lease_pending = true;
        let wanted = self.waiting.len() as u64;
        Some(self.leased_until.saturating_add(self.bandwidth.max(wanted)))
    }

    /// The lease up to `until` is committed: serve the waiters in order. Returns the callbacks
    /// to run (outside any lock) and the next lease to request, if waiters remain.
    pub fn leased(&mut self, until: u64) -> (Vec<(NumberCallback, u64)>, Option<u64>) {
        self.lease_pending = false;
        self.leased_until = self.leased_until.max(until);
        let mut served = Vec::new();
        while self.next < self.leased_until {
            let Some(waiter) = self.waiting.pop_front() else {
                break;
            };
            served.push((waiter, self.next));
            self.next += 1;
        }
        let again = if self.waiting.is_empty() {
            None
        } else {
            self.request_lease()
        };
        (served, again)
    }

    #[cfg(feature = "etcd")]
    /// As [`KeySequence::leased`], for a lease of `[start, until)` taken from a counter that
    /// other processes lease from too (etcd): numbers below `start` may be theirs, so the
    /// waiters are served from `start` on.
    pub fn leased_from(
        &mut self,
        start: u64,
        until: u64,
    ) -> (Vec<(NumberCallback, u64)>, Option<u64>) {
        self.next = self.next.max(start);
        self.leased(until)
    }

    /// At a clean close: the first number not handed out, when the lease reaches further, so
    /// the rest of the lease goes back to the file and the next open continues from there.
    pub fn give_back(&mut self) -> Option<u64> {
        if self.lease_pending || !self.waiting.is_empty() || self.next >= self.leased_until {
            return None;
        }
        self.leased_until = self.next;
        Some(self.next)
    }

    /// The lease failed: every waiter hears why.
    pub fn lease_failed(&mut self, err: &Error) -> Vec<(NumberCallback, Error)> {
        self.lease_pending = false;
        self.waiting.drain(..).map(|w| (w, err.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn hands_out_leased_numbers_then_asks_for_more() {
        let mut seq = KeySequence::new(0, 3);
        let (tx, rx) = mpsc::channel();
        let waiter = {
            let tx = tx.clone();
            move || -> NumberCallback { Box::new(move |n| tx.send(n.unwrap()).unwrap()) }
        };
        let Take::NeedLease(Some(until)) = seq.take(waiter.clone()) else {
            panic!("an empty lease must ask for one")
        };
        assert_eq!(until, 3);
        assert!(matches!(seq.take(waiter.clone()), Take::NeedLease(None)));
        let (served, again) = seq.leased(until);
        assert!(again.is_none());
        for (cb, n) in served {
            cb(Ok(n));
        }
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![0, 1]);
        assert!(matches!(seq.take(waiter.clone()), Take::Number(2)));
        assert!(matches!(seq.take(waiter), Take::NeedLease(Some(6))));
    }

    #[test]
    fn restart_skips_the_rest_of_the_lease() {
        let mut seq = KeySequence::new(1000, 1000);
        assert!(matches!(
            seq.take(|| Box::new(|_| {})),
            Take::NeedLease(Some(2000))
        ));
        let (served, _) = seq.leased(2000);
        assert_eq!(served[0].1, 1000);
    }

    #[test]
    fn a_clean_close_gives_back_the_unused_rest_of_the_lease() {
        let mut seq = KeySequence::new(0, 1000);
        assert!(
            seq.give_back().is_none(),
            "nothing leased, nothing to give back"
        );
        let Take::NeedLease(Some(until)) = seq.take(|| Box::new(|_| {})) else {
            panic!("an empty lease must ask for one")
        };
        let (served, _) = seq.leased(until);
        assert_eq!(served[0].1, 0);
        assert!(matches!(seq.take(|| unreachable!()), Take::Number(1)));
        assert_eq!(seq.give_back(), Some(2));
        assert!(seq.give_back().is_none(), "given back once");
        let mut reopened = KeySequence::new(2, 1000);
        assert!(matches!(
            reopened.take(|| Box::new(|_| {})),
            Take::NeedLease(Some(1002))
        ));
    }
}
