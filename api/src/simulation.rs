//! Whether a deterministic simulation runs on this thread.
//!
//! A simulation runs every server on one thread, on a simulated clock. Stores that write on
//! threads of their own (the Raft log, the cell's writer) write inline instead there, so that
//! when a write is durable depends on the simulated clock alone and not on the machine's
//! scheduler, and a crashed host's stores close with its tasks, as a killed process's would.
//! Outside a simulation the flag is never set and nothing changes.

use std::cell::Cell;

thread_local! {
    static SIMULATED: Cell<bool> = const { Cell::new(false) };
}

/// Makes this thread a simulation's.
pub fn enter_on_this_thread() {
    SIMULATED.with(|simulated| simulated.set(true));
}

/// Whether a simulation runs on this thread.
pub fn active() -> bool {
    SIMULATED.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_thread_that_entered_is_simulated() {
        assert!(!active());
        enter_on_this_thread();
        assert!(active());
        assert!(!std::thread::spawn(active).join().expect("thread"));
    }
}
