//! The cell's lease: how long it may go on accepting writes without hearing from the control
//! plane.
//!
//! The cell enforces the lease itself, on its own monotonic clock (its host's, which a
//! simulation may make run fast or slow). A renewal is two calls from
//! the agent: `LeaseTicket` before it asks the control plane, which notes the cell's clock,
//! and `ExtendLease` with the ticket and the length the control plane granted. The lease runs
//! from the ticket, not from the extension: every delay on the way (the agent, the network,
//! the control plane's log) only shortens it. The control plane counts a lease from when it
//! committed the renewal, which is after the ticket, so the cell's lease always ends first.
//!
//! A cell run without an agent (`lease_required` off) has no control plane to fail it over and
//! needs no lease.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::clock::Monotonic;
use tokio::time::Instant;

use crate::error::CellError;

/// Tickets remembered; an extension naming an older one is refused (the agent asks again).
const TICKETS_KEPT: usize = 64;

#[derive(Debug)]
struct Inner {
    /// Issued tickets, oldest first: (ticket, the cell's clock when it was issued).
    tickets: VecDeque<(u64, Instant)>,
    next_ticket: u64,
    /// Writes are accepted until then; `None` before the first extension.
    until: Option<Instant>,
}

/// The lease, shared by the admin service (renewals) and the writer (checks); cheap to clone.
#[derive(Debug, Clone)]
pub struct Lease {
    required: bool,
    clock: Monotonic,
    inner: Arc<Mutex<Inner>>,
}

impl Lease {
    /// A lease that must be held to write (`required`), or none at all, on `clock`.
    pub fn new(required: bool, clock: Monotonic) -> Self {
        Self {
            required,
            clock,
            inner: Arc::new(Mutex::new(Inner {
                tickets: VecDeque::new(),
                next_ticket: 1,
                until: None,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn required(&self) -> bool {
        self.required
    }

    /// Notes the cell's clock now and names that moment.
    pub fn ticket(&self) -> u64 {
        self.ticket_at(self.clock.now())
    }

    fn ticket_at(&self, now: Instant) -> u64 {
        let mut inner = self.lock();
        let ticket = inner.next_ticket;
        inner.next_ticket += 1;
        inner.tickets.push_back((ticket, now));
        while inner.tickets.len() > TICKETS_KEPT {
            inner.tickets.pop_front();
        }
        ticket
    }

    /// Extends the lease to `length` after the moment `ticket` names; never shortens it.
    /// Answers how long the lease runs from now.
    pub fn extend(&self, ticket: u64, length: Duration) -> Result<Duration, CellError> {
        self.extend_at(ticket, length, self.clock.now())
    }

    fn extend_at(
        &self,
        ticket: u64,
        length: Duration,
        now: Instant,
    ) -> Result<Duration, CellError> {
        let mut inner = self.lock();
        let Some(&(_, issued)) = inner.tickets.iter().find(|(t, _)| *t == ticket) else {
            return Err(CellError::invalid(
                "ticket",
                format!("{ticket} was not issued by this cell or is too old; take a new one"),
            ));
        };
        let until = issued + length;
        inner.until = Some(inner.until.map_or(until, |held| held.max(until)));
        Ok(inner
            .until
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now)))
    }

    /// How long the lease still runs; `None` when no lease is required.
    pub fn remaining(&self) -> Option<Duration> {
        self.remaining_at(self.clock.now())
    }

    fn remaining_at(&self, now: Instant) -> Option<Duration> {
        if !self.required {
            return None;
        }
        Some(
            self.lock()
                .until
                .map_or(Duration::ZERO, |until| until.saturating_duration_since(now)),
        )
    }

    /// Whether the cell may accept a write now: `UNAVAILABLE` (retry, the key will have
    /// moved or the lease be renewed) once the lease ran out.
    pub fn check(&self) -> Result<(), CellError> {
        self.check_at(self.clock.now())
    }

    fn check_at(&self, now: Instant) -> Result<(), CellError> {
        match self.remaining_at(now) {
            Some(Duration::ZERO) => Err(CellError::Unavailable(
                "the cell's lease from the control plane ran out: it accepts no writes until its agent renews it; retry (the conversation may have failed over)".into(),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_cell_without_a_required_lease_always_writes() {
        let lease = Lease::new(false, Monotonic::default());
        assert!(lease.check().is_ok());
        assert_eq!(lease.remaining(), None);
    }

    #[test]
    fn a_required_lease_refuses_writes_until_extended_and_after_it_runs_out() {
        let lease = Lease::new(true, Monotonic::default());
        let start = Instant::now();
        assert!(matches!(
            lease.check_at(start),
            Err(CellError::Unavailable(_))
        ));
        let ticket = lease.ticket_at(start);
        // Granted 100 ms later for 1 s: the lease ends 1 s after the ticket, not after the
        // extension.
        let left = lease
            .extend_at(ticket, 1000 * MS, start + 100 * MS)
            .unwrap();
        assert_eq!(left, 900 * MS);
        assert!(lease.check_at(start + 999 * MS).is_ok());
        assert!(lease.check_at(start + 1000 * MS).is_err());
    }

    #[test]
    fn an_older_ticket_never_shortens_the_lease() {
        let lease = Lease::new(true, Monotonic::default());
        let start = Instant::now();
        let old = lease.ticket_at(start);
        let new = lease.ticket_at(start + 500 * MS);
        lease.extend_at(new, 1000 * MS, start + 510 * MS).unwrap();
        // The older renewal's answer arrives late: the lease keeps the newer end.
        lease.extend_at(old, 1000 * MS, start + 520 * MS).unwrap();
        assert!(lease.check_at(start + 1400 * MS).is_ok());
        assert!(lease.check_at(start + 1500 * MS).is_err());
    }

    #[test]
    fn unknown_and_forgotten_tickets_are_refused() {
        let lease = Lease::new(true, Monotonic::default());
        assert!(matches!(
            lease.extend(7, 1000 * MS),
            Err(CellError::Invalid { field, .. }) if field == "ticket"
        ));
        let first = lease.ticket();
        for _ in 0..TICKETS_KEPT {
            lease.ticket();
        }
        assert!(lease.extend(first, 1000 * MS).is_err());
    }
}
