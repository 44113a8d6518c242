//! Memory caps: how many pages the disks that share a [`MemoryBudget`] may hold, and the
//! reservations that take room from every cap a disk counts against before any page changes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::PAGE_SIZE;

/// A write needed pages that a memory cap does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("memory cap reached")]
pub struct NoSpace;

/// A cap on the pages held by the disks that share it.
#[derive(Debug)]
pub struct MemoryBudget {
    limit_pages: u64,
    used_pages: AtomicU64,
}

impl MemoryBudget {
    pub fn new(limit_bytes: u64) -> Self {
        Self {
            limit_pages: limit_bytes / PAGE_SIZE,
            used_pages: AtomicU64::new(0),
        }
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_pages * PAGE_SIZE
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_pages.load(Ordering::Relaxed) * PAGE_SIZE
    }

    fn try_take(&self, pages: u64) -> bool {
        self.used_pages
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(pages)
                    .filter(|&total| total <= self.limit_pages)
            })
            .is_ok()
    }

    fn take(&self, pages: u64) {
        self.used_pages.fetch_add(pages, Ordering::AcqRel);
    }

    fn give_back(&self, pages: u64) {
        self.used_pages.fetch_sub(pages, Ordering::AcqRel);
    }
}

/// The caps one disk counts against: its own and the server-wide one (either may be absent).
#[derive(Debug, Clone, Default)]
pub(super) struct Budgets(Vec<Arc<MemoryBudget>>);

impl Budgets {
    pub(super) fn new(budgets: Vec<Arc<MemoryBudget>>) -> Self {
        Self(budgets)
    }

    pub(super) fn is_unlimited(&self) -> bool {
        self.0.is_empty()
    }

    /// Takes `pages` from every cap, or from none.
    pub(super) fn reserve(&self, pages: u64) -> Result<Reservation, NoSpace> {
        if pages > 0 {
            for (i, budget) in self.0.iter().enumerate() {
                if !budget.try_take(pages) {
                    self.0[..i].iter().for_each(|b| b.give_back(pages));
                    return Err(NoSpace);
                }
            }
        }
        Ok(Reservation {
            budgets: self.clone(),
            reserved: pages,
            allocated: 0,
        })
    }

    /// Pages were released: they no longer count against any cap.
    pub(super) fn released(&self, pages: u64) {
        if pages > 0 {
            self.0.iter().for_each(|budget| budget.give_back(pages));
        }
    }
}

/// Room taken from a disk's caps for one operation. The operation reports the pages it really
/// allocated; when the reservation is dropped (the operation finished, or was abandoned half
/// way because its client went away) the caps are squared with what happened: the surplus goes
/// back, and pages allocated beyond the estimate (a concurrent trim freed pages between the
/// estimate and the write) are charged, a transient overshoot of at most that race rather than
/// failing a write half-done.
#[derive(Debug)]
pub(super) struct Reservation {
    budgets: Budgets,
    reserved: u64,
    allocated: u64,
}

impl Reservation {
    pub(super) fn allocated(&mut self, pages: u64) {
        self.allocated += pages;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let Reservation {
            budgets,
            reserved,
            allocated,
        } = self;
        if allocated < reserved {
            budgets.released(*reserved - *allocated);
        } else if allocated > reserved {
            budgets
                .0
                .iter()
                .for_each(|b| b.take(*allocated - *reserved));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_takes_from_every_cap_or_none_and_settles_on_drop() {
        let small = Arc::new(MemoryBudget::new(4 * PAGE_SIZE));
        let large = Arc::new(MemoryBudget::new(100 * PAGE_SIZE));
        let budgets = Budgets::new(vec![Arc::clone(&large), Arc::clone(&small)]);
        assert!(budgets.reserve(5).is_err());
        assert_eq!(large.used_bytes(), 0, "a failed reservation takes nothing");
        let mut reservation = budgets.reserve(4).unwrap();
        reservation.allocated(1);
        drop(reservation);
        assert_eq!(
            small.used_bytes(),
            PAGE_SIZE,
            "the unused 3 pages came back"
        );
        let mut reservation = budgets.reserve(0).unwrap();
        reservation.allocated(2);
        drop(reservation);
        assert_eq!(large.used_bytes(), 3 * PAGE_SIZE, "an overshoot is charged");
        budgets.released(3);
        assert_eq!(large.used_bytes(), 0);
    }
}
